//! Addresses as the kernel programs write them (flow keys, DNS events): 16 bytes and a
//! family, 4 or 6, an IPv4 address in the first four bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub fn from_wire(family: u8, bytes: &[u8; 16]) -> IpAddr {
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    }
}

/// (bytes, family).
pub fn to_wire(addr: IpAddr) -> ([u8; 16], u8) {
    match addr {
        IpAddr::V4(a) => {
            let mut bytes = [0; 16];
            bytes[..4].copy_from_slice(&a.octets());
            (bytes, 4)
        }
        IpAddr::V6(a) => (a.octets(), 6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_families_come_back() {
        for text in ["198.18.1.2", "2001:db8::1", "::ffff:10.0.0.1"] {
            let addr: IpAddr = text.parse().unwrap();
            let (bytes, family) = to_wire(addr);
            assert_eq!(from_wire(family, &bytes), addr);
        }
    }
}
