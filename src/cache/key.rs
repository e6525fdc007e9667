//! The cache key: a SHA-256 of the request in a canonical form, so that two requests that
//! ask for the same answer find it whatever their JSON's key order or number spelling, and
//! requests that differ in anything that could change the answer never share it.

use base64::Engine as _;
use serde_json::{Map, Number, Value};
use sha2::{Digest, Sha256};

/// A request's identity in the cache: the scope, the endpoint, the model as served and
/// every member of the body but `stream` and `stream_options` (which change the framing of
/// the answer, not the answer), with each inline image replaced by the SHA-256 of its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

/// What a request is, for the cache.
#[derive(Debug)]
pub struct KeyedRequest {
    pub key: CacheKey,
    /// The request asks for the same answer every time: `temperature` 0 or a fixed `seed`.
    pub deterministic: bool,
}

/// Members that change how an answer is framed, not what it says.
const FRAMING: [&str; 2] = ["stream", "stream_options"];

/// Whether `body` asks for the same answer every time (`temperature` 0 or a number as
/// `seed`), read without building the request: most calls are not cacheable, and keying
/// one (parsing it whole and hashing every member) costs more than the rest of its path.
pub fn asks_same_answer(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Sampling {
        #[serde(default)]
        temperature: Option<f64>,
        #[serde(default)]
        seed: Option<Number>,
    }
    serde_json::from_slice::<Sampling>(body)
        .is_ok_and(|s| s.temperature == Some(0.0) || s.seed.is_some())
}

/// Keys `body` (a JSON object) for `scope` (who may share the answer), `endpoint` and the
/// `model` the call is served by; `None` when the body is not a JSON object.
pub fn key_request(scope: &str, endpoint: &str, model: &str, body: &[u8]) -> Option<KeyedRequest> {
    let Ok(Value::Object(mut request)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    for member in FRAMING {
        request.remove(member);
    }
    request.insert("model".into(), Value::String(model.to_owned()));
    let deterministic = request
        .get("temperature")
        .and_then(Value::as_f64)
        .is_some_and(|t| t == 0.0)
        || request.get("seed").is_some_and(Value::is_number);
    let mut hash = Sha256::new();
    write_str(&mut hash, scope);
    write_str(&mut hash, endpoint);
    write_object(&mut hash, &request);
    Some(KeyedRequest {
        key: CacheKey(hash.finalize().into()),
        deterministic,
    })
}

/// Strings carry their length, values a tag: no two different requests write the same bytes.
fn write_str(hash: &mut Sha256, text: &str) {
    hash.update((text.len() as u64).to_le_bytes());
    hash.update(text.as_bytes());
}

fn write_object(hash: &mut Sha256, object: &Map<String, Value>) {
    hash.update(b"{");
    hash.update((object.len() as u64).to_le_bytes());
    // Sorted here, whatever order the map keeps.
    let mut members: Vec<(&String, &Value)> = object.iter().collect();
    members.sort_unstable_by(|a, b| a.0.cmp(b.0));
    for (name, value) in members {
        write_str(hash, name);
        write_value(hash, value);
    }
}

fn write_value(hash: &mut Sha256, value: &Value) {
    match value {
        Value::Null => hash.update(b"n"),
        Value::Bool(b) => hash.update(if *b { b"t" } else { b"f" }),
        Value::Number(n) => {
            hash.update(b"#");
            write_str(hash, &number_text(n));
        }
        Value::String(s) => match inline_image_digest(s) {
            Some(digest) => {
                hash.update(b"i");
                hash.update(digest);
            }
            None => {
                hash.update(b"s");
                write_str(hash, s);
            }
        },
        Value::Array(items) => {
            hash.update(b"[");
            hash.update((items.len() as u64).to_le_bytes());
            for item in items {
                write_value(hash, item);
            }
        }
        Value::Object(object) => write_object(hash, object),
    }
}

/// `0`, `0.0` and `0e0` are one number; integers beyond a float's precision keep their digits.
fn number_text(n: &Number) -> String {
    match n.as_f64() {
        Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 => {
            format!("{}", f as i64)
        }
        Some(f) if n.is_f64() => format!("{f:?}"),
        _ => n.to_string(),
    }
}

/// The SHA-256 of a `data:` URL's bytes (base64 decoded), so that an image is known by what
/// it is, and the key holds 32 bytes rather than the image.
fn inline_image_digest(text: &str) -> Option<[u8; 32]> {
    let rest = text.strip_prefix("data:")?;
    let (_, encoded) = rest.split_once(";base64,")?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    Some(Sha256::digest(&bytes).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(body: &str) -> KeyedRequest {
        key_request("k:key_a", "chat/completions", "m", body.as_bytes()).unwrap()
    }

    #[test]
    fn key_order_number_spelling_and_framing_do_not_change_the_key() {
        let a =
            key(r#"{"model":"alias","messages":[{"role":"user","content":"hi"}],"temperature":0}"#);
        let b = key(
            r#"{"temperature":0.0,"stream":true,"stream_options":{"include_usage":true},"messages":[{"content":"hi","role":"user"}],"model":"m"}"#,
        );
        assert_eq!(a.key, b.key);
        assert!(a.deterministic && b.deterministic);
    }

    #[test]
    fn the_quick_reading_agrees_with_the_key_on_what_is_deterministic() {
        for body in [
            r#"{"messages":[],"temperature":0}"#,
            r#"{"messages":[],"temperature":0.0,"seed":null}"#,
            r#"{"seed":7,"messages":[{"role":"user","content":"x"}]}"#,
            r#"{"messages":[],"temperature":0.2}"#,
            r#"{"messages":[]}"#,
            r#"{"messages":[],"temperature":"0"}"#,
            r#"{"messages":[],"seed":"7"}"#,
        ] {
            assert_eq!(
                asks_same_answer(body.as_bytes()),
                key(body).deterministic,
                "{body}"
            );
        }
    }

    #[test]
    fn every_generation_parameter_and_the_scope_are_part_of_the_key() {
        let base = key(r#"{"messages":[],"temperature":0}"#).key;
        for other in [
            r#"{"messages":[],"temperature":0,"max_tokens":5}"#,
            r#"{"messages":[],"temperature":0,"top_p":0.5}"#,
            r#"{"messages":[],"temperature":0.1}"#,
            r#"{"messages":[{"role":"user","content":"x"}],"temperature":0}"#,
        ] {
            assert_ne!(key(other).key, base, "{other}");
        }
        let other_scope = key_request(
            "k:key_b",
            "chat/completions",
            "m",
            br#"{"messages":[],"temperature":0}"#,
        )
        .unwrap();
        assert_ne!(other_scope.key, base);
    }

    #[test]
    fn inline_images_are_known_by_their_bytes() {
        let image = |url: &str| {
            key(&format!(
                r#"{{"messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"{url}"}}}}]}}],"seed":7}}"#
            ))
        };
        let png = image("data:image/png;base64,iVBORw0KGgo=");
        assert!(png.deterministic, "a fixed seed is deterministic");
        assert_eq!(png.key, image("data:image/png;base64,iVBORw0KGgo=").key);
        assert_ne!(png.key, image("data:image/png;base64,iVBORw0KGgp=").key);
    }

    #[test]
    fn sampling_without_a_seed_is_not_deterministic() {
        assert!(!key(r#"{"messages":[]}"#).deterministic);
        assert!(!key(r#"{"messages":[],"temperature":0.7}"#).deterministic);
        assert!(!key(r#"{"messages":[],"seed":null}"#).deterministic);
    }
}
