//! Periods and budgets: where a key's (or user's) current period began in its counters,
//! and the reservation of a call's worst cost against the budgets it falls under.
//!
//! The counters in memory only grow; a period is a mark in them (`PeriodMark::base`), so a
//! call in flight when a period ends needs no correction: it is charged to the period in
//! which it settles. A mark is found from the hourly books the first time it is needed
//! (a period starting inside an hour counts that hour whole: never less than was spent)
//! and moved, without reading the store, when the period ends.

use std::sync::atomic::Ordering;

use super::error::GatewayError;
use super::gateway::Gateway;
use super::key_index::{Caller, PeriodMark, UserMark};
use super::money::Money;
use super::period::Period;
use super::records::KeyCounters;
use super::time::UnixTime;

impl Gateway {
    /// The bounds of `period` around `now`, or all of time.
    fn bounds(&self, period: Option<Period>, now: UnixTime) -> (UnixTime, UnixTime) {
        match period {
            Some(period) => self.settings.calendar.bounds(period, now),
            None => (UnixTime::MIN, UnixTime::MAX),
        }
    }

    /// What the books hold of `key_ids` since `start` (from the start of its hour).
    pub(super) fn books_since(
        &self,
        key_ids: &[String],
        start: UnixTime,
    ) -> Result<KeyCounters, GatewayError> {
        let hour = start.saturating_sub(start.rem_euclid(3600));
        let mut total = KeyCounters::default();
        for key_id in key_ids {
            for bucket in self.store.usage(key_id, hour, UnixTime::MAX)? {
                total.add(&bucket.counters());
            }
        }
        Ok(total)
    }

    /// The key's current period at `now`.
    pub(super) fn key_mark(
        &self,
        caller: &Caller,
        now: UnixTime,
    ) -> Result<PeriodMark, GatewayError> {
        let period = caller.record.limits.period;
        let key = &caller.key;
        let mut mark = key.period.lock().unwrap_or_else(|p| p.into_inner());
        let next = match *mark {
            Some(m) if m.period == period && now < m.end => return Ok(m),
            // The period ended: all charged so far belongs to the ones before.
            Some(m) if m.period == period => {
                let (start, end) = self.bounds(period, now);
                PeriodMark {
                    period,
                    start,
                    end,
                    base: key.counters(),
                }
            }
            _ => {
                let (start, end) = self.bounds(period, now);
                let base = match period {
                    None => KeyCounters::default(),
                    Some(_) => key
                        .counters()
                        .since(&self.books_since(std::slice::from_ref(&caller.record.id), start)?),
                };
                PeriodMark {
                    period,
                    start,
                    end,
                    base,
                }
            }
        };
        *mark = Some(next);
        Ok(next)
    }

    /// The user's budget period at `now`.
    pub(super) fn user_mark(
        &self,
        caller: &Caller,
        now: UnixTime,
    ) -> Result<UserMark, GatewayError> {
        let period = caller.user_record.limits.period;
        let user = &caller.user;
        let mut mark = user.period.lock().unwrap_or_else(|p| p.into_inner());
        let used = i128::from(user.cost_used.load(Ordering::Acquire));
        let next = match *mark {
            Some(m) if m.period == period && now < m.end => return Ok(m),
            Some(m) if m.period == period => {
                let (start, end) = self.bounds(period, now);
                UserMark {
                    period,
                    start,
                    end,
                    base: used,
                }
            }
            _ => {
                let (start, end) = self.bounds(period, now);
                let keys = self.user_key_ids(&caller.user_record.id)?;
                let booked = self.books_since(&keys, start)?.cost;
                UserMark {
                    period,
                    start,
                    end,
                    base: used - i128::from(booked.0),
                }
            }
        };
        *mark = Some(next);
        Ok(next)
    }

    /// What a key may still spend: its budget in this period less what is charged and
    /// reserved; `None` without a budget.
    pub(super) fn key_budget_left(caller: &Caller, mark: &PeriodMark) -> Option<Money> {
        let budget = caller.record.limits.budget?;
        let committed = caller.key.cost_committed.load(Ordering::Acquire);
        Some(Money(
            budget
                .0
                .saturating_add(mark.base.cost.0)
                .saturating_sub(committed),
        ))
    }

