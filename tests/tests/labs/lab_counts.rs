//! The agent's conn-log records against ground truth, in a gateway lab.
//!
//! The agent watches gw's WAN-facing veth. Both ends of the WAN link have segmentation
//! offloads off, so their tx counters count wire packets: the upload direction (lan -> wan)
//! is gw's WAN veth tx, the download direction (wan -> lan) the wan host's veth tx. A
//! record must match those counter deltas exactly, and the generator's byte counts.
//!
//! IP bytes = tx bytes - (bytes per frame beyond IP) * tx packets. That per-frame figure is
//! probed rather than assumed to be the 14-byte Ethernet header: a veth whose peer has XDP
//! attached counts its tx frames without the header.
//!
//! Every case runs twice: with the default ingress hook (XDP, native mode) and with TC.

use std::net::{IpAddr, SocketAddr};

use serde_json::{Value, json};
use tests::{
    agent::{Agent, ConnRecord},
    lab::{self, Lab, WanCounters},
    packet::{Frame, tcp_flags},
    traffic::{self, TcpTransfer},
};

const TCP_PORT: u16 = 5001;
const UDP_PORT: u16 = 5353;
const MB: u64 = 1 << 20;

#[derive(Clone, Copy, Debug)]
enum Hook {
    /// Default: XDP ingress + TC egress.
    Xdp,
    Tc,
}

impl Hook {
    fn args(self) -> &'static [&'static str] {
        match self {
            Hook::Xdp => &["--ingress-hook", "xdp", "--xdp-mode", "native"],
            Hook::Tc => &["--ingress-hook", "tc"],
        }
    }
}

fn start_agent(lab: &Lab, hook: Hook) -> Agent {
    let mut args = vec![
        "--local-net",
        lab::LOCAL_NET_V4,
        "--local-net",
        lab::LOCAL_NET_V6,
        "--poll-interval",
        "200ms",
    ];
    args.extend(hook.args());
    Agent::start(&lab.gw, &lab.gw_wan_if, &args)
}

/// One direction as the WAN link's counters saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Wire {
    pkts: u64,
    ip_bytes: u64,
}

#[derive(Clone, Copy, Debug)]
struct Measured {
    /// lan -> wan: gw's WAN veth tx.
    up: Wire,
    /// wan -> lan: the wan host's veth tx.
    down: Wire,
    /// Bytes per frame the two tx counters count beyond the IP packet (probed).
    up_l2: u64,
    down_l2: u64,
    delta: WanCounters,
}

/// Runs `traffic` between two quiet points and returns the WAN link's counter deltas.
fn measure<T>(lab: &Lab, traffic: impl FnOnce() -> T) -> (T, Measured) {
    lab.wait_quiet();
    // Probed each time: attaching XDP to gw's veth changes what the wan host's counts.
    let up_l2 = lab.tx_l2_bytes(&lab.gw, &lab.gw_wan_if);
    let down_l2 = lab.tx_l2_bytes(&lab.wan, &lab.wan_if);
    lab.wait_quiet();
    let before = lab.wan_counters();
    let out = traffic();
    lab.wait_quiet();
    let delta = lab.wan_counters().since(before);
    let measured = Measured {
        up: Wire {
            pkts: delta.gw_wan.tx_packets,
            ip_bytes: delta.gw_wan.tx_ip_bytes(up_l2),
        },
        down: Wire {
            pkts: delta.wan_host.tx_packets,
            ip_bytes: delta.wan_host.tx_ip_bytes(down_l2),
        },
        up_l2,
        down_l2,
        delta,
    };
    // Harness sanity: the two ends of the link agree with each other.
    assert_eq!(
        (delta.gw_wan.tx_packets, delta.gw_wan.tx_bytes),
        (delta.wan_host.rx_packets, delta.wan_host.rx_bytes),
        "WAN link: gw tx != wan host rx: {delta:?}"
    );
    assert_eq!(
        (delta.wan_host.tx_packets, delta.wan_host.tx_bytes),
        (delta.gw_wan.rx_packets, delta.gw_wan.rx_bytes),
        "WAN link: wan host tx != gw rx: {delta:?}"
    );
    (out, measured)
}

/// What the record of one connection must say.
struct Expect {
    case: String,
    proto: &'static str,
    orig: (IpAddr, u16),
    resp: (IpAddr, u16),
    wire: Measured,
    orig_bytes: Option<u64>,
    resp_bytes: Option<u64>,
    conn_state: Option<&'static str>,
    missed_start: bool,
    iface: String,
    /// The generator's own report, for failure messages.
    generator: String,
}

