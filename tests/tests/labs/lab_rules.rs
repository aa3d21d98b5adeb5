//! Every detection rule against real traffic in a gateway lab (docs/rules.md).
//!
//! The agent watches gw's WAN-facing veth with the lab's local nets, polls every 200 ms and
//! writes its alerts to a file that the test reads while it runs. Durations are scaled
//! down through the flags. A test waits for what must appear ("eventually within N s"),
//! and judges what must not appear on the complete alert log of a stopped agent (SIGTERM
//! drains it), after the connections concerned are finished or at least seen.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Shutdown, SocketAddr},
    thread,
    time::Duration,
};

use tests::{
    agent::ConnRecord,
    lab::{self, Lab},
    rules_lab::{
        self, Alert, HttpServer, NetnsHosts, RulesAgent, WAN_HOST2_V4, add_wan_address, connect,
        epoch_now, join, listen, listing, of, read_to_eof, send, spawn_discard,
    },
    traffic,
};

const LAN: IpAddr = IpAddr::V4(lab::LAN_HOST_V4);
const WAN: IpAddr = IpAddr::V4(lab::WAN_HOST_V4);
const WAN2: IpAddr = IpAddr::V4(WAN_HOST2_V4);

/// Generous bounds for a loaded 2-core machine.
const ALERT_LIMIT: Duration = Duration::from_secs(30);
/// A closed TCP connection is finished 5 s after its last packet, at the next poll.
const FINISH_LIMIT: Duration = Duration::from_secs(40);

fn ip_of(alert: &Alert, key: &str) -> IpAddr {
    alert.ip(key)
}

fn assert_src_dst(alert: &Alert, src: IpAddr, dst: IpAddr) {
    assert_eq!(ip_of(alert, "src"), src, "src of {alert}");
    assert_eq!(ip_of(alert, "dst"), dst, "dst of {alert}");
}

fn conn_of<'a>(
    conns: &'a [ConnRecord],
    proto: &str,
    client: SocketAddr,
    server: SocketAddr,
) -> Option<&'a ConnRecord> {
    conns.iter().find(|r| {
        r.is_between(
            proto,
            (client.ip(), client.port()),
            (server.ip(), server.port()),
        )
    })
}

