//! The packet parser on the host, over byte slices: what it extracts from crafted frames,
//! the exact reason it gives for each malformed or truncated one, the canonical flow key
//! and the wire counts.

use std::net::Ipv6Addr;

use monitor_common::{
    flow::{DIR_A_TO_B, DIR_B_TO_A, FlowKey},
    parse::{MAX_IPV6_EXT, PacketInfo, parse_frame, parse_frame_after_tags, parse_l3},
    stats,
};
use tests::packet::{
    ETH_HLEN, Frame, ICMP_HLEN, IPV4_HLEN, IPV6_HLEN, TCP_HLEN, UDP_HLEN, VLAN_HLEN, ethertype,
    ipproto, tcp_flags,
};

const A4: [u8; 4] = [10, 0, 0, 1];
const B4: [u8; 4] = [10, 0, 0, 2];
const A6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const B6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);

fn reason_name(slot: u32) -> &'static str {
    stats::unparsed_reason(slot).unwrap_or("<not a reason slot>")
}

/// Parses a frame that must parse.
fn parse(frame: &[u8]) -> PacketInfo {
    match parse_frame(frame) {
        Ok(info) => info,
        Err(slot) => panic!(
            "frame of {} bytes failed to parse: {} ({slot}); bytes {frame:02x?}",
            frame.len(),
            reason_name(slot)
        ),
    }
}

/// Asserts that a frame fails with exactly this reason.
#[track_caller]
fn assert_unparsed(frame: &[u8], expected: u32, what: &str) {
    match parse_frame(frame) {
        Ok(info) => panic!(
            "{what}: frame of {} bytes parsed as {info:?}, expected {} ({expected})",
            frame.len(),
            reason_name(expected)
        ),
        Err(slot) => assert_eq!(
            slot,
            expected,
            "{what}: frame of {} bytes failed as {} ({slot}), expected {} ({expected})",
            frame.len(),
            reason_name(slot),
            reason_name(expected)
        ),
    }
}

fn v4(addr: [u8; 4]) -> [u8; 16] {
    let mut a = [0; 16];
    a[..4].copy_from_slice(&addr);
    a
}

fn v6(addr: Ipv6Addr) -> [u8; 16] {
    addr.octets()
}

/// Checks the lengths the parser reports against the builder's layout.
#[track_caller]
fn assert_lengths(info: &PacketInfo, f: &Frame) {
    let l = f.layout();
    assert_eq!(info.l2_len as usize, l.l2_len, "l2_len");
    assert_eq!(info.ip_len as usize, l.ip_len, "ip_len");
    assert_eq!(info.hdr_len as usize, l.hdr_len, "hdr_len");
}

#[test]
fn ipv4_tcp() {
    let f = Frame::eth()
        .ipv4(A4, B4)
        .tcp(40000, 443, tcp_flags::PSH | tcp_flags::ACK)
        .payload_len(100);
    let info = parse(&f.build());
    assert_eq!(
        info,
        PacketInfo {
            family: 4,
            proto: ipproto::TCP,
            src: v4(A4),
            dst: v4(B4),
            sport: 40000,
            dport: 443,
            l2_len: 14,
            ip_len: 140,
            hdr_len: 40,
            tcp_flags: tcp_flags::PSH | tcp_flags::ACK,
        }
    );
    assert_lengths(&info, &f);
    assert_eq!(f.l4_payload_len(), 100);
}

#[test]
fn ipv4_tcp_options_count_in_hdr_len() {
    for opt in (0..=40).step_by(4) {
        let f = Frame::eth()
            .ipv4(A4, B4)
            .tcp(1, 2, tcp_flags::SYN)
            .tcp_options(opt)
            .payload_len(3);
        let info = parse(&f.build());
        assert_eq!(
            info.hdr_len as usize,
            IPV4_HLEN + TCP_HLEN + opt,
            "options {opt}"
        );
        assert_eq!(info.ip_len as usize, IPV4_HLEN + TCP_HLEN + opt + 3);
        assert_eq!(
            (info.sport, info.dport, info.tcp_flags),
            (1, 2, tcp_flags::SYN)
        );
    }
}

#[test]
fn ipv4_options_every_ihl() {
    for ihl in 6..=15usize {
        let opt = (ihl - 5) * 4;
        let f = Frame::eth()
            .ipv4(A4, B4)
            .ipv4_options(&vec![1; opt]) // NOPs
            .udp(5353, 53)
            .payload_len(10);
        let frame = f.build();
        assert_eq!(frame[ETH_HLEN] & 0x0f, ihl as u8, "builder IHL");
        let info = parse(&frame);
        assert_eq!(info.family, 4);
        assert_eq!(info.proto, ipproto::UDP);
        assert_eq!((info.src, info.dst), (v4(A4), v4(B4)), "IHL {ihl}");
        assert_eq!(
            (info.sport, info.dport),
            (5353, 53),
            "IHL {ihl}: ports after options"
        );
        assert_eq!(info.hdr_len as usize, ihl * 4 + UDP_HLEN, "IHL {ihl}");
        assert_eq!(info.ip_len as usize, ihl * 4 + UDP_HLEN + 10, "IHL {ihl}");
        assert_lengths(&info, &f);
    }
}

