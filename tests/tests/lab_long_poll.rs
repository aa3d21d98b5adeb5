//! A poll of a million connections runs on a thread of its own: /metrics answers at once
//! while it runs. The agent runs with `--pin-path`, so the test fills the very map it
//! polls with synthetic connections, all active.

use std::{
    thread,
    time::{Duration, Instant},
};

use tests::{
    flowmap::{self, Pins, fill},
    http,
    lab::Lab,
};

const ENTRIES: u32 = 1_000_000;
/// Scrapes at least: more while fewer than two polls ended meanwhile.
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
    http::eventually(
        "the agent tracking every synthetic connection",
        Duration::from_secs(120),
        || {
            let body = http::get(&lab.gw, http::AGENT_METRICS, "/metrics")?;
            (sample(&body, "egress_monitor_connections_active") as u32 >= ENTRIES).then_some(())
        },
    );
    let (_, before) = scrape(&lab);
    let count = "egress_monitor_poll_duration_seconds_count";
    // However slow the machine: scrapes go on until two polls ended while they ran.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut took = Vec::new();
    let after = loop {
        let (answer, body) = scrape(&lab);
        took.push(answer);
        if took.len() >= SCRAPES as usize && sample(&body, count) - sample(&before, count) >= 2.0 {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "two polls did not end within 300 s"
        );
        thread::sleep(Duration::from_millis(100));
    };
    let polls = sample(&after, count) - sample(&before, count);
    let polling = sample(&after, "egress_monitor_poll_duration_seconds_sum")
        - sample(&before, "egress_monitor_poll_duration_seconds_sum");
    // Polls longer than the interval run back to back: every scrape met one.
    assert!(
        polls >= 1.0 && polling / polls > 0.1,
        "{polls} polls took {polling} s: too short to overlap the scrapes"
    );
    let slowest = took.iter().max().expect("scrapes");
    eprintln!(
        "slowest of {} scrapes: {slowest:?}, while polls took {:.2} s each",
        took.len(),
        polling / polls
    );
    assert!(
        *slowest < ANSWER_LIMIT,
        "a scrape took {slowest:?} while {ENTRIES} connections were polled (polls of {:.2} s); \
         all: {took:?}",
        polling / polls
    );
}
