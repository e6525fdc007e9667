//! Bearer tokens from the team's identity provider: the signature (HS256 with a shared
//! secret, or RS256/ES256/EdDSA with the provider's published keys), `exp` and `nbf` with a
//! small leeway, `iss` and `aud`, then the claim that names the gateway user. What that
//! user may do is core's (`core::identity`).
//!
//! The provider's keys (JWKS) are fetched at start and again when a token names a key id
//! not seen yet, at most once per `jwks_min_refresh_secs`, so a flood of made-up key ids
//! cannot turn into a flood of requests to the provider.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use base64::Engine as _;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde_json::{Map, Value};

use crate::core::GatewayError;
use crate::core::identity::SubjectPolicy;
use crate::upstream::fetch;

/// How the provider's tokens are checked (from the `[jwt]` configuration).
#[derive(Clone, Debug)]
pub struct JwtSettings {
    pub jwks_url: Option<String>,
    pub hs256_secret: Option<String>,
    pub issuer: String,
    pub audience: Vec<String>,
    pub user_claim: String,
    pub leeway: Duration,
    pub jwks_min_refresh: Duration,
    pub subjects: SubjectPolicy,
}

/// The algorithms taken from the provider's published keys (never HMAC: a public key used
/// as an HMAC secret is the classic confusion).
const PUBLIC_KEY_ALGORITHMS: [Algorithm; 7] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

const JWKS_TIMEOUT: Duration = Duration::from_secs(5);
const JWKS_MAX_BYTES: usize = 1024 * 1024;

pub struct JwtVerifier {
    settings: JwtSettings,
    hs256: Option<DecodingKey>,
    /// The provider's keys by `kid`.
    keys: RwLock<HashMap<String, DecodingKey>>,
    /// When the keys were last fetched (or tried), to bound refetches.
    fetched: tokio::sync::Mutex<Option<Instant>>,
}

impl JwtVerifier {
    pub fn new(settings: JwtSettings) -> Result<Self, String> {
        let hs256 = match &settings.hs256_secret {
            Some(secret) => Some(
                DecodingKey::from_secret(secret.as_bytes())
                    .map_err(|e| format!("jwt.hs256_secret: {e}"))?,
            ),
            None => None,
        };
        Ok(JwtVerifier {
            settings,
            hs256,
            keys: RwLock::new(HashMap::new()),
            fetched: tokio::sync::Mutex::new(None),
        })
    }

    pub fn subjects(&self) -> &SubjectPolicy {
        &self.settings.subjects
    }

    /// Whether a bearer value is a JWT (three dot-separated parts, a JSON header) rather
    /// than a gateway key.
    pub fn looks_like_jwt(bearer: &str) -> bool {
        bearer.starts_with("eyJ") && bearer.bytes().filter(|b| *b == b'.').count() == 2
    }

    /// Fetches the provider's keys; a failure is logged, and retried when a token needs them.
    pub async fn prefetch(&self) {
        if self.settings.jwks_url.is_some()
            && let Err(e) = self.refresh(true).await
        {
            tracing::warn!("cannot fetch the identity provider's keys yet: {e}");
        }
    }

