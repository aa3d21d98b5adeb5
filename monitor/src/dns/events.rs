//! The `DNS_EVENTS` ring buffer (and `HELLO_EVENTS`, the same way), drained as soon as
//! the kernel writes to it (the poll period would let a burst fill it) on the runtime's
//! thread, while the pipeline polls on its own: a long poll never leaves the ring unread.

use std::{
    os::fd::{AsFd, OwnedFd},
    sync::{Arc, Mutex, MutexGuard},
};

use aya::maps::{Map, MapData, MapError, PerCpuArray, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};

/// Records taken per wake-up at most, so a flood cannot starve the runtime.
const BATCH: usize = 4096;
/// Bytes of records waiting for the pipeline at most. Past this the drain leaves them in
/// the ring, where the next poll takes them; meanwhile the kernel counts what the full
/// ring cannot take (`dns_events_lost_total`).
const WAITING_MAX: usize = 16 << 20;

/// The ring and what was drained from it, shared by the drain and the pipeline.
struct Shared {
    ring: RingBuf<MapData>,
    waiting: Batch,
}

/// The drain's side: wakes when the kernel writes.
pub struct DnsEvents {
    readable: AsyncFd<OwnedFd>,
    shared: Arc<Mutex<Shared>>,
}

/// The pipeline's side: takes what was drained, and what the ring holds now.
pub struct DnsQueue {
    shared: Arc<Mutex<Shared>>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

impl DnsEvents {
    pub fn new(map: Map) -> anyhow::Result<(Self, DnsQueue)> {
        let ring = RingBuf::try_from(map)?;
        // A second descriptor of the same ring, for readiness alone: the ring itself is
        // read under the lock.
        let fd = ring.as_fd().try_clone_to_owned()?;
        // SAFETY: the AsyncFd owns this descriptor, which stays open and the same until
        // the AsyncFd drops it.
        let readable = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        let shared = Arc::new(Mutex::new(Shared {
            ring,
            waiting: Batch::default(),
        }));
        let queue = DnsQueue {
            shared: shared.clone(),
        };
        Ok((Self { readable, shared }, queue))
    }

    /// Drains the ring whenever the kernel writes to it, until the ring fails.
    pub async fn run(self) -> anyhow::Result<()> {
        loop {
            let mut guard = self.readable.readable().await?;
            let (taken, full) = {
                let mut shared = lock(&self.shared);
                let Shared { ring, waiting } = &mut *shared;
                let mut taken = 0;
                while taken < BATCH && waiting.bytes.len() < WAITING_MAX {
                    let Some(item) = ring.next() else { break };
                    waiting.push(&item);
                    taken += 1;
                }
                (taken, waiting.bytes.len() >= WAITING_MAX)
            };
            if taken < BATCH || full {
                guard.clear_ready();
            } else {
                tokio::task::yield_now().await;
            }
        }
    }
}

impl DnsQueue {
    /// Fills `drained` (a batch its caller emptied, whose buffers the drain goes on with)
    /// with every record drained so far and every record the ring holds now: what the
    /// kernel queued before a flow-map read, taken before that read's connections are
    /// judged.
    pub fn take(&self, drained: &mut Batch) {
        debug_assert!(drained.ends.is_empty(), "records not handed out yet");
        let mut shared = lock(&self.shared);
        let Shared { ring, waiting } = &mut *shared;
        while let Some(item) = ring.next() {
            waiting.push(&item);
        }
        std::mem::swap(drained, waiting);
    }
}

/// Records read in one go, kept in one buffer: a flood allocates nothing per record.
#[derive(Default)]
pub struct Batch {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Batch {
    fn push(&mut self, record: &[u8]) {
        self.bytes.extend_from_slice(record);
        self.ends.push(self.bytes.len());
    }

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

/// A ring the pipeline takes its records from at each poll, beside the programs' per-CPU
/// count of the records the full ring could not take (hellos, socket owners).
pub struct Drained {
    queue: DnsQueue,
    batch: Batch,
    lost: PerCpuArray<MapData, u64>,
}

impl Drained {
    /// The ring in `events` and its count of lost records in `lost`; the drain goes to
    /// the caller, to run.
    pub fn new(events: Map, lost: Map) -> anyhow::Result<(DnsEvents, Self)> {
        let (events, queue) = DnsEvents::new(events)?;
        let drained = Self {
            queue,
            batch: Batch::default(),
            lost: PerCpuArray::try_from(lost)?,
        };
        Ok((events, drained))
    }

    /// Hands out every record drained so far and every record the ring holds now.
    pub fn each(&mut self, f: impl FnMut(&[u8])) {
        self.queue.take(&mut self.batch);
        self.batch.drain(f);
    }

    /// Records the full ring could not take since the programs loaded, over every CPU.
    pub fn lost(&self) -> Result<u64, MapError> {
        Ok(self.lost.get(&0, 0)?.iter().sum())
    }
}
