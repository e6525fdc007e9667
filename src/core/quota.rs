//! Quota reservation arithmetic: how many tokens a call reserves, and the output cap that
//! keeps it within what the key has left.

/// The tokens a call reserves and the `max_tokens` to send upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenPlan {
    /// Prompt estimate plus the output cap.
    pub reserve: u64,
    /// The output cap the upstream must be held to; `None` leaves the request as it is.
    pub upstream_cap: Option<u64>,
}

/// What a key has not yet spent or reserved, under its quota.
pub fn remaining(quota: Option<u64>, committed: u64) -> Option<u64> {
    quota.map(|q| q.saturating_sub(committed))
}

/// Plans a call's tokens: the prompt estimate plus the client's output cap (or
/// `default_cap`). With a quota, the cap is lowered to what remains after the prompt, and
/// always sent upstream, so the call cannot spend more than the key has; `None` means even
/// the prompt (plus one token of answer) does not fit.
pub fn plan_tokens(
    remaining: Option<u64>,
    prompt_estimate: u64,
    client_cap: Option<u64>,
    default_cap: u64,
) -> Option<TokenPlan> {
    let wanted = client_cap.unwrap_or(default_cap).max(1);
    let Some(remaining) = remaining else {
        return Some(TokenPlan {
            reserve: prompt_estimate.saturating_add(wanted),
            upstream_cap: None,
        });
    };
    let room = remaining
        .checked_sub(prompt_estimate)
        .filter(|&room| room >= 1)?;
    let cap = wanted.min(room);
    Some(TokenPlan {
        reserve: prompt_estimate + cap,
        upstream_cap: (client_cap != Some(cap)).then_some(cap),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_unlimited_key_reserves_for_the_tpm_without_touching_the_request() {
        let plan = plan_tokens(None, 100, None, 4096).unwrap();
        assert_eq!(
            plan,
            TokenPlan {
                reserve: 4196,
                upstream_cap: None
            }
        );
    }

    #[test]
    fn a_cap_the_quota_covers_is_kept_and_one_it_does_not_is_lowered() {
        assert_eq!(
            plan_tokens(Some(1000), 100, Some(200), 4096),
            Some(TokenPlan {
                reserve: 300,
                upstream_cap: None
            })
        );
        assert_eq!(
            plan_tokens(Some(250), 100, Some(200), 4096),
            Some(TokenPlan {
                reserve: 250,
                upstream_cap: Some(150)
            })
        );
        // No client cap: the default is sent, so the upstream cannot run past it.
        assert_eq!(
            plan_tokens(Some(10_000), 100, None, 4096),
            Some(TokenPlan {
                reserve: 4196,
                upstream_cap: Some(4096)
            })
        );
        assert_eq!(plan_tokens(Some(100), 100, None, 4096), None);
        assert_eq!(plan_tokens(Some(50), 100, Some(10), 4096), None);
    }

    proptest! {
        #[test]
        fn a_plan_never_reserves_more_than_remains_and_never_raises_the_cap(
            remaining in proptest::option::of(0u64..1_000_000),
            prompt in 0u64..100_000,
            client_cap in proptest::option::of(0u64..100_000),
            default_cap in 1u64..10_000,
        ) {
            match plan_tokens(remaining, prompt, client_cap, default_cap) {
                Some(plan) => {
                    if let Some(remaining) = remaining {
                        prop_assert!(plan.reserve <= remaining);
                        prop_assert!(plan.upstream_cap.is_some() || client_cap.is_some());
                    }
                    let cap = plan.upstream_cap.or(client_cap).unwrap_or(default_cap);
                    prop_assert!(cap >= 1);
                    prop_assert_eq!(plan.reserve, prompt + cap.max(1));
                    if let (Some(sent), Some(asked)) = (plan.upstream_cap, client_cap) {
                        prop_assert!(sent <= asked.max(1));
                    }
                }
                None => prop_assert!(remaining.is_some_and(|r| r < prompt + 1)),
            }
        }
    }
}
