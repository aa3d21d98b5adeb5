//! Detection rules: pure state machines. Connection snapshots, the poll's name tables and
//! the time go in, alerts come out; no rule reads a map, a file or the clock, so hours of
//! simulated traffic run in milliseconds in their tests.

pub mod allowlist;
mod intel;
mod large_upload;
mod long_connection;
mod restricted;
pub mod targets;
mod upload_ratio;
pub mod windows;

use std::time::Duration;

use ipnet::IpNet;

pub use crate::consumer::ConnCtx;
use crate::{
    alerts::Alert,
    conntable::{ConnTable, EndReason, LocalNets},
    consumer::Consumer,
};
pub use allowlist::AddrMatcher;
pub use intel::IntelMatch;
pub use large_upload::LargeUpload;
pub use long_connection::LongConnection;
pub use restricted::RestrictedOutbound;
pub use upload_ratio::UploadRatio;
pub use windows::Windows;

pub use crate::clock::Now;
use targets::{AddrSpec, Origin, Service};

/// The lists rules match, which a reload (SIGHUP) may replace while the rules run.
#[derive(Clone, Debug, Default)]
pub struct Lists {
    /// LongConnection.
    pub long_ignore: Vec<IpNet>,
    /// RestrictedOutbound: silent while there are no restricted nets.
    pub restricted_nets: Vec<IpNet>,
    pub allowed: allowlist::Allowed,
    /// WindowExceeded and DataLeak.
    pub exclude_dst: Vec<AddrSpec>,
    /// IntelMatch, each entry with where it was listed.
    pub intel: Vec<(AddrSpec, Origin)>,
}

/// What the rules are told: their thresholds, periods and lists.
#[derive(Clone, Debug)]
pub struct RulesConfig {
    /// LargeUpload: payload bytes, and packets.
    pub upload_threshold: u64,
    pub upload_min_packets: u64,
    /// UploadRatio.
    pub ratio_ports: Vec<Service>,
    pub ratio: f64,
    pub ratio_min_bytes: u64,
    /// LongConnection.
    pub long_durations: Vec<Duration>,
    /// RestrictedOutbound.
    pub restricted_suppress: Duration,
    /// `--restricted-doh`: encrypted DNS alerts even to an allowed destination.
    pub restricted_doh: bool,
    /// WindowExceeded and DataLeak.
    pub windows: windows::Config,
    pub lists: Lists,
}

/// What rules ask of a connection beyond its view.
impl ConnCtx<'_> {
    /// What the responder offers, for messages: `port 443/tcp`, `icmp type 8`.
    pub fn service(&self) -> String {
        if crate::proto::is_icmp(self.proto()) {
            format!("icmp type {}", self.orig.port)
        } else {
            format!(
                "port {}/{}",
                self.resp.port,
                crate::proto::name(self.proto())
            )
        }
    }

    /// What the responder offers, as `--allow-service` and `--ratio-port` name it: its port
    /// and protocol; for ICMP the type the originator sent (`8/icmp`, echo).
    pub fn offered(&self) -> Service {
        let port = if crate::proto::is_icmp(self.proto()) {
            self.orig.port
        } else {
            self.resp.port
        };
        Service {
            port,
            proto: self.proto(),
        }
    }
}

pub trait Rule: Send {
    /// An open connection's latest totals; every poll.
    fn on_update(&mut self, _conn: &ConnCtx, _now: Now, _out: &mut Vec<Alert>) {}
    /// The earliest kernel time at which `on_update` of this connection could act with
    /// nothing new in it; `None` when only new packets can make it act. Polls pass over
    /// connections that carry nothing new until then.
    fn next_due(&self, _conn: &ConnCtx) -> Option<u64> {
        None
    }
    /// A connection's final totals; once, before its record is written.
    fn on_finish(&mut self, _conn: &ConnCtx, _now: Now, _out: &mut Vec<Alert>) {}
    /// After every poll's updates and finishes: forget what has aged out.
    fn on_tick(&mut self, _now: Now) {}
    /// Writes what must survive a restart (`--state-dir`) under the rule's own name.
    /// Sorted: unchanged state must give unchanged bytes (the file is rewritten on change).
    fn save(&self, _saved: &mut Saved) {}
    /// How many times what `save` writes has changed, counting up from any start: the
    /// state is written again only when this (or another owner's count) moved.
    fn changes(&self) -> u64 {
        0
    }
    /// Takes back what `save` wrote in an earlier run; per-connection state only when
    /// `conns_resumed` (that run's connections are still in the pinned map).
    fn restore(&mut self, _saved: &Saved, _conns_resumed: bool) {}
    /// Why the rule's state in `saved` is not what `save` could have written by `now`
    /// (unreadable, or a time or window in the future), if it is not.
    fn check_saved(&self, _saved: &Saved, _now: Now) -> Result<(), String> {
        Ok(())
    }
    /// Entries of state dropped so far to keep it within its bound.
    fn shed(&self) -> u64 {
        0
    }
    /// The lists were reloaded: match by these from now on, keeping all else.
    fn set_lists(&mut self, _lists: &Lists) {}
}

