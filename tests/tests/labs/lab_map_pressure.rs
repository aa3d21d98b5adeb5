//! Map pressure: a flood of ten times more connections than the kernel flow map holds,
//! while a large upload runs through the gateway.
//!
//! The agent watches gw's WAN veth with `--flow-map-size 4096`. A paced 40 MB upload from
//! the lan host to the wan host runs for about six seconds; meanwhile the wan host's veth
//! replays (tcpreplay) a pcap of 40,960 single-packet UDP flows, several times. The flood
//! frames are addressed to a MAC that is not gw's: gw's TC ingress hook sees them, then
//! gw's stack drops them (PACKET_OTHERHOST), so they cross the WAN link only as gw rx and
//! nothing of them is forwarded or answered.
//!
//! The agent must stay up, show the pressure (`egress_monitor_flow_map_full_total`), alert
//! on the upload once, and count the upload exactly: its entry was in the map before the
//! flood, and a full map never displaces an existing entry.
//!
//! Ground truth, as in `lab_counts.rs`: the upload direction is gw's WAN veth tx; the
//! download direction is the wan host's veth tx less the flood frames, whose number and IP
//! bytes the generator knows exactly (every flood frame is the same size). Cross-checks:
//! everything gw sent to the WAN came from the LAN, everything gw sent to the LAN came from
//! the WAN apart from the flood, and gw's stack dropped exactly the flood frames.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use tests::{
    agent::{Agent, ConnRecord},
    flood, http,
    lab::{self, Counters, Lab},
    rules_lab::{Scratch, read_json_lines},
    traffic::{self, TcpInfo},
};

const MAP_SIZE: u32 = 4096;
/// Distinct connections in one replay of the flood: ten times the map.
const FLOOD_FLOWS: u32 = 10 * MAP_SIZE;
const MIN_REPLAYS: u32 = 2;
const MAX_REPLAYS: u32 = 4;
/// Longer than the agent's 2 s minimum idle time for pressure relief: between replays
/// the agent finishes the idle flood connections early, and the next replay refills the
/// map, all while the upload runs.
const REPLAY_PAUSE: Duration = Duration::from_millis(2600);

const UPLOAD: u64 = 40_000_000;
const UPLOAD_STEPS: u64 = 120;
const UPLOAD_STEP: Duration = Duration::from_millis(50);
const UPLOAD_PORT: u16 = 5001;
const CHUNK: usize = 64 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(30);

const METRICS_ADDR: &str = "127.0.0.1:9877";
const MAP_FULL_METRIC: &str = "egress_monitor_flow_map_full_total";
const RELIEF_WARNING: &str = "flow map over 90% full: finishing ";

/// Drop counters `lab::counters` does not read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Drops {
    rx_dropped: u64,
    tx_dropped: u64,
    /// Frames the stack dropped for not being addressed to this host (absent: 0).
    rx_otherhost_dropped: u64,
}

fn drops(ns: &str, dev: &str) -> Drops {
    let text = lab::ip(&["-n", ns, "-s", "-s", "-j", "link", "show", "dev", dev]);
    let json: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("ip -j output for {ns}/{dev} is not JSON ({e}): {text}"));
    let stats = &json[0]["stats64"];
    let get = |dir: &str, what: &str| {
        stats[dir][what]
            .as_u64()
            .unwrap_or_else(|| panic!("no stats64.{dir}.{what} for {ns}/{dev} in {text}"))
    };
    Drops {
        rx_dropped: get("rx", "dropped"),
        tx_dropped: get("tx", "dropped"),
        // iproute2 prints it (with -s -s) only when it is not 0.
        rx_otherhost_dropped: stats["rx"]["otherhost"].as_u64().unwrap_or(0),
    }
}

/// (counters, drops) of the four lab veths, in `Lab::interfaces` order.
fn snapshot(lab: &Lab) -> Vec<(Counters, Drops)> {
    lab.interfaces()
        .iter()
        .map(|(ns, dev)| (lab::counters(ns, dev), drops(ns, dev)))
        .collect()
}

