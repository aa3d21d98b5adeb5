//! Detection latency of LargeUpload at the default 1 s poll interval. The agent runs with
//! a scaled-down threshold; each crossing is a new TCP connection from the lan host on
//! which exactly threshold + 1 bytes of payload are written, after which the connection
//! stays open and idle. The crossing time is when the server in the wan host has read
//! the last byte (so that byte has left the gateway); the alert time is when its line
//! appears in the alert log, which the benchmark reads every 2 ms. Before each crossing
//! the connection waits a fraction of the poll interval, stepped by the golden ratio so
//! that crossings fall at evenly spread phases of the poll.

use std::{
    io::Read,
    net::SocketAddr,
    path::Path,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use tests::{
    agent::Agent,
    lab::{self, Lab},
    rules_lab::{self, Scratch, read_json_lines},
};

use crate::{Plan, median};

pub const THRESHOLD: u64 = 1_000_000;
const THRESHOLD_FLAG: &str = "1MB";
const MIN_PACKETS_FLAG: &str = "10";
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
const FIRST_SERVER_PORT: u16 = 9000;
const ALERT_CHECK: Duration = Duration::from_millis(2);
const ALERT_LIMIT: Duration = Duration::from_secs(10);

pub struct Row {
    pub crossings: u32,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

pub fn crossings(plan: &Plan) -> u32 {
    if plan.quick { 4 } else { 10 }
}

pub fn measure(plan: &Plan) -> Row {
    let lab = Lab::new();
    let scratch = Scratch::new("latency");
    let alert_log = scratch.path("alerts.jsonl");
    let agent = Agent::start(
        &lab.gw,
        &lab.gw_wan_if,
        &[
            "--local-net",
            lab::LOCAL_NET_V4,
            "--upload-threshold",
            THRESHOLD_FLAG,
            "--upload-min-packets",
            MIN_PACKETS_FLAG,
            "--alert-log",
            alert_log.to_str().expect("UTF-8 temp path"),
        ],
    );
    let crossings = crossings(plan);
    // Alerts are suppressed per (source, destination, port): one server port per crossing.
    let servers: Vec<SocketAddr> = (0..crossings)
        .map(|n| SocketAddr::from((lab::WAN_HOST_V4, FIRST_SERVER_PORT + n as u16)))
        .collect();
    let listeners: Vec<_> = servers
        .iter()
        .map(|&server| rules_lab::listen(&lab.wan, server))
        .collect();
    // The server tells the time each connection's last payload byte was read.
    let (read_tx, read_rx) = mpsc::channel();
    let server_thread = thread::spawn(move || {
        let mut readers = Vec::new();
        for listener in listeners {
            let mut stream = rules_lab::accept(&listener);
            let read_tx = read_tx.clone();
            readers.push(thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                let mut total = 0u64;
                while total <= THRESHOLD {
                    match stream.read(&mut buf) {
                        Ok(0) => panic!("connection closed after {total} bytes"),
                        Ok(n) => total += n as u64,
                        Err(e) => panic!("read after {total} bytes: {e}"),
                    }
                }
                let _ = read_tx.send(Instant::now());
                rules_lab::read_to_eof(&mut stream);
            }));
        }
        for reader in readers {
            rules_lab::join(reader);
        }
    });

    let mut latencies = Vec::new();
    let mut phase = 0.0f64;
    for (n, &server) in servers.iter().enumerate() {
        phase = (phase + 0.618_033_988_75).fract();
        let mut stream = rules_lab::connect(&lab.lan, server);
        let client = stream.local_addr().expect("client address");
        thread::sleep(POLL_INTERVAL.mul_f64(phase));
        rules_lab::send(&mut stream, THRESHOLD + 1);
        let crossed = read_rx
            .recv_timeout(ALERT_LIMIT)
            .expect("the server read the whole upload");
        let alerted = wait_alert(&alert_log, client, server, &agent);
        let ms = alerted.duration_since(crossed).as_secs_f64() * 1000.0;
        eprintln!("bench: detection latency, crossing {}: {ms:.0} ms", n + 1);
        latencies.push(ms);
        // Open and idle until now: the alert comes from a poll, not from the close.
        drop(stream);
    }
    rules_lab::join(server_thread);
    agent.stop();
    Row {
        crossings,
        median_ms: median(latencies.iter().copied()),
        min_ms: latencies.iter().copied().fold(f64::INFINITY, f64::min),
        max_ms: latencies.iter().copied().fold(0.0, f64::max),
    }
}

/// The time the LargeUpload line of connection `client` -> `server` appeared in the log.
fn wait_alert(log: &Path, client: SocketAddr, server: SocketAddr, agent: &Agent) -> Instant {
    let start = Instant::now();
    loop {
        let found = read_json_lines(log).into_iter().any(|line| {
            line["note"] == "LargeUpload"
                && line["id.orig_p"].as_u64() == Some(u64::from(client.port()))
                && line["id.resp_p"].as_u64() == Some(u64::from(server.port()))
        });
        if found {
            return Instant::now();
        }
        assert!(
            start.elapsed() < ALERT_LIMIT,
            "no LargeUpload alert for {client} -> {server} within {ALERT_LIMIT:?}\nagent stderr:\n{}",
            agent.stderr()
        );
        thread::sleep(ALERT_CHECK);
    }
}
