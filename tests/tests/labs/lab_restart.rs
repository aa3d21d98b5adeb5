//! Restart without loss (`--pin-path`, `--state-dir`): the agent is killed with SIGKILL in
//! the middle of an upload, the upload goes on while no agent runs, and a second agent
//! takes over. The connection's one conn-log record must equal the WAN link's counters
//! exactly, LargeUpload must fire once over both lives, and `monitor detach` must leave
//! nothing attached. A flow map pinned by an agent of another shape (the per-CPU map of
//! earlier versions) is refused with the way out, never counted into.

use std::{
    ffi::CString,
    net::{IpAddr, Shutdown, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use monitor::kernel::bpf::RawMap;
use monitor_common::{
    DEFAULT_FLOW_MAP_SIZE,
    flow::{FlowKey, FlowValue},
    names,
};
use tests::{
    agent::{Agent, ConnRecord},
    lab::{self, Lab},
    rules_lab::{Scratch, connect, join, listen, read_json_lines, send, spawn_discard},
    traffic,
};

const MB: u64 = 1_000_000;
const PORT: u16 = 5201;
/// Generous for a loaded 2-core machine.
const LIMIT: Duration = Duration::from_secs(40);

/// The pin directory, removed (`monitor detach`'s own code) even when the test fails.
struct Pins(PathBuf);

impl Pins {
    fn arg(&self) -> &str {
        self.0.to_str().expect("UTF-8 pin path")
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = monitor::kernel::pins::remove(&self.0);
    }
}

fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(start.elapsed() < LIMIT, "not within {LIMIT:?}: {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

fn large_uploads(path: &Path) -> Vec<ConnRecord> {
    read_json_lines(path)
        .into_iter()
        .map(ConnRecord)
        .filter(|a| a.str("note") == "LargeUpload")
        .collect()
}

/// The programs TCX runs on gw's WAN veth, by name, (ingress, egress).
fn tcx_programs(lab: &Lab) -> (Vec<String>, Vec<String>) {
    let iface = CString::new(lab.gw_wan_if.clone()).expect("interface name");
    lab::run_in_ns(&lab.gw, move || {
        let names = |direction| {
            let (_, programs) = SchedClassifier::query_tcx(iface.as_c_str(), direction)
                .unwrap_or_else(|e| panic!("query TCX {direction:?}: {e}"));
            programs
                .iter()
                .map(|p| p.name_as_str().unwrap_or("?").to_owned())
                .collect::<Vec<_>>()
        };
        (names(TcAttachType::Ingress), names(TcAttachType::Egress))
    })
}

#[test]
fn kill_9_mid_upload_then_restart_loses_nothing() {
    let lab = Lab::new();
    let scratch = Scratch::new("restart");
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/monitor-test-restart-{}",
        std::process::id()
    )));
    let state = scratch.path("state");
    let state_arg = state.to_str().expect("UTF-8 temp path");
    let alert_logs = [
        scratch.path("alerts-1.jsonl"),
        scratch.path("alerts-2.jsonl"),
    ];
    let start = |life: usize| {
        let alerts = alert_logs[life].to_str().expect("UTF-8 temp path");
        Agent::start_seeing_host(
            &lab.gw,
            &lab.gw_wan_if,
            &[
                "--local-net",
                lab::LOCAL_NET_V4,
                "--local-net",
                lab::LOCAL_NET_V6,
                "--poll-interval",
                "200ms",
                "--upload-threshold",
                "5MB",
                "--upload-min-packets",
                "100",
                "--pin-path",
                pins.arg(),
                "--state-dir",
                state_arg,
                "--alert-log",
                alerts,
            ],
        )
    };
    let server = SocketAddr::new(IpAddr::V4(lab::WAN_HOST_V4), PORT);
    let received = spawn_discard(listen(&lab.wan, server), 1);

    lab.wait_quiet();
    let up_l2 = lab.tx_l2_bytes(&lab.gw, &lab.gw_wan_if);
    let down_l2 = lab.tx_l2_bytes(&lab.wan, &lab.wan_if);
    lab.wait_quiet();
    let before = lab.wan_counters();

    let first = start(0);
    let mut stream = connect(&lab.lan, server);
    let client = stream.local_addr().expect("client address");
    send(&mut stream, 8 * MB);
    let alerted = wait_for("LargeUpload from the first agent", || {
        large_uploads(&alert_logs[0]).into_iter().next()
    });
    let first_output = first.kill();

    // No agent: the pinned programs pass the traffic and count it.
    send(&mut stream, 8 * MB);
    let (ingress, egress) = tcx_programs(&lab);
    assert_eq!(
        (ingress, egress),
        (vec!["tc_ingress".to_owned()], vec!["tc_egress".to_owned()]),
        "the programs stay attached without an agent\nfirst agent:\n{first_output}"
    );

    let second = start(1);
    assert!(
        second.stderr().contains("pinned by an earlier run"),
        "the second agent keeps the pinned links: {}",
        second.stderr()
    );
    send(&mut stream, 8 * MB);
    stream.shutdown(Shutdown::Write).expect("close the upload");
    let bytes = join(received);
    assert_eq!(bytes, vec![24 * MB], "the server got every byte");
    let record = wait_for("the upload's conn-log record", || {
        read_json_lines(second.conn_log_path())
            .into_iter()
            .map(ConnRecord)
            .find(|r| r.is_between("tcp", (client.ip(), client.port()), (server.ip(), PORT)))
    });
    lab.wait_quiet();
    let wire = lab.wan_counters().since(before);
    // Payload on the wire, retransmissions included: the sender's own count.
    let sent = traffic::tcp_info(&stream).bytes_sent;
    let records = second.stop();

    // The record: ground truth is the WAN link's counters over the whole run.
    let same: Vec<&ConnRecord> = records
        .iter()
        .filter(|r| r.is_between("tcp", (client.ip(), client.port()), (server.ip(), PORT)))
        .collect();
    assert_eq!(same.len(), 1, "one record for the connection: {records:?}");
    assert_eq!(record.u64("orig_bytes"), sent, "{record}");
    assert_eq!(record.u64("orig_pkts"), wire.gw_wan.tx_packets, "{record}");
    assert_eq!(
        record.u64("orig_ip_bytes"),
        wire.gw_wan.tx_ip_bytes(up_l2),
        "{record}"
    );
    assert_eq!(
        record.u64("resp_pkts"),
        wire.wan_host.tx_packets,
        "{record}"
    );
    assert_eq!(
        record.u64("resp_ip_bytes"),
        wire.wan_host.tx_ip_bytes(down_l2),
        "{record}"
    );
    assert_eq!(record.str("conn_state"), "SF", "{record}");
    assert!(!record.bool("missed_start"), "{record}");
    assert_eq!(
        record.str("uid"),
        alerted.str("uid"),
        "the second agent names the connection as the first did"
    );

    // LargeUpload once over both lives.
    let alerts: Vec<ConnRecord> = alert_logs.iter().flat_map(|p| large_uploads(p)).collect();
    assert_eq!(alerts.len(), 1, "one LargeUpload in all: {alerts:?}");

    // SIGTERM with --pin-path leaves the programs attached; detach removes everything.
    assert_eq!(tcx_programs(&lab).1, vec!["tc_egress".to_owned()]);
    let out = Command::new(Agent::binary())
        .args(["detach", "--pin-path", pins.arg()])
        .output()
        .expect("run monitor detach");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "detach: {stderr}");
    assert!(
        stderr.contains(&format!(
            "removed 2 links and {} maps",
            monitor::kernel::pins::MAPS.len()
        )),
        "detach: {stderr}"
    );
    assert!(!pins.0.exists(), "the pin directory is gone");
    assert_eq!(
        tcx_programs(&lab),
        (Vec::new(), Vec::new()),
        "nothing attached after detach"
    );
}

