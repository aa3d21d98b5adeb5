//! One delivery thread per sink behind a bounded queue, so a slow or unreachable sink never
//! blocks polling: [`Dispatcher::submit`] only takes a lock and pushes (or drops and counts
//! when the queue is full); the thread delivers in order and retries failures with backoff.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use log::{info, warn};

use super::{Alert, sinks::Sink};

/// First wait after a failed delivery; it doubles per failure up to [`MAX_BACKOFF`].
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How long [`Dispatcher::shutdown`] waits past its limit for a delivery already in
/// progress before leaving the thread behind.
const JOIN_GRACE: Duration = Duration::from_millis(200);

/// The delivery thread of one sink and its queue.
///
/// Stop it with [`shutdown`](Self::shutdown) to flush; dropping it instead tells the thread
/// to stop after the delivery in progress and discards the rest without waiting.
pub struct Dispatcher {
    name: &'static str,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// Disconnected when the thread ends, however it ends: a bounded join. (In a mutex so
    /// that the dispatcher is `Sync`.)
    done: Mutex<mpsc::Receiver<()>>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    capacity: usize,
    delivered: AtomicU64,
    dropped: AtomicU64,
    failures: AtomicU64,
}

struct State {
    queue: VecDeque<Alert>,
    /// The thread holds the queue's head while delivering it; it still takes a slot.
    in_flight: bool,
    /// Set by shutdown: deliver what is queued until then, then stop.
    stop_by: Option<Instant>,
    /// Whether the last submit was dropped, so a run of drops is logged once.
    dropping: bool,
}

impl State {
    fn waiting(&self) -> usize {
        self.queue.len() + usize::from(self.in_flight)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent state (a queue and flags).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Dispatcher {
    /// Starts the delivery thread for `sink` with room for `capacity` undelivered alerts
    /// (at least 1).
    pub fn spawn(sink: Box<dyn Sink>, capacity: usize) -> Self {
        Self::spawn_with(sink, capacity, INITIAL_BACKOFF, MAX_BACKOFF)
    }

    fn spawn_with(sink: Box<dyn Sink>, capacity: usize, initial: Duration, max: Duration) -> Self {
        let name = sink.name();
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
        let thread = thread::Builder::new()
            .name(format!("sink-{name}"))
            .spawn(move || {
                let _done = done_tx;
                run(sink, &worker, initial, max);
            })
            .expect("spawn an alert delivery thread");
        Self {
            name,
            shared,
            thread: Some(thread),
            done: Mutex::new(done),
        }
    }

    /// The sink's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Queues `alert` for delivery; never blocks on the sink. When the queue is full the
    /// alert is dropped and counted in [`dropped`](Self::dropped).
    pub fn submit(&self, alert: Alert) {
        let mut state = self.shared.lock();
        if state.waiting() >= self.shared.capacity {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            if !state.dropping {
                state.dropping = true;
                warn!(
                    "alert sink {}: queue full ({} alerts), dropping alerts",
                    self.name, self.shared.capacity
                );
            }
            return;
        }
        state.dropping = false;
        state.queue.push_back(alert);
        drop(state);
        self.shared.wake.notify_all();
    }

    /// Alerts dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Alerts the sink accepted.
    pub fn delivered(&self) -> u64 {
        self.shared.delivered.load(Ordering::Relaxed)
    }

    /// Delivery attempts that failed (each retry counts).
    pub fn failures(&self) -> u64 {
        self.shared.failures.load(Ordering::Relaxed)
    }

    /// Alerts waiting, including one being delivered.
    pub fn queued(&self) -> usize {
        self.shared.lock().waiting()
    }

    /// Stops the thread after delivering what is queued, waiting at most `limit` (retries
    /// continue within it), and returns how many alerts were left undelivered.
    ///
    /// A delivery still in progress at the limit is given a short grace; if the sink is
    /// still stuck after that, the thread is left behind (it stops once the call returns)
    /// and its alert is counted as undelivered.
    pub fn shutdown(mut self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        self.stop(deadline);
        let wait = deadline.saturating_duration_since(Instant::now()) + JOIN_GRACE;
        let done = self.done.get_mut().unwrap_or_else(|e| e.into_inner());
        match done.recv_timeout(wait) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                warn!(
                    "alert sink {}: delivery still in progress after {limit:?}, not waiting",
                    self.name
                );
                self.thread = None;
            }
            // The thread only ever drops its sender.
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                if let Some(thread) = self.thread.take()
                    && thread.join().is_err()
                {
                    warn!("alert sink {}: delivery thread panicked", self.name);
                }
            }
        }
        self.shared.lock().waiting()
    }

    fn stop(&self, deadline: Instant) {
        let mut state = self.shared.lock();
        state.stop_by = Some(state.stop_by.map_or(deadline, |d| d.min(deadline)));
        drop(state);
        self.shared.wake.notify_all();
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop(Instant::now());
        }
    }
}

