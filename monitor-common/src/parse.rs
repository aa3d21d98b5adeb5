//! The packet parser, written once for the kernel programs (over packet pointers) and the
//! agent's tests (over byte slices).
//!
//! Offsets stay bounded at every step (at most two VLAN tags, IPv4 options up to 40 bytes,
//! a fixed number of IPv6 extension headers) so the verifier can prove every read.

use crate::{
    flow::{DIR_A_TO_B, DIR_B_TO_A, FlowKey},
    stats,
};

/// Read access to a frame.
pub trait Frame {
    /// The `N` bytes at `off`, or `None` when the frame is shorter.
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]>;
}

impl Frame for [u8] {
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        self.get(off..off.checked_add(N)?)?.try_into().ok()
    }
}

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

const ETH_HLEN: usize = 14;
const MAX_VLAN_TAGS: usize = 2;
/// Extension headers walked before a packet counts as `ipv6_ext_limit`.
pub const MAX_IPV6_EXT: usize = 8;

/// What one packet tells about its connection.
///
/// The addresses come first in an 8-byte-aligned struct, as in [`FlowKey`]: the BPF target
/// reads and copies them a word at a time, where it would go a byte at a time in a struct
/// of smaller alignment.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PacketInfo {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub family: u8,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// Ethernet header and VLAN tags; 0 on a device without a link-layer header.
    pub l2_len: u32,
    /// Length of the IP packet by its header (IPv4 total length, IPv6 payload length + 40);
    /// 0 where the header does not say (BIG TCP aggregates, IPv6 jumbograms).
    pub ip_len: u32,
    /// IP header with options or extension headers, plus the L4 header: what every
    /// segment of an aggregate repeats.
    pub hdr_len: u32,
    pub tcp_flags: u8,
}

impl PacketInfo {
    /// The connection's map key, and which direction of it this packet travels.
    #[inline(always)]
    pub fn flow_key(&self) -> (FlowKey, usize) {
        let src_first = endpoint_le(self.src, self.sport, self.dst, self.dport);
        let (a, pa, b, pb, dir) = if src_first {
            (self.src, self.sport, self.dst, self.dport, DIR_A_TO_B)
        } else {
            (self.dst, self.dport, self.src, self.sport, DIR_B_TO_A)
        };
        let key = FlowKey {
            addr_a: a,
            addr_b: b,
            port_a: pa,
            port_b: pb,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        };
        (key, dir)
    }

    /// Whether a single packet (not an aggregate, whose header may say anything) claims
    /// more IP bytes than its `frame_len`-byte frame holds: a lie, or a frame cut short.
    #[inline(always)]
    pub fn ip_len_exceeds_frame(&self, frame_len: u32, segs: u32) -> bool {
        segs <= 1 && self.ip_len > frame_len.saturating_sub(self.l2_len)
    }

    /// Packets, IP bytes and payload bytes on the wire for a frame of `frame_len` bytes
    /// (L2 included) that stands for `segs` segments (GSO/GRO), each repeating the headers.
    /// A single packet counts its header's length, unless that exceeds the frame: then what
    /// the frame holds.
    #[inline(always)]
    pub fn wire_counts(&self, frame_len: u32, segs: u32) -> (u64, u64, u64) {
        let segs = if segs == 0 { 1 } else { segs };
        let hdr = self.hdr_len as u64;
        if segs == 1 && self.ip_len != 0 && !self.ip_len_exceeds_frame(frame_len, segs) {
            // The header's length leaves out Ethernet padding.
            let ip = self.ip_len as u64;
            return (1, ip, ip.saturating_sub(hdr));
        }
        let ip_one = (frame_len as u64).saturating_sub(self.l2_len as u64);
        let ip = ip_one + (segs as u64 - 1) * hdr;
        (segs as u64, ip, ip_one.saturating_sub(hdr))
    }
}

#[inline(always)]
fn be16(b0: u8, b1: u8) -> u16 {
    ((b0 as u16) << 8) | b1 as u16
}

/// (a, pa) <= (b, pb), addresses compared as big-endian numbers, then ports.
#[inline(always)]
fn endpoint_le(a: [u8; 16], pa: u16, b: [u8; 16], pb: u16) -> bool {
    let (a, b) = (be_words(a), be_words(b));
    if a[0] != b[0] {
        return a[0] < b[0];
    }
    if a[1] != b[1] {
        return a[1] < b[1];
    }
    pa <= pb
}

/// An address as two big-endian numbers, high first: two word loads and byte swaps where
/// the address is 8-byte aligned, as in [`PacketInfo`].
#[inline(always)]
fn be_words(addr: [u8; 16]) -> [u64; 2] {
    // SAFETY: any 16 bytes are two valid u64s.
    let words = unsafe { core::mem::transmute::<[u8; 16], [u64; 2]>(addr) };
    [u64::from_be(words[0]), u64::from_be(words[1])]
}

