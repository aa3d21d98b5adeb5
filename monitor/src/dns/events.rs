//! The `DNS_EVENTS` ring buffer, read as soon as the kernel writes to it (the poll
//! period would let a burst fill it).

use aya::maps::{Map, MapData, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};

pub struct DnsEvents {
    ring: AsyncFd<RingBuf<MapData>>,
}

/// Records taken per wake-up at most, so a flood cannot starve the poll loop.
const BATCH: usize = 4096;

impl DnsEvents {
    pub fn new(map: Map) -> anyhow::Result<Self> {
        let ring = RingBuf::try_from(map)?;
        // SAFETY: the ring buffer owns its map's file descriptor, which stays open and the
        // same until the AsyncFd (which owns the ring) drops it.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Self { ring })
    }

    /// Waits for records, then appends them to `batch` (at most [`BATCH`] per call).
    pub async fn read(&mut self, batch: &mut Batch) -> anyhow::Result<()> {
        let mut guard = self.ring.readable_mut().await?;
        let ring = guard.get_inner_mut();
        let mut taken = 0;
        while taken < BATCH {
            let Some(item) = ring.next() else { break };
            batch.bytes.extend_from_slice(&item);
            batch.ends.push(batch.bytes.len());
            taken += 1;
        }
        if taken < BATCH {
            guard.clear_ready();
        }
        Ok(())
    }
}

impl DnsEvents {
    /// Appends every record waiting now to `batch`, without waiting: what the kernel queued
    /// before a flow-map read, taken before that read's connections are judged.
    pub fn take_ready(&mut self, batch: &mut Batch) {
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            batch.bytes.extend_from_slice(&item);
            batch.ends.push(batch.bytes.len());
        }
    }
}

/// Records read in one go, kept in one buffer: a flood allocates nothing per record.
#[derive(Default)]
pub struct Batch {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Batch {
    /// Hands out every record and empties the batch.
    pub fn drain(&mut self, mut f: impl FnMut(&[u8])) {
        let mut start = 0;
        for &end in &self.ends {
            f(&self.bytes[start..end]);
            start = end;
        }
        self.bytes.clear();
        self.ends.clear();
    }
}