#[test]
fn ipv4_bad_headers() {
    let good = Frame::eth().ipv4(A4, B4).tcp(1, 2, 0).payload_len(20);
    parse(&good.build());
    assert_unparsed(
        &good.clone().ipv4_version(6).build(),
        stats::BAD_IPV4_HEADER,
        "version 6 under EtherType IPv4",
    );
    for ihl in 0..5 {
        assert_unparsed(
            &good.clone().ipv4_ihl(ihl).build(),
            stats::BAD_IPV4_HEADER,
            &format!("IHL {ihl}"),
        );
    }
    assert_unparsed(
        &good.clone().ipv4_total_len(19).build(),
        stats::BAD_IPV4_HEADER,
        "total length shorter than the header",
    );
    // IHL 6 with a total length of 20: shorter than its own header.
    assert_unparsed(
        &good
            .clone()
            .ipv4_options(&[1; 4])
            .ipv4_total_len(20)
            .build(),
        stats::BAD_IPV4_HEADER,
        "total length 20 with IHL 6",
    );
}

#[test]
fn ipv4_zero_total_length_is_an_aggregate() {
    // TSO/BIG TCP aggregates carry total length 0: parsed, ip_len 0 (the frame decides).
    let f = Frame::eth()
        .ipv4(A4, B4)
        .tcp(1, 2, tcp_flags::ACK)
        .payload_len(3000)
        .ipv4_total_len(0);
    let info = parse(&f.build());
    assert_eq!(info.ip_len, 0);
    assert_eq!(info.hdr_len, 40);
    assert_eq!((info.sport, info.dport), (1, 2));
}

#[test]
fn ipv6_tcp() {
    let f = Frame::eth()
        .ipv6(A6, B6)
        .tcp(40000, 443, tcp_flags::SYN)
        .payload_len(0);
    let info = parse(&f.build());
    assert_eq!(
        info,
        PacketInfo {
            family: 6,
            proto: ipproto::TCP,
            src: v6(A6),
            dst: v6(B6),
            sport: 40000,
            dport: 443,
            l2_len: 14,
            ip_len: 60,
            hdr_len: 60,
            tcp_flags: tcp_flags::SYN,
        }
    );
}

#[test]
fn ipv6_zero_payload_length_is_an_aggregate() {
    let f = Frame::eth()
        .ipv6(A6, B6)
        .tcp(1, 2, tcp_flags::ACK)
        .payload_len(100)
        .ipv6_payload_len(0);
    let info = parse(&f.build());
    assert_eq!(info.ip_len, 0);
    assert_eq!(info.hdr_len, 60);
}

#[test]
fn ipv6_each_extension_header() {
    let cases: [(u8, usize); 8] = [
        (ipproto::HOPOPTS, 8),
        (ipproto::HOPOPTS, 64),
        (ipproto::ROUTING, 24),
        (ipproto::FRAGMENT, 8),
        (ipproto::DSTOPTS, 8),
        (ipproto::DSTOPTS, 2048),
        (ipproto::AH, 12),
        (ipproto::AH, 24),
    ];
    for (kind, len) in cases {
        let f = Frame::eth()
            .ipv6(A6, B6)
            .ipv6_ext(kind, len)
            .udp(5000, 53)
            .payload_len(7);
        let info = parse(&f.build());
        let what = format!("extension header {kind} of {len} bytes");
        assert_eq!(info.proto, ipproto::UDP, "{what}");
        assert_eq!((info.sport, info.dport), (5000, 53), "{what}");
        assert_eq!(info.hdr_len as usize, IPV6_HLEN + len + UDP_HLEN, "{what}");
        assert_eq!(
            info.ip_len as usize,
            IPV6_HLEN + len + UDP_HLEN + 7,
            "{what}"
        );
        assert_lengths(&info, &f);
    }
}

#[test]
fn ipv6_extension_chains() {
    let f = Frame::eth()
        .ipv6(A6, B6)
        .ipv6_ext(ipproto::HOPOPTS, 16)
        .ipv6_ext(ipproto::DSTOPTS, 8)
        .ipv6_ext(ipproto::ROUTING, 24)
        .ipv6_fragment(0, true)
        .ipv6_ext(ipproto::AH, 16)
        .ipv6_ext(ipproto::DSTOPTS, 8)
        .tcp(1234, 80, tcp_flags::SYN)
        .tcp_options(20)
        .payload_len(1);
    let info = parse(&f.build());
    assert_eq!(info.proto, ipproto::TCP);
    assert_eq!(
        (info.sport, info.dport, info.tcp_flags),
        (1234, 80, tcp_flags::SYN)
    );
    assert_eq!(info.hdr_len as usize, IPV6_HLEN + 80 + TCP_HLEN + 20);
    assert_lengths(&info, &f);

    // Exactly MAX_IPV6_EXT headers are walked; one more is the limit.
    let mut f = Frame::eth().ipv6(A6, B6);
    for _ in 0..MAX_IPV6_EXT {
        f = f.ipv6_ext(ipproto::DSTOPTS, 8);
    }
    let at_limit = f.clone().udp(1, 2);
    let info = parse(&at_limit.build());
    assert_eq!((info.proto, info.sport, info.dport), (ipproto::UDP, 1, 2));
    assert_eq!(
        info.hdr_len as usize,
        IPV6_HLEN + 8 * MAX_IPV6_EXT + UDP_HLEN
    );
    assert_unparsed(
        &f.ipv6_ext(ipproto::HOPOPTS, 8).udp(1, 2).build(),
        stats::IPV6_EXT_LIMIT,
        "one extension header beyond the limit",
    );

    // "No next header" after an extension: a protocol without ports.
    let info = parse(
        &Frame::eth()
            .ipv6(A6, B6)
            .ipv6_ext(ipproto::DSTOPTS, 8)
            .proto(ipproto::NONE)
            .payload_len(4)
            .build(),
    );
    assert_eq!((info.proto, info.sport, info.dport), (ipproto::NONE, 0, 0));
    assert_eq!(info.hdr_len as usize, IPV6_HLEN + 8);
}

