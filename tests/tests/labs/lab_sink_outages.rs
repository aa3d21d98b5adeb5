//! Sink outages with the agent in the lab: a syslog receiver (a real rsyslogd on a unix
//! socket) or an Alertmanager (Debian's prometheus-alertmanager in gw's namespace) that is
//! down when the agent starts, or goes away while it runs, never stops detection or
//! polling; the alerts raised meanwhile wait in the sink's queue and arrive once the sink
//! is back. With the sinks down at shutdown, the agent reports how many it could not
//! deliver.
//!
//! Every alert here is a RestrictedOutbound: the lan host (198.18.1.2, the restricted net)
//! sends one UDP datagram to a wan address; each (destination, port) pair is a new alert.
//! The syslog cases vary the port; the Alertmanager cases vary the destination (extra
//! addresses on the wan host), because Alertmanager merges alerts with equal labels and
//! its labels carry the destination but not the port.
//!
//! A full disk under `--conn-log` and `--dns-log` is an outage of another kind: those logs
//! wait and retry, and no alert is lost to them (the last case).
//!
//! Needs `rsyslogd` (Debian package `rsyslog`) and `prometheus-alertmanager`.

use std::{
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::unix::fs::FileTypeExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use monitor::alerts::sinks::syslog::APP_NAME;
use serde_json::Value;
use tests::{
    agent::{Agent, READY_MARKER},
    dns_lab, http,
    lab::{self, Lab, run_in_ns},
    rules_lab::{Scratch, add_wan_address, read_json_lines},
    traffic,
};

const RSYSLOGD: &str = "/usr/sbin/rsyslogd";
const ALERTMANAGER_BIN: &str = "/usr/bin/prometheus-alertmanager";
/// Alertmanager's address inside the lab's gw namespace (each lab has its own loopback).
const ALERTMANAGER: &str = "127.0.0.1:9093";
/// The agent's /metrics (its default `--metrics-addr`), inside gw's namespace.
const METRICS: &str = "127.0.0.1:9877";
const NOTE: &str = "RestrictedOutbound";

const AGENT_READY_LIMIT: Duration = Duration::from_secs(30);
const AGENT_STOP_LIMIT: Duration = Duration::from_secs(25);
/// From the datagram to its alert in the alert log: polls every 200 ms, so this only
/// bounds a loaded machine; a pipeline waiting for a sink would miss it.
const ALERT_LOG_LIMIT: Duration = Duration::from_secs(10);
/// From the sink coming back to every queued alert in it: the dispatcher's backoff is at
/// most 5 s.
const DELIVERY_LIMIT: Duration = Duration::from_secs(15);
const SINK_START_LIMIT: Duration = Duration::from_secs(15);
/// Until the agent logs its first failed delivery after the sink went away.
const FAILURE_LOG_LIMIT: Duration = Duration::from_secs(10);
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
const STEP: Duration = Duration::from_millis(50);
/// A long outage, checked by scrapes this far apart: 7 s, past the point where the
/// dispatcher's backoff reaches its 5 s cap (after 0.1 + 0.2 + ... + 3.2 = 6.3 s).
const LONG_OUTAGE_SAMPLES: usize = 8;
const LONG_OUTAGE_GAP: Duration = Duration::from_secs(1);

/// The wan host's address and the first of the extra ones for the Alertmanager cases.
const WAN: Ipv4Addr = lab::WAN_HOST_V4;
const WAN_EXTRA_BASE: u8 = 10;

static NEXT_INSTANCE: AtomicU32 = AtomicU32::new(0);

fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: plain syscall; every caller passes the PID of its own child that has not
    // been reaped yet, so the PID cannot have been reused.
    unsafe { libc::kill(pid, sig) };
}

/// SIGKILL to `child` (by its PID), then reap it.
fn kill_child(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        signal(child.id(), libc::SIGKILL);
    }
    let _ = child.wait();
}

fn wait_within(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait for a child") {
            return Some(status);
        }
        if start.elapsed() > limit {
            return None;
        }
        thread::sleep(STEP);
    }
}

