//! What following address translation costs the agent. Learning: the agent's own NAT
//! stage (`monitor::nat::Nat`) in a masquerading lab gateway, reading the conntrack
//! events of real translated connections (one UDP datagram from the LAN host to each of
//! many ports of the wan host), and reading the whole conntrack table of them as at start.
//! The poll: the table stage of a poll (the map read excluded, measured in the poll
//! table) over the same synthetic connections with none and with every one translated,
//! and the memory the translations add.

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use monitor::{
    conntable::{ConnTable, Endpoint, Uids},
    nat::{Entry, Nat, Tuple},
    poller::FlowSnapshot,
};
use monitor_common::flow::{FlowKey, tcp_flags};
use tests::{
    flowmap::active,
    lab::{self, Lab, run_in_ns},
    procfs,
};

use crate::{Plan, median};

pub struct LearnRow {
    pub translations: u32,
    /// Reading the events of new entries, per translation learned.
    pub event_us: f64,
    /// Reading the whole table at start, per entry.
    pub dump_us: f64,
}

pub struct PollRow {
    pub connections: u32,
    /// Every entry handed to the table as read, as before the NAT stage existed.
    pub direct_ms: f64,
    /// Through the NAT stage, nothing translated.
    pub untranslated_ms: f64,
    pub translated_ms: f64,
    /// Resident memory the translations add, per translated connection.
    pub bytes_per_translation: f64,
}

/// Datagrams sent between two reads of the event socket: its receive buffer holds them.
pub const BURST: u32 = 2_000;

pub fn learn(plan: &Plan) -> LearnRow {
    let translations = if plan.quick { 10_000 } else { 50_000 };
    let (mut event_us, mut dump_us) = (Vec::new(), Vec::new());
    for run in 0..plan.runs {
        eprintln!(
            "bench: learning {translations} translations, run {}",
            run + 1
        );
        let lab = Lab::masquerading();
        let mut nat = run_in_ns(&lab.gw, Nat::follow);
        let sender = run_in_ns(&lab.lan, || UdpSocket::bind("0.0.0.0:0")).expect("UDP socket");
        let mut reading = Duration::ZERO;
        for start in (0..translations).step_by(BURST as usize) {
            for n in start..(start + BURST).min(translations) {
                let port = 1024 + n as u16;
                let to = SocketAddr::new(lab::WAN_HOST_V4.into(), port);
                sender.send_to(&[0u8; 8], to).expect("send a datagram");
            }
            let started = Instant::now();
            nat.refresh();
            reading += started.elapsed();
        }
        let learned = nat.translations();
        assert!(
            learned >= translations as usize,
            "learned {learned} of {translations} translations"
        );
        event_us.push(reading.as_secs_f64() * 1e6 / learned as f64);
        let started = Instant::now();
        let again = run_in_ns(&lab.gw, Nat::follow);
        let dumped = again.translations();
        assert!(dumped >= translations as usize, "dumped {dumped}");
        dump_us.push(started.elapsed().as_secs_f64() * 1e6 / dumped as f64);
    }
    LearnRow {
        translations,
        event_us: median(event_us),
        dump_us: median(dump_us),
    }
}

/// Connection `n` as the WAN side's map has it: the gateway's address and port to a
/// remote host of its own; and the conntrack entry that translated it from LAN host `n`.
fn translated(n: u32, now_ns: u64) -> (FlowSnapshot, Entry) {
    let public = Endpoint {
        addr: lab::GW_WAN_V4.into(),
        port: 1024 + (n % 60_000) as u16,
    };
    let lan = Endpoint {
        addr: [198, 18 + ((n >> 16) & 1) as u8, (n >> 8) as u8, n as u8].into(),
        port: 40_000,
    };
    let remote_octets = [10, (n >> 16) as u8, (n >> 8) as u8, n as u8];
    let remote = Endpoint {
        addr: remote_octets.into(),
        port: 443,
    };
    let mut key = FlowKey {
        port_a: remote.port,
        port_b: public.port,
        proto: 6,
        family: 4,
        ..FlowKey::default()
    };
    key.addr_a[..4].copy_from_slice(&remote_octets);
    key.addr_b[..4].copy_from_slice(&lab::GW_WAN_V4.octets());
    let snap = FlowSnapshot {
        key,
        dir: [
            active(tcp_flags::ACK, now_ns),
            active(tcp_flags::ACK | tcp_flags::PSH, now_ns),
        ],
        ifindex: 1,
    };
    let tuple = |src: Endpoint, dst: Endpoint| Tuple {
        src: src.addr,
        dst: dst.addr,
        sport: src.port,
        dport: dst.port,
    };
    let entry = Entry {
        id: n,
        proto: 6,
        orig: tuple(lan, remote),
        reply: tuple(remote, public),
    };
    (snap, entry)
}

/// Two polls' table stage over `snaps` (the second timed, in ms), each entry handed to
/// the table directly (no NAT stage) or through `nat`, the way the agent does.
fn table_stage(table: &mut ConnTable, mut nat: Option<&mut Nat>, snaps: &[FlowSnapshot]) -> f64 {
    let mut ms = 0.0;
    for _ in 0..2 {
        let started = Instant::now();
        let read: Result<(), ()> = table.observe_map(|observe| {
            match nat.as_deref_mut() {
                Some(nat) => {
                    for snap in snaps {
                        nat.route(*snap, observe);
                    }
                    nat.end_read(observe);
                }
                None => snaps.iter().for_each(|s| observe(*s)),
            }
            Ok(())
        });
        read.expect("an in-memory read");
        if let Some(nat) = nat.as_deref_mut() {
            nat.settle_read(table);
        }
        ms = started.elapsed().as_secs_f64() * 1000.0;
        let translated = nat.as_deref().map_or(0, |nat| {
            table.iter().filter(|c| nat.of(&c.key).is_some()).count()
        });
        assert!(translated == 0 || translated == snaps.len(), "{translated}");
    }
    assert_eq!(table.len(), snaps.len(), "one connection per entry");
    ms
}

fn new_table() -> ConnTable {
    ConnTable::new(Duration::from_secs(3600), Uids::new([1, 2]))
}

pub fn poll(plan: &Plan) -> PollRow {
    let connections = if plan.quick { 100_000 } else { 1_000_000 };
    let now = monitor::clock::monotonic_ns();
    let (snaps, entries): (Vec<FlowSnapshot>, Vec<Entry>) =
        (0..connections).map(|n| translated(n, now)).unzip();
    let pid = std::process::id();
    let (mut direct, mut plain, mut with_nat, mut memory) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..plan.runs {
        eprintln!(
            "bench: table stage with {connections} connections, run {}",
            run + 1
        );
        let rss = || procfs::rss_kib(pid) as f64 * 1024.0;
        let start = rss();
        let mut table = new_table();
        direct.push(table_stage(&mut table, None, &snaps));
        let table_bytes = rss() - start;
        plain.push(table_stage(
            &mut new_table(),
            Some(&mut Nat::without_conntrack()),
            &snaps,
        ));
        let before = rss();
        let mut nat = Nat::without_conntrack();
        for entry in &entries {
            nat.learn(entry);
        }
        let mut translated_table = new_table();
        with_nat.push(table_stage(&mut translated_table, Some(&mut nat), &snaps));
        memory.push((rss() - before - table_bytes) / f64::from(connections));
    }
    PollRow {
        connections,
        direct_ms: median(direct),
        untranslated_ms: median(plain),
        translated_ms: median(with_nat),
        bytes_per_translation: median(memory),
    }
}
