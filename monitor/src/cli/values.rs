//! Parsers for flag values: DUR, SIZE, FACTOR (CIDR is `crate::cidr`'s; PORT/PROTO, hosts
//! and the allowlist forms are the rules' own, `crate::rules::targets`).
//! Each error says what is accepted; clap adds the flag and the value.

use std::{fmt, str::FromStr, time::Duration};

pub use crate::cidr::parse as parse_cidr;

/// DUR: humantime (`30s`, `5m`, `1h`, `3d`), more than zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err("expected a duration above zero such as 500ms, 30s, 5m, 1h or 3d".into()),
    }
}

/// LIST: increasing durations separated by commas (`10m,30m,1h`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Durations(pub Vec<Duration>);

impl FromStr for Durations {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        parse_durations(s).map(Durations)
    }
}

/// A comma-separated list of increasing durations (`10m,30m,1h`).
pub fn parse_durations(s: &str) -> Result<Vec<Duration>, String> {
    const ACCEPTED: &str = "expected increasing durations separated by commas, such as 10m,30m,1h";
    let list = s
        .split(',')
        .map(|d| parse_duration(d.trim()).map_err(|_| ACCEPTED.to_owned()))
        .collect::<Result<Vec<_>, _>>()?;
    if list.windows(2).any(|w| w[0] >= w[1]) {
        return Err(ACCEPTED.into());
    }
    Ok(list)
}

/// SIZE in bytes: a number with `B`, `KB`/`MB`/`GB` (powers of 10) or `KiB`/`MiB`/`GiB`
/// (powers of 2); a bare number is bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        const ACCEPTED: &str = "expected a size such as 500B, 5MB, 1.5GB or 64KiB (KB/MB/GB are powers of 10, KiB/MiB/GiB of 2)";
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let number: f64 = number.parse().map_err(|_| ACCEPTED.to_owned())?;
        let scale: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            _ => return Err(ACCEPTED.into()),
        };
        let bytes = number * scale as f64;
        if !bytes.is_finite() || bytes.fract() != 0.0 || bytes > u64::MAX as f64 {
            return Err(ACCEPTED.into());
        }
        Ok(Size(bytes as u64))
    }
}

impl fmt::Display for Size {
    /// The shortest exact form in powers of 10, as a user would write it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (scale, unit) in [(1_000_000_000, "GB"), (1_000_000, "MB"), (1_000, "KB")] {
            if self.0 >= scale && self.0.is_multiple_of(scale) {
                return write!(f, "{}{unit}", self.0 / scale);
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// FACTOR: a positive number.
pub fn parse_factor(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if f.is_finite() && f > 0.0 => Ok(f),
        _ => Err("expected a positive number such as 1.0 or 2.5".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("3d"), Ok(Duration::from_secs(3 * 86400)));
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
        assert_eq!(
            parse_durations("10m, 1h,3d"),
            Ok(vec![
                Duration::from_secs(600),
                Duration::from_secs(3600),
                Duration::from_secs(3 * 86400)
            ])
        );
        assert!(parse_durations("1h,10m").is_err());
        assert!(parse_durations("10m,,1h").is_err());
    }

    #[test]
    fn sizes() {
        let size = |s: &str| s.parse::<Size>().map(|s| s.0);
        assert_eq!(size("100MB"), Ok(100_000_000));
        assert_eq!(size("5MB"), Ok(5_000_000));
        assert_eq!(size("64KiB"), Ok(65_536));
        assert_eq!(size("1GiB"), Ok(1 << 30));
        assert_eq!(size("1.5GB"), Ok(1_500_000_000));
        assert_eq!(size("4096"), Ok(4096));
        assert_eq!(size("0B"), Ok(0));
        assert!(size("5 parsecs").is_err());
        assert!(size("0.5B").is_err());
        assert!(size("MB").is_err());
        assert_eq!(Size(100_000_000).to_string(), "100MB");
        assert_eq!(Size(4096).to_string(), "4096B");
    }
}
