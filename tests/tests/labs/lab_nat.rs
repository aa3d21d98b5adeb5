//! The agent on a gateway that translates addresses, started as a user starts it: no
//! `--iface`, so it watches gw's default-route (WAN) interface, where every LAN host's
//! packet carries gw's public address. Connections must still be recorded and judged as
//! the LAN host's, with the translated endpoints beside them, and counted exactly: the
//! ground truth is the LAN link's counters, which see the packets before translation.

use std::{
    net::{IpAddr, Shutdown, SocketAddr, UdpSocket},
    thread,
    time::Duration,
};

use tests::{
    agent::ConnRecord,
    dns_lab::{TYPE_A, add_wan_address, resolve, start_dnsmasq},
    lab::{self, Lab, LanCounters, SecondLan, run_in_ns},
    nfdump::{NatFlow, Nfcapd, read_nat_flows},
    rules_lab::{
        self, Alert, HttpServer, RulesAgent, Scratch, connect, join, listen, listing, of,
        read_json_lines, read_to_eof, send, spawn_discard, upload_to_each,
    },
};

const LAN: IpAddr = IpAddr::V4(lab::LAN_HOST_V4);
const WAN: IpAddr = IpAddr::V4(lab::WAN_HOST_V4);
const PUBLIC: IpAddr = IpAddr::V4(lab::GW_WAN_V4);

const ALERT_LIMIT: Duration = Duration::from_secs(30);
const FINISH_LIMIT: Duration = Duration::from_secs(40);

const UPLOAD: u64 = 12_000_000;
const FLAGS: [&str; 4] = ["--upload-threshold", "8MB", "--upload-min-packets", "100"];

/// The record's counts are the LAN link's: what the LAN host sent and received.
fn assert_counts(record: &ConnRecord, lab: &Lab, lan: LanCounters, host_is_orig: bool) {
    let l2_sent = lab.tx_l2_bytes(&lab.lan, &lab.lan_if);
    let l2_received = lab.tx_l2_bytes(&lab.gw, &lab.gw_lan_if);
    let (sent, received) = if host_is_orig {
        ("orig", "resp")
    } else {
        ("resp", "orig")
    };
    let want = [
        (format!("{sent}_pkts"), lan.lan_host.tx_packets),
        (
            format!("{sent}_ip_bytes"),
            lan.lan_host.tx_ip_bytes(l2_sent),
        ),
        (format!("{received}_pkts"), lan.gw_lan.tx_packets),
        (
            format!("{received}_ip_bytes"),
            lan.gw_lan.tx_ip_bytes(l2_received),
        ),
    ];
    for (field, count) in want {
        assert_eq!(record.u64(&field), count, "{field} of {record}");
    }
}

/// Every alert of `note` (every alert, without one) names the LAN host, none the gateway.
fn assert_all_from_lan(alerts: &[Alert], note: Option<&str>) {
    let named: Vec<&Alert> = alerts
        .iter()
        .filter(|a| note.is_none_or(|n| a.note() == n))
        .collect();
    assert!(
        named.iter().all(|a| a.ip("src") == LAN),
        "every alert names the LAN host:\n{}",
        listing(alerts)
    );
}

fn assert_nat(record: &ConnRecord, orig: (IpAddr, u16), resp: (IpAddr, u16)) {
    assert_eq!(record.ip("nat.orig_h"), orig.0, "{record}");
    assert_eq!(record.u64("nat.orig_p"), u64::from(orig.1), "{record}");
    assert_eq!(record.ip("nat.resp_h"), resp.0, "{record}");
    assert_eq!(record.u64("nat.resp_p"), u64::from(resp.1), "{record}");
}

