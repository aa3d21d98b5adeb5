//! Bad input and missing privileges: the documented exit status and one actionable line.

use std::process::{Command, Output};

use tests::agent::Agent;

fn monitor(args: &[&str]) -> Output {
    Command::new(Agent::binary())
        .args(args)
        .output()
        .expect("run the agent binary")
}

/// Exit status 2 and exactly one line on stderr naming the flag and the value.
fn assert_usage_error(args: &[&str], flag: &str, value: &str, accepted: &str) {
    let out = monitor(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: stderr {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: want one line, got {stderr:?}");
    for part in [flag, value, accepted] {
        assert!(
            lines[0].contains(part),
            "{args:?}: {part:?} missing from {stderr:?}"
        );
    }
}

#[test]
fn nonexistent_interface() {
    assert_usage_error(
        &["run", "--iface", "nosuch0"],
        "--iface",
        "nosuch0",
        "no such interface",
    );
}

#[test]
fn bad_cidr() {
    assert_usage_error(
        &["run", "--iface", "lo", "--local-net", "10.0.0.0/33"],
        "--local-net",
        "10.0.0.0/33",
        "network such as",
    );
}

#[test]
fn bad_duration() {
    for flag in ["--poll-interval", "--idle-timeout"] {
        assert_usage_error(
            &["run", "--iface", "lo", flag, "soon"],
            flag,
            "soon",
            "expected a duration",
        );
    }
}

#[test]
fn bad_hook() {
    assert_usage_error(
        &["run", "--iface", "lo", "--ingress-hook", "kprobe"],
        "--ingress-hook",
        "kprobe",
        "xdp",
    );
}

#[test]
fn bad_size_list_and_url() {
    assert_usage_error(
        &["run", "--iface", "lo", "--upload-threshold", "5 parsecs"],
        "--upload-threshold",
        "5 parsecs",
        "expected a size",
    );
    assert_usage_error(
        &["run", "--iface", "lo", "--long-durations", "1h,10m"],
        "--long-durations",
        "1h,10m",
        "increasing durations",
    );
    assert_usage_error(
        &["run", "--iface", "lo", "--syslog", "tcp://127.0.0.1:514"],
        "--syslog",
        "tcp://127.0.0.1:514",
        "udp://HOST:PORT or unix:PATH",
    );
    assert_usage_error(
        &["run", "--iface", "lo", "--allow-service", "203.0.113.0/24"],
        "--allow-service",
        "203.0.113.0/24",
        "CIDR,PORT/PROTO",
    );
}

#[test]
fn contradictory_flags() {
    assert_usage_error(
        &["run", "--iface", "lo", "--restricted-net", "203.0.113.0/24"],
        "--restricted-net",
        "203.0.113.0/24",
        "not inside any --local-net",
    );
}

/// Log paths are checked before anything is loaded: a path that cannot be written
/// fails at start with its name, not at the first alert.
#[test]
fn unwritable_log_path_fails_at_start() {
    let out = monitor(&[
        "run",
        "--iface",
        "lo",
        "--conn-log",
        "/proc/no-such-dir/conn.log",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("opening /proc/no-such-dir/conn.log"),
        "names the path: {stderr}"
    );
    assert!(
        !stderr.contains("monitor: watching"),
        "nothing attached: {stderr}"
    );
}

#[test]
fn help_documents_every_flag_with_its_default() {
    let out = monitor(&["run", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--iface",
        "--ingress-hook",
        "--xdp-mode",
        "--flow-map-size",
        "--local-net",
        "--poll-interval",
        "--idle-timeout",
        "--conn-log",
        "--conn-long-log",
        "--alert-log",
        "--syslog",
        "--alertmanager-url",
        "--metrics-addr",
        "--suppress",
        "--upload-threshold",
        "--upload-min-packets",
        "--ratio-port",
        "--ratio",
        "--ratio-min-bytes",
        "--long-durations",
        "--long-ignore",
        "--restricted-net",
        "--allow-dst",
        "--allow-service",
        "--allow-pair",
        "--restricted-suppress",
        "--window",
        "--window-threshold",
        "--leak-period",
        "--leak-threshold",
        "--leak-group",
        "--exclude-dst",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    for default in [
        "[default: tc]",
        "[default: auto]",
        "[default: 262144]",
        "[default: 1s]",
        "[default: 5m]",
        "fc00::/7",
        "[default: 100MB]",
        "[default: 1000]",
        "[default: 80/tcp]",
        "[default: 10m,30m,1h,12h,24h,3d]",
        "[default: 60s]",
        "[default: 5MB]",
        "[default: 24h]",
        "[default: pair]",
        "[default: 127.0.0.1:9877]",
        "[default: 1h]",
    ] {
        assert!(help.contains(default), "{default} missing from --help");
    }
}

/// Without privileges the agent cannot load its programs: it must say what it needs.
#[test]
fn unprivileged_run_says_what_it_needs() {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["--inh-caps=-all", "--bounding-set=-all"])
        .arg(Agent::binary())
        .args(["run", "--iface", "lo"])
        .output()
        .expect("run setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("needs root, or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON"),
        "last line should say what privileges are needed: {stderr}"
    );
}
