//! Admin operations on money: prices (added, never rewritten), and a user's usage of a
//! period as invoice lines.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::admin::TimeInput;
use super::error::GatewayError;
use super::gateway::Gateway;
use super::money::Money;
use super::pricing::PriceRecord;
use super::shared_limits::Change;
use super::time::UnixTime;

/// A price as an admin request gives it; `effective_from` defaults to now.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPrice {
    pub model: String,
    #[serde(default)]
    pub effective_from: Option<TimeInput>,
    #[serde(default)]
    pub prompt_per_million: Money,
    #[serde(default)]
    pub completion_per_million: Money,
    #[serde(default)]
    pub per_second: Money,
    #[serde(default)]
    pub per_call_minimum: Money,
    #[serde(default)]
    pub images: BTreeMap<String, Money>,
}

/// One line of an invoice: a key's use of one model version in the period.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct InvoiceLine {
    pub key_id: String,
    pub key_name: String,
    pub model: String,
    pub version: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub images: u64,
    pub cost: Money,
}

/// A user's usage of a period, line by line, with the total.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Invoice {
    pub user_id: String,
    pub user_name: String,
    pub currency: String,
    pub from: UnixTime,
    pub to: UnixTime,
    pub lines: Vec<InvoiceLine>,
    pub total: Money,
}

impl Invoice {
    /// The lines as CSV (RFC 4180), a header first and the total last.
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "user_id,key_id,key_name,model,version,requests,prompt_tokens,completion_tokens,images,cost,currency\r\n",
        );
        let field = |text: &str| {
            if text.contains([',', '"', '\r', '\n']) {
                format!("\"{}\"", text.replace('"', "\"\""))
            } else {
                text.to_owned()
            }
        };
        for line in &self.lines {
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{},{},{},{}\r\n",
                field(&self.user_id),
                field(&line.key_id),
                field(&line.key_name),
                field(&line.model),
                field(&line.version),
                line.requests,
                line.prompt_tokens,
                line.completion_tokens,
                line.images,
                line.cost,
                field(&self.currency),
            ));
        }
        out.push_str(&format!(
            "{},total,,,,,,,,{},{}\r\n",
            field(&self.user_id),
            self.total,
            field(&self.currency)
        ));
        out
    }
}

impl Gateway {
    pub fn currency(&self) -> &str {
        &self.settings.currency
    }

    /// The configured prices: a model without a price gets its seed from `seed`'s moment;
    /// one whose price in effect differs gets it from then on (past calls keep their cost).
    pub fn seed_prices(&self, seeds: Vec<PriceRecord>) -> Result<(), GatewayError> {
        let mut changed = false;
        for seed in seeds {
            let same = self
                .prices
                .price_at(&seed.model, seed.effective_from)
                .is_some_and(|current| {
                    PriceRecord {
                        effective_from: seed.effective_from,
                        created_at: seed.created_at,
                        ..(*current).clone()
                    } == seed
                });
            if !same {
                self.store.put_price(&seed)?;
                changed = true;
            }
        }
        if changed {
            self.prices.load(self.store.load_prices()?);
            self.announce(Change::Prices);
        }
        Ok(())
    }

    /// Adds a price: from now on, or from a later moment (one set for a later moment may
    /// be set again before it takes effect).
    pub fn add_price(&self, new: NewPrice) -> Result<PriceRecord, GatewayError> {
        let now = self.settings.clock.now_unix();
        let effective_from = match &new.effective_from {
            Some(at) => at.resolve("effective_from")?,
            None => now,
        };
        let price = PriceRecord {
            model: new.model.trim().to_owned(),
            effective_from,
            prompt_per_million: new.prompt_per_million,
            completion_per_million: new.completion_per_million,
            per_second: new.per_second,
            per_call_minimum: new.per_call_minimum,
            images: new.images,
            created_at: now,
        };
        price.validate(&self.image_tiers, now)?;
        self.store.put_price(&price)?;
        self.prices.load(self.store.load_prices()?);
        self.announce(Change::Prices);
        Ok(price)
    }

    /// Every price (of one model, when given), oldest first.
    pub fn list_prices(&self, model: Option<&str>) -> Vec<PriceRecord> {
        self.prices
            .all()
            .into_iter()
            .filter(|p| model.is_none_or(|m| p.model == m))
            .collect()
    }

    /// A user's usage from `from` to `to` (rounded out to whole hours, as the books keep
    /// it) as invoice lines: one per key, model and version.
    pub fn invoice(
        &self,
        user_id: &str,
        from: UnixTime,
        to: UnixTime,
    ) -> Result<Invoice, GatewayError> {
        let user = self.get_user(user_id)?;
        if from >= to {
            return Err(GatewayError::invalid_request(
                "`from` must be before `to`",
                Some("from"),
            ));
        }
        let first_hour = from - from.rem_euclid(3600);
        let mut lines: BTreeMap<(String, String, String), InvoiceLine> = BTreeMap::new();
        let keys = self.scan_keys(
            &super::admin::KeyFilter {
                user_id: Some(user.id.clone()),
            },
            None,
            usize::MAX,
        )?;
        for key in keys {
            for bucket in self.store.usage(&key.id, first_hour, to)? {
                let line = lines
                    .entry((key.id.clone(), bucket.model.clone(), bucket.version.clone()))
                    .or_insert_with(|| InvoiceLine {
                        key_id: key.id.clone(),
                        key_name: key.name.clone(),
                        model: bucket.model.clone(),
                        version: bucket.version.clone(),
                        ..InvoiceLine::default()
                    });
                line.requests += bucket.requests;
                line.prompt_tokens += bucket.prompt_tokens;
                line.completion_tokens += bucket.completion_tokens;
                line.images += bucket.images;
                line.cost = line.cost.saturating_add(bucket.cost);
            }
        }
        let lines: Vec<InvoiceLine> = lines.into_values().collect();
        Ok(Invoice {
            user_id: user.id,
            user_name: user.name,
            currency: self.settings.currency.clone(),
            from: first_hour,
            to,
            total: lines
                .iter()
                .fold(Money::ZERO, |sum, l| sum.saturating_add(l.cost)),
            lines,
        })
    }

    /// The bounds of the calendar month (in the configured time zone) holding `at`.
    pub fn month_of(&self, at: UnixTime) -> (UnixTime, UnixTime) {
        self.settings
            .calendar
            .bounds(super::period::Period::Month, at)
    }

    /// The start of the calendar day (in the configured time zone) holding `at`.
    pub fn day_start(&self, at: UnixTime) -> UnixTime {
        self.settings
            .calendar
            .start_of(super::period::Period::Day, at)
    }

    pub fn now_unix(&self) -> UnixTime {
        self.settings.clock.now_unix()
    }
}
