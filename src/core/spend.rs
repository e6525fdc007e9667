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

    /// The ids of a user's keys (a scan of every key: only for a user's first budgeted call
    /// in a process).
    fn user_key_ids(&self, user_id: &str) -> Result<Vec<String>, GatewayError> {
        let mut ids = Vec::new();
        self.store.scan_keys(None, &mut |key, _| {
            if key.user_id == user_id {
                ids.push(key.id);
            }
            true
        })?;
        Ok(ids)
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
