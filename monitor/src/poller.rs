//! Map reads -> snapshots. The only reader of the flow and stats maps.

use std::io;

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, RingBuf};
use foldhash::{HashMap as FoldMap, HashMapExt as _};
use log::warn;
use monitor_common::{
    flow::{ChangedKey, DirStats, EPOCH_WITH_VALUE, FlowKey, FlowValue, NewEntry},
    stats,
};

use crate::kernel::bpf::{self, Lookup};

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
    #[error("reading the flow map: BPF_MAP_LOOKUP_ELEM: {0}")]
    Lookup(#[source] io::Error),
}

pub struct Poller {
    flows: Map,
    stats: Map,
    /// Reused by every snapshot: the entries of one batch read.
    keys: Vec<FlowKey>,
    values: Vec<FlowValue>,
    /// The programs' list of changed entries, when every attached program keeps it.
    changes: Option<Changes>,
}

/// What the programs say changed: the `EPOCH` the agent raises before each read, the
/// `CHANGED` ring of keys they put there once per entry and epoch, and the `NEW_ENTRIES`
/// ring of new entries with their values.
struct Changes {
    epoch: Array<MapData, u32>,
    ring: RingBuf<MapData>,
    new_entries: RingBuf<MapData>,
    lost_map: PerCpuArray<MapData, u64>,
    /// The epoch set last.
    current: u32,
    /// Changes lost (the programs' `CHANGES_LOST`) as of the last read; `None` before the
    /// first.
    lost: Option<u64>,
    /// Keys the ring held under the current epoch: an entry may have been written again
    /// after this read looked, without a new key, so the next read looks again.
    again: Vec<FlowKey>,
    /// The keys the current read takes, each once: with the value a new entry's record
    /// carried when that record is all the ring said of it, else to be looked up.
    wanted: FoldMap<FlowKey, Option<FlowValue>>,
    /// Whether the current read is of the whole map.
    whole: bool,
}

/// The programs' maps that name what changed: `EPOCH`, `CHANGED`, `NEW_ENTRIES` and
/// `CHANGES_LOST`.
pub struct ChangeMaps {
    pub epoch: Map,
    pub changed: Map,
    pub new_entries: Map,
    pub lost: Map,
}

/// What [`Poller::take`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    /// Read and removed: the connection's final counts.
    Final(FlowSnapshot),
    /// Not in the map.
    Gone,
    /// Written since this poll's read began: put back, the connection not finished.
    Moved,
}

/// How a read covered the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coverage {
    /// Every entry was read.
    Whole,
    /// Only the entries that changed since the last read (and new ones) were read: every
    /// other is as it was.
    Changed,
}

/// Entries one `BPF_MAP_LOOKUP_BATCH` asks for; doubled if a hash bucket holds more. The
/// kernel allocates a buffer of this many keys and values per call: 256 keep it small
/// (larger batches measured no faster).
const BATCH: usize = 256;

/// A read looks entries up key by key up to this share of the map (one in three), and
/// reads it whole beyond: one `BPF_MAP_LOOKUP_ELEM` costs about 2.7 entries'
/// worth of `BPF_MAP_LOOKUP_BATCH` (1.2 µs against 0.45, `bench-suite --only poll`).
const WHOLE_READ_SHARE: usize = 3;

impl Poller {
    pub fn new(flows: Map, stats: Map) -> Self {
        Self {
            flows,
            stats,
            keys: Vec::new(),
            values: Vec::new(),
            changes: None,
        }
    }

    /// From now on reads take only what changed, as the programs' maps tell, whenever
    /// they tell all of it. Only for programs that all keep those maps: one that does not
    /// (an older build's, still attached through a pinned link) changes entries the rings
    /// never name.
    pub fn follow_changes(&mut self, maps: ChangeMaps) -> Result<(), PollError> {
        let epoch = Array::<MapData, u32>::try_from(maps.epoch)?;
        // An earlier agent's epochs may mark entries of a pinned map: go on from its last.
        let current = epoch.get(&0, 0)?;
        self.changes = Some(Changes {
            epoch,
            ring: RingBuf::try_from(maps.changed)?,
            new_entries: RingBuf::try_from(maps.new_entries)?,
            lost_map: PerCpuArray::try_from(maps.lost)?,
            current,
            lost: None,
            again: Vec::new(),
            wanted: FoldMap::new(),
            whole: true,
        });
        Ok(())
    }

