//! The `data:` URL reader and the image header sniffer on arbitrary input.
//!
//! Input: one mode byte, then bytes. Modes (3 for the mode byte 255, else the byte mod 3):
//! 0. the bytes as a URL (lossy UTF-8) through `read_data_url` and both URL policies;
//! 1. the bytes as an image, base64-encoded in a PNG data URL: the URL is accepted and its
//!    size is exactly what the sniffer reads from the raw bytes;
//! 2. like 1 with the URL-safe alphabet, whitespace and percent-escapes sprinkled in;
//! 3. a payload longer than the 512 KiB sniffing window, with two different tails: the size
//!    must not depend on anything past the window (the reader never looks beyond it).
//!
//! Always: no panic; a size has both sides in 1..=2^31.
#![no_main]

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use libfuzzer_sys::fuzz_target;
use step3_gateway::core::images::{
    DataImage, ImageSize, ImageUrlPolicy, estimate_image_tokens, image_size, read_data_url,
};

/// `DATA_URL_SNIFF_CHARS` in `src/core/images.rs`.
const WINDOW: usize = 512 * 1024;

fn sane(size: Option<ImageSize>) {
    if let Some(ImageSize { width, height }) = size {
        assert!((1..=1 << 31).contains(&width), "width {width}");
        assert!((1..=1 << 31).contains(&height), "height {height}");
    }
    let tokens = estimate_image_tokens(size);
    assert!((1..=1 << 20).contains(&tokens), "{tokens} tokens");
}

fn read(url: &str) -> Result<DataImage, ()> {
    let read = read_data_url(url).map_err(|_| ());
    if let Ok(image) = &read {
        sane(image.size);
        assert!(image.mime_type.starts_with("image/"));
        assert!(image.encoded_len < url.len());
    }
    read
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, bytes)) = input.split_first() else {
        return;
    };
    sane(image_size(bytes));
    // Mode 3 builds and reads a 512 KiB URL twice (tens of milliseconds under ASan): kept
    // to the one mode byte 255 so that the cheap modes get most of the executions.
    let mode = if mode == 255 { 3 } else { mode % 3 };
    match mode {
        0 => {
            let url = String::from_utf8_lossy(bytes);
            let _ = read(&url);
            let open = ImageUrlPolicy {
                allowed_schemes: vec!["https".into(), "http".into(), "data".into(), "file".into()],
                allowed_hosts: vec!["*.example.com".into(), "::1".into()],
                allow_private_hosts: true,
                fetch: true,
                ..ImageUrlPolicy::default()
            };
            for policy in [ImageUrlPolicy::default(), open] {
                let _ = policy.fetches(&url);
                if let Ok(Some(image)) = policy.check(&url) {
                    sane(image.size);
                }
            }
        }
        1 => {
            let url = format!("data:image/png;base64,{}", STANDARD.encode(bytes));
            let image = read(&url).expect("a base64 PNG data URL is read");
            assert_eq!(image.size, image_size(bytes));
            assert_eq!(image.mime_type, "image/png");
        }
        2 => {
            let encoded = URL_SAFE_NO_PAD.encode(bytes);
            let mut spelled = String::with_capacity(encoded.len() * 2);
            for (i, c) in encoded.chars().enumerate() {
                match i % 7 {
                    3 => spelled.push_str(&format!("%{:02X}", c as u32)),
                    5 => {
                        spelled.push(c);
                        spelled.push_str("\r\n ");
                    }
                    _ => spelled.push(c),
                }
            }
            let url = format!("DATA:Image/PNG;charset=x;BASE64,{spelled}");
            let image = read(&url).expect("a base64 data URL is read");
            assert_eq!(image.size, image_size(bytes));
        }
        _ => {
            let mut payload = STANDARD.encode(bytes).trim_end_matches('=').to_owned();
            // Whole quanta only, then zero bytes up to the window.
            payload.truncate(payload.len() - payload.len() % 4);
            if payload.len() > WINDOW {
                return;
            }
            payload.extend(std::iter::repeat_n('A', WINDOW - payload.len()));
            let a = read(&format!("data:image/png;base64,{payload}AAAA")).expect("read");
            let b = read(&format!(
                "data:image/png;base64,{payload}%zz{}",
                bytes.len()
            ))
            .expect("read");
            assert_eq!(a.size, b.size, "the size depends on bytes past the window");
        }
    }
});
