//! TLS server names from real clients (`openssl s_client`, `curl --resolve`) against
//! `openssl s_server` in the WAN namespace, with no DNS in the lab: the conn record and
//! the alerts carry `server_name`, name allowlists match it, encrypted DNS is marked, and
//! a flood of ClientHellos is accounted for, hello by hello, with the agent's memory
//! bounded.

use std::{
    io::Write,
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
    thread,
    time::Duration,
};

use tests::{
    agent::ConnRecord,
    http::{agent_sample, eventually},
    lab::{self, Lab, ns_output, run_in_ns, spawn_in_ns},
    procfs,
    rules_lab::{RulesAgent, Scratch, WAN_HOST2_V4, add_wan_address, connect, listen, listing, of},
    tls::{accept_and_close, client_hello, send_hellos},
};

const WAN: IpAddr = IpAddr::V4(lab::WAN_HOST_V4);
const LIMIT: Duration = Duration::from_secs(40);
const CLIENT_LIMIT: Duration = Duration::from_secs(20);

/// A self-signed certificate and its key, made in `dir`.
fn certificate(dir: &Scratch) -> (String, String) {
    let (cert, key) = (dir.path("cert.pem"), dir.path("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=exfil.test", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl req");
    assert!(out.status.success(), "openssl req: {out:?}");
    let text = |p: &Path| p.to_str().expect("UTF-8 temp path").to_owned();
    (text(&cert), text(&key))
}

/// `openssl s_server -www` on `port` of the WAN host, killed with the lab; returns once
/// it accepts.
fn tls_server(lab: &Lab, (cert, key): &(String, String), port: u16) {
    let accept = port.to_string();
    lab.spawn_in(
        &lab.wan,
        &[
            "openssl", "s_server", "-quiet", "-www", "-accept", &accept, "-cert", cert, "-key", key,
        ],
    );
    let local = SocketAddr::new(WAN, port);
    eventually("s_server accepts", LIMIT, || {
        run_in_ns(&lab.wan, move || std::net::TcpStream::connect(local).ok())
    });
}

/// A client from the LAN host, which must succeed.
fn client(lab: &Lab, args: &[&str]) {
    let out = ns_output(&lab.lan, args, CLIENT_LIMIT);
    assert!(out.status.success(), "{args:?}: {out:?}");
}

/// `openssl s_client` from the LAN host, closing after the handshake.
fn s_client(lab: &Lab, port: u16, name: &str) {
    let connect = format!("{WAN}:{port}");
    let args = ["-connect", &connect, "-servername", name, "-brief"];
    client(lab, &[&["openssl", "s_client"][..], &args].concat());
}

fn record_named<'a>(conns: &'a [ConnRecord], name: &str) -> Option<&'a ConnRecord> {
    conns
        .iter()
        .find(|r| r.has("server_name") && r.str("server_name") == name)
}

#[test]
fn tls_names_reach_records_alerts_and_allowlists() {
    let lab = Lab::new();
    let scratch = Scratch::new("sni");
    let cert = certificate(&scratch);
    // A destination and port per connection judged: RestrictedOutbound's alerts are quiet
    // per destination and port, and these may all be judged in one poll.
    for port in [443, 4443, 8443, 853] {
        tls_server(&lab, &cert, port);
    }
    add_wan_address(&lab, WAN_HOST2_V4);
    let restricted = format!("{}/32", lab::LAN_HOST_V4);
    let agent = RulesAgent::start(
        &lab,
        &[
            "--restricted-net",
            &restricted,
            "--allow-dst",
            "*.exfil.test",
            "--restricted-doh",
            "--doh-server",
            "doh.exfil.test",
        ],
    );

    // Not under *.exfil.test (the domain itself is not): alerts, and names the server.
    s_client(&lab, 8443, "exfil.test");
    // Under it: allowed.
    let resolve = format!("www.exfil.test:443:{WAN}");
    let curl = ["curl", "-sk", "--max-time", "10", "--resolve", &resolve];
    client(&lab, &[&curl[..], &["https://www.exfil.test/"]].concat());
    // Allowed by name, but DoH by --doh-server, and DoT by its port: --restricted-doh.
    s_client(&lab, 4443, "doh.exfil.test");
    s_client(&lab, 853, "dot.exfil.test");
    // Not TLS, to 443: no name.
    let server = SocketAddr::new(IpAddr::V4(WAN_HOST2_V4), 443);
    let mut plain = connect(&lab.lan, server);
    let client = plain.local_addr().expect("client address");
    let plain_ends =
        |r: &&ConnRecord| r.is_between("tcp", (client.ip(), client.port()), (server.ip(), 443));
    plain
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .expect("send a plain request");
    drop(plain);

    let conns = agent.wait_for("the five connections finished", LIMIT, |agent| {
        let conns = agent.conns();
        let done = [
            "exfil.test",
            "www.exfil.test",
            "doh.exfil.test",
            "dot.exfil.test",
        ]
        .iter()
        .all(|name| record_named(&conns, name).is_some())
            && conns.iter().any(|r| plain_ends(&r));
        done.then_some(conns)
    });
    let www = record_named(&conns, "www.exfil.test").unwrap();
    assert_eq!(www.str("remote_fqdn"), "www.exfil.test", "{www}");
    assert!(!www.has("encrypted_dns") && !www.has("ech"), "{www}");
    for name in ["doh.exfil.test", "dot.exfil.test"] {
        let rec = record_named(&conns, name).unwrap();
        assert!(rec.bool("encrypted_dns"), "{rec}");
    }
    let plain = conns.iter().find(plain_ends).unwrap();
    assert!(
        !plain.has("server_name") && !plain.has("remote_fqdn"),
        "{plain}"
    );
    let metric = |name: &str| agent_sample(&lab.gw, name);
    eventually("encrypted DNS counted", LIMIT, || {
        (metric("egress_monitor_encrypted_dns_connections_total")? == 2.0).then_some(())
    });
    assert_eq!(
        metric("egress_monitor_client_hellos_total{result=\"parsed\"}"),
        Some(4.0)
    );

    let stopped = agent.stop();
    let restricted = of(&stopped.alerts, "RestrictedOutbound");
    let named: Vec<&str> = restricted
        .iter()
        .filter(|a| a.has("server_name"))
        .map(|a| a.str("server_name"))
        .collect();
    for name in ["exfil.test", "doh.exfil.test", "dot.exfil.test"] {
        assert!(
            named.contains(&name),
            "{name} alerts:\n{}",
            listing(&stopped.alerts)
        );
    }
    assert!(
        !named.contains(&"www.exfil.test"),
        "*.exfil.test allows www.exfil.test:\n{}",
        listing(&stopped.alerts)
    );
}