/// Rule states by rule name, as `--state-dir` keeps them.
pub type Saved = serde_json::Map<String, serde_json::Value>;

/// Rule `name`'s saved state, if any and readable (a warning when it is not).
pub fn saved<T: serde::de::DeserializeOwned>(saved: &Saved, name: &str) -> Option<T> {
    decode(saved, name)
        .inspect_err(|err| log::warn!("saved state unreadable ({err}); not restored"))
        .ok()
        .flatten()
}

/// Rule `name`'s saved state, if any; an error naming the rule when it is unreadable.
pub fn decode<T: serde::de::DeserializeOwned>(
    saved: &Saved,
    name: &str,
) -> Result<Option<T>, String> {
    saved
        .get(name)
        .map(|value| T::deserialize(value).map_err(|err| format!("{name}: {err}")))
        .transpose()
}

/// Stores `state` under `name`.
pub fn save_as(saved: &mut Saved, name: &str, state: impl serde::Serialize) {
    let value = serde_json::to_value(state).expect("rule state is plain data");
    saved.insert(name.to_owned(), value);
}

/// The rules the flags turn on, as one consumer of a poll: what they raise waits for the
/// alert path.
pub struct RuleSet {
    rules: Vec<Box<dyn Rule>>,
    raised: Vec<Alert>,
}

impl RuleSet {
    pub fn new(rules: Vec<Box<dyn Rule>>) -> Self {
        Self {
            rules,
            raised: Vec::new(),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &dyn Rule> {
        self.rules.iter().map(|rule| rule.as_ref())
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Box<dyn Rule>> {
        self.rules.iter_mut()
    }

    /// What the rules raised since the last call.
    pub fn take_raised(&mut self) -> Vec<Alert> {
        std::mem::take(&mut self.raised)
    }

    pub fn shed(&self) -> u64 {
        self.rules.iter().map(|rule| rule.shed()).sum()
    }

    /// Every rule matches by `lists` from now on; what the rules know stays.
    pub fn set_lists(&mut self, lists: &Lists) {
        for rule in &mut self.rules {
            rule.set_lists(lists);
        }
    }
}

impl Consumer for RuleSet {
    fn update(&mut self, conn: &ConnCtx, now: Now) {
        for rule in &mut self.rules {
            rule.on_update(conn, now, &mut self.raised);
        }
    }

    fn finish(&mut self, conn: &ConnCtx, now: Now, _reason: EndReason) {
        for rule in &mut self.rules {
            rule.on_finish(conn, now, &mut self.raised);
        }
    }

    fn next_due(&self, conn: &ConnCtx) -> Option<u64> {
        self.rules
            .iter()
            .filter_map(|rule| rule.next_due(conn))
            .min()
    }

    fn end_poll(&mut self, _open: &ConnTable, _local: &LocalNets, now: Now) {
        for rule in &mut self.rules {
            rule.on_tick(now);
        }
    }
}

/// Every rule the flags turn on. RestrictedOutbound and IntelMatch are there even while
/// their lists are empty: a reload may fill them.
pub fn from_config(config: &RulesConfig) -> Vec<Box<dyn Rule>> {
    let lists = &config.lists;
    vec![
        Box::new(LargeUpload::new(
            config.upload_threshold,
            config.upload_min_packets,
        )),
        Box::new(UploadRatio::new(
            config.ratio_ports.clone(),
            config.ratio,
            config.ratio_min_bytes,
        )),
        Box::new(LongConnection::new(
            config.long_durations.clone(),
            &lists.long_ignore,
        )),
        Box::new(Windows::new(
            config.windows,
            AddrMatcher::new(lists.exclude_dst.clone()),
        )),
        Box::new(
            RestrictedOutbound::new(
                &lists.restricted_nets,
                allowlist::Allowlist::new(&lists.allowed),
                config.restricted_suppress,
            )
            .with_doh(config.restricted_doh),
        ),
        Box::new(IntelMatch::new(&lists.intel)),
    ]
}

/// Bytes for people: `123.4 MB` (powers of 10, as the flags take them).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KB", "MB", "GB", "TB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut value = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if value < 1000.0 {
            break;
        }
        value /= 1000.0;
        unit = u;
    }
    format!("{value:.1} {unit}")
}

