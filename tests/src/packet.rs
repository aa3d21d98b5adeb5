//! Crafted Ethernet frames for tests (and for pcap files that replay them).
//!
//! A [`Frame`] is a builder: start with [`Frame::eth`], stack layers in wire order, then
//! [`Frame::build`] the bytes. Lengths and checksums are filled in: the IPv4 total
//! length, IHL and header checksum, the IPv6 payload length, the TCP data offset, the UDP
//! length, and the TCP/UDP/ICMP/ICMPv6 checksums of unfragmented packets. Every length can
//! be overridden to build broken headers on purpose.
//!
//! ```
//! use tests::packet::Frame;
//! let f = Frame::eth()
//!     .vlan(0x88a8, 100)
//!     .vlan(0x8100, 200)
//!     .ipv4([10, 0, 0, 1], [10, 0, 0, 2])
//!     .tcp(40000, 443, 0x02)
//!     .payload_len(100);
//! let layout = f.layout();
//! assert_eq!(layout.l2_len, 22);
//! assert_eq!(layout.ip_len, 20 + 20 + 100);
//! assert_eq!(layout.payload_len, 100);
//! assert_eq!(f.build().len(), 22 + 140);
//! // The same frame cut inside its TCP header, as a short capture would see it:
//! assert_eq!(f.clone().truncate(layout.l4_off + 10).build().len(), layout.l4_off + 10);
//! ```
//!
//! The [`Layout`] of a frame tells a test what to expect from the parser: offsets of every
//! layer (to cut a frame inside one), the IP length (`ip_bytes` of one packet), the header
//! length every segment repeats, and the L4 payload length (`bytes`).

use std::net::{Ipv4Addr, Ipv6Addr};

/// Ethernet header: two MAC addresses and the EtherType.
pub const ETH_HLEN: usize = 14;
/// One 802.1Q / 802.1ad tag.
pub const VLAN_HLEN: usize = 4;
/// IPv4 header without options.
pub const IPV4_HLEN: usize = 20;
/// IPv4 options at most (IHL 15).
pub const IPV4_MAX_OPTIONS: usize = 40;
/// IPv6 fixed header.
pub const IPV6_HLEN: usize = 40;
/// TCP header without options.
pub const TCP_HLEN: usize = 20;
/// TCP options at most (data offset 15).
pub const TCP_MAX_OPTIONS: usize = 40;
pub const UDP_HLEN: usize = 8;
/// ICMP and ICMPv6: type, code, checksum and the 4-byte rest of header (id/sequence).
pub const ICMP_HLEN: usize = 8;
/// Smallest Ethernet frame without its FCS: shorter ones get padding on the wire.
pub const ETH_MIN_FRAME: usize = 60;

/// EtherTypes.
pub mod ethertype {
    pub const IPV4: u16 = 0x0800;
    pub const ARP: u16 = 0x0806;
    pub const IPV6: u16 = 0x86dd;
    /// 802.1Q VLAN tag (customer tag, the inner one in QinQ).
    pub const VLAN: u16 = 0x8100;
    /// 802.1ad service tag (the outer one in QinQ).
    pub const QINQ: u16 = 0x88a8;
    /// IEEE local experimental: what a frame without an IP layer carries by default.
    pub const LOCAL_EXPERIMENTAL: u16 = 0x88b5;
}

/// IP protocol numbers, IPv6 extension header kinds among them.
pub mod ipproto {
    pub const HOPOPTS: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const GRE: u8 = 47;
    pub const AH: u8 = 51;
    pub const ICMPV6: u8 = 58;
    /// IPv6 "no next header": what an IP packet without an L4 layer carries by default.
    pub const NONE: u8 = 59;
    pub const DSTOPTS: u8 = 60;
}

/// TCP flag bits (byte 13 of the header).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
}

