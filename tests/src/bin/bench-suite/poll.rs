//! The agent's poll with 10k, 100k and 1M live connections. The agent (release build)
//! runs with `--pin-path`, so the benchmark can fill the very map it polls with synthetic
//! connections (their last packet "now", a 1 h idle timeout), which carry nothing after
//! the one whole read that takes them in. Measured over a
//! window of polls: the mean poll time (the agent's own poll_duration_seconds histogram),
//! the agent's CPU time per second of wall time (/proc/PID/stat), and its resident memory
//! beyond what it held with an empty map, per connection. Beside it, the floor of reading
//! such a map per map kind: a per-CPU and a shared hash of the same sizes, read in turn.

use std::{
    net::{Ipv4Addr, UdpSocket},
    os::fd::AsFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use monitor::{
    kernel::bpf::{self, Lookup, RawMap},
    poller::Poller,
};
use monitor_common::{
    flow::{FlowKey, FlowValue},
    names,
};
use tests::{
    flowmap::{self, Pins, fill},
    http,
    lab::{self, Lab},
    procfs,
};

use crate::{
    Plan, median,
    refprog::{self, Table},
};

const METRICS: &str = "127.0.0.1:9877";

pub struct Row {
    pub entries: u32,
    pub poll_ms: f64,
    /// The agent's map reader alone (the benchmark runs it on the same map): the floor.
    pub read_ms: f64,
    pub cpu_per_sec: f64,
    pub bytes_per_conn: f64,
}

/// Reads the pinned flow map as the agent's poller does, `times` times; the median ms.
fn read_alone(pins: &Pins, times: u32) -> f64 {
    let flows = MapData::from_pin(pins.flows()).expect("open the pinned flow map");
    let stats = MapData::from_pin(pins.map(names::STATS_MAP)).expect("open the stats map");
    let mut poller = Poller::new(Map::HashMap(flows), Map::PerCpuArray(stats));
    median((0..times).map(|_| {
        let started = Instant::now();
        let mut entries = 0u64;
        poller
            .snapshot(|_| entries += 1)
            .expect("read the flow map");
        assert!(entries > 0, "the pinned map is empty");
        started.elapsed().as_secs_f64() * 1000.0
    }))
}

fn metric(body: &str, name: &str) -> f64 {
    http::sample(body, name).unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

/// The agent's /metrics at both ends of a window, and its CPU seconds and the wall-clock
/// seconds in between.
struct Window {
    before: String,
    after: String,
    cpu: f64,
    wall: f64,
}

impl Window {
    fn measure(lab: &Lab, pid: u32, window: Duration) -> Window {
        let before = scrape(lab);
        let cpu_before = procfs::cpu_secs(pid);
        let started = Instant::now();
        thread::sleep(window);
        let after = scrape(lab);
        Window {
            before,
            after,
            cpu: procfs::cpu_secs(pid) - cpu_before,
            wall: started.elapsed().as_secs_f64(),
        }
    }
}

/// Fills the pinned map with `entries` synthetic connections and waits until the agent
/// tracks them all. The scrapes themselves cross the watched loopback: a few more.
fn fill_and_track(lab: &Lab, pins: &Pins, entries: u32) {
    fill(pins, entries);
    http::eventually(
        "the agent tracking every synthetic connection",
        Duration::from_secs(120),
        || {
            (metric(&scrape(lab), "egress_monitor_connections_active") as u32 >= entries)
                .then_some(())
        },
    );
}

fn scrape(lab: &Lab) -> String {
    http::eventually("the agent's /metrics", Duration::from_secs(30), || {
        http::get(&lab.gw, METRICS, "/metrics")
    })
}

fn rss_bytes(pid: u32) -> f64 {
    procfs::rss_kib(pid) as f64 * 1024.0
}

fn sizes(plan: &Plan) -> &'static [u32] {
    if plan.quick {
        &[10_000, 100_000]
    } else {
        &[10_000, 100_000, 1_000_000]
    }
}

/// One line of the map-read floor table.
pub struct ReadRow {
    pub entries: u32,
    pub per_cpu_ms: f64,
    pub shared_ms: f64,
    /// The shared map read key by key, as the agent reads the entries the rings name.
    pub by_key_ms: f64,
}

/// `BPF_MAP_LOOKUP_BATCH` of every entry of a per-CPU and of a shared hash map with the
/// flow map's key and value sizes and the capacity the poll runs give the agent (twice the
/// entries), filled alike; the two maps are read in turn, run after run, then the shared
/// one key by key.
pub fn read_floor(plan: &Plan) -> Vec<ReadRow> {
    let value_size = size_of::<FlowValue>() as u32;
    sizes(plan)
        .iter()
        .map(|&entries| {
            eprintln!("bench: reading per-CPU and shared maps of {entries} entries");
            let maps = [Table::PerCpu, Table::Shared].map(|table| {
                let map = refprog::flow_map(table, value_size, entries * 2)
                    .expect("create a flow-sized hash map");
                refprog::fill(&map, entries).expect("fill the map");
                (map, table)
            });
            let mut ms = [Vec::new(), Vec::new(), Vec::new()];
            for _ in 0..plan.runs {
                for ((map, table), ms) in maps.iter().zip(&mut ms) {
                    let started = Instant::now();
                    let read = refprog::read_batched(map).expect("read the map");
                    ms.push(started.elapsed().as_secs_f64() * 1000.0);
                    assert_eq!(
                        read, entries as usize,
                        "entries read from the {table:?} map"
                    );
                }
                let started = Instant::now();
                let found = read_by_key(&maps[1].0, entries);
                ms[2].push(started.elapsed().as_secs_f64() * 1000.0);
                assert_eq!(found, entries, "entries looked up in the shared map");
            }
            let [per_cpu, shared, by_key] = ms;
            ReadRow {
                entries,
                per_cpu_ms: median(per_cpu),
                shared_ms: median(shared),
                by_key_ms: median(by_key),
            }
        })
        .collect()
}

/// Looks up each of the `entries` keys [`refprog::fill`] wrote, one `BPF_MAP_LOOKUP_ELEM`
/// each, the way the agent's poller reads an entry its rings name; returns those found.
fn read_by_key(map: &RawMap, entries: u32) -> u32 {
    let fd = map
        .as_fd()
        .try_clone_to_owned()
        .expect("duplicate the map's fd");
    let data = MapData::from_fd(fd).expect("open the map by its fd");
    let flows = HashMap::<_, FlowKey, FlowValue>::try_from(Map::HashMap(data))
        .expect("the map as the agent's flow map");
    let (mut key, mut value) = (FlowKey::default(), FlowValue::default());
    let mut found = 0;
    for n in 0..entries {
        key.addr_a[..4].copy_from_slice(&n.to_le_bytes());
        if bpf::lookup(&flows, Lookup::Read, &key, &mut value).expect("look a key up") {
            found += 1;
        }
    }
    found
}

pub fn measure(plan: &Plan) -> Vec<Row> {
    let sizes = sizes(plan);
    let window = if plan.quick {
        Duration::from_secs(4)
    } else {
        Duration::from_secs(10)
    };
    let mut rows = Vec::new();
    for &entries in sizes {
        let mut poll_ms = Vec::new();
        let mut read_ms = Vec::new();
        let mut cpu = Vec::new();
        let mut per_conn = Vec::new();
        for run in 0..plan.runs {
            eprintln!("bench: poll with {entries} connections, run {}", run + 1);
            let (ms, read, c, b) = one_run(entries, window);
            poll_ms.push(ms);
            read_ms.push(read);
            cpu.push(c);
            per_conn.push(b);
        }
        rows.push(Row {
            entries,
            poll_ms: median(poll_ms),
            read_ms: median(read_ms),
            cpu_per_sec: median(cpu),
            bytes_per_conn: median(per_conn),
        });
    }
    rows
}

fn one_run(entries: u32, window: Duration) -> (f64, f64, f64, f64) {
    let lab = Lab::new();
    let pins = Pins::new("bench-poll");
    let agent = flowmap::start_agent(&lab, &pins, entries, "1s");
    let pid = agent.pid();
    // A few empty polls: what the agent holds before any connection.
    thread::sleep(Duration::from_secs(3));
    let empty_rss = rss_bytes(pid);
    fill_and_track(&lab, &pins, entries);
    // Two more polls so every per-connection structure exists, then the window.
    thread::sleep(Duration::from_secs(2));
    let Window {
        before,
        after,
        cpu,
        wall,
    } = Window::measure(&lab, pid, window);
    let rss = rss_bytes(pid);
    agent.stop();
    // The agent is gone, its maps stay pinned: the reader alone, on the same entries.
    let read_ms = read_alone(&pins, 3);
    let delta = |name: &str| metric(&after, name) - metric(&before, name);
    let polls = delta("egress_monitor_poll_duration_seconds_count");
    assert!(polls > 0.0, "no poll in the window");
    let poll_ms = delta("egress_monitor_poll_duration_seconds_sum") / polls * 1000.0;
    (
        poll_ms,
        read_ms,
        cpu / wall,
        (rss - empty_rss) / f64::from(entries),
    )
}

const DISCARD_PORT: u16 = 9;

pub struct BusyRow {
    pub entries: u32,
    pub active: u32,
    pub poll_ms: f64,
    /// The agent's map reader alone on the same map after the agent stopped: what a
    /// whole read costs.
    pub read_ms: f64,
    pub cpu_per_sec: f64,
    /// Map entries the agent read per poll (`poll_entries_read`, sampled at the end).
    pub entries_read: f64,
    /// Polls of the window that read the whole map, per poll.
    pub whole_share: f64,
}

/// The cases of the busy part: synthetic idle connections and real active ones. 1% of a
/// million moving, then every connection of a table of [`ALL_ACTIVE`] moving.
pub const BUSY_CASES: [(u32, u32); 2] = [(990_000, 10_000), (0, ALL_ACTIVE)];

/// Connections of the case where every one carries packets each second.
const ALL_ACTIVE: u32 = 50_000;

/// The agent on a map of synthetic connections (idle since the fill, an hour from their
/// timeout) while real UDP connections on gw's loopback each carry one packet per
/// second, spread over the second; a case per [`BUSY_CASES`].
pub fn measure_busy(plan: &Plan) -> Vec<BusyRow> {
    let window = if plan.quick {
        Duration::from_secs(4)
    } else {
        Duration::from_secs(10)
    };
    BUSY_CASES
        .iter()
        .map(|&(entries, active)| {
            let runs: Vec<BusyRow> = (0..plan.runs)
                .map(|run| {
                    eprintln!(
                        "bench: poll with {} connections, {active} of them active, run {}",
                        entries + active,
                        run + 1
                    );
                    busy_run(entries, active, window)
                })
                .collect();
            let med = |f: fn(&BusyRow) -> f64| median(runs.iter().map(f));
            BusyRow {
                entries: entries + active,
                active,
                poll_ms: med(|r| r.poll_ms),
                read_ms: med(|r| r.read_ms),
                cpu_per_sec: med(|r| r.cpu_per_sec),
                entries_read: med(|r| r.entries_read),
                whole_share: med(|r| r.whole_share),
            }
        })
        .collect()
}

fn busy_run(idle: u32, active: u32, window: Duration) -> BusyRow {
    let lab = Lab::new();
    let pins = Pins::new("bench-poll-busy");
    let agent = flowmap::start_agent(&lab, &pins, idle + active, "1s");
    let pid = agent.pid();
    fill_and_track(&lab, &pins, idle);
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        lab::spawn_in_ns(&lab.gw, move || send_each_second(active, &stop))
    };
    // Every active connection opened and read once, then the window.
    thread::sleep(Duration::from_secs(3));
    let Window {
        before,
        after,
        cpu,
        wall,
    } = Window::measure(&lab, pid, window);
    stop.store(true, Ordering::Relaxed);
    sender.join().expect("the sender thread");
    agent.stop();
    let delta = |name: &str| metric(&after, name) - metric(&before, name);
    let polls = delta("egress_monitor_poll_duration_seconds_count");
    assert!(polls > 0.0, "no poll in the window");
    BusyRow {
        entries: idle + active,
        active,
        poll_ms: delta("egress_monitor_poll_duration_seconds_sum") / polls * 1000.0,
        read_ms: read_alone(&pins, 3),
        cpu_per_sec: cpu / wall,
        entries_read: metric(&after, "egress_monitor_poll_entries_read"),
        whole_share: delta("egress_monitor_poll_reads_total{coverage=\"whole\"}") / polls,
    }
}

/// One datagram per second to each of `active` loopback addresses (127.1.0.0/16), in
/// 100 bursts a second; a socket bound to every address takes them, so no ICMP answers.
fn send_each_second(active: u32, stop: &AtomicBool) {
    let sink = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, DISCARD_PORT)).expect("bind the sink");
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the sender");
    let per_burst = active / 100;
    let mut next = Instant::now();
    let mut n = 0u32;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..per_burst {
            let dst = Ipv4Addr::new(127, 1, (n >> 8) as u8, n as u8);
            socket
                .send_to(&[0; 64], (dst, DISCARD_PORT))
                .expect("send a datagram");
            n = (n + 1) % active;
        }
        next += Duration::from_millis(10);
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    drop(sink);
}
