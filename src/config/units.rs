//! Durations (`"10s"`, `"5m"`, `"7d"`) and sizes (`4194304`, `"4MiB"`) as the config file writes them.
//! Parsing errors surface through serde, so the TOML layer attaches the line and column.

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use std::fmt;
use std::time::Duration;

/// A duration written with humantime units (`ms`, `s`, `m`, `h`, `d`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(DURATION_EXAMPLE)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Dur, E> {
                humantime::parse_duration(s.trim())
                    .map(Dur)
                    .map_err(|e| E::custom(format!("invalid duration {s:?} ({e}); expected {DURATION_EXAMPLE}")))
            }
            // A bare number has no unit: say which string was probably meant.
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "a duration needs a unit: write \"{v}s\" for {v} seconds (expected {DURATION_EXAMPLE})"
                )))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dur, E> {
                self.visit_i64(v as i64)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Dur, E> {
                Err(E::custom(format!(
                    "a duration needs a unit: write \"{}ms\" for {v} seconds (expected {DURATION_EXAMPLE})",
                    (v * 1000.0).round() as i64
                )))
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration as the config file would write it, in its largest whole unit (`"90s"`, `"5m"`,
/// `"7d"`, `"250ms"`).
pub fn spell(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 != 0 {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    match s {
        0 => "0s".into(),
        _ if s % 86_400 == 0 => format!("{}d", s / 86_400),
        _ if s % 3600 == 0 => format!("{}h", s / 3600),
        _ if s % 60 == 0 => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

/// How every duration error ends: the right spelling.
const DURATION_EXAMPLE: &str = "a duration written as a string with a unit, e.g. \"500ms\", \"10s\", \"5m\", \"7d\"";
/// How every size error ends: the right spelling.
const SIZE_EXAMPLE: &str =
    "a size written as bytes (an integer) or a string with a unit, e.g. \"512KiB\", \"4MiB\", \"1MB\"";

/// A size in bytes, written as an integer or a string with a unit (`"512KiB"`, `"4MiB"`, `"1MB"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(SIZE_EXAMPLE)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map(Size)
                    .map_err(|_| E::custom(format!("a size cannot be negative; expected {SIZE_EXAMPLE}")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Size, E> {
                Err(E::custom(format!("a size is a whole number, not {v}; expected {SIZE_EXAMPLE}")))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).ok_or_else(|| E::custom(format!("invalid size {v:?}; expected {SIZE_EXAMPLE}")))
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses `"4MiB"`, `"1 MB"`, `"512k"`, `"100"`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4MiB"), Some(4 << 20));
        assert_eq!(parse_size("1 MB"), Some(1_000_000));
        assert_eq!(parse_size("512KiB"), Some(512 * 1024));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("4 parsecs"), None);
        assert_eq!(parse_size("MiB"), None);
    }
}