/// Where the layers of a built frame sit, and the lengths the parser should report.
///
/// Everything describes the whole frame, before [`Frame::truncate`]: a truncated frame
/// still claims the lengths of the packet it was cut from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Ethernet header and VLAN tags: where the IP header starts.
    pub l2_len: usize,
    /// Offset of the IP header (or of the payload of a frame without IP).
    pub l3_off: usize,
    /// IP header with IPv4 options or IPv6 extension headers.
    pub l3_hdr_len: usize,
    /// Offset of the L4 header (TCP/UDP/ICMP), or of the payload where there is none.
    pub l4_off: usize,
    /// TCP header with options, UDP or ICMP header; 0 for other protocols and for
    /// non-first fragments (they carry no L4 header).
    pub l4_hdr_len: usize,
    /// Offset of the L4 payload.
    pub payload_off: usize,
    /// L4 payload: the `bytes` one packet adds.
    pub payload_len: usize,
    /// The IP packet: IPv4 total length or IPv6 payload length + 40, as built (before any
    /// override of the header's length field). The `ip_bytes` one packet adds.
    pub ip_len: usize,
    /// IP header + L4 header: what every segment of an aggregate repeats
    /// (`PacketInfo::hdr_len`).
    pub hdr_len: usize,
    /// Ethernet padding after the IP packet.
    pub eth_padding: usize,
    /// The whole frame: L2, IP packet and padding.
    pub frame_len: usize,
}

/// An Ethernet frame under construction. See the module documentation.
#[derive(Clone, Debug)]
pub struct Frame {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    vlans: Vec<VlanTag>,
    ethertype: Option<u16>,
    ip: Option<Ip>,
    l4: Option<L4>,
    payload: Vec<u8>,
    eth_padding: usize,
    truncate: Option<usize>,
}

#[derive(Clone, Copy, Debug)]
struct VlanTag {
    tpid: u16,
    tci: u16,
}

#[derive(Clone, Debug)]
enum Ip {
    V4(Ipv4),
    V6(Ipv6),
}

#[derive(Clone, Debug)]
struct Ipv4 {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    ttl: u8,
    options: Vec<u8>,
    /// In 8-byte units.
    frag_offset: u16,
    more_fragments: bool,
    version: u8,
    ihl: Option<u8>,
    total_len: Option<u16>,
}

#[derive(Clone, Debug)]
struct Ipv6 {
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hop_limit: u8,
    ext: Vec<Ext>,
    payload_len: Option<u16>,
}

#[derive(Clone, Copy, Debug)]
struct Ext {
    kind: u8,
    /// Whole header, in bytes.
    len: usize,
    /// Fragment header only: offset in 8-byte units and the M flag.
    frag_offset: u16,
    more_fragments: bool,
}

#[derive(Clone, Debug)]
enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        options: usize,
        data_offset: Option<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    Icmp {
        v6: bool,
        ty: u8,
        code: u8,
    },
    Other(u8),
}

impl L4 {
    fn proto(&self) -> u8 {
        match self {
            L4::Tcp { .. } => ipproto::TCP,
            L4::Udp { .. } => ipproto::UDP,
            L4::Icmp { v6: false, .. } => ipproto::ICMP,
            L4::Icmp { v6: true, .. } => ipproto::ICMPV6,
            L4::Other(proto) => *proto,
        }
    }

    fn header_len(&self) -> usize {
        match self {
            L4::Tcp { options, .. } => TCP_HLEN + options,
            L4::Udp { .. } => UDP_HLEN,
            L4::Icmp { .. } => ICMP_HLEN,
            L4::Other(_) => 0,
        }
    }
}

impl Frame {
    /// An Ethernet frame from 02:00:00:00:00:01 to 02:00:00:00:00:02 with nothing in it
    /// yet. Without an IP layer it carries [`ethertype::LOCAL_EXPERIMENTAL`].
    pub fn eth() -> Self {
        Self {
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            vlans: Vec::new(),
            ethertype: None,
            ip: None,
            l4: None,
            payload: Vec::new(),
            eth_padding: 0,
            truncate: None,
        }
    }

