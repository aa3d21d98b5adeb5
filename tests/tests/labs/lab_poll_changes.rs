//! Polls read what moved: with thousands of idle connections in the map, a poll reads the
//! entries that changed since the poll before, and the counts stay exact. The agent runs
//! with `--pin-path`, so the test fills the very map it polls with synthetic connections
//! (idle, an hour from their timeout) and reads the map's own counts to compare.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    thread,
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData};
use monitor_common::{
    flow::{FlowKey, FlowValue},
    names,
};
use tests::{
    agent::Agent,
    flowmap::{self, Pins, fill},
    http,
    lab::{self, Lab},
};

const ENTRIES: u32 = 20_000;
const FLOWS: u16 = 50;
const ROUNDS: u32 = 30;
/// Two addresses of the local network on gw's loopback: their traffic is the only
/// `internal` traffic the agent sees.
const HOST_A: Ipv4Addr = Ipv4Addr::new(198, 18, 99, 1);
const HOST_B: Ipv4Addr = Ipv4Addr::new(198, 18, 99, 2);
const PORT: u16 = 9000;
/// The agent's packets between two local hosts.
const INTERNAL: &str = "egress_monitor_packets_total{direction=\"internal\"}";

fn sample(ns: &str, name: &str) -> f64 {
    http::eventually(name, Duration::from_secs(30), || {
        http::agent_sample(ns, name)
    })
}

/// A lab whose gw holds both hosts on its loopback.
fn lab_with_hosts() -> Lab {
    let lab = Lab::new();
    for host in [HOST_A, HOST_B] {
        lab::ns_exec(
            &lab.gw,
            &["ip", "addr", "add", &format!("{host}/32"), "dev", "lo"],
        );
    }
    lab
}

/// Waits until the agent's internal packets are `truth`, the map's.
fn wait_for_agent_to_count(lab: &Lab, truth: u64) {
    http::eventually(
        "the agent's internal packets to match the map's",
        Duration::from_secs(20),
        || (sample(&lab.gw, INTERNAL) as u64 == truth).then_some(()),
    );
}

/// Packets the map holds between the two hosts, both ways: what the agent must report.
fn counted_between_hosts(pins: &Pins) -> u64 {
    let data = MapData::from_pin(pins.flows()).expect("open the pinned flow map");
    let map =
        HashMap::<MapData, FlowKey, FlowValue>::try_from(Map::HashMap(data)).expect("a hash map");
    let host = |addr: &[u8; 16]| addr[..4] == HOST_A.octets() || addr[..4] == HOST_B.octets();
    map.iter()
        .map(|entry| entry.expect("read an entry"))
        .filter(|(key, _)| key.family == 4 && host(&key.addr_a) && host(&key.addr_b))
        .map(|(_, value)| value.dir.iter().map(|d| d.pkts).sum::<u64>())
        .sum()
}

/// Polls of each coverage so far.
fn reads(lab: &Lab, coverage: &str) -> f64 {
    sample(
        &lab.gw,
        &format!("egress_monitor_poll_reads_total{{coverage=\"{coverage}\"}}"),
    )
}

/// The agent, polling every 100 ms, once it tracks [`ENTRIES`] idle synthetic
/// connections the test wrote to its map.
fn agent_tracking_idle_entries(lab: &Lab, pins: &Pins) -> Agent {
    let agent = flowmap::start_agent(lab, pins, ENTRIES, "100ms");
    fill(pins, ENTRIES);
    http::eventually(
        "the agent tracking every synthetic connection",
        Duration::from_secs(60),
        || {
            let active = http::agent_sample(&lab.gw, "egress_monitor_connections_active")?;
            (active as u32 >= ENTRIES).then_some(())
        },
    );
    agent
}

/// From `clients` sockets of host A to host B: `rounds` rounds `pause` apart, in which
/// each client `n` sends a datagram if `sends(n, round)`.
fn send_rounds(
    lab: &Lab,
    clients: u16,
    rounds: u32,
    pause: Duration,
    sends: impl Fn(usize, u32) -> bool + Send + 'static,
) {
    lab::run_in_ns(&lab.gw, move || {
        let server = UdpSocket::bind(SocketAddr::from((HOST_B, PORT))).expect("bind the server");
        let clients: Vec<UdpSocket> = (0..clients)
            .map(|_| UdpSocket::bind(SocketAddr::from((HOST_A, 0))).expect("bind a client"))
            .collect();
        for round in 0..rounds {
            for (n, client) in clients.iter().enumerate() {
                if sends(n, round) {
                    client
                        .send_to(&[0; 100], (HOST_B, PORT))
                        .expect("send a datagram");
                }
            }
            thread::sleep(pause);
        }
        drop(server);
    });
}

