//! The agent exporting IPFIX to pmacct's `nfacctd` in the gateway lab: for a TCP upload, a
//! TCP download, UDP, ICMP and IPv6, nfacctd's summed packets and octets per direction
//! equal the ground truth (generator and the WAN link's counters) and the agent's conn log.
//! The upload runs 20 s with `--flow-active-timeout 5s`: a second collector, a plain UDP
//! socket whose messages netflow_parser decodes, sees it exported while it runs.
//!
//! nfacctd listens on gw's loopback, so the export itself never crosses the watched WAN
//! link and the link's counters stay the ground truth of the lab's traffic alone. It is
//! sent unidirectional records: nfacctd ignores RFC 5103 reverse counters.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use ipfix_decoded::Exported;
use netflow_parser::NetflowParser;
use tests::{
    agent::{Agent, ConnRecord},
    ipfix_decoded,
    lab::{self, Lab},
    pmacct::{Flow, Nfacctd, Output},
    traffic,
};

const NFACCTD_PORT: u16 = 4739;
const SINK_PORT: u16 = 4740;
const CHUNK: usize = 100_000;
const CHUNKS: u64 = 100;

/// Packets and IP bytes of one direction.
type Dir = (u64, u64);

/// One case's ground truth: (upload, download) from the WAN link's tx counters.
struct Truth {
    name: &'static str,
    proto: u8,
    lan: (IpAddr, u16),
    wan: (IpAddr, u16),
    up: Dir,
    down: Dir,
}

/// Runs `traffic` between two quiet points; the WAN link's tx counters give each
/// direction's packets and IP bytes.
fn measure<T>(lab: &Lab, l2: (u64, u64), traffic: impl FnOnce() -> T) -> (T, Dir, Dir) {
    lab.wait_quiet();
    let before = lab.wan_counters();
    let out = traffic();
    lab.wait_quiet();
    let d = lab.wan_counters().since(before);
    (
        out,
        (d.gw_wan.tx_packets, d.gw_wan.tx_ip_bytes(l2.0)),
        (d.wan_host.tx_packets, d.wan_host.tx_ip_bytes(l2.1)),
    )
}

/// 10 MB from the lan host to the wan host, 100 KB every 200 ms: about 20 s. Returns the
/// client's port and the bytes the server read.
fn paced_upload(lab: &Lab, server: SocketAddr) -> (u16, u64) {
    let listener = lab::run_in_ns(&lab.wan, move || TcpListener::bind(server)).expect("bind");
    let reader = thread::spawn(move || {
        let mut stream = traffic::accept_within(&listener, Duration::from_secs(10));
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let (mut buf, mut total) = ([0u8; 65536], 0u64);
        while let Ok(n @ 1..) = stream.read(&mut buf) {
            total += n as u64;
        }
        total
    });
    let port = lab::run_in_ns(&lab.lan, move || {
        let mut stream = TcpStream::connect_timeout(&server, Duration::from_secs(5))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        let chunk = vec![0x5au8; CHUNK];
        for _ in 0..CHUNKS {
            stream.write_all(&chunk)?;
            thread::sleep(Duration::from_millis(200));
        }
        Ok::<_, std::io::Error>(stream.local_addr()?.port())
    })
    .expect("paced upload");
    (port, reader.join().expect("reader"))
}

/// A UDP socket in gw that keeps every datagram until stopped.
struct Sink {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Vec<u8>>>,
}

impl Sink {
    fn start(ns: &str, port: u16) -> Sink {
        let socket = lab::run_in_ns(ns, move || UdpSocket::bind((Ipv4Addr::LOCALHOST, port)))
            .expect("bind the sink");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut messages = Vec::new();
            let mut buf = [0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    messages.push(buf[..n].to_vec());
                }
            }
            messages
        });
        Sink { stop, thread }
    }

    /// Every data record received, in order.
    fn stop(self) -> Vec<Exported> {
        thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::Relaxed);
        let messages = self.thread.join().expect("sink");
        let mut parser = NetflowParser::default();
        messages
            .iter()
            .flat_map(|m| ipfix_decoded::decode(&mut parser, m).records)
            .collect()
    }
}

/// nfacctd's flows of one direction of a case, summed.
fn collected(flows: &[Flow], proto: u8, src: (IpAddr, u16), dst: (IpAddr, u16)) -> Dir {
    flows
        .iter()
        .filter(|f| f.proto == proto && f.src == src.0 && f.dst == dst.0)
        // ICMP has no ports; nfacctd's port columns then say nothing about the flow.
        .filter(|f| proto == 1 || proto == 58 || (f.src_port, f.dst_port) == (src.1, dst.1))
        .fold((0, 0), |(p, b), f| (p + f.packets, b + f.bytes))
}

fn conn_log(records: &[ConnRecord], t: &Truth) -> (Dir, Dir) {
    let proto = match t.proto {
        6 => "tcp",
        17 => "udp",
        _ => "icmp",
    };
    let found: Vec<&ConnRecord> = records
        .iter()
        .filter(|r| {
            r.proto() == proto
                && r.orig().0 == t.lan.0
                && r.resp().0 == t.wan.0
                && (proto == "icmp" || (r.orig().1, r.resp().1) == (t.lan.1, t.wan.1))
        })
        .collect();
    assert_eq!(found.len(), 1, "{}: one conn-log record: {found:?}", t.name);
    let r = found[0];
    (
        (r.u64("orig_pkts"), r.u64("orig_ip_bytes")),
        (r.u64("resp_pkts"), r.u64("resp_ip_bytes")),
    )
}

