//! Replayed captures: a crafted pcap is replayed with `tcpreplay` into a two-namespace
//! lab, and the agent's conn log is compared, connection by connection, with what an
//! independent aggregator (`tests::replay::Aggregator`) makes of the same frames.
//!
//! The capture covers Zeek's conventions: orientation (first sender, unless a SYN without
//! ACK or a SYN-ACK says otherwise), ICMP request/reply pairs as one connection with type
//! and counterpart type or code in the port fields, VLAN and QinQ tags, IPv4 options,
//! IPv6 extension headers, Ethernet padding, frames cut inside a header (never counted),
//! protocols other than TCP, UDP and ICMP, later fragments (ports 0) and mid-stream TCP.
//!
//! Every frame goes to a MAC address nobody has, so the monitored namespace drops it
//! after the agent's ingress hook has counted it; both directions of every connection
//! arrive as ingress. Each replay runs with XDP (native) and with TC as the ingress hook.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use tests::{
    agent::Agent,
    packet::{Frame, ethertype, ipproto, tcp_flags::*},
    pcap,
    replay::{Aggregator, Expected, ReplayLab, assert_records},
};

const LOCAL_NETS: [&str; 2] = ["198.18.0.0/15", "2001:db8:1::/48"];
/// Sender and receiver MACs of every crafted frame (the reverse direction swaps them):
/// neither is the monitored veth's.
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x98];
const SINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
/// 2023-11-14 22:13:20 UTC: the capture's first frame.
const START: Duration = Duration::from_secs(1_700_000_000);

/// Two hosts and the VLAN tags (TPID, VID) of the frames between them.
#[derive(Clone, Copy)]
struct Hosts {
    a: IpAddr,
    b: IpAddr,
    tags: &'static [(u16, u16)],
}

fn hosts(a: &str, b: &str) -> Hosts {
    Hosts {
        a: a.parse().expect("address"),
        b: b.parse().expect("address"),
        tags: &[],
    }
}

impl Hosts {
    fn tagged(self, tags: &'static [(u16, u16)]) -> Hosts {
        Hosts { tags, ..self }
    }

    /// An IP frame from `a` to `b`.
    fn ab(&self) -> Frame {
        ip_frame(self.a, self.b, self.tags, HOST_MAC, SINK_MAC)
    }

    /// An IP frame from `b` to `a`.
    fn ba(&self) -> Frame {
        ip_frame(self.b, self.a, self.tags, SINK_MAC, HOST_MAC)
    }
}

fn ip_frame(src: IpAddr, dst: IpAddr, tags: &[(u16, u16)], smac: [u8; 6], dmac: [u8; 6]) -> Frame {
    let mut f = Frame::eth().macs(smac, dmac);
    for &(tpid, vid) in tags {
        f = f.vlan(tpid, vid);
    }
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => f.ipv4(s, d),
        (IpAddr::V6(s), IpAddr::V6(d)) => f.ipv6(s, d),
        _ => panic!("{src} and {dst} are of different families"),
    }
}

/// A TCP connection between `a:pa` and `b:pb`.
#[derive(Clone, Copy)]
struct Tcp {
    h: Hosts,
    pa: u16,
    pb: u16,
}

impl Tcp {
    fn a(&self, flags: u8, len: usize) -> Frame {
        self.h.ab().tcp(self.pa, self.pb, flags).payload_len(len)
    }

    fn b(&self, flags: u8, len: usize) -> Frame {
        self.h.ba().tcp(self.pb, self.pa, flags).payload_len(len)
    }
}

/// A UDP flow between `a:pa` and `b:pb`.
#[derive(Clone, Copy)]
struct Udp {
    h: Hosts,
    pa: u16,
    pb: u16,
}

impl Udp {
    fn a(&self, len: usize) -> Frame {
        self.h.ab().udp(self.pa, self.pb).payload_len(len)
    }

    fn b(&self, len: usize) -> Frame {
        self.h.ba().udp(self.pb, self.pa).payload_len(len)
    }
}

/// The frames of one connection, in order, each with the label that names it in
/// messages. Frames that must not count (cut short) get labels of their own.
struct Script {
    name: &'static str,
    frames: Vec<(String, Frame)>,
}

impl Script {
    fn new(name: &'static str) -> Script {
        Script {
            name,
            frames: Vec::new(),
        }
    }

