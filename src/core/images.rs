//! Placeholder until the image module lands.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSize {
    pub width: u32,
    pub height: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataImage {
    pub mime_type: String,
    pub size: Option<ImageSize>,
    pub encoded_len: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageUrlPolicy {
    pub allowed_schemes: Vec<String>,
    pub allowed_hosts: Vec<String>,
    pub allow_private_hosts: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImagePolicyError {
    #[error("malformed {0}")]
    Malformed(String),
}

impl ImageUrlPolicy {
    pub fn check(&self, _url: &str) -> Result<Option<DataImage>, ImagePolicyError> {
        Ok(None)
    }
}

pub fn estimate_image_tokens(size: Option<ImageSize>) -> u64 {
    size.map_or(256, |_| 256)
}
