//! The flow monitors the agent is benchmarked against, each watching one interface of a
//! lab namespace through libpcap: pmacctd (pmacct) aggregating flows in its in-memory
//! table, and softflowd keeping a flow table for NetFlow export. Each runs in the
//! foreground as a child of the benchmark (`ip netns exec` execs it, so the child's PID is
//! the daemon's), is stopped by PID, and reports how many packets it counted, so that a
//! benchmark can tell that it really watched the traffic.

use std::{
    fs::File,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{lab::run_bounded, procfs, rules_lab::Scratch};

const READY_LIMIT: Duration = Duration::from_secs(15);
const STOP_LIMIT: Duration = Duration::from_secs(10);
const QUERY_LIMIT: Duration = Duration::from_secs(10);
/// Where softflowd sends NetFlow: the gateway namespace's own loopback, where nothing
/// listens.
const NETFLOW_TARGET: &str = "127.0.0.1:9995";

/// A daemon in the foreground inside a namespace; SIGKILLed (by PID) when dropped unless
/// stopped.
struct Daemon {
    child: Child,
    what: &'static str,
    log: PathBuf,
    // Holds the daemon's socket and log files; removed after the daemon is killed.
    _scratch: Scratch,
}

impl Daemon {
    fn spawn(what: &'static str, scratch: Scratch, ns: &str, args: &[&str]) -> Daemon {
        let log = scratch.path("stderr.log");
        let log_file =
            File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone a log file handle"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what} {args:?} in {ns}: {e}"));
        Daemon {
            child,
            what,
            log,
            _scratch: scratch,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `cmd` until it succeeds (the daemon answers on its socket); panics if the
    /// daemon exits first or does not answer within [`READY_LIMIT`].
    fn wait_answering(&mut self, cmd: &[&str]) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for a peer") {
                panic!(
                    "{} exited ({status}) at start:\n{}",
                    self.what,
                    self.output()
                );
            }
            let out = run_bounded(Command::new(cmd[0]).args(&cmd[1..]), QUERY_LIMIT);
            if out.status.success() {
                return;
            }
            assert!(
                start.elapsed() < READY_LIMIT,
                "{} did not answer {cmd:?} within {READY_LIMIT:?}: {}\n{}",
                self.what,
                String::from_utf8_lossy(&out.stderr),
                self.output()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a query against the running daemon; panics unless it succeeds.
    fn query(&self, cmd: &[&str]) -> String {
        let out = run_bounded(Command::new(cmd[0]).args(&cmd[1..]), QUERY_LIMIT);
        assert!(
            out.status.success(),
            "{cmd:?} failed ({}): {}\n{} output:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.what,
            self.output()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// SIGTERM, then waits for the exit; SIGKILL if it does not come.
    fn stop(mut self) {
        signal(self.pid(), libc::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < STOP_LIMIT {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{} did not exit within {STOP_LIMIT:?} of SIGTERM (killed on drop)\n{}",
            self.what,
            self.output()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal(self.pid(), libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: plain syscall; `pid` is our own child, not yet reaped, so not reused.
    unsafe { libc::kill(pid, sig) };
}

/// pmacctd with the memory plugin: per (src host, dst host, src port, dst port, proto)
/// counters in a table that `pmacct -s` reads through a socket file. The queue between
/// the core process and the plugin is sized as pmacct's QUICKSTART advises for heavy
/// traffic: with the defaults (one record per transfer, 4 MB) the core loses records at
/// a few tens of thousands of packets per second. Its table may take 65,536 memory pools
/// instead of 16: with 16 it stopped taking new flows at about 8,000 ("Unable to allocate
/// more memory pools"), and so it did with 0, which pmacct's CONFIG-KEYS gives as
/// unbounded.
pub struct Pmacctd {
    daemon: Daemon,
    pipe: String,
}

impl Pmacctd {
    pub fn start(ns: &str, iface: &str) -> Pmacctd {
        let scratch = Scratch::new("pmacctd");
        let pipe = scratch
            .path("collect.pipe")
            .to_str()
            .expect("UTF-8 temp path")
            .to_owned();
        let config = scratch.path("pmacctd.conf");
        std::fs::write(
            &config,
            format!(
                "pcap_interface: {iface}\n\
                 aggregate: src_host,dst_host,src_port,dst_port,proto\n\
                 plugins: memory\n\
                 imt_path: {pipe}\n\
                 plugin_buffer_size: 10240\n\
                 plugin_pipe_size: 10240000\n\
                 imt_mem_pools_number: 65536\n"
            ),
        )
        .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        let config = config.to_str().expect("UTF-8 temp path").to_owned();
        let mut daemon = Daemon::spawn("pmacctd", scratch, ns, &["pmacctd", "-f", &config]);
        daemon.wait_answering(&["pmacct", "-s", "-p", &pipe]);
        Pmacctd { daemon, pipe }
    }

    /// The core process and its plugin processes.
    pub fn pids(&self) -> Vec<u32> {
        let core = self.daemon.pid();
        let mut pids = vec![core];
        pids.extend(procfs::children(core));
        pids
    }

    /// Packets of IP protocol `proto` (a name: `udp`, `tcp`) counted in its table so far.
    pub fn packets(&self, proto: &str) -> u64 {
        self.entries(proto)
            .iter()
            .map(|entry| {
                entry["packets"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("pmacct -s entry without packets: {entry}"))
            })
            .sum()
    }

    /// Flows (table entries: one per 5-tuple) of IP protocol `proto` in its table so far.
    pub fn flows(&self, proto: &str) -> u64 {
        self.entries(proto).len() as u64
    }

    /// Its table's entries of IP protocol `proto` (`pmacct -s`).
    fn entries(&self, proto: &str) -> Vec<Value> {
        let text = self
            .daemon
            .query(&["pmacct", "-s", "-O", "json", "-p", &self.pipe]);
        text.lines()
            .filter(|line| line.trim_start().starts_with('{'))
            .map(|line| {
                serde_json::from_str::<Value>(line)
                    .unwrap_or_else(|e| panic!("pmacct -s line is not JSON ({e}): {line}"))
            })
            .filter(|entry| entry["ip_proto"] == proto)
            .collect()
    }

    pub fn stop(self) {
        self.daemon.stop();
    }
}

/// `softflowd -d`: a flow table exported as NetFlow v5, read through `softflowctl`.
pub struct Softflowd {
    daemon: Daemon,
    ctl: String,
}

impl Softflowd {
    pub fn start(ns: &str, iface: &str) -> Softflowd {
        let scratch = Scratch::new("softflowd");
        let path = |name: &str| {
            scratch
                .path(name)
                .to_str()
                .expect("UTF-8 temp path")
                .to_owned()
        };
        let (ctl, pidfile) = (path("ctl"), path("pid"));
        let mut daemon = Daemon::spawn(
            "softflowd",
            scratch,
            ns,
            &[
                "softflowd",
                "-d",
                "-i",
                iface,
                "-n",
                NETFLOW_TARGET,
                "-c",
                &ctl,
                "-p",
                &pidfile,
            ],
        );
        daemon.wait_answering(&["softflowctl", "-c", &ctl, "statistics"]);
        Softflowd { daemon, ctl }
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// Packets of IP protocol number `proto` in its active flows, both ways
    /// (`softflowctl dump-flows`).
    pub fn packets(&self, proto: u8) -> u64 {
        let text = self
            .daemon
            .query(&["softflowctl", "-c", &self.ctl, "dump-flows"]);
        let proto_field = format!("proto:{proto}");
        text.lines()
            .filter(|line| line.split_whitespace().any(|f| f == proto_field))
            .flat_map(|line| {
                line.split_whitespace()
                    .filter_map(|f| {
                        f.strip_prefix("packets>:")
                            .or_else(|| f.strip_prefix("packets<:"))
                    })
                    .map(|n| {
                        n.parse::<u64>()
                            .unwrap_or_else(|e| panic!("bad packet count ({e}) in: {line}"))
                    })
                    .collect::<Vec<_>>()
            })
            .sum()
    }

    /// Flows it has tracked since it started: those still active and those it expired
    /// (`softflowctl statistics`); with its default limit of 8,192 flows it expires the
    /// oldest early to make room.
    pub fn flows(&self) -> u64 {
        let text = self
            .daemon
            .query(&["softflowctl", "-c", &self.ctl, "statistics"]);
        let number_after = |label: &str| -> u64 {
            text.lines()
                .find_map(|line| line.trim().strip_prefix(label))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no '{label}' count in softflowctl statistics:\n{text}"))
        };
        number_after("Number of active flows:") + number_after("Flows expired:")
    }

    pub fn stop(self) {
        self.daemon.stop();
    }
}
