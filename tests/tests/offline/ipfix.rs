//! IPFIX export into a real collector: nfdump's `nfcapd` (Debian package `nfdump`) on
//! loopback receives the exporter's messages; `nfdump` reads back what it stored, and every
//! flow's addresses, ports, protocol, packets and bytes must be what was sent, with the
//! exports of each connection summing exactly to its totals. Over TCP, a collector that is
//! down at start and one restarted mid-run get the templates first and every record.

use std::{
    collections::BTreeMap,
    io::ErrorKind,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};
use tests::ipfix_decoded;

use monitor::{
    clock::Clock,
    conntable::{Conn, EndReason, LocalNets},
    export::{Collector, IpfixConfig, IpfixExporter},
    poller::FlowSnapshot,
};
use monitor_common::{
    flow::{DirStats, FlowKey, tcp_flags},
    parse::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP},
};
use netflow_parser::NetflowParser;
use tests::nfdump::{Nfcapd, read_flows};

const SECOND: u64 = 1_000_000_000;

fn key_bytes(ip: IpAddr) -> [u8; 16] {
    monitor::addr::to_wire(ip).0
}

fn local() -> LocalNets {
    LocalNets::new(vec!["198.18.0.0/15".parse().unwrap()])
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
    let mut snap = conn.snap();
    let s = &mut snap.dir[d];
    if s.pkts == 0 {
        s.first_ns = at_ns;
    }
    s.pkts += pkts;
    s.ip_bytes += ip_bytes;
    s.last_ns = at_ns;
    s.tcp_flags |= flags;
    if d == 0 && conn.key.proto == IPPROTO_TCP && flags == tcp_flags::SYN {
        s.syn_only = 1;
    }
    conn.set_snap(snap);
}

/// (src, dst, sport, dport, proto) of each direction with traffic, as nfdump shows it
/// (ICMP: source port 0, destination port type.code), with (packets, bytes).
type Tuple = (IpAddr, IpAddr, u16, u16, u8);

fn expected(conn: &Conn) -> Vec<(Tuple, (u64, u64))> {
    let (o, r) = conn.key_endpoints();
    let proto = conn.key.proto;
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
        let stats = &conn.dir(d);
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
    // Kernel time zero is one hour ago, so the flows look recent to nfdump.
    let wall_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128;
    let clock = Clock::with_offset_ns(wall_ns - 3600 * SECOND as i128);
    let collector = Collector::Udp(SocketAddr::from(([127, 0, 0, 1], nfcapd.port)));
    let mut config = IpfixConfig::new(collector, clock);
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
        exporter.update(&local().view(&upload), None, now);
        exporter.flush();
        updates += 1;
    }
    add(&mut upload, 0, 1, 52, now + SECOND, FIN | ACK);
    add(&mut upload, 1, 2, 104, now + SECOND, FIN | ACK);
    exporter.finish(
        &local().view(&upload),
        None,
        EndReason::EndOfFlow,
        now + 6 * SECOND,
    );

    // UDP DNS, an ICMP echo, and an IPv6 TCP download, each exported once at its end.
    let mut dns = conn(
        IPPROTO_UDP,
        ("198.18.0.3", 5353),
        ("198.51.100.53", 53),
        "Cdns",
    );
    add(&mut dns, 0, 2, 140, 3 * SECOND, 0);
    add(&mut dns, 1, 2, 380, 3 * SECOND + 5_000_000, 0);
    exporter.finish(&local().view(&dns), None, EndReason::Idle, 70 * SECOND);

    let mut ping = conn(IPPROTO_ICMP, ("198.18.0.4", 8), ("203.0.113.1", 0), "Cping");
    add(&mut ping, 0, 4, 336, 4 * SECOND, 0);
    add(&mut ping, 1, 4, 336, 4 * SECOND + 20_000_000, 0);
    exporter.finish(&local().view(&ping), None, EndReason::Idle, 70 * SECOND);

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
    exporter.finish(&local().view(&v6), None, EndReason::ForcedEnd, 10 * SECOND);

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

/// A collector on TCP that reads whole IPFIX messages.
struct TcpCollector {
    listener: TcpListener,
}

impl TcpCollector {
    fn bind(port: u16) -> TcpCollector {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("binding 127.0.0.1:{port}: {e}"));
        TcpCollector { listener }
    }

    /// The exporter's next connection, within 15 s (its backoff is at most 10 s).
    fn accept(&self) -> TcpStream {
        self.listener.set_nonblocking(true).expect("nonblocking");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).expect("blocking");
                    stream
                        .set_read_timeout(Some(Duration::from_secs(5)))
                        .expect("timeout");
                    return stream;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("no connection from the exporter: {e}"),
            }
        }
    }
}

/// Reads messages from `stream` until `records` data records have arrived; each message is
/// decoded by netflow_parser with `parser`: (sequence number, templates, data records).
fn read_messages(
    stream: &mut TcpStream,
    parser: &mut NetflowParser,
    records: usize,
) -> Vec<(u32, usize, usize)> {
    let mut out = Vec::new();
    let mut seen = 0;
    while seen < records {
        let bytes =
            ipfix_decoded::read_message(stream).expect("a message before the connection ends");
        let decoded = ipfix_decoded::decode(parser, &bytes);
        let data = decoded.records.len();
        seen += data;
        out.push((decoded.sequence, decoded.templates, data));
    }
    out
}

