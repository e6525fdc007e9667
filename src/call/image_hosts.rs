//! The names image URLs point to, resolved before a call is admitted: a name that resolves
//! to a private address (`169.254.169.254.nip.io`, a DNS name an attacker points at the
//! GPU server's network) is refused like the address itself would be.
//!
//! The model server resolves the name again when it fetches, so this narrows the window
//! without closing it (a name may change its answer in between); the operator who needs a
//! guarantee blocks private egress on the GPU server's network, lists `allowed_hosts`, or
//! turns on fetch mode, where the gateway connects to the addresses checked here itself
//! (`image_fetch`).

use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use crate::core::GatewayError;
use crate::core::images::{ImagePolicyError, is_private_address};

/// How long one name may take to resolve; past it the call is refused.
pub(super) const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Resolves with the system's resolver (getaddrinfo, on the blocking pool).
pub async fn check(hosts: &[String]) -> Result<(), GatewayError> {
    check_with(hosts, RESOLVE_TIMEOUT, system_resolve).await
}

/// Every name resolves, in time, to public addresses only; `resolve` is the resolver.
async fn check_with<F, Fut>(
    hosts: &[String],
    timeout: Duration,
    resolve: F,
) -> Result<(), GatewayError>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<Vec<IpAddr>, String>>,
{
    let lookups = hosts
        .iter()
        .map(|host| resolve_checked(host, timeout, &resolve, false));
    futures_util::future::try_join_all(lookups)
        .await
        .map(drop)
        .map_err(refused)
}

/// The addresses `host` resolves to, in time, all public unless `allow_private`: the
/// addresses a connection to it may be made to.
pub(super) async fn resolve_checked<F, Fut>(
    host: &str,
    timeout: Duration,
    resolve: &F,
    allow_private: bool,
) -> Result<Vec<IpAddr>, ImagePolicyError>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<Vec<IpAddr>, String>>,
{
    let unresolvable = |reason: String| ImagePolicyError::Unresolvable {
        host: host.to_owned(),
        reason,
    };
    let addrs = match tokio::time::timeout(timeout, resolve(host.to_owned())).await {
        Ok(Ok(addrs)) if !addrs.is_empty() => addrs,
        Ok(Ok(_)) => return Err(unresolvable("no address".into())),
        Ok(Err(reason)) => return Err(unresolvable(reason)),
        Err(_) => {
            return Err(unresolvable(format!(
                "no answer within {} ms",
                timeout.as_millis()
            )));
        }
    };
    match addrs.iter().find(|a| is_private_address(**a)) {
        Some(addr) if !allow_private => Err(ImagePolicyError::ResolvesToPrivate {
            host: host.to_owned(),
            addr: *addr,
        }),
        _ => Ok(addrs),
    }
}

/// The system's resolver (getaddrinfo, on the blocking pool).
pub(super) async fn system_resolve(host: String) -> Result<Vec<IpAddr>, String> {
    tokio::net::lookup_host((host.as_str(), 443))
        .await
        .map(|addrs| addrs.map(|a| a.ip()).collect())
        .map_err(|e| e.to_string())
}

fn refused(e: ImagePolicyError) -> GatewayError {
    GatewayError::invalid_request(e.to_string(), Some("messages"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    /// A resolver the test controls: `rebind.example` points inside, `cdn.example` outside.
    async fn table(host: String) -> Result<Vec<IpAddr>, String> {
        match host.as_str() {
            "cdn.example" => Ok(vec!["93.184.216.34".parse().unwrap()]),
            "rebind.example" => Ok(vec![
                "93.184.216.34".parse().unwrap(),
                "169.254.169.254".parse().unwrap(),
            ]),
            "v6.example" => Ok(vec!["fd00::1".parse().unwrap()]),
            "empty.example" => Ok(Vec::new()),
            "slow.example" => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(Vec::new())
            }
            _ => Err("name not known".into()),
        }
    }

    fn message(e: GatewayError) -> String {
        match e {
            GatewayError::InvalidRequest { message, param } => {
                assert_eq!(param.as_deref(), Some("messages"));
                message
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn public_names_pass_and_one_private_answer_refuses() {
        check_with(&["cdn.example".into()], T, table).await.unwrap();
        check_with(&[], T, table).await.unwrap();
        let m = message(
            check_with(&["cdn.example".into(), "rebind.example".into()], T, table)
                .await
                .unwrap_err(),
        );
        assert!(
            m.contains("rebind.example") && m.contains("169.254.169.254"),
            "{m}"
        );
        let m = message(
            check_with(&["v6.example".into()], T, table)
                .await
                .unwrap_err(),
        );
        assert!(m.contains("fd00::1"), "{m}");
    }

    #[tokio::test]
    async fn names_that_do_not_resolve_in_time_are_refused() {
        for host in ["nowhere.example", "empty.example", "slow.example"] {
            let m = message(
                check_with(&[host.into()], Duration::from_millis(50), table)
                    .await
                    .unwrap_err(),
            );
            assert!(m.contains(host) && m.contains("cannot be resolved"), "{m}");
        }
    }
}
