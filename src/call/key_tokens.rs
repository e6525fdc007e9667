//! Short-lived tokens made from a key, to hand to a browser or a mobile app instead of
//! the long-lived key: a JWT signed by the gateway (HS256, with a secret derived from the
//! admin token's hash, so every replica of one store signs alike and resetting the admin
//! token ends them all), naming the key, the start of its secret's hash (a rotation ends
//! the key's tokens at once), an expiry, and optionally fewer models and a lower rpm.
//! Revoking or deactivating the key ends them too: each use checks the key as it is now.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, decode, encode};
use serde::{Deserialize, Serialize};

use crate::core::key_index::Narrowing;
use crate::core::time::now_unix;
use crate::core::{Caller, GatewayError};

/// The `kid` of the gateway's own tokens: how they are told from an identity provider's.
pub const KEY_TOKEN_KID: &str = "step3-gateway-key-token";
const ISSUER: &str = "step3-gateway";
/// How long a token lives unless asked otherwise, and at most.
const DEFAULT_TTL_SECS: u64 = 900;
const MAX_TTL_SECS: u64 = 86_400;
/// Hex characters of the key's secret hash a token carries.
const SECRET_MARK_LEN: usize = 16;

/// What a key holder asks for.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Lifetime in seconds (default 900, at most 86,400, never past the key's expiry).
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub rpm_limit: Option<u32>,
}

/// A token made.
#[derive(Clone, Debug, Serialize)]
pub struct IssuedToken {
    pub token: String,
    pub key_id: String,
    pub expires_at: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    exp: i64,
    iat: i64,
    /// The start of the key's secret hash when the token was made.
    ksh: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    models: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rpm: Option<u32>,
}

pub struct KeyTokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl KeyTokens {
    /// Tokens signed with `secret` (32 bytes or more).
    pub fn new(secret: &[u8]) -> Result<Self, String> {
        Ok(KeyTokens {
            encoding: EncodingKey::from_secret(secret).map_err(|e| e.to_string())?,
            decoding: DecodingKey::from_secret(secret).map_err(|e| e.to_string())?,
        })
    }

    /// A token for `caller`'s key (authenticated by its secret, not by another token).
    pub fn issue(
        &self,
        caller: &Caller,
        request: TokenRequest,
    ) -> Result<IssuedToken, GatewayError> {
        let now = now_unix();
        let ttl = request.ttl_seconds.unwrap_or(DEFAULT_TTL_SECS);
        if ttl == 0 || ttl > MAX_TTL_SECS {
            return Err(GatewayError::invalid_request(
                format!("`ttl_seconds` must be 1 to {MAX_TTL_SECS}"),
                Some("ttl_seconds"),
            ));
        }
        let mut expires_at = now.saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX));
        if let Some(key_expiry) = caller.record.expires_at {
            expires_at = expires_at.min(key_expiry);
        }
        let narrowing = Narrowing {
            models: request.models,
            rpm_limit: request.rpm_limit,
        };
        narrowing.check(&caller.record)?;
        let claims = Claims {
            iss: ISSUER.into(),
            sub: caller.record.id.clone(),
            exp: expires_at,
            iat: now,
            ksh: caller
                .record
                .hash
                .get(..SECRET_MARK_LEN)
                .unwrap_or_default()
                .to_owned(),
            models: narrowing.models,
            rpm: narrowing.rpm_limit,
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(KEY_TOKEN_KID.into());
        let token = encode(&header, &claims, &self.encoding)
            .map_err(|e| GatewayError::Store(format!("cannot sign a token: {e}")))?;
        Ok(IssuedToken {
            token,
            key_id: caller.record.id.clone(),
            expires_at,
        })
    }

    /// The key, secret mark and narrowing a token of ours names, once it verifies.
    pub fn verify(&self, token: &str) -> Result<(String, String, Narrowing), GatewayError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        let claims = decode::<Claims>(token, &self.decoding, &validation)
            .map_err(|e| {
                GatewayError::InvalidToken(match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                        "the token has expired".into()
                    }
                    jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                        "the token's signature does not verify".into()
                    }
                    _ => "it is not a token this gateway made".into(),
                })
            })?
            .claims;
        Ok((
            claims.sub,
            claims.ksh,
            Narrowing {
                models: claims.models,
                rpm_limit: claims.rpm,
            },
        ))
    }
}

/// Whether a JWT says it is one of ours (its header's `kid`); checked by [`KeyTokens::verify`].
pub fn is_key_token(token: &str) -> bool {
    jsonwebtoken::decode_header(token).is_ok_and(|h| h.kid.as_deref() == Some(KEY_TOKEN_KID))
}
