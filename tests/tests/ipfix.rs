//! IPFIX export into a real collector: nfdump's `nfcapd` (Debian package `nfdump`) on
//! loopback receives the exporter's messages; `nfdump` reads back what it stored, and every
//! flow's addresses, ports, protocol, packets and bytes must be what was sent, with the
//! exports of each connection summing exactly to its totals.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use monitor::{
    clock::Clock,
    conntable::{Conn, LocalNets},
    export::{Collector, EndReason, IpfixConfig, IpfixExporter},
    poller::FlowSnapshot,
};
use monitor_common::{
    flow::{DirStats, FlowKey, tcp_flags},
    parse::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP},
};
use tests::nfdump::{Nfcapd, read_flows};

const SECOND: u64 = 1_000_000_000;

fn key_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => {
            let mut out = [0; 16];
            out[..4].copy_from_slice(&v4.octets());
            out
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// A connection from `orig` to `resp`; `dir[0]` is the originator's direction.
fn conn(proto: u8, orig: (&str, u16), resp: (&str, u16), uid: &str) -> Conn {
    let (a, b): (IpAddr, IpAddr) = (orig.0.parse().unwrap(), resp.0.parse().unwrap());
    Conn::new(
        FlowSnapshot {
            key: FlowKey {
                addr_a: key_bytes(a),
                addr_b: key_bytes(b),
                port_a: orig.1,
                port_b: resp.1,
                proto,
                family: if a.is_ipv4() { 4 } else { 6 },
                _pad: [0; 2],
            },
            dir: [DirStats::default(); 2],
            ifindex: 1,
        },
        uid.parse().expect("a uid"),
    )
}

/// Adds `pkts` packets of `ip_bytes` in total to direction `d` at kernel time `at_ns`.
fn add(conn: &mut Conn, d: usize, pkts: u64, ip_bytes: u64, at_ns: u64, flags: u8) {
    let s = &mut conn.snap.dir[d];
    if s.pkts == 0 {
        s.first_ns = at_ns;
    }
    s.pkts += pkts;
    s.ip_bytes += ip_bytes;
    s.last_ns = at_ns;
    s.tcp_flags |= flags;
    if d == 0 && conn.snap.key.proto == IPPROTO_TCP && flags == tcp_flags::SYN {
        s.syn_only = 1;
    }
}

/// (src, dst, sport, dport, proto) of each direction with traffic, as nfdump shows it
/// (ICMP: source port 0, destination port type.code), with (packets, bytes).
type Tuple = (IpAddr, IpAddr, u16, u16, u8);

fn expected(conn: &Conn) -> Vec<(Tuple, (u64, u64))> {
    let (o, r) = conn.key_endpoints();
    let proto = conn.snap.key.proto;
    let ports = |src: u16, dst: u16| {
        if proto == IPPROTO_ICMP {
            // Echo request 8 / reply 0: each side's key port is the type it sends, the
            // code is 0.
            (0, src << 8)
        } else {
            (src, dst)
        }
    };
    let mut out = Vec::new();
    for (d, (s, t)) in [(o, r), (r, o)].into_iter().enumerate() {
        let stats = &conn.snap.dir[d];
        if stats.pkts > 0 {
            let (sp, dp) = ports(s.port, t.port);
            out.push((
                (s.addr, t.addr, sp, dp, proto),
                (stats.pkts, stats.ip_bytes),
            ));
        }
    }
    out
}

#[test]
fn nfcapd_stores_exact_counts_and_active_timeout_exports() {
    let mut nfcapd = Nfcapd::start();
    let local = LocalNets::new(vec!["198.18.0.0/15".parse().unwrap()]);
    // Kernel time zero is one hour ago, so the flows look recent to nfdump.
    let wall_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128;
    let clock = Clock::with_offset_ns(wall_ns - 3600 * SECOND as i128);
    let collector: Collector = format!("udp://127.0.0.1:{}", nfcapd.port)
        .parse()
        .expect("collector URL");
    let mut config = IpfixConfig::new(collector, local, clock);
    config.active_timeout = Duration::from_secs(5);
    let mut exporter = IpfixExporter::new(config).expect("exporter");

    use tcp_flags::{ACK, FIN, PSH, SYN};
    // A TCP upload over 20 s: updates every second, exported every 5 s, then closed.
    let mut upload = conn(
        IPPROTO_TCP,
        ("198.18.0.2", 40000),
        ("203.0.113.9", 443),
        "Cupload",
    );
    add(&mut upload, 0, 1, 60, SECOND, SYN);
    add(&mut upload, 1, 1, 60, SECOND + 1_000_000, SYN | ACK);
    let mut now = SECOND;
    let mut updates = 0;
    for step in 1..=20u64 {
        now = (1 + step) * SECOND;
        add(
            &mut upload,
            0,
            100 + step,
            140_000 + step * 7,
            now,
            ACK | PSH,
        );
        add(&mut upload, 1, 50, 2600 + step, now, ACK);
        exporter.update(&upload, now);
        exporter.flush();
        updates += 1;
    }
    add(&mut upload, 0, 1, 52, now + SECOND, FIN | ACK);
    add(&mut upload, 1, 2, 104, now + SECOND, FIN | ACK);
    exporter.finish(&upload, EndReason::EndOfFlow, now + 6 * SECOND);

    // UDP DNS, an ICMP echo, and an IPv6 TCP download, each exported once at its end.
    let mut dns = conn(
        IPPROTO_UDP,
        ("198.18.0.3", 5353),
        ("198.51.100.53", 53),
        "Cdns",
    );
    add(&mut dns, 0, 2, 140, 3 * SECOND, 0);
    add(&mut dns, 1, 2, 380, 3 * SECOND + 5_000_000, 0);
    exporter.finish(&dns, EndReason::Idle, 70 * SECOND);

    let mut ping = conn(IPPROTO_ICMP, ("198.18.0.4", 8), ("203.0.113.1", 0), "Cping");
    add(&mut ping, 0, 4, 336, 4 * SECOND, 0);
    add(&mut ping, 1, 4, 336, 4 * SECOND + 20_000_000, 0);
    exporter.finish(&ping, EndReason::Idle, 70 * SECOND);

    let mut v6 = conn(
        IPPROTO_TCP,
        ("2001:db8:1::2", 50000),
        ("2001:db8:2::80", 80),
        "Cv6",
    );
    add(&mut v6, 0, 1, 80, 5 * SECOND, SYN);
    add(&mut v6, 1, 1, 80, 5 * SECOND, SYN | ACK);
    add(&mut v6, 0, 900, 72_000, 9 * SECOND, ACK);
    add(&mut v6, 1, 1500, 2_160_000, 9 * SECOND, ACK | PSH);
    exporter.finish(&v6, EndReason::ForcedEnd, 10 * SECOND);

    let stats = exporter.shutdown();
    assert_eq!(updates, 20);
    // The upload: 4 active-timeout exports (both directions each) plus the final pair.
    assert_eq!(stats.errors, 0, "{stats:?}");
    assert_eq!(stats.records, 10 + 2 + 2 + 2, "{stats:?}");
    // nfcapd reads its socket on its own time: let it drain before stopping it.
    thread::sleep(Duration::from_millis(500));
    let files = nfcapd.stop();
    assert!(!files.is_empty(), "nfcapd wrote no file");
    let flows = read_flows(&files);
    assert_eq!(
        flows.len() as u64,
        stats.records,
        "nfdump shows every record sent: {flows:#?}"
    );

    let mut sums: BTreeMap<Tuple, (u64, u64, usize)> = BTreeMap::new();
    for f in &flows {
        let e = sums
            .entry((f.src, f.dst, f.src_port, f.dst_port, f.proto))
            .or_default();
        e.0 += f.packets;
        e.1 += f.bytes;
        e.2 += 1;
    }
    let mut want: BTreeMap<Tuple, (u64, u64)> = BTreeMap::new();
    for c in [&upload, &dns, &ping, &v6] {
        want.extend(expected(c));
    }
    let got: BTreeMap<Tuple, (u64, u64)> = sums.iter().map(|(k, v)| (*k, (v.0, v.1))).collect();
    assert_eq!(got, want, "per-direction sums as nfdump reports them");
    let upload_out = sums
        .iter()
        .find(|(k, _)| k.2 == 40000)
        .map(|(_, v)| v.2)
        .expect("upload in nfdump's flows");
    assert_eq!(
        upload_out, 5,
        "the upload's originator direction: 4 active-timeout + final"
    );
}