#[test]
fn vlan_one_and_two_tags() {
    let base = |f: Frame| f.ipv4(A4, B4).tcp(1, 2, tcp_flags::ACK).payload_len(5);
    for (tags, what) in [
        (vec![(ethertype::VLAN, 10)], "802.1Q"),
        (vec![(ethertype::QINQ, 10)], "802.1ad alone"),
        (vec![(ethertype::QINQ, 10), (ethertype::VLAN, 20)], "QinQ"),
        (
            vec![(ethertype::VLAN, 10), (ethertype::VLAN, 20)],
            "double 802.1Q",
        ),
    ] {
        let mut f = Frame::eth();
        for &(tpid, vid) in &tags {
            f = f.vlan(tpid, vid);
        }
        let f = base(f);
        let info = parse(&f.build());
        assert_eq!(
            info.l2_len as usize,
            ETH_HLEN + VLAN_HLEN * tags.len(),
            "{what}"
        );
        assert_eq!((info.family, info.proto), (4, ipproto::TCP), "{what}");
        assert_eq!((info.src, info.dst), (v4(A4), v4(B4)), "{what}");
        assert_eq!((info.sport, info.dport), (1, 2), "{what}");
        assert_eq!(info.ip_len, 45, "{what}");
        assert_lengths(&info, &f);
    }
    // IPv6 under QinQ.
    let f = Frame::eth()
        .vlan(ethertype::QINQ, 1)
        .vlan(ethertype::VLAN, 2)
        .ipv6(A6, B6)
        .udp(3, 4);
    let info = parse(&f.build());
    assert_eq!((info.l2_len, info.family, info.sport), (22, 6, 3));
}

#[test]
fn vlan_three_tags_are_too_deep() {
    for third in [ethertype::VLAN, ethertype::QINQ] {
        let f = Frame::eth()
            .vlan(ethertype::QINQ, 1)
            .vlan(ethertype::VLAN, 2)
            .vlan(third, 3)
            .ipv4(A4, B4)
            .udp(1, 2);
        assert_unparsed(&f.build(), stats::VLAN_TOO_DEEP, "three tags");
    }
}

/// At TC ingress the kernel has already moved the outer tag out of the data: it still
/// counts towards the limit of two.
#[test]
fn tags_stripped_by_the_kernel_count_towards_the_limit() {
    let one = Frame::eth().vlan(ethertype::VLAN, 2).ipv4(A4, B4).udp(1, 2);
    let info = parse_frame_after_tags(&one.build()[..], 1).expect("one tag left in the data");
    assert_eq!(info.l2_len as usize, ETH_HLEN + VLAN_HLEN);
    let two = Frame::eth()
        .vlan(ethertype::VLAN, 2)
        .vlan(ethertype::VLAN, 3)
        .ipv4(A4, B4)
        .udp(1, 2);
    assert_eq!(
        parse_frame_after_tags(&two.build()[..], 1),
        Err(stats::VLAN_TOO_DEEP)
    );
    assert!(parse_frame_after_tags(&two.build()[..], 0).is_ok());
}

#[test]
fn tcp_header_cut_inside_its_options() {
    let f = Frame::eth()
        .ipv4(A4, B4)
        .tcp(1, 2, tcp_flags::ACK)
        .tcp_options(12)
        .build();
    let l4 = ETH_HLEN + IPV4_HLEN;
    for cut in l4 + TCP_HLEN..l4 + TCP_HLEN + 12 {
        assert_unparsed(&f[..cut], stats::TRUNCATED_TCP, "cut in the TCP options");
    }
    assert!(parse_frame(&f[..l4 + TCP_HLEN + 12]).is_ok());
}

#[test]
fn not_ip() {
    assert_unparsed(
        &Frame::eth()
            .ethertype(ethertype::ARP)
            .payload_len(28)
            .build(),
        stats::NOT_IP,
        "ARP",
    );
    assert_unparsed(
        &Frame::eth()
            .vlan(ethertype::VLAN, 5)
            .ethertype(ethertype::ARP)
            .payload_len(28)
            .build(),
        stats::NOT_IP,
        "ARP in a VLAN",
    );
    assert_unparsed(&Frame::eth().build(), stats::NOT_IP, "bare Ethernet header");
}

