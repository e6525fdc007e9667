//! Console sessions, kept in memory only: an opaque id in an HttpOnly cookie names one,
//! which says who signed in (the admin, or the holder of one key), until when, and its
//! CSRF token. Neither the admin token nor a key is kept, here or in the browser.
//! Failed sign-ins are counted per client address.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use rand::RngExt as _;
use subtle::ConstantTimeEq as _;

use crate::core::keys::to_hex;

/// The cookie naming a session.
pub const COOKIE: &str = "step3_console";

/// Who a session belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    Admin,
    /// The holder of this key (its id; never its secret).
    KeyHolder(String),
}

#[derive(Clone, Debug)]
pub struct Session {
    pub role: Role,
    /// Put in every changing form and checked on submit.
    pub csrf: String,
    /// A short public name of the session for the audit log (not the cookie's value).
    pub public_id: String,
    pub client: Option<IpAddr>,
    expires: Instant,
}

impl Session {
    /// Whether `token` is this session's CSRF token (compared in constant time).
    pub fn csrf_matches(&self, token: &str) -> bool {
        !token.is_empty() && bool::from(token.as_bytes().ct_eq(self.csrf.as_bytes()))
    }
}

/// Sessions and sign-in attempts.
pub struct Sessions {
    sessions: DashMap<String, Session>,
    failures: DashMap<IpAddr, (Instant, u32)>,
    ttl: Duration,
    failures_per_minute: u32,
}

/// How many sessions or counted addresses trigger a sweep of expired ones.
const SWEEP_AT: usize = 10_000;

/// 256 random bits, as hex.
fn random_id() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    to_hex(&bytes)
}

impl Sessions {
    pub fn new(ttl: Duration, failures_per_minute: u32) -> Self {
        Sessions {
            sessions: DashMap::new(),
            failures: DashMap::new(),
            ttl,
            failures_per_minute,
        }
    }

    /// A new session for `role`; returns its cookie value.
    pub fn start(&self, role: Role, client: Option<IpAddr>) -> String {
        let now = Instant::now();
        if self.sessions.len() >= SWEEP_AT {
            self.sessions.retain(|_, s| s.expires > now);
        }
        let id = random_id();
        self.sessions.insert(
            id.clone(),
            Session {
                role,
                csrf: random_id(),
                public_id: random_id()[..8].to_owned(),
                client,
                expires: now + self.ttl,
            },
        );
        id
    }

    /// The live session named by `id`; an expired one is forgotten.
    pub fn get(&self, id: &str) -> Option<Session> {
        let now = Instant::now();
        let session = self.sessions.get(id).map(|s| s.clone())?;
        if session.expires <= now {
            self.sessions.remove(id);
            return None;
        }
        Some(session)
    }

    pub fn end(&self, id: &str) {
        self.sessions.remove(id);
    }

    /// Whether `client` may try to sign in now (fewer failures than allowed this minute).
    pub fn may_try(&self, client: Option<IpAddr>) -> bool {
        let Some(client) = client else { return true };
        match self.failures.get(&client) {
            Some(entry) => {
                let (since, count) = *entry;
                since.elapsed() >= Duration::from_secs(60) || count < self.failures_per_minute
            }
            None => true,
        }
    }

    /// Counts a failed sign-in of `client`.
    pub fn failed(&self, client: Option<IpAddr>) {
        let Some(client) = client else { return };
        let now = Instant::now();
        if self.failures.len() >= SWEEP_AT {
            self.failures
                .retain(|_, (since, _)| since.elapsed() < Duration::from_secs(60));
        }
        let mut entry = self.failures.entry(client).or_insert((now, 0));
        if entry.0.elapsed() >= Duration::from_secs(60) {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }
}

/// The session cookie's value in a `Cookie` header.
pub fn cookie_value(header: &str) -> Option<&str> {
    header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// The `Set-Cookie` value that starts a session (`Secure` when the port has TLS).
pub fn set_cookie(id: &str, ttl: Duration, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{}",
        ttl.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that ends one.
pub fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_found_by_its_id_until_it_ends() {
        let sessions = Sessions::new(Duration::from_secs(60), 3);
        let id = sessions.start(Role::Admin, None);
        let session = sessions.get(&id).unwrap();
        assert_eq!(session.role, Role::Admin);
        assert!(session.csrf_matches(&session.csrf.clone()));
        assert!(!session.csrf_matches(""));
        assert!(!session.csrf_matches("nope"));
        assert!(sessions.get("other").is_none());
        sessions.end(&id);
        assert!(sessions.get(&id).is_none());
    }

    #[test]
    fn an_expired_session_is_gone() {
        let sessions = Sessions::new(Duration::ZERO, 3);
        let id = sessions.start(Role::KeyHolder("key_1".into()), None);
        assert!(sessions.get(&id).is_none());
    }

    #[test]
    fn sign_in_failures_are_throttled_per_address() {
        let sessions = Sessions::new(Duration::from_secs(60), 2);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        sessions.failed(Some(a));
        assert!(sessions.may_try(Some(a)));
        sessions.failed(Some(a));
        assert!(!sessions.may_try(Some(a)));
        assert!(sessions.may_try(Some(b)));
    }

    #[test]
    fn the_cookie_is_read_among_others_and_set_strictly() {
        assert_eq!(cookie_value("a=1; step3_console=abc; b=2"), Some("abc"));
        assert_eq!(cookie_value("a=1"), None);
        let set = set_cookie("abc", Duration::from_secs(10), true);
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Strict") && set.contains("Secure")
        );
        assert!(!set_cookie("abc", Duration::from_secs(10), false).contains("Secure"));
    }
}
