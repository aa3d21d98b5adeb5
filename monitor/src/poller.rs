//! Map reads -> snapshots. The only reader of the flow and stats maps.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

use aya::maps::{Map, MapData, PerCpuArray};
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
    /// Sums per-CPU copies: counts add, first is the earliest, last the latest, flags OR;
    /// the interface is that of the copy that counted the earliest packet.
    pub fn merge(key: FlowKey, per_cpu: &[FlowValue]) -> Self {
        let mut snap = Self {
            key,
            ..Self::default()
        };
        let mut earliest = u64::MAX;
        for value in per_cpu {
            for (total, d) in snap.dir.iter_mut().zip(&value.dir) {
                merge_dir(total, d);
            }
            let first = value
                .dir
                .iter()
                .filter(|d| d.pkts > 0)
                .map(|d| d.first_ns)
                .min();
            if let Some(first) = first
                && first < earliest
            {
                earliest = first;
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
    #[error("reading the flow map: BPF_MAP_LOOKUP_BATCH: {0}")]
    Batch(#[source] io::Error),
}

pub struct Poller {
    flows: Map,
    stats: Map,
    nr_cpus: usize,
    /// Reused by every snapshot: entries per batch read, and their per-CPU values.
    keys: Vec<FlowKey>,
    values: Vec<FlowValue>,
}

/// Entries one `BPF_MAP_LOOKUP_BATCH` asks for; doubled if a hash bucket holds more. The
/// kernel allocates a buffer of this many keys and values per call: 256 keep it small
/// (larger batches measured no faster).
const BATCH: usize = 256;

impl Poller {
    pub fn new(flows: Map, stats: Map) -> Result<Self, PollError> {
        let nr_cpus = aya::util::nr_cpus()
            .map_err(|(_, err)| PollError::Cpus(err))?
            .get() as usize;
        Ok(Self {
            flows,
            stats,
            nr_cpus,
            keys: Vec::new(),
            values: Vec::new(),
        })
    }

    /// Hands every connection in the map now to `each`, read a few thousand entries per
    /// system call (`BPF_MAP_LOOKUP_BATCH`, which aya 0.16 does not expose).
    pub fn snapshot(&mut self, mut each: impl FnMut(FlowSnapshot)) -> Result<(), PollError> {
        let Map::PerCpuHashMap(data) = &self.flows else {
            unreachable!("FLOWS is a per-CPU hash map");
        };
        let fd = data.fd().as_fd().as_raw_fd();
        let mut size = BATCH;
        // The kernel's position in the map between calls: a bucket index for hash maps.
        let (mut position, mut next) = (None, 0u64);
        loop {
            self.keys.resize(size, FlowKey::default());
            self.values
                .resize(size * self.nr_cpus, FlowValue::default());
            let read = lookup_batch(
                fd,
                position.as_ref(),
                &mut next,
                &mut self.keys,
                &mut self.values,
            );
            let (count, done) = match read {
                Ok(read) => read,
                // A bucket holds more entries than asked for: ask for more.
                Err(err) if err.raw_os_error() == Some(libc::ENOSPC) => {
                    size *= 2;
                    continue;
                }
                Err(err) => return Err(PollError::Batch(err)),
            };
            position = Some(next);
            for (key, values) in self.keys[..count]
                .iter()
                .zip(self.values.chunks_exact(self.nr_cpus))
            {
                each(FlowSnapshot::merge(*key, values));
            }
            if done {
                return Ok(());
            }
        }
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

/// BPF_MAP_LOOKUP_BATCH (kernel >= 5.6): up to `keys.len()` entries after position
/// `from` (the start when `None`); the position after them goes to `to`. Returns how many
/// were read and whether the map is done.
fn lookup_batch(
    map_fd: i32,
    from: Option<&u64>,
    to: &mut u64,
    keys: &mut [FlowKey],
    values: &mut [FlowValue],
) -> io::Result<(usize, bool)> {
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    let mut attr = BatchAttr {
        in_batch: from.map_or(0, |p| std::ptr::from_ref(p) as u64),
        out_batch: std::ptr::from_mut(to) as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: keys.len() as u32,
        map_fd: map_fd as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `keys` has room for `count` keys and `values` for `count` x possible-CPUs
    // values (the per-CPU layout); the batch positions are 8 bytes, more than the 4 a
    // hash map's bucket index takes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            &raw mut attr,
            size_of::<BatchAttr>(),
        )
    };
    if ret == 0 {
        return Ok((attr.count as usize, false));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        // The end: what this call read is still in the buffers.
        Some(libc::ENOENT) => Ok((attr.count as usize, true)),
        _ => Err(err),
    }
}

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
        let first_on_cpu1 = FlowValue { ifindex: 9, ..cpu1 };
        assert_eq!(
            FlowSnapshot::merge(FlowKey::default(), &[cpu0, first_on_cpu1]).ifindex,
            9,
            "the interface of the earliest packet, whichever CPU counted it"
        );
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
