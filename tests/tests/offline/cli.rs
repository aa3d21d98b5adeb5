//! Bad input and missing privileges: the documented exit status and one actionable line.

use std::{
    process::{Command, Output},
    time::Duration,
};

use tests::{agent::Agent, lab::run_within};

/// Every case here ends before anything is attached; one that is still running after this
/// has accepted its input and started for real.
const EXIT_LIMIT: Duration = Duration::from_secs(10);

fn monitor(args: &[&str]) -> Output {
    exits_early(Command::new(Agent::binary()).args(args), args)
}

/// Runs `cmd`; if it is still running after [`EXIT_LIMIT`] it is killed (by PID), reaped,
/// and the test fails naming the agent's arguments `args`.
fn exits_early(cmd: &mut Command, args: &[&str]) -> Output {
    run_within(cmd, EXIT_LIMIT).unwrap_or_else(|out| {
        panic!(
            "`monitor {}` accepted its arguments and started: still running after {EXIT_LIMIT:?} (killed)\nstderr: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )
    })
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

/// The second attach of one interface would fail: a repeat is bad input, named as such.
#[test]
fn repeated_interface() {
    assert_usage_error(
        &["run", "--iface", "lo", "--iface", "lo"],
        "--iface",
        "lo",
        "given more than once",
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

/// The output URLs say what was wrong and which forms the flag takes.
#[test]
fn bad_output_urls() {
    for (flag, url, why, accepted) in [
        (
            "--syslog",
            "unix://dev/log",
            "absolute path",
            "udp://HOST:PORT or unix:PATH",
        ),
        ("--syslog", "udp://[::1]", "missing :PORT", "unix:PATH"),
        (
            "--ipfix-collector",
            "tcp://[::1]",
            "missing :PORT",
            "udp://HOST:PORT or tcp://HOST:PORT",
        ),
        (
            "--ipfix-collector",
            "unix:/run/c.sock",
            "unknown scheme",
            "tcp://HOST:PORT",
        ),
        (
            "--alertmanager-url",
            "http://am:port",
            "invalid port",
            "http://HOST[:PORT][/PREFIX]",
        ),
        (
            "--alertmanager-url",
            "udp://am:9093",
            "unknown scheme",
            "http://HOST",
        ),
    ] {
        let args = ["run", "--iface", "lo", flag, url];
        assert_usage_error(&args, flag, url, why);
        assert_usage_error(&args, flag, url, accepted);
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

/// Every `monitor run` flag that takes a value refuses a bad one: exit status 2 and one
/// line naming the flag and the value.
#[test]
fn every_flag_refuses_a_bad_value() {
    let cases: &[(&str, &str)] = &[
        ("--ingress-hook", "bpf"),
        ("--xdp-mode", "fast"),
        ("--flow-map-size", "0"),
        ("--flow-map-size", "lots"),
        ("--local-net", "10.0.0.0/40"),
        ("--poll-interval", "0s"),
        ("--idle-timeout", "never"),
        ("--metrics-addr", "localhost"),
        ("--alertmanager-url", "https://am.example:9093"),
        ("--syslog", "udp://"),
        ("--top-talkers", "ten"),
        ("--suppress", "1 fortnight"),
        ("--upload-threshold", "100 MB!"),
        ("--upload-min-packets", "many"),
        ("--ratio-port", "80"),
        ("--ratio-port", "80/gre"),
        ("--ratio", "0"),
        ("--ratio", "NaN"),
        ("--ratio-min-bytes", "1XB"),
        ("--long-durations", "10m,5m"),
        ("--long-ignore", "vpn"),
        ("--restricted-net", "10.0.0.0/99"),
        ("--allow-dst", "not_a_host!"),
        ("--allow-service", "203.0.113.0/24,https"),
        ("--allow-pair", "198.18.1.2"),
        ("--restricted-suppress", "forever"),
        ("--window", "0m"),
        ("--window-threshold", "five"),
        ("--leak-period", "1 eon"),
        ("--leak-threshold", "5 MBs"),
        ("--leak-group", "host"),
        ("--exclude-dst", "under_score"),
        ("--ipfix-collector", "sctp://127.0.0.1:4739"),
        ("--ipfix-collector", "127.0.0.1:4739"),
        ("--ipfix-collector", "udp://no-such-host.invalid:4739"),
        ("--flow-active-timeout", "often"),
        ("--ipfix-template-refresh", "0s"),
        ("--ipfix-domain-id", "domain"),
        ("--dns-log", ""),
        ("--dns-cache-size", "0"),
        ("--dns-cache-size", "big"),
        ("--dns-min-ttl", "forever"),
        ("--dns-resolver", "resolver1"),
        ("--dns-tunnel-threshold", "4 KBs"),
        ("--dns-tunnel-period", "daily"),
        ("--dns-nxdomain-threshold", "0"),
        ("--pin-path", "/tmp/monitor-pins"),
        ("--pin-path", "sys/fs/bpf/monitor"),
    ];
    for (flag, value) in cases {
        let out = monitor(&["run", "--iface", "lo", flag, value]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{flag} {value}: one line, got {stderr:?}");
        assert!(
            lines[0].contains(flag) && lines[0].contains(value),
            "{flag} {value}: the line names both: {stderr:?}"
        );
    }
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

/// The state directory too: checked before anything is loaded.
#[test]
fn unwritable_state_dir_fails_at_start() {
    let out = monitor(&["run", "--iface", "lo", "--state-dir", "/proc/monitor-state"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("--state-dir /proc/monitor-state"),
        "names the flag and path: {stderr}"
    );
    assert!(
        !stderr.contains("monitor: watching"),
        "nothing attached: {stderr}"
    );
}

#[test]
fn detach_refuses_a_path_off_bpffs_and_accepts_nothing_pinned() {
    assert_usage_error(
        &["detach", "--pin-path", "/tmp"],
        "--pin-path",
        "/tmp",
        "not on a BPF filesystem",
    );
    let dir = format!("/sys/fs/bpf/monitor-nothing-{}", std::process::id());
    let out = monitor(&["detach", "--pin-path", &dir]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr: {stderr}");
    assert!(stderr.contains("nothing pinned under"), "says so: {stderr}");
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
        "--ipfix-collector",
        "--flow-active-timeout",
        "--ipfix-template-refresh",
        "--ipfix-domain-id",
        "--ipfix-biflow",
        "--dns-log",
        "--dns-cache-size",
        "--dns-min-ttl",
        "--dns-resolver",
        "--dns-tunnel-threshold",
        "--dns-tunnel-period",
        "--dns-nxdomain-threshold",
        "--pin-path",
        "--state-dir",
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
        "[default: 60s]",
        "[default: 1h]",
        "[default: 100000]",
        "[default: 4KB]",
        "[default: 100]",
    ] {
        assert!(help.contains(default), "{default} missing from --help");
    }
}

/// Without privileges the agent cannot load its programs: it must say what it needs.
#[test]
fn unprivileged_run_says_what_it_needs() {
    // Any free port: the default one may be taken, and listening comes before loading.
    let args = ["run", "--iface", "lo", "--metrics-addr", "127.0.0.1:0"];
    let out = exits_early(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(["--inh-caps=-all", "--bounding-set=-all"])
            .arg(Agent::binary())
            .args(args),
        &args,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("needs root, or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON"),
        "last line should say what privileges are needed: {stderr}"
    );
}