/// Pins at `path` an empty map of `map_type` with the flow map's key and value sizes and
/// default capacity.
fn pin_flow_shaped_map(map_type: u32, path: &Path) {
    let map = RawMap::create(
        map_type,
        size_of::<FlowKey>() as u32,
        size_of::<FlowValue>() as u32,
        DEFAULT_FLOW_MAP_SIZE,
    )
    .unwrap_or_else(|e| panic!("BPF_MAP_CREATE: {e}"));
    map.pin(path)
        .unwrap_or_else(|e| panic!("pin {}: {e}", path.display()));
}

#[test]
fn a_pinned_per_cpu_flow_map_is_refused_with_the_way_out() {
    const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
    let lab = Lab::new();
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/monitor-test-old-map-{}",
        std::process::id()
    )));
    let maps = pins.0.join("maps");
    std::fs::create_dir_all(&maps).unwrap_or_else(|e| panic!("mkdir {}: {e}", maps.display()));
    pin_flow_shaped_map(BPF_MAP_TYPE_PERCPU_HASH, &maps.join(names::FLOW_MAP));
    let mut agent = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.gw))
        .arg(Agent::binary())
        .args(["run", "--iface", &lab.gw_wan_if, "--pin-path", pins.arg()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the agent");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = agent.try_wait().expect("wait for the agent") {
            break status;
        }
        if started.elapsed() > LIMIT {
            let _ = agent.kill();
            let _ = agent.wait();
            panic!("the agent still runs on a per-CPU flow map after {LIMIT:?}");
        }
        thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut agent.stderr.take().expect("stderr"), &mut stderr)
        .expect("read the agent's stderr");
    assert!(
        !status.success(),
        "the agent ran on a per-CPU flow map: {stderr}"
    );
    assert!(
        stderr.contains("do not fit this agent")
            && stderr.contains(&format!("monitor detach --pin-path {}", pins.arg())),
        "the message names the way out: {stderr}"
    );
    assert!(
        maps.join(names::FLOW_MAP).exists(),
        "the old map is left for `monitor detach`"
    );
}
