//! `--syslog` against a real rsyslog: alerts sent through the dispatcher and the syslog sink
//! over UDP and unix sockets (datagram and stream), as rsyslog receives and writes them;
//! retries until rsyslog comes up; and a dead or stuck receiver never blocking `submit`.
//!
//! Needs `rsyslogd` (Debian package `rsyslog`). Each test runs its own daemon in the
//! foreground with a config in a temporary directory: only the inputs it needs, one file
//! output in RFC 5424 form, nothing else of the system's syslog setup.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket},
    os::unix::{fs::FileTypeExt, net::UnixDatagram},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use monitor::{
    alerts::{
        Alert, Note,
        dispatch::Dispatcher,
        sinks::syslog::{APP_NAME, SCHEMES, SyslogSink, timestamp},
    },
    endpoint::Url,
    logs::conn::{ConnFields, ConnRecord},
};
use serde_json::Value;

const RSYSLOGD: &str = "/usr/sbin/rsyslogd";
const START_LIMIT: Duration = Duration::from_secs(10);
const RECEIVE_LIMIT: Duration = Duration::from_secs(10);
const FLUSH_LIMIT: Duration = Duration::from_secs(5);

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("egress-syslog-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Self(path)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// What rsyslog listens on.
enum Input {
    Udp(u16),
    /// `imuxsock`: a datagram socket, as /dev/log.
    UnixDgram(PathBuf),
    /// `imptcp` on a unix stream socket, octet-counted framing.
    UnixStream(PathBuf),
}

/// `rsyslogd -n` as a child; stopped (SIGTERM, then SIGKILL, by PID) when dropped.
struct Rsyslog {
    child: Child,
    out: PathBuf,
    stderr: PathBuf,
}

impl Rsyslog {
    /// Starts rsyslog in `dir` and returns once its input listens.
    fn start(dir: &TempDir, input: Input) -> Self {
        assert!(
            Path::new(RSYSLOGD).is_file(),
            "{RSYSLOGD} not found: install rsyslog (apt-get install -y rsyslog)"
        );
        let out = dir.path("received.log");
        let stderr = dir.path("rsyslogd.stderr");
        let input_conf = match &input {
            Input::Udp(port) => format!(
                "module(load=\"imudp\")\n\
                 input(type=\"imudp\" address=\"127.0.0.1\" port=\"{port}\")\n"
            ),
            // The regular parser chain (not imuxsock's special one) so RFC 5424 messages
            // keep their own hostname and timestamp.
            Input::UnixDgram(path) => format!(
                "module(load=\"imuxsock\" SysSock.Use=\"off\")\n\
                 input(type=\"imuxsock\" Socket=\"{}\" UseSpecialParser=\"off\" \
                 ParseHostname=\"on\" IgnoreTimestamp=\"off\" RateLimit.Interval=\"0\")\n",
                path.display()
            ),
            Input::UnixStream(path) => format!(
                "module(load=\"imptcp\")\n\
                 input(type=\"imptcp\" path=\"{}\" unlink=\"on\")\n",
                path.display()
            ),
        };
        let conf = format!(
            "global(workDirectory=\"{dir}\" net.enableDNS=\"off\")\n\
             {input_conf}\
             action(type=\"omfile\" file=\"{out}\" template=\"RSYSLOG_SyslogProtocol23Format\")\n",
            dir = dir.0.display(),
            out = out.display(),
        );
        let conf_path = dir.path("rsyslog.conf");
        fs::write(&conf_path, conf).expect("write the rsyslog config");
        let child = Command::new(RSYSLOGD)
            .arg("-n")
            .arg("-f")
            .arg(&conf_path)
            .arg("-i")
            .arg(dir.path("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr).expect("create the rsyslogd stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("start {RSYSLOGD}: {e}"));
        let mut rsyslog = Self { child, out, stderr };

        let start = Instant::now();
        while !rsyslog.listening(&input) {
            if let Ok(Some(status)) = rsyslog.child.try_wait() {
                panic!("rsyslogd exited ({status}): {}", rsyslog.stderr());
            }
            assert!(
                start.elapsed() < START_LIMIT,
                "rsyslogd not listening after {START_LIMIT:?}; stderr: {}",
                rsyslog.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
        rsyslog
    }

    fn listening(&self, input: &Input) -> bool {
        match input {
            Input::Udp(port) => {
                let bound = format!("0100007F:{port:04X}");
                fs::read_to_string("/proc/net/udp")
                    .expect("read /proc/net/udp")
                    .lines()
                    .any(|line| line.split_whitespace().nth(1) == Some(bound.as_str()))
            }
            Input::UnixDgram(path) | Input::UnixStream(path) => {
                fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
            }
        }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for `n` messages from the agent and returns them.
    fn wait_for(&self, n: usize) -> Vec<Received> {
        let start = Instant::now();
        loop {
            let text = fs::read_to_string(&self.out).unwrap_or_default();
            let ours: Vec<Received> = text
                .lines()
                .filter_map(Received::parse)
                .filter(|r| r.app == APP_NAME)
                .collect();
            if ours.len() >= n {
                assert_eq!(ours.len(), n, "more messages than sent:\n{text}");
                return ours;
            }
            assert!(
                start.elapsed() < RECEIVE_LIMIT,
                "rsyslog wrote {} of {n} messages in {RECEIVE_LIMIT:?}:\n{text}\nstderr: {}",
                ours.len(),
                self.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signals our own child, which has not been reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One line as rsyslog wrote it: `<PRI>VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD
/// MSG`.
#[derive(Debug)]
struct Received {
    line: String,
    pri: String,
    timestamp: String,
    hostname: String,
    app: String,
    procid: String,
    msgid: String,
    sd: String,
    msg: String,
}

impl Received {
    fn parse(line: &str) -> Option<Self> {
        let f: Vec<&str> = line.splitn(8, ' ').collect();
        let [head, timestamp, hostname, app, procid, msgid, sd, msg] = f[..] else {
            return None;
        };
        let pri = head.strip_suffix("1")?.to_owned();
        Some(Self {
            line: line.to_owned(),
            pri,
            timestamp: timestamp.to_owned(),
            hostname: hostname.to_owned(),
            app: app.to_owned(),
            procid: procid.to_owned(),
            msgid: msgid.to_owned(),
            sd: sd.to_owned(),
            msg: msg.to_owned(),
        })
    }

    /// Asserts this is `alert` as the sink must send it.
    fn assert_is(&self, alert: &Alert) {
        let line = &self.line;
        assert_eq!(
            self.pri, "<28>",
            "facility daemon, severity warning: {line}"
        );
        assert_eq!(self.hostname, hostname(), "{line}");
        assert_eq!(self.app, "egress-monitor", "{line}");
        assert_eq!(self.procid, std::process::id().to_string(), "{line}");
        assert_eq!(self.msgid, alert.note.as_str(), "MSGID is the note: {line}");
        assert_eq!(self.sd, "-", "{line}");
        assert_eq!(
            self.timestamp,
            timestamp(alert.ts),
            "the alert's ts, RFC 3339 in UTC: {line}"
        );
        let json: Value = serde_json::from_str(&self.msg)
            .unwrap_or_else(|e| panic!("MSG is not JSON ({e}): {line}"));
        let want = serde_json::to_value(alert).unwrap();
        assert_eq!(json, want, "MSG is the alert's JSON: {line}");
        assert_eq!(json["note"], alert.note.as_str());
        assert_eq!(json["msg"], alert.msg.as_str());
    }
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("read the host name")
        .trim()
        .to_owned()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("find a free UDP port")
        .port()
}

/// Alert `n`: notes in turn, one about a connection with all its fields.
fn alert(n: u32) -> Alert {
    let note = Note::ALL[n as usize % Note::ALL.len()];
    let src = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7));
    let dst = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9));
    let ts = 1_714_564_800.0 + f64::from(n) / 8.0;
    let msg = format!("alert {n}: 10.0.0.7 → 2001:db8::9 \"sent\" a lot");
    if n.is_multiple_of(2) {
        let record = ConnRecord {
            ts: ts - 60.0,
            fields: ConnFields {
                uid: format!("C{n:016x}"),
                orig_h: src,
                orig_p: 40_000 + n as u16,
                resp_h: dst,
                resp_p: 443,
                proto: "tcp".to_owned(),
                duration: 60.0,
                orig_bytes: 150_000_000,
                resp_bytes: 4_000,
                orig_pkts: 110_000,
                orig_ip_bytes: 155_000_000,
                resp_pkts: 50_000,
                resp_ip_bytes: 6_000_000,
                conn_state: "S1",
                local_orig: true,
                local_resp: false,
                missed_start: false,
                iface: "eth0".to_owned(),
                remote_fqdn: None,
                server_name: Some("exfil.test".to_owned()),
                ech: false,
                encrypted_dns: false,
                nat: None,
                owner: None,
            },
        };
        Alert::for_conn(ts, note, msg, src, dst, record, format!("k{n}"))
            .with("threshold", 100_000_000u64)
            .with("bytes", 150_000_000u64)
    } else {
        Alert {
            ts,
            note,
            msg,
            src,
            dst: None,
            first_seen: None,
            conn: None,
            figures: serde_json::Map::new(),
            key: format!("k{n}"),
            quiet: None,
            conn_log: None,
        }
        .with("window", 300)
    }
}

/// Sends `n` alerts to `url` through a dispatcher and checks what `rsyslog` wrote.
fn send_and_check(url: &str, rsyslog: &Rsyslog, n: u32) {
    let sink = SyslogSink::new(Url::parse(url, SCHEMES).unwrap_or_else(|e| panic!("{e}")));
    let dispatcher = Dispatcher::spawn(Box::new(sink), 64);
    let alerts: Vec<Alert> = (0..n).map(alert).collect();
    for a in &alerts {
        dispatcher.submit(a.clone());
    }
    let failures = dispatcher.failures();
    assert_eq!(
        dispatcher.shutdown(FLUSH_LIMIT),
        0,
        "all delivered to {url}"
    );
    assert_eq!(failures, 0, "no failed attempt to a listening rsyslog");
    let received = rsyslog.wait_for(alerts.len());
    for (got, want) in received.iter().zip(&alerts) {
        got.assert_is(want);
    }
}

#[test]
fn alerts_over_udp_reach_rsyslog() {
    let dir = TempDir::new();
    let port = free_udp_port();
    let rsyslog = Rsyslog::start(&dir, Input::Udp(port));
    send_and_check(&format!("udp://127.0.0.1:{port}"), &rsyslog, 12);
}

#[test]
fn alerts_over_unix_datagram_reach_rsyslog() {
    let dir = TempDir::new();
    let socket = dir.path("log.sock");
    let rsyslog = Rsyslog::start(&dir, Input::UnixDgram(socket.clone()));
    send_and_check(&format!("unix:{}", socket.display()), &rsyslog, 12);
}

#[test]
fn alerts_over_unix_stream_reach_rsyslog_octet_counted() {
    let dir = TempDir::new();
    let socket = dir.path("stream.sock");
    let rsyslog = Rsyslog::start(&dir, Input::UnixStream(socket.clone()));
    send_and_check(&format!("unix:{}", socket.display()), &rsyslog, 12);
}

#[test]
fn queued_alerts_are_delivered_once_rsyslog_comes_up() {
    let dir = TempDir::new();
    let socket = dir.path("log.sock");
    let sink = SyslogSink::new(Url::parse(&format!("unix:{}", socket.display()), SCHEMES).unwrap());
    let dispatcher = Dispatcher::spawn(Box::new(sink), 64);
    let alerts: Vec<Alert> = (0..6).map(alert).collect();
    for a in &alerts {
        dispatcher.submit(a.clone());
    }

    let start = Instant::now();
    while dispatcher.failures() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no retry without a receiver: {} failures",
            dispatcher.failures()
        );
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(dispatcher.delivered(), 0);
    assert_eq!(dispatcher.queued(), alerts.len());

    let rsyslog = Rsyslog::start(&dir, Input::UnixDgram(socket));
    let received = rsyslog.wait_for(alerts.len());
    for (got, want) in received.iter().zip(&alerts) {
        got.assert_is(want);
    }
    assert_eq!(dispatcher.dropped(), 0);
    assert_eq!(dispatcher.shutdown(FLUSH_LIMIT), 0);
}

/// 1000 submits, timed: they must not wait for the sink.
fn assert_submits_do_not_block(dispatcher: &Dispatcher, what: &str) {
    let start = Instant::now();
    for n in 0..1000 {
        dispatcher.submit(alert(n));
    }
    let took = start.elapsed();
    assert!(
        took < Duration::from_millis(250),
        "{what}: 1000 submits took {took:?}"
    );
}

#[test]
fn submit_never_blocks_on_a_missing_receiver() {
    let dir = TempDir::new();
    let url = format!("unix:{}", dir.path("nobody.sock").display());
    let dispatcher = Dispatcher::spawn(
        Box::new(SyslogSink::new(Url::parse(&url, SCHEMES).unwrap())),
        16,
    );
    assert_submits_do_not_block(&dispatcher, "missing socket");
    assert_eq!(dispatcher.dropped(), 1000 - 16, "exactly what did not fit");
    let start = Instant::now();
    assert_eq!(dispatcher.shutdown(Duration::from_millis(300)), 16);
    assert!(start.elapsed() < Duration::from_secs(2), "bounded shutdown");
}

#[test]
fn submit_never_blocks_on_a_receiver_that_does_not_read() {
    let dir = TempDir::new();
    let path = dir.path("stuck.sock");
    // Bound and never read: once its queue is full, sends block (up to the sink's timeout).
    let _receiver = UnixDatagram::bind(&path).expect("bind a unix datagram socket");
    let url = format!("unix:{}", path.display());
    let dispatcher = Dispatcher::spawn(
        Box::new(SyslogSink::new(Url::parse(&url, SCHEMES).unwrap())),
        16,
    );
    for _ in 0..5 {
        assert_submits_do_not_block(&dispatcher, "receiver not reading");
    }
    let start = Instant::now();
    while dispatcher.failures() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "sends to a full receiver never timed out"
        );
        thread::sleep(Duration::from_millis(10));
    }
    // The receiver is full now: what is submitted from here on stays queued. (Before,
    // the thread may not have delivered anything yet when the submits above ended.)
    assert_submits_do_not_block(&dispatcher, "receiver full");
    assert!(dispatcher.dropped() > 0);
    let (delivered, dropped) = (dispatcher.delivered(), dispatcher.dropped());
    let start = Instant::now();
    let left = dispatcher.shutdown(Duration::from_millis(300));
    assert!(start.elapsed() < Duration::from_secs(2), "bounded shutdown");
    assert_eq!(left, 16, "the queue stayed full");
    assert_eq!(
        delivered + dropped + left as u64,
        6000,
        "every alert accounted for"
    );
}

#[test]
fn submit_never_blocks_on_an_unreachable_udp_port() {
    let port = free_udp_port();
    let url = format!("udp://127.0.0.1:{port}");
    let dispatcher = Dispatcher::spawn(
        Box::new(SyslogSink::new(Url::parse(&url, SCHEMES).unwrap())),
        16,
    );
    assert_submits_do_not_block(&dispatcher, "nobody on the UDP port");
    let start = Instant::now();
    dispatcher.shutdown(Duration::from_millis(300));
    assert!(start.elapsed() < Duration::from_secs(2), "bounded shutdown");
}
