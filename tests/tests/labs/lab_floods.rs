//! Floods a host can send at the agent: its memory stays within the bounds the README
//! states, and what it had to drop is counted.

use std::{
    net::{SocketAddr, UdpSocket},
    thread,
    time::Duration,
};

use tests::{
    http,
    lab::{self, Lab, run_in_ns},
    procfs,
    rules_lab::{RulesAgent, Scratch},
};

/// A query for `q<n>.flood.test` (id `n`) whose answer section carries `answers` A
/// records: bytes a server would ignore, and a naive parser would keep.
fn stuffed_query(n: u32, answers: u16) -> Vec<u8> {
    let mut m = (n as u16).to_be_bytes().to_vec();
    m.extend_from_slice(&[0x01, 0x00, 0, 1]);
    m.extend_from_slice(&answers.to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    for label in [format!("q{n}"), "flood".into(), "test".into()] {
        m.push(label.len() as u8);
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    for i in 0..answers {
        // The question's name, A, IN, a TTL, 4 bytes of address.
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0x0e, 0x10, 0, 4, 192, 0, 2]);
        m.push(i as u8);
    }
    m
}

/// 100,000 queries nobody answers, each with its own id or port and an answer section
/// stuffed to over 1,100 bytes, with `--dns-log` on: the agent keeps the questions of the
/// 65,536 newest and nothing else of them.
#[test]
fn a_flood_of_stuffed_dns_queries_keeps_memory_bounded() {
    const QUERIES: u32 = 100_000;
    const SOCKETS: u32 = 50;
    /// The growth the README states for this flood.
    const BOUND_MIB: u64 = 96;
    let lab = Lab::new();
    let scratch = Scratch::new("dns-flood");
    let dns_log = scratch.path("dns.jsonl");
    let agent = RulesAgent::start(&lab, &["--dns-log", dns_log.to_str().expect("UTF-8")]);
    let pid = agent.pid();
    thread::sleep(Duration::from_secs(1));
    let idle_kib = procfs::rss_kib(pid);
    let server = SocketAddr::new(lab::WAN_HOST_V4.into(), 53);
    run_in_ns(&lab.lan, move || {
        let sockets: Vec<UdpSocket> = (0..SOCKETS)
            .map(|_| UdpSocket::bind("0.0.0.0:0").expect("bind a UDP socket"))
            .collect();
        for n in 0..QUERIES {
            let socket = &sockets[(n % SOCKETS) as usize];
            socket
                .send_to(&stuffed_query(n, 70), server)
                .expect("send a query");
            // Paced below what the ring buffer and the 200 ms polls take.
            if n % 50 == 49 {
                thread::sleep(Duration::from_millis(5));
            }
        }
    });
    let seen = http::eventually(
        "every query parsed or counted lost",
        Duration::from_secs(60),
        || {
            let parsed =
                http::agent_sample(&lab.gw, "egress_monitor_dns_messages_total{type=\"query\"}")?;
            let lost = http::agent_sample(&lab.gw, "egress_monitor_dns_events_lost_total")?;
            (parsed + lost >= f64::from(QUERIES)).then_some(parsed)
        },
    );
    // Half the flood is enough to tell: kept whole (cd0564f), 85,421 of them took 439 MiB.
    assert!(
        seen > 50_000.0,
        "only {seen} queries parsed (the rest lost in a full ring): too few to tell"
    );
    let grown_mib = procfs::rss_kib(pid).saturating_sub(idle_kib) / 1024;
    eprintln!("{seen} stuffed queries parsed: the agent grew by {grown_mib} MiB");
    assert!(
        grown_mib < BOUND_MIB,
        "the agent grew by {grown_mib} MiB for {seen} stuffed queries (bound {BOUND_MIB} MiB)"
    );
    agent.stop();
}
