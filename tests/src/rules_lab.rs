//! Support for the detection-rule labs (`tests/labs/lab_rules.rs`): the agent with its alert
//! log in a file that the test reads while the agent runs, a second address on the wan
//! host, host names for the agent (`/etc/netns/<ns>/hosts`), and TCP and HTTP endpoints a
//! test drives step by step (a socket stays open until the test closes it).
//!
//! Sockets are created on a thread inside the right namespace ([`run_in_ns`]) and then
//! used from ordinary threads.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    ops::Deref,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

use crate::{
    agent::{Agent, ConnRecord},
    lab::{self, Lab, ip, run_in_ns},
    traffic,
};

/// A second address of the wan host (a /32 on its veth), for a destination that differs
/// from [`lab::WAN_HOST_V4`] in allowlists and exclusions.
pub const WAN_HOST2_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 3);

/// Every blocking socket call gives up after this long.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const ACCEPT_LIMIT: Duration = Duration::from_secs(30);
const CHUNK: usize = 64 * 1024;
/// Largest body the HTTP server sends for `GET /bytes/N`.
const HTTP_MAX_BODY: u64 = 100_000_000;
const WAIT_STEP: Duration = Duration::from_millis(100);

static NEXT_SCRATCH: AtomicU32 = AtomicU32::new(0);

/// Wall-clock time as epoch seconds, the unit of the agent's `ts` fields.
pub fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// A directory of this test's own, removed when dropped.
pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let n = NEXT_SCRATCH.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("monitor-rules-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("create scratch dir {}: {e}", dir.display()));
        Scratch { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The complete JSON lines of a file another process appends to: a last line without its
/// newline is still being written and is left out. A missing file has no lines.
pub fn read_json_lines(path: &Path) -> Vec<Value> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("read {}: {e}", path.display()),
    };
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    complete
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: line is not JSON ({e}): {line}", path.display()))
        })
        .collect()
}

/// One alert line. Its connection fields and figures are read with [`ConnRecord`]'s
/// accessors, which panic with the whole line when a field is missing.
#[derive(Clone, Debug, PartialEq)]
pub struct Alert(pub ConnRecord);

impl Alert {
    pub fn note(&self) -> &str {
        self.str("note")
    }

    /// Whether this alert is about the connection between `client` and `server`, either
    /// way round.
    pub fn is_conn(&self, proto: &str, client: SocketAddr, server: SocketAddr) -> bool {
        self.0.is_between(
            proto,
            (client.ip(), client.port()),
            (server.ip(), server.port()),
        )
    }
}

impl Deref for Alert {
    type Target = ConnRecord;

    fn deref(&self) -> &ConnRecord {
        &self.0
    }
}

impl std::fmt::Display for Alert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// The alerts of one rule.
pub fn of<'a>(alerts: &'a [Alert], note: &str) -> Vec<&'a Alert> {
    alerts.iter().filter(|a| a.note() == note).collect()
}

