//! Project tasks: `cargo xtask setup|build|run|test|package`. `./x` runs them after installing the
//! pinned Rust toolchain.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

mod package;

/// bpf-linker must be built against the LLVM that the pinned rustc ships (22), from
/// Debian's `llvm-22-dev` with `--no-default-features --features llvm-22` and
/// `LLVM_PREFIX=/usr/lib/llvm-22` (about a minute). Plain `cargo install bpf-linker` wants
/// LLVM 23 and fails.
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_MAJOR: &str = "22";

/// Debian packages the build and the tests need.
const APT_PACKAGES: &[&str] = &[
    // bpf-linker links against these.
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    // The agent's test labs: namespaces, offload settings, ping, replayed captures.
    "iproute2",
    "ethtool",
    "iputils-ping",
    "tcpreplay",
    // NAT gateways in the labs: nftables masquerade and port forwards, iptables (-nft)
    // SNAT, and conntrack to flush the translation table under a running connection.
    "nftables",
    "iptables",
    "conntrack",
    // A real syslog daemon for the syslog sink's tests (started by the tests, not as a
    // service).
    "rsyslog",
    // A real Prometheus scrapes the agent in a lab test; promtool checks the alert rules.
    "prometheus",
    "prometheus-alertmanager",
    // systemd-analyze verifies the unit in deploy/.
    "systemd",
    // The Debian package's test rotates a log with its logrotate snippet.
    "logrotate",
    // nfcapd and nfdump: a real IPFIX collector for the export tests.
    "nfdump",
    // pmacct's nfacctd, a second real IPFIX collector, and PostgreSQL for the fleet test
    // (nfacctd's pgsql plugin writes into a database the test starts).
    "pmacct",
    "postgresql",
    // Benchmarks: iperf3, and the peers the end-to-end benchmark sets the agent against,
    // pmacctd (libpcap, from the pmacct package above) and softflowd.
    "iperf3",
    "softflowd",
    // DNS labs: a resolver with static answers (dnsmasq-base is the binary without the
    // system service, which would take port 53 on the host), and real DNS tunnels.
    "dnsmasq-base",
    "iodine",
    "dns2tcp",
    // A gateway whose default route is a tun device, as with OpenVPN: socat's TUN address
    // tunnels it over UDP to the Internet host.
    "socat",
    // The QUIC labs' peers run aioquic from a venv of Debian's Python (see LAB_VENV).
    "python3-venv",
    // A real client: TLS server names (lab_sni) and the uploads whose process the agent
    // names (lab_owners).
    "curl",
];

/// The venv holding the QUIC labs' aioquic (tests/scripts/quic_peer.py); the tests know
/// this path too (tests/src/quic.rs).
const LAB_VENV: &str = "/var/lib/egress-monitor-lab/venv";
/// aioquic 1.9 wants pylsqpack >= 1.1.1, which pip does not find here (1.0.0 is the
/// newest it offers); 1.7.2 installs with it.
const AIOQUIC_VERSION: &str = "1.7.2";

#[derive(Parser)]
#[command(name = "xtask", about = "Project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (apt packages, bpf-linker); safe to run again.
    Setup,
    /// Set up, then build the agent (release).
    Build,
    /// Set up, build, and run the agent on the default interface; extra arguments go to
    /// `monitor run`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build (release) and run the benchmark suite (kernel cost per packet, poll
    /// cost, NAT, end to end against peers; with offloads off: throughput, new flows and
    /// kernel cost in place; rule-list matching; detection latency) and write its section
    /// of BENCHMARKS.md; or one named benchmark, which prints a Markdown table.
    Bench {
        #[arg(value_enum)]
        which: Option<Bench>,
        /// A smaller suite (under 3 minutes) to run before and after a change; prints its
        /// report and writes nothing.
        #[arg(long, conflicts_with = "which")]
        quick: bool,
    },
    /// Set up, then build a namespace lab (LAN, gateway running the agent, Internet host),
    /// play a short exfiltration story and show the alerts and metrics it produced.
    Demo,
    /// Set up, build (release) and make the Debian package egress-monitor_VERSION_ARCH.deb;
    /// prints its path.
    Package {
        /// Package this agent binary instead of building one (the tests package their
        /// debug build); nothing is set up or built.
        #[arg(long)]
        binary: Option<PathBuf>,
        /// Where to write the package (default: the target directory's `debian/`).
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Set up, then run every test: unit, kernel (BPF_PROG_TEST_RUN) and namespace labs.
    Test {
        /// Passed to `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Bench {
    /// What each ingress hook (native XDP, TC) costs a veth gateway, against no agent.
    Ingress,
    /// The agent's memory, CPU and conn log over a 10-minute mixed-traffic run
    /// (`SOAK_SECS` overrides the length, e.g. 60 for a quick check).
    Soak,
}

fn main() -> anyhow::Result<()> {
    let root = workspace_root();
    // Paths given on the command line are relative to where it was typed.
    let cwd = env::current_dir()?;
    env::set_current_dir(&root)?;
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::Build => {
            setup()?;
            cargo(&["build", "--release", "-p", "monitor"])
        }
        Task::Run { args } => {
            setup()?;
            cargo(&["build", "--release", "-p", "monitor"])?;
            let bin = target_dir(&root).join("release/monitor");
            let mut cmd = as_root(&bin);
            cmd.arg("run").args(&args);
            check(cmd.status(), "monitor run")
        }
        Task::Bench { which, quick } => {
            setup()?;
            cargo(&["build", "--release", "-p", "monitor"])?;
            let (bin, args): (&str, Vec<String>) = match (which, quick) {
                (Some(Bench::Ingress), _) => ("bench-ingress", Vec::new()),
                (Some(Bench::Soak), _) => ("bench-soak", Vec::new()),
                (None, true) => ("bench-suite", vec!["--quick".into()]),
                (None, false) => (
                    "bench-suite",
                    vec![
                        "--write".into(),
                        root.join("BENCHMARKS.md").display().to_string(),
                    ],
                ),
            };
            let mut cmd = as_root(Path::new("cargo"));
            cmd.args([
                "run",
                "--quiet",
                "--release",
                "-p",
                "tests",
                "--bin",
                bin,
                "--",
            ])
            .args(&args)
            .env("MONITOR_BIN", target_dir(&root).join("release/monitor"));
            check(cmd.status(), bin)
        }
        Task::Demo => {
            setup()?;
            cargo(&["build", "-p", "monitor"])?;
            let mut cmd = as_root(Path::new("cargo"));
            cmd.args(["run", "--quiet", "-p", "tests", "--bin", "demo"])
                .env("MONITOR_BIN", target_dir(&root).join("debug/monitor"));
            check(cmd.status(), "demo")
        }
        Task::Package { binary, out_dir } => {
            let binary = match binary {
                Some(binary) => cwd.join(binary),
                None => {
                    setup()?;
                    cargo(&["build", "--release", "-p", "monitor"])?;
                    target_dir(&root).join("release/monitor")
                }
            };
            let out_dir =
                out_dir.map_or_else(|| target_dir(&root).join("debian"), |dir| cwd.join(dir));
            std::fs::create_dir_all(&out_dir)
                .with_context(|| format!("creating {}", out_dir.display()))?;
            let deb = package::build(&root, &binary, &out_dir)?;
            println!("{}", deb.display());
            Ok(())
        }
        Task::Test { args } => {
            setup()?;
            cargo(&["build", "-p", "monitor"])?;
            let bin = target_dir(&root).join("debug/monitor");
            let mut cmd = as_root(Path::new("cargo"));
            cmd.args(["test", "--workspace", "--no-fail-fast"])
                .args(&args)
                .env("MONITOR_BIN", &bin);
            check(cmd.status(), "cargo test")
        }
    }
}