    /// Source and destination MAC addresses.
    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    /// Adds a VLAN tag inside the ones already there: `tpid` is the EtherType that
    /// announces it (0x8100 for 802.1Q, 0x88a8 for an 802.1ad service tag), `vid` its
    /// 12-bit VLAN id. Call it once per tag, outermost first.
    pub fn vlan(mut self, tpid: u16, vid: u16) -> Self {
        assert!(vid < 0x1000, "VLAN id {vid} does not fit in 12 bits");
        self.vlans.push(VlanTag { tpid, tci: vid });
        self
    }

    /// Overrides the EtherType after the VLAN tags (by default that of the IP layer).
    pub fn ethertype(mut self, ethertype: u16) -> Self {
        self.ethertype = Some(ethertype);
        self
    }

    /// An IPv4 header: TTL 64, id 0, no flags, no options.
    pub fn ipv4(mut self, src: impl Into<Ipv4Addr>, dst: impl Into<Ipv4Addr>) -> Self {
        self.ip = Some(Ip::V4(Ipv4 {
            src: src.into(),
            dst: dst.into(),
            id: 0,
            ttl: 64,
            options: Vec::new(),
            frag_offset: 0,
            more_fragments: false,
            version: 4,
            ihl: None,
            total_len: None,
        }));
        self
    }

    /// IPv4 options, padded with zeros (end of option list) to a multiple of 4 bytes; the
    /// IHL grows with them. At most 40 bytes. `&[1; n]` is `n` NOP options.
    pub fn ipv4_options(mut self, options: &[u8]) -> Self {
        let v4 = self.v4("ipv4_options");
        let mut options = options.to_vec();
        options.resize(options.len().next_multiple_of(4), 0);
        assert!(
            options.len() <= IPV4_MAX_OPTIONS,
            "IPv4 options take at most {IPV4_MAX_OPTIONS} bytes, not {}",
            options.len()
        );
        v4.options = options;
        self
    }

    /// Makes the IPv4 packet a fragment: `offset` in 8-byte units, `more` the MF flag.
    /// A fragment at a non-zero offset carries no L4 header: the L4 layer only gives the
    /// protocol number, and the payload follows the IP header.
    pub fn ipv4_fragment(mut self, offset: u16, more: bool) -> Self {
        assert!(
            offset < 0x2000,
            "fragment offset {offset} does not fit in 13 bits"
        );
        let v4 = self.v4("ipv4_fragment");
        v4.frag_offset = offset;
        v4.more_fragments = more;
        self
    }

    /// The IPv4 identification field.
    pub fn ipv4_id(mut self, id: u16) -> Self {
        self.v4("ipv4_id").id = id;
        self
    }

    /// Overrides the version nibble of the IPv4 header (for broken headers).
    pub fn ipv4_version(mut self, version: u8) -> Self {
        assert!(version < 16, "the version is a nibble");
        self.v4("ipv4_version").version = version;
        self
    }

    /// Overrides the IHL nibble (in 4-byte words); the options stay as they are.
    pub fn ipv4_ihl(mut self, ihl: u8) -> Self {
        assert!(ihl < 16, "the IHL is a nibble");
        self.v4("ipv4_ihl").ihl = Some(ihl);
        self
    }

    /// Overrides the IPv4 total length field (0 as in TSO/BIG TCP aggregates).
    pub fn ipv4_total_len(mut self, total_len: u16) -> Self {
        self.v4("ipv4_total_len").total_len = Some(total_len);
        self
    }

    /// An IPv6 header: hop limit 64, no extension headers.
    pub fn ipv6(mut self, src: impl Into<Ipv6Addr>, dst: impl Into<Ipv6Addr>) -> Self {
        self.ip = Some(Ip::V6(Ipv6 {
            src: src.into(),
            dst: dst.into(),
            hop_limit: 64,
            ext: Vec::new(),
            payload_len: None,
        }));
        self
    }

