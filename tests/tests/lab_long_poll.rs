//! A poll of a million connections runs on a thread of its own: /metrics answers at once
//! while it runs. The agent runs with `--pin-path`, so the test fills the very map it
//! polls with synthetic connections, all active, and keeps every poll a read of the whole
//! map by counting lost changes, as a full ring of changes does. A test binary of its own,
//! not a module of `labs`: scrapes are timed, and test binaries run one after another, so
//! no other test's traffic shares the CPUs meanwhile.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use tests::{
    flowmap::{self, Pins, fill},
    http,
    lab::Lab,
};

const ENTRIES: u32 = 1_000_000;
const SCRAPES: u32 = 30;
/// What a scrape may take while a poll runs.
const ANSWER_LIMIT: Duration = Duration::from_millis(100);

fn scrape(lab: &Lab) -> (Duration, String) {
    let started = Instant::now();
    let body = http::get(&lab.gw, http::AGENT_METRICS, "/metrics").expect("/metrics answers 200");
    (started.elapsed(), body)
}

fn sample(body: &str, name: &str) -> f64 {
    http::sample(body, name).unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

#[test]
fn metrics_answer_while_a_million_connections_are_polled() {
    let lab = Lab::new();
    let pins = Pins::new("test-long-poll");
    let _agent = flowmap::start_agent(&lab, &pins, ENTRIES, "100ms");
    fill(&pins, ENTRIES);
    let losing = AtomicBool::new(true);
    thread::scope(|scope| {
        scope.spawn(|| {
            while losing.load(Ordering::Relaxed) {
                flowmap::lose_a_change(&pins);
                thread::sleep(Duration::from_millis(50));
            }
        });
        let _stop = Stop(&losing);
        scrapes_while_polling(&lab);
    });
}

/// Ends the losing of changes when the scrapes end, failed or not.
struct Stop<'a>(&'a AtomicBool);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Scrapes while polls of the whole map run back to back.
fn scrapes_while_polling(lab: &Lab) {
    http::eventually(
        "the agent tracking every synthetic connection",
        Duration::from_secs(120),
        || {
            let body = http::get(&lab.gw, http::AGENT_METRICS, "/metrics")?;
            (sample(&body, "egress_monitor_connections_active") as u32 >= ENTRIES).then_some(())
        },
    );
    let (_, before) = scrape(lab);
    let count = |body: &str| sample(body, "egress_monitor_poll_duration_seconds_count");
    let mut took = Vec::new();
    // SCRAPES timed ones, then on until two polls ended, however long they take: polls
    // run back to back, so the timed ones met some.
    let started = Instant::now();
    loop {
        let (answered, body) = scrape(lab);
        if took.len() < SCRAPES as usize {
            took.push(answered);
        } else if count(&body) - count(&before) >= 2.0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "two polls did not end in 300 s"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let (_, after) = scrape(lab);
    let polls = sample(&after, "egress_monitor_poll_duration_seconds_count")
        - sample(&before, "egress_monitor_poll_duration_seconds_count");
    let polling = sample(&after, "egress_monitor_poll_duration_seconds_sum")
        - sample(&before, "egress_monitor_poll_duration_seconds_sum");
    // Polls longer than the interval run back to back: every scrape met one.
    assert!(
        polls >= 1.0 && polling / polls > 0.1,
        "{polls} polls took {polling} s: too short to overlap the scrapes"
    );
    let slowest = took.iter().max().expect("scrapes");
    eprintln!(
        "slowest of {SCRAPES} scrapes: {slowest:?}, while polls took {:.2} s each",
        polling / polls
    );
    assert!(
        *slowest < ANSWER_LIMIT,
        "a scrape took {slowest:?} while {ENTRIES} connections were polled (polls of {:.2} s); \
         all: {took:?}",
        polling / polls
    );
}