/// Where cargo builds: `CARGO_TARGET_DIR` (relative to the workspace) when set, else
/// `target/`.
fn target_dir(root: &Path) -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |dir| root.join(dir))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn setup() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !apt_installed(pkg))
        .collect();
    if missing.is_empty() {
        eprintln!("setup: apt packages present");
    } else {
        eprintln!("setup: installing {}", missing.join(" "));
        check(
            as_root(Path::new("apt-get")).arg("update").status(),
            "apt-get update",
        )?;
        let mut install = as_root(Path::new("apt-get"));
        install
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        check(install.status(), "apt-get install")?;
    }

    if bpf_linker_version().as_deref() == Some(BPF_LINKER_VERSION) {
        eprintln!("setup: bpf-linker {BPF_LINKER_VERSION} present");
    } else {
        eprintln!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} (about a minute)"
        );
        let features = format!("llvm-{LLVM_MAJOR}");
        let mut install = Command::new("cargo");
        install
            .args(["install", "bpf-linker", "--locked", "--force"])
            .args(["--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", &features])
            .env("LLVM_PREFIX", format!("/usr/lib/llvm-{LLVM_MAJOR}"));
        check(install.status(), "cargo install bpf-linker")?;
    }
    lab_venv()?;
    mount_bpf_fs()
}

/// Installs aioquic into [`LAB_VENV`] unless the pinned version is there.
fn lab_venv() -> anyhow::Result<()> {
    let venv = Path::new(LAB_VENV);
    let installed = Command::new(venv.join("bin/python"))
        .args(["-c", "import aioquic; print(aioquic.__version__)"])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == AIOQUIC_VERSION);
    if installed {
        eprintln!("setup: aioquic {AIOQUIC_VERSION} present in {LAB_VENV}");
        return Ok(());
    }
    eprintln!("setup: installing aioquic {AIOQUIC_VERSION} into a venv at {LAB_VENV}");
    let mut create = as_root(Path::new("/usr/bin/python3"));
    create.args(["-m", "venv", LAB_VENV]);
    check(create.status(), "python3 -m venv")?;
    let mut install = as_root(&venv.join("bin/pip"));
    install.args(["install", "--quiet", &format!("aioquic=={AIOQUIC_VERSION}")]);
    check(install.status(), "pip install aioquic")
}

/// `--pin-path` needs a BPF filesystem at /sys/fs/bpf, which not every machine mounts.
fn mount_bpf_fs() -> anyhow::Result<()> {
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .context("reading /proc/self/mounts")?
        .lines()
        .any(|line| line.split_whitespace().nth(1) == Some("/sys/fs/bpf"));
    if mounted {
        eprintln!("setup: /sys/fs/bpf mounted");
        return Ok(());
    }
    eprintln!("setup: mounting a BPF filesystem on /sys/fs/bpf");
    let mut mount = as_root(Path::new("mount"));
    mount.args(["-t", "bpf", "bpf", "/sys/fs/bpf"]);
    check(mount.status(), "mount -t bpf bpf /sys/fs/bpf")
}

fn apt_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

/// The installed bpf-linker's version, if any.
fn bpf_linker_version() -> Option<String> {
    let out = Command::new("bpf-linker").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().last().map(str::to_owned)
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    check(Command::new("cargo").args(args).status(), "cargo")
}

/// Loading BPF programs, making namespaces and installing packages need root: use sudo
/// when not root already.
fn as_root(program: &Path) -> Command {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        Command::new(program)
    } else {
        let mut cmd = Command::new("sudo");
        cmd.arg("-E").arg(program);
        cmd
    }
}

fn check(status: std::io::Result<ExitStatus>, what: &str) -> anyhow::Result<()> {
    let status = status.with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}
