//! Prices and what a call costs. A price belongs to a model version (or a model the
//! catalogue does not know, by its name) from a moment on; a call is priced by the price
//! in effect when it was admitted, once, at settlement, in whole nano-units rounded up.
//! History is never rewritten: a price takes effect now or later, never earlier.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use super::error::GatewayError;
use super::images::ImageSize;
use super::money::Money;
pub use super::records::PriceRecord;
use super::records::Usage;
use super::time::UnixTime;

/// One resolution tier: images of at most `max_pixels` (width × height).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageTier {
    pub name: String,
    pub max_pixels: u64,
}

/// The resolution tiers, smallest first; an image larger than the last is `large`, one
/// of unknown size `unknown`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageTiers(Vec<ImageTier>);

pub const LARGER_TIER: &str = "large";
pub const UNKNOWN_TIER: &str = "unknown";

impl Default for ImageTiers {
    /// ≤ 512², ≤ 1024², larger, unknown.
    fn default() -> Self {
        ImageTiers(vec![
            ImageTier {
                name: "small".into(),
                max_pixels: 512 * 512,
            },
            ImageTier {
                name: "medium".into(),
                max_pixels: 1024 * 1024,
            },
        ])
    }
}

impl ImageTiers {
    pub fn new(mut tiers: Vec<ImageTier>) -> Result<Self, String> {
        tiers.sort_by_key(|t| t.max_pixels);
        let mut names: Vec<&str> = tiers.iter().map(|t| t.name.as_str()).collect();
        names.extend([LARGER_TIER, UNKNOWN_TIER]);
        let mut seen = std::collections::HashSet::new();
        if let Some(twice) = names.iter().find(|n| !seen.insert(**n)) {
            return Err(format!(
                "image tier `{twice}` is named twice (`{LARGER_TIER}` and `{UNKNOWN_TIER}` are always there)"
            ));
        }
        Ok(ImageTiers(tiers))
    }

    /// Every tier's name, smallest first, then `large` and `unknown`.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.0.iter().map(|t| t.name.as_str()).collect();
        names.extend([LARGER_TIER, UNKNOWN_TIER]);
        names
    }

    pub fn tier_of(&self, size: Option<ImageSize>) -> &str {
        let Some(size) = size else {
            return UNKNOWN_TIER;
        };
        let pixels = u64::from(size.width) * u64::from(size.height);
        self.0
            .iter()
            .find(|t| pixels <= t.max_pixels)
            .map_or(LARGER_TIER, |t| t.name.as_str())
    }
}

/// What a call is charged for, as settlement knows it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Charge<'a> {
    pub usage: Usage,
    /// Sizes of the images whose size the gateway read.
    pub sized_images: &'a [ImageSize],
    /// Images charged whose size is unknown.
    pub unsized_images: u32,
    /// Microseconds the model server held the call.
    pub model_micros: u64,
    /// Whether the model served the call (only then the minimum applies).
    pub served: bool,
}

/// Sums are kept in millionths of a nano-unit (a token's price is per million) until the
/// one rounding, up, at the end.
const PARTS: u128 = 1_000_000;

impl PriceRecord {
    /// The price of one image of `tier`: its own, or for an image of unknown size the
    /// dearest tier's when `unknown` has none (what the size could have been).
    pub fn image_price(&self, tier: &str) -> Money {
        match self.images.get(tier) {
            Some(price) => *price,
            None if tier == UNKNOWN_TIER => self.images.values().copied().max().unwrap_or_default(),
            None => Money::ZERO,
        }
    }

    /// The cost of the tokens, images and time of `charge`, before rounding, in
    /// millionths of a nano-unit.
    fn parts(&self, tiers: &ImageTiers, charge: &Charge<'_>) -> u128 {
        let mut parts = u128::from(charge.usage.prompt_tokens)
            * u128::from(self.prompt_per_million.0)
            + u128::from(charge.usage.completion_tokens)
                * u128::from(self.completion_per_million.0)
            + u128::from(charge.model_micros) * u128::from(self.per_second.0);
        for size in charge.sized_images {
            parts += u128::from(self.image_price(tiers.tier_of(Some(*size))).0) * PARTS;
        }
        parts
            + u128::from(charge.unsized_images)
                * u128::from(self.image_price(UNKNOWN_TIER).0)
                * PARTS
    }

    /// The call's cost, rounded up once to a whole nano-unit.
    pub fn cost(&self, tiers: &ImageTiers, charge: &Charge<'_>) -> Money {
        let parts = self.parts(tiers, charge);
        let cost = Money(u64::try_from(parts.div_ceil(PARTS)).unwrap_or(u64::MAX));
        if charge.served {
            cost.max(self.per_call_minimum)
        } else {
            cost
        }
    }