fn check(records: &[ConnRecord], e: &Expect) {
    let all = || {
        records
            .iter()
            .map(|r| format!("  {r}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let found: Vec<&ConnRecord> = records
        .iter()
        .filter(|r| r.is_between(e.proto, e.orig, e.resp))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{}: expected exactly one {} record between {:?} and {:?}, found {}; generator: {}; \
         counters: {:?}\nall records:\n{}",
        e.case,
        e.proto,
        e.orig,
        e.resp,
        found.len(),
        e.generator,
        e.wire,
        all()
    );
    let r = found[0];

    let mut diffs = Vec::new();
    let mut field = |name: &str, expected: Value, why: &str| {
        let actual = r.0.get(name).cloned().unwrap_or(Value::Null);
        if actual != expected {
            diffs.push(format!(
                "  {name}: expected {expected} ({why}), got {actual}"
            ));
        }
    };
    field("proto", json!(e.proto), "generator");
    field(
        "orig_pkts",
        json!(e.wire.up.pkts),
        "gw wan veth tx_packets delta",
    );
    field(
        "orig_ip_bytes",
        json!(e.wire.up.ip_bytes),
        "gw wan veth tx_bytes delta - 14*tx_packets delta",
    );
    field(
        "resp_pkts",
        json!(e.wire.down.pkts),
        "wan host veth tx_packets delta",
    );
    field(
        "resp_ip_bytes",
        json!(e.wire.down.ip_bytes),
        "wan host veth tx_bytes delta - 14*tx_packets delta",
    );
    if let Some(bytes) = e.orig_bytes {
        field(
            "orig_bytes",
            json!(bytes),
            "payload the originator's generator sent",
        );
    }
    if let Some(bytes) = e.resp_bytes {
        field(
            "resp_bytes",
            json!(bytes),
            "payload the responder's generator sent",
        );
    }
    if let Some(state) = e.conn_state {
        field("conn_state", json!(state), "how the generator ended it");
    }
    field("local_orig", json!(true), "originator in --local-net");
    field("local_resp", json!(false), "responder outside --local-net");
    field(
        "missed_start",
        json!(e.missed_start),
        "connection opened before the agent?",
    );
    field("iface", json!(e.iface), "--iface");
    // Addresses are compared parsed, so any valid IPv6 spelling passes.
    let endpoint = |host: &str, port: &str| {
        let h =
            r.0.get(host)
                .and_then(Value::as_str)
                .and_then(|s| s.parse::<IpAddr>().ok());
        let p = r.0.get(port).and_then(Value::as_u64);
        (h, p)
    };
    let orig = endpoint("id.orig_h", "id.orig_p");
    let resp = endpoint("id.resp_h", "id.resp_p");
    if orig != (Some(e.orig.0), Some(u64::from(e.orig.1)))
        || resp != (Some(e.resp.0), Some(u64::from(e.resp.1)))
    {
        diffs.push(format!(
            "  orientation: expected orig {:?} resp {:?}, got orig {orig:?} resp {resp:?}",
            e.orig, e.resp
        ));
    }
    assert!(
        diffs.is_empty(),
        "{}: record differs from ground truth:\n{}\nrecord: {r}\ngenerator: {}\nWAN counter \
         deltas: {:?} (tx bytes beyond IP per frame, probed: gw wan {}, wan host {})",
        e.case,
        diffs.join("\n"),
        e.generator,
        e.wire.delta,
        e.wire.up_l2,
        e.wire.down_l2
    );
}

fn tcp_case(hook: Hook, name: &str, v6: bool, upload: bool, bytes: u64) {
    let case = format!("[{hook:?}] {name}");
    let lab = Lab::new();
    let agent = start_agent(&lab, hook);
    let (_, wan) = lab::hosts(v6);
    let server = SocketAddr::new(wan, TCP_PORT);
    let (t, wire) = measure(&lab, || {
        if upload {
            traffic::tcp_upload(&lab.lan, &lab.wan, server, bytes)
        } else {
            traffic::tcp_download(&lab.lan, &lab.wan, server, bytes)
        }
    });
    let (sent, received) = if upload {
        (t.client_sent, t.server_received)
    } else {
        (t.server_sent, t.client_received)
    };
    assert_eq!((sent, received), (bytes, bytes), "{case}: generator: {t:?}");
    check_closed_tcp(case, &lab, agent, &t, wire);
}

/// Stops the agent and checks its record of `t`, a transfer both ends closed with a FIN.
fn check_closed_tcp(case: String, lab: &Lab, agent: Agent, t: &TcpTransfer, wire: Measured) {
    let records = agent.stop();
    check(
        &records,
        &Expect {
            case,
            proto: "tcp",
            orig: (t.client.ip(), t.client.port()),
            resp: (t.server.ip(), t.server.port()),
            wire,
            orig_bytes: Some(t.client_sent),
            resp_bytes: Some(t.server_sent),
            conn_state: Some("SF"),
            missed_start: false,
            iface: lab.gw_wan_if.clone(),
            generator: format!("{t:?}"),
        },
    );
}

fn tcp_upload(hook: Hook) {
    tcp_case(hook, "tcp_upload", false, true, 20 * MB);
}

fn tcp_download(hook: Hook) {
    tcp_case(hook, "tcp_download", false, false, 20 * MB);
}

fn tcp6_upload(hook: Hook) {
    tcp_case(hook, "tcp6_upload", true, true, 10 * MB);
}

fn tcp6_download(hook: Hook) {
    tcp_case(hook, "tcp6_download", true, false, 10 * MB);
}

fn udp_exchange(hook: Hook) {
    let case = format!("[{hook:?}] udp_exchange");
    let lab = Lab::new();
    let agent = start_agent(&lab, hook);
    let server = SocketAddr::new(lab::WAN_HOST_V4.into(), UDP_PORT);
    let (u, wire) = measure(&lab, || {
        traffic::udp_exchange(&lab.lan, &lab.wan, server, 50, 1200)
    });
    assert_eq!(
        (u.requests, u.server_received, u.server_sent, u.responses),
        (50, 50, 50, 50),
        "{case}: generator: {u:?}"
    );
    let records = agent.stop();
    check(
        &records,
        &Expect {
            case,
            proto: "udp",
            orig: (u.client.ip(), u.client.port()),
            resp: (u.server.ip(), u.server.port()),
            wire,
            orig_bytes: Some(u.request_bytes()),
            resp_bytes: Some(u.response_bytes()),
            conn_state: Some("SF"),
            missed_start: false,
            iface: lab.gw_wan_if.clone(),
            generator: format!("{u:?}"),
        },
    );
}

fn icmp_echo(hook: Hook) {
    let case = format!("[{hook:?}] icmp_echo");
    let lab = Lab::new();
    let agent = start_agent(&lab, hook);
    let (p, wire) = measure(&lab, || {
        traffic::ping(&lab.lan, lab::WAN_HOST_V4.into(), 20, 1000)
    });
    assert_eq!(
        (p.transmitted, p.received),
        (20, 20),
        "{case}: generator: {p:?}"
    );
    let records = agent.stop();
    check(
        &records,
        &Expect {
            case,
            proto: "icmp",
            orig: (lab::LAN_HOST_V4.into(), 8),
            resp: (lab::WAN_HOST_V4.into(), 0),
            wire,
            orig_bytes: None,
            resp_bytes: None,
            conn_state: Some("SF"),
            missed_start: false,
            iface: lab.gw_wan_if.clone(),
            generator: format!("{p:?}"),
        },
    );
}

/// A connection established before the agent started: only what follows its start counts.
fn missed_start(hook: Hook) {
    let case = format!("[{hook:?}] missed_start");
    let lab = Lab::new();
    let server = SocketAddr::new(lab::WAN_HOST_V4.into(), TCP_PORT);
    let session = traffic::tcp_connect(&lab.lan, &lab.wan, server);
    let agent = start_agent(&lab, hook);
    let bytes = 2 * MB;
    let (t, wire) = measure(&lab, || session.upload(bytes));
    assert_eq!(
        (t.client_sent, t.server_received),
        (bytes, bytes),
        "{case}: generator: {t:?}"
    );
    let records = agent.stop();
    check(
        &records,
        &Expect {
            case,
            proto: "tcp",
            // The first packet the agent sees is the client's data.
            orig: (t.client.ip(), t.client.port()),
            resp: (t.server.ip(), t.server.port()),
            wire,
            orig_bytes: Some(t.client_sent),
            resp_bytes: Some(t.server_sent),
            conn_state: None,
            missed_start: true,
            iface: lab.gw_wan_if.clone(),
            generator: format!("{t:?}"),
        },
    );
}

/// A segment of the client's that reaches the server after both sides closed (a FIN
/// retransmitted late, overtaken by the final ACK) is answered with a RST by the server's
/// kernel: the RST is counted, and the connection stays `SF`, as Zeek keeps it.
fn rst_after_close(hook: Hook) {
    let case = format!("[{hook:?}] rst_after_close");
    let lab = Lab::new();
    let agent = start_agent(&lab, hook);
    let server = SocketAddr::new(lab::WAN_HOST_V4.into(), TCP_PORT);
    let bytes = MB;
    let rsts = || lab::Snmp::read(&lab.wan).get("Tcp", "OutRsts");
    let rsts_before = rsts();
    let (t, wire) = measure(&lab, || {
        let t = traffic::tcp_upload(&lab.lan, &lab.wan, server, bytes);
        let (lan_mac, gw_mac) = lab.macs(&lab.lan_if);
        let late = Frame::eth()
            .macs(lan_mac, gw_mac)
            .ipv4(lab::LAN_HOST_V4, lab::WAN_HOST_V4)
            .tcp(t.client.port(), TCP_PORT, tcp_flags::FIN | tcp_flags::ACK)
            .build();
        lab::send_raw_frame(&lab.lan, &lab.lan_if, gw_mac, late);
        t
    });
    assert_eq!(
        (t.client_sent, t.server_received),
        (bytes, bytes),
        "{case}: generator: {t:?}"
    );
    assert_eq!(rsts() - rsts_before, 1, "{case}: the server's RST");
    check_closed_tcp(case, &lab, agent, &t, wire);
}

macro_rules! per_hook {
    ($hook_mod:ident, $hook:expr, [$($case:ident),* $(,)?]) => {
        mod $hook_mod {
            $(
                #[test]
                fn $case() {
                    super::$case($hook);
                }
            )*
        }
    };
}

per_hook!(
    xdp,
    super::Hook::Xdp,
    [
        tcp_upload,
        tcp_download,
        tcp6_upload,
        tcp6_download,
        udp_exchange,
        icmp_echo,
        missed_start,
        rst_after_close
    ]
);
per_hook!(
    tc,
    super::Hook::Tc,
    [
        tcp_upload,
        tcp_download,
        tcp6_upload,
        tcp6_download,
        udp_exchange,
        icmp_echo,
        missed_start,
        rst_after_close
    ]
);

/// The harness alone, no agent: the lab forwards both families, its counters count exactly
/// the test's packets, and dropping it leaves no namespace behind.
#[test]
fn harness_lab_ground_truth() {
    let lab = Lab::new();
    let names = [lab.lan.clone(), lab.gw.clone(), lab.wan.clone()];

    for (v6, ip_header) in [(false, 20), (true, 40)] {
        let (_, wan) = lab::hosts(v6);
        let (p, wire) = measure(&lab, || traffic::ping(&lab.lan, wan, 10, 500));
        assert_eq!((p.transmitted, p.received), (10, 10), "ping {wan}: {p:?}");
        let echo = Wire {
            pkts: 10,
            ip_bytes: 10 * (ip_header + 8 + 500),
        };
        assert_eq!((wire.up, wire.down), (echo, echo), "ping {wan}: {wire:?}");
        // Without XDP on either end, both veths count the Ethernet header.
        assert_eq!((wire.up_l2, wire.down_l2), (14, 14), "{wire:?}");
    }

    let server = SocketAddr::new(lab::WAN_HOST_V4.into(), TCP_PORT);
    let (t, wire) = measure(&lab, || {
        traffic::tcp_upload(&lab.lan, &lab.wan, server, 3 * MB)
    });
    assert_eq!(
        (t.client_sent, t.server_received, t.server_sent),
        (3 * MB, 3 * MB, 0)
    );
    assert_eq!(t.client.ip(), IpAddr::from(lab::LAN_HOST_V4), "{t:?}");
    // Offloads off on the WAN link: no frame there is larger than the MTU.
    assert!(
        wire.up.ip_bytes <= wire.up.pkts * 1500 && wire.up.ip_bytes > 3 * MB,
        "upload on the wire: {wire:?}"
    );

    let (t, wire) = measure(&lab, || {
        traffic::tcp_download(
            &lab.lan,
            &lab.wan,
            SocketAddr::new(lab::WAN_HOST_V6.into(), TCP_PORT),
            MB,
        )
    });
    assert_eq!(
        (t.server_sent, t.client_received, t.client_sent),
        (MB, MB, 0)
    );
    assert!(
        wire.down.ip_bytes <= wire.down.pkts * 1500 && wire.down.ip_bytes > MB,
        "download on the wire: {wire:?}"
    );

    let server = SocketAddr::new(lab::WAN_HOST_V4.into(), UDP_PORT);
    let (u, wire) = measure(&lab, || {
        traffic::udp_exchange(&lab.lan, &lab.wan, server, 5, 100)
    });
    let datagrams = Wire {
        pkts: 5,
        ip_bytes: 5 * (20 + 8 + 100),
    };
    assert_eq!(
        (wire.up, wire.down),
        (datagrams, datagrams),
        "udp: {u:?} {wire:?}"
    );

    drop(lab);
    let listed = lab::ip(&["netns", "list"]);
    for name in names {
        assert!(
            !listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name.as_str())),
            "namespace {name} still exists after the lab was dropped:\n{listed}"
        );
    }
}