#[cfg(test)]
pub(crate) mod testkit {
    //! Synthetic connections and a simulated clock for rule tests.

    use monitor_common::flow::{DirStats, FlowKey, tcp_flags};

    use super::*;
    use crate::{
        clock::Clock,
        conntable::{Conn, LocalNets},
        poller::FlowSnapshot,
        resolve::{Answers, Names},
    };

    /// Monotonic zero is 2026-11-24T00:00:00Z.
    pub const EPOCH_AT_ZERO: f64 = 1_795_478_400.0;

    pub fn clock() -> Clock {
        Clock::with_offset_ns((EPOCH_AT_ZERO * 1e9) as i128)
    }

    pub fn at(secs: f64) -> Now {
        let mono_ns = (secs * 1e9) as u64;
        Now {
            mono_ns,
            epoch: EPOCH_AT_ZERO + secs,
        }
    }

    pub fn local() -> LocalNets {
        LocalNets::new(vec!["198.18.0.0/15".parse().unwrap()])
    }

    /// A TCP connection `orig` -> `resp` (addresses as text), opened at `start` seconds,
    /// last packet at `last` seconds, with the payload each side sent.
    pub struct ConnSpec {
        pub orig: (&'static str, u16),
        pub resp: (&'static str, u16),
        pub proto: u8,
        pub start: f64,
        pub last: f64,
        pub orig_bytes: u64,
        pub resp_bytes: u64,
        pub uid: &'static str,
    }

    impl Default for ConnSpec {
        fn default() -> Self {
            Self {
                orig: ("198.18.1.2", 40000),
                resp: ("203.0.113.2", 443),
                proto: 6,
                start: 0.0,
                last: 0.0,
                orig_bytes: 0,
                resp_bytes: 0,
                uid: "Ctest",
            }
        }
    }

    impl ConnSpec {
        /// One whose packets came one second after the kernel clock's zero, as every
        /// packet the programs time does: the connection table takes no entry without a
        /// first time.
        pub fn timed() -> Self {
            Self {
                start: 1.0,
                last: 1.0,
                ..Self::default()
            }
        }
    }

    impl ConnSpec {
        /// Packets are counted as 1000 bytes of payload each, at least one.
        pub fn conn(&self) -> Conn {
            let (o, family) = crate::addr::to_wire(self.orig.0.parse().unwrap());
            let (r, _) = crate::addr::to_wire(self.resp.0.parse().unwrap());
            let dir = |bytes: u64, syn_only: bool| DirStats {
                pkts: bytes.div_ceil(1000).max(1),
                ip_bytes: bytes + 52 * bytes.div_ceil(1000).max(1),
                bytes,
                first_ns: (self.start * 1e9) as u64,
                last_ns: (self.last * 1e9) as u64,
                tcp_flags: tcp_flags::SYN | tcp_flags::ACK,
                syn_only: syn_only as u8,
                ..DirStats::default()
            };
            // Key endpoint a is the originator here; orientation comes from syn_only.
            let key = FlowKey {
                addr_a: o,
                addr_b: r,
                port_a: self.orig.1,
                port_b: self.resp.1,
                proto: self.proto,
                family,
                _pad: [0; 2],
            };
            Conn::new(
                FlowSnapshot {
                    key,
                    dir: [dir(self.orig_bytes, true), dir(self.resp_bytes, false)],
                    ifindex: 1,
                },
                self.uid.parse().expect("a uid: C and base-62 digits"),
            )
        }
    }

    /// Name tables in which no host name resolved.
    pub fn no_names() -> Names<'static> {
        static NONE: std::sync::LazyLock<Answers> = std::sync::LazyLock::new(Answers::default);
        Names::new(&NONE, None)
    }

    /// Runs `rule` on one update of `conn` at `now`, no host name resolved.
    pub fn update(rule: &mut dyn Rule, conn: &Conn, now: Now) -> Vec<Alert> {
        update_named(rule, conn, now, no_names())
    }

    /// Runs `rule` on one update of `conn` at `now`, in a poll that knows `names`.
    pub fn update_named(rule: &mut dyn Rule, conn: &Conn, now: Now, names: Names) -> Vec<Alert> {
        let (clock, local) = (clock(), local());
        let mut out = Vec::new();
        rule.on_update(
            &ConnCtx::new(local.view(conn), names, &clock),
            now,
            &mut out,
        );
        out
    }

    pub fn finish(rule: &mut dyn Rule, conn: &Conn, now: Now) -> Vec<Alert> {
        let (clock, local) = (clock(), local());
        let mut out = Vec::new();
        rule.on_finish(
            &ConnCtx::new(local.view(conn), no_names(), &clock),
            now,
            &mut out,
        );
        out
    }
}