/// Every alert, one per line, for failure messages.
pub fn listing(alerts: &[Alert]) -> String {
    if alerts.is_empty() {
        return "(no alerts)".into();
    }
    alerts
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// What a stopped agent left: alerts, finished connections, long-connection records.
pub struct Stopped {
    pub alerts: Vec<Alert>,
    pub conns: Vec<ConnRecord>,
    pub long_log: Vec<ConnRecord>,
}

/// The agent on gw's WAN-facing veth with the lab's local nets, 200 ms polls, its alert
/// log and long-connection log in files of its own.
pub struct RulesAgent {
    // Dropped first: the agent is killed before its files go.
    agent: Agent,
    alert_log: PathBuf,
    long_log: PathBuf,
    _scratch: Scratch,
}

impl RulesAgent {
    /// `monitor run --iface <gw wan> --local-net ... --poll-interval 200ms --alert-log FILE
    /// --conn-long-log FILE RULE_FLAGS...`
    pub fn start(lab: &Lab, rule_flags: &[&str]) -> RulesAgent {
        Self::start_with(rule_flags, |args| {
            Agent::start(&lab.gw, &lab.gw_wan_if, args)
        })
    }

    /// Like [`start`](Self::start), with no `--iface`: the agent watches the interface of
    /// gw's default route, as a user's first run does.
    pub fn start_default(lab: &Lab, rule_flags: &[&str]) -> RulesAgent {
        Self::start_with(rule_flags, |args| Agent::start_default(&lab.gw, args))
    }

    /// Like [`start`](Self::start), entering only gw's network namespace: the agent sees
    /// the host's mounts (its cgroup tree among them), as on a real gateway.
    pub fn start_seeing_host(lab: &Lab, rule_flags: &[&str]) -> RulesAgent {
        Self::start_with(rule_flags, |args| {
            Agent::start_seeing_host(&lab.gw, &lab.gw_wan_if, args)
        })
    }

    /// Like [`start`](Self::start), watching `ifaces` of gw.
    pub fn start_on(lab: &Lab, ifaces: &[&str], rule_flags: &[&str]) -> RulesAgent {
        let mut flags: Vec<&str> = ifaces.iter().skip(1).flat_map(|i| ["--iface", i]).collect();
        flags.extend_from_slice(rule_flags);
        Self::start_with(&flags, |args| Agent::start(&lab.gw, ifaces[0], args))
    }

    fn start_with(rule_flags: &[&str], launch: impl FnOnce(&[&str]) -> Agent) -> RulesAgent {
        let scratch = Scratch::new("agent");
        let alert_log = scratch.path("alerts.jsonl");
        let long_log = scratch.path("conn_long.jsonl");
        let alert_arg = alert_log.to_str().expect("UTF-8 temp path").to_string();
        let long_arg = long_log.to_str().expect("UTF-8 temp path").to_string();
        let mut args = vec![
            "--local-net",
            lab::LOCAL_NET_V4,
            "--local-net",
            lab::LOCAL_NET_V6,
            "--poll-interval",
            "200ms",
            "--alert-log",
            &alert_arg,
            "--conn-long-log",
            &long_arg,
        ];
        args.extend_from_slice(rule_flags);
        let agent = launch(&args);
        RulesAgent {
            agent,
            alert_log,
            long_log,
            _scratch: scratch,
        }
    }

    /// Alerts written so far (the alert log is flushed per alert).
    pub fn alerts(&self) -> Vec<Alert> {
        read_json_lines(&self.alert_log)
            .into_iter()
            .map(|v| Alert(ConnRecord(v)))
            .collect()
    }

    /// `--conn-long-log` records written so far (flushed every poll).
    pub fn long_log(&self) -> Vec<ConnRecord> {
        read_json_lines(&self.long_log)
            .into_iter()
            .map(ConnRecord)
            .collect()
    }

    /// Connections finished so far (the conn log is flushed every poll).
    pub fn conns(&self) -> Vec<ConnRecord> {
        read_json_lines(self.agent.conn_log_path())
            .into_iter()
            .map(ConnRecord)
            .collect()
    }

    /// Polls `check` every 100 ms until it returns a value; panics after `limit` with
    /// `what`, the alerts so far and the agent's stderr.
    pub fn wait_for<T>(
        &self,
        what: &str,
        limit: Duration,
        mut check: impl FnMut(&RulesAgent) -> Option<T>,
    ) -> T {
        let start = Instant::now();
        loop {
            if let Some(value) = check(self) {
                return value;
            }
            if start.elapsed() > limit {
                panic!(
                    "not within {limit:?}: {what}\nalerts so far:\n{}\nagent stderr:\n{}",
                    listing(&self.alerts()),
                    self.agent.stderr()
                );
            }
            thread::sleep(WAIT_STEP);
        }
    }

    /// Waits until at least `count` alerts of `note` satisfy `filter`; returns them all.
    pub fn wait_alerts(
        &self,
        note: &str,
        count: usize,
        limit: Duration,
        filter: impl Fn(&Alert) -> bool,
    ) -> Vec<Alert> {
        self.wait_for(
            &format!("{count} {note} alert(s) of the kind expected"),
            limit,
            |agent| {
                let found: Vec<Alert> = agent
                    .alerts()
                    .into_iter()
                    .filter(|a| a.note() == note && filter(a))
                    .collect();
                (found.len() >= count).then_some(found)
            },
        )
    }

    /// Waits until the connection between `client` and `server` is finished (its conn-log
    /// record is written) and returns the record.
    pub fn wait_finished(
        &self,
        proto: &str,
        client: SocketAddr,
        server: SocketAddr,
        limit: Duration,
    ) -> ConnRecord {
        self.wait_for(
            &format!("conn-log record of {proto} {client} <-> {server} (finished)"),
            limit,
            |agent| {
                agent.conns().into_iter().find(|r| {
                    r.is_between(
                        proto,
                        (client.ip(), client.port()),
                        (server.ip(), server.port()),
                    )
                })
            },
        )
    }

    pub fn stderr(&self) -> String {
        self.agent.stderr()
    }

    pub fn pid(&self) -> u32 {
        self.agent.pid()
    }

    /// Sends the agent `sig`.
    pub fn signal(&self, sig: libc::c_int) {
        self.agent.signal(sig);
    }

    /// SIGTERM (the agent judges what is still open, drains its sinks and exits 0), then
    /// everything it wrote.
    pub fn stop(self) -> Stopped {
        let RulesAgent {
            agent,
            alert_log,
            long_log,
            _scratch,
        } = self;
        let conns = agent.stop();
        let alerts = read_json_lines(&alert_log)
            .into_iter()
            .map(|v| Alert(ConnRecord(v)))
            .collect();
        let long_log = read_json_lines(&long_log)
            .into_iter()
            .map(ConnRecord)
            .collect();
        Stopped {
            alerts,
            conns,
            long_log,
        }
    }
}

/// From the lan host, `bytes` to port 5001 of each of `targets` (wan host addresses), one
/// connection each, closed cleanly once the wan host has read it all; the (client, server)
/// of each.
pub fn upload_to_each(lab: &Lab, targets: &[IpAddr], bytes: u64) -> Vec<(SocketAddr, SocketAddr)> {
    targets
        .iter()
        .map(|&target| {
            let server = SocketAddr::new(target, 5001);
            let discard = spawn_discard(listen(&lab.wan, server), 1);
            let mut sender = connect(&lab.lan, server);
            let client = sender.local_addr().expect("client address");
            send(&mut sender, bytes);
            sender.shutdown(Shutdown::Write).expect("close");
            drop(sender);
            assert_eq!(join(discard), vec![bytes], "bytes {target} received");
            (client, server)
        })
        .collect()
}

/// Sleeps until `offset` seconds into the next window of `window_secs` aligned to the
/// epoch, as the agent's `--window` is.
pub fn sleep_into_next_window(window_secs: f64, offset: f64) {
    let now = epoch_now();
    let next = ((now / window_secs).floor() + 1.0) * window_secs + offset;
    thread::sleep(Duration::from_secs_f64(next - now));
}

/// Gives the wan host `addr` as a second address (a /32 on its veth) and gw a permanent
/// neighbour entry for it, so no ARP adds packets.
pub fn add_wan_address(lab: &Lab, addr: Ipv4Addr) {
    let text = ip(&["-n", &lab.wan, "-j", "link", "show", "dev", &lab.wan_if]);
    let json: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("ip -j link output is not JSON ({e}): {text}"));
    let mac = json[0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address for {}/{} in {text}", lab.wan, lab.wan_if))
        .to_string();
    let cidr = format!("{addr}/32");
    ip(&["-n", &lab.wan, "addr", "add", &cidr, "dev", &lab.wan_if]);
    ip(&[
        "-n",
        &lab.gw,
        "neigh",
        "replace",
        &addr.to_string(),
        "lladdr",
        &mac,
        "dev",
        &lab.gw_wan_if,
        "nud",
        "permanent",
    ]);
}

/// `/etc/netns/<ns>/hosts`, which `ip netns exec <ns>` bind-mounts over /etc/hosts: host
/// names for programs started in `ns`. Removed (the whole `/etc/netns/<ns>`) when dropped.
pub struct NetnsHosts {
    dir: PathBuf,
}

impl NetnsHosts {
    pub fn write(ns: &str, entries: &[(IpAddr, &str)]) -> NetnsHosts {
        let dir = Path::new("/etc/netns").join(ns);
        let guard = NetnsHosts { dir };
        std::fs::create_dir_all(&guard.dir)
            .unwrap_or_else(|e| panic!("create {}: {e}", guard.dir.display()));
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for (addr, name) in entries {
            text.push_str(&format!("{addr} {name}\n"));
        }
        let file = guard.dir.join("hosts");
        std::fs::write(&file, text).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
        guard
    }
}

impl Drop for NetnsHosts {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            eprintln!("rules lab: remove {}: {e}", self.dir.display());
        }
    }
}

