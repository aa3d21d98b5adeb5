//! Real DNS tunnels in a gateway lab (DnsTunnel): iodine (NULL and TXT
//! queries, and its raw UDP mode) and dns2tcp push a bounded upload of random bytes from
//! the lan host through dnsmasq on the wan host, which delegates the tunnel zone to the
//! tunnel server on a second wan address. The agent on gw's WAN-facing veth must raise
//! DnsTunnel naming the client and the registered domain before the upload finishes.
//! Ordinary lookups (through a listed site resolver too) stay silent; an NXDOMAIN burst
//! alerts; a flood of DNS messages is counted in dns_events_lost_total, not fatal.

use std::{
    io::Write,
    net::{IpAddr, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use tests::{
    dns_lab::{TYPE_A, TYPE_AAAA, add_wan_address, require, resolve, start_dnsmasq},
    http,
    lab::{self, Lab, run_in_ns},
    rules_lab::{Alert, RulesAgent, Scratch, epoch_now, join, listen, listing, spawn_discard},
};

const LAN: IpAddr = IpAddr::V4(lab::LAN_HOST_V4);
/// The tunnel server's address on the wan host.
const TUNNEL_SERVER: &str = "203.0.113.20";
const ZONE: &str = "t.tunnel.test";
const DOMAIN: &str = "tunnel.test";
const UPLOAD: usize = 1_000_000;
/// Above what the tunnel's handshake sends: only the upload itself crosses it.
const THRESHOLD: &str = "50KB";
const TUNNEL_UP_LIMIT: Duration = Duration::from_secs(30);
const UPLOAD_LIMIT: Duration = Duration::from_secs(120);

/// Bytes that do not compress (iodine compresses what it carries).
fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// Waits until `dev` in `ns` has an IPv4 address.
fn wait_for_interface(ns: &str, dev: &str, limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        let out = std::process::Command::new("ip")
            .args(["-n", ns, "-4", "-o", "addr", "show", "dev", dev])
            .output()
            .expect("run ip");
        if String::from_utf8_lossy(&out.stdout).contains("inet ") {
            return;
        }
        thread::sleep(Duration::from_millis(200));
    }
    panic!("{dev} in {ns} got no address within {limit:?}: the tunnel did not come up");
}

/// Sends `UPLOAD` random bytes from the lan host to `server` (in the wan namespace) and
/// returns when the server has them all: the time the upload finished.
fn upload(lab: &Lab, server: SocketAddr) -> f64 {
    upload_via(lab, server, server)
}

/// The same, connecting to `via` in the lan namespace (a tunnel client's local port);
/// retries while the tunnel client is not listening yet.
fn upload_via(lab: &Lab, server: SocketAddr, via: SocketAddr) -> f64 {
    let discard = spawn_discard(listen(&lab.wan, server), 1);
    let start = Instant::now();
    let mut stream = loop {
        let attempt = run_in_ns(&lab.lan, move || {
            TcpStream::connect_timeout(&via, Duration::from_secs(20))
        });
        match attempt {
            Ok(stream) => break stream,
            Err(e) if start.elapsed() > TUNNEL_UP_LIMIT => {
                panic!("connect through the tunnel to {via}: {e}")
            }
            Err(_) => thread::sleep(Duration::from_millis(200)),
        }
    };
    stream
        .set_write_timeout(Some(UPLOAD_LIMIT))
        .expect("write timeout");
    stream
        .write_all(&random_bytes(UPLOAD, 0x5eed))
        .expect("upload through the tunnel");
    stream
        .shutdown(std::net::Shutdown::Write)
        .expect("close the upload");
    assert_eq!(
        join(discard),
        vec![UPLOAD as u64],
        "bytes through the tunnel"
    );
    epoch_now()
}

fn tunnel_alert(agent: &RulesAgent, reason: &'static str) -> Alert {
    agent
        .wait_alerts("DnsTunnel", 1, UPLOAD_LIMIT, |a| {
            a.str("reason") == reason && a.ip("src") == LAN
        })
        .remove(0)
}

fn check_information_alert(alert: &Alert, upload_done: f64) {
    assert_eq!(alert.str("domain"), DOMAIN, "{alert}");
    assert_eq!(alert.str("client"), LAN.to_string(), "{alert}");
    assert!(alert.u64("info_bytes") >= 50_000, "{alert}");
    assert!(
        alert.u64("unique_names") > 0 && alert.u64("queries") >= alert.u64("unique_names"),
        "{alert}"
    );
    assert!(
        alert.f64("ts") < upload_done,
        "the alert ({}) came after the upload finished ({upload_done}): {alert}",
        alert.f64("ts")
    );
}

/// The tunnel server (`server_cmd`) on the tunnel address, dnsmasq delegating the tunnel
/// zones to it, the agent.
fn tunnel_lab(server_cmd: &[&str]) -> (Lab, RulesAgent) {
    let lab = Lab::new();
    let server: IpAddr = TUNNEL_SERVER.parse().expect("addr");
    add_wan_address(&lab, server);
    lab.spawn_in(&lab.wan, server_cmd);
    start_dnsmasq(&lab, &["--server=/tunnel.test/203.0.113.20"]);
    let agent = RulesAgent::start(&lab, &["--dns-tunnel-threshold", THRESHOLD]);
    (lab, agent)
}

fn iodine_lab() -> (Lab, RulesAgent) {
    require("iodine");
    require("iodined");
    tunnel_lab(&[
        "iodined",
        "-f",
        "-c",
        "-P",
        "egress-test",
        "-l",
        TUNNEL_SERVER,
        "-p",
        "53",
        "198.19.53.1/27",
        ZONE,
    ])
}

fn iodine_through_the_resolver(query_type: &str) {
    let (lab, agent) = iodine_lab();
    lab.spawn_in(
        &lab.lan,
        &[
            "iodine",
            "-f",
            "-r",
            "-P",
            "egress-test",
            "-T",
            query_type,
            "203.0.113.2",
            ZONE,
        ],
    );
    wait_for_interface(&lab.lan, "dns0", TUNNEL_UP_LIMIT);
    let done = upload(&lab, "198.19.53.1:5002".parse().expect("addr"));
    let alert = tunnel_alert(&agent, "information");
    check_information_alert(&alert, done);
    let stopped = agent.stop();
    assert!(
        stopped
            .alerts
            .iter()
            .filter(|a| a.note() == "DnsTunnel")
            .all(|a| a.str("domain") == DOMAIN),
        "{}",
        listing(&stopped.alerts)
    );
}

#[test]
fn iodine_null_queries_through_a_resolver() {
    iodine_through_the_resolver("NULL");
}

#[test]
fn iodine_txt_queries_through_a_resolver() {
    iodine_through_the_resolver("TXT");
}

#[test]
fn iodine_raw_mode_is_non_dns_on_port_53() {
    let (lab, agent) = iodine_lab();
    // Without -r iodine switches to raw UDP to the server's port 53 once it can.
    lab.spawn_in(
        &lab.lan,
        &["iodine", "-f", "-P", "egress-test", "203.0.113.2", ZONE],
    );
    wait_for_interface(&lab.lan, "dns0", TUNNEL_UP_LIMIT);
    let done = upload(&lab, "198.19.53.1:5002".parse().expect("addr"));
    let alert = tunnel_alert(&agent, "non_dns");
    assert_eq!(
        alert.ip("dst"),
        TUNNEL_SERVER.parse::<IpAddr>().expect("addr"),
        "{alert}"
    );
    assert!(alert.f64("ts") < done, "{alert}");
}

#[test]
fn dns2tcp_through_a_resolver() {
    require("dns2tcpd");
    require("dns2tcpc");
    let scratch = Scratch::new("dns2tcp");
    let conf = scratch.path("dns2tcpd.conf");
    std::fs::write(
        &conf,
        format!(
            "listen = {TUNNEL_SERVER}\nport = 53\nuser = nobody\nchroot = {}\nkey = egress-test\n\
             domain = d.tunnel.test\nresources = upload:{TUNNEL_SERVER}:5003\n",
            scratch.path("").display()
        ),
    )
    .expect("write dns2tcpd.conf");
    let conf = conf.to_str().expect("UTF-8").to_owned();
    // dns2tcpd 0.5.2 spins a CPU even when idle: niced, and only for this test.
    let (lab, agent) = tunnel_lab(&["nice", "-n", "19", "dns2tcpd", "-F", "-f", &conf]);
    lab.spawn_in(
        &lab.lan,
        &[
            "dns2tcpc",
            "-z",
            "d.tunnel.test",
            "-k",
            "egress-test",
            "-r",
            "upload",
            "-l",
            "4444",
            "203.0.113.2",
        ],
    );
    let server: SocketAddr = format!("{TUNNEL_SERVER}:5003").parse().expect("addr");
    let done = upload_via(&lab, server, "127.0.0.1:4444".parse().expect("addr"));
    let alert = tunnel_alert(&agent, "information");
    check_information_alert(&alert, done);
}

// ---------------------------------------------------------------------------------------
// What must stay silent, NXDOMAIN bursts, and a flood of DNS messages.

/// Ordinary names: dozens of registered domains, a few hosts each, some CNAMEs (to host
/// records) and both families.
const BASELINE_ANSWERS: [&str; 8] = [
    "--address=/example/203.0.113.30",
    "--address=/example/2001:db8:2::30",
    "--host-record=edge.cdnhost.test,203.0.113.31,2001:db8:2::31",
    "--cname=shop.store.test,edge.cdnhost.test",
    "--cname=www.store.test,edge.cdnhost.test",
    "--cname=img.media.test,edge.cdnhost.test",
    "--cname=video.media.test,edge.cdnhost.test",
    "--address=/nx.test/",
];

/// The site's resolver: a second address of the lan host, where a dnsmasq forwards to the
/// wan resolver from that address.
const SITE_RESOLVER: &str = "198.18.1.53";

fn baseline_names() -> Vec<String> {
    let hosts = [
        "www", "api", "cdn", "img", "static", "mail", "login", "news", "a1", "b2",
    ];
    let mut names: Vec<String> = (0..30)
        .flat_map(|d| hosts.iter().map(move |h| format!("{h}.site{d}.example")))
        .collect();
    names.extend(
        [
            "shop.store.test",
            "www.store.test",
            "img.media.test",
            "video.media.test",
        ]
        .map(String::from),
    );
    names
}

#[test]
fn ordinary_lookups_stay_silent() {
    let lab = Lab::new();
    let wan_resolver = start_dnsmasq(&lab, &BASELINE_ANSWERS);
    tests::lab::ip(&[
        "-n",
        &lab.lan,
        "addr",
        "add",
        &format!("{SITE_RESOLVER}/32"),
        "dev",
        &lab.lan_if,
    ]);
    lab.spawn_in(
        &lab.lan,
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            "--listen-address=198.18.1.53",
            "--pid-file=",
            "--user=root",
            "--cache-size=0",
            "--server=203.0.113.2@198.18.1.53",
        ],
    );
    let site: SocketAddr = format!("{SITE_RESOLVER}:53").parse().expect("addr");
    let agent = RulesAgent::start(&lab, &["--dns-resolver", "198.18.1.53/32"]);
    let names = baseline_names();
    let mut lookups = 0;
    // A few thousand lookups with repeats: every name through both resolvers, A and
    // AAAA, the popular ones again and again.
    for round in 0..6 {
        for (i, name) in names.iter().enumerate() {
            let server = if (i + round) % 2 == 0 {
                wan_resolver
            } else {
                site
            };
            let qtype = if (i + round) % 3 == 0 {
                TYPE_AAAA
            } else {
                TYPE_A
            };
            let answer = resolve(&lab.lan, server, name, qtype, false);
            assert_eq!(answer.rcode, 0, "{name} via {server}: {answer:?}");
            assert!(!answer.addrs.is_empty(), "{name} via {server}: {answer:?}");
            lookups += 1;
            if i % 10 == 0 {
                for popular in &names[..5] {
                    resolve(&lab.lan, server, popular, TYPE_A, false);
                    lookups += 1;
                }
            }
        }
    }
    assert!(lookups > 2000, "{lookups} lookups");
    // Every message seen: two polls after the last lookup.
    thread::sleep(Duration::from_millis(500));
    let stopped = agent.stop();
    let tunnel: Vec<&Alert> = stopped
        .alerts
        .iter()
        .filter(|a| a.note() == "DnsTunnel")
        .collect();
    assert!(
        tunnel.is_empty(),
        "{lookups} ordinary lookups alerted:\n{}",
        listing(&stopped.alerts)
    );
}