fn read_text(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

/// A GET over HTTP/1.0 from inside `ns`; the body if the answer is 200, else None.
fn http_get(ns: &str, addr: &'static str, path: &'static str) -> Option<String> {
    lab::run_in_ns(ns, move || {
        let sockaddr: SocketAddr = addr.parse().expect("a socket address");
        let mut stream = TcpStream::connect_timeout(&sockaddr, HTTP_TIMEOUT).ok()?;
        stream.set_read_timeout(Some(HTTP_TIMEOUT)).ok()?;
        stream.set_write_timeout(Some(HTTP_TIMEOUT)).ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        head.contains(" 200 ").then(|| body.to_owned())
    })
}

/// Sends one UDP datagram from the lan host to `dst:port`: a new connection from the
/// restricted host, so one RestrictedOutbound alert.
fn raise(lab: &Lab, dst: Ipv4Addr, port: u16) {
    run_in_ns(&lab.lan, move || {
        let socket = UdpSocket::bind("0.0.0.0:0").expect("bind a UDP socket in the lan ns");
        socket
            .send_to(b"sink outage probe", SocketAddrV4::new(dst, port))
            .unwrap_or_else(|e| panic!("send a datagram to {dst}:{port}: {e}"));
    });
}

fn is_alert_for(alert: &Value, dst: Ipv4Addr, port: u16) -> bool {
    alert["note"] == NOTE
        && alert["proto"] == "udp"
        && alert["id.resp_h"] == dst.to_string()
        && alert["id.resp_p"] == port
}

fn listing(values: &[Value]) -> String {
    if values.is_empty() {
        return "(none)".into();
    }
    values
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------
// The agent

/// `monitor run` in gw's namespace on its WAN veth, every RestrictedOutbound alerted (1 s
/// suppression), output in files of its own so that its stderr outlives it.
struct SinkAgent {
    child: Child,
    ns: String,
    alert_log: PathBuf,
    stderr: PathBuf,
    // Removed after Drop killed the agent.
    _scratch: Scratch,
}

/// What the agent printed, and how long SIGTERM took.
struct Stopped {
    stderr: String,
    took: Duration,
    alerts: Vec<Value>,
}

impl SinkAgent {
    fn start(lab: &Lab, sink_flags: &[&str]) -> SinkAgent {
        let scratch = Scratch::new("sink-outage-agent");
        let alert_log = scratch.path("alerts.jsonl");
        let stderr = scratch.path("agent.stderr");
        let stdout = scratch.path("agent.stdout");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &lab.gw])
            .arg(Agent::binary())
            .args(["run", "--iface", &lab.gw_wan_if])
            .args(["--local-net", lab::LOCAL_NET_V4, "--poll-interval", "200ms"])
            .arg("--alert-log")
            .arg(&alert_log)
            .args(["--restricted-net", "198.18.1.2/32"])
            .args(["--restricted-suppress", "1s", "--suppress", "1s"])
            .args(sink_flags)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).expect("create the agent's stdout file"))
            .stderr(fs::File::create(&stderr).expect("create the agent's stderr file"));
        // `ip netns exec` execs the agent: this PID is the agent's.
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn the agent {cmd:?}: {e}"));
        let mut agent = SinkAgent {
            child,
            ns: lab.gw.clone(),
            alert_log,
            stderr,
            _scratch: scratch,
        };
        let start = Instant::now();
        while !agent.stderr().contains(READY_MARKER) {
            if let Some(status) = agent.child.try_wait().expect("wait for the agent") {
                panic!(
                    "agent exited ({status}) before '{READY_MARKER}': {cmd:?}\nstderr:\n{}",
                    agent.stderr()
                );
            }
            assert!(
                start.elapsed() < AGENT_READY_LIMIT,
                "agent not ready within {AGENT_READY_LIMIT:?}: {cmd:?}\nstderr:\n{}",
                agent.stderr()
            );
            thread::sleep(STEP);
        }
        agent
    }

    fn stderr(&self) -> String {
        read_text(&self.stderr)
    }

    /// The RestrictedOutbound alerts in the alert log so far.
    fn alerts(&self) -> Vec<Value> {
        read_json_lines(&self.alert_log)
            .into_iter()
            .filter(|a| a["note"] == NOTE)
            .collect()
    }

    /// Panics with the alerts so far and the agent's stderr.
    fn fail(&self, what: &str) -> ! {
        panic!(
            "{what}\nalert log:\n{}\nagent stderr:\n{}",
            listing(&self.alerts()),
            self.stderr()
        )
    }

    /// Raises an alert to `dst:port` and waits for it in the alert log: detection goes on
    /// whatever the other sinks do. Returns the alert.
    fn raise_and_log(&self, lab: &Lab, dst: Ipv4Addr, port: u16) -> Value {
        let start = Instant::now();
        raise(lab, dst, port);
        loop {
            if let Some(alert) = self
                .alerts()
                .into_iter()
                .find(|a| is_alert_for(a, dst, port))
            {
                return alert;
            }
            if start.elapsed() > ALERT_LOG_LIMIT {
                self.fail(&format!(
                    "no alert for udp {dst}:{port} in the alert log within {ALERT_LOG_LIMIT:?}"
                ));
            }
            thread::sleep(STEP);
        }
    }

    /// Waits until the agent's stderr contains `text`.
    fn wait_stderr(&self, text: &str, limit: Duration) {
        let start = Instant::now();
        while !self.stderr().contains(text) {
            if start.elapsed() > limit {
                self.fail(&format!("agent never logged {text:?} within {limit:?}"));
            }
            thread::sleep(STEP);
        }
    }

    /// The agent's /metrics, which must answer.
    fn metrics(&self) -> String {
        http_get(&self.ns, METRICS, "/metrics").unwrap_or_else(|| {
            self.fail(&format!(
                "the agent's /metrics ({METRICS} in {}) did not answer 200 within {HTTP_TIMEOUT:?}",
                self.ns
            ))
        })
    }

    fn polls(&self) -> f64 {
        let text = self.metrics();
        http::sample(&text, "egress_monitor_poll_duration_seconds_count").unwrap_or_else(|| {
            self.fail(&format!(
                "no egress_monitor_poll_duration_seconds_count in /metrics:\n{text}"
            ))
        })
    }

    /// Polling goes on: over `samples` scrapes `gap` apart, /metrics answers every time
    /// and the poll count grows between any two.
    fn assert_polling(&self, samples: usize, gap: Duration) -> Vec<f64> {
        let mut counts = vec![self.polls()];
        for _ in 1..samples {
            thread::sleep(gap);
            counts.push(self.polls());
            let n = counts.len();
            if counts[n - 1] <= counts[n - 2] {
                self.fail(&format!(
                    "polling stalled during the outage: poll counts {counts:?}, {gap:?} apart"
                ));
            }
        }
        counts
    }

    /// SIGTERM; the agent must exit 0 within [`AGENT_STOP_LIMIT`].
    fn stop(mut self) -> Stopped {
        if let Some(status) = self.child.try_wait().expect("wait for the agent") {
            self.fail(&format!("agent exited ({status}) before it was stopped"));
        }
        let start = Instant::now();
        signal(self.child.id(), libc::SIGTERM);
        let Some(status) = wait_within(&mut self.child, AGENT_STOP_LIMIT) else {
            kill_child(&mut self.child);
            self.fail(&format!(
                "agent did not exit within {AGENT_STOP_LIMIT:?} of SIGTERM (killed)"
            ));
        };
        let took = start.elapsed();
        if !status.success() {
            self.fail(&format!(
                "agent exited with {status} after SIGTERM, expected 0"
            ));
        }
        Stopped {
            stderr: self.stderr(),
            took,
            alerts: self.alerts(),
        }
    }
}

