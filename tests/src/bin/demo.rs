//! `cargo xtask demo`: a LAN, a gateway running the agent and an "Internet" host, in
//! network namespaces, and a short story of exfiltration on scaled-down durations. The
//! alerts are printed as they come, then a metrics excerpt; everything is torn down.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    agent::Agent,
    http,
    lab::{self, Lab},
    traffic,
};

/// A second LAN host address (on the lan host) that must not reach the Internet.
const RESTRICTED: &str = "198.18.1.3";
/// A second Internet address (on the wan host) that receives the slow exfiltration.
const DROP_SITE: &str = "203.0.113.3";

fn step(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

/// Prints alerts from the agent's alert log as they are written, until `stop`.
fn follow_alerts(path: PathBuf, stop: Arc<AtomicBool>) -> thread::JoinHandle<usize> {
    thread::spawn(move || {
        let mut seen = 0;
        let mut offset = 0;
        loop {
            // Read once more after `stop`: the agent writes its last alerts at shutdown.
            let last = stop.load(Ordering::Relaxed);
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for line in text[offset.min(text.len())..].lines() {
                if let Ok(alert) = serde_json::from_str::<Value>(line) {
                    seen += 1;
                    println!(
                        "  \x1b[31mALERT {}\x1b[0m {}",
                        alert["note"].as_str().unwrap_or("?"),
                        alert["msg"].as_str().unwrap_or("")
                    );
                }
            }
            offset = text.len();
            if last {
                return seen;
            }
            thread::sleep(Duration::from_millis(200));
        }
    })
}

/// A server in the wan ns on `addr` that reads everything each client sends.
fn sink_server(ns: &str, addr: SocketAddr) {
    let listener = lab::run_in_ns(ns, move || TcpListener::bind(addr)).expect("bind");
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut stream = stream;
                let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
                let mut buf = [0u8; 65536];
                while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
}

fn connect(ns: &str, to: SocketAddr) -> TcpStream {
    lab::run_in_ns(ns, move || {
        let stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok::<_, std::io::Error>(stream)
    })
    .expect("connect")
}

fn main() {
    let started = Instant::now();
    step(
        "Building the lab: lan host 198.18.1.2 (and .3) -- NAT gateway 203.0.113.1 (masquerade) -- Internet host 203.0.113.2 (and .3)",
    );
    let lab = Lab::masquerading();
    lab::ns_exec(
        &lab.lan,
        &[
            "ip",
            "addr",
            "add",
            &format!("{RESTRICTED}/24"),
            "dev",
            &lab.lan_if,
        ],
    );
    lab::ns_exec(
        &lab.wan,
        &[
            "ip",
            "addr",
            "add",
            &format!("{DROP_SITE}/24"),
            "dev",
            &lab.wan_if,
        ],
    );
    let dir = std::env::temp_dir().join(format!("egress-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("demo dir");
    let alerts_path = dir.join("alerts.log");
    let alert_log = alerts_path.display().to_string();
    let flags = [
        "--local-net",
        "198.18.0.0/15",
        "--poll-interval",
        "500ms",
        "--upload-threshold",
        "20MB",
        "--upload-min-packets",
        "100",
        "--restricted-net",
        &format!("{RESTRICTED}/32"),
        "--window",
        "5s",
        "--window-threshold",
        "1MB",
        "--leak-period",
        "1m",
        "--leak-threshold",
        "4MB",
        "--exclude-dst",
        "203.0.113.2",
        "--long-durations",
        "5s,10s",
        "--idle-timeout",
        "4s",
        "--alert-log",
        &alert_log,
    ];
    println!(
        "agent (watching the default route's interface, {}): monitor run {}",
        lab.gw_wan_if,
        flags.join(" ")
    );
    let agent = Agent::start_default(&lab.gw, &flags);
    let stop = Arc::new(AtomicBool::new(false));
    let printer = follow_alerts(alerts_path, stop.clone());
    let wan: SocketAddr = (lab::WAN_HOST_V4, 443).into();

    step("Normal browsing: five 2 MB downloads from the Internet host (no alert expected)");
    for _ in 0..5 {
        traffic::tcp_download(&lab.lan, &lab.wan, wan, 2_000_000);
    }

    step(
        "A large upload: 30 MB to the Internet host over HTTPS in 3 s (LargeUpload while it runs)",
    );
    sink_server(&lab.wan, wan);
    let mut upload = connect(&lab.lan, wan);
    let megabyte = vec![0xa5u8; 1_000_000];
    for _ in 0..30 {
        upload.write_all(&megabyte).expect("upload");
        thread::sleep(Duration::from_millis(100));
    }
    drop(upload);
    thread::sleep(Duration::from_secs(1));

    step(&format!(
        "A restricted host ({RESTRICTED}) pings out (RestrictedOutbound)"
    ));
    lab::ns_output(
        &lab.lan,
        &[
            "ping",
            "-c",
            "2",
            "-i",
            "0.2",
            "-I",
            RESTRICTED,
            "203.0.113.2",
        ],
        Duration::from_secs(10),
    );
    thread::sleep(Duration::from_secs(1));

    step(
        "Slow exfiltration: 400 KB a second to a drop site for 20 s, while an interactive session stays open (WindowExceeded, DataLeak, LongConnection)",
    );
    let drop_site: SocketAddr = format!("{DROP_SITE}:8443").parse().expect("address");
    sink_server(&lab.wan, drop_site);
    let idle_site: SocketAddr = (lab::WAN_HOST_V4, 22).into();
    sink_server(&lab.wan, idle_site);
    let mut session = connect(&lab.lan, idle_site);
    let mut exfil = connect(&lab.lan, drop_site);
    let chunk = vec![0x5au8; 400_000];
    for _ in 0..20 {
        exfil.write_all(&chunk).expect("send to the drop site");
        // A keystroke a second keeps the interactive session from going idle.
        session.write_all(b"k").expect("keep the session alive");
        thread::sleep(Duration::from_secs(1));
    }
    drop(exfil);
    drop(session);
    thread::sleep(Duration::from_secs(1));

    step("Metrics excerpt (egress_monitor_* from http://127.0.0.1:9877/metrics in the gateway)");
    let metrics = http::get(&lab.gw, "127.0.0.1:9877", "/metrics");
    match metrics {
        Some(text) => {
            let wanted = [
                "bytes_total",
                "connections_total",
                "alerts_total",
                "flow_map_entries",
            ];
            for line in text.lines() {
                let shown = line.starts_with("egress_monitor_")
                    && wanted.iter().any(|w| line.contains(w))
                    && !line.ends_with(" 0");
                if shown {
                    println!("  {line}");
                }
            }
        }
        None => println!("  (could not read the metrics)"),
    }

    let records = agent.stop();
    stop.store(true, Ordering::Relaxed);
    let alerts = printer.join().unwrap_or(0);
    step(&format!(
        "Done in {:.0} s: {alerts} alerts, {} connection records; tearing the lab down",
        started.elapsed().as_secs_f64(),
        records.len()
    ));
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}