/// Zeek's ICMP "ports": the type, and the counterpart type for request/reply pairs (so a
/// request and its reply share a connection) or else the code.
#[inline(always)]
pub fn icmp_ports(proto: u8, icmp_type: u8, code: u8) -> (u16, u16) {
    let counterpart = if proto == IPPROTO_ICMP {
        match icmp_type {
            8 => Some(0),
            0 => Some(8),
            13 => Some(14),
            14 => Some(13),
            15 => Some(16),
            16 => Some(15),
            17 => Some(18),
            18 => Some(17),
            10 => Some(9),
            9 => Some(10),
            _ => None,
        }
    } else {
        match icmp_type {
            128 => Some(129),
            129 => Some(128),
            130 => Some(131),
            131 => Some(130),
            133 => Some(134),
            134 => Some(133),
            135 => Some(136),
            136 => Some(135),
            139 => Some(140),
            140 => Some(139),
            _ => None,
        }
    };
    (icmp_type as u16, counterpart.unwrap_or(code) as u16)
}

/// What a packet starts with on its device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// An Ethernet header, of which the kernel has already moved `stripped_tags` outer
    /// VLAN tags out of the data (an skb's `vlan_present` on receive): they count towards
    /// the two-tag limit.
    Ethernet { stripped_tags: usize },
    /// The IP header, on a device without a link-layer header (tun, WireGuard, PPP, IP
    /// tunnels); `protocol` is the EtherType the kernel gives the packet (an skb's
    /// `protocol`, host order).
    Ip { protocol: u16 },
}

/// Parses a packet as its device frames it; the error is the `stats` slot of the reason
/// it failed.
#[inline(always)]
pub fn parse_packet<F: Frame + ?Sized>(f: &F, link: Link) -> Result<PacketInfo, u32> {
    let (off, ethertype) = match link {
        Link::Ethernet { stripped_tags } => ethernet(f, stripped_tags)?,
        Link::Ip { protocol } => (0, protocol),
    };
    parse_ip(f, off, ethertype)
}

/// Parses an Ethernet frame.
#[inline(always)]
pub fn parse_frame<F: Frame + ?Sized>(f: &F) -> Result<PacketInfo, u32> {
    parse_frame_after_tags(f, 0)
}

/// Like [`parse_frame`], for a frame whose outer `stripped_tags` VLAN tags the kernel has
/// already moved out of the data.
#[inline(always)]
pub fn parse_frame_after_tags<F: Frame + ?Sized>(
    f: &F,
    stripped_tags: usize,
) -> Result<PacketInfo, u32> {
    parse_packet(f, Link::Ethernet { stripped_tags })
}

/// Parses a packet that starts at its IP header.
#[inline(always)]
pub fn parse_l3<F: Frame + ?Sized>(f: &F, protocol: u16) -> Result<PacketInfo, u32> {
    parse_packet(f, Link::Ip { protocol })
}

/// The L3 offset (Ethernet header and VLAN tags) and the EtherType found there.
#[inline(always)]
fn ethernet<F: Frame + ?Sized>(f: &F, stripped_tags: usize) -> Result<(usize, u16), u32> {
    let eth: [u8; ETH_HLEN] = f.load(0).ok_or(stats::TRUNCATED_ETHERNET)?;
    let mut ethertype = be16(eth[12], eth[13]);
    let mut off = ETH_HLEN;
    for tag in 0..MAX_VLAN_TAGS {
        if tag + stripped_tags >= MAX_VLAN_TAGS
            || (ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD)
        {
            break;
        }
        let tag: [u8; 4] = f.load(off).ok_or(stats::TRUNCATED_VLAN)?;
        ethertype = be16(tag[2], tag[3]);
        off += 4;
    }
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        return Err(stats::VLAN_TOO_DEEP);
    }
    Ok((off, ethertype))
}

/// The IP packet at `off` (the L2 length) of EtherType `ethertype`.
#[inline(always)]
fn parse_ip<F: Frame + ?Sized>(f: &F, off: usize, ethertype: u16) -> Result<PacketInfo, u32> {
    let mut info = PacketInfo {
        l2_len: off as u32,
        ..PacketInfo::default()
    };
    let (l4_off, first_fragment) = match ethertype {
        ETH_P_IPV4 => parse_ipv4(f, off, &mut info)?,
        ETH_P_IPV6 => parse_ipv6(f, off, &mut info)?,
        _ => return Err(stats::NOT_IP),
    };
    info.hdr_len = (l4_off - off) as u32;
    if first_fragment {
        parse_l4(f, l4_off, &mut info)?;
    }
    Ok(info)
}

