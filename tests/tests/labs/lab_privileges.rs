//! Least privilege of a running agent: after attaching, every thread keeps only
//! CAP_NET_ADMIN; its log files are 0640; /metrics listens on loopback only.

use std::os::unix::fs::PermissionsExt;

use tests::{
    agent::Agent,
    lab::{self, Lab},
};

/// CAP_NET_ADMIN is capability 12.
const NET_ADMIN_ONLY: u64 = 1 << 12;

fn cap_field(status: &str, field: &str) -> u64 {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("{field} missing from:\n{status}"))
        .trim();
    u64::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("{field} {hex:?}: {e}"))
}

#[test]
fn capabilities_dropped_logs_private_metrics_on_loopback() {
    let lab = Lab::new();
    let agent = Agent::start(
        &lab.gw,
        &lab.gw_wan_if,
        &["--local-net", lab::LOCAL_NET_V4, "--poll-interval", "200ms"],
    );
    let tasks = std::fs::read_dir(format!("/proc/{}/task", agent.pid()))
        .expect("the agent's threads")
        .map(|t| t.expect("a thread").path())
        .collect::<Vec<_>>();
    assert!(tasks.len() >= 2, "the agent runs sink threads: {tasks:?}");
    for task in &tasks {
        let status = std::fs::read_to_string(task.join("status")).expect("thread status");
        for field in ["CapEff:", "CapPrm:", "CapInh:", "CapAmb:"] {
            let caps = cap_field(&status, field);
            assert_eq!(
                caps & !NET_ADMIN_ONLY,
                0,
                "{} {field} {caps:#x}: only CAP_NET_ADMIN may remain",
                task.display()
            );
        }
        assert_eq!(
            cap_field(&status, "CapBnd:"),
            NET_ADMIN_ONLY,
            "{}: bounding set",
            task.display()
        );
    }

    let mode = std::fs::metadata(agent.conn_log_path())
        .expect("the conn log exists from the start")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640, "conn log mode {mode:o}");

    // /proc/net/tcp of the agent's namespace: the listener on 9877 (0x2695) is bound to
    // 127.0.0.1 (0100007F in the kernel's byte order), nothing else.
    let tcp = lab::ns_exec(&lab.gw, &["cat", "/proc/net/tcp"]);
    let listeners: Vec<&str> = tcp
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|local| local.ends_with(":2695"))
        .collect();
    assert_eq!(listeners, ["0100007F:2695"], "metrics listeners:\n{tcp}");
    agent.stop();
}
