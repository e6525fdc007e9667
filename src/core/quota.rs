//! Quota reservation arithmetic: how many tokens a call reserves, and the output cap that
//! keeps it within what the key has left.

/// The tokens a call reserves and the `max_tokens` to send upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenPlan {
    /// Prompt estimate plus the output cap of every choice.
    pub reserve: u64,
    /// The per-choice output cap the upstream must be held to; `None` leaves the request as
    /// it is.
    pub upstream_cap: Option<u64>,
}

/// What a call asks for, as far as its tokens go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenAsk {
    pub prompt_estimate: u64,
    /// The client's per-choice output cap.
    pub client_cap: Option<u64>,
    /// Choices to generate (`n`); each may run to the cap.
    pub choices: u64,
    /// The cap assumed when the client gives none.
    pub default_cap: u64,
    /// A ceiling on the default cap that must then be sent upstream (a tokens-per-minute
    /// limit smaller than the default would otherwise refuse every call without a cap).
    pub default_ceiling: Option<u64>,
}

/// What a key has not yet spent or reserved, under its quota.
pub fn remaining(quota: Option<u64>, committed: u64) -> Option<u64> {
    quota.map(|q| q.saturating_sub(committed))
}

/// Plans a call's tokens: the prompt estimate plus, for each choice, the client's output cap
/// (or the default). With a quota, the cap is lowered to what remains after the prompt and
/// always sent upstream, so the call cannot spend more than the key has; `None` means even
/// the prompt (plus one token of answer per choice) does not fit.
pub fn plan_tokens(remaining: Option<u64>, ask: TokenAsk) -> Option<TokenPlan> {
    let choices = ask.choices.max(1);
    let mut forced = false;
    let wanted = match ask.client_cap {
        Some(cap) => cap.max(1),
        None => match ask.default_ceiling {
            Some(ceiling) if ceiling < ask.default_cap => {
                forced = true;
                ceiling.max(1)
            }
            _ => ask.default_cap.max(1),
        },
    };
    let cap = match remaining {
        None => wanted,
        Some(remaining) => {
            let room = remaining.checked_sub(ask.prompt_estimate)? / choices;
            if room == 0 {
                return None;
            }
            forced = true;
            wanted.min(room)
        }
    };
    Some(TokenPlan {
        reserve: ask
            .prompt_estimate
            .saturating_add(cap.saturating_mul(choices)),
        upstream_cap: (forced && ask.client_cap != Some(cap)).then_some(cap),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ask(prompt: u64, client_cap: Option<u64>) -> TokenAsk {
        TokenAsk {
            prompt_estimate: prompt,
            client_cap,
            choices: 1,
            default_cap: 4096,
            default_ceiling: None,
        }
    }

    #[test]
    fn an_unlimited_key_reserves_for_the_tpm_without_touching_the_request() {
        let plan = plan_tokens(None, ask(100, None)).unwrap();
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
            plan_tokens(Some(1000), ask(100, Some(200))),
            Some(TokenPlan {
                reserve: 300,
                upstream_cap: None
            })
        );
        assert_eq!(
            plan_tokens(Some(250), ask(100, Some(200))),
            Some(TokenPlan {
                reserve: 250,
                upstream_cap: Some(150)
            })
        );
        // No client cap: the default is sent, so the upstream cannot run past it.
        assert_eq!(
            plan_tokens(Some(10_000), ask(100, None)),
            Some(TokenPlan {
                reserve: 4196,
                upstream_cap: Some(4096)
            })
        );
        assert_eq!(plan_tokens(Some(100), ask(100, None)), None);
        assert_eq!(plan_tokens(Some(50), ask(100, Some(10))), None);
    }

    #[test]
    fn every_choice_gets_the_cap_and_shares_what_remains() {
        let many = TokenAsk {
            choices: 4,
            ..ask(100, Some(200))
        };
        assert_eq!(
            plan_tokens(None, many),
            Some(TokenPlan {
                reserve: 900,
                upstream_cap: None
            })
        );
        assert_eq!(
            plan_tokens(Some(500), many),
            Some(TokenPlan {
                reserve: 500,
                upstream_cap: Some(100)
            })
        );
        assert_eq!(plan_tokens(Some(102), many), None);
    }

    #[test]
    fn a_small_tokens_per_minute_limit_lowers_and_sends_the_default() {
        let limited = TokenAsk {
            default_ceiling: Some(500),
            ..ask(100, None)
        };
        assert_eq!(
            plan_tokens(None, limited),
            Some(TokenPlan {
                reserve: 600,
                upstream_cap: Some(500)
            })
        );
        // A client's own cap is the client's choice; the limit then judges it.
        let asked = TokenAsk {
            default_ceiling: Some(500),
            ..ask(100, Some(900))
        };
        assert_eq!(
            plan_tokens(None, asked),
            Some(TokenPlan {
                reserve: 1000,
                upstream_cap: None
            })
        );
    }

    proptest! {
        #[test]
        fn a_plan_never_reserves_more_than_remains_and_never_raises_the_cap(
            remaining in proptest::option::of(0u64..1_000_000),
            prompt in 0u64..100_000,
            client_cap in proptest::option::of(0u64..100_000),
            choices in 1u64..8,
            default_cap in 1u64..10_000,
        ) {
            let ask = TokenAsk { prompt_estimate: prompt, client_cap, choices, default_cap, default_ceiling: None };
            match plan_tokens(remaining, ask) {
                Some(plan) => {
                    if let Some(remaining) = remaining {
                        prop_assert!(plan.reserve <= remaining);
                        prop_assert!(plan.upstream_cap.is_some() || client_cap.is_some());
                    }
                    let cap = plan.upstream_cap.or(client_cap).unwrap_or(default_cap).max(1);
                    prop_assert_eq!(plan.reserve, prompt + cap * choices);
                    if let (Some(sent), Some(asked)) = (plan.upstream_cap, client_cap) {
                        prop_assert!(sent <= asked.max(1));
                    }
                }
                None => prop_assert!(remaining.is_some_and(|r| r < prompt + choices)),
            }
        }
    }
}
