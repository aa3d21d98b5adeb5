//! One delivery thread behind a bounded queue, so that a slow or unreachable destination
//! never blocks the caller: [`Worker::submit`] only takes a lock and pushes (or drops and
//! counts when the queue is full); the thread delivers in order and retries a failed item
//! with exponential backoff until it goes through or shutdown's deadline passes.

use std::{
    collections::VecDeque,
    io,
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

/// How long [`Worker::shutdown`] waits past its limit for a delivery already in progress
/// before leaving the thread behind.
const JOIN_GRACE: Duration = Duration::from_millis(200);

/// Where a [`Worker`] delivers its items, on the worker's thread.
pub trait Deliver: Send + 'static {
    type Item: Send + 'static;

    /// One attempt. `Ok` is done with the item; an error has it retried after a backoff.
    fn deliver(&mut self, item: &Self::Item) -> io::Result<()>;
}

/// The waits between failed attempts at one item: `min` after the first failure, doubling
/// per failure up to `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

/// What [`Worker::submit`] did with an item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Submitted {
    Queued,
    /// The queue was full: dropped and counted. `first` when the submit before was queued
    /// (or there was none), so that a run of drops can be logged once.
    Dropped {
        first: bool,
    },
}

/// What [`Worker::shutdown`] left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drained {
    /// Items not delivered, the one in progress at the deadline included.
    pub left: usize,
    pub thread: ThreadEnd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadEnd {
    Stopped,
    Panicked,
    /// Still in a delivery after the deadline and a short grace: left behind, it stops
    /// once that delivery returns.
    Stuck,
}

/// A delivery thread and its queue of `T`.
///
/// Stop it with [`shutdown`](Self::shutdown) to flush; dropping it instead tells the thread
/// to stop after the delivery in progress and discards the rest without waiting.
pub struct Worker<T> {
    shared: Arc<Shared<T>>,
    thread: Option<JoinHandle<()>>,
    /// Disconnected when the thread ends, however it ends: a bounded join. (In a mutex so
    /// that the worker is `Sync`.)
    done: Mutex<mpsc::Receiver<()>>,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    wake: Condvar,
    capacity: usize,
    delivered: AtomicU64,
    dropped: AtomicU64,
    failures: AtomicU64,
}

struct State<T> {
    queue: VecDeque<T>,
    /// The thread holds the queue's head while delivering it; it still takes a slot.
    in_flight: bool,
    /// Set by shutdown: deliver what is queued until then, then stop.
    stop_by: Option<Instant>,
    /// Whether the last submit was dropped.
    dropping: bool,
}

impl<T> State<T> {
    fn waiting(&self) -> usize {
        self.queue.len() + usize::from(self.in_flight)
    }
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding the lock leaves consistent state (a queue and flags).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T: Send + 'static> Worker<T> {
    /// Starts the thread `name` delivering to `to`, with room for `capacity` undelivered
    /// items (at least 1).
    pub fn spawn<D: Deliver<Item = T>>(
        name: String,
        capacity: usize,
        backoff: Backoff,
        to: D,
    ) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                in_flight: false,
                stop_by: None,
                dropping: false,
            }),
            wake: Condvar::new(),
            capacity: capacity.max(1),
            delivered: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        });
        let (done_tx, done) = mpsc::channel();
        let worker = Arc::clone(&shared);
        let thread = thread::Builder::new().name(name).spawn(move || {
            let _done = done_tx;
            run(to, &worker, backoff);
        })?;
        Ok(Self {
            shared,
            thread: Some(thread),
            done: Mutex::new(done),
        })
    }
}

impl<T> Worker<T> {
    /// Queues `item`; never blocks on the delivery. When the queue is full the item is
    /// dropped and counted in [`dropped`](Self::dropped).
    pub fn submit(&self, item: T) -> Submitted {
        let mut state = self.shared.lock();
        if state.waiting() >= self.shared.capacity {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            let first = !state.dropping;
            state.dropping = true;
            return Submitted::Dropped { first };
        }
        state.dropping = false;
        state.queue.push_back(item);
        drop(state);
        self.shared.wake.notify_all();
        Submitted::Queued
    }