#[test]
fn nfacctd_sums_equal_ground_truth_and_the_conn_log() {
    let lab = Lab::new();
    let mut nfacctd = Nfacctd::start(
        &lab.gw,
        Ipv4Addr::LOCALHOST.into(),
        NFACCTD_PORT,
        Output::Csv,
    );
    let sink = Sink::start(&lab.gw, SINK_PORT);
    let nfacctd_url = format!("udp://127.0.0.1:{NFACCTD_PORT}");
    let sink_url = format!("udp://127.0.0.1:{SINK_PORT}");
    let agent = Agent::start(
        &lab.gw,
        &lab.gw_wan_if,
        &[
            "--local-net",
            lab::LOCAL_NET_V4,
            "--local-net",
            lab::LOCAL_NET_V6,
            "--poll-interval",
            "200ms",
            "--ipfix-collector",
            &nfacctd_url,
            "--ipfix-collector",
            &sink_url,
            "--flow-active-timeout",
            "5s",
        ],
    );
    lab.wait_quiet();
    let l2 = (
        lab.tx_l2_bytes(&lab.gw, &lab.gw_wan_if),
        lab.tx_l2_bytes(&lab.wan, &lab.wan_if),
    );
    let (lan4, wan4) = lab::hosts(false);
    let (lan6, wan6) = lab::hosts(true);
    let mut truths = Vec::new();

    let ((upload_port, read), up, down) =
        measure(&lab, l2, || paced_upload(&lab, (wan4, 5501).into()));
    assert_eq!(
        read,
        CHUNKS * CHUNK as u64,
        "the server read the whole upload"
    );
    truths.push(Truth {
        name: "20 s TCP upload",
        proto: 6,
        lan: (lan4, upload_port),
        wan: (wan4, 5501),
        up,
        down,
    });

    let (t, up, down) = measure(&lab, l2, || {
        traffic::tcp_download(&lab.lan, &lab.wan, (wan4, 5502).into(), 2_000_000)
    });
    assert_eq!(t.client_received, 2_000_000);
    truths.push(Truth {
        name: "TCP download",
        proto: 6,
        lan: (lan4, t.client.port()),
        wan: (wan4, 5502),
        up,
        down,
    });

    let (u, up, down) = measure(&lab, l2, || {
        traffic::udp_exchange(&lab.lan, &lab.wan, (wan4, 5503).into(), 25, 700)
    });
    assert_eq!((u.requests, u.responses), (25, 25));
    assert_eq!(
        up,
        (25, 25 * (700 + 28)),
        "UDP upload: counters against the generator"
    );
    assert_eq!(down, (25, 25 * (700 + 28)), "UDP download");
    truths.push(Truth {
        name: "UDP",
        proto: 17,
        lan: (lan4, u.client.port()),
        wan: (wan4, 5503),
        up,
        down,
    });

    let (p, up, down) = measure(&lab, l2, || traffic::ping(&lab.lan, wan4, 10, 300));
    assert_eq!((p.transmitted, p.received), (10, 10));
    assert_eq!(
        up,
        (10, 10 * (300 + 28)),
        "ICMP: counters against the generator"
    );
    truths.push(Truth {
        name: "ICMP echo",
        proto: 1,
        lan: (lan4, 0),
        wan: (wan4, 0),
        up,
        down,
    });

    let (t, up, down) = measure(&lab, l2, || {
        traffic::tcp_upload(&lab.lan, &lab.wan, (wan6, 5504).into(), 1_500_000)
    });
    assert_eq!(t.server_received, 1_500_000);
    truths.push(Truth {
        name: "IPv6 TCP upload",
        proto: 6,
        lan: (lan6, t.client.port()),
        wan: (wan6, 5504),
        up,
        down,
    });

    let records = agent.stop();
    let exported = sink.stop();
    // nfacctd reads its socket on its own time: let it drain before stopping it.
    thread::sleep(Duration::from_millis(500));
    let flows = nfacctd.stop_and_read();

    let mut report = BTreeMap::new();
    for t in &truths {
        let got_up = collected(&flows, t.proto, t.lan, t.wan);
        let got_down = collected(&flows, t.proto, t.wan, t.lan);
        assert_eq!(
            (got_up, got_down),
            (t.up, t.down),
            "{}: nfacctd's (upload, download) against the WAN link's counters\nflows: {flows:#?}",
            t.name
        );
        assert_eq!(
            conn_log(&records, t),
            (t.up, t.down),
            "{}: the conn log against the WAN link's counters",
            t.name
        );
        report.insert(t.name, (t.up, t.down));
    }
    eprintln!("exact per direction (packets, IP bytes): {report:?}");

    // The upload, as exported while it ran: at least 3 active-timeout records and a final
    // one (end of flow) from the uploader, summing to the whole direction.
    let upload: Vec<_> = exported
        .iter()
        .filter(|r| (r.src, r.src_port, r.proto) == (lan4, upload_port, 6))
        .collect();
    let active = upload.iter().filter(|r| r.reason == 2).count();
    assert!(
        active >= 3,
        "active-timeout records of the upload: {upload:#?}"
    );
    assert_eq!(
        upload.last().map(|r| r.reason),
        Some(3),
        "the last one ends the flow: {upload:#?}"
    );
    assert_eq!(upload.len(), active + 1, "{upload:#?}");
    let sum = upload
        .iter()
        .fold((0, 0), |(p, b), r| (p + r.packets, b + r.octets));
    assert_eq!(sum, truths[0].up, "the upload's exports sum to the total");
    eprintln!(
        "upload exported as {} records ({active} active timeout)",
        upload.len()
    );
}
