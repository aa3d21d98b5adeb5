//! DNS in a gateway lab: dnsmasq answers on the wan host, the lan host
//! resolves a name and then uploads to the address it got; the agent on gw's WAN-facing
//! veth must name the remote host in the alert and in the conn-log record, and log the
//! transaction in `--dns-log`. Over UDP and TCP, through a CNAME, and over IPv6. And a
//! name allowlist (`*.example.test`) follows what the restricted client itself resolved,
//! and a restarted agent (`--pin-path`) reads the ring buffer its predecessor pinned.

use std::{
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, UdpSocket},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use tests::{
    agent::Agent,
    dns_lab::{self, TYPE_A, TYPE_AAAA, add_wan_address, resolve, start_dnsmasq},
    http,
    lab::{self, Lab, run_in_ns},
    rules_lab::{
        RulesAgent, Scratch, connect, join, listen, listing, read_json_lines, send, spawn_discard,
        upload_to_each,
    },
};

const ALERT_LIMIT: Duration = Duration::from_secs(30);
const FINISH_LIMIT: Duration = Duration::from_secs(40);
const UPLOAD: u64 = 3_000_000;

const FILES_V4: &str = "203.0.113.10";
const FILES_V6: &str = "2001:db8:2::10";
const EDGE_V4: &str = "203.0.113.11";

/// dnsmasq's static answers: a whole zone for both families, and a CNAME to a host record
/// (dnsmasq answers CNAMEs only for local targets).
const ANSWERS: [&str; 4] = [
    "--address=/example.test/203.0.113.10",
    "--address=/example.test/2001:db8:2::10",
    "--host-record=edge.cdn.test,203.0.113.11,2001:db8:2::11",
    "--cname=share.corp.test,edge.cdn.test",
];

struct Case {
    /// The resolver's address family, and the answer's.
    v6: bool,
    tcp: bool,
    name: &'static str,
    target: &'static str,
}

fn resolve_then_upload(case: Case) {
    let lab = Lab::new();
    let resolver_v4 = start_dnsmasq(&lab, &ANSWERS);
    let target: IpAddr = case.target.parse().expect("address");
    add_wan_address(&lab, target);
    let scratch = Scratch::new("dns");
    let dns_log = scratch.path("dns.jsonl");
    let dns_arg = dns_log.to_str().expect("UTF-8").to_owned();
    let agent = RulesAgent::start(
        &lab,
        &[
            "--upload-threshold",
            "1MB",
            "--upload-min-packets",
            "100",
            "--dns-log",
            &dns_arg,
        ],
    );
    let (resolver, qtype) = if case.v6 {
        (dns_lab::resolver_v6(), TYPE_AAAA)
    } else {
        (resolver_v4, TYPE_A)
    };
    let answer = resolve(&lab.lan, resolver, case.name, qtype, case.tcp);
    assert_eq!(answer.rcode, 0, "{} answered {answer:?}", case.name);
    assert_eq!(answer.addrs, vec![target], "{} resolved", case.name);

    let server = SocketAddr::new(target, 5001);
    let discard = spawn_discard(listen(&lab.wan, server), 1);
    let mut sender = connect(&lab.lan, server);
    let client = sender.local_addr().expect("client address");
    send(&mut sender, UPLOAD);
    let alerts = agent.wait_alerts("LargeUpload", 1, ALERT_LIMIT, |a| {
        a.is_conn("tcp", client, server)
    });
    sender.shutdown(Shutdown::Write).expect("close the sender");
    drop(sender);
    assert_eq!(join(discard), vec![UPLOAD], "bytes the wan host received");
    assert_eq!(
        alerts[0].str("remote_fqdn"),
        case.name,
        "the alert names the host: {}",
        alerts[0]
    );
    let record = agent.wait_finished("tcp", client, server, FINISH_LIMIT);
    assert_eq!(record.str("remote_fqdn"), case.name, "conn record {record}");

    let stopped = agent.stop();
    let lan: IpAddr = if case.v6 {
        lab::LAN_HOST_V6.into()
    } else {
        lab::LAN_HOST_V4.into()
    };
    let logged = read_json_lines(&dns_log);
    let tx = logged
        .iter()
        .find(|r| r["query"] == case.name)
        .unwrap_or_else(|| panic!("no dns.log record for {}: {logged:?}", case.name));
    assert_eq!(tx["id.orig_h"], lan.to_string(), "{tx}");
    assert_eq!(tx["id.resp_h"], resolver.ip().to_string(), "{tx}");
    assert_eq!(tx["id.resp_p"], 53, "{tx}");
    assert_eq!(tx["proto"], if case.tcp { "tcp" } else { "udp" }, "{tx}");
    assert_eq!(tx["trans_id"], 0x4242, "{tx}");
    assert_eq!(tx["rcode_name"], "NOERROR", "{tx}");
    assert_eq!(tx["qtype_name"], if case.v6 { "AAAA" } else { "A" }, "{tx}");
    let answers: Vec<&str> = tx["answers"]
        .as_array()
        .expect("answers")
        .iter()
        .map(|a| a.as_str().expect("text"))
        .collect();
    assert!(answers.contains(&case.target), "{tx}");
    assert_eq!(
        tx["TTLs"].as_array().expect("TTLs").len(),
        answers.len(),
        "{tx}"
    );
    assert!(
        tx["uid"].as_str().is_some_and(|u| u.starts_with('C')),
        "{tx}"
    );
    assert!(
        stopped.alerts.iter().all(|a| a.note() != "DnsTunnel"),
        "{}",
        listing(&stopped.alerts)
    );
}

