//! Forged sources: frames the wan host sends with a LAN host's address as their source
//! (what anyone on the Internet side can send) count for nobody. The programs check the
//! way back to a source as the routing table has it; a packet that came in where its
//! source is not routed is counted in `packets_spoofed_total` and nowhere else.

use std::{
    net::{IpAddr, Ipv4Addr},
    thread,
    time::Duration,
};

use tests::{
    http,
    lab::{self, Lab, send_raw_frame},
    packet::Frame,
    rules_lab::{RulesAgent, listing},
};

/// An Internet address the forged packets claim to go to.
const REMOTE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77);
/// Frames of each kind.
const FORGED: u64 = 50;

#[test]
fn lan_sources_forged_on_the_wan_side_count_for_nobody() {
    let lab = Lab::new();
    let agent = RulesAgent::start(
        &lab,
        &[
            "--restricted-net",
            "198.18.1.0/24",
            "--upload-threshold",
            "10KB",
            "--upload-min-packets",
            "1",
        ],
    );
    let (wan_mac, gw_mac) = lab.macs(&lab.wan_if);
    let forged = |frame: Frame| frame.macs(wan_mac, gw_mac).build();
    let udp = forged(
        Frame::eth()
            .ipv4(lab::LAN_HOST_V4, REMOTE)
            .udp(40_000, 443)
            .payload_len(1000),
    );
    let syn = forged(
        Frame::eth()
            .ipv4(lab::LAN_HOST_V4, REMOTE)
            .tcp(40_001, 443, 0x02),
    );
    let data = forged(
        Frame::eth()
            .ipv4(lab::LAN_HOST_V4, REMOTE)
            .tcp(40_001, 443, 0x18)
            .payload_len(1000),
    );
    let rx_before = lab::counters(&lab.gw, &lab.gw_wan_if).rx_packets;
    for _ in 0..FORGED {
        send_raw_frame(&lab.wan, &lab.wan_if, gw_mac, udp.clone());
    }
    send_raw_frame(&lab.wan, &lab.wan_if, gw_mac, syn);
    for _ in 1..FORGED {
        send_raw_frame(&lab.wan, &lab.wan_if, gw_mac, data.clone());
    }
    let received = lab::counters(&lab.gw, &lab.gw_wan_if).rx_packets - rx_before;
    assert!(received >= 2 * FORGED, "gw received {received} frames");

    let spoofed = http::eventually(
        "the forged packets counted as spoofed",
        Duration::from_secs(15),
        || {
            http::agent_sample(&lab.gw, "egress_monitor_packets_spoofed_total")
                .filter(|&n| n >= (2 * FORGED) as f64)
        },
    );
    assert_eq!(
        spoofed,
        (2 * FORGED) as f64,
        "every forged frame, nothing else"
    );
    // Two polls more: anything counted would be judged by then.
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        http::agent_sample(
            &lab.gw,
            "egress_monitor_bytes_total{direction=\"outbound\"}"
        ),
        Some(0.0),
        "nothing counted as sent by the LAN host"
    );
    let stopped = agent.stop();
    assert!(stopped.alerts.is_empty(), "{}", listing(&stopped.alerts));
    let remote = IpAddr::from(REMOTE);
    let named: Vec<_> = stopped
        .conns
        .iter()
        .filter(|c| c.orig().0 == remote || c.resp().0 == remote)
        .collect();
    assert!(
        named.is_empty(),
        "connections with the forged remote: {named:?}"
    );
}
