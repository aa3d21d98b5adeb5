//! Synthetic connections written straight into an agent's pinned flow map: a million
//! live connections in seconds, for the poll's benchmarks and the tests of a long poll.

use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, PerCpuArray, PerCpuValues};
use monitor_common::{
    flow::{DirStats, FlowKey, FlowValue, tcp_flags},
    names,
};

use crate::{
    agent::Agent,
    lab::{self, Lab},
};

/// A pin directory under /sys/fs/bpf for one agent, removed even when the test fails.
pub struct Pins(PathBuf);

impl Pins {
    /// `/sys/fs/bpf/monitor-<tag>-<pid>`; the agent creates it.
    pub fn new(tag: &str) -> Pins {
        Pins(PathBuf::from(format!(
            "/sys/fs/bpf/monitor-{tag}-{}",
            std::process::id()
        )))
    }

    pub fn root(&self) -> &Path {
        &self.0
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.0.join("maps").join(name)
    }

    pub fn flows(&self) -> PathBuf {
        self.map(names::FLOW_MAP)
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = monitor::kernel::pins::remove(&self.0);
    }
}

/// The agent on gw's loopback (no traffic of its own) with its maps pinned in `pins`,
/// room for `entries` synthetic connections twice over, connections kept an hour idle,
/// and polls `poll_interval` apart.
pub fn start_agent(lab: &Lab, pins: &Pins, entries: u32, poll_interval: &str) -> Agent {
    let capacity = (entries * 2).to_string();
    Agent::start_seeing_host(
        &lab.gw,
        "lo",
        &[
            "--pin-path",
            pins.root().to_str().expect("UTF-8 path"),
            "--flow-map-size",
            &capacity,
            "--idle-timeout",
            "1h",
            "--poll-interval",
            poll_interval,
            "--local-net",
            lab::LOCAL_NET_V4,
        ],
    )
}

/// One direction of a synthetic connection active until `now_ns`: 10 packets, 10 kB.
pub fn active(tcp_flags: u8, now_ns: u64) -> DirStats {
    DirStats {
        pkts: 10,
        ip_bytes: 10_000,
        bytes: 9_480,
        first_ns: now_ns - 1_000_000_000,
        last_ns: now_ns,
        tcp_flags,
        ..DirStats::default()
    }
}

/// Connection `n`: a TCP connection from a local host (198.18.0.2 or 198.18.1.2) to a
/// remote one, both ways active.
pub fn synthetic(n: u32, now_ns: u64) -> (FlowKey, FlowValue) {
    let mut key = FlowKey {
        port_a: 1024 + (n % 60_000) as u16,
        port_b: 443,
        proto: 6,
        family: 4,
        ..FlowKey::default()
    };
    key.addr_a[..4].copy_from_slice(&[198, 18, (n >> 24) as u8 & 1, 2]);
    key.addr_b[..4].copy_from_slice(&[10, (n >> 16) as u8, (n >> 8) as u8, n as u8]);
    let value = FlowValue {
        dir: [
            active(tcp_flags::ACK | tcp_flags::PSH, now_ns),
            active(tcp_flags::ACK, now_ns),
        ],
        ifindex: 1,
        epoch: 0,
    };
    (key, value)
}

/// Writes connections `0..entries` into the pinned flow map, active now. The programs
/// name each entry they write to the agent; these writes are named by counting a lost
/// change, after which the agent reads the whole map.
pub fn fill(pins: &Pins, entries: u32) {
    let data = MapData::from_pin(pins.flows()).expect("open the pinned flow map");
    let mut map =
        HashMap::<MapData, FlowKey, FlowValue>::try_from(Map::HashMap(data)).expect("a hash map");
    let now = monitor::clock::monotonic_ns();
    for n in 0..entries {
        let (key, value) = synthetic(n, now);
        map.insert(&key, &value, 0)
            .expect("insert a synthetic connection");
    }
    lose_a_change(pins);
}

/// Adds one to the pinned `CHANGES_LOST`: the agent's next poll reads the whole map.
pub fn lose_a_change(pins: &Pins) {
    let data =
        MapData::from_pin(pins.map(names::CHANGES_LOST_MAP)).expect("open the pinned CHANGES_LOST");
    let mut map =
        PerCpuArray::<MapData, u64>::try_from(Map::PerCpuArray(data)).expect("a per-CPU array");
    let mut values: Vec<u64> = map.get(&0, 0).expect("read CHANGES_LOST").to_vec();
    values[0] += 1;
    let values = PerCpuValues::try_from(values).expect("one value per possible CPU");
    map.set(0, values, 0).expect("write CHANGES_LOST");
}