    /// The most a call can cost that is known before it is made: its prompt estimate, its
    /// output cap, its images and the minimum (model time is not known in advance).
    pub fn worst_cost(
        &self,
        tiers: &ImageTiers,
        prompt_tokens: u64,
        completion_tokens: u64,
        sized_images: &[ImageSize],
        unsized_images: u32,
    ) -> Money {
        self.cost(
            tiers,
            &Charge {
                usage: Usage {
                    prompt_tokens,
                    completion_tokens,
                },
                sized_images,
                unsized_images,
                model_micros: 0,
                served: true,
            },
        )
    }

    /// How many output tokens `remaining` pays for after the prompt, the images and the
    /// minimum: `None` for any number (output is free), `Some(0)` when not even the rest
    /// is covered.
    pub fn affordable_completion(
        &self,
        tiers: &ImageTiers,
        remaining: Money,
        prompt_tokens: u64,
        sized_images: &[ImageSize],
        unsized_images: u32,
    ) -> Option<u64> {
        let fixed = self.parts(
            tiers,
            &Charge {
                usage: Usage {
                    prompt_tokens,
                    completion_tokens: 0,
                },
                sized_images,
                unsized_images,
                ..Charge::default()
            },
        );
        let room = u128::from(remaining.0) * PARTS;
        if self.per_call_minimum > remaining || fixed > room {
            return Some(0);
        }
        if self.completion_per_million.0 == 0 {
            return None;
        }
        Some(
            u64::try_from((room - fixed) / u128::from(self.completion_per_million.0))
                .unwrap_or(u64::MAX),
        )
    }

    /// Refuses a price that cannot be meant.
    pub fn validate(&self, tiers: &ImageTiers, now: UnixTime) -> Result<(), GatewayError> {
        if self.model.trim().is_empty() {
            return Err(GatewayError::invalid_request(
                "`model` must name a model or model version",
                Some("model"),
            ));
        }
        if self.effective_from < now {
            return Err(GatewayError::invalid_request(
                "`effective_from` is in the past: a new price applies from now on (history is never rewritten)",
                Some("effective_from"),
            ));
        }
        let names = tiers.names();
        if let Some(tier) = self.images.keys().find(|t| !names.contains(&t.as_str())) {
            return Err(GatewayError::invalid_request(
                format!(
                    "`images` names tier `{tier}`; the tiers are {}",
                    names.join(", ")
                ),
                Some("images"),
            ));
        }
        Ok(())
    }
}

/// Every price, by model, oldest first; read on every admission, written by admin changes.
#[derive(Debug, Default)]
pub struct PriceBook {
    prices: RwLock<Arc<HashMap<String, Vec<Arc<PriceRecord>>>>>,
}

impl PriceBook {
    /// Replaces every price (at start, and when another replica announces a change).
    pub fn load(&self, records: Vec<PriceRecord>) {
        // By model, then moment: a price replaced before it took effect (the same moment
        // written again) is the later write.
        let mut by_moment: HashMap<String, BTreeMap<UnixTime, Arc<PriceRecord>>> = HashMap::new();
        for record in records {
            by_moment
                .entry(record.model.clone())
                .or_default()
                .insert(record.effective_from, Arc::new(record));
        }
        let prices: HashMap<String, Vec<Arc<PriceRecord>>> = by_moment
            .into_iter()
            .map(|(model, list)| (model, list.into_values().collect()))
            .collect();
        *self.prices.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(prices);
    }

    /// The price of `model` in effect at `at`.
    pub fn price_at(&self, model: &str, at: UnixTime) -> Option<Arc<PriceRecord>> {
        let prices = self
            .prices
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let list = prices.get(model)?;
        list.iter().rev().find(|p| p.effective_from <= at).cloned()
    }

