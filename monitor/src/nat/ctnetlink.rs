//! The kernel's connection tracking over netlink (ctnetlink): a dump of the table and its
//! new/destroy events, reduced to the two tuples of each entry.
//!
//! Written against the netlink ABI with libc: no maintained crate parses ctnetlink
//! events, and the agent needs only the tuples.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use monitor_common::parse::{IPPROTO_ICMP, IPPROTO_ICMPV6, icmp_ports};

/// One direction's tuple of a conntrack entry: the packet as the kernel expects to see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Ports; for ICMP the type and counterpart type (or code) as the flow key has them.
    pub sport: u16,
    pub dport: u16,
}

/// What a message said about one conntrack entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The kernel's id of the entry: a later entry with the same tuples has another.
    pub id: u32,
    pub proto: u8,
    /// As the originator sent it (before any translation).
    pub orig: Tuple,
    /// As the reply is expected (after translation, reversed).
    pub reply: Tuple,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    New(Entry),
    Destroy(Entry),
}

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NFNLGRP_CONNTRACK_NEW: u32 = 1;
const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLA_TYPE_MASK: u16 = 0x3fff;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ID: u16 = 12;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
const CTA_PROTO_ICMPV6_CODE: u16 = 9;

/// Receive buffer asked for the event socket: a burst of new connections between two
/// polls must fit, or the table is dumped again.
const EVENT_RCVBUF: i32 = 8 << 20;

/// A non-blocking netlink socket of the netfilter family.
struct Socket(OwnedFd);

impl Socket {
    fn open(groups: u32) -> io::Result<Socket> {
        // SAFETY: plain socket(2); the descriptor is owned from here on.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
        let socket = Socket(unsafe { OwnedFd::from_raw_fd(fd) });
        // SAFETY: sockaddr_nl is plain data; zero is a valid start.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = groups;
        // SAFETY: `addr` is a valid sockaddr_nl of the size given.
        let ret = unsafe {
            libc::bind(
                socket.0.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(socket)
    }

    fn set_rcvbuf(&self, bytes: i32) {
        for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            // SAFETY: an int option of the right size.
            let ret = unsafe {
                libc::setsockopt(
                    self.0.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    (&raw const bytes).cast(),
                    size_of::<i32>() as u32,
                )
            };
            if ret == 0 {
                return;
            }
        }
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: `msg` is valid for its length; the kernel is the default destination.
        let ret = unsafe { libc::send(self.0.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// One datagram into `buf`; `None` when nothing is waiting.
    fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            io::ErrorKind::Interrupted => self.recv(buf),
            _ => Err(err),
        }
    }
}

/// The events of the conntrack table, read without blocking.
pub struct Events {
    socket: Socket,
    buf: Vec<u8>,
}

/// Events were lost (the receive buffer overflowed): what is known must be re-read whole.
#[derive(Debug)]
pub struct Overrun;

impl Events {
    /// Subscribes to new and destroyed entries. Needs `CAP_NET_ADMIN`.
    pub fn subscribe() -> io::Result<Events> {
        let groups = (1 << (NFNLGRP_CONNTRACK_NEW - 1)) | (1 << (NFNLGRP_CONNTRACK_DESTROY - 1));
        let socket = Socket::open(groups)?;
        socket.set_rcvbuf(EVENT_RCVBUF);
        Ok(Events {
            socket,
            buf: vec![0; 1 << 16],
        })
    }

    /// Hands every event waiting now to `each`; `Err(Overrun)` when some were lost.
    pub fn drain(&mut self, mut each: impl FnMut(Event)) -> io::Result<Result<(), Overrun>> {
        loop {
            let n = match self.socket.recv(&mut self.buf) {
                Ok(Some(n)) => n,
                Ok(None) => return Ok(Ok(())),
                Err(err) if err.raw_os_error() == Some(libc::ENOBUFS) => return Ok(Err(Overrun)),
                Err(err) => return Err(err),
            };
            for (kind, payload) in messages(&self.buf[..n]) {
                let Some(entry) = parse_entry(payload) else {
                    continue;
                };
                match kind & 0xff {
                    IPCTNL_MSG_CT_NEW => each(Event::New(entry)),
                    IPCTNL_MSG_CT_DELETE => each(Event::Destroy(entry)),
                    _ => {}
                }
            }
        }
    }
}

/// Every entry of the conntrack table (IPv4 and IPv6). Needs `CAP_NET_ADMIN`.
pub fn dump(mut each: impl FnMut(Entry)) -> io::Result<()> {
    let socket = Socket::open(0)?;
    let mut request = Vec::with_capacity(NLMSG_HDRLEN + NFGENMSG_LEN);
    let len = (NLMSG_HDRLEN + NFGENMSG_LEN) as u32;
    request.extend_from_slice(&len.to_ne_bytes());
    request.extend_from_slice(&(NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET).to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: AF_UNSPEC (every family), version 0, resource id 0.
    request.extend_from_slice(&[0, 0, 0, 0]);
    socket.send(&request)?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match socket.recv(&mut buf)? {
            Some(n) => n,
            None => {
                wait_readable(&socket)?;
                continue;
            }
        };
        for (kind, payload) in messages(&buf[..n]) {
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let code = payload
                        .get(..4)
                        .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
                    if code == 0 {
                        return Ok(());
                    }
                    return Err(io::Error::from_raw_os_error(-code));
                }
                _ => {
                    if let Some(entry) = parse_entry(payload) {
                        each(entry);
                    }
                }
            }
        }
    }
}

