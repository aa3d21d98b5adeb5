//! Interface names and indexes, and the interface of the default route.

use std::{
    ffi::CString,
    fs,
    sync::{LazyLock, Mutex, PoisonError},
    time::{Duration, Instant},
};

use foldhash::HashMap;

/// The interface's index, or `None` when there is no such interface.
pub fn index(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// How long a name found is used before it is looked up again. An interface may be
/// renamed, or its index reused, at any time; but a lookup costs a socket, an ioctl and a
/// close, and a flood finishes thousands of connections in one poll (a lookup for each
/// record was most of such a poll's time).
const NAME_FRESH: Duration = Duration::from_secs(1);

static NAMES: LazyLock<Mutex<HashMap<u32, (String, Instant)>>> =
    LazyLock::new(|| Mutex::new(HashMap::default()));

/// The interface's name, or its index as text when it is gone; at most [`NAME_FRESH`]
/// old.
pub fn name(index: u32) -> String {
    let mut names = NAMES.lock().unwrap_or_else(PoisonError::into_inner);
    match names.get(&index) {
        Some((name, found)) if found.elapsed() < NAME_FRESH => name.clone(),
        _ => {
            let name = look_up_name(index);
            names.insert(index, (name.clone(), Instant::now()));
            name
        }
    }
}

fn look_up_name(index: u32) -> String {
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

/// A device's link type (`ARPHRD_*`, what `ip link` shows after `link/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkType(pub u16);

/// How the programs find the IP header on a device of some link type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Behind an Ethernet header (and VLAN tags).
    Ethernet,
    /// First: the device has no link-layer header.
    Ip,
}

impl LinkType {
    /// The link types the programs can parse, with iproute2's names for them.
    const KNOWN: [(u16, &'static str, Framing); 10] = [
        (libc::ARPHRD_ETHER, "ether", Framing::Ethernet),
        (libc::ARPHRD_LOOPBACK, "loopback", Framing::Ethernet),
        // tun, WireGuard, xfrm interfaces.
        (libc::ARPHRD_NONE, "none", Framing::Ip),
        (libc::ARPHRD_PPP, "ppp", Framing::Ip),
        (ARPHRD_RAWIP, "rawip", Framing::Ip),
        (libc::ARPHRD_TUNNEL, "ipip", Framing::Ip),
        (libc::ARPHRD_TUNNEL6, "tunnel6", Framing::Ip),
        (libc::ARPHRD_SIT, "sit", Framing::Ip),
        (libc::ARPHRD_IPGRE, "gre", Framing::Ip),
        (ARPHRD_IP6GRE, "gre6", Framing::Ip),
    ];

    /// `None` for a link type the programs cannot parse.
    pub fn framing(self) -> Option<Framing> {
        Self::KNOWN
            .iter()
            .find(|(t, _, _)| *t == self.0)
            .map(|(_, _, framing)| *framing)
    }
}

/// Not in the libc crate: raw IP over a modem (qmi_wwan and others), and IPv6 GRE.
const ARPHRD_RAWIP: u16 = 519;
const ARPHRD_IP6GRE: u16 = 823;

impl std::fmt::Display for LinkType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match Self::KNOWN.iter().find(|(t, _, _)| *t == self.0) {
            Some((_, name, _)) => f.write_str(name),
            None => write!(f, "[{}]", self.0),
        }
    }
}

/// The device's link type, as `SIOCGIFHWADDR` gives it in this thread's network
/// namespace (unlike /sys/class/net, which belongs to the namespace that mounted /sys).
pub fn link_type(name: &str) -> std::io::Result<LinkType> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IF_NAMESIZE {
        return Err(std::io::ErrorKind::InvalidInput.into());
    }
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in req.ifr_name.iter_mut().zip(bytes) {
        *to = *from as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq with a NUL-terminated name; the kernel fills in
    // ifr_hwaddr.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFHWADDR filled the hardware address member of the union.
    Ok(LinkType(unsafe { req.ifr_ifru.ifru_hwaddr }.sa_family))
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
    fn link_types() {
        assert_eq!(link_type("lo").unwrap(), LinkType(libc::ARPHRD_LOOPBACK));
        assert_eq!(LinkType(libc::ARPHRD_LOOPBACK).to_string(), "loopback");
        assert_eq!(LinkType(65534).to_string(), "none");
        assert_eq!(LinkType(65534).framing(), Some(Framing::Ip));
        assert_eq!(LinkType(1).framing(), Some(Framing::Ethernet));
        // Infiniband: neither Ethernet nor IP first.
        assert_eq!(LinkType(32).framing(), None);
        assert_eq!(LinkType(32).to_string(), "[32]");
        assert!(link_type("no-such-if0").is_err());
    }

    #[test]
    fn loopback_has_an_index() {
        assert_eq!(index("lo").map(name).as_deref(), Some("lo"));
        assert_eq!(index("no-such-if0"), None);
    }
}