#[test]
fn icmp_echo_ports() {
    let req = parse(&Frame::eth().ipv4(A4, B4).icmp(8, 0).payload_len(56).build());
    assert_eq!((req.proto, req.sport, req.dport), (ipproto::ICMP, 8, 0));
    assert_eq!((req.ip_len, req.hdr_len), (84, 28));
    let rep = parse(&Frame::eth().ipv4(B4, A4).icmp(0, 0).payload_len(56).build());
    assert_eq!((rep.sport, rep.dport), (0, 8));
    // Types without a counterpart: the code.
    let unreach = parse(&Frame::eth().ipv4(A4, B4).icmp(3, 1).payload_len(28).build());
    assert_eq!((unreach.sport, unreach.dport), (3, 1));
    // Timestamp request / reply.
    let ts = parse(
        &Frame::eth()
            .ipv4(A4, B4)
            .icmp(13, 0)
            .payload_len(12)
            .build(),
    );
    assert_eq!((ts.sport, ts.dport), (13, 14));
}

#[test]
fn icmpv6_echo_ports() {
    let req = parse(
        &Frame::eth()
            .ipv6(A6, B6)
            .icmpv6(128, 0)
            .payload_len(56)
            .build(),
    );
    assert_eq!(
        (req.proto, req.sport, req.dport),
        (ipproto::ICMPV6, 128, 129)
    );
    assert_eq!((req.ip_len, req.hdr_len), (104, 48));
    let rep = parse(
        &Frame::eth()
            .ipv6(B6, A6)
            .icmpv6(129, 0)
            .payload_len(56)
            .build(),
    );
    assert_eq!((rep.sport, rep.dport), (129, 128));
    // Neighbour solicitation / advertisement pair up; destination unreachable keeps its code.
    let ns = parse(
        &Frame::eth()
            .ipv6(A6, B6)
            .icmpv6(135, 0)
            .payload_len(16)
            .build(),
    );
    assert_eq!((ns.sport, ns.dport), (135, 136));
    let unreach = parse(
        &Frame::eth()
            .ipv6(A6, B6)
            .icmpv6(1, 4)
            .payload_len(48)
            .build(),
    );
    assert_eq!((unreach.sport, unreach.dport), (1, 4));
    // An ICMP (v4) type number under ICMPv6 has no counterpart: type 8 keeps its code.
    let odd = parse(&Frame::eth().ipv6(A6, B6).icmpv6(8, 3).build());
    assert_eq!((odd.sport, odd.dport), (8, 3));
}

#[test]
fn other_protocol_has_no_ports() {
    // GRE with a 4-byte header (part of the payload to the parser).
    let f = Frame::eth()
        .ipv4(A4, B4)
        .proto(ipproto::GRE)
        .payload(&[0, 0, 0x08, 0x00, 0x45, 0, 0, 20]);
    let info = parse(&f.build());
    assert_eq!(
        (info.proto, info.sport, info.dport, info.tcp_flags),
        (ipproto::GRE, 0, 0, 0)
    );
    assert_eq!((info.ip_len, info.hdr_len), (28, 20));
    let f6 = Frame::eth()
        .ipv6(A6, B6)
        .ipv6_ext(ipproto::HOPOPTS, 8)
        .proto(ipproto::GRE)
        .payload_len(4);
    let info = parse(&f6.build());
    assert_eq!((info.proto, info.sport, info.dport), (ipproto::GRE, 0, 0));
    assert_eq!((info.ip_len, info.hdr_len), (52, 48));
}

#[test]
fn fragments() {
    // First fragment (offset 0, more fragments): the L4 header is there.
    let first = Frame::eth()
        .ipv4(A4, B4)
        .ipv4_fragment(0, true)
        .udp(5000, 6000)
        .payload_len(1000);
    let info = parse(&first.build());
    assert_eq!((info.sport, info.dport), (5000, 6000));
    assert_eq!(info.hdr_len as usize, IPV4_HLEN + UDP_HLEN);

    // Later fragments carry no ports, flags or L4 header, even when their payload looks
    // like one.
    for offset in [1, 126, 0x1fff] {
        let later = Frame::eth()
            .ipv4(A4, B4)
            .ipv4_fragment(offset, false)
            .tcp(5000, 6000, tcp_flags::SYN)
            .payload(&[
                0x13, 0x88, 0x17, 0x70, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x02, 0, 0,
            ]);
        let l = later.layout();
        assert_eq!(l.l4_hdr_len, 0);
        let info = parse(&later.build());
        assert_eq!(
            (info.proto, info.sport, info.dport, info.tcp_flags),
            (ipproto::TCP, 0, 0, 0),
            "IPv4 offset {offset}"
        );
        assert_eq!(info.hdr_len as usize, IPV4_HLEN, "IPv4 offset {offset}");
        assert_eq!(info.ip_len as usize, IPV4_HLEN + 16);
        assert_lengths(&info, &later);
    }

    let first6 = Frame::eth()
        .ipv6(A6, B6)
        .ipv6_fragment(0, true)
        .udp(5000, 6000)
        .payload_len(1000);
    let info = parse(&first6.build());
    assert_eq!((info.sport, info.dport), (5000, 6000));
    assert_eq!(info.hdr_len as usize, IPV6_HLEN + 8 + UDP_HLEN);
    for offset in [1, 0x1fff] {
        let later6 = Frame::eth()
            .ipv6(A6, B6)
            .ipv6_ext(ipproto::HOPOPTS, 8)
            .ipv6_fragment(offset, true)
            .udp(5000, 6000)
            .payload_len(64);
        let info = parse(&later6.build());
        assert_eq!(
            (info.proto, info.sport, info.dport),
            (ipproto::UDP, 0, 0),
            "IPv6 offset {offset}"
        );
        assert_eq!(info.hdr_len as usize, IPV6_HLEN + 16);
        assert_eq!(info.ip_len as usize, IPV6_HLEN + 16 + 64);
    }
}

