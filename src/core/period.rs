//! Periods of quotas and budgets (a day, a week, a month) and the calendar they follow:
//! one configured time zone, in which days start at midnight, weeks on Monday and months
//! on the 1st, whatever the offset does in between (summer time).

use jiff::tz::TimeZone;
use jiff::{Span, Timestamp, ToSpan, Zoned};
use serde::{Deserialize, Serialize};

use super::time::UnixTime;

/// How often a key's quotas and budget (or a user's budget) start again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Day,
    Week,
    Month,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    /// `a day`, `a week`, `a month`: how a refusal says it.
    pub fn each(self) -> &'static str {
        match self {
            Period::Day => "a day",
            Period::Week => "a week",
            Period::Month => "a month",
        }
    }

    fn span(self) -> Span {
        match self {
            Period::Day => 1.day(),
            Period::Week => 1.week(),
            Period::Month => 1.month(),
        }
    }
}

impl std::str::FromStr for Period {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "day" => Ok(Period::Day),
            "week" => Ok(Period::Week),
            "month" => Ok(Period::Month),
            other => Err(format!(
                "`{other}` is not a period: `day`, `week` or `month`"
            )),
        }
    }
}

/// The configured time zone's calendar.
#[derive(Clone, Debug)]
pub struct Calendar {
    tz: TimeZone,
    name: String,
}

impl Default for Calendar {
    fn default() -> Self {
        Calendar {
            tz: TimeZone::UTC,
            name: "UTC".into(),
        }
    }
}

impl Calendar {
    /// The calendar of an IANA time zone name (`UTC`, `Asia/Shanghai`, `Europe/Berlin`).
    pub fn new(name: &str) -> Result<Self, String> {
        let tz = TimeZone::get(name)
            .map_err(|e| format!("`{name}` is not a time zone this gateway knows: {e}"))?;
        Ok(Calendar {
            tz,
            name: name.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn zoned(&self, at: UnixTime) -> Zoned {
        let at = Timestamp::from_second(at).unwrap_or(Timestamp::UNIX_EPOCH);
        at.to_zoned(self.tz.clone())
    }

    /// The start of the period that holds `at`, and the start of the next.
    pub fn bounds(&self, period: Period, at: UnixTime) -> (UnixTime, UnixTime) {
        let zoned = self.zoned(at);
        let start = (|| -> Result<Zoned, jiff::Error> {
            let day = zoned.start_of_day()?;
            match period {
                Period::Day => Ok(day),
                Period::Week => {
                    let back = i64::from(zoned.weekday().to_monday_zero_offset());
                    day.checked_sub(back.days())?.start_of_day()
                }
                Period::Month => zoned.first_of_month()?.start_of_day(),
            }
        })();
        let Ok(start) = start else {
            // Only at the ends of time.
            return (at, UnixTime::MAX);
        };
        let end = start
            .checked_add(period.span())
            .and_then(|next| next.start_of_day())
            .map_or(UnixTime::MAX, |next| next.timestamp().as_second());
        (start.timestamp().as_second(), end)
    }

    /// The start of the day or month (in this calendar) that holds `at`.
    pub fn start_of(&self, period: Period, at: UnixTime) -> UnixTime {
        self.bounds(period, at).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> UnixTime {
        text.parse::<Timestamp>().unwrap().as_second()
    }

    #[test]
    fn periods_start_at_midnight_monday_and_the_first_in_the_zone() {
        let shanghai = Calendar::new("Asia/Shanghai").unwrap();
        // 2026-12-05 (a Saturday) 17:30 UTC is 01:30 on the 6th in Shanghai.
        let now = at("2026-12-05T17:30:00Z");
        assert_eq!(
            shanghai.bounds(Period::Day, now),
            (at("2026-12-05T16:00:00Z"), at("2026-12-06T16:00:00Z"))
        );
        assert_eq!(
            shanghai.bounds(Period::Week, now),
            (at("2026-11-29T16:00:00Z"), at("2026-12-06T16:00:00Z"))
        );
        assert_eq!(
            shanghai.bounds(Period::Month, now),
            (at("2026-11-30T16:00:00Z"), at("2026-12-31T16:00:00Z"))
        );
        let utc = Calendar::default();
        assert_eq!(
            utc.bounds(Period::Month, now),
            (at("2026-12-01T00:00:00Z"), at("2027-01-01T00:00:00Z"))
        );
    }

    #[test]
    fn a_day_with_a_clock_change_is_as_long_as_it_is() {
        let berlin = Calendar::new("Europe/Berlin").unwrap();
        let (start, end) = berlin.bounds(Period::Day, at("2026-03-29T12:00:00Z"));
        assert_eq!(end - start, 23 * 3600);
        assert!(Calendar::new("Mars/Olympus").is_err());
    }
}
