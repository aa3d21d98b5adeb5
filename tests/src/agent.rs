//! The agent (`monitor run`) as a child process inside a lab namespace, and the records
//! of its conn log.

use std::{
    fmt,
    io::{BufRead, BufReader, Read},
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde_json::Value;

/// The line the agent prints on stderr once its programs are attached.
pub const READY_MARKER: &str = "monitor: watching";
const READY_LIMIT: Duration = Duration::from_secs(30);
const STOP_LIMIT: Duration = Duration::from_secs(20);

static NEXT_AGENT: AtomicU32 = AtomicU32::new(0);

/// A running agent; killed (SIGKILL, by PID) when dropped unless [`stop`](Self::stop)ped.
pub struct Agent {
    child: Child,
    pid: u32,
    ns: String,
    iface: String,
    stderr: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    dir: PathBuf,
    conn_log: PathBuf,
}

impl Agent {
    /// `MONITOR_BIN`, else `<workspace>/target/debug/monitor`; panics if it does not exist.
    pub fn binary() -> PathBuf {
        let path = match std::env::var_os("MONITOR_BIN") {
            Some(path) => PathBuf::from(path),
            None => Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("workspace root")
                .join("target/debug/monitor"),
        };
        assert!(
            path.is_file(),
            "agent binary {} does not exist: build it (cargo build -p monitor) or set MONITOR_BIN",
            path.display()
        );
        path
    }

    /// Starts `monitor run --iface IFACE --conn-log PATH EXTRA...` in namespace `ns` and
    /// returns once it reports being attached.
    pub fn start(ns: &str, iface: &str, extra: &[&str]) -> Agent {
        Self::start_build(&Self::binary(), ns, iface, extra)
    }

    /// Like [`start`](Self::start) with another build of the agent, as the benchmark's
    /// A/B runs of a change do.
    pub fn start_build(binary: &Path, ns: &str, iface: &str, extra: &[&str]) -> Agent {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]);
        Self::launch_build(cmd, binary, ns, Some(iface), extra)
    }

    /// Like [`start`](Self::start) with no `--iface`: the agent watches what it chooses by
    /// default (the interface of the default route), as a user's first run does.
    pub fn start_default(ns: &str, extra: &[&str]) -> Agent {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]);
        Self::launch(cmd, ns, None, extra)
    }

    /// Like [`start`](Self::start), but entering only the namespace's network: `ip netns
    /// exec` mounts a /sys of its own, which hides the pins under /sys/fs/bpf and the
    /// cgroup tree.
    pub fn start_seeing_host(ns: &str, iface: &str, extra: &[&str]) -> Agent {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}"));
        Self::launch(cmd, ns, Some(iface), extra)
    }

    fn launch(cmd: Command, ns: &str, iface: Option<&str>, extra: &[&str]) -> Agent {
        Self::launch_build(cmd, &Self::binary(), ns, iface, extra)
    }

    fn launch_build(
        mut cmd: Command,
        binary: &Path,
        ns: &str,
        iface: Option<&str>,
        extra: &[&str],
    ) -> Agent {
        let n = NEXT_AGENT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("monitor-agent-{}-{n}", std::process::id()));
        // A leftover from an earlier run with the same PID would hold stale records.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("create agent dir {}: {e}", dir.display()));
        let conn_log = dir.join("conn.log");

        cmd.arg(binary).arg("run");
        if let Some(iface) = iface {
            cmd.args(["--iface", iface]);
        }
        cmd.arg("--conn-log")
            .arg(&conn_log)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn agent {cmd:?}: {e}"));
        // `ip netns exec` and `nsenter` exec the command, so this PID is the agent's.
        let pid = child.id();

        let stderr = Arc::new(Mutex::new(String::new()));
        let stdout = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let readers = vec![
            keep_lines(
                child.stderr.take().expect("stderr pipe"),
                stderr.clone(),
                Some(ready_tx),
            ),
            keep_lines(
                child.stdout.take().expect("stdout pipe"),
                stdout.clone(),
                None,
            ),
        ];
        let mut agent = Agent {
            child,
            pid,
            ns: ns.to_string(),
            iface: iface.unwrap_or("(default)").to_string(),
            stderr,
            stdout,
            readers,
            dir,
            conn_log,
        };

        let start = Instant::now();
        loop {
            match ready_rx.recv_timeout(Duration::from_millis(50)) {
                Ok(()) => return agent,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {}
            }
            if let Some(status) = agent.child.try_wait().expect("wait for agent") {
                agent.join_readers();
                panic!(
                    "agent exited ({status}) before printing '{READY_MARKER}': {cmd:?}\n{}",
                    agent.output()
                );
            }
            if start.elapsed() > READY_LIMIT {
                panic!(
                    "agent not ready within {READY_LIMIT:?} (no '{READY_MARKER}'): {cmd:?}\n{}",
                    agent.output()
                );
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends the running agent `sig` (SIGHUP, SIGSTOP, SIGCONT, ...).
    pub fn signal(&self, sig: libc::c_int) {
        assert_eq!(signal(self.pid, sig), 0, "signal {sig} to the agent");
    }

    pub fn conn_log_path(&self) -> &Path {
        &self.conn_log
    }

    /// Everything the agent printed so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn output(&self) -> String {
        let stdout = self
            .stdout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        format!(
            "agent on {}/{} stderr:\n{}\nagent stdout:\n{stdout}",
            self.ns,
            self.iface,
            self.stderr()
        )
    }

    /// SIGKILL: the agent gets no chance to write or detach anything. Returns what it
    /// printed.
    pub fn kill(mut self) -> String {
        signal(self.pid, libc::SIGKILL);
        let _ = self.child.wait();
        self.join_readers();
        self.output()
    }

    /// SIGTERM, waits for a clean exit (status 0), and returns the conn-log records.
    pub fn stop(mut self) -> Vec<ConnRecord> {
        self.terminate();
        let text = std::fs::read_to_string(&self.conn_log).unwrap_or_else(|e| {
            panic!(
                "agent left no conn log at {}: {e}\n{}",
                self.conn_log.display(),
                self.output()
            )
        });
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                let value: Value = serde_json::from_str(line).unwrap_or_else(|e| {
                    panic!("conn log line is not JSON ({e}): {line}\n{}", self.output())
                });
                assert!(value.is_object(), "conn log line is not an object: {line}");
                ConnRecord(value)
            })
            .collect()
    }

    /// Like [`stop`](Self::stop), for a conn log too large to hold: hands each line to
    /// `each` as it is read.
    pub fn stop_reading(mut self, mut each: impl FnMut(&str)) {
        self.terminate();
        let file = std::fs::File::open(&self.conn_log).unwrap_or_else(|e| {
            panic!(
                "agent left no conn log at {}: {e}\n{}",
                self.conn_log.display(),
                self.output()
            )
        });
        for line in std::io::BufReader::new(file).lines() {
            each(&line.unwrap_or_else(|e| panic!("reading the conn log: {e}")));
        }
    }

    /// SIGTERM, and a wait for a clean exit (status 0).
    fn terminate(&mut self) {
        if let Some(status) = self.child.try_wait().expect("wait for agent") {
            self.join_readers();
            panic!(
                "agent exited ({status}) before it was stopped\n{}",
                self.output()
            );
        }
        signal(self.pid, libc::SIGTERM);
        let status = self.wait_within(STOP_LIMIT).unwrap_or_else(|| {
            signal(self.pid, libc::SIGKILL);
            let _ = self.child.wait();
            self.join_readers();
            panic!(
                "agent did not exit within {STOP_LIMIT:?} of SIGTERM (killed)\n{}",
                self.output()
            )
        });
        self.join_readers();
        assert!(
            status.success(),
            "agent exited with {status} after SIGTERM, expected 0\n{}",
            self.output()
        );
    }

    fn wait_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().expect("wait for agent") {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The readers end when the agent's pipes close, which happens when it exits.
    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal(self.pid, libc::SIGKILL);
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `kill(2)`'s result.
fn signal(pid: u32, sig: libc::c_int) -> libc::c_int {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: plain syscall; `pid` is our own child, not yet reaped, so not reused.
    unsafe { libc::kill(pid, sig) }
}

fn keep_lines(
    pipe: impl Read + Send + 'static,
    into: Arc<Mutex<String>>,
    ready: Option<mpsc::Sender<()>>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut raw = Vec::new();
        // Bytes, not `lines()`: invalid UTF-8 must not stop the reading and block the agent.
        while matches!(reader.read_until(b'\n', &mut raw), Ok(n) if n > 0) {
            let line = String::from_utf8_lossy(&raw);
            into.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_str(&format!("{}\n", line.trim_end_matches('\n')));
            // After the line is kept: whoever waits for it may read it at once.
            if let Some(ready) = &ready
                && line.contains(READY_MARKER)
            {
                let _ = ready.send(());
            }
            raw.clear();
        }
    })
}