#[test]
fn ethernet_padding_is_not_ip() {
    let f = Frame::eth()
        .ipv4(A4, B4)
        .tcp(1, 2, tcp_flags::ACK)
        .pad_to_min();
    assert_eq!(f.layout().eth_padding, 6);
    let frame = f.build();
    assert_eq!(frame.len(), 60);
    let info = parse(&frame);
    assert_eq!((info.ip_len, info.hdr_len), (40, 40));
    let (pkts, ip_bytes, bytes) = info.wire_counts(frame.len() as u32, 1);
    assert_eq!((pkts, ip_bytes, bytes), (1, 40, 0));

    let f = Frame::eth()
        .vlan(ethertype::VLAN, 7)
        .ipv6(A6, B6)
        .udp(1, 2)
        .payload_len(2)
        .eth_padding(100);
    let frame = f.build();
    let info = parse(&frame);
    assert_eq!(info.ip_len, 50);
    assert_eq!(info.wire_counts(frame.len() as u32, 0), (1, 50, 2));
}

/// Cuts `f` at every length in `cuts` and asserts the reason.
#[track_caller]
fn assert_cuts(f: &Frame, cuts: std::ops::Range<usize>, expected: u32, what: &str) {
    assert!(!cuts.is_empty(), "{what}: no cut lengths");
    let full = f.build();
    for len in cuts {
        assert_unparsed(&full[..len], expected, &format!("{what}, cut at {len}"));
        // The builder's truncate gives the same bytes.
        assert_eq!(f.clone().truncate(len).build(), full[..len]);
    }
}

