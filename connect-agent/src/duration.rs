//! Go-style durations (`30s`, `5m`, `72h0m0s`, `1.5h`), as Consul's API and config use.

use std::time::Duration;

/// A duration string that is not in Go's `time.ParseDuration` format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {value:?}: {reason} (expected e.g. \"30s\", \"5m\", \"72h\")")]
pub struct Error {
    pub value: String,
    pub reason: &'static str,
}

/// Parses `ns`, `us`/`µs`, `ms`, `s`, `m`, `h` units with optional fractions; a bare
/// `0` is zero. Negative durations are refused: nothing in Connect means them.
pub fn parse(s: &str) -> Result<Duration, Error> {
    let err = |reason| Error {
        value: s.chars().take(64).collect(),
        reason,
    };
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    if t.is_empty() {
        return Err(err("it is empty"));
    }
    if t.starts_with('-') {
        return Err(err("it is negative"));
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    let mut total: f64 = 0.0;
    let mut rest = t;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| err("a number has no unit"))?;
        if num_len == 0 {
            return Err(err("a unit has no number"));
        }
        let value: f64 = rest[..num_len]
            .parse()
            .map_err(|_| err("a number is malformed"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(err("unknown unit")),
        };
        total += value * nanos_per;
        rest = &rest[unit_len..];
    }
    if !total.is_finite() || total > u64::MAX as f64 {
        return Err(err("it is too large"));
    }
    Ok(Duration::from_nanos(total.round() as u64))
}

/// Formats like Go's `Duration.String()`: `72h0m0s`, `1m30s`, `1.5s`, `10ms`, `0s`.
pub fn format(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    if nanos < 1_000_000_000 {
        return if nanos < 1_000 {
            format!("{nanos}ns")
        } else if nanos < 1_000_000 {
            trim_fraction(nanos as f64 / 1e3, "µs")
        } else {
            trim_fraction(nanos as f64 / 1e6, "ms")
        };
    }
    let secs = d.as_secs();
    let (h, m) = (secs / 3600, (secs % 3600) / 60);
    let s_frac = (secs % 60) as f64 + f64::from(d.subsec_nanos()) / 1e9;
    let s = trim_fraction(s_frac, "s");
    if h > 0 {
        format!("{h}h{m}m{s}")
    } else if m > 0 {
        format!("{m}m{s}")
    } else {
        s
    }
}

fn trim_fraction(v: f64, unit: &str) -> String {
    let mut s = format!("{v:.9}");
    while s.ends_with('0') {
        s.pop();
    }
    if s.ends_with('.') {
        s.pop();
    }
    format!("{s}{unit}")
}

/// Serde adapter for fields that hold a Go duration string.
pub mod serde_go {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        let cases = [
            ("0", 0),
            ("30s", 30_000),
            ("5m", 300_000),
            ("72h", 259_200_000),
            ("72h0m0s", 259_200_000),
            ("1h30m", 5_400_000),
            ("1.5s", 1_500),
            ("10ms", 10),
            ("+2s", 2_000),
        ];
        for (s, ms) in cases {
            assert_eq!(parse(s), Ok(Duration::from_millis(ms)), "{s}");
        }
        assert_eq!(parse("250us"), Ok(Duration::from_micros(250)));
        for bad in ["", "s", "10", "10x", "-1s", "1..2s", "h1"] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn formats_like_go() {
        let cases = [
            (Duration::from_secs(72 * 3600), "72h0m0s"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_millis(10), "10ms"),
            (Duration::ZERO, "0s"),
            (Duration::from_secs(3 * 3600 + 5), "3h0m5s"),
        ];
        for (d, s) in cases {
            assert_eq!(format(d), s);
            assert_eq!(parse(s), Ok(d), "{s} round trip");
        }
    }
}