#[test]
fn an_nxdomain_burst_alerts() {
    let lab = Lab::new();
    let resolver = start_dnsmasq(&lab, &BASELINE_ANSWERS);
    let agent = RulesAgent::start(&lab, &["--dns-nxdomain-threshold", "50"]);
    for i in 0..80 {
        let answer = resolve(
            &lab.lan,
            resolver,
            &format!("host{i}.nx.test"),
            TYPE_A,
            false,
        );
        assert_eq!(answer.rcode, 3, "host{i}.nx.test: {answer:?}");
    }
    let alert = tunnel_alert(&agent, "nxdomain");
    assert_eq!(alert.str("domain"), "nx.test", "{alert}");
    assert!(alert.u64("nxdomain") >= 50, "{alert}");
    assert_eq!(alert.u64("threshold"), 50, "{alert}");
}

/// A bounded flood of DNS responses (from port 53 of the wan host to the lan host) while
/// the agent is stopped (SIGSTOP), so the ring buffer must overflow: the agent carries on
/// after SIGCONT, and every message the interface received was either read or counted in
/// dns_events_lost_total.
#[test]
fn a_flood_of_responses_is_counted_not_fatal() {
    const FLOOD: u64 = 5_000;
    let lab = Lab::new();
    let agent = RulesAgent::start(&lab, &[]);
    let target: SocketAddr = format!("{}:40000", lab::LAN_HOST_V4).parse().expect("addr");
    let payload = random_bytes(1200, 7);
    let before = lab::counters(&lab.gw, &lab.gw_wan_if);
    agent.signal(libc::SIGSTOP);
    let sent = run_in_ns(&lab.wan, move || {
        let sock = std::net::UdpSocket::bind("203.0.113.2:53").expect("bind port 53");
        (0..FLOOD)
            .filter(|_| sock.send_to(&payload, target).is_ok())
            .count() as u64
    });
    thread::sleep(Duration::from_millis(200));
    let received = lab::counters(&lab.gw, &lab.gw_wan_if)
        .since(before)
        .rx_packets;
    agent.signal(libc::SIGCONT);
    assert!(
        received > FLOOD / 2,
        "gw received {received} of {sent} sent"
    );
    let metric = |text: &str, name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    };
    let lost_name = "egress_monitor_dns_events_lost_total";
    let read_name = "egress_monitor_dns_messages_total{type=\"malformed\"}";
    let (lost, read) = http::eventually("metrics after the flood", Duration::from_secs(20), || {
        let text = http::get(&lab.gw, "127.0.0.1:9877", "/metrics")?;
        let (lost, read) = (metric(&text, lost_name), metric(&text, read_name));
        (lost + read == received).then_some((lost, read))
    });
    assert!(
        lost >= received - 1000,
        "lost {lost} of {received}: the ring holds fewer"
    );
    assert!(read > 0, "nothing read after SIGCONT");
    eprintln!("flood: {received} responses received by gw, {read} read, {lost} lost");
    agent.stop();
}