fn set_timeouts(stream: &TcpStream) {
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
}

/// A TCP listener on `addr` in `ns`.
pub fn listen(ns: &str, addr: SocketAddr) -> TcpListener {
    run_in_ns(ns, move || TcpListener::bind(addr))
        .unwrap_or_else(|e| panic!("bind TCP listener {addr}: {e}"))
}

/// Accepts one connection within [`ACCEPT_LIMIT`]; panics otherwise.
pub fn accept(listener: &TcpListener) -> TcpStream {
    let stream = traffic::accept_within(listener, ACCEPT_LIMIT);
    set_timeouts(&stream);
    stream
}

/// A TCP connection from `ns` to `server`, established.
pub fn connect(ns: &str, server: SocketAddr) -> TcpStream {
    let stream = run_in_ns(ns, move || {
        TcpStream::connect_timeout(&server, CONNECT_TIMEOUT)
    })
    .unwrap_or_else(|e| panic!("connect from {ns} to {server}: {e}"));
    set_timeouts(&stream);
    stream
}

/// Writes `bytes` bytes of a fixed pattern.
pub fn send(stream: &mut TcpStream, bytes: u64) {
    let chunk = pattern(CHUNK);
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(CHUNK as u64) as usize;
        stream
            .write_all(&chunk[..n])
            .unwrap_or_else(|e| panic!("write after {sent} of {bytes} bytes: {e}"));
        sent += n as u64;
    }
}