/// gw's IP-level counters: what its own stack sent, and what it forwarded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct GwIp {
    /// IPv4 packets gw's stack originated (`Ip: OutRequests`).
    out_requests: u64,
    /// IPv6 packets gw's stack originated (`Ip6OutRequests`).
    out6_requests: u64,
    /// IPv4 packets forwarded, GSO aggregates counted once (`Ip: ForwDatagrams`).
    forwarded: u64,
}

impl GwIp {
    fn read(ns: &str) -> GwIp {
        let snmp = lab::Snmp::read(ns);
        let ip = |field: &str| snmp.get("Ip", field);
        let snmp6 = lab::ns_exec(ns, &["cat", "/proc/net/snmp6"]);
        let out6_requests = snmp6
            .lines()
            .find_map(|l| l.strip_prefix("Ip6OutRequests"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("in {ns}: no Ip6OutRequests in /proc/net/snmp6"));
        GwIp {
            out_requests: ip("OutRequests"),
            out6_requests,
            forwarded: ip("ForwDatagrams"),
        }
    }

    fn since(self, earlier: GwIp) -> GwIp {
        GwIp {
            out_requests: self.out_requests - earlier.out_requests,
            out6_requests: self.out6_requests - earlier.out6_requests,
            forwarded: self.forwarded - earlier.forwarded,
        }
    }
}

/// One direction on one veth: packets and IP bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Wire {
    pkts: u64,
    ip_bytes: u64,
}

/// The agent's flow_map_full counter, or None while /metrics does not answer.
fn map_full(lab: &Lab) -> Option<u64> {
    let body = http::get(&lab.gw, METRICS_ADDR, "/metrics")?;
    let line = body
        .lines()
        .find(|l| l.split_whitespace().next() == Some(MAP_FULL_METRIC))
        .unwrap_or_else(|| panic!("/metrics has no {MAP_FULL_METRIC}:\n{body}"));
    let value: f64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad {MAP_FULL_METRIC} line: {line}"));
    Some(value as u64)
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn running(pid: u32) -> Result<(), String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("no /proc/{pid}/stat: {e}"))?;
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("?");
    match state {
        "Z" | "X" | "x" => Err(format!("process {pid} is in state {state}: {stat}")),
        _ => Ok(()),
    }
}

/// Keeps the calling thread on one CPU (both ends of the upload share it, as in
/// `traffic`: packets a veth takes from different CPUs can be reordered, and TCP would
/// retransmit them).
fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET stays within it for cpu < CPU_SETSIZE.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set)
    };
    assert_eq!(
        rc,
        0,
        "pin thread to CPU {cpu}: {}",
        io::Error::last_os_error()
    );
}

/// The CPU the calling thread runs on now.
fn current_cpu() -> usize {
    // SAFETY: plain syscall.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).unwrap_or_else(|_| panic!("sched_getcpu: {}", io::Error::last_os_error()))
}

fn set_timeouts(stream: &TcpStream) {
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
}

fn read_to_eof(stream: &mut TcpStream, who: &str) -> u64 {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("{who}: read after {total} bytes: {e}"),
        }
    }
}

/// What the upload's two ends counted.
#[derive(Debug)]
struct Upload {
    client: SocketAddr,
    server: SocketAddr,
    written: u64,
    server_received: u64,
    client_info: TcpInfo,
    duration: Duration,
}

/// A paced upload: connected at once; a writer thread then writes `UPLOAD` bytes in
/// `UPLOAD_STEPS` steps `UPLOAD_STEP` apart, half-closes, and waits for the server's close.
struct PacedUpload {
    client: SocketAddr,
    server: SocketAddr,
    writer: thread::JoinHandle<(u64, TcpInfo, Duration)>,
    reader: thread::JoinHandle<u64>,
}