#[test]
fn truncated_at_every_layer() {
    let tcp4 = Frame::eth()
        .ipv4(A4, B4)
        .tcp(1, 2, tcp_flags::SYN)
        .payload_len(10);
    assert_cuts(&tcp4, 0..ETH_HLEN, stats::TRUNCATED_ETHERNET, "ethernet");
    let vlan = Frame::eth()
        .vlan(ethertype::QINQ, 1)
        .vlan(ethertype::VLAN, 2)
        .ipv4(A4, B4)
        .udp(1, 2);
    assert_cuts(
        &vlan,
        ETH_HLEN..ETH_HLEN + 4,
        stats::TRUNCATED_VLAN,
        "outer tag",
    );
    assert_cuts(
        &vlan,
        ETH_HLEN + 4..ETH_HLEN + 8,
        stats::TRUNCATED_VLAN,
        "inner tag",
    );
    let l3 = ETH_HLEN;
    assert_cuts(
        &tcp4,
        l3..l3 + IPV4_HLEN,
        stats::TRUNCATED_IPV4,
        "ipv4 fixed header",
    );
    let opts = Frame::eth().ipv4(A4, B4).ipv4_options(&[1; 40]).udp(1, 2);
    assert_cuts(
        &opts,
        l3 + IPV4_HLEN..l3 + IPV4_HLEN + 40,
        stats::TRUNCATED_IPV4,
        "ipv4 options",
    );
    let tcp6 = Frame::eth().ipv6(A6, B6).tcp(1, 2, tcp_flags::SYN);
    assert_cuts(
        &tcp6,
        l3..l3 + IPV6_HLEN,
        stats::TRUNCATED_IPV6,
        "ipv6 fixed header",
    );

    // Extension headers: the parser reads the next-header and length bytes (all 8 bytes of
    // a fragment header); cut before those, it is the extension that is short; cut after
    // them, the next header's read fails.
    let ext_off = l3 + IPV6_HLEN;
    let ext = Frame::eth()
        .ipv6(A6, B6)
        .ipv6_ext(ipproto::HOPOPTS, 16)
        .ipv6_fragment(0, false)
        .ipv6_ext(ipproto::AH, 12)
        .ipv6_ext(ipproto::ROUTING, 8)
        .ipv6_ext(ipproto::DSTOPTS, 8)
        .udp(1, 2);
    assert_cuts(
        &ext,
        ext_off..ext_off + 2,
        stats::TRUNCATED_IPV6_EXT,
        "hop-by-hop",
    );
    let frag_off = ext_off + 16;
    assert_cuts(
        &ext,
        ext_off + 2..frag_off,
        stats::TRUNCATED_IPV6_EXT,
        "before fragment",
    );
    assert_cuts(
        &ext,
        frag_off..frag_off + 8,
        stats::TRUNCATED_IPV6_EXT,
        "fragment",
    );
    let ah_off = frag_off + 8;
    assert_cuts(&ext, ah_off..ah_off + 2, stats::TRUNCATED_IPV6_EXT, "AH");
    let rt_off = ah_off + 12;
    assert_cuts(
        &ext,
        ah_off + 2..rt_off + 2,
        stats::TRUNCATED_IPV6_EXT,
        "routing",
    );
    let do_off = rt_off + 8;
    let udp_off = do_off + 8;
    assert_eq!(ext.layout().l4_off, udp_off);
    // The last extension header must be whole, whatever follows it.
    assert_cuts(
        &ext,
        rt_off + 2..udp_off,
        stats::TRUNCATED_IPV6_EXT,
        "dest options",
    );
    assert_cuts(
        &ext,
        udp_off..udp_off + UDP_HLEN,
        stats::TRUNCATED_UDP,
        "udp after ext",
    );

    let l4 = tcp4.layout().l4_off;
    assert_cuts(&tcp4, l4..l4 + TCP_HLEN, stats::TRUNCATED_TCP, "tcp");
    assert_cuts(
        &tcp6,
        l3 + 40..l3 + 40 + TCP_HLEN,
        stats::TRUNCATED_TCP,
        "tcp over ipv6",
    );
    let udp4 = Frame::eth().ipv4(A4, B4).udp(1, 2).payload_len(1);
    assert_cuts(&udp4, l4..l4 + UDP_HLEN, stats::TRUNCATED_UDP, "udp");
    let icmp4 = Frame::eth().ipv4(A4, B4).icmp(8, 0).payload_len(8);
    assert_cuts(&icmp4, l4..l4 + ICMP_HLEN, stats::TRUNCATED_ICMP, "icmp");
    let icmp6 = Frame::eth().ipv6(A6, B6).icmpv6(128, 0).payload_len(8);
    assert_cuts(
        &icmp6,
        l3 + 40..l3 + 40 + ICMP_HLEN,
        stats::TRUNCATED_ICMP,
        "icmpv6",
    );

    // Headers complete, payload cut: parsed, and the header's lengths still count.
    let info = parse(&tcp4.clone().truncate(l4 + TCP_HLEN).build());
    assert_eq!(info.ip_len, 50);
    let info = parse(&icmp4.truncate(l4 + ICMP_HLEN).build());
    assert_eq!(info.ip_len, 36);
}

#[test]
fn bad_tcp_data_offset() {
    for doff in 0..5 {
        let f = Frame::eth()
            .ipv4(A4, B4)
            .tcp(1, 2, tcp_flags::SYN)
            .tcp_data_offset(doff);
        assert_unparsed(
            &f.build(),
            stats::BAD_TCP_HEADER,
            &format!("data offset {doff}"),
        );
    }
}

/// A packet and its reply: one key, opposite directions.
#[track_caller]
fn assert_symmetric(fwd: &Frame, rev: &Frame) -> (FlowKey, usize) {
    let (k1, d1) = parse(&fwd.build()).flow_key();
    let (k2, d2) = parse(&rev.build()).flow_key();
    assert_eq!(k1, k2, "a packet and its reply share one key");
    assert_ne!(d1, d2, "a packet and its reply travel opposite directions");
    (k1, d1)
}

#[test]
fn flow_key_is_symmetric_and_canonical() {
    // IPv4 TCP from the smaller address: a is the source.
    let fwd = Frame::eth().ipv4(A4, B4).tcp(40000, 443, tcp_flags::SYN);
    let rev = fwd
        .clone()
        .reversed()
        .tcp(443, 40000, tcp_flags::SYN | tcp_flags::ACK);
    let (key, dir) = assert_symmetric(&fwd, &rev);
    assert_eq!(
        key,
        FlowKey {
            addr_a: v4(A4),
            addr_b: v4(B4),
            port_a: 40000,
            port_b: 443,
            proto: ipproto::TCP,
            family: 4,
            _pad: [0; 2],
        }
    );
    assert_eq!(dir, DIR_A_TO_B);

    // From the larger address: a is the destination, and the packet goes b -> a.
    let (key, dir) = assert_symmetric(&rev, &fwd);
    assert_eq!((key.addr_a, key.port_a), (v4(A4), 40000));
    assert_eq!(dir, DIR_B_TO_A);

    // Addresses compare as numbers, not by their last byte.
    let hi = [10, 0, 1, 0];
    let lo = [10, 0, 0, 255];
    let (key, dir) = assert_symmetric(
        &Frame::eth().ipv4(hi, lo).udp(1, 2),
        &Frame::eth().ipv4(lo, hi).udp(2, 1),
    );
    assert_eq!(
        (key.addr_a, key.port_a, key.port_b, dir),
        (v4(lo), 2, 1, DIR_B_TO_A)
    );

    // The same address on both sides: the ports decide.
    let (key, dir) = assert_symmetric(
        &Frame::eth().ipv4(A4, A4).udp(6000, 5000),
        &Frame::eth().ipv4(A4, A4).udp(5000, 6000),
    );
    assert_eq!((key.port_a, key.port_b, dir), (5000, 6000, DIR_B_TO_A));

    // IPv6: the full 128 bits count, high half first.
    let low_hi = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 1, 0);
    let high_lo = Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 0);
    let (key, dir) = assert_symmetric(
        &Frame::eth()
            .ipv6(high_lo, low_hi)
            .tcp(80, 1, tcp_flags::ACK),
        &Frame::eth()
            .ipv6(low_hi, high_lo)
            .tcp(1, 80, tcp_flags::ACK),
    );
    assert_eq!(
        key,
        FlowKey {
            addr_a: v6(low_hi),
            addr_b: v6(high_lo),
            port_a: 1,
            port_b: 80,
            proto: ipproto::TCP,
            family: 6,
            _pad: [0; 2],
        }
    );
    assert_eq!(dir, DIR_B_TO_A);
    let b = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xff00);
    let (key, _) = assert_symmetric(
        &Frame::eth().ipv6(b, A6).udp(1, 1),
        &Frame::eth().ipv6(A6, b).udp(1, 1),
    );
    assert_eq!(key.addr_a, v6(A6));
}

