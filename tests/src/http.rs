//! Reading servers' HTTP APIs from inside a lab namespace (the agent's /metrics, a
//! Prometheus, an Alertmanager), and waiting for an answer.

use std::{
    io::{Read, Write},
    net::TcpStream,
    thread,
    time::{Duration, Instant},
};

use crate::lab;

/// The agent's /metrics (its default `--metrics-addr`), inside the agent's namespace.
pub const AGENT_METRICS: &str = "127.0.0.1:9877";

/// A sample of the /metrics of the agent in `ns` (`name` with its labels, as written), or
/// `None` while /metrics does not answer or has no such sample.
pub fn agent_sample(ns: &str, name: &str) -> Option<f64> {
    sample(&get(ns, AGENT_METRICS, "/metrics")?, name)
}

/// The body of `GET path` (HTTP/1.0) to `addr` from inside `ns`, or `None` when nothing
/// answers 200 (yet).
pub fn get(ns: &str, addr: &str, path: &str) -> Option<String> {
    let (addr, path) = (addr.to_owned(), path.to_owned());
    lab::run_in_ns(ns, move || {
        let mut stream = TcpStream::connect(&addr).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("set a read timeout");
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        head.contains(" 200 ").then(|| body.to_owned())
    })
}

/// The value of a sample in Prometheus text format (`name` with its labels, if any, as
/// written), or `None` when the text has no such sample.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok())?
    })
}

/// Polls `f` every 250 ms until it returns `Some`; panics with `what` after `limit`.
pub fn eventually<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        thread::sleep(Duration::from_millis(250));
    }
}