    /// Every price, by model then time.
    pub fn all(&self) -> Vec<PriceRecord> {
        let prices = self
            .prices
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut all: Vec<PriceRecord> = prices
            .values()
            .flat_map(|list| list.iter().map(|p| (**p).clone()))
            .collect();
        all.sort_by(|a, b| (&a.model, a.effective_from).cmp(&(&b.model, b.effective_from)));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn money(text: &str) -> Money {
        Money::parse(text).unwrap()
    }

    fn price() -> PriceRecord {
        PriceRecord {
            model: "step3-vl".into(),
            effective_from: 0,
            prompt_per_million: money("0.50"),
            completion_per_million: money("1.50"),
            per_second: money("0.001"),
            per_call_minimum: Money::ZERO,
            images: BTreeMap::from([
                ("small".into(), money("0.001")),
                ("medium".into(), money("0.002")),
                ("large".into(), money("0.004")),
            ]),
            created_at: 0,
        }
    }

    fn charge(prompt: u64, completion: u64) -> Charge<'static> {
        Charge {
            usage: Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
            },
            served: true,
            ..Charge::default()
        }
    }

    #[test]
    fn text_is_priced_per_million_tokens_exactly() {
        let tiers = ImageTiers::default();
        // 1000 × 0.50/M + 2000 × 1.50/M = 0.0005 + 0.003
        assert_eq!(price().cost(&tiers, &charge(1000, 2000)), money("0.0035"));
        assert_eq!(
            price().cost(&tiers, &charge(1_000_000, 1_000_000)),
            money("2.00")
        );
    }

    #[test]
    fn a_tiny_call_is_rounded_up_once_to_a_nano_unit() {
        let tiers = ImageTiers::default();
        let mut cheap = price();
        cheap.prompt_per_million = money("0.0001");
        cheap.completion_per_million = money("0.0001");
        // 3 × 100 nanos / M + 2 × 100 nanos / M = 0.0005 nanos: one nano, not zero and not two.
        assert_eq!(cheap.cost(&tiers, &charge(3, 2)), Money(1));
        assert_eq!(cheap.cost(&tiers, &charge(0, 0)), Money(0));
        cheap.per_call_minimum = money("0.00001");
        assert_eq!(cheap.cost(&tiers, &charge(3, 2)), money("0.00001"));
        // The minimum is for calls the model served.
        let failed = Charge {
            served: false,
            ..charge(3, 2)
        };
        assert_eq!(cheap.cost(&tiers, &failed), Money(1));
    }

    #[test]
    fn images_are_priced_by_their_tier_and_unknown_ones_at_the_dearest() {
        let tiers = ImageTiers::default();
        let sizes = [
            ImageSize {
                width: 512,
                height: 512,
            },
            ImageSize {
                width: 1024,
                height: 768,
            },
            ImageSize {
                width: 2048,
                height: 2048,
            },
        ];
        assert_eq!(tiers.tier_of(Some(sizes[0])), "small");
        assert_eq!(tiers.tier_of(Some(sizes[1])), "medium");
        assert_eq!(tiers.tier_of(Some(sizes[2])), "large");
        let charge = Charge {
            sized_images: &sizes,
            unsized_images: 2,
            served: true,
            ..Charge::default()
        };
        // 0.001 + 0.002 + 0.004 + 2 × 0.004
        assert_eq!(price().cost(&tiers, &charge), money("0.015"));
    }

    #[test]
    fn model_time_is_priced_per_microsecond() {
        let tiers = ImageTiers::default();
        let charge = Charge {
            model_micros: 1_500_000,
            served: true,
            ..Charge::default()
        };
        assert_eq!(price().cost(&tiers, &charge), money("0.0015"));
    }

    #[test]
    fn what_a_budget_affords_never_exceeds_it() {
        let tiers = ImageTiers::default();
        let p = price();
        // 0.0001 left, the prompt of 100 tokens costs 0.00005: 0.00005 / 1.50 per M = 33 tokens.
        let tokens = p
            .affordable_completion(&tiers, money("0.0001"), 100, &[], 0)
            .unwrap();
        assert_eq!(tokens, 33);
        assert!(p.worst_cost(&tiers, 100, tokens, &[], 0) <= money("0.0001"));
        assert!(p.worst_cost(&tiers, 100, tokens + 1, &[], 0) > money("0.0001"));
        assert_eq!(
            p.affordable_completion(&tiers, money("0.00001"), 100, &[], 0),
            Some(0)
        );
    }

    #[test]
    fn the_price_in_effect_is_the_latest_begun() {
        let book = PriceBook::default();
        let at = |from, p: &str| PriceRecord {
            effective_from: from,
            prompt_per_million: money(p),
            ..price()
        };
        book.load(vec![at(100, "2"), at(0, "1"), at(200, "3"), at(200, "4")]);
        let prompt = |t| book.price_at("step3-vl", t).map(|p| p.prompt_per_million);
        assert_eq!(prompt(-1), None);
        assert_eq!(prompt(0), Some(money("1")));
        assert_eq!(prompt(150), Some(money("2")));
        assert_eq!(
            prompt(500),
            Some(money("4")),
            "the later write of a moment wins"
        );
        assert_eq!(book.price_at("other", 500), None);
    }
}
