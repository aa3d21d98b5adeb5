//! Forged sources: frames the wan host sends with a LAN host's address as their source
//! (what anyone on the Internet side can send) count for nobody. The programs check the
//! way back to a source as the routing table has it; a packet that came in where its
//! source is not routed is counted in `packets_spoofed_total` and nowhere else.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    thread,
    time::Duration,
};

use tests::{
    http,
    lab::{self, Lab, run_in_ns, send_raw_frame},
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

/// A forger who knows an open connection's ports still adds nothing to it: the LAN
/// host's side of it arrives on the WAN link only forged.
#[test]
fn forged_packets_of_an_open_connection_count_for_nobody() {
    const REAL: u64 = 5;
    let lab = Lab::new();
    let agent = RulesAgent::start(
        &lab,
        &["--upload-threshold", "10KB", "--upload-min-packets", "1"],
    );
    let client = SocketAddr::from((lab::LAN_HOST_V4, 40_002));
    let server = SocketAddr::from((lab::WAN_HOST_V4, 40_003));
    // Bound for the test's length, so the datagrams meet no port-unreachable.
    let _listener = run_in_ns(&lab.wan, move || UdpSocket::bind(server).unwrap());
    run_in_ns(&lab.lan, move || {
        let socket = UdpSocket::bind(client).unwrap();
        for _ in 0..REAL {
            socket.send_to(&[7; 100], server).unwrap();
        }
    });
    // All of them: a poll may read the entry between two datagrams.
    http::eventually(
        "the LAN host's datagrams counted",
        Duration::from_secs(15),
        || {
            http::agent_sample(
                &lab.gw,
                "egress_monitor_packets_total{direction=\"outbound\"}",
            )
            .filter(|&n| n == REAL as f64)
        },
    );
    let outbound = "egress_monitor_bytes_total{direction=\"outbound\"}";
    let counted = http::agent_sample(&lab.gw, outbound).expect("/metrics answers");

    let (wan_mac, gw_mac) = lab.macs(&lab.wan_if);
    let forged = Frame::eth()
        .ipv4(lab::LAN_HOST_V4, lab::WAN_HOST_V4)
        .udp(client.port(), server.port())
        .payload_len(1000)
        .macs(wan_mac, gw_mac)
        .build();
    for _ in 0..FORGED {
        send_raw_frame(&lab.wan, &lab.wan_if, gw_mac, forged.clone());
    }
    let spoofed = http::eventually(
        "the forged packets counted as spoofed",
        Duration::from_secs(15),
        || {
            http::agent_sample(&lab.gw, "egress_monitor_packets_spoofed_total")
                .filter(|&n| n >= FORGED as f64)
        },
    );
    assert_eq!(spoofed, FORGED as f64, "every forged frame, nothing else");
    // Two polls more: anything counted would be judged by then.
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        http::agent_sample(&lab.gw, outbound),
        Some(counted),
        "the LAN host's upload as it sent it"
    );
    let stopped = agent.stop();
    assert!(stopped.alerts.is_empty(), "{}", listing(&stopped.alerts));
    let conn = stopped
        .conns
        .iter()
        .find(|c| c.orig().0 == client.ip() && c.resp().0 == server.ip())
        .expect("the LAN host's connection");
    assert_eq!(conn.u64("orig_pkts"), REAL, "{conn}");
}