    /// Appends an IPv6 extension header of `len` bytes in all:
    /// hop-by-hop options (0) and destination options (60), filled with PadN; routing
    /// (43), of an unassigned type with no segments left; fragment (44), `len` 8, offset
    /// 0 (see [`Frame::ipv6_fragment`] for others); authentication header (51).
    /// Lengths are multiples of 8 from 8 (AH: multiples of 4 from 12).
    pub fn ipv6_ext(mut self, kind: u8, len: usize) -> Self {
        match kind {
            ipproto::HOPOPTS | ipproto::ROUTING | ipproto::DSTOPTS => assert!(
                len >= 8 && len.is_multiple_of(8) && len <= 8 * 256,
                "extension header {kind}: {len} bytes is not a multiple of 8 in 8..=2048"
            ),
            ipproto::FRAGMENT => assert_eq!(len, 8, "the fragment header is 8 bytes"),
            ipproto::AH => assert!(
                len >= 12 && len.is_multiple_of(4) && len <= 4 * 257,
                "authentication header: {len} bytes is not a multiple of 4 in 12..=1028"
            ),
            _ => panic!("{kind} is not an IPv6 extension header this builder knows"),
        }
        self.v6("ipv6_ext").ext.push(Ext {
            kind,
            len,
            frag_offset: 0,
            more_fragments: false,
        });
        self
    }

    /// Appends an IPv6 fragment header: `offset` in 8-byte units, `more` the M flag. A
    /// fragment at a non-zero offset carries no L4 header (as with IPv4).
    pub fn ipv6_fragment(mut self, offset: u16, more: bool) -> Self {
        assert!(
            offset < 0x2000,
            "fragment offset {offset} does not fit in 13 bits"
        );
        self.v6("ipv6_fragment").ext.push(Ext {
            kind: ipproto::FRAGMENT,
            len: 8,
            frag_offset: offset,
            more_fragments: more,
        });
        self
    }

    /// Overrides the IPv6 payload length field (0 as in jumbograms and BIG TCP).
    pub fn ipv6_payload_len(mut self, payload_len: u16) -> Self {
        self.v6("ipv6_payload_len").payload_len = Some(payload_len);
        self
    }

    /// A TCP header with these flags (see [`tcp_flags`]), no options.
    pub fn tcp(mut self, sport: u16, dport: u16, flags: u8) -> Self {
        self.l4 = Some(L4::Tcp {
            sport,
            dport,
            flags,
            options: 0,
            data_offset: None,
        });
        self
    }

    /// `len` bytes of TCP options (NOPs), rounded up to a multiple of 4; at most 40.
    pub fn tcp_options(mut self, len: usize) -> Self {
        let len = len.next_multiple_of(4);
        assert!(
            len <= TCP_MAX_OPTIONS,
            "TCP options take at most {TCP_MAX_OPTIONS} bytes, not {len}"
        );
        match &mut self.l4 {
            Some(L4::Tcp { options, .. }) => *options = len,
            _ => panic!("tcp_options needs .tcp(..) first"),
        }
        self
    }

    /// Overrides the TCP data offset nibble (in 4-byte words).
    pub fn tcp_data_offset(mut self, words: u8) -> Self {
        assert!(words < 16, "the data offset is a nibble");
        match &mut self.l4 {
            Some(L4::Tcp { data_offset, .. }) => *data_offset = Some(words),
            _ => panic!("tcp_data_offset needs .tcp(..) first"),
        }
        self
    }

    /// A UDP header.
    pub fn udp(mut self, sport: u16, dport: u16) -> Self {
        self.l4 = Some(L4::Udp { sport, dport });
        self
    }

    /// An ICMP header (8 bytes: type, code, checksum, identifier 0x4d4d, sequence 1).
    pub fn icmp(mut self, ty: u8, code: u8) -> Self {
        self.l4 = Some(L4::Icmp {
            v6: false,
            ty,
            code,
        });
        self
    }

