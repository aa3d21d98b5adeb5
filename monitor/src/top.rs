//! `monitor top`: the running agent's busiest connections, refreshed in the terminal.
//!
//! After each poll the agent ranks its open connections ([`Tracker`]) and publishes the
//! busiest as a [`View`], which `/top` beside `/metrics` serves as JSON; [`run`] fetches
//! and draws it.

use std::{
    cmp::Ordering,
    fmt::Write as _,
    io::{self, Write as _},
    net::SocketAddr,
    thread,
    time::{Duration, UNIX_EPOCH},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    clock::Now,
    conntable::{Conn, ConnTable, Endpoint, LocalNets, Uid},
    consumer::Consumer,
    proto,
    rules::human_bytes,
};

/// Connections the agent keeps in its view: `--count` shows at most this many.
pub const MAX_ROWS: usize = 100;

/// How long one fetch of `/top` may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const CLEAR_HOME: &str = "\x1b[H\x1b[2J";

/// What `/top` serves: the busiest open connections at the last poll.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct View {
    /// The poll's time, epoch seconds (0 before the first poll).
    pub ts: f64,
    /// Connections open at that poll.
    pub open: usize,
    /// Busiest first: by rate (out + in), then by bytes (out + in).
    pub connections: Vec<Row>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub uid: String,
    pub proto: String,
    /// The local and the remote endpoint; orig and resp when not exactly one side is
    /// local.
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Payload bytes local -> remote, and remote -> local.
    pub bytes_out: u64,
    pub bytes_in: u64,
    /// Payload bytes per second over the last poll interval.
    pub rate_out: f64,
    pub rate_in: f64,
    /// Seconds since the first packet.
    pub age: f64,
}

/// The agent's side: ranks connections after each poll and publishes the top rows.
pub struct Tracker {
    last_ns: u64,
    tx: watch::Sender<View>,
}

/// One ranked connection, before it becomes a [`Row`].
struct Candidate<'a> {
    conn: &'a Conn,
    rank: Rank,
    local: Endpoint,
    remote: Endpoint,
    bytes: [u64; 2],
    rate: [f64; 2],
}

/// What connections are ranked by: the busier first, then the one with more bytes, then
/// the smaller uid.
#[derive(Clone, Copy)]
struct Rank {
    rate: f64,
    bytes: u64,
    uid: Uid,
}

impl Rank {
    fn busier(&self, other: &Self) -> Ordering {
        other
            .rate
            .total_cmp(&self.rate)
            .then(other.bytes.cmp(&self.bytes))
            .then_with(|| self.uid.cmp(&other.uid))
    }
}

impl Candidate<'_> {
    fn busier(&self, other: &Self) -> Ordering {
        self.rank.busier(&other.rank)
    }
}

