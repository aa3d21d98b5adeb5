//! nfdump's `nfcapd` (Debian package `nfdump`) as a real IPFIX collector for tests, and
//! `nfdump` to read back what it stored.

use std::{
    fs,
    net::{IpAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use monitor_common::parse::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

use crate::lab;

/// `nfcapd` listening on 127.0.0.1, writing into its own temporary directory; killed and
/// the directory removed on drop.
pub struct Nfcapd {
    child: Option<Child>,
    dir: PathBuf,
    pub port: u16,
    /// The namespace it listens in; None: the test's own.
    ns: Option<String>,
}

impl Nfcapd {
    /// Listening on 127.0.0.1 of the test's own namespace, on a free port.
    pub fn start() -> Nfcapd {
        let port = UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("a free UDP port")
            .port();
        Self::start_in(None, port)
    }

    /// Listening on 127.0.0.1:`port` inside namespace `ns` (or the test's own).
    pub fn start_in(ns: Option<&str>, port: u16) -> Nfcapd {
        lab::require_tool("nfcapd", "nfdump");
        let dir = std::env::temp_dir().join(format!(
            "ipfix-nfcapd-{}-{}",
            std::process::id(),
            ns.unwrap_or("self")
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {dir:?}: {e}"));
        let mut command = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "nfcapd"]);
                c
            }
            None => Command::new("nfcapd"),
        };
        let child = command
            .args([
                "-b",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-t",
                "3600",
                "-w",
            ])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting nfcapd (install Debian's nfdump package): {e}"));
        let collector = Nfcapd {
            child: Some(child),
            dir,
            port,
            ns: ns.map(str::to_owned),
        };
        // Ready once the port is taken.
        let deadline = Instant::now() + Duration::from_secs(10);
        let taken = |ns: Option<String>| match ns {
            Some(ns) => lab::run_in_ns(&ns, move || UdpSocket::bind(("127.0.0.1", port)).is_err()),
            None => UdpSocket::bind(("127.0.0.1", port)).is_err(),
        };
        while !taken(collector.ns.clone()) {
            assert!(
                Instant::now() < deadline,
                "nfcapd did not bind 127.0.0.1:{port} within 10 s"
            );
            thread::sleep(Duration::from_millis(20));
        }
        collector
    }

    /// SIGTERM makes nfcapd close its file at once; returns the flow files it wrote.
    pub fn stop(&mut self) -> Vec<PathBuf> {
        let mut child = self.child.take().expect("nfcapd running");
        // SAFETY: signalling our own child by its PID.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match child.try_wait().expect("waiting for nfcapd") {
                Some(_) => break,
                None if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                None => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("nfcapd did not exit within 10 s of SIGTERM");
                }
            }
        }
        let mut files: Vec<PathBuf> = walk(&self.dir)
            .into_iter()
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy();
                name.starts_with("nfcapd.") && !name.starts_with("nfcapd.current")
            })
            .collect();
        files.sort();
        files
    }
}

impl Drop for Nfcapd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// One flow as nfdump prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub packets: u64,
    pub bytes: u64,
    /// RFC 5103 reverse counters of a biflow record (nfdump's "out"); 0 otherwise.
    pub out_packets: u64,
    pub out_bytes: u64,
}

/// `nfdump -r FILE -q -N -o fmt:FORMAT` of every file: its lines, fields separated by `|`.
fn nfdump_lines(files: &[PathBuf], format: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for file in files {
        let out = Command::new("nfdump")
            .arg("-r")
            .arg(file)
            .args(["-q", "-N", "-o", &format!("fmt:{format}")])
            .output()
            .unwrap_or_else(|e| panic!("running nfdump: {e}"));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "nfdump -r {file:?} failed: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        lines.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_owned),
        );
    }
    lines
}

/// A flow's addresses and ports, and the same after translation (nfdump's NSEL "xlate"
/// fields, filled from IPFIX postNAT/postNAPT elements).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatFlow {
    pub src: (IpAddr, u16),
    pub dst: (IpAddr, u16),
    pub xlate_src: (IpAddr, u16),
    pub xlate_dst: (IpAddr, u16),
    pub packets: u64,
}

pub fn read_nat_flows(files: &[PathBuf]) -> Vec<NatFlow> {
    nfdump_lines(files, "%sa|%sp|%da|%dp|%xsa|%xsp|%xda|%xdp|%pkt")
        .iter()
        .map(|line| {
            let f: Vec<&str> = line.split('|').map(str::trim).collect();
            assert_eq!(f.len(), 9, "nfdump line {line:?}");
            let end = |i: usize| {
                let addr = f[i]
                    .parse::<IpAddr>()
                    .unwrap_or_else(|e| panic!("field {i} of {line:?}: {e}"));
                let port = f[i + 1]
                    .parse::<u16>()
                    .unwrap_or_else(|e| panic!("field {} of {line:?}: {e}", i + 1));
                (addr, port)
            };
            NatFlow {
                src: end(0),
                dst: end(2),
                xlate_src: end(4),
                xlate_dst: end(6),
                packets: f[8]
                    .parse()
                    .unwrap_or_else(|e| panic!("packets of {line:?}: {e}")),
            }
        })
        .collect()
}

/// `nfdump -r FILE -q -N -o fmt:...`: one line per record, fields separated by `|`.
pub fn read_flows(files: &[PathBuf]) -> Vec<Flow> {
    let mut flows = Vec::new();
    for line in nfdump_lines(files, "%pr|%sa|%da|%sp|%dp|%pkt|%byt|%opkt|%obyt") {
        let f: Vec<&str> = line.split('|').map(str::trim).collect();
        assert_eq!(f.len(), 9, "nfdump line {line:?}");
        let num = |i: usize| {
            f[i].parse::<u64>()
                .unwrap_or_else(|e| panic!("field {i} of {line:?}: {e}"))
        };
        let addr = |i: usize| {
            f[i].parse::<IpAddr>()
                .unwrap_or_else(|e| panic!("field {i} of {line:?}: {e}"))
        };
        let proto = match f[0] {
            "TCP" => IPPROTO_TCP,
            "UDP" => IPPROTO_UDP,
            "ICMP" => IPPROTO_ICMP,
            other => other
                .parse()
                .unwrap_or_else(|e| panic!("protocol {other:?} in {line:?}: {e}")),
        };
        flows.push(Flow {
            src: addr(1),
            dst: addr(2),
            src_port: num(3) as u16,
            // ICMP: nfdump shows "type.code".
            dst_port: match f[4].split_once('.') {
                Some((t, c)) => {
                    let part = |p: &str| {
                        p.parse::<u16>()
                            .unwrap_or_else(|e| panic!("ICMP type.code in {line:?}: {e}"))
                    };
                    part(t) << 8 | part(c)
                }
                None => num(4) as u16,
            },
            proto,
            packets: num(5),
            bytes: num(6),
            out_packets: num(7),
            out_bytes: num(8),
        });
    }
    flows
}