/// One conn-log record (a JSON object with Zeek conn.log field names). The accessors panic
/// with the whole record when a field is missing or of the wrong type.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnRecord(pub Value);

impl ConnRecord {
    pub fn get(&self, key: &str) -> &Value {
        self.0
            .get(key)
            .unwrap_or_else(|| panic!("record has no '{key}': {self}"))
    }

    pub fn has(&self, key: &str) -> bool {
        self.0.get(key).is_some_and(|v| !v.is_null())
    }

    pub fn str(&self, key: &str) -> &str {
        self.get(key)
            .as_str()
            .unwrap_or_else(|| panic!("record's '{key}' is not a string: {self}"))
    }

    pub fn u64(&self, key: &str) -> u64 {
        self.get(key)
            .as_u64()
            .unwrap_or_else(|| panic!("record's '{key}' is not an unsigned integer: {self}"))
    }

    pub fn f64(&self, key: &str) -> f64 {
        self.get(key)
            .as_f64()
            .unwrap_or_else(|| panic!("record's '{key}' is not a number: {self}"))
    }

    pub fn bool(&self, key: &str) -> bool {
        self.get(key)
            .as_bool()
            .unwrap_or_else(|| panic!("record's '{key}' is not a bool: {self}"))
    }

    pub fn ip(&self, key: &str) -> IpAddr {
        self.str(key)
            .parse()
            .unwrap_or_else(|e| panic!("record's '{key}' is not an IP address ({e}): {self}"))
    }