    /// What a user may still spend; `None` without a budget.
    pub(super) fn user_budget_left(caller: &Caller, mark: &UserMark) -> Option<Money> {
        let budget = caller.user_record.limits.budget?;
        let committed = i128::from(caller.user.cost_committed.load(Ordering::Acquire));
        let left = i128::from(budget.0) - (committed - mark.base);
        Some(Money(u64::try_from(left.max(0)).unwrap_or(u64::MAX)))
    }

    /// Reserves `worst` against the key's budget (and counts it in flight either way).
    pub(super) fn reserve_key_cost(
        caller: &Caller,
        mark: &PeriodMark,
        worst: Money,
    ) -> Result<(), GatewayError> {
        let limit = caller
            .record
            .limits
            .budget
            .map(|b| b.0.saturating_add(mark.base.cost.0));
        caller
            .key
            .cost_committed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                let total = c.saturating_add(worst.0);
                limit.is_none_or(|l| total <= l).then_some(total)
            })
            .map(drop)
            .map_err(|_| budget_exceeded("key", caller.record.limits.budget, mark.period))
    }

    /// Reserves `worst` against the user's budget (and counts it in flight either way).
    pub(super) fn reserve_user_cost(
        caller: &Caller,
        mark: Option<&UserMark>,
        worst: Money,
    ) -> Result<(), GatewayError> {
        let budget = caller.user_record.limits.budget;
        caller
            .user
            .cost_committed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                let total = c.saturating_add(worst.0);
                let fits = match (budget, mark) {
                    (Some(budget), Some(mark)) => {
                        i128::from(total) - mark.base <= i128::from(budget.0)
                    }
                    _ => true,
                };
                fits.then_some(total)
            })
            .map(drop)
            .map_err(|_| budget_exceeded("user", budget, mark.and_then(|m| m.period)))
    }
}

/// A refusal naming whose budget is used up, how much it is and how often it starts again.
pub(super) fn budget_exceeded(
    whose: &'static str,
    budget: Option<Money>,
    period: Option<Period>,
) -> GatewayError {
    GatewayError::BudgetExceeded {
        whose,
        budget: budget.unwrap_or_default(),
        period,
    }
}