impl Tracker {
    /// `start_ns`: a kernel time before the first packet counted; the first poll's rates
    /// run from there (so they are low if the programs attached well after it).
    pub fn new(start_ns: u64) -> Self {
        Self {
            last_ns: start_ns,
            tx: watch::Sender::new(View::default()),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<View> {
        self.tx.subscribe()
    }

    /// Ranks the table's connections as of `now` and publishes the busiest.
    pub fn update(&mut self, table: &ConnTable, local: &LocalNets, now: Now) {
        let secs = Duration::from_nanos(now.mono_ns.saturating_sub(self.last_ns)).as_secs_f64();
        // Bounded: whenever it fills, only the busiest MAX_ROWS stay, and a connection
        // that would rank below the last of them is passed over at once.
        let mut busiest: Vec<Candidate> = Vec::with_capacity(2 * MAX_ROWS);
        let mut floor: Option<Rank> = None;
        for conn in table.iter() {
            let rate = |dir: usize| {
                if secs > 0.0 {
                    conn.delta(dir).bytes as f64 / secs
                } else {
                    0.0
                }
            };
            let now_bytes = [0, 1].map(|d| conn.dir(d).bytes);
            let rank = Rank {
                rate: rate(0) + rate(1),
                bytes: now_bytes[0] + now_bytes[1],
                uid: conn.uid,
            };
            if floor.is_some_and(|f| rank.busier(&f) != Ordering::Less) {
                continue;
            }
            let view = local.view(conn);
            // "out" is what the local side sends; orig's when both or neither are local.
            let side = view.shown_local();
            let (local_ep, remote_ep) = view.ends(side);
            let out_dir = view.dir_of(side);
            busiest.push(Candidate {
                conn,
                rank,
                local: local_ep,
                remote: remote_ep,
                bytes: [now_bytes[out_dir], now_bytes[1 - out_dir]],
                rate: [rate(out_dir), rate(1 - out_dir)],
            });
            if busiest.len() == busiest.capacity() {
                keep_busiest(&mut busiest);
                floor = busiest.last().map(|c| c.rank);
            }
        }
        keep_busiest(&mut busiest);
        self.last_ns = now.mono_ns;
        let connections = busiest
            .iter()
            .map(|c| Row {
                uid: c.conn.uid.to_string(),
                proto: proto::name(c.conn.key.proto).into_owned(),
                local: SocketAddr::new(c.local.addr, c.local.port),
                remote: SocketAddr::new(c.remote.addr, c.remote.port),
                bytes_out: c.bytes[0],
                bytes_in: c.bytes[1],
                rate_out: c.rate[0],
                rate_in: c.rate[1],
                age: Duration::from_nanos(now.mono_ns.saturating_sub(c.conn.first_ns()))
                    .as_secs_f64(),
            })
            .collect();
        self.tx.send_replace(View {
            ts: now.epoch,
            open: table.len(),
            connections,
        });
    }
}

/// Ranks after every poll, over all open connections.
impl Consumer for Tracker {
    fn end_poll(&mut self, open: &ConnTable, local: &LocalNets, now: Now) {
        self.update(open, local, now);
    }
}

/// Sorts the busiest [`MAX_ROWS`] first and drops the rest.
fn keep_busiest(candidates: &mut Vec<Candidate>) {
    if candidates.len() > MAX_ROWS {
        candidates.select_nth_unstable_by(MAX_ROWS - 1, Candidate::busier);
        candidates.truncate(MAX_ROWS);
    }
    candidates.sort_unstable_by(Candidate::busier);
}

/// What `monitor top` is asked for.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// The agent's metrics address, where it serves /top.
    pub metrics_addr: SocketAddr,
    pub interval: Duration,
    /// Rows shown, at most [`MAX_ROWS`].
    pub count: u16,
    /// One plain frame, then exit.
    pub once: bool,
}

/// `monitor top`: draws the agent's view every `--interval` until interrupted, or once
/// with `--once`.
pub fn run(args: &Options) -> anyhow::Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(FETCH_TIMEOUT))
        .http_status_as_error(true)
        .build()
        .into();
    let count = usize::from(args.count);
    let mut stdout = io::stdout().lock();
    if args.once {
        let view = fetch(&agent, args.metrics_addr)?;
        stdout.write_all(frame(Some(&view), args.metrics_addr, count, None).as_bytes())?;
        return Ok(stdout.flush()?);
    }
    let mut last = None;
    loop {
        let error = match fetch(&agent, args.metrics_addr) {
            Ok(view) => {
                last = Some(view);
                None
            }
            Err(err) => Some(format!(
                "{err:#}; retrying every {}",
                humantime::format_duration(args.interval)
            )),
        };
        let mut screen = String::from(CLEAR_HOME);
        screen.push_str(&frame(
            last.as_ref(),
            args.metrics_addr,
            count,
            error.as_deref(),
        ));
        stdout.write_all(screen.as_bytes())?;
        stdout.flush()?;
        thread::sleep(args.interval);
    }
}

