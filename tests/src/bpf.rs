//! Small helpers for tests that run the kernel programs through BPF_PROG_TEST_RUN, and
//! for benchmarks that read the run-time statistics of a process's programs.

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, BorrowedFd},
    time::Duration,
};

use aya::programs::loaded_programs;

use monitor_common::flow::FlowKey;

/// A flow key written for people: `proto 6 family 4: [10.0.0.1]:40000 <-> [10.0.0.2]:443`.
pub struct K<'a>(pub &'a FlowKey);

impl fmt::Display for K<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = self.0;
        let (a, b) = if k.family == 4 {
            let a: [u8; 4] = k.addr_a[..4].try_into().expect("4 bytes");
            let b: [u8; 4] = k.addr_b[..4].try_into().expect("4 bytes");
            (Ipv4Addr::from(a).to_string(), Ipv4Addr::from(b).to_string())
        } else {
            (
                Ipv6Addr::from(k.addr_a).to_string(),
                Ipv6Addr::from(k.addr_b).to_string(),
            )
        };
        write!(
            f,
            "proto {} family {}: [{a}]:{} <-> [{b}]:{}",
            k.proto, k.family, k.port_a, k.port_b
        )
    }
}

/// The index of `lo` in this thread's namespace: where test_run runs the programs.
pub fn loopback_ifindex() -> u32 {
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    assert_ne!(index, 0, "this network namespace has no lo");
    index
}

/// The IDs of the BPF programs process `pid` holds open (the `prog_id` of its fds in
/// /proc/PID/fdinfo): exactly its own programs, even when other processes load programs
/// of the same names.
pub fn prog_ids_of(pid: u32) -> Vec<u32> {
    let dir = format!("/proc/{pid}/fdinfo");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {dir}: {e}"));
    let mut ids: Vec<u32> = entries
        .flatten()
        .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
        .filter_map(|info| prog_id_in(&info))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The ID of the BPF program behind this process's descriptor `fd`.
pub fn prog_id(fd: BorrowedFd<'_>) -> u32 {
    let path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let info = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    prog_id_in(&info).unwrap_or_else(|| panic!("{path} names no BPF program: {info}"))
}

/// The `prog_id` line of an fdinfo file.
fn prog_id_in(info: &str) -> Option<u32> {
    info.lines()
        .find_map(|l| l.strip_prefix("prog_id:")?.trim().parse().ok())
}

/// Summed run count and run time of programs `ids`, as counted while bpf_stats are on
/// (`aya::sys::enable_stats`).
pub fn run_stats(ids: &[u32]) -> (u64, Duration) {
    loaded_programs()
        .flatten()
        .filter(|info| ids.contains(&info.id()))
        .fold((0, Duration::ZERO), |(runs, time), info| {
            (runs + info.run_count(), time + info.run_time())
        })
}