    /// The most items it holds.
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Items dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Items delivered.
    pub fn delivered(&self) -> u64 {
        self.shared.delivered.load(Ordering::Relaxed)
    }

    /// Delivery attempts that failed (each retry counts).
    pub fn failures(&self) -> u64 {
        self.shared.failures.load(Ordering::Relaxed)
    }

    /// Items waiting, including one being delivered.
    pub fn queued(&self) -> usize {
        self.shared.lock().waiting()
    }

    /// Stops the thread after delivering what is queued, waiting at most `limit` (retries
    /// continue within it), and says what was left.
    ///
    /// A delivery still in progress at the limit is given a short grace; if it is still
    /// stuck after that, the thread is left behind and its item counted as left.
    pub fn shutdown(mut self, limit: Duration) -> Drained {
        let deadline = Instant::now() + limit;
        self.stop(deadline);
        let wait = deadline.saturating_duration_since(Instant::now()) + JOIN_GRACE;
        let done = self.done.get_mut().unwrap_or_else(|e| e.into_inner());
        let thread = match done.recv_timeout(wait) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.thread = None;
                ThreadEnd::Stuck
            }
            // The thread only ever drops its sender.
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                match self.thread.take().map(JoinHandle::join) {
                    Some(Err(_)) => ThreadEnd::Panicked,
                    _ => ThreadEnd::Stopped,
                }
            }
        };
        Drained {
            left: self.shared.lock().waiting(),
            thread,
        }
    }

    fn stop(&self, deadline: Instant) {
        let mut state = self.shared.lock();
        state.stop_by = Some(state.stop_by.map_or(deadline, |d| d.min(deadline)));
        drop(state);
        self.shared.wake.notify_all();
    }
}

impl<T> Drop for Worker<T> {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop(Instant::now());
        }
    }
}

/// The delivery thread: in order, the head is retried until delivered or shutdown's
/// deadline passes.
fn run<D: Deliver>(mut to: D, shared: &Shared<D::Item>, backoff: Backoff) {
    let mut state = shared.lock();
    loop {
        // Wait for work, or stop when shut down and idle or past the deadline.
        let item = loop {
            if let Some(deadline) = state.stop_by
                && (state.queue.is_empty() || Instant::now() >= deadline)
            {
                return;
            }
            if let Some(item) = state.queue.pop_front() {
                break item;
            }
            state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
        };
        state.in_flight = true;
        drop(state);

        let mut wait = backoff.min;
        let delivered = loop {
            if to.deliver(&item).is_ok() {
                break true;
            }
            shared.failures.fetch_add(1, Ordering::Relaxed);
            if !sleep_unless_stopped(shared, wait) {
                break false;
            }
            wait = (wait * 2).min(backoff.max);
        };
        if delivered {
            shared.delivered.fetch_add(1, Ordering::Relaxed);
        }

        state = shared.lock();
        state.in_flight = false;
        if !delivered {
            // Shutdown's deadline passed: it is counted as left with the rest.
            state.queue.push_front(item);
            return;
        }
    }
}