    /// Starts a read: raises the epoch, then takes what the ring holds. The read is of the
    /// whole map unless the list of what changed is known to be complete (not before the
    /// first whole read, nor after the ring was full) and short: looking up more than a
    /// third of the map's `entries` (about the connections tracked) key by key would take
    /// longer than reading them all. `also` are keys to read whatever the ring says.
    pub fn begin(
        &mut self,
        also: impl IntoIterator<Item = FlowKey>,
        entries: usize,
    ) -> Result<Coverage, PollError> {
        let Some(changes) = &mut self.changes else {
            return Ok(Coverage::Whole);
        };
        let lost = changes.lost_map.get(&0, 0)?.iter().sum();
        // 0 is the epoch of the entries the programs insert.
        changes.current = (changes.current.wrapping_add(1) & !EPOCH_WITH_VALUE).max(1);
        changes.epoch.set(0, &changes.current, 0)?;
        changes.whole = changes.lost != Some(lost);
        changes.lost = Some(lost);
        changes.wanted.clear();
        let mut again = Vec::new();
        // Two records of one key (a new entry written again, both rings, or two CPUs
        // racing): looked up.
        while let Some(item) = changes.ring.next() {
            let Some(changed) = read_record::<ChangedKey>(&item) else {
                continue;
            };
            if changed.epoch == changes.current {
                again.push(changed.key);
            }
            if !changes.whole {
                changes.wanted.insert(changed.key, None);
            }
        }
        while let Some(item) = changes.new_entries.next() {
            let Some(entry) = read_record::<NewEntry>(&item) else {
                continue;
            };
            if !changes.whole {
                changes
                    .wanted
                    .entry(entry.changed.key)
                    .and_modify(|value| *value = None)
                    .or_insert(Some(entry.value));
            }
        }
        if !changes.whole {
            for key in changes.again.drain(..).chain(also) {
                changes.wanted.insert(key, None);
            }
            let lookups = changes.wanted.values().filter(|v| v.is_none()).count();
            changes.whole = lookups > entries / WHOLE_READ_SHARE;
        }
        changes.again = again;
        Ok(if changes.whole {
            Coverage::Whole
        } else {
            Coverage::Changed
        })
    }

    /// Changed entries the programs could not name (a full ring), as of the last read.
    pub fn changes_lost(&self) -> u64 {
        self.changes
            .as_ref()
            .and_then(|changes| changes.lost)
            .unwrap_or(0)
    }

    /// Reads what [`Self::begin`] settled on, handing each entry to `each`; returns how
    /// many were read.
    pub fn read(&mut self, mut each: impl FnMut(FlowSnapshot)) -> Result<usize, PollError> {
        match &self.changes {
            Some(changes) if !changes.whole => {
                let flows = flow_map(&self.flows)?;
                let mut read = 0;
                let mut value = FlowValue::default();
                for (key, carried) in &changes.wanted {
                    if let Some(carried) = carried {
                        each(FlowSnapshot::new(*key, carried));
                        read += 1;
                    } else if bpf::lookup(&flows, Lookup::Read, key, &mut value)
                        .map_err(PollError::Lookup)?
                    {
                        each(FlowSnapshot::new(*key, &value));
                        read += 1;
                    }
                }
                Ok(read)
            }
            _ => {
                let mut read = 0;
                self.snapshot(|snap| {
                    read += 1;
                    each(snap);
                })?;
                Ok(read)
            }
        }
    }

    /// Hands every connection in the map now to `each`, read [`BATCH`] entries per
    /// system call (`BPF_MAP_LOOKUP_BATCH`, which aya 0.16 does not expose).
    pub fn snapshot(&mut self, mut each: impl FnMut(FlowSnapshot)) -> Result<(), PollError> {
        let flows = flow_map(&self.flows)?;
        let mut size = BATCH;
        // The kernel's position in the map between calls: a bucket index for hash maps.
        let (mut position, mut next) = (None, 0u64);
        loop {
            self.keys.resize(size, FlowKey::default());
            self.values.resize(size, FlowValue::default());
            let read = bpf::lookup_batch(
                &flows,
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

    /// Removes a connection found finished from the map and returns its final counts,
    /// read and deleted in one step so no packet counted in between is lost.
    ///
    /// With `put_back`, an entry the programs wrote since this poll's read began (a new
    /// use of its addresses and ports, opening while the agent judged the last one) goes
    /// back into the map as it was, for the next read: taken, the next packets would make
    /// a new entry that knows nothing of the opening, and its first payload would not be
    /// offered as a hello. Only a packet in the moment between the two steps still makes one.
    /// An entry that cannot go back (that packet's new entry holds the key, or took the
    /// last free slot of a full map) is taken: its counts are final.
    pub fn take(&self, key: &FlowKey, put_back: bool) -> Result<Taken, PollError> {
        let flows = flow_map(&self.flows)?;
        let mut value = FlowValue::default();
        if !bpf::lookup(&flows, Lookup::Take, key, &mut value).map_err(PollError::Take)? {
            return Ok(Taken::Gone);
        }
        let moved = self
            .changes
            .as_ref()
            .is_some_and(|changes| value.epoch & !EPOCH_WITH_VALUE == changes.current);
        if put_back && moved {
            match bpf::insert_new(&flows, key, &value) {
                Ok(true) => return Ok(Taken::Moved),
                Ok(false) => {}
                Err(err) => warn!("putting back a connection that moved while taken: {err}"),
            }
        }
        Ok(Taken::Final(FlowSnapshot::new(*key, &value)))
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

/// A ring record as `T`; `None` when shorter (none is written).
fn read_record<T: Copy>(bytes: &[u8]) -> Option<T> {
    let bytes = bytes.get(..size_of::<T>())?;
    // SAFETY: as many bytes as a T, which the callers' ring records are: plain data.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}

/// The flow map as aya checks it: keys and values of the sizes the raw commands take.
fn flow_map(flows: &Map) -> Result<HashMap<&MapData, FlowKey, FlowValue>, PollError> {
    Ok(HashMap::try_from(flows)?)
}
