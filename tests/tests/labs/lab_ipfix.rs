//! The agent exporting IPFIX to a real nfcapd in the lab: for every connection, the
//! deltas of all its exports sum exactly to its conn-log record, and a long transfer is
//! exported while it runs (active timeout); the same with biflow records. Over TCP, to a
//! collector of the test's own that is down when the agent starts.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use netflow_parser::NetflowParser;
use tests::{
    agent::Agent,
    ipfix_decoded,
    lab::{self, Lab},
    nfdump::{Nfcapd, read_flows},
    traffic,
};

const IPFIX_PORT: u16 = 4739;
const TCP_IPFIX_PORT: u16 = 4741;

/// 3 MB from the lan host to the wan host, 100 KB every 100 ms: about 3 s.
fn paced_upload(lab: &Lab, server: SocketAddr) -> u16 {
    let listener = lab::run_in_ns(&lab.wan, move || TcpListener::bind(server)).expect("bind");
    let reader = thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut buf = [0u8; 65536];
        while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
    });
    let port = lab::run_in_ns(&lab.lan, move || {
        let mut stream = TcpStream::connect_timeout(&server, Duration::from_secs(5))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        let chunk = vec![0x11u8; 100_000];
        for _ in 0..30 {
            stream.write_all(&chunk)?;
            thread::sleep(Duration::from_millis(100));
        }
        Ok::<_, std::io::Error>(stream.local_addr()?.port())
    })
    .expect("paced upload");
    reader.join().expect("reader");
    port
}

