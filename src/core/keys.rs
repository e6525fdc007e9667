//! Key secrets: generation, hashing and display. A secret exists in plaintext only in the
//! answer to the admin call that created it.

use std::sync::atomic::{AtomicI64, Ordering};

use rand::RngExt;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Every key secret starts with this, so leaked keys are easy to recognise and scan for.
pub const SECRET_PREFIX: &str = "sk-step3-";

/// SHA-256 of a secret: the only form in which secrets are kept.
pub type SecretHash = [u8; 32];

/// A new secret: the prefix and 160 random bits in hex.
pub fn generate_secret() -> String {
    let bytes: [u8; 20] = rand::rng().random();
    format!("{SECRET_PREFIX}{}", to_hex(&bytes))
}

/// A new identifier such as `key_00064a1b2c3d4e5f9a8b7c6d`: a creation timestamp (strictly
/// increasing within the process), so ids sort in creation order, then 32 random bits.
pub fn generate_id(kind: &str) -> String {
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = super::time::now_micros();
    let stamp = LAST
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
            Some(now.max(last + 1))
        })
        .map_or(now, |last| now.max(last + 1));
    let random: [u8; 4] = rand::rng().random();
    format!("{kind}_{stamp:016x}{}", to_hex(&random))
}

pub fn hash_secret(secret: &str) -> SecretHash {
    Sha256::digest(secret.as_bytes()).into()
}

/// What a list shows of a secret: the prefix and four more characters.
pub fn display_prefix(secret: &str) -> String {
    secret.chars().take(SECRET_PREFIX.len() + 4).collect()
}

/// Compares a presented secret with a stored hash in constant time.
pub fn secret_matches(presented: &str, stored: &SecretHash) -> bool {
    hash_secret(presented).ct_eq(stored).into()
}

pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Whether `hex` spells `bytes` (lowercase), without allocating.
pub fn hex_matches(hex: &str, bytes: &[u8]) -> bool {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    hex.len() == bytes.len() * 2
        && hex.as_bytes().chunks_exact(2).zip(bytes).all(|(pair, b)| {
            pair[0] == DIGITS[usize::from(b >> 4)] && pair[1] == DIGITS[usize::from(b & 0x0f)]
        })
}

/// Bytes written as hex, any length (an exported setting).
pub fn bytes_from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

pub fn from_hex(text: &str) -> Option<SecretHash> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = char::from(pair[0]).to_digit(16)?;
        let lo = char::from(pair[1]).to_digit(16)?;
        out[i] = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_distinct_prefixed_and_long_enough() {
        let a = generate_secret();
        let b = generate_secret();
        assert_ne!(a, b);
        assert!(a.starts_with(SECRET_PREFIX));
        // 40 hex characters carry 160 bits.
        assert_eq!(a.len(), SECRET_PREFIX.len() + 40);
    }

    #[test]
    fn hash_round_trips_through_hex_and_matches_only_its_secret() {
        let secret = generate_secret();
        let hash = hash_secret(&secret);
        assert_eq!(from_hex(&to_hex(&hash)), Some(hash));
        assert!(hex_matches(&to_hex(&hash), &hash));
        assert!(!hex_matches(&to_hex(&hash), &hash_secret("other")));
        assert!(secret_matches(&secret, &hash));
        assert!(!secret_matches("sk-step3-wrong", &hash));
        assert_eq!(from_hex("zz"), None);
    }

    #[test]
    fn ids_sort_in_creation_order() {
        let ids: Vec<String> = (0..100).map(|_| generate_id("key")).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
        assert!(ids[0].starts_with("key_"));
    }

    #[test]
    fn display_prefix_reveals_only_a_few_characters() {
        let secret = generate_secret();
        let prefix = display_prefix(&secret);
        assert_eq!(prefix.len(), SECRET_PREFIX.len() + 4);
        assert!(secret.starts_with(&prefix));
    }
}
