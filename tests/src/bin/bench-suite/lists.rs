//! What the rule lists cost a connection: a destination matched against a list of 10 and
//! of 100,000 entries (half networks, half host names with their resolved addresses),
//! through the agent's own matcher (`monitor::rules::AddrMatcher`: a prefix trie for the
//! networks, a table of the names' addresses), beside a scan of every entry as lists were
//! matched before, and beside the floor: one lookup of the address in a hash set of the
//! list's addresses, whose cost grows with the list too (a larger table misses the caches
//! more); and what reading such a list from a file and building its matcher costs a
//! reload (SIGHUP).

use std::{
    collections::{HashMap, HashSet},
    hint::black_box,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use monitor::{
    cidr,
    lists::{Item, Sources},
    resolve::{Answers, HostAddrs, Names},
    rules::AddrMatcher,
};

use crate::{Plan, median};

pub struct Row {
    pub entries: u32,
    /// The agent's matcher, per destination matched.
    pub matcher_ns: f64,
    /// Every entry scanned, per destination matched.
    pub scan_ns: f64,
    /// One hash-set lookup of the destination among the list's addresses.
    pub floor_ns: f64,
    /// Reading the list from its file and building the matcher, with its table of the
    /// names' addresses (built again whenever the resolver answers anew).
    pub load_ms: f64,
}

/// Each timing runs at least this long.
const MIN_TIME: Duration = Duration::from_millis(300);

/// Network `i`: the `i`th /24 from `10.0.0.0/24` on; name `i`: `host-i.lists.test` at
/// the `i`th address from `192.168.0.0` on.
fn net(i: u32) -> String {
    format!("{}/24", Ipv4Addr::from(0x0a00_0000 + (i << 8)))
}

fn name_addr(i: u32) -> IpAddr {
    Ipv4Addr::from(0xc0a8_0000 + i).into()
}

/// Nanoseconds per call of `matches` over `addrs`, in turn, in the fastest of passes over
/// them for at least [`MIN_TIME`]: the pass the machine's other work (preemption, shared
/// caches) disturbed least, on a machine others share.
fn per_match(addrs: &[IpAddr], matches: impl Fn(IpAddr) -> bool) -> f64 {
    let started = Instant::now();
    let mut fastest = Duration::MAX;
    while started.elapsed() < MIN_TIME {
        let pass = Instant::now();
        for addr in addrs {
            black_box(matches(black_box(*addr)));
        }
        fastest = fastest.min(pass.elapsed());
    }
    fastest.as_secs_f64() * 1e9 / addrs.len() as f64
}

fn one(entries: u32, run: u32) -> Row {
    let half = entries / 2;
    let nets: Vec<_> = (0..half)
        .map(|i| cidr::parse(&net(i)).expect("a network"))
        .collect();
    let names: Vec<String> = (0..half).map(|i| format!("host-{i}.lists.test")).collect();
    let resolved: HostAddrs = (0..half)
        .map(|i| (names[i as usize].clone(), vec![name_addr(i)]))
        .collect();
    let answers = Answers::from(resolved.clone());
    let names_now = Names::new(&answers, None);
    // A third in a listed network, a third at a listed name's address, a third unlisted.
    let addrs: Vec<IpAddr> = (0..3000u32)
        .map(|k| {
            let i = k.wrapping_mul(2_654_435_761) % half.max(1);
            match k % 3 {
                0 => IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (i << 8) + 7)),
                1 => name_addr(i),
                _ => IpAddr::V4(Ipv4Addr::from(0x6440_0000 + k)),
            }
        })
        .collect();

    let path = std::env::temp_dir().join(format!(
        "bench-lists-{}-{entries}-{run}.txt",
        std::process::id()
    ));
    let text: String = (nets.iter().map(ToString::to_string))
        .chain(names.iter().cloned())
        .map(|line| line + "\n")
        .collect();
    std::fs::write(&path, text).expect("write the list file");
    let sources = Sources {
        allow_dst: vec![Item::File(path.clone())],
        ..Sources::default()
    };
    let started = Instant::now();
    let lists = sources.load().expect("the list file reads");
    let matcher = AddrMatcher::new(lists.allowed.dst);
    let client = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 2));
    // The first match builds the table of the names' addresses.
    black_box(matcher.matches(names_now, client, addrs[0]));
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let _ = std::fs::remove_file(&path);

    let matcher_ns = per_match(&addrs, |addr| matcher.matches(names_now, client, addr));
    let by_name: HashMap<&String, &Vec<IpAddr>> = resolved.iter().collect();
    let scan_ns = per_match(&addrs, |addr| {
        nets.iter().any(|net| net.contains(&addr))
            || names
                .iter()
                .any(|name| by_name.get(name).is_some_and(|a| a.contains(&addr)))
    });
    let listed: HashSet<IpAddr> = (nets.iter().map(|net| net.addr()))
        .chain((0..half).map(name_addr))
        .collect();
    let floor_ns = per_match(&addrs, |addr| listed.contains(&addr));
    Row {
        entries,
        matcher_ns,
        scan_ns,
        floor_ns,
        load_ms,
    }
}

pub fn measure(plan: &Plan) -> Vec<Row> {
    [10, 100_000]
        .into_iter()
        .map(|entries| {
            let rows: Vec<Row> = (0..plan.runs).map(|run| one(entries, run)).collect();
            Row {
                entries,
                matcher_ns: median(rows.iter().map(|r| r.matcher_ns)),
                scan_ns: median(rows.iter().map(|r| r.scan_ns)),
                floor_ns: median(rows.iter().map(|r| r.floor_ns)),
                load_ms: median(rows.iter().map(|r| r.load_ms)),
            }
        })
        .collect()
}