    /// The subject a token names, once every check has passed.
    pub async fn verify(&self, token: &str) -> Result<String, GatewayError> {
        let header = decode_header(token).map_err(|_| invalid(header_problem(token)))?;
        let key = match header.alg {
            Algorithm::HS256 => self
                .hs256
                .clone()
                .ok_or_else(|| invalid("HS256 tokens are not accepted here".into()))?,
            alg if PUBLIC_KEY_ALGORITHMS.contains(&alg) => {
                if self.settings.jwks_url.is_none() {
                    return Err(invalid(format!(
                        "{alg:?} tokens are not accepted here (no JWKS is configured)"
                    )));
                }
                let kid = header
                    .kid
                    .as_deref()
                    .ok_or_else(|| invalid("the token names no key (`kid`)".into()))?;
                self.public_key(kid).await?
            }
            alg => return Err(invalid(format!("{alg:?} tokens are not accepted"))),
        };
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.settings.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&self.settings.audience);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let claims = decode::<Map<String, Value>>(token, &key, &validation)
            .map_err(|e| invalid(explain(e.kind())))?
            .claims;
        let claim = &self.settings.user_claim;
        match claims.get(claim) {
            Some(Value::String(subject)) if !subject.is_empty() => Ok(subject.clone()),
            Some(Value::Number(n)) => Ok(n.to_string()),
            _ => Err(invalid(format!(
                "the token has no `{claim}` claim naming its user"
            ))),
        }
    }

    async fn public_key(&self, kid: &str) -> Result<DecodingKey, GatewayError> {
        if let Some(key) = self.cached(kid) {
            return Ok(key);
        }
        self.refresh(false)
            .await
            .map_err(|e| invalid(format!("the identity provider's keys are unavailable: {e}")))?;
        self.cached(kid).ok_or_else(|| {
            invalid(format!(
                "the token's key `{}` is not the provider's",
                clip(kid)
            ))
        })
    }

    fn cached(&self, kid: &str) -> Option<DecodingKey> {
        self.keys
            .read()
            .ok()
            .and_then(|keys| keys.get(kid).cloned())
    }

    /// Fetches the JWKS again unless it was fetched within the minimum interval (`force`:
    /// regardless). Callers waiting on one fetch share it.
    async fn refresh(&self, force: bool) -> Result<(), String> {
        let Some(url) = &self.settings.jwks_url else {
            return Ok(());
        };
        let mut fetched = self.fetched.lock().await;
        if !force && fetched.is_some_and(|at| at.elapsed() < self.settings.jwks_min_refresh) {
            return Ok(());
        }
        *fetched = Some(Instant::now());
        let body = fetch::get(url, JWKS_TIMEOUT, JWKS_MAX_BYTES).await?;
        let set: JwkSet =
            serde_json::from_slice(&body).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            // Keys without an id, or of a kind this gateway cannot use, are passed over.
            if let (Some(kid), Ok(key)) = (&jwk.common.key_id, DecodingKey::from_jwk(jwk)) {
                keys.insert(kid.clone(), key);
            }
        }
        tracing::info!(keys = keys.len(), "fetched the identity provider's keys");
        if let Ok(mut current) = self.keys.write() {
            *current = keys;
        }
        Ok(())
    }
}

fn invalid(message: String) -> GatewayError {
    GatewayError::InvalidToken(message)
}

/// Why a token's header could not be read: an algorithm not supported (`none` among them)
/// or not a JWT at all.
fn header_problem(token: &str) -> String {
    let alg = token
        .split('.')
        .next()
        .and_then(|h| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .ok()
        })
        .and_then(|h| serde_json::from_slice::<Map<String, Value>>(&h).ok())
        .and_then(|h| h.get("alg").and_then(Value::as_str).map(clip));
    match alg {
        Some(alg) => format!("`{alg}` tokens are not accepted"),
        None => "it is not a well-formed JWT".into(),
    }
}

fn explain(kind: &jsonwebtoken::errors::ErrorKind) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::ExpiredSignature => "the token has expired".into(),
        K::ImmatureSignature => "the token is not valid yet (`nbf`)".into(),
        K::InvalidIssuer => "the token's issuer (`iss`) is not the configured one".into(),
        K::InvalidAudience => "the token is not meant for this gateway (`aud`)".into(),
        K::InvalidSignature => "the token's signature does not verify".into(),
        K::InvalidAlgorithm => "the token's algorithm does not match its key".into(),
        K::MissingRequiredClaim(claim) => format!("the token has no `{}` claim", clip(claim)),
        K::InvalidClaimFormat(claim) => format!("the token's `{}` claim is malformed", clip(claim)),
        _ => "it is not a well-formed JWT".into(),
    }
}

/// Caps text from a token echoed in a message.
fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}
