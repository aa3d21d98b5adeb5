//! `cargo xtask bench soak`: the agent under a bounded mixed load for a long while.
//!
//! The release agent watches the gateway's WAN-facing veth while generators in the lab run
//! short TCP downloads and uploads (a new connection each time), UDP request/response
//! bursts, a ping burst now and then, and one long-lived slow TCP stream. Every 30 s the
//! agent's resident memory, CPU time and /metrics are sampled. At the end the agent is
//! stopped and every connection the generators completed must have exactly one conn-log
//! record: TCP and UDP matched by protocol and ports, ICMP by count (the agent keys ICMP
//! echo by host pair and type, so each burst, well over the idle timeout apart, is one
//! connection).
//!
//! `SOAK_SECS` overrides the length of the run (default 600 s, for a quick check: 60).
//! Prints a Markdown table and a summary for BENCHMARKS.md; exits 1 if a connection was
//! lost, recorded twice, or a generator failed.

use std::{
    collections::HashMap,
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    panic::{self, AssertUnwindSafe},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use tests::{
    agent::{Agent, ConnRecord},
    http,
    lab::{self, Lab},
    procfs, traffic,
};

const DEFAULT_SECS: u64 = 600;
const WARM_UP: Duration = Duration::from_secs(60);
const CPU_WINDOW: Duration = Duration::from_secs(120);
const SAMPLE_EVERY: Duration = Duration::from_secs(30);
const IDLE_TIMEOUT: &str = "30s";
/// Longer than the idle timeout: each ping burst is a connection of its own.
const PING_EVERY: Duration = Duration::from_secs(45);
const PINGS_PER_BURST: u32 = 10;
/// Generators must have finished this long after the run's end.
const GRACE: Duration = Duration::from_secs(60);
const METRICS_ADDR: &str = "127.0.0.1:9877";
const SLOW_CHUNK: usize = 512;
const SLOW_EVERY: Duration = Duration::from_millis(500);
const MIB: f64 = 1024.0 * 1024.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    TcpDownload,
    TcpUpload,
    Udp,
    SlowStream,
}

impl Kind {
    const ALL: [Kind; 4] = [
        Kind::TcpDownload,
        Kind::TcpUpload,
        Kind::Udp,
        Kind::SlowStream,
    ];

    fn proto(self) -> &'static str {
        match self {
            Kind::Udp => "udp",
            _ => "tcp",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::TcpDownload => "TCP download",
            Kind::TcpUpload => "TCP upload",
            Kind::Udp => "UDP exchange",
            Kind::SlowStream => "slow TCP stream",
        }
    }
}

/// One connection a generator completed, as the generator counted it.
#[derive(Clone, Copy, Debug)]
struct Made {
    kind: Kind,
    client_port: u16,
    server_port: u16,
    orig_bytes: u64,
    resp_bytes: u64,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    completed: AtomicU64,
    made: Mutex<Vec<Made>>,
    pings: Mutex<Vec<traffic::PingResult>>,
    failures: Mutex<Vec<String>>,
}

impl Shared {
    fn made(&self, made: Made) {
        lock(&self.made).push(made);
        self.completed.fetch_add(1, Ordering::Relaxed);
    }

