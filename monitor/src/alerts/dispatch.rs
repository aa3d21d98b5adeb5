//! One delivery thread per sink behind a bounded queue, so a slow or unreachable sink never
//! blocks polling: a [`Worker`] whose deliveries are the sink's, with the sink's log lines.

use std::{io, time::Duration};

use log::{info, warn};

use super::{Alert, sinks::Sink};
use crate::worker::{Backoff, Deliver, Submitted, ThreadEnd, Worker};

/// The wait after a failed delivery doubles per failure within these bounds.
const BACKOFF: Backoff = Backoff {
    min: Duration::from_millis(100),
    max: Duration::from_secs(5),
};

/// The delivery thread of one sink and its queue.
///
/// Stop it with [`shutdown`](Self::shutdown) to flush; dropping it instead tells the thread
/// to stop after the delivery in progress and discards the rest without waiting.
pub struct Dispatcher {
    name: &'static str,
    worker: Worker<Alert>,
}

/// The sink on the delivery thread, logging when it starts and stops failing.
struct Delivery {
    sink: Box<dyn Sink>,
    /// Failed attempts since the last delivery.
    failed: u64,
}

impl Deliver for Delivery {
    type Item = Alert;

    fn deliver(&mut self, alert: &Alert) -> io::Result<()> {
        let name = self.sink.name();
        match self.sink.deliver(alert) {
            Ok(()) => {
                if self.failed > 0 {
                    info!(
                        "alert sink {name}: delivering again after {} failed attempts",
                        self.failed
                    );
                    self.failed = 0;
                }
                Ok(())
            }
            Err(err) => {
                if self.failed == 0 {
                    warn!("alert sink {name}: delivery failed, will retry: {err}");
                }
                self.failed += 1;
                Err(err)
            }
        }
    }
}

impl Dispatcher {
    /// Starts the delivery thread for `sink` with room for `capacity` undelivered alerts
    /// (at least 1).
    pub fn spawn(sink: Box<dyn Sink>, capacity: usize) -> Self {
        let name = sink.name();
        let delivery = Delivery { sink, failed: 0 };
        let worker = Worker::spawn(format!("sink-{name}"), capacity, BACKOFF, delivery)
            .expect("spawn an alert delivery thread");
        Self { name, worker }
    }

    /// The sink's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Queues `alert` for delivery; never blocks on the sink. When the queue is full the
    /// alert is dropped and counted in [`dropped`](Self::dropped).
    pub fn submit(&self, alert: Alert) {
        if self.worker.submit(alert) == (Submitted::Dropped { first: true }) {
            warn!(
                "alert sink {}: queue full ({} alerts), dropping alerts",
                self.name,
                self.worker.capacity()
            );
        }
    }

    /// Alerts dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.worker.dropped()
    }

    /// Alerts the sink accepted.
    pub fn delivered(&self) -> u64 {
        self.worker.delivered()
    }

    /// Delivery attempts that failed (each retry counts).
    pub fn failures(&self) -> u64 {
        self.worker.failures()
    }

    /// Alerts waiting, including one being delivered.
    pub fn queued(&self) -> usize {
        self.worker.queued()
    }

    /// Stops the thread after delivering what is queued, waiting at most `limit` (retries
    /// continue within it), and returns how many alerts were left undelivered.
    ///
    /// A delivery still in progress at the limit is given a short grace; if the sink is
    /// still stuck after that, the thread is left behind (it stops once the call returns)
    /// and its alert is counted as undelivered.
    pub fn shutdown(self, limit: Duration) -> usize {
        let drained = self.worker.shutdown(limit);
        match drained.thread {
            ThreadEnd::Stopped => {}
            ThreadEnd::Panicked => warn!("alert sink {}: delivery thread panicked", self.name),
            ThreadEnd::Stuck => warn!(
                "alert sink {}: delivery still in progress after {limit:?}, not waiting",
                self.name
            ),
        }
        drained.left
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr},
        sync::{Arc, Mutex},
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
            quiet: None,
            conn_log: None,
        }
    }

    /// Records the keys it accepted; fails the first `fail` attempts.
    struct Flaky {
        got: Arc<Mutex<Vec<String>>>,
        fail: usize,
    }

    impl Sink for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }

        fn deliver(&mut self, alert: &Alert) -> io::Result<()> {
            if self.fail > 0 {
                self.fail -= 1;
                return Err(io::Error::other("failing for now"));
            }
            self.got.lock().unwrap().push(alert.key.clone());
            Ok(())
        }
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Dispatcher>();
    }

    #[test]
    fn delivers_through_the_sink_in_order_and_counts() {
        let got = Arc::default();
        let sink = Flaky {
            got: Arc::clone(&got),
            fail: 2,
        };
        let d = Dispatcher::spawn(Box::new(sink), 4);
        assert_eq!(d.name(), "flaky");
        for n in 0..6 {
            d.submit(alert(n));
        }
        assert_eq!((d.dropped(), d.queued()), (2, 4));
        // Fails twice (waits 100 + 200 ms), then delivers the rest before the limit.
        assert_eq!(d.shutdown(Duration::from_secs(3)), 0);
        assert_eq!(*got.lock().unwrap(), ["0", "1", "2", "3"]);
    }
}