impl Drop for SinkAgent {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

// ---------------------------------------------------------------------------------------
// rsyslog

/// A scratch directory for a syslog receiver: its config, its socket, what it wrote.
struct SyslogDir {
    scratch: Scratch,
}

impl SyslogDir {
    fn new() -> SyslogDir {
        SyslogDir {
            scratch: Scratch::new("sink-outage-syslog"),
        }
    }

    fn socket(&self) -> PathBuf {
        self.scratch.path("log.sock")
    }

    fn url(&self) -> String {
        format!("unix:{}", self.socket().display())
    }

    fn output(&self) -> PathBuf {
        self.scratch.path("received.log")
    }

    /// The agent's messages rsyslog wrote so far, as the JSON of their MSG, from every
    /// rsyslog instance that ran on this directory.
    fn received(&self) -> Vec<Value> {
        let text = read_text(&self.output());
        text.lines()
            .filter_map(|line| {
                // <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG
                let fields: Vec<&str> = line.splitn(8, ' ').collect();
                let [_, _, _, app, _, msgid, _, msg] = fields[..] else {
                    return None;
                };
                (app == APP_NAME).then(|| {
                    let json: Value = serde_json::from_str(msg)
                        .unwrap_or_else(|e| panic!("rsyslog line's MSG is not JSON ({e}): {line}"));
                    assert_eq!(json["note"], msgid, "MSGID is the note: {line}");
                    json
                })
            })
            .collect()
    }
}

/// `rsyslogd -n` with one `imuxsock` input on the directory's socket and one file output
/// in RFC 5424 form; SIGKILLed by PID when killed or dropped.
struct Rsyslog {
    child: Child,
    stderr: PathBuf,
}

impl Rsyslog {
    /// Starts rsyslog and returns once its socket exists.
    fn start(dir: &SyslogDir) -> Rsyslog {
        assert!(
            Path::new(RSYSLOGD).is_file(),
            "{RSYSLOGD} not found: install rsyslog (apt-get install -y rsyslog)"
        );
        let n = NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed);
        let socket = dir.socket();
        // A killed rsyslog leaves its socket file: gone, the wait below sees the new one.
        match fs::remove_file(&socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("remove the stale socket {}: {e}", socket.display()),
        }
        let conf = format!(
            "global(workDirectory=\"{work}\" net.enableDNS=\"off\")\n\
             module(load=\"imuxsock\" SysSock.Use=\"off\")\n\
             input(type=\"imuxsock\" Socket=\"{socket}\" UseSpecialParser=\"off\" \
             ParseHostname=\"on\" IgnoreTimestamp=\"off\" RateLimit.Interval=\"0\")\n\
             action(type=\"omfile\" file=\"{out}\" template=\"RSYSLOG_SyslogProtocol23Format\")\n",
            work = dir.scratch.path("").display(),
            socket = socket.display(),
            out = dir.output().display(),
        );
        let conf_path = dir.scratch.path(&format!("rsyslog-{n}.conf"));
        fs::write(&conf_path, conf).expect("write the rsyslog config");
        let stderr = dir.scratch.path(&format!("rsyslogd-{n}.stderr"));
        let child = Command::new(RSYSLOGD)
            .arg("-n")
            .arg("-f")
            .arg(&conf_path)
            .arg("-i")
            .arg(dir.scratch.path(&format!("rsyslogd-{n}.pid")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).expect("create the rsyslogd stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("start {RSYSLOGD}: {e}"));
        let mut rsyslog = Rsyslog { child, stderr };
        let start = Instant::now();
        while !fs::metadata(&socket).is_ok_and(|m| m.file_type().is_socket()) {
            if let Ok(Some(status)) = rsyslog.child.try_wait() {
                panic!("rsyslogd exited ({status}): {}", read_text(&rsyslog.stderr));
            }
            assert!(
                start.elapsed() < SINK_START_LIMIT,
                "rsyslogd made no socket {} within {SINK_START_LIMIT:?}; stderr: {}",
                socket.display(),
                read_text(&rsyslog.stderr)
            );
            thread::sleep(Duration::from_millis(20));
        }
        rsyslog
    }

    /// The receiver crashes: SIGKILL, reaped before this returns.
    fn kill(mut self) {
        kill_child(&mut self.child);
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// Waits until rsyslog wrote exactly the alerts of the alert log (`expected`, in order);
/// returns how long that took.
fn wait_syslog_delivery(agent: &SinkAgent, dir: &SyslogDir, expected: &[Value]) -> Duration {
    let start = Instant::now();
    loop {
        let received = dir.received();
        if received.len() >= expected.len() {
            if received != expected {
                agent.fail(&format!(
                    "rsyslog got other messages than the alert log's alerts, in order\n\
                     expected:\n{}\nreceived:\n{}",
                    listing(expected),
                    listing(&received)
                ));
            }
            return start.elapsed();
        }
        if start.elapsed() > DELIVERY_LIMIT {
            agent.fail(&format!(
                "rsyslog got {} of {} alerts within {DELIVERY_LIMIT:?} of coming back\n\
                 received:\n{}",
                received.len(),
                expected.len(),
                listing(&received)
            ));
        }
        thread::sleep(STEP);
    }
}

// ---------------------------------------------------------------------------------------
// Alertmanager

/// Alertmanager's config and storage, kept across restarts.
struct AlertmanagerDir {
    scratch: Scratch,
}

impl AlertmanagerDir {
    fn new() -> AlertmanagerDir {
        let scratch = Scratch::new("sink-outage-am");
        fs::write(
            scratch.path("alertmanager.yml"),
            "route:\n  receiver: nowhere\nreceivers:\n  - name: nowhere\n",
        )
        .expect("write alertmanager.yml");
        AlertmanagerDir { scratch }
    }
}

/// prometheus-alertmanager in gw's namespace on [`ALERTMANAGER`]; SIGKILLed by PID when
/// killed or dropped.
struct Alertmanager {
    child: Child,
    stderr: PathBuf,
}

impl Alertmanager {
    /// Starts it and returns once its API answers.
    fn start(lab: &Lab, dir: &AlertmanagerDir) -> Alertmanager {
        assert!(
            Path::new(ALERTMANAGER_BIN).is_file(),
            "{ALERTMANAGER_BIN} not found: install prometheus-alertmanager"
        );
        let n = NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed);
        let stderr = dir.scratch.path(&format!("alertmanager-{n}.stderr"));
        let config = dir.scratch.path("alertmanager.yml");
        let storage = dir.scratch.path("data");
        // `ip netns exec` execs Alertmanager: this PID is its own.
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.gw, ALERTMANAGER_BIN])
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", storage.display()))
            .arg(format!("--web.listen-address={ALERTMANAGER}"))
            .arg("--cluster.listen-address=")
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).expect("create the alertmanager stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("start {ALERTMANAGER_BIN} in {}: {e}", lab.gw));
        let mut am = Alertmanager { child, stderr };
        let start = Instant::now();
        while http_get(&lab.gw, ALERTMANAGER, "/api/v2/status").is_none() {
            if let Ok(Some(status)) = am.child.try_wait() {
                panic!("alertmanager exited ({status}): {}", read_text(&am.stderr));
            }
            assert!(
                start.elapsed() < SINK_START_LIMIT,
                "alertmanager not answering within {SINK_START_LIMIT:?}; stderr: {}",
                read_text(&am.stderr)
            );
            thread::sleep(Duration::from_millis(100));
        }
        am
    }