impl PacedUpload {
    fn start(lab: &Lab) -> PacedUpload {
        let server = SocketAddr::new(lab::WAN_HOST_V4.into(), UPLOAD_PORT);
        let listener = lab::run_in_ns(&lab.wan, move || TcpListener::bind(server))
            .unwrap_or_else(|e| panic!("bind upload server {server}: {e}"));
        let mut stream = lab::run_in_ns(&lab.lan, move || {
            TcpStream::connect_timeout(&server, Duration::from_secs(10))
        })
        .unwrap_or_else(|e| panic!("connect to {server}: {e}"));
        set_timeouts(&stream);
        let client = stream.local_addr().expect("client address");
        let mut accepted = traffic::accept_within(&listener, Duration::from_secs(10));
        drop(listener);
        set_timeouts(&accepted);
        let cpu = current_cpu();
        let reader = thread::Builder::new()
            .name("upload server".into())
            .spawn(move || {
                pin_to_cpu(cpu);
                let n = read_to_eof(&mut accepted, "upload server");
                accepted
                    .shutdown(Shutdown::Write)
                    .unwrap_or_else(|e| panic!("upload server: shutdown(Write): {e}"));
                n
            })
            .expect("spawn upload server thread");
        let writer = thread::Builder::new()
            .name("upload client".into())
            .spawn(move || {
                pin_to_cpu(cpu);
                let chunk: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
                let per_step = UPLOAD.div_ceil(UPLOAD_STEPS);
                let start = Instant::now();
                let mut written = 0u64;
                for step in 0..UPLOAD_STEPS {
                    let due = start + UPLOAD_STEP * step as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                    let goal = (written + per_step).min(UPLOAD);
                    while written < goal {
                        let n = (goal - written).min(CHUNK as u64) as usize;
                        stream.write_all(&chunk[..n]).unwrap_or_else(|e| {
                            panic!("upload client: write after {written} of {UPLOAD} bytes: {e}")
                        });
                        written += n as u64;
                    }
                }
                stream
                    .shutdown(Shutdown::Write)
                    .unwrap_or_else(|e| panic!("upload client: shutdown(Write): {e}"));
                let back = read_to_eof(&mut stream, "upload client");
                assert_eq!(back, 0, "upload client: the server sent data");
                (written, traffic::tcp_info(&stream), start.elapsed())
            })
            .expect("spawn upload client thread");
        PacedUpload {
            client,
            server,
            writer,
            reader,
        }
    }

    fn writing(&self) -> bool {
        !self.writer.is_finished()
    }

    fn join(self) -> Upload {
        let (written, client_info, duration) = match self.writer.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        let server_received = match self.reader.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        Upload {
            client: self.client,
            server: self.server,
            written,
            server_received,
            client_info,
            duration,
        }
    }
}

/// (warning lines, connections they finished in all) in the agent's stderr.
fn relief_warnings(stderr: &str) -> (u64, u64) {
    let mut lines = 0;
    let mut finished = 0;
    for line in stderr.lines() {
        if let Some(rest) = line.split_once(RELIEF_WARNING).map(|(_, rest)| rest) {
            lines += 1;
            finished += rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no count in the relief warning: {line}"));
        }
    }
    (lines, finished)
}

