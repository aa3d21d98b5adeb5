//! What rules match, in the forms flags give them: services (PORT/PROTO), addresses,
//! networks and names, and the allowlist entries made of them.

use std::{fmt, str::FromStr, sync::Arc};

use ipnet::IpNet;

use crate::{cidr, proto};

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
        // Those whose connections a port (or an ICMP type) tells apart.
        let proto = proto::number(proto)
            .filter(|&p| matches!(p, proto::TCP | proto::UDP | proto::ICMP | proto::SCTP))
            .ok_or(ACCEPTED)?;
        Ok(Service { port, proto })
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, proto::name(self.proto))
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
        if let Ok(net) = cidr::parse(s) {
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

/// Where a list entry was given: in file `list` at line `line`, or on the command line
/// (`list` is then the flag, `line` which of its values, from 1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub list: Arc<str>,
    pub line: usize,
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
            dst: cidr::parse(dst.trim()).map_err(|_| ACCEPTED.to_owned())?,
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

#[cfg(test)]
mod tests {
    use super::*;

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
