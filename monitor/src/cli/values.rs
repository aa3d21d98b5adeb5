//! Parsers for flag values: DUR, SIZE, CIDR, PORT/PROTO, hosts and the allowlist forms.
//! Each error says what is accepted; clap adds the flag and the value.

use std::{fmt, net::IpAddr, str::FromStr, time::Duration};

use ipnet::IpNet;

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

/// CIDR: a network (`10.0.0.0/8`, `fc00::/7`) or a single address.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map(|net| net.trunc())
        .map_err(|_| "expected an IPv4 or IPv6 network such as 10.0.0.0/8 or fc00::/7".into())
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

/// PORT/PROTO: `80/tcp`, `53/udp`; ICMP types go in the port slot (`8/icmp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Service {
    pub port: u16,
    pub proto: u8,
}

impl FromStr for Service {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        const ACCEPTED: &str = "expected PORT/PROTO such as 80/tcp, 53/udp or 8/icmp";
        let (port, proto) = s.split_once('/').ok_or(ACCEPTED)?;
        let port = port.parse().map_err(|_| ACCEPTED.to_owned())?;
        let proto = match proto.to_ascii_lowercase().as_str() {
            "tcp" => 6,
            "udp" => 17,
            "icmp" => 1,
            "sctp" => 132,
            _ => return Err(ACCEPTED.into()),
        };
        Ok(Service { port, proto })
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            6 => "tcp",
            17 => "udp",
            1 => "icmp",
            132 => "sctp",
            n => return write!(f, "{}/{n}", self.port),
        };
        write!(f, "{}/{proto}", self.port)
    }
}

/// An address, a network, a host name that stands for all its A/AAAA records (actively
/// resolved, or resolved by the client itself), or `*.suffix`: any name under the suffix
/// that the client itself resolved.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum AddrSpec {
    Net(IpNet),
    Host(String),
    Suffix(String),
}

impl FromStr for AddrSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(net) = parse_cidr(s) {
            return Ok(AddrSpec::Net(net));
        }
        let valid_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        let (wildcard, name) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let name = name.trim_end_matches('.');
        let is_name = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(valid_label)
            && !name.chars().all(|c| c.is_ascii_digit() || c == '.');
        match (is_name, wildcard) {
            (true, false) => Ok(AddrSpec::Host(name.to_ascii_lowercase())),
            (true, true) => Ok(AddrSpec::Suffix(name.to_ascii_lowercase())),
            (false, _) => Err(
                "expected an IP address, a network such as 203.0.113.0/24, a host name or *.domain"
                    .into(),
            ),
        }
    }
}

impl fmt::Display for AddrSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddrSpec::Net(net) => net.fmt(f),
            AddrSpec::Host(name) => f.write_str(name),
            AddrSpec::Suffix(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// `--allow-service CIDR,PORT/PROTO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowService {
    pub dst: IpNet,
    pub service: Service,
}

impl FromStr for AllowService {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        const ACCEPTED: &str = "expected CIDR,PORT/PROTO such as 203.0.113.0/24,443/tcp";
        let (dst, service) = s.split_once(',').ok_or(ACCEPTED)?;
        Ok(AllowService {
            dst: parse_cidr(dst.trim()).map_err(|_| ACCEPTED.to_owned())?,
            service: service.trim().parse().map_err(|_| ACCEPTED.to_owned())?,
        })
    }
}

/// `--allow-pair SRC,DST`, each an IP, a CIDR or a host name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowPair {
    pub src: AddrSpec,
    pub dst: AddrSpec,
}

impl FromStr for AllowPair {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        const ACCEPTED: &str = "expected SRC,DST, each an IP, a network or a host name, such as 198.18.1.0/24,backup.example.com";
        let (src, dst) = s.split_once(',').ok_or(ACCEPTED)?;
        Ok(AllowPair {
            src: src.trim().parse().map_err(|_| ACCEPTED.to_owned())?,
            dst: dst.trim().parse().map_err(|_| ACCEPTED.to_owned())?,
        })
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
    fn cidrs() {
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_cidr("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
        assert_eq!(
            parse_cidr("2001:db8::/32").unwrap().to_string(),
            "2001:db8::/32"
        );
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("ten").is_err());
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

    #[test]
    fn services_and_allowlists() {
        assert_eq!("80/tcp".parse(), Ok(Service { port: 80, proto: 6 }));
        assert!("80".parse::<Service>().is_err());
        assert!("http/tcp".parse::<Service>().is_err());
        assert_eq!(
            "backup.example.com".parse(),
            Ok(AddrSpec::Host("backup.example.com".into()))
        );
        assert_eq!(
            "203.0.113.9".parse(),
            Ok(AddrSpec::Net("203.0.113.9/32".parse().unwrap()))
        );
        assert!("bad_name!".parse::<AddrSpec>().is_err());
        assert_eq!(
            "*.Example.test".parse(),
            Ok(AddrSpec::Suffix("example.test".into()))
        );
        assert_eq!(
            AddrSpec::Suffix("example.test".into()).to_string(),
            "*.example.test"
        );
        for bad in ["*", "*.", "*.bad_label", "a.*.test", "**.test"] {
            assert!(bad.parse::<AddrSpec>().is_err(), "{bad}");
        }
        assert!("300.1.1.1".parse::<AddrSpec>().is_err());
        let svc: AllowService = "203.0.113.0/24,443/tcp".parse().unwrap();
        assert_eq!(svc.service.port, 443);
        assert!("203.0.113.0/24".parse::<AllowService>().is_err());
        let pair: AllowPair = "198.18.1.2,mirror.example.org".parse().unwrap();
        assert_eq!(pair.dst, AddrSpec::Host("mirror.example.org".into()));
    }
}