#[test]
fn names_in_alert_and_conn_record_over_udp() {
    resolve_then_upload(Case {
        v6: false,
        tcp: false,
        name: "files.example.test",
        target: FILES_V4,
    });
}

#[test]
fn names_in_alert_and_conn_record_over_tcp() {
    resolve_then_upload(Case {
        v6: false,
        tcp: true,
        name: "files.example.test",
        target: FILES_V4,
    });
}

#[test]
fn names_through_a_cname() {
    resolve_then_upload(Case {
        v6: false,
        tcp: false,
        name: "share.corp.test",
        target: EDGE_V4,
    });
}

#[test]
fn names_over_ipv6() {
    resolve_then_upload(Case {
        v6: true,
        tcp: false,
        name: "files.example.test",
        target: FILES_V6,
    });
}

/// `--allow-dst '*.example.test'` for a restricted host: a connection to an address it
/// resolved from a matching name is allowed, one to an address it did not resolve alerts.
#[test]
fn allowlist_by_name_follows_what_the_client_resolved() {
    let lab = Lab::new();
    let resolver = start_dnsmasq(&lab, &ANSWERS);
    let resolved: IpAddr = FILES_V4.parse().expect("address");
    let unresolved: IpAddr = "203.0.113.12".parse().expect("address");
    add_wan_address(&lab, resolved);
    add_wan_address(&lab, unresolved);
    let agent = RulesAgent::start(
        &lab,
        &[
            "--restricted-net",
            "198.18.1.0/24",
            "--allow-dst",
            "*.example.test",
            "--allow-service",
            "203.0.113.2/32,53/udp",
        ],
    );
    let answer = resolve(&lab.lan, resolver, "files.example.test", TYPE_A, false);
    assert_eq!(answer.addrs, vec![resolved], "{answer:?}");
    let clients = upload_to_each(&lab, &[resolved, unresolved], 10_000);
    let (loud_client, loud_server) = clients[1];
    agent.wait_alerts("RestrictedOutbound", 1, ALERT_LIMIT, |a| {
        a.is_conn("tcp", loud_client, loud_server)
    });
    let (quiet_client, quiet_server) = clients[0];
    agent.wait_finished("tcp", quiet_client, quiet_server, FINISH_LIMIT);
    let stopped = agent.stop();
    let restricted: Vec<_> = stopped
        .alerts
        .iter()
        .filter(|a| a.note() == "RestrictedOutbound")
        .collect();
    assert_eq!(restricted.len(), 1, "{}", listing(&stopped.alerts));
    assert!(
        restricted[0].is_conn("tcp", loud_client, loud_server),
        "{}",
        restricted[0]
    );
}

