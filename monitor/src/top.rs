//! `monitor top`: the running agent's busiest connections, refreshed in the terminal.
//!
//! After each poll the agent ranks its open connections ([`Tracker`]) and publishes the
//! busiest as a [`View`], which `/top` beside `/metrics` serves as JSON; [`run`] fetches
//! and draws it.

use std::{
    cmp::{Ordering, Reverse},
    fmt::Write as _,
    io::{self, Write as _},
    net::SocketAddr,
    thread,
    time::{Duration, UNIX_EPOCH},
};

use anyhow::Context as _;
use foldhash::HashSet;
use monitor_common::flow::FlowKey;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    clock::Now,
    conntable::{Conn, ConnTable, LocalNets, Uid},
    consumer::{ConnCtx, Consumer},
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
///
/// Only connections that moved since the last poll have a rate; the others rank by bytes
/// alone. So a poll ranks the ones it handed over ([`Consumer::update`]) and the
/// [`MAX_ROWS`] with the most bytes, found among the [`MOST_DEPTH`] with the most that are
/// kept from poll to poll: its work follows what changed, not the size of the table. The
/// whole table is ranked again only when fewer than [`MAX_ROWS`] of those kept are left
/// (or before the first poll).
pub struct Tracker {
    last_ns: u64,
    tx: watch::Sender<View>,
    /// What the connections handed over since the last ranking showed.
    handed: Handed,
    /// `None` when to be found again from the whole table.
    most_bytes: Option<MostBytes>,
}

/// How many connections with the most bytes are kept: more than [`MAX_ROWS`], so that
/// some may leave the table before it is ranked whole again.
const MOST_DEPTH: usize = 4 * MAX_ROWS;

/// The connections with the most bytes in the table, most first: those of the table that
/// rank above every other by bytes, at most [`MOST_DEPTH`]. (One that leaves takes
/// nothing from that: the rest still rank above every other.)
#[derive(Clone)]
struct MostBytes {
    kept: Vec<ByBytes>,
    /// Whether they are all of the table's connections.
    all: bool,
}

impl MostBytes {
    /// Whether one handed over with `bytes` may be among them: it ranks above the last,
    /// or they are all of the table's.
    fn may_take(&self, bytes: &ByBytes) -> bool {
        self.all || self.kept.last().is_none_or(|last| bytes < last)
    }

    /// Adds `more` (none of them kept already), keeping the [`MOST_DEPTH`] with the most.
    fn extend(&mut self, more: impl IntoIterator<Item = ByBytes>) {
        self.kept.extend(more);
        self.all &= self.kept.len() <= MOST_DEPTH;
        keep_most(&mut self.kept, MOST_DEPTH);
    }
}

/// Past this many connections that may take a place among those with the most bytes, a
/// poll ranks the whole table: a read of the whole map hands every connection over.
const MAX_ENTRANTS: usize = 2 * MOST_DEPTH;

/// What the connections handed over since the last ranking showed.
#[derive(Clone)]
struct Handed {
    count: usize,
    /// Those that moved, by rank; the busiest [`MAX_ROWS`] of them are among these.
    moved: Busiest,
    /// Those that may take a place among the ones with the most bytes; `None` once more
    /// than [`MAX_ENTRANTS`] were, and the whole table is to be ranked.
    entrants: Option<Vec<ByBytes>>,
}

impl Default for Handed {
    fn default() -> Self {
        Self {
            count: 0,
            moved: Busiest::default(),
            entrants: Some(Vec::new()),
        }
    }
}

/// A connection's place by bytes alone: what ranks connections with no rate.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct ByBytes {
    bytes: Reverse<u64>,
    uid: Uid,
    key: FlowKey,
}

impl ByBytes {
    fn of(conn: &Conn) -> Self {
        Self {
            bytes: Reverse(total_bytes(conn)),
            uid: conn.uid,
            key: conn.key,
        }
    }
}

/// Payload bytes both ways.
fn total_bytes(conn: &Conn) -> u64 {
    conn.dir(0).bytes + conn.dir(1).bytes
}

/// The connection of `key` in `table`, if it is still the one `uid` names.
fn still<'t>(table: &'t ConnTable, key: &FlowKey, uid: Uid) -> Option<&'t Conn> {
    table.get(key).filter(|c| c.uid == uid)
}

