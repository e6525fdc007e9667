//! Where a request comes from: the socket's peer, or, when the peer is a proxy the operator
//! trusts, the address that proxy reports (`X-Forwarded-For`, else `X-Real-IP`; gRPC
//! metadata are the same headers). Anyone else's forwarding headers are ignored, so a
//! client cannot pick the address its key's allowlist is checked against.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;

use crate::core::access::IpAllowlist;

/// The connection's peer (a request extension the server adds to every request).
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// What a verified client certificate (mutual TLS) names its holder: its first URI SAN,
/// else its first DNS SAN (a request extension, on every request of its connection).
#[derive(Clone, Debug)]
pub struct ClientCertificate(pub Option<String>);

/// The subject a request's client certificate names, if it came with one.
pub fn certificate_subject(extensions: &axum::http::Extensions) -> Option<&str> {
    extensions
        .get::<ClientCertificate>()
        .and_then(|c| c.0.as_deref())
}

/// The caller's address as the gateway believes it (a request extension).
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub IpAddr);

/// The caller's address, as a door hands it to the gate.
pub fn client_addr(extensions: &axum::http::Extensions) -> Option<IpAddr> {
    extensions.get::<ClientAddr>().map(|c| c.0)
}

/// The caller's address as a handler's argument (`None` off a real connection), and the
/// subject its client certificate names (mutual TLS).
pub struct Client(pub Option<IpAddr>, pub Option<String>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Client(
            client_addr(&parts.extensions),
            certificate_subject(&parts.extensions).map(str::to_owned),
        ))
    }
}

/// The client's address for a request from `peer`. `X-Forwarded-For` is read from the
/// right: each hop is believed only while the address that added it is a trusted proxy,
/// so the first untrusted address is the client (an entry a client wrote itself, further
/// left, is never reached).
pub fn find(peer: IpAddr, headers: &HeaderMap, trusted: Option<&IpAllowlist>) -> IpAddr {
    let peer = peer.to_canonical();
    let Some(trusted) = trusted else {
        return peer;
    };
    if !trusted.allows(peer) {
        return peer;
    }
    let mut hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|hop| !hop.is_empty())
        .collect::<Vec<_>>();
    if hops.is_empty()
        && let Some(real) = headers.get("x-real-ip").and_then(|v| v.to_str().ok())
    {
        hops.push(real.trim());
    }
    let mut client = peer;
    for hop in hops.iter().rev() {
        // A hop the proxy could not have written (garbage) ends the chain at the proxy.
        let Some(addr) = parse_hop(hop) else {
            break;
        };
        client = addr.to_canonical();
        if !trusted.allows(client) {
            break;
        }
    }
    client
}

/// An address as proxies write it: `203.0.113.7`, `203.0.113.7:4711`, `2001:db8::1`,
/// `[2001:db8::1]:4711`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn proxies() -> IpAllowlist {
        IpAllowlist::parse(&["10.0.0.0/8"]).unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let h = headers(&[("x-forwarded-for", "10.9.9.9"), ("x-real-ip", "10.9.9.9")]);
        assert_eq!(find(ip("203.0.113.5"), &h, None), ip("203.0.113.5"));
        assert_eq!(
            find(ip("203.0.113.5"), &h, Some(&proxies())),
            ip("203.0.113.5")
        );
    }

    #[test]
    fn a_trusted_proxy_names_the_client_and_forged_hops_are_not_reached() {
        let p = proxies();
        let h = headers(&[("x-forwarded-for", "198.51.100.1, 203.0.113.9")]);
        assert_eq!(find(ip("10.0.0.2"), &h, Some(&p)), ip("203.0.113.9"));
        // Two trusted proxies in a row.
        let h = headers(&[("x-forwarded-for", "203.0.113.9, 10.0.0.3")]);
        assert_eq!(find(ip("10.0.0.2"), &h, Some(&p)), ip("203.0.113.9"));
        // Several header lines are one list.
        let h = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-for", "10.0.0.3"),
        ]);
        assert_eq!(find(ip("10.0.0.2"), &h, Some(&p)), ip("203.0.113.9"));
        // X-Real-IP when there is no X-Forwarded-For; ports and brackets are dropped.
        let h = headers(&[("x-real-ip", "[2001:db8::7]:443")]);
        assert_eq!(find(ip("10.0.0.2"), &h, Some(&p)), ip("2001:db8::7"));
        let h = headers(&[("x-forwarded-for", "203.0.113.9:5000")]);
        assert_eq!(find(ip("10.0.0.2"), &h, Some(&p)), ip("203.0.113.9"));
    }

    #[test]
    fn garbage_ends_the_chain_at_the_last_trusted_address() {
        let p = proxies();
        let h = headers(&[("x-forwarded-for", "203.0.113.9, nonsense")]);
        assert_eq!(find(ip("10.0.0.2"), &h, Some(&p)), ip("10.0.0.2"));
        let none = HeaderMap::new();
        assert_eq!(find(ip("10.0.0.2"), &none, Some(&p)), ip("10.0.0.2"));
        // A dual-stack socket's form of an IPv4 proxy is the proxy.
        let h = headers(&[("x-forwarded-for", "203.0.113.9")]);
        assert_eq!(find(ip("::ffff:10.0.0.2"), &h, Some(&p)), ip("203.0.113.9"));
    }
}