    /// An ICMPv6 header, laid out as [`Frame::icmp`].
    pub fn icmpv6(mut self, ty: u8, code: u8) -> Self {
        self.l4 = Some(L4::Icmp { v6: true, ty, code });
        self
    }

    /// Another IP protocol: its number in the IP header, and no L4 header (whatever
    /// header it has is part of the payload).
    pub fn proto(mut self, proto: u8) -> Self {
        self.l4 = Some(L4::Other(proto));
        self
    }

    /// `len` bytes of L4 payload (a counting pattern), replacing any payload before.
    pub fn payload_len(mut self, len: usize) -> Self {
        self.payload = (0..len).map(|i| i as u8).collect();
        self
    }

    /// These bytes as the L4 payload, replacing any payload before.
    pub fn payload(mut self, bytes: &[u8]) -> Self {
        self.payload = bytes.to_vec();
        self
    }

    /// `n` zero bytes after the IP packet, outside every IP length: Ethernet padding.
    pub fn eth_padding(mut self, n: usize) -> Self {
        self.eth_padding = n;
        self
    }

    /// Pads the frame to the 60-byte Ethernet minimum, as a NIC would.
    pub fn pad_to_min(self) -> Self {
        let len = self.layout().frame_len - self.eth_padding;
        let n = ETH_MIN_FRAME.saturating_sub(len);
        self.eth_padding(n)
    }

    /// Keeps only the first `len` bytes of the built frame (a frame cut short); the
    /// headers still claim the whole packet. Use [`Layout`]'s offsets to cut inside a
    /// given layer.
    pub fn truncate(mut self, len: usize) -> Self {
        self.truncate = Some(len);
        self
    }

    /// The same packet the other way: MAC addresses, IP addresses and ports swapped
    /// (ICMP types and TCP flags stay; set them anew for a reply).
    pub fn reversed(mut self) -> Self {
        std::mem::swap(&mut self.src_mac, &mut self.dst_mac);
        match &mut self.ip {
            Some(Ip::V4(v4)) => std::mem::swap(&mut v4.src, &mut v4.dst),
            Some(Ip::V6(v6)) => std::mem::swap(&mut v6.src, &mut v6.dst),
            None => {}
        }
        match &mut self.l4 {
            Some(L4::Tcp { sport, dport, .. }) | Some(L4::Udp { sport, dport }) => {
                std::mem::swap(sport, dport)
            }
            _ => {}
        }
        self
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        self.assemble().0
    }

    /// Where the layers sit and what lengths the parser should find.
    pub fn layout(&self) -> Layout {
        self.assemble().1
    }

    /// Expected `ip_bytes` of one packet: the IP total length (without Ethernet padding).
    pub fn ip_len(&self) -> usize {
        self.layout().ip_len
    }

    /// Expected `bytes` of one packet: the L4 payload length.
    pub fn l4_payload_len(&self) -> usize {
        self.layout().payload_len
    }

    fn v4(&mut self, what: &str) -> &mut Ipv4 {
        match &mut self.ip {
            Some(Ip::V4(v4)) => v4,
            _ => panic!("{what} needs .ipv4(..) first"),
        }
    }

    fn v6(&mut self, what: &str) -> &mut Ipv6 {
        match &mut self.ip {
            Some(Ip::V6(v6)) => v6,
            _ => panic!("{what} needs .ipv6(..) first"),
        }
    }

    /// Whether the IP packet is a fragment at a non-zero offset (no L4 header).
    fn later_fragment(&self) -> bool {
        match &self.ip {
            Some(Ip::V4(v4)) => v4.frag_offset != 0,
            Some(Ip::V6(v6)) => v6
                .ext
                .iter()
                .any(|e| e.kind == ipproto::FRAGMENT && e.frag_offset != 0),
            None => false,
        }
    }

    /// Whether the packet is a fragment at all (its L4 checksum would span fragments).
    fn fragmented(&self) -> bool {
        match &self.ip {
            Some(Ip::V4(v4)) => v4.frag_offset != 0 || v4.more_fragments,
            Some(Ip::V6(v6)) => v6.ext.iter().any(|e| e.kind == ipproto::FRAGMENT),
            None => false,
        }
    }