#[test]
fn flow_key_icmp_request_and_reply() {
    for (src, dst) in [(A4, B4), (B4, A4), (A4, A4)] {
        let req = Frame::eth().ipv4(src, dst).icmp(8, 0).payload_len(56);
        let rep = Frame::eth().ipv4(dst, src).icmp(0, 0).payload_len(56);
        let (key, _) = assert_symmetric(&req, &rep);
        assert_eq!(key.proto, ipproto::ICMP);
        assert_eq!(
            [key.port_a, key.port_b].map(u32::from).iter().sum::<u32>(),
            8
        );
    }
    let (key, dir) = assert_symmetric(
        &Frame::eth().ipv6(A6, B6).icmpv6(128, 0),
        &Frame::eth().ipv6(B6, A6).icmpv6(129, 0),
    );
    assert_eq!(
        (key.addr_a, key.port_a, key.port_b, key.family, dir),
        (v6(A6), 128, 129, 6, DIR_A_TO_B)
    );
}

#[test]
fn wire_counts_single_packet() {
    let f = Frame::eth()
        .vlan(ethertype::VLAN, 3)
        .ipv4(A4, B4)
        .ipv4_options(&[1; 8])
        .tcp(1, 2, tcp_flags::ACK)
        .tcp_options(12)
        .payload_len(500)
        .eth_padding(4);
    let frame = f.build();
    let info = parse(&frame);
    let l = f.layout();
    let expected = (1, l.ip_len as u64, l.payload_len as u64);
    assert_eq!(expected, (1, 28 + 32 + 500, 500));
    // One segment (gso_segs 0 means 1): the header's length, however long the frame
    // beyond it; a frame shorter than the header claims counts what it holds.
    let l2 = l.l2_len as u32;
    for frame_len in [l2 + l.ip_len as u32, frame.len() as u32, 9000] {
        for segs in [0, 1] {
            assert_eq!(
                info.wire_counts(frame_len, segs),
                expected,
                "frame_len {frame_len}, segs {segs}"
            );
            assert!(!info.ip_len_exceeds_frame(frame_len, segs));
        }
    }
    let short = l2 + l.ip_len as u32 - 1;
    assert!(info.ip_len_exceeds_frame(short, 1));
    assert_eq!(
        info.wire_counts(short, 1),
        (1, l.ip_len as u64 - 1, l.payload_len as u64 - 1)
    );
}

/// Frames whose IP header claims 65,535 bytes count what they carry (a sixty-byte IPv4
/// frame: 46 bytes) and are marked as lying; an aggregate's length comes from the frame
/// anyway and is no lie.
#[test]
fn ip_length_beyond_the_frame_counts_the_frame() {
    let v4 = Frame::eth()
        .ipv4(A4, B4)
        .tcp(1, 2, tcp_flags::ACK)
        .pad_to_min()
        .ipv4_total_len(65535)
        .build();
    let v6 = Frame::eth()
        .vlan(ethertype::VLAN, 5)
        .ipv6(A6, B6)
        .udp(1, 2)
        .payload_len(2)
        .ipv6_payload_len(65535)
        .build();
    for (frame, l2, hdr) in [(&v4, 14, 40), (&v6, 18, 48)] {
        let info = parse(frame);
        let len = frame.len() as u32;
        let on_wire = u64::from(len - l2);
        assert!(info.ip_len > len, "{info:?}");
        assert!(info.ip_len_exceeds_frame(len, 0));
        assert!(info.ip_len_exceeds_frame(len, 1));
        assert_eq!(info.wire_counts(len, 1), (1, on_wire, on_wire - hdr));
        assert!(!info.ip_len_exceeds_frame(len, 2));
        assert_eq!(info.wire_counts(len, 2), (2, on_wire + hdr, on_wire - hdr));
    }
    assert_eq!(v4.len(), 60);
    assert_eq!(parse(&v4).wire_counts(60, 1), (1, 46, 6));
}