/// With `--pin-path`, a killed agent's programs stay attached and write DNS messages to
/// the ring buffer they were loaded with: the next agent must read that one.
#[test]
fn a_restarted_agent_reads_the_pinned_ring_buffer() {
    struct Pins(PathBuf);
    impl Drop for Pins {
        fn drop(&mut self) {
            let _ = monitor::kernel::pins::remove(&self.0);
        }
    }
    let lab = Lab::new();
    let resolver = start_dnsmasq(&lab, &ANSWERS);
    let scratch = Scratch::new("dns-restart");
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/monitor-test-dns-{}",
        std::process::id()
    )));
    let pin_arg = pins.0.to_str().expect("UTF-8").to_owned();
    let logs = [scratch.path("dns-1.jsonl"), scratch.path("dns-2.jsonl")];
    let start = |life: usize| {
        Agent::start_seeing_host(
            &lab.gw,
            &lab.gw_wan_if,
            &[
                "--local-net",
                lab::LOCAL_NET_V4,
                "--poll-interval",
                "200ms",
                "--pin-path",
                &pin_arg,
                "--dns-log",
                logs[life].to_str().expect("UTF-8"),
            ],
        )
    };
    let logged = |life: usize, name: &str| {
        read_json_lines(&logs[life])
            .iter()
            .any(|r| r["query"] == name && r["rcode_name"] == "NOERROR")
    };
    let wait = |life: usize, name: &str| {
        let start = Instant::now();
        while !logged(life, name) {
            assert!(
                start.elapsed() < ALERT_LIMIT,
                "agent {} logged no transaction for {name}",
                life + 1
            );
            thread::sleep(Duration::from_millis(100));
        }
    };
    let first = start(0);
    resolve(&lab.lan, resolver, "one.example.test", TYPE_A, false);
    wait(0, "one.example.test");
    first.kill();
    let second = start(1);
    resolve(&lab.lan, resolver, "two.example.test", TYPE_A, false);
    wait(1, "two.example.test");
    // A query nobody answers: written at shutdown, without rcode, with its uid.
    let silent: IpAddr = "203.0.113.12".parse().expect("address");
    add_wan_address(&lab, silent);
    run_in_ns(&lab.lan, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        let query = dns_lab::query(7, "lost.example.test", TYPE_A);
        sock.send_to(&query, SocketAddr::new(silent, 53))
            .expect("send the query");
    });
    thread::sleep(Duration::from_millis(500));
    second.stop();
    let lost = read_json_lines(&logs[1])
        .into_iter()
        .find(|r| r["query"] == "lost.example.test")
        .expect("the unanswered query is logged at shutdown");
    assert!(lost.get("rcode_name").is_none(), "{lost}");
    assert!(
        lost["uid"].as_str().is_some_and(|u| u.starts_with('C')),
        "{lost}"
    );
}

/// A DNS server of the test's own at `addr:53` on the wan host: answers every query for
/// `name` with `addr` itself, as a drop site would, `queries` times at most.
fn serve_own_address(lab: &Lab, addr: IpAddr, name: &'static str, queries: usize) {
    let IpAddr::V4(v4) = addr else {
        panic!("an IPv4 drop site")
    };
    let socket = run_in_ns(&lab.wan, move || {
        UdpSocket::bind(SocketAddr::new(addr, 53)).expect("bind the drop site's port 53")
    });
    socket.set_read_timeout(Some(ALERT_LIMIT)).expect("timeout");
    thread::spawn(move || {
        let mut buf = [0u8; 512];
        for _ in 0..queries {
            let Ok((n, from)) = socket.recv_from(&mut buf) else {
                return;
            };
            let asked = dns_lab::decode_question(&buf[..n]);
            let rcode = if asked == name { 0 } else { 3 };
            let answer = dns_lab::response(&buf[..n], rcode, (rcode == 0).then_some(v4));
            let _ = socket.send_to(&answer, from);
        }
    });
}