const FLOOD: usize = 10_000;
const FLOOD_THREADS: usize = 4;

#[test]
fn a_flood_of_client_hellos_is_accounted_for_with_bounded_memory() {
    let lab = Lab::new();
    let agent = RulesAgent::start(&lab, &[]);
    let server = SocketAddr::new(WAN, 8443);
    let listener = listen(&lab.wan, server);
    let acceptor =
        thread::spawn(move || accept_and_close(listener, FLOOD, Duration::from_secs(300)));
    let hello = client_hello("flood.exfil.test");
    let senders: Vec<_> = (0..FLOOD_THREADS)
        .map(|_| {
            let hello = hello.clone();
            spawn_in_ns(&lab.lan, move || {
                send_hellos(server, &hello, FLOOD / FLOOD_THREADS);
            })
        })
        .collect();
    for sender in senders {
        sender.join().expect("a sender thread");
    }
    assert_eq!(acceptor.join().expect("the acceptor"), FLOOD);

    let metric = |name: &str| agent_sample(&lab.gw, name);
    let mut last = None;
    let (parsed, unparsed, lost) = eventually("every ClientHello accounted for", LIMIT, || {
        let parsed = metric("egress_monitor_client_hellos_total{result=\"parsed\"}")?;
        let unparsed = metric("egress_monitor_client_hellos_total{result=\"unparsed\"}")?;
        let lost = metric("egress_monitor_hello_events_lost_total")?;
        let sums = (parsed, unparsed, lost);
        if last != Some(sums) {
            eprintln!("flood so far: {parsed} parsed, {unparsed} unparsed, {lost} lost");
            last = Some(sums);
        }
        (parsed + unparsed + lost == FLOOD as f64).then_some(sums)
    });
    eprintln!("flood: {parsed} parsed, {unparsed} unparsed, {lost} lost");
    assert_eq!(unparsed, 0.0, "every hello names its server whole");
    let rss_mib = procfs::rss_kib(agent.pid()) / 1024;
    eprintln!("agent RSS after the flood: {rss_mib} MiB");
    assert!(rss_mib < 256, "agent RSS {rss_mib} MiB");
    // Fewer records than connections: the client's ports come round again while the
    // server's side of the last use waits in TIME_WAIT, and a pair reused before the
    // agent finished its entry is one record. Each use still handed its hello over.
    let stopped = agent.stop();
    let flood: Vec<&ConnRecord> = (stopped.conns.iter())
        .filter(|r| r.resp() == (WAN, server.port()))
        .collect();
    assert!(!flood.is_empty());
    for record in flood {
        assert_eq!(record.str("server_name"), "flood.exfil.test", "{record}");
    }
}

/// ClientHellos while the agent is stopped (SIGSTOP), more than the ring holds: after
/// SIGCONT every one is either parsed or counted lost, and some were lost.
#[test]
fn client_hellos_the_full_ring_cannot_take_are_counted_lost() {
    const SENT: usize = 2_000;
    let lab = Lab::new();
    let agent = RulesAgent::start(&lab, &[]);
    let server = SocketAddr::new(WAN, 8443);
    let listener = listen(&lab.wan, server);
    let acceptor =
        thread::spawn(move || accept_and_close(listener, SENT, Duration::from_secs(120)));
    let hello = client_hello("stopped.exfil.test");
    agent.signal(libc::SIGSTOP);
    run_in_ns(&lab.lan, move || send_hellos(server, &hello, SENT));
    assert_eq!(acceptor.join().expect("the acceptor"), SENT);
    agent.signal(libc::SIGCONT);
    let metric = |name: &str| agent_sample(&lab.gw, name);
    let (parsed, lost) = eventually("every ClientHello accounted for", LIMIT, || {
        let parsed = metric("egress_monitor_client_hellos_total{result=\"parsed\"}")?;
        let unparsed = metric("egress_monitor_client_hellos_total{result=\"unparsed\"}")?;
        let lost = metric("egress_monitor_hello_events_lost_total")?;
        (parsed + unparsed + lost == SENT as f64).then_some((parsed, lost))
    });
    eprintln!("stopped agent: {parsed} parsed, {lost} lost of {SENT}");
    assert!(lost > 0.0 && parsed > 0.0, "{parsed} parsed, {lost} lost");
    agent.stop();
}
