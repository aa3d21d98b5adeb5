//! DNS messages handed from the kernel programs to the agent through the `DNS_EVENTS`
//! ring buffer: a fixed header, then a bounded copy of the message.

use crate::parse::{Frame, IPPROTO_TCP, IPPROTO_UDP, PacketInfo};

pub const DNS_PORT: u16 = 53;

/// Bytes of a message copied at most: more than the 512 of plain DNS over UDP and the
/// 1232 that EDNS deployments advertise, so nearly every message arrives whole.
pub const DNS_CAPTURE_MAX: usize = 1280;

/// Ring buffer size in bytes (a power of two, as the kernel requires): about 790 events.
pub const DNS_RING_BYTES: u32 = 1 << 20;

/// Bits of [`DnsEventHeader::flags`].
pub mod flags {
    /// An IP fragment: the message continues in packets that carry no UDP header.
    pub const FRAGMENT: u8 = 0x01;
    /// The TCP length prefix claims more than this segment carries.
    pub const TCP_PARTIAL: u8 = 0x02;
    /// The copy failed (the kernel could not read the packet): no bytes follow.
    pub const COPY_FAILED: u8 = 0x04;
}

/// Which hook saw the packet.
pub const DIRECTION_INGRESS: u8 = 0;
pub const DIRECTION_EGRESS: u8 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DnsEventHeader {
    /// `bpf_ktime_get_ns` when the packet was seen.
    pub ts_ns: u64,
    /// IPv4 addresses sit in the first four bytes, the rest zero.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Host byte order.
    pub sport: u16,
    pub dport: u16,
    pub ifindex: u32,
    /// 4 or 6.
    pub family: u8,
    /// 6 (TCP) or 17 (UDP).
    pub proto: u8,
    /// [`DIRECTION_INGRESS`] or [`DIRECTION_EGRESS`].
    pub direction: u8,
    pub flags: u8,
    /// Length of the message: the UDP payload in this packet, or the TCP length prefix.
    pub msg_len: u16,
    /// Bytes copied after the header: at most [`DNS_CAPTURE_MAX`].
    pub captured_len: u16,
}

/// One ring buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DnsEvent {
    pub header: DnsEventHeader,
    pub data: [u8; DNS_CAPTURE_MAX],
}

/// Where a DNS message sits in a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsSpan {
    /// Offset of the message in the frame (after the TCP length prefix).
    pub offset: u32,
    /// Message length as the packet claims it.
    pub msg_len: u32,
    /// Bytes of it present in this packet.
    pub present: u32,
    pub flags: u8,
}

/// Whether this packet is a candidate for a DNS copy: the one test every packet pays.
#[inline(always)]
pub fn is_dns_port(info: &PacketInfo) -> bool {
    info.sport == DNS_PORT || info.dport == DNS_PORT
}

/// Locates the DNS message in a UDP or TCP packet to or from port 53; `frame_len` is the
/// whole frame (L2 included). `None` when the packet carries no message (a bare TCP ACK,
/// another protocol).
#[inline(always)]
pub fn dns_span<F: Frame + ?Sized>(f: &F, info: &PacketInfo, frame_len: u32) -> Option<DnsSpan> {
    let payload_off = info.l2_len + info.hdr_len;
    let (_, _, payload) = info.wire_counts(frame_len, 1);
    let payload = payload as u32;
    match info.proto {
        IPPROTO_UDP => {
            if payload == 0 {
                return None;
            }
            // The UDP length covers the whole datagram: more than this packet carries
            // means the rest is in later IP fragments.
            let udp: [u8; 8] = f.load(payload_off as usize - 8)?;
            let udp_len = u16::from_be_bytes([udp[4], udp[5]]) as u32;
            let (msg_len, flags) = if udp_len > payload + 8 {
                (udp_len.saturating_sub(8), flags::FRAGMENT)
            } else {
                (payload, 0)
            };
            Some(DnsSpan {
                offset: payload_off,
                msg_len,
                present: payload,
                flags,
            })
        }
        IPPROTO_TCP => {
            if payload <= 2 {
                return None;
            }
            let prefix: [u8; 2] = f.load(payload_off as usize)?;
            let msg_len = u16::from_be_bytes(prefix) as u32;
            let present = payload - 2;
            let (present, flags) = if msg_len > present {
                (present, flags::TCP_PARTIAL)
            } else {
                (msg_len, 0)
            };
            Some(DnsSpan {
                offset: payload_off + 2,
                msg_len,
                present,
                flags,
            })
        }
        _ => None,
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain #[repr(C)] data without padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::DnsEventHeader {}
}
