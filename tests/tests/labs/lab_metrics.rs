//! The agent's /metrics scraped by a real Prometheus (Debian's package) in the lab, and
//! read back through Prometheus's HTTP API after real traffic crossed the gateway.

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use tests::{
    agent::Agent,
    http::{self, eventually},
    lab::{self, Lab},
    traffic,
};

const PROMETHEUS: &str = "127.0.0.1:9090";

/// The value of an instant query's single series, if it has one.
fn query(ns: &str, expr: &str) -> Option<f64> {
    let encoded: String = expr
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let body = http::get(ns, PROMETHEUS, &format!("/api/v1/query?query={encoded}"))?;
    let json: Value = serde_json::from_str(&body).ok()?;
    let value = json["data"]["result"].get(0)?["value"][1].as_str()?;
    value.parse().ok()
}

#[test]
fn prometheus_scrapes_outbound_bytes() {
    let lab = Lab::new();
    let dir = std::env::temp_dir().join(format!("lab-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: egress-monitor\n    static_configs:\n      - targets: ['127.0.0.1:9877']\n",
    )
    .expect("write prometheus.yml");
    let agent = Agent::start(
        &lab.gw,
        &lab.gw_wan_if,
        &["--local-net", lab::LOCAL_NET_V4, "--poll-interval", "200ms"],
    );
    let (config_arg, storage_arg) = (
        format!("--config.file={}", config.display()),
        format!("--storage.tsdb.path={}", dir.join("data").display()),
    );
    lab.spawn_in(
        &lab.gw,
        &[
            "prometheus",
            &config_arg,
            &storage_arg,
            &format!("--web.listen-address={PROMETHEUS}"),
            "--log.level=error",
        ],
    );
    eventually(
        "Prometheus scrapes the agent",
        Duration::from_secs(60),
        || query(&lab.gw, "up{job=\"egress-monitor\"}").filter(|&up| up == 1.0),
    );

    const BYTES: u64 = 3_000_000;
    let server: SocketAddr = (lab::WAN_HOST_V4, 5201).into();
    let sent = traffic::tcp_upload(&lab.lan, &lab.wan, server, BYTES);
    assert_eq!(sent.server_received, BYTES, "the generator's own count");

    // IP bytes include headers: the outbound counter must reach at least the payload.
    let outbound = eventually(
        "egress_monitor_bytes_total{direction=\"outbound\"} reaches the bytes sent",
        Duration::from_secs(60),
        || {
            query(
                &lab.gw,
                "egress_monitor_bytes_total{direction=\"outbound\"}",
            )
            .filter(|&b| b >= BYTES as f64)
        },
    );
    assert!(
        outbound < BYTES as f64 * 1.1,
        "outbound {outbound} is far above the {BYTES} bytes sent: headers are about 3%"
    );
    let conns = query(&lab.gw, "egress_monitor_connections_total").expect("connections_total");
    assert!(conns >= 1.0, "connections_total {conns}");
    let capacity = query(&lab.gw, "egress_monitor_flow_map_capacity").expect("capacity");
    assert_eq!(capacity, 262_144.0);
    agent.stop();
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}