    fn assemble(&self) -> (Vec<u8>, Layout) {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        for tag in &self.vlans {
            out.extend_from_slice(&tag.tpid.to_be_bytes());
            out.extend_from_slice(&tag.tci.to_be_bytes());
        }
        let inner_type = self.ethertype.unwrap_or(match self.ip {
            Some(Ip::V4(_)) => ethertype::IPV4,
            Some(Ip::V6(_)) => ethertype::IPV6,
            None => ethertype::LOCAL_EXPERIMENTAL,
        });
        out.extend_from_slice(&inner_type.to_be_bytes());
        let l2_len = out.len();

        // The L4 segment: header (unless a later fragment) and payload.
        let proto = self.l4.as_ref().map(L4::proto);
        let l4_hdr_len = match &self.l4 {
            Some(l4) if !self.later_fragment() => l4.header_len(),
            _ => 0,
        };
        let mut segment = Vec::with_capacity(l4_hdr_len + self.payload.len());
        if l4_hdr_len != 0 {
            segment.extend(self.l4_header());
        }
        segment.extend_from_slice(&self.payload);

        let (l3_hdr_len, ip_len) = match &self.ip {
            None => {
                out.extend_from_slice(&segment);
                (0, 0)
            }
            Some(Ip::V4(v4)) => {
                let proto = proto.unwrap_or(ipproto::NONE);
                if l4_hdr_len != 0 && !self.fragmented() {
                    let pseudo = pseudo_header(&v4.src.octets(), &v4.dst.octets(), proto, &segment);
                    fill_l4_checksum(&mut segment, proto, pseudo);
                }
                let hdr_len = IPV4_HLEN + v4.options.len();
                let ip_len = hdr_len + segment.len();
                assert!(ip_len <= 0xffff, "IPv4 packet of {ip_len} bytes");
                let ihl = v4.ihl.unwrap_or((hdr_len / 4) as u8);
                let total_len = v4.total_len.unwrap_or(ip_len as u16);
                let frag = v4.frag_offset | if v4.more_fragments { 0x2000 } else { 0 };
                let mut h = Vec::with_capacity(hdr_len);
                h.push((v4.version << 4) | ihl);
                h.push(0); // DSCP/ECN
                h.extend_from_slice(&total_len.to_be_bytes());
                h.extend_from_slice(&v4.id.to_be_bytes());
                h.extend_from_slice(&frag.to_be_bytes());
                h.push(v4.ttl);
                h.push(proto);
                h.extend_from_slice(&[0, 0]); // checksum, below
                h.extend_from_slice(&v4.src.octets());
                h.extend_from_slice(&v4.dst.octets());
                h.extend_from_slice(&v4.options);
                let sum = checksum(&h, 0);
                h[10..12].copy_from_slice(&sum.to_be_bytes());
                out.extend_from_slice(&h);
                out.extend_from_slice(&segment);
                (hdr_len, ip_len)
            }
            Some(Ip::V6(v6)) => {
                let proto = proto.unwrap_or(ipproto::NONE);
                if l4_hdr_len != 0 && !self.fragmented() {
                    let pseudo = pseudo_header(&v6.src.octets(), &v6.dst.octets(), proto, &segment);
                    fill_l4_checksum(&mut segment, proto, pseudo);
                }
                let ext_len: usize = v6.ext.iter().map(|e| e.len).sum();
                let payload_len = ext_len + segment.len();
                assert!(payload_len <= 0xffff, "IPv6 payload of {payload_len} bytes");
                let first = v6.ext.first().map_or(proto, |e| e.kind);
                out.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, class 0, flow 0
                out.extend_from_slice(&v6.payload_len.unwrap_or(payload_len as u16).to_be_bytes());
                out.push(first);
                out.push(v6.hop_limit);
                out.extend_from_slice(&v6.src.octets());
                out.extend_from_slice(&v6.dst.octets());
                for (i, e) in v6.ext.iter().enumerate() {
                    let next = v6.ext.get(i + 1).map_or(proto, |n| n.kind);
                    out.extend(ext_header(e, next));
                }
                out.extend_from_slice(&segment);
                (IPV6_HLEN + ext_len, IPV6_HLEN + payload_len)
            }
        };
        out.resize(out.len() + self.eth_padding, 0);

        let l4_off = l2_len + l3_hdr_len;
        let layout = Layout {
            l2_len,
            l3_off: l2_len,
            l3_hdr_len,
            l4_off,
            l4_hdr_len,
            payload_off: l4_off + l4_hdr_len,
            payload_len: self.payload.len(),
            ip_len,
            hdr_len: l3_hdr_len + l4_hdr_len,
            eth_padding: self.eth_padding,
            frame_len: out.len(),
        };
        if let Some(len) = self.truncate {
            assert!(
                len <= out.len(),
                "cannot truncate a {}-byte frame to {len} bytes",
                out.len()
            );
            out.truncate(len);
        }
        (out, layout)
    }

