//! Raw rtnetlink for link attributes that iproute2 6.1 can neither set nor show: the BIG
//! TCP sizes (`gso_ipv4_max_size`, `gro_ipv4_max_size`, added in Linux 6.3).
//!
//! Everything acts on the calling thread's network namespace: call it inside
//! [`run_in_ns`](crate::lab::run_in_ns).

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

/// `include/uapi/linux/if_link.h` numbering (the system headers may predate the last two).
pub const IFLA_GSO_MAX_SIZE: u16 = 41;
pub const IFLA_GRO_MAX_SIZE: u16 = 58;
pub const IFLA_TSO_MAX_SIZE: u16 = 59;
pub const IFLA_GSO_IPV4_MAX_SIZE: u16 = 63;
pub const IFLA_GRO_IPV4_MAX_SIZE: u16 = 64;

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NETLINK_EXT_ACK: libc::c_int = 11;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSG_HDR_LEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const REPLY_LIMIT: Duration = Duration::from_secs(5);

/// A refused request: the errno and the kernel's extended-ack message, if it gave one.
#[derive(Debug)]
pub struct Refused {
    pub error: io::Error,
    pub message: Option<String>,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.message {
            Some(msg) => write!(f, "{} ({msg})", self.error),
            None => write!(f, "{}", self.error),
        }
    }
}

/// Sets u32 attributes of link `dev` with one RTM_NEWLINK request and waits for the ack.
pub fn set_link_u32(dev: &str, attrs: &[(u16, u32)]) -> Result<(), Refused> {
    let index = ifindex(dev).map_err(refused)?;
    let mut attr_bytes = Vec::new();
    for &(kind, value) in attrs {
        push_attr(&mut attr_bytes, kind, &value.to_ne_bytes());
    }
    let socket = Socket::open().map_err(refused)?;
    let reply = socket
        .request(RTM_NEWLINK, NLM_F_ACK, index, &attr_bytes)
        .map_err(refused)?;
    match reply {
        Reply::Ack => Ok(()),
        Reply::Error(e) => Err(e),
        Reply::Message(kind, _) => Err(refused(io::Error::other(format!(
            "unexpected netlink message type {kind} in reply to RTM_NEWLINK"
        )))),
    }
}

/// Reads u32 attribute `kind` of link `dev` (RTM_GETLINK); `None` if the kernel does not
/// report it.
pub fn link_u32(dev: &str, kind: u16) -> io::Result<Option<u32>> {
    let index = ifindex(dev)?;
    let socket = Socket::open()?;
    match socket.request(RTM_GETLINK, 0, index, &[])? {
        Reply::Message(RTM_NEWLINK, payload) => {
            let attrs = payload.get(IFINFOMSG_LEN..).unwrap_or_default();
            Ok(find_attr(attrs, kind).and_then(|v| Some(u32::from_ne_bytes(v.try_into().ok()?))))
        }
        Reply::Message(other, _) => Err(io::Error::other(format!(
            "unexpected netlink message type {other} in reply to RTM_GETLINK"
        ))),
        Reply::Error(e) => Err(io::Error::other(format!("RTM_GETLINK {dev}: {e}"))),
        Reply::Ack => Err(io::Error::other("RTM_GETLINK answered by a bare ack")),
    }
}

fn refused(error: io::Error) -> Refused {
    Refused {
        error,
        message: None,
    }
}

fn ifindex(dev: &str) -> io::Result<i32> {
    let name = CString::new(dev).map_err(io::Error::other)?;
    // SAFETY: `name` is a valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::other(format!("no interface {dev}")));
    }
    i32::try_from(index).map_err(io::Error::other)
}

fn push_attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend((len as u16).to_ne_bytes());
    buf.extend(kind.to_ne_bytes());
    buf.extend(value);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// The value of the first attribute of type `kind` in a run of netlink attributes.
fn find_attr(mut attrs: &[u8], kind: u16) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        // The top two bits are the nested and byte-order flags.
        let this = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if this == kind {
            return Some(&attrs[4..len]);
        }
        attrs = attrs.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    None
}

enum Reply {
    Ack,
    Error(Refused),
    /// Message type and payload (after the netlink header).
    Message(u16, Vec<u8>),
}

struct Socket(OwnedFd);