    fn push(mut self, f: Frame) -> Script {
        self.frames.push((self.name.to_string(), f));
        self
    }

    /// `f` cut to `len` bytes, as a frame that must count nowhere.
    fn cut(mut self, what: &str, f: Frame, len: usize) -> Script {
        self.frames
            .push((format!("{}: {what}", self.name), f.truncate(len)));
        self
    }

    /// A frame that must count nowhere.
    fn stray(mut self, what: &str, f: Frame) -> Script {
        self.frames.push((format!("{}: {what}", self.name), f));
        self
    }
}

/// One frame of the capture.
struct Captured {
    ts: Duration,
    label: String,
    bytes: Vec<u8>,
}

fn scripts() -> Vec<Script> {
    let mut s = Vec::new();

    // Handshake with TCP options, data both ways, FIN both ways; padded bare ACKs.
    // Copies cut inside the IPv4 and TCP headers must not add to it.
    let t = Tcp {
        h: hosts("198.18.0.10", "203.0.113.5"),
        pa: 40001,
        pb: 443,
    };
    let data = t.a(PSH | ACK, 517);
    let l = data.layout();
    s.push(
        Script::new("tcp-sf")
            .push(t.a(SYN, 0).tcp_options(20))
            .push(t.b(SYN | ACK, 0).tcp_options(12))
            .push(t.a(ACK, 0).pad_to_min())
            .push(data.clone())
            .cut(
                "copy cut inside the IPv4 header",
                data.clone(),
                l.l3_off + 12,
            )
            .push(t.b(ACK, 0).pad_to_min())
            .cut(
                "copy cut inside the TCP header",
                data.clone(),
                l.l4_off + 13,
            )
            .push(t.b(PSH | ACK, 1400))
            .push(t.b(PSH | ACK, 900))
            .cut("copy cut right after the Ethernet header", data, l.l3_off)
            .push(t.a(ACK, 0).pad_to_min())
            .push(t.a(FIN | ACK, 0).pad_to_min())
            .push(t.b(FIN | ACK, 0).pad_to_min())
            .push(t.a(ACK, 0).pad_to_min()),
    );

    // The responder's side speaks first; the other side's later SYN makes it the
    // originator anyway. It closes only its own half: S2.
    let t = Tcp {
        h: hosts("198.18.0.11", "198.51.100.7"),
        pa: 40002,
        pb: 8080,
    };
    s.push(
        Script::new("tcp-late-syn")
            .push(t.b(PSH | ACK, 64))
            .push(t.a(SYN, 0).pad_to_min())
            .push(t.b(SYN | ACK, 0).pad_to_min())
            .push(t.a(ACK, 0).pad_to_min())
            .push(t.a(PSH | ACK, 10))
            .push(t.a(FIN | ACK, 0).pad_to_min()),
    );

    // The SYN was missed: the SYN-ACK comes first, and its sender is the responder.
    let t = Tcp {
        h: hosts("198.18.0.10", "192.0.2.33"),
        pa: 40003,
        pb: 22,
    };
    s.push(
        Script::new("tcp-synack-first")
            .push(t.b(SYN | ACK, 0).pad_to_min())
            .push(t.a(ACK, 0).pad_to_min())
            .push(t.a(PSH | ACK, 21))
            .push(t.b(PSH | ACK, 41))
            .push(t.a(FIN | ACK, 0).pad_to_min())
            .push(t.b(FIN | ACK, 0).pad_to_min())
            .push(t.a(ACK, 0).pad_to_min()),
    );

    // Mid-stream, the remote server's data first: the first sender is the originator.
    let t = Tcp {
        h: hosts("203.0.113.9", "198.18.0.12"),
        pa: 5432,
        pb: 40004,
    };
    s.push(
        Script::new("tcp-midstream-in")
            .push(t.a(PSH | ACK, 200))
            .push(t.b(ACK, 0).pad_to_min())
            .push(t.b(PSH | ACK, 40))
            .push(t.a(ACK, 0).pad_to_min())
            .push(t.a(PSH | ACK, 200)),
    );

    // Mid-stream over IPv6, closed with FIN both ways: still OTH.
    let t = Tcp {
        h: hosts("2001:db8:1::10", "2001:db8:2::20"),
        pa: 40005,
        pb: 443,
    };
    s.push(
        Script::new("tcp6-midstream-out")
            .push(t.a(PSH | ACK, 100))
            .push(t.b(ACK, 0))
            .push(t.b(PSH | ACK, 300))
            .push(t.a(FIN | ACK, 0))
            .push(t.b(FIN | ACK, 0))
            .push(t.a(ACK, 0)),
    );

    // Rejected: SYN (with IPv4 options), RST-ACK.
    let t = Tcp {
        h: hosts("198.18.0.10", "203.0.113.5"),
        pa: 40006,
        pb: 23,
    };
    s.push(
        Script::new("tcp-rej")
            .push(t.a(SYN, 0).ipv4_options(&[0x94, 0x04, 0, 0]))
            .push(t.b(RST | ACK, 0).pad_to_min()),
    );

    // A connection whose only frames are cut short leaves no record.
    let t = Tcp {
        h: hosts("198.18.0.99", "203.0.113.99"),
        pa: 41000,
        pb: 80,
    };
    let syn = t.a(SYN, 0).ipv4_options(&[1; 20]);
    let l = syn.layout();
    s.push(
        Script::new("tcp-cut-only (198.18.0.99:41000 -> 203.0.113.99:80)")
            .cut("SYN cut inside the TCP header", syn.clone(), l.l4_off + 12)
            .cut("SYN cut inside the IPv4 options", syn, l.l3_off + 30),
    );

    // 802.1Q and QinQ frames of one connection; untagged ones belong to it too.
    const DOT1Q: &[(u16, u16)] = &[(ethertype::VLAN, 100)];
    const QINQ: &[(u16, u16)] = &[(ethertype::QINQ, 10), (ethertype::VLAN, 100)];
    const THREE: &[(u16, u16)] = &[
        (ethertype::QINQ, 10),
        (ethertype::VLAN, 100),
        (ethertype::VLAN, 200),
    ];
    let h = hosts("198.18.0.13", "203.0.113.5");
    let (q, qq, plain, three) = (
        Tcp {
            h: h.tagged(DOT1Q),
            pa: 40007,
            pb: 80,
        },
        Tcp {
            h: h.tagged(QINQ),
            pa: 40007,
            pb: 80,
        },
        Tcp {
            h,
            pa: 40007,
            pb: 80,
        },
        Tcp {
            h: h.tagged(THREE),
            pa: 40007,
            pb: 80,
        },
    );
    s.push(
        Script::new("tcp-vlan")
            .push(q.a(SYN, 0).pad_to_min())
            .push(qq.b(SYN | ACK, 0).pad_to_min())
            .push(q.a(ACK, 0).pad_to_min())
            .stray("three VLAN tags", three.a(PSH | ACK, 77))
            .push(qq.a(PSH | ACK, 300))
            .cut("cut inside the VLAN tag", q.a(PSH | ACK, 30), 16)
            .push(plain.b(PSH | ACK, 1000))
            .push(q.a(FIN | ACK, 0).pad_to_min())
            .push(qq.b(FIN | ACK, 0).pad_to_min())
            .push(q.a(ACK, 0).pad_to_min()),
    );

    // IPv6 extension headers on every packet; the originator resets after the
    // handshake: RSTO.
    let t = Tcp {
        h: hosts("2001:db8:1::10", "2001:db8:2::20"),
        pa: 40008,
        pb: 22,
    };
    let data = t
        .a(PSH | ACK, 48)
        .ipv6_ext(ipproto::HOPOPTS, 8)
        .ipv6_ext(ipproto::AH, 24);
    let l = data.layout();
    s.push(
        Script::new("tcp6-ext")
            .push(
                t.a(SYN, 0)
                    .ipv6_ext(ipproto::HOPOPTS, 8)
                    .ipv6_ext(ipproto::DSTOPTS, 16),
            )
            .push(t.b(SYN | ACK, 0).ipv6_ext(ipproto::ROUTING, 24))
            .push(t.a(ACK, 0).ipv6_ext(ipproto::DSTOPTS, 8))
            .cut(
                "copy cut inside the IPv6 header",
                data.clone(),
                l.l3_off + 30,
            )
            .push(data.clone())
            .cut(
                "copy cut inside the authentication header",
                data,
                l.l3_off + 40 + 8 + 10,
            )
            .push(t.a(RST | ACK, 0).ipv6_ext(ipproto::HOPOPTS, 8)),
    );

    // Request and response: the first sender is the originator.
    let u = Udp {
        h: hosts("198.18.0.10", "198.51.100.53"),
        pa: 53001,
        pb: 53,
    };
    let query = u.a(33);
    let l = query.layout();
    s.push(
        Script::new("udp-dns")
            .push(query.clone())
            .push(u.b(120))
            .cut(
                "copy cut inside the UDP header",
                query.clone(),
                l.l4_off + 5,
            )
            .push(query)
            .push(u.b(200)),
    );

    // Inbound: the remote host sends first.
    let u = Udp {
        h: hosts("192.0.2.44", "198.18.0.14"),
        pa: 5060,
        pb: 5062,
    };
    s.push(
        Script::new("udp-inbound")
            .push(u.a(400))
            .push(u.b(300))
            .push(u.a(20)),
    );

    // One way only: S0.
    let u = Udp {
        h: hosts("198.18.0.10", "203.0.113.77"),
        pa: 514,
        pb: 514,
    };
    s.push(
        Script::new("udp-oneway")
            .push(u.a(90))
            .push(u.a(110))
            .push(u.a(5).pad_to_min()),
    );

    // Minimum-size frames: Ethernet padding is not IP.
    let u = Udp {
        h: hosts("198.18.0.15", "203.0.113.7"),
        pa: 7,
        pb: 7007,
    };
    s.push(
        Script::new("udp-padded")
            .push(u.a(1).pad_to_min())
            .push(u.b(1).pad_to_min())
            .push(u.a(0).pad_to_min())
            .push(u.b(17).eth_padding(9)),
    );

    // QinQ on every frame.
    let u = Udp {
        h: hosts("198.18.0.16", "203.0.113.8").tagged(QINQ),
        pa: 4789,
        pb: 4789,
    };
    s.push(Script::new("udp-qinq").push(u.a(150)).push(u.b(50)));

    // IPv4 options of several lengths: IP bytes but not payload.
    let u = Udp {
        h: hosts("198.18.0.17", "203.0.113.123"),
        pa: 123,
        pb: 123,
    };
    let long = u.a(48).ipv4_options(&[1; 40]);
    let l = long.layout();
    s.push(
        Script::new("udp-ipv4-options")
            .push(u.a(48).ipv4_options(&[0x94, 0x04, 0, 0]))
            .push(u.b(48).ipv4_options(&[1; 11]))
            .cut(
                "copy cut inside the IPv4 options",
                long.clone(),
                l.l3_off + 44,
            )
            .push(long),
    );

    // Cut inside the payload, headers whole: counts what the frame holds, not the
    // lengths its headers claim.
    let u = Udp {
        h: hosts("198.18.0.22", "203.0.113.22"),
        pa: 6000,
        pb: 6001,
    };
    let big = u.a(500);
    let l = big.layout();
    s.push(Script::new("udp-snaplen").push(big.truncate(l.payload_off + 20)));

    // Both ends local; both remote.
    let u = Udp {
        h: hosts("198.18.0.10", "198.19.0.5"),
        pa: 60000,
        pb: 9999,
    };
    s.push(Script::new("udp-local-local").push(u.a(64)).push(u.b(64)));
    let u = Udp {
        h: hosts("192.0.2.1", "198.51.100.1"),
        pa: 1111,
        pb: 2222,
    };
    s.push(Script::new("udp-remote-remote").push(u.a(80)));

    // Echo request and reply: one connection, orig_p 8 (request), resp_p 0 (reply).
    let h = hosts("198.18.0.10", "203.0.113.5");
    let request = h.ab().icmp(8, 0).payload_len(56);
    let l = request.layout();
    s.push(
        Script::new("icmp-echo")
            .push(request.clone())
            .push(h.ba().icmp(0, 0).payload_len(56))
            .cut(
                "copy cut inside the ICMP header",
                request.clone(),
                l.l4_off + 4,
            )
            .push(request.clone())
            .push(h.ba().icmp(0, 0).payload_len(56))
            .push(request),
    );
    let h = hosts("198.51.100.7", "198.18.0.11");
    s.push(
        Script::new("icmp-echo-in")
            .push(h.ab().icmp(8, 0).payload_len(32))
            .push(h.ba().icmp(0, 0).payload_len(32)),
    );
    let h = hosts("2001:db8:1::10", "2001:db8:2::20");
    s.push(
        Script::new("icmp6-echo")
            .push(h.ab().icmpv6(128, 0).payload_len(56))
            .push(h.ba().icmpv6(129, 0).payload_len(56))
            .push(h.ab().icmpv6(128, 0).payload_len(56))
            .push(h.ba().icmpv6(129, 0).payload_len(56)),
    );

    // Errors: the code in the second port slot.
    let h = hosts("203.0.113.1", "198.18.0.10");
    s.push(
        Script::new("icmp-unreachable")
            .push(h.ab().icmp(3, 1).payload_len(28))
            .push(h.ab().icmp(3, 1).payload_len(28)),
    );
    let h = hosts("192.0.2.254", "198.18.0.10");
    s.push(Script::new("icmp-time-exceeded").push(h.ab().icmp(11, 0).payload_len(36)));
    let h = hosts("2001:db8:2::1", "2001:db8:1::10");
    s.push(Script::new("icmp6-unreachable").push(h.ab().icmpv6(1, 4).payload_len(48)));

    // Other protocols: no ports, the whole IP payload is payload.
    let h = hosts("198.18.0.20", "203.0.113.200");
    s.push(
        Script::new("gre")
            .push(h.ab().proto(ipproto::GRE).payload_len(44))
            .push(h.ba().proto(ipproto::GRE).payload_len(44))
            .push(h.ab().proto(ipproto::GRE).payload_len(104))
            .push(h.ba().proto(ipproto::GRE).payload_len(4).pad_to_min()),
    );
    let h = hosts("2001:db8:1::30", "2001:db8:2::30");
    s.push(
        Script::new("ipv6-proto-253")
            .push(h.ab().proto(253).payload_len(20))
            .push(h.ab().proto(253).payload_len(20).eth_padding(8)),
    );

    // Fragments: the first carries the ports, later ones count under ports 0.
    let u = Udp {
        h: hosts("198.18.0.21", "203.0.113.21"),
        pa: 5000,
        pb: 5001,
    };
    s.push(Script::new("udp-first-fragment").push(u.a(96).ipv4_id(7).ipv4_fragment(0, true)));
    s.push(Script::new("udp-later-fragment").push(u.a(50).ipv4_id(7).ipv4_fragment(13, false)));
    let u = Udp {
        h: hosts("2001:db8:1::21", "2001:db8:2::21"),
        pa: 5000,
        pb: 5001,
    };
    s.push(Script::new("udp6-first-fragment").push(u.a(96).ipv6_fragment(0, true)));
    s.push(
        Script::new("udp6-later-fragment").push(
            u.a(50)
                .ipv6_ext(ipproto::HOPOPTS, 8)
                .ipv6_fragment(13, false),
        ),
    );

    // Not IP at all.
    s.push(
        Script::new("non-ip").stray(
            "local experimental EtherType",
            Frame::eth()
                .macs(HOST_MAC, SINK_MAC)
                .ethertype(ethertype::LOCAL_EXPERIMENTAL)
                .payload_len(46),
        ),
    );
    s
}