    /// The L4 header with its checksum zero.
    fn l4_header(&self) -> Vec<u8> {
        let mut h = Vec::new();
        match self.l4.as_ref().expect("an L4 layer") {
            &L4::Tcp {
                sport,
                dport,
                flags,
                options,
                data_offset,
            } => {
                let len = TCP_HLEN + options;
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&1u32.to_be_bytes()); // sequence
                let ack: u32 = if flags & tcp_flags::ACK != 0 { 1 } else { 0 };
                h.extend_from_slice(&ack.to_be_bytes());
                h.push(data_offset.unwrap_or((len / 4) as u8) << 4);
                h.push(flags);
                h.extend_from_slice(&65535u16.to_be_bytes()); // window
                h.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
                h.resize(len, 1); // NOP options
            }
            &L4::Udp { sport, dport } => {
                let len = (UDP_HLEN + self.payload.len()) as u16;
                h.extend_from_slice(&sport.to_be_bytes());
                h.extend_from_slice(&dport.to_be_bytes());
                h.extend_from_slice(&len.to_be_bytes());
                h.extend_from_slice(&[0, 0]);
            }
            &L4::Icmp { ty, code, .. } => {
                h.extend_from_slice(&[ty, code, 0, 0, 0x4d, 0x4d, 0, 1]);
            }
            L4::Other(_) => {}
        }
        h
    }
}

/// One IPv6 extension header, `next` in its first byte.
fn ext_header(e: &Ext, next: u8) -> Vec<u8> {
    let mut h = vec![0u8; e.len];
    h[0] = next;
    match e.kind {
        ipproto::HOPOPTS | ipproto::DSTOPTS => {
            h[1] = (e.len / 8 - 1) as u8;
            // Options from byte 2 on: one PadN over the rest (at least 6 bytes).
            h[2] = 1;
            h[3] = (e.len - 4) as u8;
        }
        ipproto::ROUTING => {
            h[1] = (e.len / 8 - 1) as u8;
            h[2] = 253; // routing type: experimental (RFC 4727)
            h[3] = 0; // segments left: nothing to route, every node ignores it
        }
        ipproto::FRAGMENT => {
            let word = (e.frag_offset << 3) | u16::from(e.more_fragments);
            h[2..4].copy_from_slice(&word.to_be_bytes());
            h[4..8].copy_from_slice(&0x0bad_f00du32.to_be_bytes()); // identification
        }
        ipproto::AH => {
            h[1] = (e.len / 4 - 2) as u8;
            h[4..8].copy_from_slice(&0x100u32.to_be_bytes()); // SPI
            h[8..12].copy_from_slice(&1u32.to_be_bytes()); // sequence
        }
        kind => unreachable!("extension header {kind}"),
    }
    h
}