    fn failed(&self, what: String) {
        eprintln!("soak: generator failure: {what}");
        lock(&self.failures).push(what);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sleeps for `d`, or less if the run is stopped meanwhile.
    fn pause(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stopped() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            thread::sleep(left.min(Duration::from_millis(100)));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// xorshift64*: a fixed seed per generator makes the mix the same on every run.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

#[derive(Clone)]
struct Ctx {
    shared: Arc<Shared>,
    lan: String,
    wan: String,
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(non-text panic)".into())
}

fn wan_server() -> SocketAddr {
    SocketAddr::new(lab::WAN_HOST_V4.into(), 0)
}

/// New TCP connections, 50–500 KB each, one after another with short pauses.
fn tcp_loop(ctx: Ctx, kind: Kind, seed: u64) {
    let mut rng = Rng::new(seed);
    while !ctx.shared.stopped() {
        let bytes = rng.range(50_000, 500_000);
        let run = panic::catch_unwind(AssertUnwindSafe(|| match kind {
            Kind::TcpDownload => traffic::tcp_download(&ctx.lan, &ctx.wan, wan_server(), bytes),
            _ => traffic::tcp_upload(&ctx.lan, &ctx.wan, wan_server(), bytes),
        }));
        match run {
            Ok(t) if t.client_sent == t.server_received && t.server_sent == t.client_received => {
                ctx.shared.made(Made {
                    kind,
                    client_port: t.client.port(),
                    server_port: t.server.port(),
                    orig_bytes: t.client_sent,
                    resp_bytes: t.server_sent,
                })
            }
            Ok(t) => ctx
                .shared
                .failed(format!("{}: ends disagree: {t:?}", kind.label())),
            Err(p) => ctx
                .shared
                .failed(format!("{}: {}", kind.label(), panic_text(&*p))),
        }
        ctx.shared.pause(Duration::from_millis(rng.range(50, 250)));
    }
}

/// UDP request/response bursts, each from a new client socket.
fn udp_loop(ctx: Ctx, seed: u64) {
    let mut rng = Rng::new(seed);
    while !ctx.shared.stopped() {
        let count = rng.range(5, 50);
        let size = rng.range(64, 1200) as usize;
        let run = panic::catch_unwind(AssertUnwindSafe(|| {
            traffic::udp_exchange(&ctx.lan, &ctx.wan, wan_server(), count, size)
        }));
        match run {
            Ok(u) if u.responses == count && u.server_received == count => ctx.shared.made(Made {
                kind: Kind::Udp,
                client_port: u.client.port(),
                server_port: u.server.port(),
                orig_bytes: u.request_bytes(),
                resp_bytes: u.response_bytes(),
            }),
            Ok(u) => ctx.shared.failed(format!("UDP: lost datagrams: {u:?}")),
            Err(p) => ctx.shared.failed(format!("UDP: {}", panic_text(&*p))),
        }
        ctx.shared.pause(Duration::from_millis(rng.range(100, 500)));
    }
}

/// A ping burst every [`PING_EVERY`].
fn ping_loop(ctx: Ctx) {
    ctx.shared.pause(Duration::from_secs(5));
    while !ctx.shared.stopped() {
        let run = panic::catch_unwind(AssertUnwindSafe(|| {
            traffic::ping(&ctx.lan, lab::WAN_HOST_V4.into(), PINGS_PER_BURST, 56)
        }));
        match run {
            Ok(p) if p.received == p.transmitted => {
                lock(&ctx.shared.pings).push(p);
                ctx.shared.completed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(p) => ctx.shared.failed(format!("ping: replies missing: {p:?}")),
            Err(p) => ctx.shared.failed(format!("ping: {}", panic_text(&*p))),
        }
        ctx.shared.pause(PING_EVERY);
    }
}

/// One TCP connection for the whole run: 512 bytes upstream every 500 ms.
fn slow_stream(ctx: Ctx) {
    match run_slow_stream(&ctx) {
        Ok(made) => ctx.shared.made(made),
        Err(e) => ctx.shared.failed(format!("slow TCP stream: {e}")),
    }
}

fn run_slow_stream(ctx: &Ctx) -> Result<Made, String> {
    let listener = lab::run_in_ns(&ctx.wan, || TcpListener::bind(wan_server()))
        .map_err(|e| format!("bind: {e}"))?;
    let server = listener.local_addr().map_err(|e| e.to_string())?;
    let server_thread = thread::spawn(move || -> io::Result<u64> {
        let mut stream = traffic::accept_within(&listener, Duration::from_secs(10));
        drop(listener);
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut received = 0u64;
        loop {
            match stream.read(&mut buf)? {
                0 => return Ok(received),
                n => received += n as u64,
            }
        }
    });
    let mut stream = lab::run_in_ns(&ctx.lan, move || {
        TcpStream::connect_timeout(&server, Duration::from_secs(10))
    })
    .map_err(|e| format!("connect to {server}: {e}"))?;
    let client = stream.local_addr().map_err(|e| e.to_string())?;
    let io_err = |what: &str, e: io::Error| format!("{client} -> {server}: {what}: {e}");
    stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .and_then(|()| stream.set_read_timeout(Some(Duration::from_secs(30))))
        .map_err(|e| io_err("timeouts", e))?;
    let chunk = [0x5au8; SLOW_CHUNK];
    let mut sent = 0u64;
    while !ctx.shared.stopped() {
        stream
            .write_all(&chunk)
            .map_err(|e| io_err(&format!("write after {sent} bytes"), e))?;
        sent += SLOW_CHUNK as u64;
        ctx.shared.pause(SLOW_EVERY);
    }
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| io_err("shutdown", e))?;
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .map_err(|e| io_err("read to EOF", e))?;
    let received = match server_thread.join() {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => return Err(io_err("server read", e)),
        Err(p) => return Err(format!("server: {}", panic_text(&*p))),
    };
    if received != sent {
        return Err(format!("sent {sent} bytes, server received {received}"));
    }
    Ok(Made {
        kind: Kind::SlowStream,
        client_port: client.port(),
        server_port: server.port(),
        orig_bytes: sent,
        resp_bytes: 0,
    })
}

/// What /metrics said.
#[derive(Clone, Copy, Debug)]
struct Metrics {
    connections_total: f64,
    connections_active: f64,
    flow_map_entries: f64,
    poll_sum: f64,
    poll_count: f64,
}

fn metrics(gw: &str) -> Option<Metrics> {
    let text = http::get(gw, METRICS_ADDR, "/metrics")?;
    let value = |name: &str| http::sample(&text, &format!("egress_monitor_{name}"));
    Some(Metrics {
        connections_total: value("connections_total")?,
        connections_active: value("connections_active")?,
        flow_map_entries: value("flow_map_entries")?,
        poll_sum: value("poll_duration_seconds_sum")?,
        poll_count: value("poll_duration_seconds_count")?,
    })
}

struct Sample {
    /// Since the generators started.
    at: Duration,
    rss_kib: u64,
    /// utime + stime, seconds.
    cpu: f64,
    completed: u64,
    metrics: Option<Metrics>,
}

impl Sample {
    fn take(pid: u32, gw: &str, start: Instant, shared: &Shared) -> Sample {
        Sample {
            at: start.elapsed(),
            rss_kib: procfs::rss_kib(pid),
            cpu: procfs::cpu_secs(pid),
            completed: shared.completed.load(Ordering::Relaxed),
            metrics: metrics(gw),
        }
    }

    fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 * 1024.0 / MIB
    }
}

/// Agent CPU, % of one CPU, between two samples.
fn cpu_pct(a: &Sample, b: &Sample) -> f64 {
    let wall = (b.at - a.at).as_secs_f64();
    if wall <= 0.0 {
        0.0
    } else {
        100.0 * (b.cpu - a.cpu) / wall
    }
}

/// Mean poll duration (ms) between two samples.
fn poll_ms(a: &Sample, b: &Sample) -> Option<f64> {
    let (a, b) = (a.metrics?, b.metrics?);
    let n = b.poll_count - a.poll_count;
    (n > 0.0).then(|| 1000.0 * (b.poll_sum - a.poll_sum) / n)
}

fn run_secs() -> u64 {
    match std::env::var("SOAK_SECS") {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|&s| s >= 30)
            .unwrap_or_else(|| panic!("SOAK_SECS={v}: want whole seconds, at least 30")),
        Err(_) => DEFAULT_SECS,
    }
}

fn main() {
    let secs = run_secs();
    let length = Duration::from_secs(secs);
    // A short check run keeps the same shape, scaled down.
    let scale = |d: Duration| d.min(length / 5);
    let (every, warm_up, cpu_window) = (
        scale(SAMPLE_EVERY).max(Duration::from_secs(5)),
        scale(WARM_UP),
        scale(CPU_WINDOW),
    );

    let lab = Lab::new();
    let agent = Agent::start(
        &lab.gw,
        &lab.gw_wan_if,
        &[
            "--local-net",
            lab::LOCAL_NET_V4,
            "--poll-interval",
            "1s",
            "--idle-timeout",
            IDLE_TIMEOUT,
        ],
    );
    let pid = agent.pid();
    let shared = Arc::new(Shared::default());
    let ctx = Ctx {
        shared: shared.clone(),
        lan: lab.lan.clone(),
        wan: lab.wan.clone(),
    };
    eprintln!("soak: {secs} s of mixed traffic, agent PID {pid}, sampling every {every:?}");

    let start = Instant::now();
    let mut samples = vec![Sample::take(pid, &lab.gw, start, &shared)];
    let mut generators: Vec<JoinHandle<()>> = Vec::new();
    let mut spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        generators.push(
            thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .expect("spawn generator"),
        );
    };
    for (i, kind) in [
        Kind::TcpDownload,
        Kind::TcpDownload,
        Kind::TcpUpload,
        Kind::TcpUpload,
    ]
    .into_iter()
    .enumerate()
    {
        let ctx = ctx.clone();
        spawn("tcp", Box::new(move || tcp_loop(ctx, kind, i as u64 + 1)));
    }
    for i in 0..2u64 {
        let ctx = ctx.clone();
        spawn("udp", Box::new(move || udp_loop(ctx, 100 + i)));
    }
    let c = ctx.clone();
    spawn("ping", Box::new(move || ping_loop(c)));
    let c = ctx.clone();
    spawn("slow", Box::new(move || slow_stream(c)));

