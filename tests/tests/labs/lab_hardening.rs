//! What other users of the machine may plant or change must not steer the agent: a log
//! path that is a symbolic link is refused (its target untouched), a pin directory is
//! made private and refused when someone else owns it or may write to it, a tampered or
//! oversized `state.json` is ignored with a warning (a fresh start), and a SIGTERM while
//! the programs attach ends in a clean detach and exit 0.

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use serde_json::{Value, json};
use tests::{
    agent::Agent,
    bpf::prog_ids_of,
    lab::{self, Lab},
    rules_lab::Scratch,
};

/// Long enough for a loaded 2-core machine; an agent that should have refused its input
/// and runs instead is killed then.
const LIMIT: Duration = Duration::from_secs(20);
const NOBODY: u32 = 65534;

/// `monitor run --iface gw-wan ARGS` in the lab's gateway, seeing /sys/fs/bpf, to its end.
fn run_to_end(lab: &Lab, args: &[&str]) -> Output {
    lab::run_bounded(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lab.gw))
            .arg(Agent::binary())
            .args(["run", "--iface", &lab.gw_wan_if])
            .args(args),
        LIMIT,
    )
}

/// Exit status 1 and one line on stderr holding every part.
fn assert_refused(out: &Output, parts: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line, got {stderr:?}");
    for part in parts {
        assert!(lines[0].contains(part), "{part:?} missing from {stderr:?}");
    }
}

fn utf8(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

#[test]
fn symlinked_logs_are_refused_and_not_followed() {
    let lab = Lab::new();
    let scratch = Scratch::new("symlinked-logs");
    let target = scratch.path("precious");
    fs::write(&target, "precious\n").expect("write the target");
    let missing = scratch.path("created-through-the-link");
    for flag in ["--conn-log", "--alert-log", "--dns-log"] {
        for (name, points_to) in [("to-file", &target), ("dangling", &missing)] {
            let link = scratch.path(&format!("{flag}-{name}"));
            symlink(points_to, &link).expect("plant the symlink");
            let out = run_to_end(&lab, &[flag, utf8(&link)]);
            assert_refused(&out, &[utf8(&link), "symbolic link"]);
            assert_eq!(
                fs::read_to_string(&target).expect("read the target"),
                "precious\n",
                "{flag} {name}: the target is untouched"
            );
            assert!(
                !missing.exists(),
                "{flag} {name}: nothing made through the link"
            );
        }
    }
}

/// A pin directory, removed when the test ends whatever it holds.
struct PinDir(PathBuf);

impl PinDir {
    fn new(tag: &str) -> PinDir {
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/monitor-test-{tag}-{}",
            std::process::id()
        ));
        let _ = monitor::kernel::pins::remove(&dir);
        let _ = fs::remove_file(&dir);
        let _ = fs::remove_dir(&dir);
        PinDir(dir)
    }

    fn arg(&self) -> &str {
        utf8(&self.0)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = monitor::kernel::pins::remove(&self.0);
        let _ = fs::remove_file(&self.0);
        let _ = fs::remove_dir(&self.0);
    }
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .mode()
        & 0o7777
}

#[test]
fn pin_directories_are_private_and_refused_when_not_ours() {
    let lab = Lab::new();

    let made = PinDir::new("private");
    let agent = Agent::start_seeing_host(&lab.gw, &lab.gw_wan_if, &["--pin-path", made.arg()]);
    for dir in [made.0.clone(), made.0.join("maps"), made.0.join("links")] {
        assert_eq!(mode(&dir), 0o700, "{} is private", dir.display());
    }
    agent.stop();

    let foreign = PinDir::new("foreign");
    fs::create_dir(&foreign.0).expect("make the pin directory");
    std::os::unix::fs::chown(&foreign.0, Some(NOBODY), Some(NOBODY)).expect("chown to nobody");
    let out = run_to_end(&lab, &["--pin-path", foreign.arg()]);
    assert_refused(&out, &["--pin-path", foreign.arg(), "owned by uid 65534"]);

    let open = PinDir::new("open");
    fs::create_dir(&open.0).expect("make the pin directory");
    fs::set_permissions(&open.0, fs::Permissions::from_mode(0o777)).expect("chmod 777");
    let out = run_to_end(&lab, &["--pin-path", open.arg()]);
    assert_refused(
        &out,
        &["--pin-path", open.arg(), "writable by group or others"],
    );

    let linked = PinDir::new("linked");
    symlink(&made.0, &linked.0).expect("plant the symlink");
    let out = run_to_end(&lab, &["--pin-path", linked.arg()]);
    assert_refused(&out, &["--pin-path", linked.arg(), "symbolic link"]);
}

/// A state file as an agent of this boot writes it, holding `rules` and `suppressor`.
fn state(rules: Value, suppressor: Value) -> Value {
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot id");
    json!({
        "version": 1,
        "boot_id": boot_id.trim(),
        "uid_seed": [1, 2],
        "conns": [],
        "rules": rules,
        "suppressor": suppressor,
    })
}

