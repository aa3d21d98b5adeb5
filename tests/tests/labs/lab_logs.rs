//! Log rotation: logrotate moves the conn log away and sends SIGHUP; the agent writes
//! the next records to a new file at the same path and loses none.

use std::{
    net::SocketAddr,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use tests::{
    agent::Agent,
    lab::{self, Lab},
    traffic,
};

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

#[test]
fn sighup_reopens_the_conn_log_after_rotation() {
    let lab = Lab::new();
    let agent = Agent::start(
        &lab.gw,
        &lab.gw_wan_if,
        &["--local-net", lab::LOCAL_NET_V4, "--poll-interval", "200ms"],
    );
    let log = agent.conn_log_path().to_owned();
    let rotated = log.with_extension("log.1");
    let server: SocketAddr = (lab::WAN_HOST_V4, 5301).into();
    let first = traffic::tcp_upload(&lab.lan, &lab.wan, server, 100_000);

    // Closed connections are written after Zeek's 5 s close delay.
    let start = Instant::now();
    while lines(&log).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no record of the first connection"
        );
        thread::sleep(Duration::from_millis(200));
    }
    std::fs::rename(&log, &rotated).expect("rotate the conn log");
    agent.signal(libc::SIGHUP);
    thread::sleep(Duration::from_millis(500));
    let second = traffic::tcp_upload(&lab.lan, &lab.wan, server, 100_000);
    // Read before stop(): the harness removes its directory with the agent.
    let old = lines(&rotated);
    // stop() reads the conn log at its path: the new file.
    let new = agent.stop();

    let port = |r: &serde_json::Value| r["id.orig_p"].as_u64().expect("id.orig_p");
    assert_eq!(old.len(), 1, "rotated file: {old:?}");
    assert_eq!(port(&old[0]), u64::from(first.client.port()));
    let new_ports: Vec<u64> = new.iter().map(|r| r.u64("id.orig_p")).collect();
    assert!(
        new_ports.contains(&u64::from(second.client.port())),
        "the new file has the second connection: {new_ports:?}"
    );
    assert!(
        !new_ports.contains(&u64::from(first.client.port())),
        "nothing written twice: {new_ports:?}"
    );
}