fn wait_readable(socket: &Socket) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: socket.0.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // A dump the kernel does not answer within 5 s is not coming.
    // SAFETY: one valid pollfd.
    match unsafe { libc::poll(&raw mut pfd, 1, 5_000) } {
        n if n > 0 => Ok(()),
        0 => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "conntrack dump: no answer",
        )),
        _ => Err(io::Error::last_os_error()),
    }
}

/// The messages of one datagram as (type, payload after the netlink header).
fn messages(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let header = buf.get(..NLMSG_HDRLEN)?;
        let len = u32::from_ne_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(header[4..6].try_into().expect("2 bytes"));
        if len < NLMSG_HDRLEN || len > buf.len() {
            return None;
        }
        let payload = &buf[NLMSG_HDRLEN..len];
        buf = buf.get(align4(len)..).unwrap_or_default();
        Some((kind, payload))
    })
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Attributes as (type without flags, value).
fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let header = buf.get(..4)?;
        let len = u16::from_ne_bytes([header[0], header[1]]) as usize;
        let kind = u16::from_ne_bytes([header[2], header[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            return None;
        }
        let value = &buf[4..len];
        buf = buf.get(align4(len)..).unwrap_or_default();
        Some((kind, value))
    })
}

fn attribute(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attributes(buf).find(|(k, _)| *k == kind).map(|(_, v)| v)
}

/// A ctnetlink message's payload (nfgenmsg, then attributes) reduced to its tuples.
fn parse_entry(payload: &[u8]) -> Option<Entry> {
    let attrs = payload.get(NFGENMSG_LEN..)?;
    let (proto, orig) = parse_tuple(attribute(attrs, CTA_TUPLE_ORIG)?)?;
    let (_, mut reply) = parse_tuple(attribute(attrs, CTA_TUPLE_REPLY)?)?;
    if matches!(proto, IPPROTO_ICMP | IPPROTO_ICMPV6) {
        // The reply of an echo request is an echo reply: key both tuples by the request.
        reply.sport = orig.dport;
        reply.dport = orig.sport;
    }
    let id = attribute(attrs, CTA_ID)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, u32::from_be_bytes);
    Some(Entry {
        id,
        proto,
        orig,
        reply,
    })
}