fn fetch(agent: &ureq::Agent, addr: SocketAddr) -> anyhow::Result<View> {
    let url = format!("http://{addr}/top");
    let body = agent
        .get(&url)
        .call()
        .and_then(|mut response| response.body_mut().read_to_string())
        .map_err(|err| match err {
            ureq::Error::StatusCode(code) => {
                anyhow::anyhow!("the agent at {addr} answered {url} with HTTP {code}")
            }
            err => anyhow::Error::new(err).context(format!(
                "cannot reach the agent at {addr} (is `monitor run` running? --metrics-addr)"
            )),
        })?;
    serde_json::from_str(&body).with_context(|| format!("{url}: not a view of connections"))
}

/// One screen: a header, the first `count` rows of `view` (the last one fetched, if any)
/// as aligned columns, and `error` on a line of its own.
pub fn frame(view: Option<&View>, addr: SocketAddr, count: usize, error: Option<&str>) -> String {
    let mut out = String::new();
    let rows = view.map_or(&[][..], |v| {
        &v.connections[..v.connections.len().min(count)]
    });
    match view {
        Some(view) => {
            let at = Duration::try_from_secs_f64(view.ts)
                .map(|d| humantime::format_rfc3339_seconds(UNIX_EPOCH + d).to_string())
                .unwrap_or_else(|_| "-".into());
            let plural = if view.open == 1 { "" } else { "s" };
            let _ = writeln!(
                out,
                "monitor top: agent {addr} at {at}: {} connection{plural} open, busiest {} shown",
                view.open,
                rows.len()
            );
        }
        None => {
            let _ = writeln!(out, "monitor top: agent {addr}");
        }
    }
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            [
                r.local.to_string(),
                r.remote.to_string(),
                r.proto.clone(),
                human_bytes(r.bytes_out),
                human_bytes(r.bytes_in),
                human_rate(r.rate_out),
                human_rate(r.rate_in),
                human_age(r.age),
            ]
            .map(|cell| strip_controls(&cell))
        })
        .collect();
    const HEADER: [&str; 8] = [
        "LOCAL", "REMOTE", "PROTO", "OUT", "IN", "RATE OUT", "RATE IN", "AGE",
    ];
    let mut widths = HEADER.map(str::len);
    for row in &cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut line = |cells: [&str; 8], arrow: &str| {
        let [local, remote, proto, rest @ ..] = cells;
        let [w_local, w_remote, w_proto, w_rest @ ..] = widths;
        let _ = write!(
            out,
            "{local:<w_local$} {arrow} {remote:<w_remote$}  {proto:<w_proto$}"
        );
        for (cell, width) in rest.iter().zip(w_rest) {
            let _ = write!(out, "  {cell:>width$}");
        }
        out.push('\n');
    };
    line(HEADER, " ");
    for row in &cells {
        line(row.each_ref().map(String::as_str), "→");
    }
    if let Some(error) = error {
        let _ = writeln!(out, "error: {}", strip_controls(error));
    }
    out
}

/// `text` without control characters (C0, DEL, C1: ESC, CR, CSI, BEL, ...) or the
/// bidirectional overrides that reorder what follows: what the agent serves, and errors
/// that quote it, come from the network and must not drive the terminal.
fn strip_controls(text: &str) -> String {
    text.chars()
        .filter(|&c| {
            !c.is_control() && !matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        })
        .collect()
}

/// `1.2 MB/s`.
pub fn human_rate(bytes_per_sec: f64) -> String {
    format!("{}/s", human_bytes(bytes_per_sec.round() as u64))
}