/// Sends `UPLOAD` from `sender`, waits for its LargeUpload while the socket is open,
/// closes, and returns the finished connection's record once the agent is stopped, with
/// the LAN link's counters over the whole connection.
fn upload_and_judge(
    lab: &Lab,
    agent: RulesAgent,
    mut sender: std::net::TcpStream,
    (client, server): (SocketAddr, SocketAddr),
    before: LanCounters,
    local_side: &str,
) -> (ConnRecord, LanCounters) {
    send(&mut sender, UPLOAD);
    let alerts = agent.wait_alerts("LargeUpload", 1, ALERT_LIMIT, |a| {
        a.is_conn("tcp", client, server)
    });
    assert_eq!(alerts[0].ip("src"), LAN, "{}", alerts[0]);
    assert_eq!(alerts[0].ip("dst"), WAN, "{}", alerts[0]);
    assert_eq!(alerts[0].str("local_side"), local_side, "{}", alerts[0]);
    assert!(alerts[0].bool("open"), "{}", alerts[0]);
    sender
        .shutdown(Shutdown::Write)
        .unwrap_or_else(|e| panic!("close the sender: {e}"));
    drop(sender);
    let record = agent.wait_finished("tcp", client, server, FINISH_LIMIT);
    let lan = lab.lan_counters().since(before);
    let stopped = agent.stop();
    assert_eq!(
        of(&stopped.alerts, "LargeUpload").len(),
        1,
        "one LargeUpload:\n{}",
        listing(&stopped.alerts)
    );
    let records: Vec<&ConnRecord> = stopped
        .conns
        .iter()
        .filter(|r| r.proto() == "tcp")
        .collect();
    assert_eq!(
        records.len(),
        1,
        "one record for one connection: {records:?}"
    );
    (record, lan)
}

/// An `UPLOAD` from the lan host to port `port` of the wan host, judged by `agent` (see
/// [`upload_and_judge`]): its record has the LAN link's counts and the gateway's public
/// address as `nat.orig_h`. Returns the record.
fn lan_host_upload(lab: &Lab, agent: RulesAgent, port: u16) -> ConnRecord {
    let server = SocketAddr::new(WAN, port);
    let discard = spawn_discard(listen(&lab.wan, server), 1);
    let before = lab.lan_counters();
    let sender = connect(&lab.lan, server);
    let client = sender.local_addr().expect("client address");
    let (record, lan) = upload_and_judge(lab, agent, sender, (client, server), before, "orig");
    assert_eq!(join(discard), vec![UPLOAD], "bytes the wan host received");
    assert_counts(&record, lab, lan, true);
    assert_eq!(record.ip("nat.orig_h"), PUBLIC, "{record}");
    record
}

#[test]
fn masqueraded_upload_is_the_lan_hosts_with_exact_counts() {
    let lab = Lab::masquerading();
    let agent = RulesAgent::start_default(&lab, &FLAGS);
    assert!(
        agent
            .stderr()
            .contains(&format!("watching {}", lab.gw_wan_if)),
        "the default capture is the WAN link: {}",
        agent.stderr()
    );
    let record = lan_host_upload(&lab, agent, 5001);
    assert!(
        record.bool("local_orig") && !record.bool("local_resp"),
        "{record}"
    );
    assert_eq!(record.ip("nat.resp_h"), WAN, "{record}");
    assert_eq!(record.u64("nat.resp_p"), 5001, "{record}");
}

#[test]
fn port_forwarded_lan_server_is_named_as_itself() {
    let lab = Lab::masquerading();
    lab.forward_port(8080, 5001);
    let agent = RulesAgent::start_default(&lab, &FLAGS);
    let server = SocketAddr::new(LAN, 5001);
    let listener = listen(&lab.lan, server);
    let before = lab.lan_counters();
    let mut remote = connect(&lab.wan, SocketAddr::new(PUBLIC, 8080));
    let client = remote.local_addr().expect("client address");
    let reader = thread::spawn(move || {
        let n = read_to_eof(&mut remote);
        drop(remote);
        n
    });
    let sender = rules_lab::accept(&listener);
    let (record, lan) = upload_and_judge(&lab, agent, sender, (client, server), before, "resp");
    assert_eq!(join(reader), UPLOAD, "bytes the wan host received");
    assert_counts(&record, &lab, lan, false);
    assert_nat(&record, (client.ip(), client.port()), (PUBLIC, 8080));
}

#[test]
fn lan_and_wan_watched_give_one_record_per_connection() {
    let lab = Lab::masquerading();
    let agent = RulesAgent::start_on(&lab, &[&lab.gw_lan_if, &lab.gw_wan_if], &FLAGS);
    lan_host_upload(&lab, agent, 5001);
}