/// Whether `conn` carried anything since the observation before its latest.
fn moved(conn: &Conn) -> bool {
    [0, 1].iter().any(|&d| conn.delta(d).bytes > 0)
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
    /// `conn`'s, over the `secs` since the last poll.
    fn of(conn: &Conn, secs: f64) -> Self {
        Self {
            rate: rates(conn, secs).iter().sum(),
            bytes: total_bytes(conn),
            uid: conn.uid,
        }
    }

    fn busier(&self, other: &Self) -> Ordering {
        other
            .rate
            .total_cmp(&self.rate)
            .then(other.bytes.cmp(&self.bytes))
            .then_with(|| self.uid.cmp(&other.uid))
    }
}

/// Payload bytes per second in each key direction over the `secs` since the last poll.
fn rates(conn: &Conn, secs: f64) -> [f64; 2] {
    [0, 1].map(|dir| {
        if secs > 0.0 {
            conn.delta(dir).bytes as f64 / secs
        } else {
            0.0
        }
    })
}

/// The busiest [`MAX_ROWS`] of the connections offered.
#[derive(Clone, Default)]
struct Busiest {
    /// Bounded: whenever it fills, only the busiest MAX_ROWS stay, and a connection that
    /// would rank below the last of them is passed over at once.
    kept: Vec<(Rank, FlowKey)>,
    floor: Option<Rank>,
}

impl Busiest {
    fn offer(&mut self, rank: Rank, key: FlowKey) {
        if self
            .floor
            .is_some_and(|f| rank.busier(&f) != Ordering::Less)
        {
            return;
        }
        self.kept.push((rank, key));
        if self.kept.len() >= 2 * MAX_ROWS {
            self.keep_busiest();
            self.floor = self.kept.last().map(|(rank, _)| *rank);
        }
    }

    /// Sorts the busiest [`MAX_ROWS`] first and drops the rest.
    fn keep_busiest(&mut self) {
        let busier = |a: &(Rank, FlowKey), b: &(Rank, FlowKey)| a.0.busier(&b.0);
        if self.kept.len() > MAX_ROWS {
            self.kept.select_nth_unstable_by(MAX_ROWS - 1, busier);
            self.kept.truncate(MAX_ROWS);
        }
        self.kept.sort_unstable_by(busier);
    }
}