/// The IPv4 or IPv6 pseudo-header sum of a segment.
fn pseudo_header(src: &[u8], dst: &[u8], proto: u8, segment: &[u8]) -> u32 {
    let mut p = Vec::with_capacity(40);
    p.extend_from_slice(src);
    p.extend_from_slice(dst);
    p.extend_from_slice(&(segment.len() as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, proto]);
    sum16(&p, 0)
}

/// Writes the checksum of a TCP, UDP, ICMP or ICMPv6 segment (ICMP has no pseudo-header).
fn fill_l4_checksum(segment: &mut [u8], proto: u8, pseudo: u32) {
    let at = match proto {
        ipproto::TCP => 16,
        ipproto::UDP => 6,
        ipproto::ICMP | ipproto::ICMPV6 => 2,
        _ => return,
    };
    let initial = if proto == ipproto::ICMP { 0 } else { pseudo };
    let mut sum = checksum(segment, initial);
    if proto == ipproto::UDP && sum == 0 {
        sum = 0xffff; // 0 means "no checksum" in UDP
    }
    segment[at..at + 2].copy_from_slice(&sum.to_be_bytes());
}

fn sum16(bytes: &[u8], mut sum: u32) -> u32 {
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
        sum += u32::from(word);
    }
    sum
}

/// The Internet checksum (RFC 1071) of `bytes`, starting from a partial sum.
pub fn checksum(bytes: &[u8], initial: u32) -> u16 {
    let mut sum = sum16(bytes, initial);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod self_tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_verifies() {
        let f = Frame::eth()
            .ipv4([192, 0, 2, 1], [198, 51, 100, 7])
            .ipv4_options(&[0x94, 0x04, 0, 0])
            .udp(5353, 53)
            .payload_len(11)
            .build();
        assert_eq!(f[14], 0x46, "version 4, IHL 6");
        assert_eq!(checksum(&f[14..38], 0), 0, "header checksum");
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 24 + 8 + 11);
        let pseudo = pseudo_header(&f[26..30], &f[30..34], ipproto::UDP, &f[38..]);
        assert_eq!(checksum(&f[38..], pseudo), 0, "UDP checksum");
    }

    #[test]
    fn ipv6_chain_and_lengths() {
        let f = Frame::eth()
            .ipv6(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST)
            .ipv6_ext(ipproto::HOPOPTS, 8)
            .ipv6_ext(ipproto::ROUTING, 24)
            .ipv6_fragment(0, true)
            .ipv6_ext(ipproto::DSTOPTS, 16)
            .tcp(1, 2, tcp_flags::SYN)
            .payload_len(5)
            .eth_padding(3);
        let l = f.layout();
        let b = f.build();
        assert_eq!(b.len(), 14 + 40 + 56 + 20 + 5 + 3);
        assert_eq!(l.ip_len, 40 + 56 + 25);
        assert_eq!(l.hdr_len, 40 + 56 + 20);
        assert_eq!(u16::from_be_bytes([b[18], b[19]]), 56 + 25);
        assert_eq!(b[20], ipproto::HOPOPTS);
        assert_eq!(b[54], ipproto::ROUTING);
        assert_eq!(b[62], ipproto::FRAGMENT);
        assert_eq!(b[86], ipproto::DSTOPTS);
        assert_eq!(b[94], ipproto::TCP);
        assert_eq!(b[95], 1, "16-byte destination options: length 1");
    }

    #[test]
    fn tcp_checksum_verifies() {
        let f = Frame::eth()
            .ipv6(Ipv6Addr::LOCALHOST, Ipv6Addr::UNSPECIFIED)
            .tcp(1000, 80, tcp_flags::ACK)
            .tcp_options(12)
            .payload_len(7)
            .build();
        let seg = &f[54..];
        let pseudo = pseudo_header(&f[22..38], &f[38..54], ipproto::TCP, seg);
        assert_eq!(checksum(seg, pseudo), 0);
        assert_eq!(seg[12] >> 4, 8, "data offset 32 bytes");
    }
}