#[test]
fn exports_sum_to_the_conn_log_records() {
    let lab = Lab::new();
    let mut nfcapd = Nfcapd::start_in(Some(&lab.gw), IPFIX_PORT);
    let collector = format!("udp://127.0.0.1:{IPFIX_PORT}");
    let agent = Agent::start(
        &lab.gw,
        &lab.gw_wan_if,
        &[
            "--local-net",
            lab::LOCAL_NET_V4,
            "--poll-interval",
            "200ms",
            "--ipfix-collector",
            &collector,
            "--flow-active-timeout",
            "1s",
        ],
    );
    let upload_port = paced_upload(&lab, (lab::WAN_HOST_V4, 5401).into());
    traffic::tcp_download(
        &lab.lan,
        &lab.wan,
        (lab::WAN_HOST_V4, 5402).into(),
        1_000_000,
    );
    traffic::udp_exchange(&lab.lan, &lab.wan, (lab::WAN_HOST_V4, 5403).into(), 20, 800);
    let records = agent.stop();
    // nfcapd reads its socket on its own time: let it drain before stopping it.
    thread::sleep(Duration::from_millis(500));
    let files = nfcapd.stop();
    assert!(!files.is_empty(), "nfcapd wrote no file");
    let flows = read_flows(&files);

    let mut checked = 0;
    for r in records
        .iter()
        .filter(|r| matches!(r.str("proto"), "tcp" | "udp"))
    {
        let proto = if r.str("proto") == "tcp" { 6 } else { 17 };
        let (orig_h, resp_h): (IpAddr, IpAddr) = (
            r.str("id.orig_h").parse().expect("orig_h"),
            r.str("id.resp_h").parse().expect("resp_h"),
        );
        let (orig_p, resp_p) = (r.u64("id.orig_p") as u16, r.u64("id.resp_p") as u16);
        let sum = |src: IpAddr, sport: u16, dst: IpAddr, dport: u16| {
            let parts: Vec<_> = flows
                .iter()
                .filter(|f| {
                    f.proto == proto
                        && (f.src, f.src_port, f.dst, f.dst_port) == (src, sport, dst, dport)
                })
                .collect();
            let total = parts
                .iter()
                .fold((0, 0), |(p, b), f| (p + f.packets, b + f.bytes));
            (parts.len(), total)
        };
        let (orig_exports, orig) = sum(orig_h, orig_p, resp_h, resp_p);
        let (_, resp) = sum(resp_h, resp_p, orig_h, orig_p);
        let name = format!("{} {orig_h}:{orig_p} -> {resp_h}:{resp_p}", r.str("proto"));
        assert_eq!(
            orig,
            (r.u64("orig_pkts"), r.u64("orig_ip_bytes")),
            "{name}: originator's exports (packets, octets) against the conn log"
        );
        assert_eq!(
            resp,
            (r.u64("resp_pkts"), r.u64("resp_ip_bytes")),
            "{name}: responder's exports against the conn log"
        );
        if orig_p == upload_port {
            assert!(
                orig_exports >= 2,
                "{name}: a 3 s transfer with a 1 s active timeout is exported while it runs, \
                 got {orig_exports} export(s)"
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 3,
        "the upload, the download and the UDP exchange: {checked}"
    );
}

/// With `--ipfix-biflow`, one RFC 5103 record per export: nfdump reads its reverse
/// counters (enterprise 29305) as "out" packets and bytes. Each connection's forward sums
/// equal its originator's conn-log counts, the reverse sums its responder's, and all of
/// them together the WAN link's counters.
#[test]
fn biflow_exports_sum_to_the_conn_log_and_the_wire() {
    let lab = Lab::new();
    let mut nfcapd = Nfcapd::start_in(Some(&lab.gw), IPFIX_PORT);
    let collector = format!("udp://127.0.0.1:{IPFIX_PORT}");
    let agent = Agent::start(
        &lab.gw,
        &lab.gw_wan_if,
        &[
            "--local-net",
            lab::LOCAL_NET_V4,
            "--poll-interval",
            "200ms",
            "--ipfix-collector",
            &collector,
            "--ipfix-biflow",
            "--flow-active-timeout",
            "1s",
        ],
    );
    lab.wait_quiet();
    let (up_l2, down_l2) = (
        lab.tx_l2_bytes(&lab.gw, &lab.gw_wan_if),
        lab.tx_l2_bytes(&lab.wan, &lab.wan_if),
    );
    lab.wait_quiet();
    let before = lab.wan_counters();
    let upload_port = paced_upload(&lab, (lab::WAN_HOST_V4, 5411).into());
    traffic::tcp_download(
        &lab.lan,
        &lab.wan,
        (lab::WAN_HOST_V4, 5412).into(),
        1_000_000,
    );
    traffic::udp_exchange(&lab.lan, &lab.wan, (lab::WAN_HOST_V4, 5413).into(), 20, 800);
    let ping = traffic::ping(&lab.lan, lab::WAN_HOST_V4.into(), 5, 100);
    assert_eq!(ping.received, 5);
    lab.wait_quiet();
    let delta = lab.wan_counters().since(before);
    let records = agent.stop();
    thread::sleep(Duration::from_millis(500));
    let files = nfcapd.stop();
    assert!(!files.is_empty(), "nfcapd wrote no file");
    let flows = read_flows(&files);

    for r in &records {
        let proto = match r.str("proto") {
            "tcp" => 6,
            "udp" => 17,
            "icmp" => 1,
            other => panic!("unexpected {other} record: {r}"),
        };
        let (orig_h, orig_p) = r.orig();
        let (resp_h, resp_p) = r.resp();
        let ends = |f: &&tests::nfdump::Flow, a: IpAddr, ap: u16, b: IpAddr, bp: u16| {
            f.proto == proto
                && (f.src, f.dst) == (a, b)
                && (proto == 1 || (f.src_port, f.dst_port) == (ap, bp))
        };
        let parts: Vec<_> = flows
            .iter()
            .filter(|f| ends(f, orig_h, orig_p, resp_h, resp_p))
            .collect();
        let name = format!("{} {orig_h}:{orig_p} -> {resp_h}:{resp_p}", r.str("proto"));
        assert!(
            !flows
                .iter()
                .any(|f| ends(&f, resp_h, resp_p, orig_h, orig_p)),
            "{name}: a biflow export is one record from the originator"
        );
        let sum = parts.iter().fold((0, 0, 0, 0), |s, f| {
            (
                s.0 + f.packets,
                s.1 + f.bytes,
                s.2 + f.out_packets,
                s.3 + f.out_bytes,
            )
        });
        assert_eq!(
            sum,
            (
                r.u64("orig_pkts"),
                r.u64("orig_ip_bytes"),
                r.u64("resp_pkts"),
                r.u64("resp_ip_bytes")
            ),
            "{name}: forward and reverse sums against the conn log"
        );
        if orig_p == upload_port {
            assert!(parts.len() >= 2, "{name}: exported while it ran: {parts:?}");
        }
    }
    assert_eq!(records.len(), 4, "upload, download, UDP, ICMP: {records:?}");
    let total = flows.iter().fold((0, 0), |(p, b), f| {
        (p + f.packets + f.out_packets, b + f.bytes + f.out_bytes)
    });
    let wire = (
        delta.gw_wan.tx_packets + delta.wan_host.tx_packets,
        delta.gw_wan.tx_ip_bytes(up_l2) + delta.wan_host.tx_ip_bytes(down_l2),
    );
    assert_eq!(
        total, wire,
        "every exported packet and byte against the WAN link"
    );
}

/// Over TCP, a collector that is down when the agent starts stops nothing: once it
/// listens, the agent connects, sends the templates first, then the flows, to the conn
/// log's counts.
#[test]
fn tcp_collector_down_at_start_gets_the_flows_once_up() {
    let lab = Lab::new();
    let collector = format!("tcp://127.0.0.1:{TCP_IPFIX_PORT}");
    let agent = Agent::start(
        &lab.gw,
        &lab.gw_wan_if,
        &[
            "--local-net",
            lab::LOCAL_NET_V4,
            "--poll-interval",
            "200ms",
            "--ipfix-collector",
            &collector,
        ],
    );
    traffic::tcp_upload(&lab.lan, &lab.wan, (lab::WAN_HOST_V4, 5421).into(), 500_000);
    traffic::udp_exchange(&lab.lan, &lab.wan, (lab::WAN_HOST_V4, 5422).into(), 10, 300);
    let listener = lab::run_in_ns(&lab.gw, || {
        TcpListener::bind((Ipv4Addr::LOCALHOST, TCP_IPFIX_PORT))
    })
    .expect("the collector binds");
    // The agent's backoff is 10 s at most.
    let mut stream = traffic::accept_within(&listener, Duration::from_secs(15));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let reader = thread::spawn(move || {
        let mut parser = NetflowParser::default();
        let mut messages = Vec::new();
        while let Some(bytes) = ipfix_decoded::read_message(&mut stream) {
            messages.push(ipfix_decoded::decode(&mut parser, &bytes));
        }
        messages
    });
    // The UDP exchange is still open: the agent exports it when it stops (forced end),
    // then closes the connection.
    let records = agent.stop();
    let messages = reader.join().expect("collector");
    assert!(
        messages
            .first()
            .is_some_and(|m| m.templates == 4 && m.records.is_empty()),
        "the connection starts with the templates alone: {messages:?}"
    );
    let exported: Vec<&ipfix_decoded::Exported> =
        messages.iter().flat_map(|m| &m.records).collect();
    assert!(records.len() >= 2, "{records:?}");
    for r in &records {
        let (orig, resp) = (r.orig(), r.resp());
        let sum = |a: (IpAddr, u16), b: (IpAddr, u16)| {
            exported
                .iter()
                .filter(|e| (e.src, e.src_port, e.dst, e.dst_port) == (a.0, a.1, b.0, b.1))
                .fold((0, 0), |(p, o), e| (p + e.packets, o + e.octets))
        };
        assert_eq!(
            (sum(orig, resp), sum(resp, orig)),
            (
                (r.u64("orig_pkts"), r.u64("orig_ip_bytes")),
                (r.u64("resp_pkts"), r.u64("resp_ip_bytes"))
            ),
            "{r}: the collector's sums against the conn log"
        );
    }
}