#[test]
fn restricted_lan_host_behind_nat_is_alerted_in_its_own_name() {
    let lab = Lab::masquerading();
    let agent = RulesAgent::start_default(&lab, &["--restricted-net", "198.18.1.2/32"]);
    let server = SocketAddr::new(WAN, 5002);
    let discard = spawn_discard(listen(&lab.wan, server), 1);
    let mut sender = connect(&lab.lan, server);
    let client = sender.local_addr().expect("client address");
    send(&mut sender, 1000);
    let alerts = agent.wait_alerts("RestrictedOutbound", 1, ALERT_LIMIT, |a| {
        a.is_conn("tcp", client, server)
    });
    assert_eq!(alerts[0].ip("src"), LAN, "{}", alerts[0]);
    assert_eq!(alerts[0].ip("nat.orig_h"), PUBLIC, "{}", alerts[0]);
    drop(sender);
    assert_eq!(join(discard), vec![1000]);
    let stopped = agent.stop();
    assert_all_from_lan(&stopped.alerts, Some("RestrictedOutbound"));
}

/// Short UDP exchanges (a DNS lookup's shape), and a conntrack table flushed in the middle
/// of one: the connection keeps the LAN host's name and every datagram.
#[test]
fn udp_behind_nat_survives_a_conntrack_flush() {
    lab::require_tool("conntrack", "conntrack");
    let lab = Lab::masquerading();
    let agent = RulesAgent::start_default(&lab, &["--idle-timeout", "2s"]);
    let server = SocketAddr::new(WAN, 5353);
    let echo = run_in_ns(&lab.wan, move || UdpSocket::bind(server)).expect("bind echo");
    echo.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    const ROUNDS: u64 = 40;
    let echo_thread = thread::spawn(move || {
        let mut buf = [0u8; 512];
        for _ in 0..2 * ROUNDS {
            let (n, peer) = echo.recv_from(&mut buf).expect("echo: a request");
            echo.send_to(&buf[..n], peer).expect("echo: the reply");
        }
    });
    let client = run_in_ns(&lab.lan, move || {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        sock.connect(server)?;
        Ok::<_, std::io::Error>(sock)
    })
    .expect("client socket");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let exchange = |rounds: u64| {
        let mut buf = [0u8; 512];
        for _ in 0..rounds {
            client.send(&[7u8; 100]).expect("send a request");
            assert_eq!(client.recv(&mut buf).expect("a reply"), 100);
        }
    };
    exchange(ROUNDS);
    // Let a poll see the connection under its translation, then drop every entry.
    thread::sleep(Duration::from_millis(600));
    lab::ns_exec(&lab.gw, &["conntrack", "-F"]);
    exchange(ROUNDS);
    echo_thread.join().expect("echo thread");
    let client_addr = client.local_addr().expect("client address");
    let record = agent.wait_finished("udp", client_addr, server, FINISH_LIMIT);
    assert_eq!(record.orig(), (LAN, client_addr.port()), "{record}");
    assert_eq!(record.u64("orig_pkts"), 2 * ROUNDS, "{record}");
    assert_eq!(record.u64("resp_pkts"), 2 * ROUNDS, "{record}");
    assert_eq!(record.u64("orig_bytes"), 2 * ROUNDS * 100, "{record}");
    assert_eq!(record.ip("nat.orig_h"), PUBLIC, "{record}");
    let stopped = agent.stop();
    let udp: Vec<&ConnRecord> = stopped
        .conns
        .iter()
        .filter(|r| r.proto() == "udp")
        .collect();
    assert_eq!(udp.len(), 1, "one record: {udp:?}");
}