/// A device without a link-layer header hands the programs the IP header first, and the
/// kernel says what it is (an skb's protocol).
#[test]
fn l3_packets_parse_from_the_ip_header() {
    for f in [
        Frame::eth()
            .ipv4(A4, B4)
            .ipv4_options(&[1; 4])
            .tcp(40000, 443, tcp_flags::SYN)
            .payload_len(10),
        Frame::eth()
            .ipv6(A6, B6)
            .ipv6_ext(ipproto::DSTOPTS, 8)
            .udp(5000, 53)
            .payload_len(30),
        Frame::eth().ipv4(B4, A4).icmp(8, 0).payload_len(56),
    ] {
        let frame = f.build();
        let protocol = u16::from_be_bytes([frame[12], frame[13]]);
        let on_eth = parse(&frame);
        let l3 = &frame[ETH_HLEN..];
        let info = parse_l3(l3, protocol)
            .unwrap_or_else(|slot| panic!("{} bytes: {} ({slot})", l3.len(), reason_name(slot)));
        assert_eq!(
            info,
            PacketInfo {
                l2_len: 0,
                ..on_eth
            }
        );
        assert_eq!(
            info.wire_counts(l3.len() as u32, 1),
            on_eth.wire_counts(frame.len() as u32, 1)
        );
    }
    let v4 = Frame::eth().ipv4(A4, B4).udp(1, 2).payload_len(4).build();
    let v4 = &v4[ETH_HLEN..];
    // Only what the kernel calls IP is parsed as IP.
    for protocol in [ethertype::ARP, 0x8847, 0] {
        assert_eq!(parse_l3(v4, protocol), Err(stats::NOT_IP), "{protocol:#x}");
    }
    // An IPv4 header announced as IPv6 (or the reverse) is cut or bad, never counted.
    assert_eq!(parse_l3(v4, ethertype::IPV6), Err(stats::TRUNCATED_IPV6));
    let v6 = Frame::eth().ipv6(A6, B6).udp(1, 2).payload_len(4).build();
    assert_eq!(
        parse_l3(&v6[ETH_HLEN..], ethertype::IPV4),
        Err(stats::BAD_IPV4_HEADER)
    );
    // Cut short: the same reasons as behind an Ethernet header.
    assert_eq!(
        parse_l3(&v4[..19], ethertype::IPV4),
        Err(stats::TRUNCATED_IPV4)
    );
    assert_eq!(
        parse_l3(&v4[..27], ethertype::IPV4),
        Err(stats::TRUNCATED_UDP)
    );
}

#[test]
fn wire_counts_aggregate() {
    // A GSO aggregate: one frame of L bytes standing for N segments.
    for (f, n) in [
        (
            Frame::eth()
                .ipv4(A4, B4)
                .tcp(1, 2, tcp_flags::ACK)
                .tcp_options(12)
                .payload_len(4 * 1448),
            4u32,
        ),
        (
            Frame::eth()
                .vlan(ethertype::VLAN, 9)
                .ipv6(A6, B6)
                .ipv6_ext(ipproto::DSTOPTS, 8)
                .udp(1, 2)
                .payload_len(3 * 1400),
            3,
        ),
    ] {
        let frame = f.build();
        let info = parse(&frame);
        let l = f.layout();
        let len = frame.len() as u64;
        let (l2, hdr) = (l.l2_len as u64, l.hdr_len as u64);
        assert_eq!(info.hdr_len as u64, hdr);
        let n64 = u64::from(n);
        assert_eq!(
            info.wire_counts(frame.len() as u32, n),
            (n64, (len - l2) + (n64 - 1) * hdr, (len - l2) - hdr),
            "{n} segments of {:?}",
            l
        );
        // Payload bytes are the aggregate's payload, ip_bytes its payload plus N headers.
        assert_eq!((len - l2) - hdr, l.payload_len as u64);
        assert_eq!(
            (len - l2) + (n64 - 1) * hdr,
            l.payload_len as u64 + n64 * hdr
        );
    }

    // In numbers: 4 x 1448 bytes of TCP with 12 bytes of options, total length 0 as in
    // an IPv4 BIG TCP aggregate: 4 x (20 + 32) + 5792 on the wire.
    let big = Frame::eth()
        .ipv4(A4, B4)
        .tcp(1, 2, tcp_flags::ACK)
        .tcp_options(12)
        .payload_len(4 * 1448)
        .ipv4_total_len(0)
        .build();
    assert_eq!(big.len(), 14 + 52 + 5792);
    let info = parse(&big);
    assert_eq!(info.wire_counts(big.len() as u32, 4), (4, 6000, 5792));

    // One segment whose header gives no length (BIG TCP): the frame's length decides.
    let f = Frame::eth()
        .ipv6(A6, B6)
        .tcp(1, 2, tcp_flags::ACK)
        .payload_len(1000)
        .ipv6_payload_len(0);
    let frame = f.build();
    let info = parse(&frame);
    assert_eq!(info.wire_counts(frame.len() as u32, 1), (1, 1060, 1000));
}