impl Tracker {
    /// `start_ns`: a kernel time before the first packet counted; the first poll's rates
    /// run from there (so they are low if the programs attached well after it).
    pub fn new(start_ns: u64) -> Self {
        Self {
            last_ns: start_ns,
            tx: watch::Sender::new(View::default()),
            handed: Handed::default(),
            most_bytes: None,
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<View> {
        self.tx.subscribe()
    }

    fn secs_to(&self, now: Now) -> f64 {
        Duration::from_nanos(now.mono_ns.saturating_sub(self.last_ns)).as_secs_f64()
    }

    /// A connection handed over since the last ranking, as of `now`.
    fn handed(&mut self, conn: &Conn, now: Now) {
        let secs = self.secs_to(now);
        let handed = &mut self.handed;
        // Too many entrants: the whole table is ranked, nothing gathered here counts.
        if handed.entrants.is_none() {
            return;
        }
        handed.count += 1;
        if moved(conn) {
            handed.moved.offer(Rank::of(conn, secs), conn.key);
        }
        let entrant = ByBytes::of(conn);
        if let Some(entrants) = &mut handed.entrants
            && (self.most_bytes.as_ref()).is_none_or(|most| most.may_take(&entrant))
        {
            entrants.push(entrant);
            if entrants.len() > MAX_ENTRANTS {
                handed.entrants = None;
            }
        }
    }

    /// Ranks the table's connections as of `now` and publishes the busiest.
    pub fn update(&mut self, table: &ConnTable, local: &LocalNets, now: Now) {
        let secs = self.secs_to(now);
        let handed = std::mem::take(&mut self.handed);
        let ranked = (self.most_bytes.take())
            .filter(|_| handed.count < table.len())
            .and_then(|most| rank_handed(handed, most, table, secs));
        let (busiest, most) = match ranked {
            Some(ranked) => ranked,
            None => rank_all(table, secs),
        };
        self.most_bytes = Some(most);
        self.last_ns = now.mono_ns;
        let connections = busiest
            .iter()
            .map(|conn| row(conn, local, secs, now))
            .collect();
        self.tx.send_replace(View {
            ts: now.epoch,
            open: table.len(),
            connections,
        });
    }
}

/// The busiest connections of the whole table, and those with the most bytes.
fn rank_all(table: &ConnTable, secs: f64) -> (Vec<&Conn>, MostBytes) {
    let mut busiest = Busiest::default();
    let mut most = Vec::with_capacity(2 * MOST_DEPTH);
    for conn in table.iter() {
        busiest.offer(Rank::of(conn, secs), conn.key);
        most.push(ByBytes::of(conn));
        if most.len() == most.capacity() {
            keep_most(&mut most, MOST_DEPTH);
        }
    }
    keep_most(&mut most, MOST_DEPTH);
    let most = MostBytes {
        kept: most,
        all: table.len() <= MOST_DEPTH,
    };
    busiest.keep_busiest();
    let busiest = (busiest.kept.iter())
        .map(|(_, key)| table.get(key).expect("a connection of the table"))
        .collect();
    (busiest, most)
}

/// The busiest connections from those handed over and those with the most bytes at the
/// last ranking (`most`), and those with the most bytes now. `None` when that is not
/// enough to know: too many were handed over, or fewer than [`MAX_ROWS`] of `most` are
/// left in the table (others, not handed over, may rank above those that are not kept),
/// or one has fewer bytes than before, or one ranked among the busiest left the table
/// after it was handed over. (One that left and ranks below the busiest changes nothing:
/// those above it are what the busiest are.)
fn rank_handed(
    handed: Handed,
    mut most: MostBytes,
    table: &ConnTable,
    secs: f64,
) -> Option<(Vec<&Conn>, MostBytes)> {
    let Handed {
        mut moved,
        entrants,
        ..
    } = handed;
    let entrants = entrants?;
    let mut fewer = false;
    most.kept.retain_mut(|kept| {
        let Some(conn) = still(table, &kept.key, kept.uid) else {
            return false;
        };
        let now = ByBytes::of(conn);
        fewer |= now.bytes > kept.bytes;
        *kept = now;
        true
    });
    if fewer || (!most.all && most.kept.len() < MAX_ROWS) {
        return None;
    }
    let mut kept: HashSet<Uid> = most.kept.iter().map(|m| m.uid).collect();
    // Those handed over may have finished since.
    let present = |m: &ByBytes| still(table, &m.key, m.uid).is_some();
    most.extend((entrants.into_iter()).filter(|m| present(m) && kept.insert(m.uid)));
    let offered: HashSet<Uid> = moved.kept.iter().map(|(rank, _)| rank.uid).collect();
    let most_of_all = most.kept.iter().take(MAX_ROWS);
    for m in most_of_all.filter(|m| !offered.contains(&m.uid)) {
        let conn = still(table, &m.key, m.uid)?;
        moved.offer(Rank::of(conn, secs), conn.key);
    }
    moved.keep_busiest();
    let busiest = (moved.kept.iter())
        .map(|(rank, key)| still(table, key, rank.uid))
        .collect::<Option<Vec<&Conn>>>()?;
    Some((busiest, most))
}

/// Sorts the `depth` with the most bytes first and drops the rest.
fn keep_most(most: &mut Vec<ByBytes>, depth: usize) {
    if most.len() > depth {
        most.select_nth_unstable(depth - 1);
        most.truncate(depth);
    }
    most.sort_unstable();
}

fn row(conn: &Conn, local: &LocalNets, secs: f64, now: Now) -> Row {
    let view = local.view(conn);
    // "out" is what the local side sends; orig's when both or neither are local.
    let side = view.shown_local();
    let (local_ep, remote_ep) = view.ends(side);
    let out = view.dir_of(side);
    let bytes = [0, 1].map(|d| conn.dir(d).bytes);
    let rate = rates(conn, secs);
    Row {
        uid: conn.uid.to_string(),
        proto: proto::name(conn.key.proto).into_owned(),
        local: SocketAddr::new(local_ep.addr, local_ep.port),
        remote: SocketAddr::new(remote_ep.addr, remote_ep.port),
        bytes_out: bytes[out],
        bytes_in: bytes[1 - out],
        rate_out: rate[out],
        rate_in: rate[1 - out],
        age: Duration::from_nanos(now.mono_ns.saturating_sub(conn.first_ns())).as_secs_f64(),
    }
}

/// Ranks after every poll: the connections handed over, and those with the most bytes.
impl Consumer for Tracker {
    fn update(&mut self, conn: &ConnCtx, now: Now) {
        self.handed(conn.conn, now);
    }

    fn end_poll(&mut self, open: &ConnTable, local: &LocalNets, now: Now) {
        self.update(open, local, now);
    }
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
    use std::collections::BTreeMap;

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

    /// Polls that hand over only what moved, with connections growing, leaving and
    /// arriving, rank exactly as a ranking of the whole table does.
    #[test]
    fn ranking_what_moved_agrees_with_ranking_everything() {
        let mut table = ConnTable::new(Duration::from_secs(300), Uids::new([1, 2]));
        let mut tracker = Tracker::new(0);
        let view = tracker.subscribe();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |below: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % below
        };
        let spec = |port: u16, out: u64, back: u64| ConnSpec {
            orig: ("198.18.1.2", port),
            orig_bytes: out,
            resp_bytes: back,
            ..ConnSpec::timed()
        };
        let mut bytes: BTreeMap<u16, (u64, u64)> = BTreeMap::new();
        let mut next_port = 1u16;
        // More move in a poll than the ranking keeps while it goes.
        let mut ranked_what_moved = 0;
        for poll in 1..=60u64 {
            // The ones leaving are, now and then, among those with the most bytes.
            let leaving: Vec<u16> = bytes.keys().copied().filter(|_| next(600) == 0).collect();
            for port in &leaving {
                let (out, back) = bytes.remove(port).unwrap();
                table.remove(&spec(*port, out, back).conn().key).unwrap();
            }
            let mut moved = Vec::new();
            let arriving = if poll == 1 {
                6 * MAX_ROWS
            } else {
                next(20) as usize
            };
            for _ in 0..arriving {
                bytes.insert(next_port, (next(50_000), next(50_000)));
                moved.push(next_port);
                next_port += 1;
            }
            for (&port, sent) in bytes.iter_mut() {
                if next(2) == 0 {
                    sent.0 += next(40_000);
                    sent.1 += next(2) * next(40_000);
                    moved.push(port);
                }
            }
            moved.sort_unstable();
            moved.dedup();
            let snaps: Vec<_> = moved
                .iter()
                .map(|port| {
                    let (out, back) = bytes[port];
                    spec(*port, out, back).conn().snap()
                })
                .collect();
            table
                .observe_changed(|observe| {
                    snaps.iter().for_each(|s| observe(*s));
                    Ok::<(), ()>(())
                })
                .unwrap();
            let now = at(poll as f64);
            for snap in &snaps {
                tracker.handed(table.get(&snap.key).unwrap(), now);
            }
            // Now and then one handed over finishes in the same poll (a long poll
            // interval), after it was ranked.
            if next(3) == 0 {
                let port = moved[next(moved.len() as u64) as usize];
                let (out, back) = bytes.remove(&port).unwrap();
                table.remove(&spec(port, out, back).conn().key).unwrap();
            }
            ranked_what_moved += usize::from(
                (tracker.most_bytes.clone())
                    .and_then(|most| rank_handed(tracker.handed.clone(), most, &table, 1.0))
                    .is_some(),
            );
            let mut whole = Tracker::new(tracker.last_ns);
            tracker.update(&table, &local(), now);
            whole.update(&table, &local(), now);
            assert!(*view.borrow() == *whole.subscribe().borrow(), "poll {poll}");
        }
        assert!(ranked_what_moved > 30, "{ranked_what_moved} of 60 polls");
    }

    /// Those kept with the most bytes leave, and nothing is handed over: once fewer than
    /// a view's worth are left, the whole table is ranked again.
    #[test]
    fn those_with_the_most_bytes_leaving_rank_the_table_again() {
        let mut table = ConnTable::new(Duration::from_secs(300), Uids::new([1, 2]));
        let spec = |port: u16| ConnSpec {
            orig: ("198.18.1.2", port),
            orig_bytes: u64::from(port) * 100,
            ..ConnSpec::timed()
        };
        let n = 10 * MAX_ROWS as u16;
        observe(&mut table, &(1..=n).map(spec).collect::<Vec<_>>());
        let mut tracker = Tracker::new(0);
        tracker.update(&table, &local(), at(1.0));
        for (step, port) in (1..=n).rev().take(MOST_DEPTH).enumerate() {
            table.remove(&spec(port).conn().key);
            if step % 50 == 0 {
                let now = at(2.0 + step as f64);
                let mut whole = Tracker::new(tracker.last_ns);
                tracker.update(&table, &local(), now);
                whole.update(&table, &local(), now);
                assert!(*tracker.tx.borrow() == *whole.tx.borrow(), "{step} gone");
            }
        }
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