#[test]
fn tampered_or_oversized_state_is_ignored_with_a_warning() {
    let lab = Lab::new();
    let scratch = Scratch::new("tampered-state");
    let pair = json!({"src": "198.18.1.2", "dst": "203.0.113.2"});
    let group = |window: u64, past: Value, last_leak: Value| {
        json!({"Windows.groups": [[pair, {
            "window": window, "bytes": 1, "exceeded": false, "past": past, "last_leak": last_leak,
        }]]})
    };
    let now_window = || {
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after the epoch");
        epoch.as_secs() / 300
    };
    let far_future_ns = u64::MAX / 2;
    let cases: Vec<(&str, String)> = vec![
        (
            "suppression timer in the future",
            state(json!({}), json!([["LargeUpload", "k", far_future_ns]])).to_string(),
        ),
        (
            "window in the future",
            state(
                group(now_window() + 10, json!([]), Value::Null),
                Value::Null,
            )
            .to_string(),
        ),
        (
            "past window after the current one",
            state(
                group(
                    now_window(),
                    json!([[now_window() + 1, 7_000_000]]),
                    Value::Null,
                ),
                Value::Null,
            )
            .to_string(),
        ),
        (
            "leak in the future",
            state(group(now_window(), json!([]), json!(1e12)), Value::Null).to_string(),
        ),
        (
            "oversized",
            // Valid JSON, padded far beyond what a map of 1024 connections leaves.
            format!("{}{}", state(json!({}), Value::Null), " ".repeat(64 << 20)),
        ),
    ];
    for (what, text) in cases {
        let dir = scratch.path(&what.replace(' ', "-"));
        fs::create_dir(&dir).expect("make the state dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).expect("chmod 700");
        let file = dir.join("state.json");
        fs::write(&file, &text).expect("write the state");
        let agent = Agent::start(
            &lab.gw,
            &lab.gw_wan_if,
            &["--state-dir", utf8(&dir), "--flow-map-size", "1024"],
        );
        let stderr = agent.stderr();
        agent.stop();
        assert!(
            stderr.contains("state.json") && stderr.contains("starting without saved state"),
            "{what}: a warning names the file: {stderr}"
        );
        let written: Value = serde_json::from_slice(&fs::read(&file).expect("read the state"))
            .unwrap_or_else(|e| panic!("{what}: the agent's own state is JSON: {e}"));
        assert_ne!(written["uid_seed"], json!([1, 2]), "{what}: a fresh start");
        assert_eq!(written["suppressor"], json!([]), "{what}: {written}");
        assert_eq!(
            written["rules"]["Windows.groups"],
            json!([]),
            "{what}: {written}"
        );
    }
}

/// The agent as a child of this test, killed (by PID) if the test ends first.
struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The programs TCX runs on the gateway's WAN veth, (ingress, egress).
fn tcx_programs(lab: &Lab) -> (usize, usize) {
    let iface = std::ffi::CString::new(lab.gw_wan_if.clone()).expect("interface name");
    lab::run_in_ns(&lab.gw, move || {
        let count = |direction| {
            SchedClassifier::query_tcx(iface.as_c_str(), direction)
                .unwrap_or_else(|e| panic!("query TCX {direction:?}: {e}"))
                .1
                .len()
        };
        (count(TcAttachType::Ingress), count(TcAttachType::Egress))
    })
}

#[test]
fn sigterm_while_attaching_detaches_and_exits_0() {
    let lab = Lab::new();
    let mut agent = Spawned(
        Command::new("ip")
            .args(["netns", "exec", &lab.gw])
            .arg(Agent::binary())
            .args(["run", "--iface", &lab.gw_wan_if])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the agent"),
    );
    let pid = agent.0.id();
    // The first program it holds: loading has begun, attaching is to come.
    let started = Instant::now();
    while prog_ids_of(pid).is_empty() {
        assert!(started.elapsed() < LIMIT, "the agent loaded no program");
        assert!(
            agent.0.try_wait().expect("wait for the agent").is_none(),
            "the agent exited before loading"
        );
        thread::sleep(Duration::from_micros(200));
    }
    // SAFETY: a signal to the agent this test started, by its PID.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let status = loop {
        if let Some(status) = agent.0.try_wait().expect("wait for the agent") {
            break status;
        }
        assert!(started.elapsed() < 2 * LIMIT, "no exit after SIGTERM");
        thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut agent.0.stderr.take().expect("stderr"), &mut stderr)
        .expect("read the agent's stderr");
    assert_eq!(status.code(), Some(0), "a clean exit: {status}, {stderr}");
    assert!(
        stderr.contains(&format!("detached from {}", lab.gw_wan_if)),
        "{stderr}"
    );
    assert_eq!(tcx_programs(&lab), (0, 0), "nothing left attached");
}