fn conns_listing(conns: &[ConnRecord]) -> String {
    conns
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------
// LargeUpload

const UPLOAD: u64 = 20_000_000;
const UPLOAD_THRESHOLD: u64 = 5_000_000;
const UPLOAD_FLAGS: [&str; 4] = ["--upload-threshold", "5MB", "--upload-min-packets", "100"];

/// Waits for the LargeUpload alert of the connection `client` <-> `server` while its
/// sending socket is still open, then closes that socket. Returns the alert and the
/// time just before the close.
fn alert_then_close(
    agent: &RulesAgent,
    client: SocketAddr,
    server: SocketAddr,
    sender: std::net::TcpStream,
) -> (Alert, f64) {
    let alerts = agent.wait_alerts("LargeUpload", 1, ALERT_LIMIT, |a| {
        a.is_conn("tcp", client, server)
    });
    let close_ts = epoch_now();
    sender
        .shutdown(Shutdown::Write)
        .unwrap_or_else(|e| panic!("close the sender: {e}"));
    drop(sender);
    (alerts[0].clone(), close_ts)
}

fn check_large_upload(alert: &Alert, local_side: &str, close_ts: f64) {
    assert_src_dst(alert, LAN, WAN);
    assert_eq!(alert.str("local_side"), local_side, "{alert}");
    assert!(
        alert.bool("open"),
        "the alert came while the sender's socket was open, but says open=false: {alert}"
    );
    assert!(
        alert.f64("ts") < close_ts,
        "alert ts {} is not before the socket was closed at {close_ts}: {alert}",
        alert.f64("ts")
    );
    let bytes = alert.u64("bytes");
    // Payload on the wire: retransmissions may add to what the sender wrote.
    assert!(
        bytes > UPLOAD_THRESHOLD,
        "bytes {bytes} not above the {UPLOAD_THRESHOLD} B threshold: {alert}"
    );
    assert!(alert.u64("pkts") >= 100, "pkts below the minimum: {alert}");
    assert_eq!(alert.u64("threshold"), UPLOAD_THRESHOLD, "{alert}");
}

fn assert_one_large_upload(alerts: &[Alert], client: SocketAddr, server: SocketAddr) {
    let large = of(alerts, "LargeUpload");
    assert_eq!(
        large.len(),
        1,
        "one LargeUpload per connection, got:\n{}",
        listing(alerts)
    );
    assert!(large[0].is_conn("tcp", client, server), "{}", large[0]);
}

#[test]
fn large_upload_alerts_while_the_sender_keeps_the_socket_open() {
    let lab = Lab::new();
    let agent = RulesAgent::start(&lab, &UPLOAD_FLAGS);
    let server = SocketAddr::new(WAN, 5001);
    let discard = spawn_discard(listen(&lab.wan, server), 1);
    let mut sender = connect(&lab.lan, server);
    let client = sender.local_addr().expect("client address");
    send(&mut sender, UPLOAD);

    let (alert, close_ts) = alert_then_close(&agent, client, server, sender);
    assert_eq!(join(discard), vec![UPLOAD], "bytes the wan host received");
    check_large_upload(&alert, "orig", close_ts);
    assert_eq!(alert.orig(), (LAN, client.port()), "{alert}");

    agent.wait_finished("tcp", client, server, FINISH_LIMIT);
    let stopped = agent.stop();
    assert_one_large_upload(&stopped.alerts, client, server);
}

#[test]
fn large_upload_by_a_local_server_to_a_remote_client() {
    let lab = Lab::new();
    let agent = RulesAgent::start(&lab, &UPLOAD_FLAGS);
    // The wan host opens the connection; the lan host sends.
    let server = SocketAddr::new(LAN, 5001);
    let listener = listen(&lab.lan, server);
    let mut remote = connect(&lab.wan, server);
    let client = remote.local_addr().expect("client address");
    let reader = thread::spawn(move || {
        let n = read_to_eof(&mut remote);
        drop(remote);
        n
    });
    let mut sender = rules_lab::accept(&listener);
    send(&mut sender, UPLOAD);

    let (alert, close_ts) = alert_then_close(&agent, client, server, sender);
    assert_eq!(join(reader), UPLOAD, "bytes the wan host received");
    check_large_upload(&alert, "resp", close_ts);
    assert_eq!(alert.orig(), (WAN, client.port()), "{alert}");
    assert_eq!(alert.resp(), (LAN, server.port()), "{alert}");

    agent.wait_finished("tcp", client, server, FINISH_LIMIT);
    let stopped = agent.stop();
    assert_one_large_upload(&stopped.alerts, client, server);
}

// ---------------------------------------------------------------------------------------
// UploadRatio

#[test]
fn upload_ratio_alerts_for_an_http_post_not_for_a_get() {
    const BODY: u64 = 2_000_000;
    let lab = Lab::new();
    let agent = RulesAgent::start(&lab, &["--ratio-min-bytes", "0"]);
    let http = HttpServer::start(&lab.wan, SocketAddr::new(WAN, 80), 2);
    let server = http.addr;

    let post = rules_lab::http_request(&lab.lan, server, "POST", "/upload", BODY);
    assert_eq!(post.status, 200, "POST answered {post:?}");
    let get = rules_lab::http_request(&lab.lan, server, "GET", &format!("/bytes/{BODY}"), 0);
    assert_eq!(get.status, 200, "GET answered {get:?}");
    assert_eq!(get.body_len, BODY, "GET body");
    let served = http.join();
    let seen: Vec<(&str, u64, u64)> = served
        .iter()
        .map(|x| (x.method.as_str(), x.body_received, x.body_sent))
        .collect();
    assert_eq!(seen[0].0, "POST", "server saw {served:?}");
    assert_eq!(seen[0].1, BODY, "server saw {served:?}");
    assert_eq!(
        (seen[1].0, seen[1].2),
        ("GET", BODY),
        "server saw {served:?}"
    );

    // The rule judges a connection when it finishes (FIN both ways + 5 s).
    agent.wait_finished("tcp", post.client, server, FINISH_LIMIT);
    agent.wait_finished("tcp", get.client, server, FINISH_LIMIT);
    agent.wait_alerts("UploadRatio", 1, ALERT_LIMIT, |a| {
        a.is_conn("tcp", post.client, server)
    });
    let stopped = agent.stop();

    let ratio = of(&stopped.alerts, "UploadRatio");
    assert_eq!(
        ratio.len(),
        1,
        "one UploadRatio (the POST), none for the GET; got:\n{}",
        listing(&stopped.alerts)
    );
    let alert = ratio[0];
    assert_src_dst(alert, LAN, WAN);
    assert_eq!(alert.orig(), (LAN, post.client.port()), "{alert}");
    assert_eq!(alert.resp(), (WAN, 80), "{alert}");
    let (bytes, resp_bytes) = (alert.u64("bytes"), alert.u64("resp_bytes"));
    assert!(bytes >= BODY, "the POST sent the {BODY} B body: {alert}");
    assert!(bytes > resp_bytes, "bytes not above resp_bytes: {alert}");
    assert!(
        !stopped
            .alerts
            .iter()
            .any(|a| a.is_conn("tcp", get.client, server)),
        "an alert about the GET:\n{}",
        listing(&stopped.alerts)
    );
    assert_eq!(
        stopped.alerts.len(),
        1,
        "no other rule has cause to alert:\n{}",
        listing(&stopped.alerts)
    );
}

// ---------------------------------------------------------------------------------------
// LongConnection

/// The `n`th threshold for `--long-durations 2s,4s`: 2, 4, then every 4 s.
fn long_threshold(n: usize) -> f64 {
    match n {
        0 => 2.0,
        _ => 4.0 * n as f64,
    }
}

#[test]
fn long_connection_alerts_an_idle_connection_at_each_duration() {
    let lab = Lab::new();
    let agent = RulesAgent::start(&lab, &["--long-durations", "2s,4s"]);
    let session = traffic::tcp_connect(&lab.lan, &lab.wan, SocketAddr::new(WAN, 5003));
    let (client, server) = (session.client, session.server);

    // Idle from here on: 2 s, 4 s, 8 s.
    agent.wait_alerts("LongConnection", 3, ALERT_LIMIT, |a| {
        a.is_conn("tcp", client, server)
    });
    agent.wait_for("3 conn-long-log records", ALERT_LIMIT, |agent| {
        let n = agent
            .long_log()
            .iter()
            .filter(|r| {
                r.is_between(
                    "tcp",
                    (client.ip(), client.port()),
                    (server.ip(), server.port()),
                )
            })
            .count();
        (n >= 3).then_some(())
    });
    drop(session);
    let last = agent.wait_finished("tcp", client, server, FINISH_LIMIT);
    let stopped = agent.stop();

    let alerts: Vec<&Alert> = of(&stopped.alerts, "LongConnection")
        .into_iter()
        .filter(|a| a.is_conn("tcp", client, server))
        .collect();
    let thresholds: Vec<f64> = alerts.iter().map(|a| a.f64("threshold")).collect();
    let schedule: Vec<f64> = (0..thresholds.len()).map(long_threshold).collect();
    assert!(
        thresholds.len() >= 3 && thresholds == schedule,
        "thresholds {thresholds:?}, expected the schedule 2, 4, 8, 12, ... (at least three)\n{}",
        listing(&stopped.alerts)
    );
    let uid = last.str("uid");
    for alert in &alerts {
        assert_src_dst(alert, LAN, WAN);
        assert_eq!(alert.str("uid"), uid, "same connection: {alert}");
        assert_eq!(alert.orig(), (LAN, client.port()), "{alert}");
        let (age, threshold) = (alert.f64("age"), alert.f64("threshold"));
        assert!(
            age >= threshold,
            "age {age} below threshold {threshold}: {alert}"
        );
        assert_eq!(alert.f64("duration"), age, "duration is the age: {alert}");
        assert_eq!(alert.u64("orig_bytes"), 0, "idle connection: {alert}");
        // Only an active connection ages: none closed (FIN both ways, RST) and waiting out
        // the close delay.
        assert!(
            matches!(alert.str("conn_state"), "S1" | "S2" | "S3"),
            "LongConnection alert for a connection no longer active: {alert}\n{}",
            listing(&stopped.alerts)
        );
        assert_eq!(
            alert.f64("first_seen"),
            last.f64("ts"),
            "first packet: {alert}"
        );
    }

    let records: Vec<&ConnRecord> = stopped
        .long_log
        .iter()
        .filter(|r| r.is_between("tcp", (LAN, client.port()), (WAN, server.port())))
        .collect();
    assert_eq!(
        records.len(),
        alerts.len(),
        "one conn-long-log record per LongConnection alert; records:\n{}",
        records
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    for (record, alert) in records.iter().zip(&alerts) {
        assert_eq!(record.str("uid"), uid, "{record}");
        assert_eq!(
            record.f64("duration"),
            alert.f64("age"),
            "{record} vs {alert}"
        );
        assert_eq!(record.f64("ts"), last.f64("ts"), "first packet: {record}");
    }
}

// ---------------------------------------------------------------------------------------
// RestrictedOutbound

#[test]
fn restricted_outbound_icmp_tcp_udp_allowed_service_and_suppressed_repeat() {
    let lab = Lab::new();
    let agent = RulesAgent::start(
        &lab,
        &[
            "--restricted-net",
            "198.18.1.2/32",
            "--allow-service",
            "203.0.113.2/32,7000/udp",
            "--restricted-suppress",
            "60s",
        ],
    );
    let pinged = traffic::ping(&lab.lan, WAN, 3, 56);
    assert_eq!(pinged.received, 3, "ping: {pinged:?}");
    let tcp = traffic::tcp_upload(&lab.lan, &lab.wan, SocketAddr::new(WAN, 5001), 1000);
    let udp = traffic::udp_exchange(&lab.lan, &lab.wan, SocketAddr::new(WAN, 5353), 3, 100);
    let allowed = traffic::udp_exchange(&lab.lan, &lab.wan, SocketAddr::new(WAN, 7000), 3, 100);
    assert_eq!(allowed.responses, 3, "allowed service: {allowed:?}");

    let first = agent.wait_alerts("RestrictedOutbound", 3, ALERT_LIMIT, |_| true);
    let tcp_alert = first
        .iter()
        .find(|a| a.is_conn("tcp", tcp.client, tcp.server))
        .unwrap_or_else(|| panic!("no alert for the TCP connection:\n{}", listing(&first)));
    let tcp_alert_ts = tcp_alert.f64("ts");

    // The same destination and port again, from a new source port, inside the suppress
    // time: no new alert.
    let repeat_start = epoch_now();
    let repeat = traffic::tcp_upload(&lab.lan, &lab.wan, tcp.server, 1000);
    assert_ne!(
        repeat.client, tcp.client,
        "the repeat needs a new source port"
    );
    agent.wait_finished("tcp", repeat.client, repeat.server, FINISH_LIMIT);
    assert!(
        repeat_start - tcp_alert_ts < 50.0,
        "test too slow: the repeat started {} s after the first alert, not inside the \
         60 s suppress time",
        repeat_start - tcp_alert_ts
    );
    let stopped = agent.stop();
    let all = &stopped.alerts;
    let restricted = of(all, "RestrictedOutbound");

    let protos: Vec<&str> = {
        let mut p: Vec<&str> = restricted.iter().map(|a| a.str("proto")).collect();
        p.sort();
        p
    };
    assert_eq!(
        protos,
        ["icmp", "tcp", "udp"],
        "exactly one alert each for ICMP, TCP and UDP, none for the allowed service or the \
         repeat:\n{}",
        listing(all)
    );
    for alert in &restricted {
        assert_src_dst(alert, LAN, WAN);
        assert_eq!(alert.ip("id.orig_h"), LAN, "{alert}");
        assert_eq!(alert.ip("id.resp_h"), WAN, "{alert}");
        assert_eq!(alert.str("restricted_net"), "198.18.1.2/32", "{alert}");
    }
    assert!(
        restricted
            .iter()
            .any(|a| a.is_conn("tcp", tcp.client, tcp.server) && a.resp().1 == 5001),
        "TCP alert for the first connection to port 5001:\n{}",
        listing(all)
    );
    assert!(
        restricted
            .iter()
            .any(|a| a.is_conn("udp", udp.client, udp.server) && a.resp().1 == 5353),
        "UDP alert for port 5353:\n{}",
        listing(all)
    );
    for (what, client, server, proto) in [
        ("the allowed service", allowed.client, allowed.server, "udp"),
        ("the repeat", repeat.client, repeat.server, "tcp"),
    ] {
        assert!(
            !all.iter().any(|a| a.is_conn(proto, client, server)),
            "an alert about {what} ({proto} {client} -> {server}):\n{}",
            listing(all)
        );
        // Silent, but seen: the agent has the connection's record.
        assert!(
            conn_of(&stopped.conns, proto, client, server).is_some(),
            "the agent never saw {what} ({proto} {client} -> {server}); conn log:\n{}",
            conns_listing(&stopped.conns)
        );
    }
}

#[test]
fn restricted_outbound_host_name_allowlist_keeps_a_connection_silent() {
    const NAME: &str = "backup.rules-lab.test";
    let lab = Lab::new();
    add_wan_address(&lab, WAN_HOST2_V4);
    // Only the agent's namespace knows the name; dropped after the agent.
    let _hosts = NetnsHosts::write(&lab.gw, &[(WAN, NAME)]);
    let agent = RulesAgent::start(
        &lab,
        &["--restricted-net", "198.18.1.2/32", "--allow-dst", NAME],
    );
    let named = traffic::tcp_upload(&lab.lan, &lab.wan, SocketAddr::new(WAN, 5004), 1000);
    let other = traffic::tcp_upload(&lab.lan, &lab.wan, SocketAddr::new(WAN2, 5004), 1000);

    agent.wait_alerts("RestrictedOutbound", 1, ALERT_LIMIT, |a| {
        a.is_conn("tcp", other.client, other.server)
    });
    agent.wait_finished("tcp", named.client, named.server, FINISH_LIMIT);
    agent.wait_finished("tcp", other.client, other.server, FINISH_LIMIT);
    let stopped = agent.stop();

    let restricted = of(&stopped.alerts, "RestrictedOutbound");
    assert_eq!(
        restricted.len(),
        1,
        "one alert, for {WAN2} (no name); none for {WAN} ({NAME} via /etc/netns/{}/hosts):\n{}",
        lab.gw,
        listing(&stopped.alerts)
    );
    assert_src_dst(restricted[0], LAN, WAN2);
    assert!(
        !stopped
            .alerts
            .iter()
            .any(|a| a.is_conn("tcp", named.client, named.server)),
        "an alert about the connection to {NAME}:\n{}",
        listing(&stopped.alerts)
    );
}

// ---------------------------------------------------------------------------------------
// WindowExceeded and DataLeak

const WINDOW_SECS: f64 = 2.0;
const WINDOW_THRESHOLD: u64 = 100_000;
const LEAK_THRESHOLD: u64 = 500_000;
const BURST: u64 = 300_000;
const BURSTS: usize = 5;

#[test]
fn window_exceeded_and_data_leak_on_short_windows_excluded_destination_silent() {
    let lab = Lab::new();
    add_wan_address(&lab, WAN_HOST2_V4);
    let agent = RulesAgent::start(
        &lab,
        &[
            "--window",
            "2s",
            "--window-threshold",
            "100KB",
            "--leak-period",
            "60s",
            "--leak-threshold",
            "500KB",
            "--exclude-dst",
            "203.0.113.3/32",
            // Short, so the DataLeak rule's own once-per-period is what is tested.
            "--suppress",
            "1s",
        ],
    );
    let counted_server = SocketAddr::new(WAN, 5002);
    let excluded_server = SocketAddr::new(WAN2, 5002);
    let counted_sink = spawn_discard(listen(&lab.wan, counted_server), 1);
    let excluded_sink = spawn_discard(listen(&lab.wan, excluded_server), 1);
    let mut counted = connect(&lab.lan, counted_server);
    let mut excluded = connect(&lab.lan, excluded_server);
    let counted_client = counted.local_addr().expect("client address");
    let excluded_client = excluded.local_addr().expect("client address");

    // The same 300 KB to each destination early in each of 5 windows.
    let mut windows = BTreeSet::new();
    for _ in 0..BURSTS {
        rules_lab::sleep_into_next_window(WINDOW_SECS, 0.3);
        send(&mut counted, BURST);
        send(&mut excluded, BURST);
        windows.insert((epoch_now() / WINDOW_SECS).floor() as u64);
    }
    assert_eq!(
        windows.len(),
        BURSTS,
        "test thread too slow: two bursts in one window"
    );

    agent.wait_alerts("WindowExceeded", BURSTS, ALERT_LIMIT, |a| {
        a.ip("src") == LAN && a.ip("dst") == WAN
    });
    for stream in [counted, excluded] {
        stream
            .shutdown(Shutdown::Write)
            .unwrap_or_else(|e| panic!("close a sender: {e}"));
    }
    let total = BURST * BURSTS as u64;
    assert_eq!(
        join(counted_sink),
        vec![total],
        "received from the counted sender"
    );
    assert_eq!(
        join(excluded_sink),
        vec![total],
        "received from the excluded sender"
    );
    let stopped = agent.stop();
    let all = &stopped.alerts;

    let mut exceeded = of(all, "WindowExceeded");
    exceeded.sort_by(|a, b| a.f64("ts").total_cmp(&b.f64("ts")));
    assert_eq!(
        exceeded.len(),
        BURSTS,
        "one WindowExceeded per window with a burst:\n{}",
        listing(all)
    );
    let expected_starts: Vec<f64> = windows.iter().map(|&w| w as f64 * WINDOW_SECS).collect();
    let starts: Vec<f64> = exceeded.iter().map(|a| a.f64("window_start")).collect();
    assert_eq!(
        starts,
        expected_starts,
        "window_start: aligned multiples of 2 s, distinct, the windows of the bursts:\n{}",
        listing(all)
    );
    for alert in &exceeded {
        assert_src_dst(alert, LAN, WAN);
        let start = alert.f64("window_start");
        assert_eq!(
            start % WINDOW_SECS,
            0.0,
            "window_start not aligned: {alert}"
        );
        assert_eq!(alert.f64("window"), WINDOW_SECS, "{alert}");
        assert_eq!(alert.str("group"), "pair", "{alert}");
        assert_eq!(alert.u64("threshold"), WINDOW_THRESHOLD, "{alert}");
        assert!(alert.u64("bytes") > WINDOW_THRESHOLD, "{alert}");
    }

    let leaks = of(all, "DataLeak");
    assert_eq!(
        leaks.len(),
        1,
        "one DataLeak once the exceeded windows sum past 500 KB, no second one within the \
         60 s period:\n{}",
        listing(all)
    );
    let leak = leaks[0];
    assert_src_dst(leak, LAN, WAN);
    assert!(leak.u64("bytes") > LEAK_THRESHOLD, "{leak}");
    assert_eq!(leak.u64("threshold"), LEAK_THRESHOLD, "{leak}");
    assert_eq!(leak.f64("period"), 60.0, "{leak}");
    assert!(
        leak.u64("windows") >= 2,
        "one 300 KB window is not enough: {leak}"
    );
    assert!(
        leak.f64("ts") >= exceeded[1].f64("ts"),
        "DataLeak before the second exceeded window:\n{}",
        listing(all)
    );

    assert!(
        !all.iter().any(|a| a.has("dst") && a.ip("dst") == WAN2),
        "alerts about the excluded destination {WAN2}:\n{}",
        listing(all)
    );
    let excluded_conn = conn_of(&stopped.conns, "tcp", excluded_client, excluded_server)
        .unwrap_or_else(|| {
            panic!(
                "the agent never saw the excluded connection; conn log:\n{}",
                conns_listing(&stopped.conns)
            )
        });
    assert!(
        excluded_conn.u64("orig_bytes") >= total,
        "the excluded traffic was seen: {excluded_conn}"
    );
    assert!(
        conn_of(&stopped.conns, "tcp", counted_client, counted_server).is_some(),
        "no record of the counted connection"
    );
}