/// A restricted host asks its drop site for an allowlisted name and gets the drop site's
/// own address. With `--dns-resolver` naming the site's resolver, that answer allows
/// nothing: the upload to the drop site alerts, while the same host's upload to an address
/// the real resolver gave for an allowlisted name stays quiet.
#[test]
fn a_drop_site_answering_for_an_allowed_name_allows_nothing() {
    let lab = Lab::new();
    let resolver = start_dnsmasq(&lab, &ANSWERS);
    let files: IpAddr = FILES_V4.parse().expect("address");
    let drop_site: IpAddr = "203.0.113.66".parse().expect("address");
    add_wan_address(&lab, files);
    add_wan_address(&lab, drop_site);
    serve_own_address(&lab, drop_site, "cdn.allowed.test", 4);
    let agent = RulesAgent::start(
        &lab,
        &[
            "--restricted-net",
            "198.18.1.0/24",
            "--allow-dst",
            "cdn.allowed.test",
            "--allow-dst",
            "*.example.test",
            "--allow-service",
            "203.0.113.2/32,53/udp",
            "--dns-resolver",
            "203.0.113.2/32",
        ],
    );
    let real = resolve(&lab.lan, resolver, "files.example.test", TYPE_A, false);
    assert_eq!(real.addrs, vec![files], "{real:?}");
    let forged = resolve(
        &lab.lan,
        SocketAddr::new(drop_site, 53),
        "cdn.allowed.test",
        TYPE_A,
        false,
    );
    assert_eq!(forged.addrs, vec![drop_site], "{forged:?}");
    let clients = upload_to_each(&lab, &[files, drop_site], 10_000);
    let (loud_client, loud_server) = clients[1];
    let alerts = agent.wait_alerts("RestrictedOutbound", 1, ALERT_LIMIT, |a| {
        a.is_conn("tcp", loud_client, loud_server)
    });
    assert!(
        !alerts[0].has("remote_fqdn"),
        "the drop site's name for itself names nothing: {}",
        alerts[0]
    );
    let (quiet_client, quiet_server) = clients[0];
    agent.wait_finished("tcp", quiet_client, quiet_server, FINISH_LIMIT);
    let stopped = agent.stop();
    let tcp: Vec<_> = stopped
        .alerts
        .iter()
        .filter(|a| a.note() == "RestrictedOutbound" && a.str("proto") == "tcp")
        .collect();
    assert_eq!(tcp.len(), 1, "{}", listing(&stopped.alerts));
}

/// An Internet host sends a LAN host 100 NXDOMAIN "responses" to queries it never made:
/// they are counted and logged as unsolicited, and raise no DnsTunnel.
#[test]
fn unsolicited_nxdomains_are_counted_and_raise_nothing() {
    const FORGED: u16 = 100;
    let lab = Lab::new();
    let scratch = Scratch::new("dns-unsolicited");
    let dns_log = scratch.path("dns.jsonl");
    let agent = RulesAgent::start(
        &lab,
        &[
            "--dns-log",
            dns_log.to_str().expect("UTF-8"),
            "--dns-nxdomain-threshold",
            "20",
        ],
    );
    let victim = SocketAddr::new(lab::LAN_HOST_V4.into(), 40_053);
    run_in_ns(&lab.wan, move || {
        let socket = UdpSocket::bind(SocketAddr::new(lab::WAN_HOST_V4.into(), 53))
            .expect("bind the wan host's port 53");
        for i in 0..FORGED {
            let query = dns_lab::query(i, &format!("n{i}.victim-domain.test"), TYPE_A);
            socket
                .send_to(&dns_lab::response(&query, 3, None), victim)
                .expect("send a forged NXDOMAIN");
        }
    });
    let unsolicited = http::eventually("100 unsolicited responses counted", ALERT_LIMIT, || {
        http::agent_sample(
            &lab.gw,
            "egress_monitor_dns_messages_total{type=\"unsolicited\"}",
        )
        .filter(|&n| n >= f64::from(FORGED))
    });
    assert_eq!(unsolicited, f64::from(FORGED));
    assert_eq!(
        http::agent_sample(
            &lab.gw,
            "egress_monitor_dns_messages_total{type=\"response\"}"
        ),
        Some(0.0),
        "no response answered a query"
    );
    // Two more polls: an alert would be in the alert log by then.
    thread::sleep(Duration::from_millis(1000));
    let stopped = agent.stop();
    assert!(
        stopped.alerts.iter().all(|a| a.note() != "DnsTunnel"),
        "{}",
        listing(&stopped.alerts)
    );
    let logged = read_json_lines(&dns_log);
    assert_eq!(logged.len(), usize::from(FORGED), "{logged:?}");
    assert!(
        logged
            .iter()
            .all(|r| r["unsolicited"] == true && r["rcode_name"] == "NXDOMAIN"),
        "{logged:?}"
    );
}