    fn port(&self, key: &str) -> u16 {
        u16::try_from(self.u64(key))
            .unwrap_or_else(|_| panic!("record's '{key}' is not a port: {self}"))
    }

    pub fn proto(&self) -> &str {
        self.str("proto")
    }

    /// (`id.orig_h`, `id.orig_p`)
    pub fn orig(&self) -> (IpAddr, u16) {
        (self.ip("id.orig_h"), self.port("id.orig_p"))
    }

    /// (`id.resp_h`, `id.resp_p`)
    pub fn resp(&self) -> (IpAddr, u16) {
        (self.ip("id.resp_h"), self.port("id.resp_p"))
    }

    /// Whether this record is the connection between endpoints `a` and `b`, either way.
    pub fn is_between(&self, proto: &str, a: (IpAddr, u16), b: (IpAddr, u16)) -> bool {
        let orig = self.endpoint("id.orig_h", "id.orig_p");
        let resp = self.endpoint("id.resp_h", "id.resp_p");
        let (Some(orig), Some(resp)) = (orig, resp) else {
            return false;
        };
        self.0.get("proto").and_then(Value::as_str) == Some(proto)
            && ((orig, resp) == (a, b) || (orig, resp) == (b, a))
    }

    fn endpoint(&self, host: &str, port: &str) -> Option<(IpAddr, u16)> {
        let h = self.0.get(host)?.as_str()?.parse().ok()?;
        let p = u16::try_from(self.0.get(port)?.as_u64()?).ok()?;
        Some((h, p))
    }
}

impl fmt::Display for ConnRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