#[test]
fn ipv6_masquerade_is_the_lan_hosts() {
    let lab = Lab::masquerading();
    let agent = RulesAgent::start_default(&lab, &FLAGS);
    let wan6 = IpAddr::V6(lab::WAN_HOST_V6);
    let server = SocketAddr::new(wan6, 5001);
    let discard = spawn_discard(listen(&lab.wan, server), 1);
    let before = lab.lan_counters();
    let mut sender = connect(&lab.lan, server);
    let client = sender.local_addr().expect("client address");
    send(&mut sender, 1_000_000);
    sender
        .shutdown(Shutdown::Write)
        .unwrap_or_else(|e| panic!("close the sender: {e}"));
    drop(sender);
    assert_eq!(join(discard), vec![1_000_000]);
    let record = agent.wait_finished("tcp", client, server, FINISH_LIMIT);
    let lan = lab.lan_counters().since(before);
    assert_eq!(
        record.ip("id.orig_h"),
        IpAddr::V6(lab::LAN_HOST_V6),
        "{record}"
    );
    assert_eq!(
        record.ip("nat.orig_h"),
        IpAddr::V6(lab::GW_WAN_V6),
        "{record}"
    );
    assert_counts(&record, &lab, lan, true);
    agent.stop();
}

/// IPFIX records of a translated connection carry its endpoints as translated in the
/// elements collectors know (postNATSourceIPv4Address and the rest): nfdump shows them as
/// its NSEL "xlate" fields, so a fleet sees LAN hosts and their public faces both.
#[test]
fn ipfix_records_carry_the_translation_to_nfdump() {
    let lab = Lab::masquerading();
    let mut nfcapd = Nfcapd::start_in(Some(&lab.gw), 4739);
    let agent = RulesAgent::start_default(&lab, &["--ipfix-collector", "udp://127.0.0.1:4739"]);
    let server = SocketAddr::new(WAN, 5003);
    let discard = spawn_discard(listen(&lab.wan, server), 1);
    let mut sender = connect(&lab.lan, server);
    let client = sender.local_addr().expect("client address");
    send(&mut sender, 500_000);
    sender
        .shutdown(Shutdown::Write)
        .unwrap_or_else(|e| panic!("close the sender: {e}"));
    drop(sender);
    assert_eq!(join(discard), vec![500_000]);
    let record = agent.wait_finished("tcp", client, server, FINISH_LIMIT);
    let public = (PUBLIC, record.u64("nat.orig_p") as u16);
    agent.stop();
    // nfcapd reads its socket on its own time: let it drain before stopping it.
    thread::sleep(Duration::from_millis(500));
    let files = nfcapd.stop();
    let flows = read_nat_flows(&files);
    let upload: Vec<&NatFlow> = flows
        .iter()
        .filter(|f| f.src == (LAN, client.port()))
        .collect();
    let download: Vec<&NatFlow> = flows
        .iter()
        .filter(|f| f.dst == (LAN, client.port()))
        .collect();
    assert!(!upload.is_empty() && !download.is_empty(), "{flows:?}");
    for f in upload {
        assert_eq!(f.dst, (WAN, server.port()), "{f:?}");
        assert_eq!(
            (f.xlate_src, f.xlate_dst),
            (public, (WAN, server.port())),
            "{f:?}"
        );
    }
    for f in download {
        assert_eq!(
            (f.xlate_src, f.xlate_dst),
            ((WAN, server.port()), public),
            "{f:?}"
        );
    }
    let packets: u64 = flows
        .iter()
        .filter(|f| f.src == (LAN, client.port()))
        .map(|f| f.packets)
        .sum();
    assert_eq!(packets, record.u64("orig_pkts"), "{record}");
}