    let mut next = every;
    loop {
        let at = next.min(length);
        thread::sleep((start + at).saturating_duration_since(Instant::now()));
        let s = Sample::take(pid, &lab.gw, start, &shared);
        eprintln!(
            "soak: {:>4} s  RSS {:.2} MiB  CPU {:.1} %  made {}",
            s.at.as_secs(),
            s.rss_mib(),
            cpu_pct(samples.last().expect("a sample"), &s),
            s.completed
        );
        samples.push(s);
        if at == length {
            break;
        }
        next += every;
    }

    shared.stop.store(true, Ordering::Relaxed);
    let deadline = start + length + GRACE;
    while !generators.iter().all(JoinHandle::is_finished) {
        assert!(
            Instant::now() < deadline,
            "generators still running {GRACE:?} after the end of the run"
        );
        thread::sleep(Duration::from_millis(100));
    }
    for g in generators {
        if let Err(p) = g.join() {
            shared.failed(format!("generator thread: {}", panic_text(&*p)));
        }
    }
    let records = agent.stop();

    print_table(&samples);
    let ok = compare(&shared, &records);
    print_summary(&samples, warm_up, cpu_window);
    drop(lab);
    if !ok {
        std::process::exit(1);
    }
}

fn print_table(samples: &[Sample]) {
    println!(
        "| t (s) | RSS (MiB) | CPU % (last interval) | connections made | connections_total | connections_active | flow_map_entries | poll avg (ms) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (i, s) in samples.iter().enumerate() {
        let prev = i.checked_sub(1).map(|p| &samples[p]);
        let cpu = prev.map_or("–".into(), |p| format!("{:.1}", cpu_pct(p, s)));
        let poll = prev
            .and_then(|p| poll_ms(p, s))
            .map_or("–".into(), |ms| format!("{ms:.2}"));
        let m = |f: fn(&Metrics) -> f64| s.metrics.map_or("?".into(), |m| format!("{}", f(&m)));
        println!(
            "| {} | {:.2} | {cpu} | {} | {} | {} | {} | {poll} |",
            s.at.as_secs(),
            s.rss_mib(),
            s.completed,
            m(|m| m.connections_total),
            m(|m| m.connections_active),
            m(|m| m.flow_map_entries),
        );
    }
    println!();
}