#[test]
fn tcp_collector_down_at_start_then_restarted_gets_templates_and_the_rest() {
    // A port that nobody listens on yet: the collector is down at start.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let collector = Collector::Tcp(SocketAddr::from(([127, 0, 0, 1], port)));
    let clock = Clock::with_offset_ns(0);
    let mut config = IpfixConfig::new(collector, clock);
    // Over TCP the templates are not refreshed on a timer, however short it is.
    config.template_refresh = Duration::from_millis(1);
    let started = Instant::now();
    let mut exporter = IpfixExporter::new(config).expect("exporter with its collector down");
    let udp = |n: u16| {
        let mut c = conn(
            IPPROTO_UDP,
            ("198.18.0.2", 10_000 + n),
            ("203.0.113.9", 53),
            "Cudp",
        );
        add(&mut c, 0, 3, 300 + u64::from(n), SECOND, 0);
        add(&mut c, 1, 2, 200, SECOND, 0);
        c
    };
    // Two records per connection; the first batch while the collector is down.
    for n in 0..10 {
        exporter.finish(&local().view(&udp(n)), None, EndReason::Idle, 2 * SECOND);
        exporter.flush();
    }
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "a collector that is down delays nothing: {:?}",
        started.elapsed()
    );

    let first = TcpCollector::bind(port);
    let mut stream = first.accept();
    let mut parser = NetflowParser::default();
    let got = read_messages(&mut stream, &mut parser, 20);
    assert_eq!(
        got[0],
        (0, 4, 0),
        "the connection starts with the templates alone (IPv4, IPv6, and both translated)"
    );
    assert!(
        got[1..].iter().all(|m| m.1 == 0),
        "no template refresh on TCP: {got:?}"
    );
    let mut seq = 0;
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.0, seq, "message {i}: sequence number of the stream");
        seq += m.2 as u32;
    }

    // The collector restarts: its connection and listener go away, records keep coming.
    drop(stream);
    drop(first);
    thread::sleep(Duration::from_millis(200));
    for n in 10..25 {
        exporter.finish(&local().view(&udp(n)), None, EndReason::Idle, 3 * SECOND);
        exporter.flush();
        thread::sleep(Duration::from_millis(20));
    }
    let second = TcpCollector::bind(port);
    let mut stream = second.accept();
    let mut parser = NetflowParser::default();
    let got = read_messages(&mut stream, &mut parser, 30);
    assert_eq!(
        got[0],
        (0, 4, 0),
        "templates first on the new connection: {got:?}"
    );
    let mut seq = 0;
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.0, seq, "message {i} on the new connection");
        seq += m.2 as u32;
    }
    assert_eq!(seq, 30, "every record after the restart, none twice");
    let stats = exporter.shutdown();
    assert_eq!(stats.errors, 0, "{stats:?}");
    assert_eq!(stats.records, 50, "{stats:?}");
    // 25 data messages and one templates message per connection.
    assert_eq!(stats.messages, 27, "{stats:?}");
}

#[test]
fn tcp_collector_down_at_shutdown_counts_what_it_lost() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let collector = Collector::Tcp(SocketAddr::from(([127, 0, 0, 1], port)));
    let config = IpfixConfig::new(collector, Clock::with_offset_ns(0));
    let mut exporter = IpfixExporter::new(config).expect("exporter");
    let mut c = conn(
        IPPROTO_UDP,
        ("198.18.0.2", 1000),
        ("203.0.113.9", 53),
        "Cudp",
    );
    add(&mut c, 0, 1, 100, SECOND, 0);
    for n in 0..3 {
        exporter.finish(&local().view(&c), None, EndReason::Idle, (2 + n) * SECOND);
        exporter.flush();
    }
    let started = Instant::now();
    let stats = exporter.shutdown();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "shutdown waits a bounded time: {:?}",
        started.elapsed()
    );
    assert_eq!(
        (stats.records, stats.messages, stats.errors, stats.dropped),
        (0, 0, 3, 0),
        "three messages never sent are errors, not drops from a full queue: {stats:?}"
    );
}

#[test]
fn tcp_collector_that_never_reads_delays_nothing() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let small: libc::c_int = 4096;
    // SAFETY: setsockopt on a socket we own, with a value of the size given; accepted
    // connections inherit the small receive buffer, so the exporter's writes stall soon.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&listener),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&small as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
    let port = listener.local_addr().expect("address").port();
    // Accepts, then holds the connection without reading a byte: about 3 MB of messages
    // fill the kernel's buffers, then the exporter's writes stall.
    let holder = thread::spawn(move || listener.accept().map(|(stream, _)| stream));
    let collector = Collector::Tcp(SocketAddr::from(([127, 0, 0, 1], port)));
    let mut config = IpfixConfig::new(collector, Clock::with_offset_ns(0));
    config.queue = 8;
    let mut exporter = IpfixExporter::new(config).expect("exporter");
    let mut slowest = Duration::ZERO;
    for round in 0..1500u16 {
        for n in 0..60u16 {
            let mut c = conn(
                IPPROTO_UDP,
                ("198.18.0.2", 1000 + n),
                ("203.0.113.9", 53 + round),
                "Cudp",
            );
            add(&mut c, 0, 1, 100, SECOND, 0);
            add(&mut c, 1, 1, 100, SECOND, 0);
            exporter.finish(&local().view(&c), None, EndReason::Idle, 2 * SECOND);
        }
        let started = Instant::now();
        exporter.flush();
        slowest = slowest.max(started.elapsed());
    }
    let stats = exporter.stats();
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        exporter.stats().messages,
        stats.messages,
        "the collector's buffers are full and the sender is stuck in a write"
    );
    assert!(
        slowest < Duration::from_millis(100),
        "a collector that reads nothing delays no flush: slowest {slowest:?}"
    );
    assert!(
        stats.dropped > 0 && stats.errors >= stats.dropped,
        "the bounded queue dropped and counted: {stats:?}"
    );
    let started = Instant::now();
    exporter.shutdown();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "shutdown waits a bounded time: {:?}",
        started.elapsed()
    );
    drop(holder.join().expect("holder"));
}