fn parse_tuple(tuple: &[u8]) -> Option<(u8, Tuple)> {
    let ip = attribute(tuple, CTA_TUPLE_IP)?;
    let (src, dst) =
        if let (Some(s), Some(d)) = (attribute(ip, CTA_IP_V4_SRC), attribute(ip, CTA_IP_V4_DST)) {
            let v4 = |b: &[u8]| -> Option<IpAddr> {
                Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(b).ok()?)))
            };
            (v4(s)?, v4(d)?)
        } else {
            let v6 = |b: &[u8]| -> Option<IpAddr> {
                Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?)))
            };
            (
                v6(attribute(ip, CTA_IP_V6_SRC)?)?,
                v6(attribute(ip, CTA_IP_V6_DST)?)?,
            )
        };
    let l4 = attribute(tuple, CTA_TUPLE_PROTO)?;
    let proto = *attribute(l4, CTA_PROTO_NUM)?.first()?;
    let be16 = |kind| {
        attribute(l4, kind)
            .and_then(|b| <[u8; 2]>::try_from(b).ok())
            .map_or(0, u16::from_be_bytes)
    };
    let byte = |kind| attribute(l4, kind).and_then(|b| b.first().copied());
    let (sport, dport) = match proto {
        IPPROTO_ICMP => icmp_ports(
            proto,
            byte(CTA_PROTO_ICMP_TYPE)?,
            byte(CTA_PROTO_ICMP_CODE)?,
        ),
        IPPROTO_ICMPV6 => icmp_ports(
            proto,
            byte(CTA_PROTO_ICMPV6_TYPE)?,
            byte(CTA_PROTO_ICMPV6_CODE)?,
        ),
        _ => (be16(CTA_PROTO_SRC_PORT), be16(CTA_PROTO_DST_PORT)),
    };
    Some((
        proto,
        Tuple {
            src,
            dst,
            sport,
            dport,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        out.resize(align4(out.len()), 0);
        out
    }

    fn nested(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(kind | 0x8000, &parts.concat())
    }

    fn tuple(kind: u16, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        nested(
            kind,
            &[
                nested(
                    CTA_TUPLE_IP,
                    &[attr(CTA_IP_V4_SRC, &src), attr(CTA_IP_V4_DST, &dst)],
                ),
                nested(
                    CTA_TUPLE_PROTO,
                    &[
                        attr(CTA_PROTO_NUM, &[6]),
                        attr(CTA_PROTO_SRC_PORT, &sport.to_be_bytes()),
                        attr(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
                    ],
                ),
            ],
        )
    }

    #[test]
    fn a_masqueraded_entry_gives_both_tuples() {
        let mut payload = vec![2, 0, 0, 0];
        payload.extend(attr(CTA_ID, &7u32.to_be_bytes()));
        payload.extend(tuple(
            CTA_TUPLE_ORIG,
            [198, 18, 1, 2],
            [203, 0, 113, 2],
            40000,
            443,
        ));
        payload.extend(tuple(
            CTA_TUPLE_REPLY,
            [203, 0, 113, 2],
            [203, 0, 113, 1],
            443,
            61000,
        ));
        let entry = parse_entry(&payload).expect("an entry");
        assert_eq!((entry.id, entry.proto), (7, 6));
        assert_eq!(entry.orig.src, IpAddr::from([198, 18, 1, 2]));
        assert_eq!((entry.orig.sport, entry.orig.dport), (40000, 443));
        assert_eq!(entry.reply.dst, IpAddr::from([203, 0, 113, 1]));
        assert_eq!((entry.reply.sport, entry.reply.dport), (443, 61000));
    }

    #[test]
    fn a_truncated_message_is_no_entry() {
        let mut payload = vec![2, 0, 0, 0];
        payload.extend(tuple(CTA_TUPLE_ORIG, [1, 2, 3, 4], [5, 6, 7, 8], 1, 2));
        assert_eq!(parse_entry(&payload), None);
        let whole_len = payload.len();
        assert_eq!(parse_entry(&payload[..whole_len - 3]), None);
    }
}
