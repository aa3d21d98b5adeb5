//! The agent's /metrics scraped by a real Prometheus (Debian's package) in the lab, and
//! read back through Prometheus's HTTP API after real traffic crossed the gateway.

use std::{net::SocketAddr, time::Duration};

use tests::{
    agent::Agent,
    http::eventually,
    lab::{self, Lab},
    prometheus::Prometheus,
    traffic,
};

#[test]
fn prometheus_scrapes_outbound_bytes() {
    let lab = Lab::new();
    let agent = Agent::start(
        &lab.gw,
        &lab.gw_wan_if,
        &["--local-net", lab::LOCAL_NET_V4, "--poll-interval", "200ms"],
    );
    let prometheus = Prometheus::start(&lab);

    const BYTES: u64 = 3_000_000;
    let server: SocketAddr = (lab::WAN_HOST_V4, 5201).into();
    let sent = traffic::tcp_upload(&lab.lan, &lab.wan, server, BYTES);
    assert_eq!(sent.server_received, BYTES, "the generator's own count");

    // IP bytes include headers: the outbound counter must reach at least the payload.
    let outbound = eventually(
        "egress_monitor_bytes_total{direction=\"outbound\"} reaches the bytes sent",
        Duration::from_secs(60),
        || {
            prometheus
                .value("egress_monitor_bytes_total{direction=\"outbound\"}")
                .filter(|&b| b >= BYTES as f64)
        },
    );
    assert!(
        outbound < BYTES as f64 * 1.1,
        "outbound {outbound} is far above the {BYTES} bytes sent: headers are about 3%"
    );
    let conns = prometheus
        .value("egress_monitor_connections_total")
        .expect("connections_total");
    assert!(conns >= 1.0, "connections_total {conns}");
    let capacity = prometheus
        .value("egress_monitor_flow_map_capacity")
        .expect("capacity");
    assert_eq!(capacity, 262_144.0);
    agent.stop();
}
