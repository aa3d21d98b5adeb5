//! Map reads -> snapshots. The only reader of the flow and stats maps.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

use aya::maps::{Map, MapData, PerCpuArray, PerCpuHashMap};
use monitor_common::{
    flow::{DirStats, FlowKey, FlowValue},
    stats,
};

/// One connection's counts, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowSnapshot {
    pub key: FlowKey,
    /// Indexed like [`FlowValue::dir`]: `[a -> b, b -> a]`.
    pub dir: [DirStats; 2],
    pub ifindex: u32,
}

impl FlowSnapshot {
    /// Sums per-CPU copies: counts add, first is the earliest, last the latest, flags OR.
    pub fn merge(key: FlowKey, per_cpu: &[FlowValue]) -> Self {
        let mut snap = Self {
            key,
            ..Self::default()
        };
        for value in per_cpu {
            for (total, d) in snap.dir.iter_mut().zip(&value.dir) {
                merge_dir(total, d);
            }
            if snap.ifindex == 0 {
                snap.ifindex = value.ifindex;
            }
        }
        snap
    }
}

fn merge_dir(total: &mut DirStats, d: &DirStats) {
    if d.pkts == 0 {
        return;
    }
    total.pkts += d.pkts;
    total.ip_bytes += d.ip_bytes;
    total.bytes += d.bytes;
    if total.first_ns == 0 || d.first_ns < total.first_ns {
        total.first_ns = d.first_ns;
    }
    total.last_ns = total.last_ns.max(d.last_ns);
    total.tcp_flags |= d.tcp_flags;
    total.syn_only |= d.syn_only;
}

#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("reading the flow map: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("taking a finished entry from the flow map: {0}")]
    Take(#[source] io::Error),
    #[error("counting possible CPUs: {0}")]
    Cpus(#[source] io::Error),
}

pub struct Poller {
    flows: Map,
    stats: Map,
    nr_cpus: usize,
}

impl Poller {
    pub fn new(flows: Map, stats: Map) -> Result<Self, PollError> {
        let nr_cpus = aya::util::nr_cpus()
            .map_err(|(_, err)| PollError::Cpus(err))?
            .get() as usize;
        Ok(Self {
            flows,
            stats,
            nr_cpus,
        })
    }

    /// Every connection in the map now.
    pub fn snapshot(&self) -> Result<Vec<FlowSnapshot>, PollError> {
        let map = PerCpuHashMap::<&MapData, FlowKey, FlowValue>::try_from(&self.flows)?;
        let mut snaps = Vec::new();
        for entry in map.iter() {
            match entry {
                Ok((key, values)) => snaps.push(FlowSnapshot::merge(key, &values)),
                // Deleted between listing its key and reading it: it was taken.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(err) => return Err(err.into()),
            }
        }
        Ok(snaps)
    }

    /// Removes a connection from the map and returns its final counts, read and deleted
    /// in one step so no packet counted in between is lost. `None` when it is gone.
    pub fn take(&self, key: &FlowKey) -> Result<Option<FlowSnapshot>, PollError> {
        let Map::PerCpuHashMap(data) = &self.flows else {
            unreachable!("FLOWS is a per-CPU hash map");
        };
        let mut values = vec![FlowValue::default(); self.nr_cpus];
        lookup_and_delete(data.fd().as_fd().as_raw_fd(), key, &mut values)
            .map_err(PollError::Take)
            .map(|found| found.then(|| FlowSnapshot::merge(*key, &values)))
    }

    /// The STATS slots, summed over CPUs.
    pub fn counters(&self) -> Result<[u64; stats::SLOTS as usize], PollError> {
        let map = PerCpuArray::<&MapData, u64>::try_from(&self.stats)?;
        let mut out = [0; stats::SLOTS as usize];
        for (slot, total) in out.iter_mut().enumerate() {
            *total = map.get(&(slot as u32), 0)?.iter().sum();
        }
        Ok(out)
    }
}

// The kernel copies per-CPU values at an 8-byte stride; FlowValue's size makes the
// stride equal to the struct, so a plain slice receives them.
const _: () = assert!(size_of::<FlowValue>().is_multiple_of(8));

/// BPF_MAP_LOOKUP_AND_DELETE_ELEM (kernel >= 5.14 for hash maps), which aya 0.16 exposes
/// only for queues and stacks. Returns whether the key was there.
fn lookup_and_delete(map_fd: i32, key: &FlowKey, values: &mut [FlowValue]) -> io::Result<bool> {
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    // The leading fields of `union bpf_attr` for map element commands.
    #[repr(C)]
    struct MapElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let attr = MapElemAttr {
        map_fd: map_fd as u32,
        _pad: 0,
        key: key as *const FlowKey as u64,
        value: values.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `attr` points at a key of the map's key size and a buffer of one value per
    // possible CPU, as the kernel requires for a per-CPU hash map.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &attr as *const MapElemAttr,
            size_of::<MapElemAttr>(),
        )
    };
    if ret == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOENT) => Ok(false),
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(pkts: u64, first: u64, last: u64, flags: u8) -> DirStats {
        DirStats {
            pkts,
            ip_bytes: pkts * 100,
            bytes: pkts * 60,
            first_ns: first,
            last_ns: last,
            tcp_flags: flags,
            ..DirStats::default()
        }
    }

    #[test]
    fn merge_sums_counts_and_spans_times() {
        let cpu0 = FlowValue {
            dir: [dir(3, 50, 90, 0x02), DirStats::default()],
            ifindex: 7,
            _pad: 0,
        };
        let cpu1 = FlowValue {
            dir: [dir(2, 40, 70, 0x10), dir(1, 60, 60, 0x12)],
            ifindex: 7,
            _pad: 0,
        };
        let snap = FlowSnapshot::merge(FlowKey::default(), &[cpu0, cpu1, FlowValue::default()]);
        assert_eq!(snap.dir[0].pkts, 5);
        assert_eq!(snap.dir[0].ip_bytes, 500);
        assert_eq!(snap.dir[0].first_ns, 40);
        assert_eq!(snap.dir[0].last_ns, 90);
        assert_eq!(snap.dir[0].tcp_flags, 0x12);
        assert_eq!(snap.dir[1].pkts, 1);
        assert_eq!(snap.dir[1].first_ns, 60);
        assert_eq!(snap.ifindex, 7);
    }
}
