//! Money as the books keep it: a whole number of nano-units (10⁻⁹) of the one configured
//! currency. Never a float: prices are read from decimal text and every sum is exact.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Nano-units of the configured currency (1 = 0.000000001 USD when the currency is USD).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(pub u64);

/// Nano-units in one unit of the currency.
pub const NANOS_PER_UNIT: u64 = 1_000_000_000;
const DECIMALS: usize = 9;

impl Money {
    pub const ZERO: Money = Money(0);

    pub fn nanos(self) -> u64 {
        self.0
    }

    pub fn saturating_add(self, other: Money) -> Money {
        Money(self.0.saturating_add(other.0))
    }

    pub fn saturating_sub(self, other: Money) -> Money {
        Money(self.0.saturating_sub(other.0))
    }

    /// Reads decimal text: `12`, `0.50`, `.000001`, at most 9 decimals, no sign, no
    /// exponent (a price is never negative, and a float's rounding is never money).
    pub fn parse(text: &str) -> Result<Money, String> {
        let text = text.trim();
        let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if (whole.is_empty() && fraction.is_empty()) || !digits(whole) || !digits(fraction) {
            return Err(format!(
                "`{text}` is not an amount of money (write it as decimal text, e.g. \"12.50\")"
            ));
        }
        if fraction.len() > DECIMALS {
            return Err(format!(
                "`{text}` has more than {DECIMALS} decimals (the books count in 0.000000001)"
            ));
        }
        let too_large = || format!("`{text}` is too large an amount");
        let whole: u64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| too_large())?
        };
        let fraction: u64 = if fraction.is_empty() {
            0
        } else {
            let padded = format!("{fraction:0<DECIMALS$}");
            padded.parse().map_err(|_| too_large())?
        };
        whole
            .checked_mul(NANOS_PER_UNIT)
            .and_then(|n| n.checked_add(fraction))
            .map(Money)
            .ok_or_else(too_large)
    }
}

impl Money {
    /// The decimal text, written into `buf` (no allocation: a call's cost is written
    /// into every record of it).
    fn write<'b>(&self, buf: &'b mut [u8; 32]) -> &'b str {
        let mut at = buf.len();
        let mut fraction = self.0 % NANOS_PER_UNIT;
        let mut kept = DECIMALS;
        // Trailing zeros beyond two decimals are dropped.
        while kept > 2 && fraction.is_multiple_of(10) {
            fraction /= 10;
            kept -= 1;
        }
        for _ in 0..kept {
            at -= 1;
            buf[at] = b'0' + (fraction % 10) as u8;
            fraction /= 10;
        }
        at -= 1;
        buf[at] = b'.';
        let mut whole = self.0 / NANOS_PER_UNIT;
        loop {
            at -= 1;
            buf[at] = b'0' + (whole % 10) as u8;
            whole /= 10;
            if whole == 0 {
                break;
            }
        }
        std::str::from_utf8(&buf[at..]).unwrap_or("0.00")
    }
}

impl fmt::Display for Money {
    /// Decimal text with at least two decimals and no trailing zeros beyond them:
    /// `0.00`, `12.50`, `0.000000450`→`0.00000045`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.write(&mut [0; 32]))
    }
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.write(&mut [0; 32]))
    }
}

impl<'de> Deserialize<'de> for Money {
    /// Decimal text, or a JSON number (an integer, or a decimal as it was written: `0.5`).
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct Amount;
        impl Visitor<'_> for Amount {
            type Value = Money;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an amount of money as decimal text, e.g. \"12.50\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Money, E> {
                Money::parse(v).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Money, E> {
                v.checked_mul(NANOS_PER_UNIT)
                    .map(Money)
                    .ok_or_else(|| E::custom("too large an amount"))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Money, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom("an amount of money cannot be negative"))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Money, E> {
                // The shortest text that reads back as `v` is what the client wrote.
                Money::parse(&v.to_string()).map_err(E::custom)
            }
        }
        de.deserialize_any(Amount)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_read_and_print_exactly() {
        for (text, nanos, shown) in [
            ("0", 0, "0.00"),
            ("12", 12_000_000_000, "12.00"),
            ("0.50", 500_000_000, "0.50"),
            (".000001", 1_000, "0.000001"),
            ("0.000000001", 1, "0.000000001"),
            ("3.14159", 3_141_590_000, "3.14159"),
        ] {
            let money = Money::parse(text).unwrap();
            assert_eq!(money, Money(nanos), "{text}");
            assert_eq!(money.to_string(), shown);
            assert_eq!(Money::parse(shown).unwrap(), money);
        }
        for bad in [
            "",
            ".",
            "-1",
            "1e3",
            "0.0000000001",
            "1.2.3",
            "ten",
            "99999999999999",
        ] {
            assert!(Money::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn json_takes_text_integers_and_written_decimals() {
        let read = |json: &str| serde_json::from_str::<Money>(json);
        assert_eq!(read("\"0.15\"").unwrap(), Money(150_000_000));
        assert_eq!(read("2").unwrap(), Money(2_000_000_000));
        assert_eq!(read("0.1").unwrap(), Money(100_000_000));
        assert!(read("-1").is_err());
        assert!(read("true").is_err());
        assert_eq!(
            serde_json::to_string(&Money(1_500)).unwrap(),
            "\"0.0000015\""
        );
    }
}
