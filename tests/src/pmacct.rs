//! pmacct's `nfacctd` (Debian package `pmacct`) as a real IPFIX collector for tests. It
//! listens on UDP only (Debian's 1.7.7 has no IPFIX-over-TCP listener) and writes what it
//! aggregated to a CSV file (print plugin), or does what a configuration file says (the
//! fleet's: PostgreSQL through the pgsql plugin). SIGINT makes it flush its caches and
//! exit; it ignores SIGTERM.

use std::{
    fs,
    net::{IpAddr, UdpSocket},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::lab;

/// What nfacctd does with the flows.
pub enum Output {
    /// Writes them to a CSV file in its own directory (the print plugin).
    Csv,
    /// Runs the configuration file `config` (e.g. the one in `deploy/fleet/`) with the
    /// values of the keys in `set` replaced; each key must be in the file.
    Config {
        config: PathBuf,
        set: Vec<(&'static str, String)>,
    },
}

/// `nfacctd` listening on `IP:port` inside a namespace, with its configuration and output
/// in its own temporary directory; killed (by PID) and the directory removed on drop.
pub struct Nfacctd {
    child: Option<Child>,
    dir: PathBuf,
    csv: PathBuf,
}

impl Nfacctd {
    pub fn start(ns: &str, ip: IpAddr, port: u16, output: Output) -> Nfacctd {
        lab::require_tool("nfacctd", "pmacct");
        let dir = std::env::temp_dir().join(format!("nfacctd-{}-{ns}-{port}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {dir:?}: {e}"));
        let csv = dir.join("flows.csv");
        let listen = [
            ("daemonize", "false".to_string()),
            ("nfacctd_ip", ip.to_string()),
            ("nfacctd_port", port.to_string()),
        ];
        let text = match output {
            Output::Csv => format!(
                "daemonize: false\n\
                 nfacctd_ip: {ip}\n\
                 nfacctd_port: {port}\n\
                 nfacctd_time_new: true\n\
                 plugins: print[flows]\n\
                 aggregate[flows]: src_host, dst_host, src_port, dst_port, proto\n\
                 print_output[flows]: csv\n\
                 print_num_protos[flows]: true\n\
                 print_output_file[flows]: {}\n\
                 print_output_file_append[flows]: true\n\
                 print_refresh_time[flows]: 3600\n",
                csv.display()
            ),
            Output::Config { config, set } => {
                let text = fs::read_to_string(&config)
                    .unwrap_or_else(|e| panic!("reading {config:?}: {e}"));
                set_keys(&text, listen.iter().cloned().chain(set))
            }
        };
        let config = dir.join("nfacctd.conf");
        fs::write(&config, text).unwrap_or_else(|e| panic!("writing {config:?}: {e}"));
        let log = fs::File::create(dir.join("nfacctd.log")).expect("nfacctd log");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "nfacctd", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting nfacctd: {e}"));
        let mut collector = Nfacctd {
            child: Some(child),
            dir,
            csv,
        };
        let ns = ns.to_owned();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !lab::run_in_ns(&ns, move || UdpSocket::bind((ip, port)).is_err()) {
            if let Some(Ok(Some(status))) = collector.child.as_mut().map(Child::try_wait) {
                panic!("nfacctd exited ({status}): {}", collector.log());
            }
            assert!(
                Instant::now() < deadline,
                "nfacctd did not bind {ip}:{port} within 10 s: {}",
                collector.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
        collector
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("nfacctd.log")).unwrap_or_default()
    }

    /// SIGINT: nfacctd writes its caches out and exits.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("nfacctd running");
        // SAFETY: signalling our own child by its PID (`ip netns exec` execs nfacctd).
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match child.try_wait().expect("waiting for nfacctd") {
                Some(_) => return,
                None if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                None => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("nfacctd did not exit within 15 s of SIGINT: {}", self.log());
                }
            }
        }
    }

    /// Stops nfacctd and returns the flows its print plugin wrote.
    pub fn stop_and_read(&mut self) -> Vec<Flow> {
        self.stop();
        let text = fs::read_to_string(&self.csv).unwrap_or_else(|e| {
            panic!(
                "nfacctd wrote no {:?} ({e}); its log:\n{}",
                self.csv,
                self.log()
            )
        });
        parse_csv(&text)
    }
}

impl Drop for Nfacctd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `text` (pmacct's `key: value` lines) with the values of `set` replaced.
fn set_keys(text: &str, set: impl IntoIterator<Item = (&'static str, String)>) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for (key, value) in set {
        let line = lines
            .iter_mut()
            .find(|l| l.split_once(':').is_some_and(|(k, _)| k.trim() == key))
            .unwrap_or_else(|| panic!("no {key} in the configuration:\n{text}"));
        *line = format!("{key}: {value}");
    }
    lines.join("\n") + "\n"
}

/// One aggregate as nfacctd wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub packets: u64,
    pub bytes: u64,
}

/// The print plugin's CSV: a header line naming the columns, repeated by every flush.
fn parse_csv(text: &str) -> Vec<Flow> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_else(|| panic!("empty CSV from nfacctd"))
        .split(',')
        .collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("no {name} column in {header:?}"))
    };
    let cols = [
        col("SRC_IP"),
        col("DST_IP"),
        col("SRC_PORT"),
        col("DST_PORT"),
        col("PROTOCOL"),
        col("PACKETS"),
        col("BYTES"),
    ];
    lines
        .filter(|l| !l.starts_with("SRC_IP") && !l.contains("SRC_IP,"))
        .map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            let get = |i: usize| f[cols[i]].trim();
            let num = |i: usize| {
                get(i)
                    .parse::<u64>()
                    .unwrap_or_else(|e| panic!("column {i} of {line:?}: {e}"))
            };
            let addr = |i: usize| {
                get(i)
                    .parse::<IpAddr>()
                    .unwrap_or_else(|e| panic!("column {i} of {line:?}: {e}"))
            };
            Flow {
                src: addr(0),
                dst: addr(1),
                src_port: num(2) as u16,
                dst_port: num(3) as u16,
                proto: num(4) as u8,
                packets: num(5),
                bytes: num(6),
            }
        })
        .collect()
}