/// Every completed connection against the conn log; prints the result, returns whether
/// nothing was lost, duplicated or failed.
fn compare(shared: &Shared, records: &[ConnRecord]) -> bool {
    let made = lock(&shared.made).clone();
    let pings = lock(&shared.pings).clone();
    let failures = lock(&shared.failures).clone();
    let (lan, wan) = lab::hosts(false);

    type Key = (&'static str, u16, u16);
    let mut expected: HashMap<Key, Vec<Made>> = HashMap::new();
    for m in &made {
        expected
            .entry((m.kind.proto(), m.client_port, m.server_port))
            .or_default()
            .push(*m);
    }
    let mut found: HashMap<Key, Vec<&ConnRecord>> = HashMap::new();
    let mut icmp = Vec::new();
    let mut unmatched = Vec::new();
    for r in records {
        let between = r.has("id.orig_h") && r.ip("id.orig_h") == lan && r.ip("id.resp_h") == wan;
        match r.proto() {
            "icmp" if between => icmp.push(r),
            "tcp" | "udp" if between => {
                let proto = if r.proto() == "tcp" { "tcp" } else { "udp" };
                let key = (proto, r.orig().1, r.resp().1);
                if expected.contains_key(&key) {
                    found.entry(key).or_default().push(r);
                } else {
                    unmatched.push(r);
                }
            }
            _ => unmatched.push(r),
        }
    }

    let mut per_kind: HashMap<Kind, (u64, u64, u64, u64)> = HashMap::new();
    let mut byte_diffs = Vec::new();
    let mut not_sf = 0u64;
    for (key, ms) in &expected {
        let rs = found.get(key).map_or(&[][..], Vec::as_slice);
        let entry = per_kind.entry(ms[0].kind).or_default();
        entry.0 += ms.len() as u64;
        entry.1 += ms.len().min(rs.len()) as u64;
        entry.2 += ms.len().saturating_sub(rs.len()) as u64;
        entry.3 += rs.len().saturating_sub(ms.len()) as u64;
        if ms.len() < rs.len() || rs.len() < ms.len() {
            eprintln!(
                "soak: {key:?}: {} made, {} records: {ms:?} {:?}",
                ms.len(),
                rs.len(),
                rs.iter().map(|r| r.to_string()).collect::<Vec<_>>()
            );
        }
        if let ([m], [r]) = (ms.as_slice(), rs) {
            let got = (r.u64("orig_bytes"), r.u64("resp_bytes"));
            if got != (m.orig_bytes, m.resp_bytes) {
                byte_diffs.push(format!("{m:?}: record {r}"));
            }
            if m.kind.proto() == "tcp" && r.str("conn_state") != "SF" {
                not_sf += 1;
            }
        }
    }

    println!("| connections | made | recorded once | lost | extra records |");
    println!("|---|---|---|---|---|");
    let (mut made_n, mut once_n, mut lost_n, mut dup_n) = (0, 0, 0, 0);
    for kind in Kind::ALL {
        let (m, once, lost, dup) = per_kind.get(&kind).copied().unwrap_or_default();
        println!("| {} | {m} | {once} | {lost} | {dup} |", kind.label());
        (made_n, once_n, lost_n, dup_n) = (made_n + m, once_n + once, lost_n + lost, dup_n + dup);
    }
    // ICMP: by count of bursts and of packets.
    let bursts = pings.len() as u64;
    let icmp_n = icmp.len() as u64;
    let (sent_pkts, got_pkts): (u64, u64) = pings
        .iter()
        .fold((0, 0), |(t, r), p| (t + p.transmitted, r + p.received));
    let rec_pkts: (u64, u64) = icmp.iter().fold((0, 0), |(o, r), rec| {
        (o + rec.u64("orig_pkts"), r + rec.u64("resp_pkts"))
    });
    println!(
        "| ICMP echo bursts ({PINGS_PER_BURST} pings each) | {bursts} | {} | {} | {} |",
        icmp_n.min(bursts),
        bursts.saturating_sub(icmp_n),
        icmp_n.saturating_sub(bursts)
    );
    println!(
        "| **all** | {} | {} | {} | {} |",
        made_n + bursts,
        once_n + icmp_n.min(bursts),
        lost_n + bursts.saturating_sub(icmp_n),
        dup_n + icmp_n.saturating_sub(bursts)
    );
    println!();
    println!(
        "- ICMP packets: pings sent/answered {sent_pkts}/{got_pkts}, records' orig_pkts/resp_pkts {}/{}.",
        rec_pkts.0, rec_pkts.1
    );
    println!(
        "- Records not matching a completed connection: {}; generator failures: {}; \
         matched records whose byte counts differ from the generator's: {}; TCP records not SF: {not_sf}.",
        unmatched.len(),
        failures.len(),
        byte_diffs.len()
    );
    for f in failures.iter().take(5) {
        println!("- failure: {f}");
    }
    for d in byte_diffs.iter().take(5) {
        println!("- bytes differ: {d}");
    }
    for r in unmatched.iter().take(5) {
        println!("- unmatched record: {r}");
    }
    lost_n == 0
        && dup_n == 0
        && bursts == icmp_n
        && (sent_pkts, got_pkts) == rec_pkts
        && failures.is_empty()
        && unmatched.is_empty()
}

fn print_summary(samples: &[Sample], warm_up: Duration, window: Duration) {
    let last = samples.last().expect("samples");
    let end = last.at;
    // First sample at or after `t`; last sample at or before `t`.
    let after = |t: Duration| {
        samples
            .iter()
            .find(|s| s.at + Duration::from_millis(500) >= t)
            .unwrap_or(last)
    };
    let before = |t: Duration| {
        samples
            .iter()
            .rev()
            .find(|s| s.at <= t + Duration::from_millis(500))
            .unwrap_or(&samples[0])
    };
    let first = after(warm_up);
    let rss_delta = last.rss_mib() - first.rss_mib();
    let rss_max = samples
        .iter()
        .filter(|s| s.at >= first.at)
        .map(Sample::rss_mib)
        .fold(0.0, f64::max);
    println!(
        "- RSS after the {} s warm-up: {:.2} MiB at {} s, {:.2} MiB at {} s ({:+.2} MiB, {:+.1} %; peak {:.2} MiB).",
        warm_up.as_secs(),
        first.rss_mib(),
        first.at.as_secs(),
        last.rss_mib(),
        last.at.as_secs(),
        rss_delta,
        100.0 * rss_delta / first.rss_mib(),
        rss_max,
    );
    let (a0, a1) = (first, after(first.at + window));
    let (b0, b1) = (before(end.saturating_sub(window)), last);
    println!(
        "- Agent CPU: {:.2} % of one CPU over {}–{} s, {:.2} % over {}–{} s; poll avg {} ms then {} ms.",
        cpu_pct(a0, a1),
        a0.at.as_secs(),
        a1.at.as_secs(),
        cpu_pct(b0, b1),
        b0.at.as_secs(),
        b1.at.as_secs(),
        poll_ms(a0, a1).map_or("?".into(), |ms| format!("{ms:.2}")),
        poll_ms(b0, b1).map_or("?".into(), |ms| format!("{ms:.2}")),
    );
}