#[test]
fn flood_of_ten_times_the_map_leaves_a_large_upload_exact() {
    let test_start = Instant::now();
    let lab = Lab::new();
    let scratch = Scratch::new("map-pressure");
    let flood_pcap = scratch.path("flood.pcap");
    let (flood_frames, flood_ip_len) = flood::write(&flood_pcap, FLOOD_FLOWS);
    let alert_log = scratch.path("alerts.jsonl");
    let alert_arg = alert_log.to_str().expect("UTF-8 temp path").to_string();
    let map_size = MAP_SIZE.to_string();
    let agent = Agent::start(
        &lab.gw,
        &lab.gw_wan_if,
        &[
            "--flow-map-size",
            &map_size,
            "--local-net",
            lab::LOCAL_NET_V4,
            "--poll-interval",
            "200ms",
            "--upload-threshold",
            "10MB",
            "--upload-min-packets",
            "100",
            "--alert-log",
            &alert_arg,
        ],
    );
    let map_full_at_start =
        http::eventually("agent /metrics answers", Duration::from_secs(10), || {
            map_full(&lab)
        });
    assert_eq!(map_full_at_start, 0, "map full before any traffic");

    // Bytes per frame beyond IP that each tx counter counts (probed; 14 unless XDP).
    lab.wait_quiet();
    let l2: Vec<u64> = lab
        .interfaces()
        .iter()
        .map(|(ns, dev)| lab.tx_l2_bytes(ns, dev))
        .collect();
    let [lan_l2, gw_lan_l2, gw_wan_l2, wan_l2] = [l2[0], l2[1], l2[2], l2[3]];
    lab.wait_quiet();
    let before = snapshot(&lab);
    let gw_ip_before = GwIp::read(&lab.gw);
    let gw_lo_before = lab::counters(&lab.gw, "lo");

    // The upload's map entry exists before the flood starts.
    let upload = PacedUpload::start(&lab);
    thread::sleep(Duration::from_millis(500));
    let mut replays = 0u32;
    let mut flood_sent = 0u64;
    let mut map_full_during = Vec::new();
    let flood_start = Instant::now();
    while replays < MIN_REPLAYS || (upload.writing() && replays < MAX_REPLAYS) {
        flood_sent += flood::replay(&lab, &flood_pcap, &[], flood_frames);
        replays += 1;
        if let Some(full) = map_full(&lab) {
            map_full_during.push(full);
        }
        thread::sleep(REPLAY_PAUSE);
    }
    let flood_time = flood_start.elapsed();
    let still_writing_after_flood = upload.writing();
    let up = upload.join();
    lab.wait_quiet();
    let after = snapshot(&lab);
    let gw_ip = GwIp::read(&lab.gw).since(gw_ip_before);
    let gw_lo = lab::counters(&lab.gw, "lo").since(gw_lo_before);
    // A few polls after the lab went quiet: the counter holds its final value.
    thread::sleep(Duration::from_millis(600));
    let agent_alive = running(agent.pid());
    let map_full_after = map_full(&lab);
    let stderr = agent.stderr();
    let (relief_lines, relief_finished) = relief_warnings(&stderr);
    agent_alive.unwrap_or_else(|e| {
        panic!(
            "agent not running after the flood ({replays} replays, {flood_sent} frames; \
             {MAP_FULL_METRIC} during the flood {map_full_during:?}): {e}\nagent stderr:\n\
             {stderr}"
        )
    });
    // Asserts a clean exit (status 0) on SIGTERM.
    let records = agent.stop();
    let alerts: Vec<ConnRecord> = read_json_lines(&alert_log)
        .into_iter()
        .map(ConnRecord)
        .collect();

    // Counter deltas, per veth: lan0, gw-lan, gw-wan, wan0.
    let delta: Vec<Counters> = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.0.since(b.0))
        .collect();
    let drop_delta: Vec<Drops> = after
        .iter()
        .zip(&before)
        .map(|(a, b)| Drops {
            rx_dropped: a.1.rx_dropped - b.1.rx_dropped,
            tx_dropped: a.1.tx_dropped - b.1.tx_dropped,
            rx_otherhost_dropped: a.1.rx_otherhost_dropped - b.1.rx_otherhost_dropped,
        })
        .collect();
    let [lan, gw_lan, gw_wan, wan] = [delta[0], delta[1], delta[2], delta[3]];
    let tx = |c: Counters, l2: u64| Wire {
        pkts: c.tx_packets,
        ip_bytes: c.tx_ip_bytes(l2),
    };
    let flood = Wire {
        pkts: flood_sent,
        ip_bytes: flood_sent * flood_ip_len,
    };
    let up_wire = tx(gw_wan, gw_wan_l2);
    let wan_tx = tx(wan, wan_l2);
    let down_wire = Wire {
        pkts: wan_tx.pkts.checked_sub(flood.pkts).unwrap_or_else(|| {
            panic!("wan host sent {wan_tx:?}, fewer than the flood {flood:?}: {delta:?}")
        }),
        ip_bytes: wan_tx
            .ip_bytes
            .checked_sub(flood.ip_bytes)
            .unwrap_or_else(|| {
                panic!("wan host sent {wan_tx:?}, fewer than the flood {flood:?}: {delta:?}")
            }),
    };

    // Figures, printed before any verdict.
    let is_flood = |r: &ConnRecord| {
        r.proto() == "udp"
            && r.has("id.orig_h")
            && (r.ip("id.orig_h") == IpAddr::from(flood::SRC)
                || r.ip("id.resp_h") == IpAddr::from(flood::SRC))
    };
    let flood_records: Vec<&ConnRecord> = records.iter().filter(|r| is_flood(r)).collect();
    let flood_tuples: std::collections::HashSet<(IpAddr, u16, IpAddr, u16)> = flood_records
        .iter()
        .map(|r| {
            let (o, p) = r.orig();
            let (ro, rp) = r.resp();
            (o, p, ro, rp)
        })
        .collect();
    let flood_counted: u64 = flood_records
        .iter()
        .map(|r| r.u64("orig_pkts") + r.u64("resp_pkts"))
        .sum();
    let map_full_final = map_full_after.unwrap_or(0);
    let large: Vec<&ConnRecord> = alerts
        .iter()
        .filter(|a| a.str("note") == "LargeUpload")
        .collect();
    let upload_records: Vec<&ConnRecord> = records
        .iter()
        .filter(|r| {
            r.is_between(
                "tcp",
                (up.client.ip(), up.client.port()),
                (up.server.ip(), up.server.port()),
            )
        })
        .collect();
    println!(
        "map pressure: --flow-map-size {MAP_SIZE}; flood of {FLOOD_FLOWS} distinct UDP flows \
         per replay, {replays} replays in {flood_time:?} = {flood_sent} frames \
         ({flood_ip_len} IP bytes each); upload {} B in {:?} (writer still running when the \
         flood ended: {still_writing_after_flood}; TCP retransmitted {} B in {} segments)",
        up.written, up.duration, up.client_info.bytes_retrans, up.client_info.total_retrans
    );
    println!(
        "map pressure: {MAP_FULL_METRIC} during the flood {map_full_during:?}, after \
         {map_full_after:?}; pressure-relief warnings {relief_lines} (finishing \
         {relief_finished} idle connections in all)"
    );
    println!(
        "map pressure: flood connection records {} ({} distinct flows of {FLOOD_FLOWS}), \
         flood packets counted in records {flood_counted} + map full {map_full_final} = {} of \
         {flood_sent} sent; {} records in all; LargeUpload alerts {}",
        flood_records.len(),
        flood_tuples.len(),
        flood_counted + map_full_final,
        records.len(),
        large.len()
    );
    println!(
        "map pressure: wire up (gw-wan tx) {up_wire:?}, wan host tx {wan_tx:?}, down = wan tx \
         - flood {down_wire:?}; drops (lan0, gw-lan, gw-wan, wan0) {drop_delta:?}; gw IP \
         {gw_ip:?}; upload records: {}",
        upload_records
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!(
        "map pressure: test ran {:?} (probed tx L2 bytes: lan0 {lan_l2}, gw-lan {gw_lan_l2}, \
         gw-wan {gw_wan_l2}, wan0 {wan_l2})",
        test_start.elapsed()
    );

    let map_full_after = map_full_after
        .unwrap_or_else(|| panic!("agent /metrics did not answer after the flood\n{stderr}"));

    // The generators.
    assert_eq!(
        (up.written, up.server_received),
        (UPLOAD, UPLOAD),
        "upload generator: {up:?}"
    );
    assert!(
        replays >= MIN_REPLAYS && !map_full_during.is_empty(),
        "{replays} replays, metrics read during the flood: {map_full_during:?}"
    );

    // Harness: the counters mean what the ground truth assumes.
    assert_eq!(
        (
            gw_wan.tx_packets,
            gw_wan.tx_bytes,
            wan.tx_packets,
            wan.tx_bytes
        ),
        (
            wan.rx_packets,
            wan.rx_bytes,
            gw_wan.rx_packets,
            gw_wan.rx_bytes
        ),
        "WAN link ends disagree: gw-wan {gw_wan:?}, wan0 {wan:?}"
    );
    assert!(
        drop_delta
            .iter()
            .all(|d| d.rx_dropped == 0 && d.tx_dropped == 0),
        "frames were dropped on the lab's veths (lan0, gw-lan, gw-wan, wan0): {drop_delta:?}; \
         the flood's ground truth (every frame sent reached gw) does not hold"
    );
    // Nothing but the forwarded upload left through gw-wan tx: gw's stack dropped every
    // flood frame as not addressed to it, originated no packet, and forwarded only what
    // crossed its LAN veth (the upload's packets from the lan host, GSO aggregates counted
    // once, and the replies to it).
    assert_eq!(
        drop_delta[2].rx_otherhost_dropped, flood_sent,
        "gw-wan: frames gw's stack dropped as not addressed to it != flood frames sent: \
         {drop_delta:?}"
    );
    // gw's own packets: only the test's /metrics reads, on its loopback.
    assert_eq!(
        (gw_ip.out_requests, gw_ip.out6_requests),
        (gw_lo.tx_packets, 0),
        "gw's own stack sent packets other than on its loopback (/metrics reads) during the \
         test: {gw_ip:?}; gw lo {gw_lo:?}"
    );
    assert_eq!(
        gw_ip.forwarded,
        gw_lan.rx_packets + gw_lan.tx_packets,
        "gw forwarded other packets than those crossing gw-lan: {gw_ip:?}; gw-lan {gw_lan:?}; \
         lan0 {lan:?}"
    );
    assert_eq!(
        tx(gw_lan, gw_lan_l2),
        down_wire,
        "gw forwarded to the LAN something other than the wan host's traffic less the flood: \
         gw-lan tx {gw_lan:?}; wan0 tx {wan:?}; flood {flood:?}"
    );

    // The pressure shows.
    assert!(
        map_full_after > 0 && map_full_during.iter().any(|&n| n > 0),
        "{MAP_FULL_METRIC} shows no pressure: during {map_full_during:?}, after \
         {map_full_after}\nagent stderr:\n{stderr}"
    );
    // Nothing silently lost: each flood packet is in a record or in the map-full counter.
    assert_eq!(
        flood_counted + map_full_after,
        flood_sent,
        "flood packets in records ({flood_counted}, {} records) + {MAP_FULL_METRIC} \
         ({map_full_after}) != flood frames sent",
        flood_records.len()
    );

    // The upload's alert: exactly one, for it.
    let all_alerts = alerts
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        large.len(),
        1,
        "expected exactly one LargeUpload alert, got:\n{all_alerts}"
    );
    let alert = large[0];
    assert_eq!(
        (alert.ip("src"), alert.ip("dst")),
        (
            IpAddr::from(lab::LAN_HOST_V4),
            IpAddr::from(lab::WAN_HOST_V4)
        ),
        "LargeUpload src/dst: {alert}"
    );
    assert!(
        alert.is_between(
            "tcp",
            (up.client.ip(), up.client.port()),
            (up.server.ip(), up.server.port())
        ),
        "LargeUpload is not about the upload {} -> {}: {alert}",
        up.client,
        up.server
    );

    // The upload's record: one, exact.
    let all_upload = upload_records
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        upload_records.len(),
        1,
        "expected exactly one record of the upload {} -> {}, got:\n{all_upload}",
        up.client,
        up.server
    );
    let r = upload_records[0];
    let got = (
        r.orig(),
        r.u64("orig_pkts"),
        r.u64("orig_ip_bytes"),
        r.u64("resp_pkts"),
        r.u64("resp_ip_bytes"),
        r.u64("orig_bytes"),
        r.bool("missed_start"),
    );
    let want = (
        (up.client.ip(), up.client.port()),
        up_wire.pkts,
        up_wire.ip_bytes,
        down_wire.pkts,
        down_wire.ip_bytes,
        up.written,
        false,
    );
    assert_eq!(
        got, want,
        "upload record (orig, orig_pkts, orig_ip_bytes, resp_pkts, resp_ip_bytes, orig_bytes, \
         missed_start) differs from ground truth (gw-wan tx; wan0 tx - flood; bytes written):\n\
         record: {r}\ngenerator: {up:?}\ncounter deltas (lan0, gw-lan, gw-wan, wan0): {delta:?}"
    );
}