impl Socket {
    fn open() -> io::Result<Socket> {
        // SAFETY: plain syscall.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let socket = Socket(unsafe { OwnedFd::from_raw_fd(fd) });
        // Without it a refusal is a bare errno; older kernels ignore the option.
        socket.set_option(libc::SOL_NETLINK, NETLINK_EXT_ACK, &1i32);
        let timeout = libc::timeval {
            tv_sec: REPLY_LIMIT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        if !socket.set_option(libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout) {
            return Err(io::Error::last_os_error());
        }
        Ok(socket)
    }

    fn set_option<T>(&self, level: libc::c_int, name: libc::c_int, value: &T) -> bool {
        // SAFETY: `value` is valid for size_of::<T>() bytes.
        let rc = unsafe {
            libc::setsockopt(
                self.0.as_raw_fd(),
                level,
                name,
                (value as *const T).cast(),
                std::mem::size_of::<T>() as libc::socklen_t,
            )
        };
        rc == 0
    }

    /// Sends one link request (ifinfomsg for `index`, then `attrs`) and returns the
    /// kernel's answer to it.
    fn request(&self, kind: u16, flags: u16, index: i32, attrs: &[u8]) -> io::Result<Reply> {
        const SEQ: u32 = 1;
        let len = NLMSG_HDR_LEN + IFINFOMSG_LEN + attrs.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend((len as u32).to_ne_bytes());
        msg.extend(kind.to_ne_bytes());
        msg.extend((NLM_F_REQUEST | flags).to_ne_bytes());
        msg.extend(SEQ.to_ne_bytes());
        msg.extend(0u32.to_ne_bytes());
        // ifinfomsg: family (AF_UNSPEC), pad, type, index, flags, change.
        msg.extend([0u8, 0]);
        msg.extend(0u16.to_ne_bytes());
        msg.extend(index.to_ne_bytes());
        msg.extend(0u32.to_ne_bytes());
        msg.extend(0u32.to_ne_bytes());
        msg.extend(attrs);

        // SAFETY: sockaddr_nl is plain data; all-zero (pid 0) addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: buffer and address are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&raw const kernel).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent != msg.len() as isize {
            return Err(io::Error::last_os_error());
        }

        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: `buf` is valid for its length.
            let n = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            if n > buf.len() {
                return Err(io::Error::other(format!(
                    "netlink reply of {n} bytes truncated"
                )));
            }
            let mut rest = &buf[..n];
            while rest.len() >= NLMSG_HDR_LEN {
                let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let flags = u16::from_ne_bytes([rest[6], rest[7]]);
                let seq = u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
                if len < NLMSG_HDR_LEN || len > rest.len() {
                    return Err(io::Error::other(format!(
                        "bad netlink message length {len}"
                    )));
                }
                let payload = &rest[NLMSG_HDR_LEN..len];
                rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
                if seq != SEQ {
                    continue;
                }
                if kind == NLMSG_ERROR {
                    return Ok(parse_error(payload, flags));
                }
                return Ok(Reply::Message(kind, payload.to_vec()));
            }
        }
    }
}

/// An NLMSG_ERROR payload: error code 0 is the ack.
fn parse_error(payload: &[u8], flags: u16) -> Reply {
    let Some(code) = payload.get(0..4) else {
        return Reply::Error(refused(io::Error::other("short NLMSG_ERROR")));
    };
    let code = i32::from_ne_bytes(code.try_into().expect("4 bytes"));
    if code == 0 {
        return Reply::Ack;
    }
    let mut message = None;
    if flags & NLM_F_ACK_TLVS != 0 {
        // The error code, then the request: its header only when capped.
        let echoed = if flags & NLM_F_CAPPED != 0 {
            NLMSG_HDR_LEN
        } else {
            payload
                .get(4..8)
                .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")) as usize)
                .unwrap_or(NLMSG_HDR_LEN)
        };
        let tlvs = payload
            .get((4 + echoed).next_multiple_of(4)..)
            .unwrap_or_default();
        message = find_attr(tlvs, NLMSGERR_ATTR_MSG).map(|text| {
            String::from_utf8_lossy(text)
                .trim_end_matches('\0')
                .to_string()
        });
    }
    Reply::Error(Refused {
        error: io::Error::from_raw_os_error(-code),
        message,
    })
}