#[test]
fn a_poll_reads_only_the_entries_that_changed_and_misses_none() {
    let lab = lab_with_hosts();
    let pins = Pins::new("test-poll-changes");
    let agent = agent_tracking_idle_entries(&lab, &pins);
    let changed_before = reads(&lab, "changed");
    // Packets of a few connections now and then, across many polls, each poll meeting
    // some mid-burst.
    send_rounds(
        &lab,
        FLOWS,
        ROUNDS,
        Duration::from_millis(30),
        |n, round| !(n as u32 + round).is_multiple_of(3),
    );
    let truth = counted_between_hosts(&pins);
    assert!(truth > 0, "the programs counted the test's packets");
    wait_for_agent_to_count(&lab, truth);
    // Polls after the traffic: nothing new but the scrapes' own connections.
    thread::sleep(Duration::from_millis(500));
    let read = sample(&lab.gw, "egress_monitor_poll_entries_read");
    let changed = reads(&lab, "changed") - changed_before;
    let whole = reads(&lab, "whole");
    assert!(
        read < f64::from(ENTRIES) / 100.0,
        "the last poll read {read} entries of {ENTRIES} idle ones"
    );
    assert!(changed >= 10.0, "{changed} polls read only what changed");
    assert!(
        whole >= 1.0,
        "the first poll and the one after the fill read it whole"
    );
    assert_eq!(
        sample(&lab.gw, INTERNAL) as u64,
        truth,
        "nothing counted since"
    );
    drop(agent);
}

/// New connections come with their counts (`NEW_ENTRIES`): one whose every packet falls
/// in the poll that creates it must still be read whole, the packets after its first
/// included. Each client sends a burst of datagrams back to back from a socket of its
/// own; the agent's counts must reach the map's. The idle entries keep the polls to
/// what changed, which they must be.
#[test]
fn a_new_connection_is_read_whole_when_its_packets_share_one_poll() {
    const CLIENTS: u16 = 300;
    const BURST: usize = 4;
    let lab = lab_with_hosts();
    let pins = Pins::new("test-poll-new-entries");
    let agent = agent_tracking_idle_entries(&lab, &pins);
    let whole_before = reads(&lab, "whole");
    lab::run_in_ns(&lab.gw, || {
        let server = UdpSocket::bind(SocketAddr::from((HOST_B, PORT))).expect("bind the server");
        for n in 0..CLIENTS {
            let client = UdpSocket::bind(SocketAddr::from((HOST_A, 0))).expect("bind a client");
            // Every other client sends one datagram: a connection its record tells whole.
            let burst = if n % 2 == 0 { BURST } else { 1 };
            for _ in 0..burst {
                client
                    .send_to(&[0; 100], (HOST_B, PORT))
                    .expect("send a datagram");
            }
        }
        drop(server);
    });
    let truth = counted_between_hosts(&pins);
    let sent = (usize::from(CLIENTS) / 2 * (BURST + 1)) as u64;
    assert!(
        truth >= sent,
        "the programs counted {truth} packets of the {sent} sent"
    );
    wait_for_agent_to_count(&lab, truth);
    assert_eq!(
        reads(&lab, "whole"),
        whole_before,
        "every poll since the connections began read only what changed"
    );
    drop(agent);
}

/// When most connections move, looking each up costs more than reading the map whole:
/// the polls read it whole, and the counts stay exact. 200 connections, every one
/// sending each 20 ms for a second and a half: each 100 ms poll finds them all changed.
#[test]
fn a_poll_reads_the_whole_map_when_most_of_it_changed() {
    const CLIENTS: u16 = 200;
    let lab = lab_with_hosts();
    let pins = Pins::new("test-poll-most-changed");
    let agent = flowmap::start_agent(&lab, &pins, 1_000, "100ms");
    sample(&lab.gw, "egress_monitor_poll_entries_read");
    let whole_before = reads(&lab, "whole");
    send_rounds(&lab, CLIENTS, 75, Duration::from_millis(20), |_, _| true);
    let truth = counted_between_hosts(&pins);
    assert!(truth > 0, "the programs counted the test's packets");
    wait_for_agent_to_count(&lab, truth);
    let whole = reads(&lab, "whole") - whole_before;
    assert!(
        whole >= 5.0,
        "only {whole} polls read the map whole while every connection moved"
    );
    drop(agent);
}

/// Programs that an earlier build left attached through pinned links never name what
/// they change (its pin directory has no `CHANGED`): every poll reads the whole map.
#[test]
fn programs_of_a_build_before_the_ring_are_read_whole() {
    let lab = Lab::new();
    let pins = Pins::new("test-poll-old-programs");
    let first = flowmap::start_agent(&lab, &pins, 1_000, "100ms");
    sample(&lab.gw, "egress_monitor_poll_entries_read");
    // SIGKILL leaves the links and maps pinned; without CHANGED they look like an older
    // build's.
    first.kill();
    std::fs::remove_file(pins.map(names::CHANGED_MAP)).expect("remove the pinned CHANGED");
    let second = flowmap::start_agent(&lab, &pins, 1_000, "100ms");
    http::eventually("a few polls", Duration::from_secs(30), || {
        let whole = http::agent_sample(
            &lab.gw,
            "egress_monitor_poll_reads_total{coverage=\"whole\"}",
        )?;
        (whole >= 5.0).then_some(())
    });
    let changed = reads(&lab, "changed");
    assert_eq!(
        changed, 0.0,
        "no poll trusted a ring the programs do not write"
    );
    assert!(
        second
            .stderr()
            .contains("every poll reads the whole flow map"),
        "the agent says why: {}",
        second.stderr()
    );
}
