//! CIDR text, as flags and allowlists take it: a network or a single address.

use std::net::IpAddr;

use ipnet::IpNet;

/// CIDR: a network (`10.0.0.0/8`, `fc00::/7`) or a single address.
pub fn parse(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map(|net| net.trunc())
        .map_err(|_| "expected an IPv4 or IPv6 network such as 10.0.0.0/8 or fc00::/7".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_and_addresses() {
        assert_eq!(parse("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
        assert_eq!(parse("2001:db8::/32").unwrap().to_string(), "2001:db8::/32");
        assert!(parse("10.0.0.0/33").is_err());
        assert!(parse("ten").is_err());
    }
}