    /// Alertmanager crashes: SIGKILL, reaped before this returns.
    fn kill(mut self) {
        kill_child(&mut self.child);
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// The alerts Alertmanager holds, or None if it does not answer.
fn alertmanager_alerts(lab: &Lab) -> Option<Vec<Value>> {
    let body = http_get(&lab.gw, ALERTMANAGER, "/api/v2/alerts")?;
    let json: Value = serde_json::from_str(&body).ok()?;
    json.as_array().cloned()
}

/// Waits until Alertmanager holds an alert for each of `expected` (alert-log alerts, one
/// destination each) with the same source, destination and message; returns how long that
/// took.
fn wait_alertmanager_delivery(agent: &SinkAgent, lab: &Lab, expected: &[Value]) -> Duration {
    let start = Instant::now();
    loop {
        let held = alertmanager_alerts(lab).unwrap_or_default();
        let missing: Vec<&Value> = expected
            .iter()
            .filter(|want| {
                !held.iter().any(|got| {
                    got["labels"]["note"] == NOTE
                        && got["labels"]["src"] == want["src"]
                        && got["labels"]["dst"] == want["dst"]
                        && got["annotations"]["msg"] == want["msg"]
                })
            })
            .collect();
        if missing.is_empty() {
            return start.elapsed();
        }
        if start.elapsed() > DELIVERY_LIMIT {
            agent.fail(&format!(
                "{} of {} alerts not in Alertmanager within {DELIVERY_LIMIT:?} of it coming \
                 back\nmissing:\n{}\nAlertmanager holds:\n{}",
                missing.len(),
                expected.len(),
                missing
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join("\n"),
                listing(&held)
            ));
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Extra wan addresses 203.0.113.10.., one Alertmanager alert each.
fn wan_extras(lab: &Lab, count: u8) -> Vec<Ipv4Addr> {
    (0..count)
        .map(|i| {
            let addr = Ipv4Addr::new(203, 0, 113, WAN_EXTRA_BASE + i);
            add_wan_address(lab, addr);
            addr
        })
        .collect()
}

fn assert_no_undelivered(stopped: &Stopped, sink: &str) {
    assert!(
        !stopped
            .stderr
            .lines()
            .any(|l| l.contains(&format!("{sink}:")) && l.contains("undelivered at shutdown")),
        "{sink} had alerts left at shutdown although it was up:\n{}",
        stopped.stderr
    );
}

// ---------------------------------------------------------------------------------------
// The cases

#[test]
fn syslog_down_at_start_gets_the_alerts_once_up() {
    let lab = Lab::new();
    let dir = SyslogDir::new();
    let url = dir.url();
    let agent = SinkAgent::start(&lab, &["--syslog", &url]);

    // No receiver: each alert still reaches the alert log at once.
    let mut logged = Vec::new();
    for port in [20_001, 20_002, 20_003] {
        logged.push(agent.raise_and_log(&lab, WAN, port));
    }
    agent.wait_stderr(
        "alert sink syslog: delivery failed, will retry",
        FAILURE_LOG_LIMIT,
    );
    agent.assert_polling(LONG_OUTAGE_SAMPLES, LONG_OUTAGE_GAP);
    assert!(dir.received().is_empty(), "nothing can have been received");

    let _rsyslog = Rsyslog::start(&dir);
    let took = wait_syslog_delivery(&agent, &dir, &agent.alerts());
    eprintln!("syslog up after a long outage: the queued alerts arrived in {took:?}");
    agent.wait_stderr(
        "alert sink syslog: delivering again after",
        FAILURE_LOG_LIMIT,
    );
    let stopped = agent.stop();
    assert_eq!(
        stopped.alerts,
        logged,
        "exactly the three alerts raised:\n{}",
        listing(&stopped.alerts)
    );
    assert_eq!(dir.received(), logged, "each delivered once, in order");
    assert_no_undelivered(&stopped, "syslog");
}

#[test]
fn syslog_gone_mid_run_gets_the_outage_alerts_once_back() {
    let lab = Lab::new();
    let dir = SyslogDir::new();
    let rsyslog = Rsyslog::start(&dir);
    let url = dir.url();
    let agent = SinkAgent::start(&lab, &["--syslog", &url]);

    let before = agent.raise_and_log(&lab, WAN, 20_001);
    wait_syslog_delivery(&agent, &dir, std::slice::from_ref(&before));

    rsyslog.kill();
    let mut during = Vec::new();
    for port in [20_002, 20_003, 20_004] {
        during.push(agent.raise_and_log(&lab, WAN, port));
    }
    agent.wait_stderr(
        "alert sink syslog: delivery failed, will retry",
        FAILURE_LOG_LIMIT,
    );
    agent.assert_polling(3, Duration::from_millis(700));
    assert_eq!(
        dir.received(),
        std::slice::from_ref(&before),
        "only the alert from before the outage can have been received"
    );

    let _rsyslog = Rsyslog::start(&dir);
    let all: Vec<Value> = std::iter::once(before).chain(during).collect();
    let took = wait_syslog_delivery(&agent, &dir, &all);
    eprintln!("syslog back: the outage's alerts arrived in {took:?}");
    agent.wait_stderr(
        "alert sink syslog: delivering again after",
        FAILURE_LOG_LIMIT,
    );
    let stopped = agent.stop();
    assert_eq!(stopped.alerts, all, "exactly the four alerts raised");
    assert_eq!(dir.received(), all, "each delivered once, in order");
    assert_no_undelivered(&stopped, "syslog");
}

#[test]
fn alertmanager_down_at_start_gets_the_alerts_once_up() {
    let lab = Lab::new();
    let dsts = wan_extras(&lab, 3);
    let dir = AlertmanagerDir::new();
    let url = format!("http://{ALERTMANAGER}");
    let agent = SinkAgent::start(&lab, &["--alertmanager-url", &url]);

    let mut logged = Vec::new();
    for &dst in &dsts {
        logged.push(agent.raise_and_log(&lab, dst, 20_001));
    }
    agent.wait_stderr(
        "alert sink alertmanager: delivery failed, will retry",
        FAILURE_LOG_LIMIT,
    );
    agent.assert_polling(LONG_OUTAGE_SAMPLES, LONG_OUTAGE_GAP);

    let _am = Alertmanager::start(&lab, &dir);
    let took = wait_alertmanager_delivery(&agent, &lab, &logged);
    eprintln!("alertmanager up after a long outage: the queued alerts arrived in {took:?}");
    agent.wait_stderr(
        "alert sink alertmanager: delivering again after",
        FAILURE_LOG_LIMIT,
    );
    let stopped = agent.stop();
    assert_eq!(stopped.alerts, logged, "exactly the three alerts raised");
    assert_no_undelivered(&stopped, "alertmanager");
}

#[test]
fn alertmanager_gone_mid_run_gets_the_outage_alerts_once_back() {
    let lab = Lab::new();
    let dsts = wan_extras(&lab, 4);
    let dir = AlertmanagerDir::new();
    let am = Alertmanager::start(&lab, &dir);
    let url = format!("http://{ALERTMANAGER}");
    let agent = SinkAgent::start(&lab, &["--alertmanager-url", &url]);

    let before = agent.raise_and_log(&lab, dsts[0], 20_001);
    wait_alertmanager_delivery(&agent, &lab, std::slice::from_ref(&before));

    am.kill();
    let mut during = Vec::new();
    for &dst in &dsts[1..] {
        during.push(agent.raise_and_log(&lab, dst, 20_001));
    }
    agent.wait_stderr(
        "alert sink alertmanager: delivery failed, will retry",
        FAILURE_LOG_LIMIT,
    );
    agent.assert_polling(3, Duration::from_millis(700));

    // Alertmanager keeps alerts in memory only: the restarted one (same storage) has just
    // what is posted to it from now on.
    let _am = Alertmanager::start(&lab, &dir);
    let took = wait_alertmanager_delivery(&agent, &lab, &during);
    eprintln!("alertmanager back: the outage's alerts arrived in {took:?}");
    agent.wait_stderr(
        "alert sink alertmanager: delivering again after",
        FAILURE_LOG_LIMIT,
    );
    let stopped = agent.stop();
    let all: Vec<Value> = std::iter::once(before).chain(during).collect();
    assert_eq!(stopped.alerts, all, "exactly the four alerts raised");
    assert_no_undelivered(&stopped, "alertmanager");
}

#[test]
fn polling_and_detection_go_on_with_both_sinks_down() {
    let lab = Lab::new();
    let syslog_dir = SyslogDir::new();
    let syslog_url = syslog_dir.url();
    // Nothing listens on either: the unix socket does not exist, and nothing serves
    // Alertmanager's port in gw's namespace.
    let am_url = format!("http://{ALERTMANAGER}");
    let agent = SinkAgent::start(
        &lab,
        &["--syslog", &syslog_url, "--alertmanager-url", &am_url],
    );

    let ports = 20_001..20_006u16;
    let mut polls = vec![agent.polls()];
    for port in ports.clone() {
        agent.raise_and_log(&lab, WAN, port);
        thread::sleep(Duration::from_millis(600));
        polls.push(agent.polls());
        let n = polls.len();
        if polls[n - 1] <= polls[n - 2] {
            agent.fail(&format!(
                "polling stalled with both sinks down: poll counts {polls:?}"
            ));
        }
    }
    for sink in ["syslog", "alertmanager"] {
        agent.wait_stderr(
            &format!("alert sink {sink}: delivery failed, will retry"),
            FAILURE_LOG_LIMIT,
        );
    }
    let raised = ports.len();
    let text = agent.metrics();
    let counted = http::sample(
        &text,
        &format!("egress_monitor_alerts_total{{note=\"{NOTE}\"}}"),
    );
    assert_eq!(
        counted,
        Some(raised as f64),
        "alerts_total counts every alert raised"
    );
    // The outage is visible in /metrics while it lasts, not only in the log.
    for sink in ["syslog", "alertmanager"] {
        let series = format!("egress_monitor_alert_delivery_failures_total{{sink=\"{sink}\"}}");
        let failures = http::sample(&text, &series);
        assert!(
            failures.is_some_and(|f| f >= 1.0),
            "{series} is {failures:?} during the outage:\n{text}"
        );
    }

    // Shutdown gives the sinks up to 5 s, then reports what it could not deliver.
    let stopped = agent.stop();
    eprintln!(
        "both sinks down at SIGTERM: the agent exited after {:?}",
        stopped.took
    );
    assert_eq!(
        stopped.alerts.len(),
        raised,
        "one alert per port:\n{}",
        listing(&stopped.alerts)
    );
    for sink in ["syslog", "alertmanager"] {
        let want =
            format!("{sink}: 0 alerts dropped (queue full), {raised} undelivered at shutdown");
        assert!(
            stopped.stderr.contains(&want),
            "the agent must report {want:?} (took {:?} to stop); stderr:\n{}",
            stopped.took,
            stopped.stderr
        );
    }
    assert!(
        syslog_dir.received().is_empty(),
        "no receiver ever listened"
    );
}

// ---------------------------------------------------------------------------------------
// A failing log disk

/// A tmpfs of 64 KiB at a scratch directory, filled to the last byte; unmounted on drop.
struct FullDisk {
    scratch: Scratch,
    filler: PathBuf,
}

impl FullDisk {
    fn new() -> FullDisk {
        let scratch = Scratch::new("full-disk");
        let mount = scratch.path("");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(&mount)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount a tmpfs at {}", mount.display());
        let filler = scratch.path("filler");
        let mut file = fs::File::create(&filler).expect("create the filler");
        let block = [0u8; 4096];
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("fill the tmpfs: {e}"),
            }
        }
        FullDisk { scratch, filler }
    }

    fn path(&self, name: &str) -> String {
        self.scratch.path(name).display().to_string()
    }

    /// Room again: the filler goes.
    fn free(&self) {
        fs::remove_file(&self.filler).expect("remove the filler");
    }
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.scratch.path("")).status();
    }
}

/// Lookups from the lan host every 20 ms until finished or dropped: every poll has
/// dns.log records to write. At most 3000 lookups (a minute).
struct Lookups {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<u32>>,
}

impl Lookups {
    fn start(lab: &Lab, resolver: SocketAddr) -> Lookups {
        let stop = Arc::new(AtomicBool::new(false));
        let (lan, stopped) = (lab.lan.clone(), stop.clone());
        let thread = thread::spawn(move || {
            let mut lookups = 0;
            while !stopped.load(Ordering::Relaxed) && lookups < 3000 {
                dns_lab::resolve(&lan, resolver, "files.example.test", dns_lab::TYPE_A, false);
                lookups += 1;
                thread::sleep(Duration::from_millis(20));
            }
            lookups
        });
        Lookups {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the lookups; how many were answered.
    fn finish(mut self) -> u32 {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("joined once");
        thread.join().expect("the lookups thread")
    }
}

impl Drop for Lookups {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn a_full_log_disk_loses_no_alert() {
    let lab = Lab::new();
    let dir = SyslogDir::new();
    let _rsyslog = Rsyslog::start(&dir);
    let disk = FullDisk::new();
    let resolver = dns_lab::start_dnsmasq(&lab, &["--address=/files.example.test/203.0.113.2"]);
    let (conn_log, dns_log) = (disk.path("conn.log"), disk.path("dns.log"));
    let agent = SinkAgent::start(
        &lab,
        &[
            "--syslog",
            &dir.url(),
            "--conn-log",
            &conn_log,
            "--dns-log",
            &dns_log,
            "--upload-threshold",
            "200KB",
            "--upload-min-packets",
            "10",
        ],
    );
    let lookups = Lookups::start(&lab, resolver);
    agent.wait_stderr("No space left on device", ALERT_LOG_LIMIT);

    let upload = traffic::tcp_upload(&lab.lan, &lab.wan, SocketAddr::from((WAN, 5302)), 1_000_000);
    let is_upload = |a: &Value| {
        a["note"] == "LargeUpload"
            && a["id.orig_p"] == upload.client.port()
            && a["id.resp_p"] == 5302
    };
    let start = Instant::now();
    while !read_json_lines(&agent.alert_log).iter().any(is_upload) {
        if start.elapsed() > ALERT_LOG_LIMIT {
            agent.fail("the LargeUpload never reached the alert log while dns.log failed");
        }
        thread::sleep(STEP);
    }
    let start = Instant::now();
    while !dir.received().iter().any(is_upload) {
        if start.elapsed() > DELIVERY_LIMIT {
            agent.fail("the LargeUpload never reached rsyslog while dns.log failed");
        }
        thread::sleep(STEP);
    }
    let errors = http::sample(
        &agent.metrics(),
        "egress_monitor_log_write_errors_total{log=\"dns\"}",
    );
    assert!(
        errors.is_some_and(|n| n >= 1.0),
        "dns.log's failed writes counted: {errors:?}"
    );

    // Room again: what waited is written, and the agent says the episode ended.
    disk.free();
    agent.wait_stderr("dns.log: writes succeed again", ALERT_LOG_LIMIT);
    let lookups = lookups.finish();
    let stopped = agent.stop();
    assert_eq!(
        stopped.stderr.matches("dns.log: writing failed").count(),
        1,
        "one warning for the one episode:\n{}",
        stopped.stderr
    );
    let written = read_json_lines(Path::new(&dns_log));
    assert!(
        written.len() as u32 >= lookups,
        "every lookup has its dns.log record once the disk had room: {} records, {lookups} \
         lookups",
        written.len()
    );
}