/// Returns the L4 offset and whether the L4 header is there (not a later fragment).
#[inline(always)]
fn parse_ipv4<F: Frame + ?Sized>(
    f: &F,
    off: usize,
    info: &mut PacketInfo,
) -> Result<(usize, bool), u32> {
    let h: [u8; 20] = f.load(off).ok_or(stats::TRUNCATED_IPV4)?;
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return Err(stats::BAD_IPV4_HEADER);
    }
    let tot_len = be16(h[2], h[3]) as usize;
    if tot_len != 0 && tot_len < ihl {
        return Err(stats::BAD_IPV4_HEADER);
    }
    // Options: the whole header must be there.
    let _: [u8; 1] = f.load(off + ihl - 1).ok_or(stats::TRUNCATED_IPV4)?;
    info.family = 4;
    info.proto = h[9];
    info.ip_len = tot_len as u32;
    info.src[..4].copy_from_slice(&h[12..16]);
    info.dst[..4].copy_from_slice(&h[16..20]);
    let frag_offset = be16(h[6], h[7]) & 0x1fff;
    Ok((off + ihl, frag_offset == 0))
}

#[inline(always)]
fn parse_ipv6<F: Frame + ?Sized>(
    f: &F,
    off: usize,
    info: &mut PacketInfo,
) -> Result<(usize, bool), u32> {
    let h: [u8; 8] = f.load(off).ok_or(stats::TRUNCATED_IPV6)?;
    info.src = f.load(off + 8).ok_or(stats::TRUNCATED_IPV6)?;
    info.dst = f.load(off + 24).ok_or(stats::TRUNCATED_IPV6)?;
    let payload_len = be16(h[4], h[5]) as u32;
    info.family = 6;
    info.ip_len = if payload_len == 0 {
        0
    } else {
        payload_len + 40
    };
    let mut next = h[6];
    let mut off = off + 40;
    let mut first_fragment = true;
    for _ in 0..MAX_IPV6_EXT {
        match next {
            // Hop-by-hop, routing, destination options: length in 8-octet units.
            0 | 43 | 60 => {
                let e: [u8; 2] = f.load(off).ok_or(stats::TRUNCATED_IPV6_EXT)?;
                next = e[0];
                off += (e[1] as usize + 1) * 8;
            }
            44 => {
                let e: [u8; 8] = f.load(off).ok_or(stats::TRUNCATED_IPV6_EXT)?;
                next = e[0];
                if be16(e[2], e[3]) >> 3 != 0 {
                    first_fragment = false;
                }
                off += 8;
            }
            // Authentication header: length in 4-octet units, minus 2.
            51 => {
                let e: [u8; 2] = f.load(off).ok_or(stats::TRUNCATED_IPV6_EXT)?;
                next = e[0];
                off += (e[1] as usize + 2) * 4;
            }
            _ => break,
        }
    }
    if matches!(next, 0 | 43 | 44 | 51 | 60) {
        return Err(stats::IPV6_EXT_LIMIT);
    }
    // The last extension header must be whole, whatever follows it.
    let _: [u8; 1] = f.load(off - 1).ok_or(stats::TRUNCATED_IPV6_EXT)?;
    info.proto = next;
    Ok((off, first_fragment))
}

#[inline(always)]
fn parse_l4<F: Frame + ?Sized>(f: &F, off: usize, info: &mut PacketInfo) -> Result<(), u32> {
    match info.proto {
        IPPROTO_TCP => {
            let t: [u8; 20] = f.load(off).ok_or(stats::TRUNCATED_TCP)?;
            let doff = ((t[12] >> 4) as u32) * 4;
            if doff < 20 {
                return Err(stats::BAD_TCP_HEADER);
            }
            // Options included: aggregates repeat the whole header per segment.
            let _: [u8; 1] = f
                .load(off + doff as usize - 1)
                .ok_or(stats::TRUNCATED_TCP)?;
            info.sport = be16(t[0], t[1]);
            info.dport = be16(t[2], t[3]);
            info.tcp_flags = t[13];
            info.hdr_len += doff;
        }
        IPPROTO_UDP => {
            let u: [u8; 8] = f.load(off).ok_or(stats::TRUNCATED_UDP)?;
            info.sport = be16(u[0], u[1]);
            info.dport = be16(u[2], u[3]);
            info.hdr_len += 8;
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let i: [u8; 8] = f.load(off).ok_or(stats::TRUNCATED_ICMP)?;
            (info.sport, info.dport) = icmp_ports(info.proto, i[0], i[1]);
            info.hdr_len += 8;
        }
        _ => {}
    }
    Ok(())
}
