//! Who may call from where: the IP allowlists of keys, users and the admin API.
//!
//! The client's address itself is found at the edge (the socket's peer, or what a trusted
//! proxy says); the gate only checks it against the lists here.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Networks a caller may come from (IPv4 and IPv6 CIDRs; a bare address is one host).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IpAllowlist(Vec<IpNet>);

impl IpAllowlist {
    /// Reads CIDRs (`10.0.0.0/8`, `2001:db8::/32`) or bare addresses (`192.0.2.7`).
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        entries
            .iter()
            .map(|entry| parse_net(entry.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map(|nets| IpAllowlist(nets.into_iter().map(|n| n.trunc()).collect()))
    }

    /// Whether `addr` is in one of the networks. An IPv4 address seen as IPv6
    /// (`::ffff:10.1.2.3`, what a dual-stack socket reports) matches IPv4 entries.
    pub fn allows(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        self.0.iter().any(|net| net.contains(&addr))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entries as the admin API shows them (`10.0.0.0/8`).
    pub fn entries(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }
}

impl fmt::Display for IpAllowlist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.entries().join(", "))
    }
}

fn parse_net(entry: &str) -> Result<IpNet, String> {
    let entry = entry.trim();
    if let Ok(net) = entry.parse::<IpNet>() {
        return Ok(net);
    }
    entry
        .parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("`{entry}` is not an IP address or a CIDR (like 10.0.0.0/8)"))
}

impl Serialize for IpAllowlist {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.entries().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for IpAllowlist {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let entries = Vec::<String>::deserialize(deserializer)?;
        IpAllowlist::parse(&entries).map_err(serde::de::Error::custom)
    }
}

/// Checks `client` against `list`, when there is one. An unknown address (a caller the
/// edge could not place) passes no list.
pub(crate) fn allowed(list: Option<&IpAllowlist>, client: Option<IpAddr>) -> bool {
    match list {
        None => true,
        Some(list) => client.is_some_and(|addr| list.allows(addr)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> IpAllowlist {
        IpAllowlist::parse(entries).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_and_hosts_of_both_families() {
        let l = list(&["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]);
        assert!(l.allows(ip("10.200.3.4")));
        assert!(l.allows(ip("192.0.2.7")));
        assert!(!l.allows(ip("192.0.2.8")));
        assert!(l.allows(ip("2001:db8:1::9")));
        assert!(!l.allows(ip("2001:db9::1")));
        // A dual-stack socket's form of an IPv4 peer.
        assert!(l.allows(ip("::ffff:10.1.2.3")));
        assert!(!l.allows(ip("::ffff:11.1.2.3")));
    }

    #[test]
    fn entries_are_normalised_and_mistakes_named() {
        assert_eq!(
            list(&[" 10.1.2.3/8", "::1"]).entries(),
            ["10.0.0.0/8", "::1/128"]
        );
        let e = IpAllowlist::parse(&["10.0.0.0/33"]).unwrap_err();
        assert!(e.contains("10.0.0.0/33"), "{e}");
        let e = IpAllowlist::parse(&["office"]).unwrap_err();
        assert!(e.contains("`office`"), "{e}");
    }

    #[test]
    fn no_list_allows_everyone_and_a_list_refuses_an_unknown_address() {
        assert!(allowed(None, None));
        assert!(allowed(None, Some(ip("203.0.113.1"))));
        let l = list(&["203.0.113.0/24"]);
        assert!(allowed(Some(&l), Some(ip("203.0.113.1"))));
        assert!(!allowed(Some(&l), Some(ip("198.51.100.1"))));
        assert!(!allowed(Some(&l), None));
    }

    #[test]
    fn serde_round_trip_is_a_list_of_strings() {
        let l: IpAllowlist = serde_json::from_str(r#"["10.0.0.0/8","::1"]"#).unwrap();
        assert_eq!(
            serde_json::to_string(&l).unwrap(),
            r#"["10.0.0.0/8","::1/128"]"#
        );
        let e = serde_json::from_str::<IpAllowlist>(r#"["nope"]"#).unwrap_err();
        assert!(e.to_string().contains("`nope`"));
    }
}