/// A LAN client's lookups cross the NAT as the gateway's, yet they are the client's: its
/// connections carry the names it resolved, dns.log names it, and a name allowlist follows
/// what it resolved.
#[test]
fn names_behind_nat_are_the_lan_clients() {
    let lab = Lab::masquerading();
    let resolver = start_dnsmasq(&lab, &["--address=/example.test/203.0.113.10"]);
    let resolved: IpAddr = "203.0.113.10".parse().expect("address");
    let unresolved: IpAddr = "203.0.113.12".parse().expect("address");
    add_wan_address(&lab, resolved);
    add_wan_address(&lab, unresolved);
    let scratch = Scratch::new("nat-dns");
    let dns_log = scratch.path("dns.jsonl");
    let dns_arg = dns_log.to_str().expect("UTF-8").to_owned();
    let agent = RulesAgent::start_default(
        &lab,
        &[
            "--restricted-net",
            "198.18.1.0/24",
            "--allow-dst",
            "*.example.test",
            "--allow-service",
            "203.0.113.2/32,53/udp",
            "--dns-log",
            &dns_arg,
        ],
    );
    let answer = resolve(&lab.lan, resolver, "files.example.test", TYPE_A, false);
    assert_eq!(answer.addrs, vec![resolved], "{answer:?}");
    let clients = upload_to_each(&lab, &[resolved, unresolved], 10_000);
    let (loud_client, loud_server) = clients[1];
    let alerts = agent.wait_alerts("RestrictedOutbound", 1, ALERT_LIMIT, |a| {
        a.is_conn("tcp", loud_client, loud_server)
    });
    assert_eq!(alerts[0].ip("src"), LAN, "{}", alerts[0]);
    let (quiet_client, quiet_server) = clients[0];
    let named = agent.wait_finished("tcp", quiet_client, quiet_server, FINISH_LIMIT);
    assert_eq!(named.str("remote_fqdn"), "files.example.test", "{named}");
    let stopped = agent.stop();
    let restricted = of(&stopped.alerts, "RestrictedOutbound");
    assert_eq!(restricted.len(), 1, "{}", listing(&stopped.alerts));
    let lookups: Vec<_> = read_json_lines(&dns_log)
        .into_iter()
        .filter(|r| r["query"] == "files.example.test")
        .collect();
    assert_eq!(lookups.len(), 1, "{lookups:?}");
    assert_eq!(lookups[0]["id.orig_h"], LAN.to_string(), "{:?}", lookups[0]);
}

/// The same with iptables (its nft backend) translating to an address (SNAT) instead of
/// nftables masquerading: the agent reads the translation, not the rules.
#[test]
fn iptables_snat_is_the_lan_hosts() {
    let lab = Lab::snat_with_iptables();
    let agent = RulesAgent::start_default(&lab, &FLAGS);
    lan_host_upload(&lab, agent, 5004);
}

/// UploadRatio, LongConnection, WindowExceeded and DataLeak on the masquerading gateway:
/// each names the LAN host, none the gateway.
#[test]
fn ratio_long_window_and_leak_rules_name_the_lan_host_behind_nat() {
    let lab = Lab::masquerading();
    let agent = RulesAgent::start_default(
        &lab,
        &[
            "--ratio-min-bytes",
            "0",
            "--long-durations",
            "2s,4s",
            "--window",
            "2s",
            "--window-threshold",
            "100KB",
            "--leak-period",
            "60s",
            "--leak-threshold",
            "250KB",
        ],
    );
    let http = HttpServer::start(&lab.wan, SocketAddr::new(WAN, 80), 1);
    let web = http.addr;
    let post = rules_lab::http_request(&lab.lan, web, "POST", "/upload", 300_000);
    assert_eq!(post.status, 200, "POST answered {post:?}");
    http.join();

    let server = SocketAddr::new(WAN, 5005);
    let sink = spawn_discard(listen(&lab.wan, server), 1);
    let mut sender = connect(&lab.lan, server);
    let client = sender.local_addr().expect("client address");
    for _ in 0..3 {
        // Early in each of three 2 s windows.
        rules_lab::sleep_into_next_window(2.0, 0.3);
        send(&mut sender, 150_000);
    }
    let from_lan = |a: &Alert| a.ip("src") == LAN;
    agent.wait_alerts("UploadRatio", 1, ALERT_LIMIT, |a| {
        a.is_conn("tcp", post.client, web) && from_lan(a)
    });
    agent.wait_alerts("LongConnection", 1, ALERT_LIMIT, |a| {
        a.is_conn("tcp", client, server) && from_lan(a)
    });
    agent.wait_alerts("WindowExceeded", 2, ALERT_LIMIT, from_lan);
    agent.wait_alerts("DataLeak", 1, ALERT_LIMIT, from_lan);
    sender
        .shutdown(Shutdown::Write)
        .unwrap_or_else(|e| panic!("close the sender: {e}"));
    drop(sender);
    assert_eq!(join(sink), vec![450_000]);
    let stopped = agent.stop();
    assert_all_from_lan(&stopped.alerts, None);
}