/// Reads until the peer closes; returns the bytes read.
pub fn read_to_eof(stream: &mut TcpStream) -> u64 {
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read after {total} bytes: {e}"),
        }
    }
}

/// A thread that accepts `connections` connections one after the other on `listener`
/// and reads each to its end; it returns the bytes read from each.
pub fn spawn_discard(listener: TcpListener, connections: usize) -> JoinHandle<Vec<u64>> {
    thread::Builder::new()
        .name("discard server".into())
        .spawn(move || {
            let mut readers = Vec::new();
            for _ in 0..connections {
                let mut stream = accept(&listener);
                readers.push(thread::spawn(move || {
                    let n = read_to_eof(&mut stream);
                    // Our FIN after theirs: the connection closes both ways.
                    let _ = stream.shutdown(Shutdown::Both);
                    n
                }));
            }
            readers
                .into_iter()
                .map(|r| r.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
        .expect("spawn discard server")
}

/// Joins a helper thread, re-raising its panic.
pub fn join<T>(handle: JoinHandle<T>) -> T {
    handle
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// One request as the HTTP server saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpExchange {
    pub method: String,
    pub path: String,
    pub body_received: u64,
    pub body_sent: u64,
}

/// A minimal HTTP/1.1 server for `connections` connections, one request each
/// (`Connection: close`): `POST` reads its `Content-Length` body and answers a short
/// text; `GET /bytes/N` answers N bytes. Anything else gets 404.
pub struct HttpServer {
    pub addr: SocketAddr,
    thread: JoinHandle<Vec<HttpExchange>>,
}

impl HttpServer {
    pub fn start(ns: &str, addr: SocketAddr, connections: usize) -> HttpServer {
        let listener = listen(ns, addr);
        let addr = listener.local_addr().expect("listener address");
        let thread = thread::Builder::new()
            .name(format!("http server {addr}"))
            .spawn(move || {
                (0..connections)
                    .map(|_| serve_http(accept(&listener)))
                    .collect()
            })
            .expect("spawn HTTP server");
        HttpServer { addr, thread }
    }

    /// Waits for the server to have served all its connections.
    pub fn join(self) -> Vec<HttpExchange> {
        join(self.thread)
    }
}

/// Reads a request line and headers; returns (first line, content length).
fn read_head(reader: &mut BufReader<TcpStream>, who: &str) -> (String, u64) {
    let mut first = String::new();
    let mut length = 0u64;
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("{who}: read head: {e}"));
        assert!(n > 0, "{who}: connection closed inside the head");
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        if first.is_empty() {
            first = line.to_string();
        } else if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            length = value
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("{who}: bad Content-Length {value:?}: {e}"));
        }
    }
    assert!(!first.is_empty(), "{who}: empty head");
    (first, length)
}

