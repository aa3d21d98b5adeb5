//! Interface names and indexes, and the interface of the default route.

use std::{ffi::CString, fs};

/// The interface's index, or `None` when there is no such interface.
pub fn index(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The interface's name, or its index as text when it is gone.
pub fn name(index: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer has IF_NAMESIZE bytes, as if_indextoname requires.
    let name = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if name.is_null() {
        return index.to_string();
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// The interface of the IPv4 default route, else of the IPv6 one.
pub fn default_route() -> Option<String> {
    let v4 = fs::read_to_string("/proc/net/route").unwrap_or_default();
    let v6 = fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    default_route_v4(&v4).or_else(|| default_route_v6(&v6))
}

/// `/proc/net/route`: Iface, Destination (hex), Gateway, Flags, ...
fn default_route_v4(table: &str) -> Option<String> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() > 2 && fields[1] == "00000000").then(|| fields[0].to_owned())
    })
}

/// `/proc/net/ipv6_route`: destination, its prefix length, ..., device last.
fn default_route_v6(table: &str) -> Option<String> {
    table.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let default = fields.len() == 10
            && fields[0].bytes().all(|b| b == b'0')
            && fields[1] == "00"
            && fields[9] != "lo";
        default.then(|| fields[9].to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_default_route() {
        let table = "Iface\tDestination\tGateway \tFlags\n\
                     eth1\t0002A8C0\t00000000\t0001\n\
                     eth0\t00000000\t0102A8C0\t0003\n";
        assert_eq!(default_route_v4(table).as_deref(), Some("eth0"));
        assert_eq!(default_route_v4("Iface\tDestination\n"), None);
    }

    #[test]
    fn v6_default_route() {
        let table = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 wan0\n\
                     00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n";
        assert_eq!(default_route_v6(table).as_deref(), Some("wan0"));
    }

    #[test]
    fn loopback_has_an_index() {
        assert_eq!(index("lo").map(name).as_deref(), Some("lo"));
        assert_eq!(index("no-such-if0"), None);
    }
}