/// A restricted host opens each of 200 connections right after the lookup that allows
/// it: every one is judged with its answer applied, so none alerts.
#[test]
fn connections_opened_right_after_their_lookups_are_judged_by_name() {
    const CONNECTIONS: u8 = 200;
    let lab = Lab::new();
    let targets: Vec<(String, Ipv4Addr)> = (0..CONNECTIONS)
        .map(|i| {
            (
                format!("h{i}.race.test"),
                Ipv4Addr::new(203, 0, 113, 20 + i),
            )
        })
        .collect();
    let answers: Vec<String> = targets
        .iter()
        .map(|(name, addr)| format!("--address=/{name}/{addr}"))
        .collect();
    let answers: Vec<&str> = answers.iter().map(String::as_str).collect();
    let resolver = start_dnsmasq(&lab, &answers);
    for (_, addr) in &targets {
        add_wan_address(&lab, (*addr).into());
    }
    let agent = RulesAgent::start(
        &lab,
        &[
            "--restricted-net",
            "198.18.1.0/24",
            "--allow-dst",
            "*.race.test",
            "--allow-service",
            "203.0.113.2/32,53/udp",
        ],
    );
    let names: Vec<String> = targets.iter().map(|(name, _)| name.clone()).collect();
    let ports: Vec<u16> = run_in_ns(&lab.lan, move || {
        let lookup = UdpSocket::bind("0.0.0.0:0").expect("bind the stub resolver");
        lookup
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut buf = [0u8; 512];
        names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let id = u16::try_from(i).expect("id");
                lookup
                    .send_to(&dns_lab::query(id, name, TYPE_A), resolver)
                    .expect("send the query");
                let (n, _) = lookup.recv_from(&mut buf).expect("the answer");
                let answer = dns_lab::decode(&buf[..n]);
                let [addr] = answer.addrs[..] else {
                    panic!("{name}: {answer:?}")
                };
                let socket = UdpSocket::bind("0.0.0.0:0").expect("bind a client socket");
                let server = SocketAddr::new(addr, 9);
                socket.send_to(b"right after", server).expect("send");
                socket.local_addr().expect("client address").port()
            })
            .collect()
    });
    // Two polls see every datagram before the agent stops.
    thread::sleep(Duration::from_millis(600));
    let stopped = agent.stop();
    let seen = targets
        .iter()
        .zip(&ports)
        .filter(|((_, addr), port)| {
            let client = (IpAddr::from(lab::LAN_HOST_V4), **port);
            stopped
                .conns
                .iter()
                .any(|c| c.is_between("udp", client, ((*addr).into(), 9)))
        })
        .count();
    assert_eq!(
        seen,
        usize::from(CONNECTIONS),
        "every connection was counted"
    );
    let restricted: Vec<_> = stopped
        .alerts
        .iter()
        .filter(|a| a.note() == "RestrictedOutbound")
        .collect();
    assert!(restricted.is_empty(), "{}", listing(&stopped.alerts));
}
