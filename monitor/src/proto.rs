//! IP protocol names, one table for logs, alerts, the top view and the PORT/PROTO flags:
//! Zeek's names (ICMPv6 is `icmp` there too), the number where there is none.

use std::borrow::Cow;

pub const ICMP: u8 = 1;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMPV6: u8 = 58;
pub const SCTP: u8 = 132;

const NAMES: [(u8, &str); 8] = [
    (ICMP, "icmp"),
    (TCP, "tcp"),
    (UDP, "udp"),
    (47, "gre"),
    (50, "esp"),
    (51, "ah"),
    (ICMPV6, "icmp"),
    (SCTP, "sctp"),
];

pub fn name(proto: u8) -> Cow<'static, str> {
    match NAMES.iter().find(|(n, _)| *n == proto) {
        Some((_, name)) => Cow::Borrowed(name),
        None => Cow::Owned(proto.to_string()),
    }
}

/// The number of a name [`name`] gives, any case; `icmp` is ICMP (IPv4).
pub fn number(name: &str) -> Option<u8> {
    NAMES
        .iter()
        .find(|(_, n)| n.eq_ignore_ascii_case(name))
        .map(|(number, _)| *number)
}

pub fn is_icmp(proto: u8) -> bool {
    matches!(proto, ICMP | ICMPV6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_agree() {
        for (n, text) in NAMES {
            let back = number(text).unwrap();
            assert!(back == n || is_icmp(n), "{text}");
            assert_eq!(name(n), text);
        }
        assert_eq!(name(4), "4");
        assert_eq!(number("TCP"), Some(TCP));
        assert_eq!(number("ip"), None);
    }
}