/// Sleeps `wait`, waking early for shutdown and never past its deadline; false when that
/// deadline has passed.
fn sleep_unless_stopped<T>(shared: &Shared<T>, wait: Duration) -> bool {
    let until = Instant::now() + wait;
    let mut state = shared.lock();
    loop {
        let now = Instant::now();
        let end = state.stop_by.map_or(until, |d| d.min(until));
        if now >= end {
            break;
        }
        state = shared
            .wake
            .wait_timeout(state, end - now)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    state.stop_by.is_none_or(|d| Instant::now() < d)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    const FAST: Backoff = Backoff {
        min: Duration::from_millis(10),
        max: Duration::from_millis(40),
    };
    const SLOW: Backoff = Backoff {
        min: Duration::from_millis(100),
        max: Duration::from_secs(5),
    };

    /// Records what it accepted; sleeps per attempt; fails while `fail_left` > 0 (each
    /// attempt consumes one), or always when it is `usize::MAX`.
    struct Fake {
        probe: Arc<Probe>,
        sleep: Duration,
    }

    #[derive(Default)]
    struct Probe {
        got: Mutex<Vec<u64>>,
        attempts: AtomicUsize,
        fail_left: AtomicUsize,
    }

    impl Probe {
        fn got(&self) -> Vec<u64> {
            self.got.lock().unwrap().clone()
        }

        fn attempts(&self) -> usize {
            self.attempts.load(Ordering::SeqCst)
        }
    }

    impl Deliver for Fake {
        type Item = u64;

        fn deliver(&mut self, item: &u64) -> io::Result<()> {
            self.probe.attempts.fetch_add(1, Ordering::SeqCst);
            thread::sleep(self.sleep);
            let left = self.probe.fail_left.load(Ordering::SeqCst);
            if left == usize::MAX {
                return Err(io::Error::other("always failing"));
            }
            if left > 0 {
                self.probe.fail_left.store(left - 1, Ordering::SeqCst);
                return Err(io::Error::other("failing for now"));
            }
            self.probe.got.lock().unwrap().push(*item);
            Ok(())
        }
    }

    fn worker(
        capacity: usize,
        backoff: Backoff,
        sleep: Duration,
        fail: usize,
    ) -> (Worker<u64>, Arc<Probe>) {
        let probe = Arc::new(Probe::default());
        probe.fail_left.store(fail, Ordering::SeqCst);
        let fake = Fake {
            probe: Arc::clone(&probe),
            sleep,
        };
        let worker = Worker::spawn("test-worker".into(), capacity, backoff, fake).unwrap();
        (worker, probe)
    }

    fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}"
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn timed_shutdown(w: Worker<u64>, limit: Duration) -> (Drained, Duration) {
        let start = Instant::now();
        let drained = w.shutdown(limit);
        (drained, start.elapsed())
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Worker<u64>>();
    }

    #[test]
    fn delivers_in_order() {
        let (w, probe) = worker(1000, SLOW, Duration::ZERO, 0);
        for n in 0..500 {
            assert_eq!(w.submit(n), Submitted::Queued);
        }
        wait_for("500 deliveries", Duration::from_secs(5), || {
            w.delivered() == 500
        });
        assert_eq!(probe.got(), (0..500).collect::<Vec<_>>());
        assert_eq!((w.dropped(), w.failures(), w.queued()), (0, 0, 0));
        assert_eq!(w.shutdown(Duration::from_secs(1)).left, 0);
    }

    #[test]
    fn submit_never_blocks_on_a_slow_delivery() {
        let (w, probe) = worker(100, SLOW, Duration::from_millis(50), 0);
        let start = Instant::now();
        for n in 0..1000 {
            w.submit(n);
        }
        let took = start.elapsed();
        assert!(
            took < Duration::from_millis(200),
            "1000 submits took {took:?}"
        );
        // The slow delivery took at most a couple of items meanwhile, so most were dropped.
        assert!(w.dropped() >= 890, "dropped {}", w.dropped());
        let dropped = w.dropped();
        let left = w.shutdown(Duration::ZERO).left;
        assert!(left > 0, "a slow delivery cannot have flushed 100 items");
        assert_eq!(
            probe.got().len() as u64 + left as u64 + dropped,
            1000,
            "delivered + left + dropped must be all items"
        );
    }

    #[test]
    fn a_full_queue_drops_exactly_what_does_not_fit_and_counts_it() {
        let (w, probe) = worker(4, SLOW, Duration::ZERO, usize::MAX);
        let got: Vec<Submitted> = (0..10).map(|n| w.submit(n)).collect();
        // 4 slots, the one being retried included; a run of drops starts once.
        assert!(got[..4].iter().all(|s| *s == Submitted::Queued), "{got:?}");
        assert_eq!(got[4], Submitted::Dropped { first: true });
        assert!(
            got[5..]
                .iter()
                .all(|s| *s == Submitted::Dropped { first: false })
        );
        assert_eq!((w.dropped(), w.queued()), (6, 4));
        probe.fail_left.store(0, Ordering::SeqCst);
        wait_for("4 deliveries", Duration::from_secs(5), || {
            w.delivered() == 4
        });
        assert_eq!(probe.got(), vec![0, 1, 2, 3]);
        // Room again, and a new run of drops would be logged again.
        assert_eq!(w.submit(10), Submitted::Queued);
        wait_for("1 more delivery", Duration::from_secs(5), || {
            w.delivered() == 5
        });
        assert_eq!(w.dropped(), 6);
        assert_eq!(w.shutdown(Duration::from_secs(1)).left, 0);
    }

    #[test]
    fn retries_until_the_delivery_recovers_keeping_order() {
        let (w, probe) = worker(10, FAST, Duration::ZERO, 3);
        for n in 0..5 {
            w.submit(n);
        }
        wait_for("5 deliveries", Duration::from_secs(5), || {
            w.delivered() == 5
        });
        assert_eq!(probe.got(), vec![0, 1, 2, 3, 4]);
        assert_eq!(w.failures(), 3);
        assert_eq!(probe.attempts(), 8);
        assert_eq!(w.shutdown(Duration::from_secs(1)).left, 0);
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        let (w, probe) = worker(10, FAST, Duration::ZERO, usize::MAX);
        w.submit(0);
        thread::sleep(Duration::from_millis(500));
        // Waits of 10, 20, 40, 40, ...: about 14 attempts in 500 ms; without backoff
        // there would be thousands, without the bound about 6.
        let attempts = probe.attempts();
        assert!(
            (9..=16).contains(&attempts),
            "{attempts} attempts in 500 ms"
        );
        assert_eq!(w.failures(), attempts as u64);
        assert_eq!(
            w.shutdown(Duration::ZERO),
            Drained {
                left: 1,
                thread: ThreadEnd::Stopped
            }
        );
    }

    #[test]
    fn shutdown_flushes_the_queue() {
        let (w, probe) = worker(100, SLOW, Duration::from_millis(2), 0);
        for n in 0..50 {
            w.submit(n);
        }
        let (drained, took) = timed_shutdown(w, Duration::from_secs(5));
        assert_eq!(drained.left, 0);
        assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
        assert_eq!(probe.got(), (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn shutdown_retries_within_its_limit() {
        // Fails twice (waits 100 + 200 ms), then delivers everything before the limit.
        let (w, probe) = worker(10, SLOW, Duration::ZERO, 2);
        for n in 0..3 {
            w.submit(n);
        }
        assert_eq!(w.shutdown(Duration::from_secs(3)).left, 0);
        assert_eq!(probe.got(), vec![0, 1, 2]);
    }

    #[test]
    fn shutdown_reports_what_it_could_not_deliver() {
        let (w, probe) = worker(10, SLOW, Duration::ZERO, usize::MAX);
        for n in 0..7 {
            w.submit(n);
        }
        let (drained, took) = timed_shutdown(w, Duration::from_millis(300));
        assert_eq!(
            drained,
            Drained {
                left: 7,
                thread: ThreadEnd::Stopped
            }
        );
        assert!(
            (Duration::from_millis(290)..Duration::from_millis(600)).contains(&took),
            "shutdown took {took:?} for a 300 ms limit"
        );
        assert!(probe.got().is_empty());
        assert!(probe.attempts() >= 2, "retried meanwhile");
    }

    #[test]
    fn shutdown_does_not_wait_for_a_stuck_delivery() {
        let (w, probe) = worker(10, SLOW, Duration::from_secs(3), 0);
        for n in 0..3 {
            w.submit(n);
        }
        wait_for("the first attempt", Duration::from_secs(1), || {
            probe.attempts() == 1
        });
        let (drained, took) = timed_shutdown(w, Duration::from_millis(100));
        assert_eq!(
            drained,
            Drained {
                left: 3,
                thread: ThreadEnd::Stuck
            }
        );
        assert!(took < Duration::from_secs(1), "shutdown took {took:?}");
    }
}