/// The scripts interleaved round-robin (each keeps its own order), about a millisecond
/// apart.
fn capture() -> Vec<Captured> {
    let scripts = scripts();
    let rounds = scripts.iter().map(|s| s.frames.len()).max().unwrap_or(0);
    let mut out = Vec::new();
    for round in 0..rounds {
        for script in &scripts {
            if let Some((label, frame)) = script.frames.get(round) {
                let i = out.len() as u64;
                out.push(Captured {
                    ts: START + Duration::from_micros(i * 1000 + (i * 337) % 400),
                    label: label.clone(),
                    bytes: frame.build(),
                });
            }
        }
    }
    out
}

fn aggregate(frames: &[Captured]) -> Aggregator {
    let mut agg = Aggregator::new(&LOCAL_NETS);
    for f in frames {
        agg.add(&f.label, &f.bytes);
    }
    agg
}

fn v4(text: &str) -> IpAddr {
    text.parse::<Ipv4Addr>().expect("IPv4 address").into()
}

fn v6(text: &str) -> IpAddr {
    text.parse::<Ipv6Addr>().expect("IPv6 address").into()
}

/// The aggregator's expectations, checked by hand for the conventions the replay tests
/// rely on: a wrong model would otherwise agree with a wrong agent.
#[test]
fn aggregator_follows_zeek_conventions() {
    let frames = capture();
    let agg = aggregate(&frames);
    let get = |label: &str| agg.get(label);
    let tuple = |e: &Expected| (e.proto.clone(), e.orig, e.resp);
    let counts = |e: &Expected| {
        (
            (e.orig_pkts, e.orig_ip_bytes, e.orig_bytes),
            (e.resp_pkts, e.resp_ip_bytes, e.resp_bytes),
        )
    };
    let flags = |e: &Expected| (e.conn_state, e.missed_start, e.local_orig, e.local_resp);

    let e = get("tcp-sf");
    assert_eq!(
        tuple(&e),
        (
            "tcp".into(),
            (v4("198.18.0.10"), 40001),
            (v4("203.0.113.5"), 443)
        )
    );
    // SYN 20+40, ACK 40, data 40+517, ACK, FIN, ACK; SYN-ACK 20+32, ACK, 40+1400, 40+900, FIN.
    assert_eq!(counts(&e), ((6, 777, 517), (5, 2512, 2300)));
    assert_eq!(flags(&e), ("SF", false, true, false));

    let e = get("tcp-late-syn");
    assert_eq!(e.orig, (v4("198.18.0.11"), 40002));
    assert_eq!(counts(&e), ((4, 170, 10), (2, 144, 64)));
    assert_eq!(flags(&e), ("S2", false, true, false));

    let e = get("tcp-synack-first");
    assert_eq!(e.orig, (v4("198.18.0.10"), 40003));
    assert_eq!(flags(&e), ("SHR", true, true, false));

    let e = get("tcp-midstream-in");
    assert_eq!(e.orig, (v4("203.0.113.9"), 5432));
    assert_eq!(counts(&e), ((3, 520, 400), (2, 120, 40)));
    assert_eq!(flags(&e), ("OTH", true, false, true));

    assert_eq!(
        flags(&get("tcp6-midstream-out")),
        ("OTH", true, true, false)
    );
    assert_eq!(get("tcp-rej").conn_state, "REJ");
    assert_eq!(counts(&get("tcp-rej")), ((1, 44, 0), (1, 40, 0)));

    let e = get("tcp-vlan");
    assert_eq!(counts(&e), ((5, 500, 300), (3, 1120, 1000)));
    assert_eq!(flags(&e), ("SF", false, true, false));

    let e = get("tcp6-ext");
    // SYN 40+24+20, ACK 40+8+20, data 40+32+20+48, RST 40+8+20; SYN-ACK 40+24+20.
    assert_eq!(counts(&e), ((4, 360, 48), (1, 84, 0)));
    assert_eq!(e.conn_state, "RSTO");

    let e = get("udp-dns");
    assert_eq!(counts(&e), ((2, 122, 66), (2, 376, 320)));
    assert_eq!(flags(&e), ("SF", false, true, false));
    assert_eq!(get("udp-inbound").orig, (v4("192.0.2.44"), 5060));
    assert_eq!(flags(&get("udp-inbound")), ("SF", false, false, true));
    assert_eq!(get("udp-oneway").conn_state, "S0");
    assert_eq!(counts(&get("udp-padded")), ((2, 57, 1), (2, 74, 18)));
    assert_eq!(
        counts(&get("udp-ipv4-options")),
        ((2, 196, 96), (1, 88, 48))
    );
    assert_eq!(counts(&get("udp-snaplen")), ((1, 48, 20), (0, 0, 0)));
    assert_eq!(flags(&get("udp-local-local")), ("SF", false, true, true));
    assert_eq!(
        flags(&get("udp-remote-remote")),
        ("S0", false, false, false)
    );

    let e = get("icmp-echo");
    assert_eq!(
        tuple(&e),
        (
            "icmp".into(),
            (v4("198.18.0.10"), 8),
            (v4("203.0.113.5"), 0)
        )
    );
    assert_eq!(counts(&e), ((3, 252, 168), (2, 168, 112)));
    assert_eq!(e.conn_state, "SF");
    assert_eq!(get("icmp-echo-in").orig, (v4("198.51.100.7"), 8));
    let e = get("icmp6-echo");
    assert_eq!(
        tuple(&e),
        (
            "icmp".into(),
            (v6("2001:db8:1::10"), 128),
            (v6("2001:db8:2::20"), 129)
        )
    );
    let e = get("icmp-unreachable");
    assert_eq!(
        tuple(&e),
        (
            "icmp".into(),
            (v4("203.0.113.1"), 3),
            (v4("198.18.0.10"), 1)
        )
    );
    assert_eq!(counts(&e), ((2, 112, 56), (0, 0, 0)));
    assert_eq!(get("icmp-time-exceeded").resp.1, 0);
    assert_eq!(
        (
            get("icmp6-unreachable").orig.1,
            get("icmp6-unreachable").resp.1
        ),
        (1, 4)
    );

    let e = get("gre");
    assert_eq!(
        tuple(&e),
        (
            "gre".into(),
            (v4("198.18.0.20"), 0),
            (v4("203.0.113.200"), 0)
        )
    );
    assert_eq!(counts(&e), ((2, 188, 148), (2, 88, 48)));
    assert_eq!(counts(&get("ipv6-proto-253")), ((2, 120, 40), (0, 0, 0)));
    assert_eq!(get("ipv6-proto-253").proto, "253");

    assert_eq!(get("udp-first-fragment").orig.1, 5000);
    assert_eq!(
        tuple(&get("udp-later-fragment")),
        (
            "udp".into(),
            (v4("198.18.0.21"), 0),
            (v4("203.0.113.21"), 0)
        )
    );
    assert_eq!(counts(&get("udp-later-fragment")), ((1, 70, 50), (0, 0, 0)));
    assert_eq!(get("udp6-later-fragment").orig.1, 0);
    assert_eq!(
        counts(&get("udp6-later-fragment")),
        ((1, 106, 50), (0, 0, 0))
    );

    let uncounted: Vec<&str> = agg.uncounted().iter().map(String::as_str).collect();
    assert_eq!(
        uncounted.len(),
        13,
        "frames cut short, three tags, non-IP: {uncounted:#?}"
    );
    assert!(
        agg.expected().iter().all(|e| !e.label.contains("cut-only")),
        "a connection of cut frames only"
    );
    assert_eq!(agg.expected().len(), 29);
}