/// The delivery thread: in order, the head is retried until delivered or shutdown's
/// deadline passes.
fn run(mut sink: Box<dyn Sink>, shared: &Shared, initial: Duration, max: Duration) {
    let name = sink.name();
    let mut state = shared.lock();
    loop {
        // Wait for work, or stop when shut down and idle or past the deadline.
        let alert = loop {
            if let Some(deadline) = state.stop_by
                && (state.queue.is_empty() || Instant::now() >= deadline)
            {
                return;
            }
            if let Some(alert) = state.queue.pop_front() {
                break alert;
            }
            state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
        };
        state.in_flight = true;
        drop(state);

        let mut backoff = initial;
        let mut failed = 0u64;
        let delivered = loop {
            match sink.deliver(&alert) {
                Ok(()) => break true,
                Err(err) => {
                    shared.failures.fetch_add(1, Ordering::Relaxed);
                    if failed == 0 {
                        warn!("alert sink {name}: delivery failed, will retry: {err}");
                    }
                    failed += 1;
                }
            }
            // Back off, but wake early for shutdown and never sleep past its deadline.
            let until = Instant::now() + backoff;
            let mut guard = shared.lock();
            loop {
                let now = Instant::now();
                let end = guard.stop_by.map_or(until, |d| d.min(until));
                if now >= end {
                    break;
                }
                guard = shared
                    .wake
                    .wait_timeout(guard, end - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            let out_of_time = guard.stop_by.is_some_and(|d| Instant::now() >= d);
            drop(guard);
            if out_of_time {
                break false;
            }
            backoff = (backoff * 2).min(max);
        };
        if delivered {
            shared.delivered.fetch_add(1, Ordering::Relaxed);
            if failed > 0 {
                info!("alert sink {name}: delivering again after {failed} failed attempts");
            }
        }

        state = shared.lock();
        state.in_flight = false;
        if !delivered {
            // Shutdown's deadline passed: it is counted as undelivered with the rest.
            state.queue.push_front(alert);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        net::{IpAddr, Ipv4Addr},
        sync::atomic::AtomicUsize,
    };

    use serde_json::Map;

    use super::*;
    use crate::alerts::Note;

    fn alert(n: u64) -> Alert {
        Alert {
            ts: 1_700_000_000.0 + n as f64,
            note: Note::LargeUpload,
            msg: format!("alert {n}"),
            src: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            dst: None,
            first_seen: None,
            conn: None,
            figures: Map::new(),
            key: n.to_string(),
        }
    }

    fn n_of(alert: &Alert) -> u64 {
        alert.key.parse().unwrap()
    }

    /// Records what it accepted; sleeps per delivery; fails while `fail_left` > 0 (each
    /// attempt consumes one), or always when it is `usize::MAX`.
    struct Fake {
        got: Arc<Mutex<Vec<u64>>>,
        attempts: Arc<AtomicUsize>,
        sleep: Duration,
        fail_left: Arc<AtomicUsize>,
    }

    struct Probe {
        got: Arc<Mutex<Vec<u64>>>,
        attempts: Arc<AtomicUsize>,
        fail_left: Arc<AtomicUsize>,
    }

    impl Probe {
        fn got(&self) -> Vec<u64> {
            self.got.lock().unwrap().clone()
        }
    }

    fn fake(sleep: Duration, fail: usize) -> (Box<dyn Sink>, Probe) {
        let probe = Probe {
            got: Arc::default(),
            attempts: Arc::default(),
            fail_left: Arc::new(AtomicUsize::new(fail)),
        };
        let sink = Fake {
            got: Arc::clone(&probe.got),
            attempts: Arc::clone(&probe.attempts),
            sleep,
            fail_left: Arc::clone(&probe.fail_left),
        };
        (Box::new(sink), probe)
    }

    impl Sink for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }

        fn deliver(&mut self, alert: &Alert) -> io::Result<()> {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            thread::sleep(self.sleep);
            let left = self.fail_left.load(Ordering::SeqCst);
            if left == usize::MAX {
                return Err(io::Error::other("always failing"));
            }
            if left > 0 {
                self.fail_left.store(left - 1, Ordering::SeqCst);
                return Err(io::Error::other("failing for now"));
            }
            self.got.lock().unwrap().push(n_of(alert));
            Ok(())
        }
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

    #[test]
    fn submit_never_blocks_on_a_slow_sink() {
        let (sink, probe) = fake(Duration::from_millis(50), 0);
        let d = Dispatcher::spawn(sink, 100);
        let start = Instant::now();
        for n in 0..1000 {
            d.submit(alert(n));
        }
        let took = start.elapsed();
        assert!(
            took < Duration::from_millis(200),
            "1000 submits took {took:?}"
        );
        // The slow sink took at most a couple of alerts meanwhile, so most were dropped.
        assert!(d.dropped() >= 890, "dropped {}", d.dropped());
        let dropped = d.dropped();
        let left = d.shutdown(Duration::ZERO);
        assert!(
            left > 0,
            "a slow sink cannot have flushed 100 alerts at once"
        );
        assert_eq!(
            probe.got().len() as u64 + left as u64 + dropped,
            1000,
            "delivered + undelivered + dropped must be all alerts"
        );
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Dispatcher>();
    }

    #[test]
    fn delivers_in_order() {
        let (sink, probe) = fake(Duration::ZERO, 0);
        let d = Dispatcher::spawn(sink, 1000);
        for n in 0..500 {
            d.submit(alert(n));
        }
        wait_for("500 deliveries", Duration::from_secs(5), || {
            d.delivered() == 500
        });
        assert_eq!(probe.got(), (0..500).collect::<Vec<_>>());
        assert_eq!((d.dropped(), d.failures(), d.queued()), (0, 0, 0));
        assert_eq!(d.shutdown(Duration::from_secs(1)), 0);
    }

    #[test]
    fn retries_until_the_sink_recovers_keeping_order() {
        let (sink, probe) = fake(Duration::ZERO, 3);
        let d = Dispatcher::spawn_with(
            sink,
            10,
            Duration::from_millis(10),
            Duration::from_millis(40),
        );
        for n in 0..5 {
            d.submit(alert(n));
        }
        wait_for("5 deliveries", Duration::from_secs(5), || {
            d.delivered() == 5
        });
        assert_eq!(probe.got(), vec![0, 1, 2, 3, 4]);
        assert_eq!(d.failures(), 3);
        assert_eq!(probe.attempts.load(Ordering::SeqCst), 8);
        assert_eq!(d.shutdown(Duration::from_secs(1)), 0);
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        let (sink, probe) = fake(Duration::ZERO, usize::MAX);
        let d = Dispatcher::spawn_with(
            sink,
            10,
            Duration::from_millis(10),
            Duration::from_millis(40),
        );
        d.submit(alert(0));
        thread::sleep(Duration::from_millis(500));
        // Waits of 10, 20, 40, 40, ...: about 14 attempts in 500 ms; without backoff
        // there would be thousands, without the bound about 6.
        let attempts = probe.attempts.load(Ordering::SeqCst);
        assert!(
            (9..=16).contains(&attempts),
            "{attempts} attempts in 500 ms"
        );
        assert_eq!(d.failures(), attempts as u64);
        assert_eq!(d.shutdown(Duration::ZERO), 1);
    }

    #[test]
    fn drops_exactly_what_does_not_fit() {
        let (sink, probe) = fake(Duration::ZERO, usize::MAX);
        let d = Dispatcher::spawn(sink, 4);
        for n in 0..10 {
            d.submit(alert(n));
        }
        // 4 slots, the one being retried included.
        assert_eq!(d.dropped(), 6);
        assert_eq!(d.queued(), 4);
        probe.fail_left.store(0, Ordering::SeqCst);
        wait_for("4 deliveries", Duration::from_secs(5), || {
            d.delivered() == 4
        });
        assert_eq!(probe.got(), vec![0, 1, 2, 3]);
        // Room again.
        d.submit(alert(10));
        wait_for("1 more delivery", Duration::from_secs(5), || {
            d.delivered() == 5
        });
        assert_eq!(d.dropped(), 6);
        assert_eq!(d.shutdown(Duration::from_secs(1)), 0);
    }

    #[test]
    fn shutdown_flushes_the_queue() {
        let (sink, probe) = fake(Duration::from_millis(2), 0);
        let d = Dispatcher::spawn(sink, 100);
        for n in 0..50 {
            d.submit(alert(n));
        }
        let start = Instant::now();
        assert_eq!(d.shutdown(Duration::from_secs(5)), 0);
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(probe.got(), (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn shutdown_retries_within_its_limit() {
        // Fails twice (waits 100 + 200 ms), then delivers everything before the limit.
        let (sink, probe) = fake(Duration::ZERO, 2);
        let d = Dispatcher::spawn(sink, 10);
        for n in 0..3 {
            d.submit(alert(n));
        }
        assert_eq!(d.shutdown(Duration::from_secs(3)), 0);
        assert_eq!(probe.got(), vec![0, 1, 2]);
    }

    #[test]
    fn shutdown_reports_what_it_could_not_deliver() {
        let (sink, probe) = fake(Duration::ZERO, usize::MAX);
        let d = Dispatcher::spawn(sink, 10);
        for n in 0..7 {
            d.submit(alert(n));
        }
        let start = Instant::now();
        assert_eq!(d.shutdown(Duration::from_millis(300)), 7);
        let took = start.elapsed();
        assert!(
            (Duration::from_millis(290)..Duration::from_millis(600)).contains(&took),
            "shutdown took {took:?} for a 300 ms limit"
        );
        assert!(probe.got().is_empty());
        assert!(
            probe.attempts.load(Ordering::SeqCst) >= 2,
            "retried meanwhile"
        );
    }

    #[test]
    fn shutdown_does_not_wait_for_a_stuck_sink() {
        let (sink, probe) = fake(Duration::from_secs(3), 0);
        let d = Dispatcher::spawn(sink, 10);
        for n in 0..3 {
            d.submit(alert(n));
        }
        wait_for("the first attempt", Duration::from_secs(1), || {
            probe.attempts.load(Ordering::SeqCst) == 1
        });
        let start = Instant::now();
        assert_eq!(d.shutdown(Duration::from_millis(100)), 3);
        let took = start.elapsed();
        assert!(took < Duration::from_secs(1), "shutdown took {took:?}");
    }
}
