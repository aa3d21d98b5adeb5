//! The flow map under parallel load: one connection's packets counted by CPUs 0 and 1 at
//! the same time must all be counted. The map is shared by the CPUs, so a count that is
//! not an atomic read-modify-write loses packets here (two CPUs read the same old value,
//! both write back their own sum).
//!
//! Two threads, one pinned to each CPU, start together and run the same frame through
//! `BPF_PROG_TEST_RUN` with a large `repeat`, over and over; then the entry must hold
//! exactly every run's packets and bytes. The same again with the two directions of the
//! connection, one per CPU, and with TC on one CPU and XDP on the other.

use std::{net::Ipv4Addr, sync::Barrier, thread};

use aya::programs::TestRunOptions;
use monitor_common::flow::FlowKey;
use tests::{
    bpf::K,
    kernel_harness::{Counts, Flow, Hook, Kernel},
    packet::{
        Frame,
        tcp_flags::{ACK, PSH},
    },
    traffic::pin_to_cpu,
};

const PAYLOAD: usize = 1000;
/// IPv4 and TCP headers of the frames below.
const HEADERS: u64 = 40;
/// Runs per test_run call, and calls per thread: 2M packets per CPU, about 0.3 s.
const REPEAT: u32 = 250_000;
const CALLS: u32 = 8;
/// XDP test_run with `repeat > 1` swaps the dispatcher (an RCU wait per call): fewer,
/// longer calls.
const XDP_CALLS: u32 = 2;

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);

fn upload() -> Vec<u8> {
    Frame::eth()
        .ipv4(CLIENT, SERVER)
        .tcp(40000, 443, PSH | ACK)
        .payload_len(PAYLOAD)
        .build()
}

fn download() -> Vec<u8> {
    Frame::eth()
        .ipv4(SERVER, CLIENT)
        .tcp(443, 40000, PSH | ACK)
        .payload_len(PAYLOAD)
        .build()
}

/// The connection's key: the client's endpoint is the smaller, so it is `a`.
fn key() -> FlowKey {
    let mut key = FlowKey {
        port_a: 40000,
        port_b: 443,
        proto: 6,
        family: 4,
        ..FlowKey::default()
    };
    key.addr_a[..4].copy_from_slice(&CLIENT.octets());
    key.addr_b[..4].copy_from_slice(&SERVER.octets());
    key
}

/// Runs `frame` at `hook` `calls` times `repeat` times.
fn run(k: &Kernel, hook: Hook, frame: &[u8], calls: u32) {
    for _ in 0..calls {
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat: REPEAT,
            ..TestRunOptions::default()
        };
        k.test_run(hook, opts)
            .unwrap_or_else(|e| panic!("{hook:?}: test_run: {e:?}"));
    }
}

/// CPU 0 and CPU 1 each run their frame at their hook at the same time, on one copy of
/// the kernel object with `xdp_ingress` and `tc_egress` loaded (fresh maps, which both
/// programs share); returns the connection's entry afterwards, checked by the harness
/// (among others: its interface, and its timestamps within the runs).
fn on_two_cpus(cpu0: (Hook, &[u8], u32), cpu1: (Hook, &[u8], u32)) -> Flow {
    let k = Kernel::load(&[Hook::Xdp, Hook::TcEgress]);
    let start = Barrier::new(2);
    thread::scope(|scope| {
        for (cpu, (hook, frame, calls)) in [(0, cpu0), (1, cpu1)] {
            let (k, start) = (&k, &start);
            scope.spawn(move || {
                pin_to_cpu(cpu);
                start.wait();
                run(k, hook, frame, calls);
            });
        }
    });
    let flows = k.flows();
    let entries: Vec<FlowKey> = flows.keys().copied().collect();
    assert_eq!(entries, [key()], "the flow map holds the one connection");
    flows[&key()]
}

/// Asserts direction `dir` of `flow` counted exactly `runs` frames.
#[track_caller]
fn assert_counted(flow: &Flow, dir: usize, runs: u64) {
    let d = &flow.dir[dir];
    let payload = PAYLOAD as u64;
    assert_eq!(
        (d.pkts, d.ip_bytes, d.bytes),
        (runs, runs * (HEADERS + payload), runs * payload),
        "{}: direction {dir}: packets, IP bytes, payload bytes after {runs} runs \
         ({} packets lost)",
        K(&key()),
        runs.saturating_sub(d.pkts)
    );
    assert_eq!(d.tcp_flags, PSH | ACK, "direction {dir}: flags");
    assert!(
        0 < flow.first_ns[dir] && flow.first_ns[dir] <= flow.last_ns[dir],
        "direction {dir}: first {} last {}",
        flow.first_ns[dir],
        flow.last_ns[dir]
    );
}

#[test]
fn one_direction_from_two_cpus_counts_every_packet() {
    let frame = upload();
    let value = on_two_cpus(
        (Hook::TcEgress, &frame, CALLS),
        (Hook::TcEgress, &frame, CALLS),
    );
    assert_counted(&value, 0, 2 * u64::from(CALLS * REPEAT));
    assert_eq!(
        value.dir[1],
        Counts::default(),
        "nothing counted the other way"
    );
}

#[test]
fn both_directions_on_two_cpus_count_every_packet() {
    let (up, down) = (upload(), download());
    let value = on_two_cpus((Hook::TcEgress, &up, CALLS), (Hook::TcEgress, &down, CALLS));
    assert_counted(&value, 0, u64::from(CALLS * REPEAT));
    assert_counted(&value, 1, u64::from(CALLS * REPEAT));
}

#[test]
fn xdp_and_tc_on_two_cpus_count_every_packet() {
    let frame = upload();
    let value = on_two_cpus(
        (Hook::Xdp, &frame, XDP_CALLS),
        (Hook::TcEgress, &frame, CALLS),
    );
    assert_counted(&value, 0, u64::from((XDP_CALLS + CALLS) * REPEAT));
}