/// The pcap file holds exactly the crafted frames, timestamps in order.
#[test]
fn capture_file_round_trips() {
    let frames = capture();
    let dir = tempdir("roundtrip");
    let path = dir.join("capture.pcap");
    write_capture(&path, &frames);
    let records = pcap::read_file(&path);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(records.len(), frames.len());
    for (i, (r, f)) in records.iter().zip(&frames).enumerate() {
        assert_eq!(
            (r.ts, &r.data, r.orig_len as usize),
            (f.ts, &f.bytes, f.bytes.len()),
            "record {i} ({})",
            f.label
        );
    }
    assert!(records.windows(2).all(|w| w[0].ts < w[1].ts));
}

fn tempdir(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("monitor-replay-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

fn write_capture(path: &std::path::Path, frames: &[Captured]) {
    let records: Vec<(Duration, Vec<u8>)> =
        frames.iter().map(|f| (f.ts, f.bytes.clone())).collect();
    pcap::write_file(path, &records);
}

#[derive(Clone, Copy, Debug)]
enum Hook {
    /// The default: XDP ingress (native), TC egress.
    Xdp,
    Tc,
}

impl Hook {
    fn args(self) -> &'static [&'static str] {
        match self {
            Hook::Xdp => &["--ingress-hook", "xdp", "--xdp-mode", "native"],
            Hook::Tc => &["--ingress-hook", "tc"],
        }
    }
}

fn replay_case(hook: Hook) {
    let frames = capture();
    let agg = aggregate(&frames);
    let expected = agg.expected();

    let lab = ReplayLab::new();
    let dir = tempdir(&format!("{hook:?}").to_lowercase());
    let path = dir.join("capture.pcap");
    write_capture(&path, &frames);

    let mut args = Vec::new();
    for net in LOCAL_NETS {
        args.extend(["--local-net", net]);
    }
    args.extend(["--poll-interval", "200ms"]);
    args.extend(hook.args());
    let agent = Agent::start(&lab.mon_ns, &lab.mon_if, &args);
    lab.wait_quiet();
    let before = lab.mon_counters();
    lab.replay(&path, frames.len() as u64, before);
    let records = agent.stop();
    let _ = std::fs::remove_dir_all(&dir);

    assert_records(
        &format!(
            "{hook:?} ingress, {} frames replayed ({} count nowhere: {:?})",
            frames.len(),
            agg.uncounted().len(),
            agg.uncounted()
        ),
        &expected,
        &records,
        &lab.mon_if,
    );
}

#[test]
fn replay_xdp_native() {
    replay_case(Hook::Xdp);
}

#[test]
fn replay_tc() {
    replay_case(Hook::Tc);
}