/// DnsTunnel behind NAT: an NXDOMAIN burst of a LAN client, whose queries leave as the
/// gateway's, is the LAN client's.
#[test]
fn an_nxdomain_burst_behind_nat_is_the_lan_clients() {
    let lab = Lab::masquerading();
    let resolver = start_dnsmasq(&lab, &["--address=/nx.test/"]);
    let agent = RulesAgent::start_default(&lab, &["--dns-nxdomain-threshold", "50"]);
    for i in 0..80 {
        let name = format!("host{i}.nx.test");
        let answer = resolve(&lab.lan, resolver, &name, TYPE_A, false);
        assert_eq!(answer.rcode, 3, "{name}: {answer:?}");
    }
    let alert = agent
        .wait_alerts("DnsTunnel", 1, ALERT_LIMIT, |a| {
            a.str("reason") == "nxdomain"
        })
        .remove(0);
    assert_eq!(alert.ip("src"), LAN, "{alert}");
    assert_eq!(alert.str("client"), LAN.to_string(), "{alert}");
    assert_eq!(alert.str("domain"), "nx.test", "{alert}");
    let stopped = agent.stop();
    assert_all_from_lan(&stopped.alerts, Some("DnsTunnel"));
}

/// A gateway with two LANs, all three links watched: traffic between the LANs (not
/// translated, both ends local) and an upload from the second LAN out through the NAT are
/// each one record with the counts of the sending host's link.
#[test]
fn two_lans_and_the_wan_watched_count_each_connection_once() {
    let lab = Lab::masquerading();
    let lan2 = SecondLan::attach(&lab);
    let agent = RulesAgent::start_on(&lab, &[&lab.gw_lan_if, &lan2.gw_if, &lab.gw_wan_if], &FLAGS);
    let l2 = lab::ETH_HEADER;
    let lan2_host = IpAddr::V4(lab::LAN2_HOST_V4);
    let cases = [
        // (what, server, sent from the first LAN to the second)
        ("between the LANs", SocketAddr::new(lan2_host, 5006), true),
        ("out of the second LAN", SocketAddr::new(WAN, 5007), false),
    ];
    let mut records = Vec::new();
    for (what, server, from_first_lan) in cases {
        let (client_ns, server_ns) = if from_first_lan {
            (lab.lan.as_str(), lan2.ns.as_str())
        } else {
            (lan2.ns.as_str(), lab.wan.as_str())
        };
        let link = |lab: &Lab| {
            if from_first_lan {
                lab.lan_counters()
            } else {
                lan2.counters(lab)
            }
        };
        let sink = spawn_discard(listen(server_ns, server), 1);
        let before = link(&lab);
        let mut sender = connect(client_ns, server);
        let client = sender.local_addr().expect("client address");
        send(&mut sender, 1_000_000);
        sender.shutdown(Shutdown::Write).expect("close");
        drop(sender);
        assert_eq!(join(sink), vec![1_000_000], "{what}");
        let record = agent.wait_finished("tcp", client, server, FINISH_LIMIT);
        let sent = link(&lab).since(before);
        assert_eq!(
            record.u64("orig_pkts"),
            sent.lan_host.tx_packets,
            "{what}: {record}"
        );
        assert_eq!(
            record.u64("orig_ip_bytes"),
            sent.lan_host.tx_ip_bytes(l2),
            "{what}: {record}"
        );
        assert_eq!(
            record.u64("resp_pkts"),
            sent.gw_lan.tx_packets,
            "{what}: {record}"
        );
        assert_eq!(
            record.u64("resp_ip_bytes"),
            sent.gw_lan.tx_ip_bytes(l2),
            "{what}: {record}"
        );
        assert_eq!(
            record.bool("local_resp"),
            from_first_lan,
            "{what}: {record}"
        );
        assert_eq!(
            record.has("nat.orig_h"),
            !from_first_lan,
            "{what}: {record}"
        );
        records.push((client, server));
    }
    let stopped = agent.stop();
    for (client, server) in records {
        let found = stopped
            .conns
            .iter()
            .filter(|r| {
                r.is_between(
                    "tcp",
                    (client.ip(), client.port()),
                    (server.ip(), server.port()),
                )
            })
            .count();
        assert_eq!(found, 1, "{client} -> {server}: one record");
    }
    assert_eq!(stopped.conns.len(), 2, "{:?}", stopped.conns);
}