impl Gateway {
    /// The caller's view of its key, with its period (and its user's) brought up to now.
    pub fn usage_summary(
        &self,
        caller: &Caller,
    ) -> Result<super::key_index::UsageSummary, GatewayError> {
        let now = self.settings.clock.now_unix();
        self.key_mark(caller, now)?;
        if caller.user_record.limits.budget.is_some() {
            self.user_mark(caller, now)?;
        }
        let mut summary = caller.usage_summary();
        summary.currency = self.settings.currency.clone();
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use crate::core::admission::tests::facts;
    use crate::core::limits::KeyLimits;
    use crate::core::money::Money;
    use crate::core::period::Period;
    use crate::core::pricing::PriceRecord;
    use crate::core::records::{CallOutcome, Usage};
    use crate::core::store::Store;
    use crate::core::testing::{MemoryStore, gate, key, user};
    use crate::core::time::Clock;
    use crate::core::{GateSettings, GatewayError};

    /// Output at 1.00 a token (a million a million), prompt free.
    fn priced_store(limits: KeyLimits, user_budget: Option<Money>) -> MemoryStore {
        let mut record = key("key_a", "sk-step3-a");
        record.limits = limits;
        let mut second = key("key_b", "sk-step3-b");
        second.limits = KeyLimits::default();
        let mut owner = user("usr_1");
        owner.limits.budget = user_budget;
        let store = MemoryStore::with(vec![owner], vec![record, second]);
        store
            .put_price(&PriceRecord {
                model: "m".into(),
                completion_per_million: Money(1_000_000 * 1_000_000_000),
                ..PriceRecord::default()
            })
            .unwrap();
        store
    }

    fn settle(admission: crate::core::Admission, completion: u64) {
        let mut admission = admission;
        admission.mark_forwarded();
        admission.observe_usage(Usage {
            prompt_tokens: 10,
            completion_tokens: completion,
        });
        admission.settle(CallOutcome::Completed, 200);
    }

    #[tokio::test]
    async fn a_budget_lowers_the_cap_to_what_it_pays_for_then_refuses() {
        let store = priced_store(
            KeyLimits {
                budget: Some(Money::parse("5").unwrap()),
                ..KeyLimits::default()
            },
            None,
        );
        let (gateway, _queue, _) = gate(store, GateSettings::default());
        let caller = gateway.authenticate(Some("sk-step3-a"), None).unwrap();
        let admission = gateway.admit(&caller, facts(0, Some(100))).unwrap();
        assert_eq!(admission.upstream_cap(), Some(5));
        assert_eq!(caller.remaining().budget, Some(Money::ZERO));
        // Everything is reserved: a second call in flight cannot pay for one token.
        let e = gateway.admit(&caller, facts(0, Some(1))).unwrap_err();
        assert!(
            matches!(e, GatewayError::BudgetExceeded { whose: "key", .. }),
            "{e:?}"
        );
        settle(admission, 3);
        assert_eq!(caller.remaining().budget, Some(Money::parse("2").unwrap()));
        assert_eq!(caller.key.counters().cost, Money::parse("3").unwrap());
    }

    #[tokio::test]
    async fn a_users_budget_is_shared_by_its_keys() {
        let store = priced_store(KeyLimits::default(), Some(Money::parse("4").unwrap()));
        let (gateway, _queue, _) = gate(store, GateSettings::default());
        let a = gateway.authenticate(Some("sk-step3-a"), None).unwrap();
        let b = gateway.authenticate(Some("sk-step3-b"), None).unwrap();
        settle(gateway.admit(&a, facts(0, Some(3))).unwrap(), 3);
        let admission = gateway.admit(&b, facts(0, Some(3))).unwrap();
        assert_eq!(admission.upstream_cap(), Some(1));
        settle(admission, 1);
        let e = gateway.admit(&a, facts(0, Some(1))).unwrap_err();
        assert!(
            matches!(e, GatewayError::BudgetExceeded { whose: "user", .. }),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn a_call_in_flight_at_a_periods_end_is_charged_to_the_next() {
        let store = priced_store(
            KeyLimits {
                request_quota: Some(1),
                budget: Some(Money::parse("10").unwrap()),
                period: Some(Period::Day),
                ..KeyLimits::default()
            },
            None,
        );
        let clock = Clock::default();
        let settings = GateSettings {
            clock: clock.clone(),
            ..GateSettings::default()
        };
        let (gateway, _queue, _) = gate(store, settings);
        let caller = gateway.authenticate(Some("sk-step3-a"), None).unwrap();
        let in_flight = gateway.admit(&caller, facts(0, Some(4))).unwrap();
        assert!(gateway.admit(&caller, facts(0, Some(4))).is_err());
        clock.advance(86_400);
        // A new day: the quota and budget are whole again, less what is in flight.
        let next = gateway.admit(&caller, facts(0, Some(4))).unwrap_err();
        assert!(
            matches!(
                next,
                GatewayError::QuotaExceeded {
                    what: "requests",
                    ..
                }
            ),
            "the call in flight counts in the new day: {next:?}"
        );
        settle(in_flight, 2);
        let summary = gateway.usage_summary(&caller).unwrap();
        assert_eq!(summary.used.requests, 1);
        assert_eq!(summary.used.cost, Money::parse("2").unwrap());
        assert_eq!(summary.remaining.budget, Some(Money::parse("8").unwrap()));
        clock.advance(86_400);
        let summary = gateway.usage_summary(&caller).unwrap();
        assert_eq!(summary.used, crate::core::records::KeyCounters::default());
        assert!(gateway.admit(&caller, facts(0, Some(4))).is_ok());
    }

    #[tokio::test]
    async fn a_model_without_a_price_costs_nothing_and_spends_no_budget() {
        let store = priced_store(
            KeyLimits {
                budget: Some(Money::ZERO),
                ..KeyLimits::default()
            },
            None,
        );
        let (gateway, _queue, _) = gate(store, GateSettings::default());
        let caller = gateway.authenticate(Some("sk-step3-a"), None).unwrap();
        assert!(gateway.admit(&caller, facts(0, Some(4))).is_err());
        let mut free = facts(0, Some(4));
        free.model = "unpriced".into();
        settle(gateway.admit(&caller, free).unwrap(), 4);
        assert_eq!(caller.key.counters().cost, Money::ZERO);
    }
}
