//! `POST /v1/embeddings` for the embedding model: one deterministic unit vector per input.
//!
//! A vector is the normalised sum of one pseudo-random vector per word (lower-cased) or
//! token id, so the same text always gets the same vector and texts sharing words point
//! in similar directions — enough for a demo of similarity search, with no model.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Serialize;
use serde_json::{Map, Value};

use super::config::{EMBEDDING_MAX_MODEL_LEN, SimulatorConfig};
use super::models::{Api, check_model};
use super::prompt::text_tokens;
use super::wire::{ApiError, unix_now, usage_json};

/// Tokens a text input costs beyond its text: BGE-M3's `<s>` and `</s>`.
const SPECIAL_TOKENS: u64 = 2;

/// The fields of an embedding request the simulator acts on.
#[derive(Debug)]
pub(super) struct EmbeddingRequest<'a> {
    inputs: Vec<Input<'a>>,
    base64: bool,
    prompt_tokens: u32,
}

#[derive(Debug)]
enum Input<'a> {
    Text(&'a str),
    Tokens(&'a [Value]),
}

impl<'a> EmbeddingRequest<'a> {
    /// Validates `body` the way vLLM would for a model without Matryoshka training.
    pub fn parse(body: &'a Value, config: &SimulatorConfig) -> Result<Self, ApiError> {
        let Value::Object(body) = body else {
            return Err(ApiError::bad_request(
                "Request body must be a JSON object",
                None,
            ));
        };
        let model = check_model(body, config, Api::Embeddings)?;
        let inputs = read_inputs(body)?;
        let base64 = match body.get("encoding_format") {
            None | Some(Value::Null) => false,
            Some(Value::String(format)) if format == "float" => false,
            Some(Value::String(format)) if format == "base64" => true,
            Some(_) => {
                return Err(ApiError::bad_request(
                    "encoding_format: Input should be 'float' or 'base64'",
                    Some("encoding_format"),
                ));
            }
        };
        if body.get("dimensions").is_some_and(|d| !d.is_null()) {
            return Err(ApiError::bad_request(
                format!(
                    "Model \"{model}\" does not support matryoshka representation, changing \
                     output dimensions will lead to poor results."
                ),
                Some("dimensions"),
            ));
        }
        let mut prompt_tokens = 0u64;
        for input in &inputs {
            let tokens = match input {
                Input::Text(text) => text_tokens(text) + SPECIAL_TOKENS,
                Input::Tokens(ids) => ids.len() as u64,
            };
            if tokens > u64::from(EMBEDDING_MAX_MODEL_LEN) {
                return Err(ApiError::bad_request(
                    format!(
                        "This model's maximum context length is {EMBEDDING_MAX_MODEL_LEN} \
                         tokens. However, you requested {tokens} tokens in the input for \
                         embedding generation. Please reduce the length of the input."
                    ),
                    None,
                ));
            }
            prompt_tokens = prompt_tokens.saturating_add(tokens);
        }
        Ok(Self {
            inputs,
            base64,
            prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
        })
    }

    /// The serialised `list` of embeddings (floats are written as `f32`, as vLLM does).
    pub fn json(&self, id: &str, model: &str, dimensions: usize, with_usage: bool) -> Vec<u8> {
        let data = self
            .inputs
            .iter()
            .enumerate()
            .map(|(index, input)| {
                let vector = embed(input, dimensions);
                let embedding = if self.base64 {
                    // Little-endian f32s, which is what the OpenAI SDK decodes.
                    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                    Embedding::Base64(STANDARD.encode(bytes))
                } else {
                    Embedding::Floats(vector)
                };
                EmbeddingData {
                    index,
                    object: "embedding",
                    embedding,
                }
            })
            .collect();
        let list = EmbeddingList {
            id,
            object: "list",
            created: unix_now(),
            model,
            data,
            usage: with_usage.then(|| usage_json(self.prompt_tokens, 0)),
        };
        // Serialising plain structs and numbers cannot fail.
        serde_json::to_vec(&list).unwrap_or_default()
    }
}

#[derive(Serialize)]
struct EmbeddingList<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    data: Vec<EmbeddingData>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Value>,
}

#[derive(Serialize)]
struct EmbeddingData {
    index: usize,
    object: &'static str,
    embedding: Embedding,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Embedding {
    Floats(Vec<f32>),
    Base64(String),
}

/// `input`: a string, a list of strings, a list of token ids, or a list of such lists.
fn read_inputs(body: &Map<String, Value>) -> Result<Vec<Input<'_>>, ApiError> {
    let invalid = || {
        ApiError::bad_request(
            "input: Input should be a valid string, a list of strings, a list of token ids or \
             a list of lists of token ids",
            Some("input"),
        )
    };
    let tokens = |ids: &'_ [Value]| ids.iter().all(Value::is_u64);
    match body.get("input") {
        None | Some(Value::Null) => Err(ApiError::bad_request(
            "input: Field required",
            Some("input"),
        )),
        Some(Value::String(text)) => Ok(vec![Input::Text(text)]),
        Some(Value::Array(items)) if items.is_empty() => Err(ApiError::bad_request(
            "input: List should have at least 1 item after validation, not 0",
            Some("input"),
        )),
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            if tokens(items) {
                Ok(vec![Input::Tokens(items)])
            } else {
                Err(invalid())
            }
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => Ok(Input::Text(text)),
                Value::Array(ids) if tokens(ids) => Ok(Input::Tokens(ids)),
                _ => Err(invalid()),
            })
            .collect(),
        Some(_) => Err(invalid()),
    }
}

/// The unit vector of `input`: the sum of one pseudo-random vector per word or token.
fn embed(input: &Input<'_>, dimensions: usize) -> Vec<f32> {
    let mut vector = vec![0.0f32; dimensions];
    let mut add = |seed: u64| {
        let mut rng = SplitMix64(seed);
        for x in &mut vector {
            *x += rng.next_signed();
        }
    };
    let mut features = 0usize;
    match input {
        Input::Text(text) => {
            for word in text
                .split(|c: char| !c.is_alphanumeric())
                .filter(|w| !w.is_empty())
            {
                add(word_hash(word));
                features += 1;
            }
        }
        Input::Tokens(ids) => {
            for id in ids.iter().filter_map(Value::as_u64) {
                // Salted so that token 7 and the word "7" differ.
                add(fnv1a(0x746f_6b65_6e00, &id.to_le_bytes()));
                features += 1;
            }
        }
    }
    if features == 0 {
        // An input without words (empty, or only punctuation) still gets a fixed vector.
        add(FNV_OFFSET);
    }
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in &mut vector {
            *x /= norm;
        }
    }
    vector
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a of a word's lower-cased characters, without allocating the lower-cased word.
fn word_hash(word: &str) -> u64 {
    let mut hash = FNV_OFFSET;
    let mut buf = [0u8; 4];
    for c in word.chars().flat_map(char::to_lowercase) {
        hash = fnv1a(hash, c.encode_utf8(&mut buf).as_bytes());
    }
    hash
}

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// A small, fast, seedable generator: deterministic across platforms and runs.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn next_signed(&mut self) -> f32 {
        // The top 24 bits make an exact f32 fraction.
        let fraction = (self.next() >> 40) as f32 / (1u32 << 24) as f32;
        fraction * 2.0 - 1.0
    }
}