/// Reads exactly `len` body bytes; returns how many arrived.
fn read_body(reader: &mut BufReader<TcpStream>, len: u64, who: &str) -> u64 {
    let mut body = reader.take(len);
    let n =
        io::copy(&mut body, &mut io::sink()).unwrap_or_else(|e| panic!("{who}: read body: {e}"));
    assert_eq!(n, len, "{who}: body of {n} bytes, Content-Length {len}");
    n
}

fn serve_http(stream: TcpStream) -> HttpExchange {
    let mut writer = stream.try_clone().expect("clone stream");
    let mut reader = BufReader::new(stream);
    let (request, length) = read_head(&mut reader, "HTTP server");
    let mut parts = request.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let body_received = read_body(&mut reader, length, "HTTP server");
    let download = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|&n| n <= HTTP_MAX_BODY);
    let (status, body_len, text) = match (method.as_str(), download) {
        ("POST", _) => ("200 OK", None, format!("stored {body_received} bytes\n")),
        ("GET", Some(n)) => ("200 OK", Some(n), String::new()),
        _ => ("404 Not Found", None, "not found\n".to_string()),
    };
    let content_length = body_len.unwrap_or(text.len() as u64);
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {content_length}\r\nConnection: close\r\n\r\n"
    );
    writer
        .write_all(head.as_bytes())
        .unwrap_or_else(|e| panic!("HTTP server: write head: {e}"));
    match body_len {
        Some(n) => send(&mut writer, n),
        None => writer
            .write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("HTTP server: write body: {e}")),
    }
    // Close after the response, then take the client's FIN.
    writer
        .shutdown(Shutdown::Write)
        .unwrap_or_else(|e| panic!("HTTP server: shutdown: {e}"));
    let mut rest = reader.into_inner();
    read_to_eof(&mut rest);
    HttpExchange {
        method,
        path,
        body_received,
        body_sent: content_length,
    }
}

/// What the HTTP client got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    /// The client's address, with its ephemeral port.
    pub client: SocketAddr,
    pub status: u16,
    pub body_len: u64,
}

/// One request on its own connection from `ns`: `method path` with a body of `body_len`
/// bytes when it is not zero; reads the whole response, then closes.
pub fn http_request(
    ns: &str,
    server: SocketAddr,
    method: &str,
    path: &str,
    body_len: u64,
) -> HttpResponse {
    let mut stream = connect(ns, server);
    let client = stream.local_addr().expect("client address");
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n");
    if body_len > 0 {
        head.push_str(&format!(
            "Content-Type: application/octet-stream\r\nContent-Length: {body_len}\r\n"
        ));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .unwrap_or_else(|e| panic!("HTTP client: write head: {e}"));
    send(&mut stream, body_len);
    let mut reader = BufReader::new(stream);
    let (status_line, length) = read_head(&mut reader, "HTTP client");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("HTTP client: bad status line {status_line:?}"));
    let body_len = read_body(&mut reader, length, "HTTP client");
    // The server closes first (Connection: close); then so do we.
    let mut stream = reader.into_inner();
    let extra = read_to_eof(&mut stream);
    assert_eq!(
        extra, 0,
        "HTTP client: {extra} bytes after the response body"
    );
    drop(stream);
    HttpResponse {
        client,
        status,
        body_len,
    }
}
