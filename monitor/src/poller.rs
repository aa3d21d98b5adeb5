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

/// One connection's counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowSnapshot {
    pub key: FlowKey,
    /// Indexed like [`FlowValue::dir`]: `[a -> b, b -> a]`.
    pub dir: [DirStats; 2],
    pub ifindex: u32,
}

impl FlowSnapshot {
    pub fn new(key: FlowKey, value: &FlowValue) -> Self {
        Self {
            key,
            dir: value.dir,
            ifindex: value.ifindex,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("reading the flow map: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("taking a finished entry from the flow map: {0}")]
    Take(#[source] io::Error),
    #[error("reading the flow map: BPF_MAP_LOOKUP_BATCH: {0}")]
    Batch(#[source] io::Error),
}

pub struct Poller {
    flows: Map,
    stats: Map,
    /// Reused by every snapshot: the entries of one batch read.
    keys: Vec<FlowKey>,
    values: Vec<FlowValue>,
}

/// Entries one `BPF_MAP_LOOKUP_BATCH` asks for; doubled if a hash bucket holds more. The
/// kernel allocates a buffer of this many keys and values per call: 256 keep it small
/// (larger batches measured no faster).
const BATCH: usize = 256;

impl Poller {
    pub fn new(flows: Map, stats: Map) -> Self {
        Self {
            flows,
            stats,
            keys: Vec::new(),
            values: Vec::new(),
        }
    }

    /// Hands every connection in the map now to `each`, read [`BATCH`] entries per
    /// system call (`BPF_MAP_LOOKUP_BATCH`, which aya 0.16 does not expose).
    pub fn snapshot(&mut self, mut each: impl FnMut(FlowSnapshot)) -> Result<(), PollError> {
        let Map::HashMap(data) = &self.flows else {
            unreachable!("FLOWS is a hash map");
        };
        let fd = data.fd().as_fd().as_raw_fd();
        let mut size = BATCH;
        // The kernel's position in the map between calls: a bucket index for hash maps.
        let (mut position, mut next) = (None, 0u64);
        loop {
            self.keys.resize(size, FlowKey::default());
            self.values.resize(size, FlowValue::default());
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
            for (key, value) in self.keys[..count].iter().zip(&self.values) {
                each(FlowSnapshot::new(*key, value));
            }
            if done {
                return Ok(());
            }
        }
    }

    /// Removes a connection from the map and returns its final counts, read and deleted
    /// in one step so no packet counted in between is lost. `None` when it is gone.
    pub fn take(&self, key: &FlowKey) -> Result<Option<FlowSnapshot>, PollError> {
        let Map::HashMap(data) = &self.flows else {
            unreachable!("FLOWS is a hash map");
        };
        let mut value = FlowValue::default();
        lookup_and_delete(data.fd().as_fd().as_raw_fd(), key, &mut value)
            .map_err(PollError::Take)
            .map(|found| found.then(|| FlowSnapshot::new(*key, &value)))
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
    // SAFETY: `keys` and `values` have room for `count` entries; the batch positions are
    // 8 bytes, more than the 4 a hash map's bucket index takes.
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
fn lookup_and_delete(map_fd: i32, key: &FlowKey, value: &mut FlowValue) -> io::Result<bool> {
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
        value: std::ptr::from_mut(value) as u64,
        flags: 0,
    };
    // SAFETY: `attr` points at a key and a value of the map's sizes.
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