/// `42s`, `3m05s`, `2h07m`, `3d04h`.
pub fn human_age(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        conntable::Uids,
        rules::testkit::{ConnSpec, at, local},
    };

    fn observe(table: &mut ConnTable, specs: &[ConnSpec]) {
        for spec in specs {
            table.observe(spec.conn().snap());
        }
    }

    fn uploads(bytes: [u64; 3]) -> [ConnSpec; 3] {
        [0, 1, 2].map(|i| ConnSpec {
            orig: ("198.18.1.2", 40_000 + i as u16),
            orig_bytes: bytes[i],
            ..ConnSpec::timed()
        })
    }

    #[test]
    fn rows_by_rate_then_bytes_with_rates_over_the_poll_interval() {
        let mut table = ConnTable::new(Duration::from_secs(300), Uids::new([1, 2]));
        let mut tracker = Tracker::new(0);
        let view = tracker.subscribe();
        observe(&mut table, &uploads([1_000, 50_000, 9_000]));
        tracker.update(&table, &local(), at(1.0));
        let ports =
            |v: &View| -> Vec<u16> { v.connections.iter().map(|r| r.local.port()).collect() };
        assert_eq!(ports(&view.borrow()), [40_001, 40_002, 40_000]);
        assert_eq!(view.borrow().connections[0].rate_out, 50_000.0);

        // Two seconds later: the first one sent 4 MB more, the second nothing.
        observe(&mut table, &uploads([4_001_000, 50_000, 9_000]));
        tracker.update(&table, &local(), at(3.0));
        let v = view.borrow().clone();
        assert_eq!(v.open, 3);
        assert_eq!(v.ts, at(3.0).epoch);
        assert_eq!(ports(&v), [40_000, 40_001, 40_002], "idle ones by bytes");
        let top = &v.connections[0];
        assert_eq!((top.rate_out, top.rate_in), (2_000_000.0, 0.0));
        assert_eq!((top.bytes_out, top.bytes_in), (4_001_000, 0));
        assert_eq!(top.age, 2.0, "since its first packet at 1 s");
        assert_eq!(top.proto, "tcp");
        assert_eq!(top.remote.to_string(), "203.0.113.2:443");
        assert_eq!(v.connections[1].rate_out, 0.0);
    }

    #[test]
    fn local_responder_sends_out() {
        let mut table = ConnTable::new(Duration::from_secs(300), Uids::new([1, 2]));
        let inbound = ConnSpec {
            orig: ("203.0.113.9", 50_000),
            resp: ("198.18.1.5", 22),
            orig_bytes: 100,
            resp_bytes: 7_000,
            ..ConnSpec::timed()
        };
        observe(&mut table, &[inbound]);
        let mut tracker = Tracker::new(0);
        tracker.update(&table, &local(), at(1.0));
        let row = tracker.subscribe().borrow().connections[0].clone();
        assert_eq!(row.local.to_string(), "198.18.1.5:22");
        assert_eq!(row.remote.to_string(), "203.0.113.9:50000");
        assert_eq!((row.bytes_out, row.bytes_in), (7_000, 100));
    }

    /// Busier ones come first, last and in between (a permutation of the ports): rows
    /// kept early are displaced, later ones passed over.
    #[test]
    fn keeps_only_the_busiest() {
        let mut table = ConnTable::new(Duration::from_secs(300), Uids::new([1, 2]));
        let n = 3 * MAX_ROWS as u16;
        let specs: Vec<ConnSpec> = (0..n)
            .map(|k| (k * 7 + n / 2) % n)
            .map(|i| ConnSpec {
                orig: ("198.18.1.2", 10_000 + i),
                orig_bytes: u64::from(i) * 1_000,
                ..ConnSpec::timed()
            })
            .collect();
        observe(&mut table, &specs);
        let mut tracker = Tracker::new(0);
        tracker.update(&table, &local(), at(1.0));
        let view = tracker.subscribe().borrow().clone();
        assert_eq!(view.open, 3 * MAX_ROWS);
        assert_eq!(view.connections.len(), MAX_ROWS);
        let expected: Vec<u16> = (0..MAX_ROWS as u16).map(|i| 10_299 - i).collect();
        let got: Vec<u16> = view.connections.iter().map(|r| r.local.port()).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn human_units() {
        assert_eq!(human_rate(1_234_567.0), "1.2 MB/s");
        assert_eq!(human_rate(999.4), "999 B/s");
        assert_eq!(human_rate(0.0), "0 B/s");
        assert_eq!(human_age(42.9), "42s");
        assert_eq!(human_age(185.0), "3m05s");
        assert_eq!(human_age(7_620.0), "2h07m");
        assert_eq!(human_age(3.0 * 86_400.0 + 4.0 * 3_600.0), "3d04h");
    }

    fn row(local: &str, remote: &str, out: u64, rate_out: f64) -> Row {
        Row {
            uid: "Cx".into(),
            proto: "tcp".into(),
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            bytes_out: out,
            bytes_in: 2_000,
            rate_out,
            rate_in: 0.0,
            age: 65.0,
        }
    }

    #[test]
    fn frame_is_aligned_and_bounded_by_count() {
        let view = View {
            ts: 1_795_478_400.0,
            open: 7,
            connections: vec![
                row(
                    "198.18.1.2:40000",
                    "203.0.113.2:443",
                    12_345_678,
                    1_200_000.0,
                ),
                row("[2001:db8:1::2]:5000", "[2001:db8:2::2]:22", 999, 0.0),
                row("198.18.1.3:1", "203.0.113.3:80", 10, 0.0),
            ],
        };
        let addr = "127.0.0.1:9877".parse().unwrap();
        let text = frame(Some(&view), addr, 2, None);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "monitor top: agent 127.0.0.1:9877 at 2026-11-24T00:00:00Z: 7 connections open, busiest 2 shown"
        );
        assert_eq!(lines.len(), 4, "header, column names, 2 rows:\n{text}");
        assert_eq!(
            lines[2],
            "198.18.1.2:40000     → 203.0.113.2:443     tcp    12.3 MB  2.0 KB  1.2 MB/s    0 B/s  1m05s"
        );
        assert_eq!(
            lines[3],
            "[2001:db8:1::2]:5000 → [2001:db8:2::2]:22  tcp      999 B  2.0 KB     0 B/s    0 B/s  1m05s"
        );
        assert!(
            lines[1].starts_with("LOCAL                  REMOTE"),
            "{text}"
        );
        assert!(!text.contains('\x1b'), "no terminal control:\n{text}");

        let failed = frame(None, addr, 20, Some("cannot reach the agent"));
        assert!(
            failed.ends_with("error: cannot reach the agent\n"),
            "{failed}"
        );
    }

    /// What `/top` serves comes over the network: no string in it, nor in an error about
    /// it, may move the cursor, retitle the terminal or rewrite a line.
    #[test]
    fn frame_prints_no_control_characters() {
        let mut hostile = row("198.18.1.2:40000", "203.0.113.2:443", 5, 0.0);
        hostile.proto = "tcp\x1b[2J\x1b]0;owned\x07\r\u{9b}31m\u{202e}x\x7f".into();
        let view = View {
            ts: 1.0,
            open: 1,
            connections: vec![hostile],
        };
        let addr = "127.0.0.1:9877".parse().unwrap();
        let text = frame(Some(&view), addr, 20, Some("unknown field `\x1b[31mred\r`"));
        let controls: Vec<char> = text
            .chars()
            .filter(|&c| c != '\n')
            .filter(|&c| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}'))
            .collect();
        assert!(controls.is_empty(), "{controls:?} in:\n{text}");
        assert!(
            text.contains("tcp[2J]0;owned31mx"),
            "the rest stays:\n{text}"
        );
        assert!(text.ends_with("error: unknown field `[31mred`\n"), "{text}");
    }

    #[test]
    fn view_round_trips_as_json() {
        let view = View {
            ts: 1.5,
            open: 1,
            connections: vec![row("198.18.1.2:40000", "203.0.113.2:443", 5, 2.5)],
        };
        let json = serde_json::to_string(&view).unwrap();
        assert!(
            json.starts_with(r#"{"ts":1.5,"open":1,"connections":[{"uid":"Cx""#),
            "{json}"
        );
        assert!(json.contains(r#""local":"198.18.1.2:40000""#), "{json}");
        assert_eq!(serde_json::from_str::<View>(&json).unwrap(), view);
    }
}
