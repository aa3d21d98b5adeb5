//! `--state-dir`: what the rules and the suppressor know, kept on disk so that a restart
//! neither repeats an alert nor forgets a window's bytes. Written after every poll that
//! changed it (its owners count their changes: an unchanged state is not even built), to a
//! temporary file renamed over the last: a kill at any moment leaves one whole state, the
//! old or the new. The open connections' totals (with `--pin-path`) are written whole to a
//! file of their own now and then; the state in between names only those that changed.

use std::{
    fs,
    io::{self, Read as _, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use log::{info, warn};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{
    alerts::suppress::Suppressor,
    clock::Now,
    conntable::{ConnTable, Totals, Uid},
    private,
    rules::Rule,
};

const FILE: &str = "state.json";
/// The whole set of connection totals a state counts from is `conns.<base>.json`.
const CONNS_PREFIX: &str = "conns.";
/// Connections a state may name as changed since its whole set, beyond a quarter of the
/// set, before the set is written whole again.
const CONNS_CHANGED_MIN: usize = 256;
const VERSION: u32 = 1;

/// The largest `state.json` taken back, or written, for a map of `capacity` connections.
/// An open connection takes up to about 250 bytes there (totals of 20-digit counts, its
/// uid in the rules' sets); twice that per connection the map can hold leaves room for
/// window sums and suppression timers, and 16 MiB for a small map. A larger file was not
/// written by an agent with this map: reading it whole would only cost memory.
pub fn max_bytes(capacity: u32) -> u64 {
    (512 * u64::from(capacity)).max(16 << 20)
}

/// Everything kept across restarts.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Saved {
    pub version: u32,
    /// Kernel timestamps (CLOCK_MONOTONIC) in the state mean nothing after a reboot.
    pub boot_id: String,
    /// Connection uids are derived from it: a restarted agent names a connection as the
    /// last one did.
    pub uid_seed: [u64; 2],
    /// Each open connection's totals as of the last poll: what the rules and metrics have
    /// already accounted for. Only with `--pin-path`: no other run takes them back.
    /// With `conns_base` in the file, only those whose totals changed since that set.
    pub conns: Vec<(Uid, [Totals; 2])>,
    /// The whole set of totals `conns` changes, in `conns.<base>.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conns_base: Option<u64>,
    /// Connections of that set finished since.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conns_gone: Vec<Uid>,
    /// Each stateful rule's own, under its name.
    pub rules: Map<String, Value>,
    pub suppressor: Value,
}

/// The state directory, and what was last written there.
pub struct StateDir {
    path: PathBuf,
    max_bytes: u64,
    last: Vec<u8>,
    /// The owners' count of changes the last write was built at.
    written_at: Option<u64>,
    /// The whole set of connection totals the state on disk counts from.
    conns_base: Option<u64>,
    /// Whether this agent wrote that set, and how many connections it holds.
    conns_written: Option<usize>,
}

impl StateDir {
    /// Opens (makes, mode 0700) the directory, which must be this user's alone, checks
    /// that it takes writes, and returns the state an earlier agent of this boot left
    /// there for a map of `capacity` connections.
    pub fn open(dir: &Path, capacity: u32) -> anyhow::Result<(Self, Option<Saved>)> {
        private::dir(dir).with_context(|| format!("--state-dir {}", dir.display()))?;
        let probe = dir.join(".probe");
        fs::write(&probe, b"")
            .and_then(|()| fs::remove_file(&probe))
            .with_context(|| format!("--state-dir {}: not writable", dir.display()))?;
        let state = Self {
            path: dir.join(FILE),
            max_bytes: max_bytes(capacity),
            last: Vec::new(),
            written_at: None,
            conns_base: None,
            conns_written: None,
        };
        let saved = match state.read(&state.path) {
            Ok(bytes) => Self::parse(&state.path, &bytes),
            Err(err) if err.kind() == io::ErrorKind::NotFound => None,
            Err(err) => {
                warn!(
                    "{}: {err}; starting without saved state",
                    state.path.display()
                );
                None
            }
        };
        let mut state = state;
        let saved = saved.and_then(|saved| state.whole(saved));
        state.remove_stale_conns()?;
        Ok((state, saved))
    }

    fn conns_path(&self, base: u64) -> PathBuf {
        self.path
            .with_file_name(format!("{CONNS_PREFIX}{base}.json"))
    }

    /// `saved` with the whole set of connection totals it counts from applied, if it
    /// names one (else as it is); nothing, with a warning, when that set is unreadable.
    fn whole(&mut self, mut saved: Saved) -> Option<Saved> {
        let Some(base) = saved.conns_base.take() else {
            return Some(saved);
        };
        let path = self.conns_path(base);
        let set = self
            .read(&path)
            .map_err(|err| err.to_string())
            .and_then(|bytes| {
                serde_json::from_slice::<Vec<(Uid, [Totals; 2])>>(&bytes).map_err(|e| e.to_string())
            });
        let set = match set {
            Ok(set) => set,
            Err(err) => {
                warn!("{}: {err}; starting without saved state", path.display());
                return None;
            }
        };
        self.conns_base = Some(base);
        let gone: std::collections::HashSet<Uid> = saved.conns_gone.drain(..).collect();
        let mut conns: std::collections::BTreeMap<Uid, [Totals; 2]> = set
            .into_iter()
            .filter(|(uid, _)| !gone.contains(uid))
            .collect();
        conns.extend(saved.conns.drain(..));
        saved.conns = conns.into_iter().collect();
        Some(saved)
    }

    /// Removes the sets of connection totals the state does not count from (left by a
    /// kill between writing one and the state naming it).
    fn remove_stale_conns(&self) -> io::Result<()> {
        let dir = self.path.parent().expect("a file in the state directory");
        let keep = self.conns_base.map(|base| self.conns_path(base));
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.starts_with(CONNS_PREFIX) && Some(&path) != keep.as_ref() {
                fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    /// A file's bytes: a regular file, not through a symbolic link, within the bound.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let file = private::open_nofollow(fs::OpenOptions::new().read(true), path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        let len = meta.len();
        if len > self.max_bytes {
            return Err(io::Error::other(format!(
                "{len} bytes, over the {}-byte bound for this --flow-map-size",
                self.max_bytes
            )));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        file.take(self.max_bytes + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > self.max_bytes {
            return Err(io::Error::other("grew over the bound while read"));
        }
        Ok(bytes)
    }

    fn parse(path: &Path, bytes: &[u8]) -> Option<Saved> {
        let saved: Saved = match serde_json::from_slice(bytes) {
            Ok(saved) => saved,
            Err(err) => {
                warn!(
                    "{}: unreadable ({err}); starting without saved state",
                    path.display()
                );
                return None;
            }
        };
        if saved.version != VERSION {
            warn!(
                "{}: state version {} (this agent writes {VERSION}); starting without it",
                path.display(),
                saved.version
            );
            return None;
        }
        if saved.boot_id != boot_id() {
            info!(
                "{}: written before the last reboot; starting without it",
                path.display()
            );
            return None;
        }
        Some(saved)
    }

    /// `saved` if every value in it could have been written by an agent of this boot by
    /// `now` (see [`Saved::check`]); else a warning, and nothing.
    pub fn vetted(
        &self,
        saved: Saved,
        now: Now,
        capacity: u32,
        rules: &[Box<dyn Rule>],
    ) -> Option<Saved> {
        match saved.check(now, capacity, rules) {
            Ok(()) => Some(saved),
            Err(why) => {
                warn!(
                    "{}: {why}; starting without saved state",
                    self.path.display()
                );
                None
            }
        }
    }

    /// Writes the state `build` gives unless `changes`, the sum of its owners' counts of
    /// changes (each only counting up), is what it was at the last write; with `conns`,
    /// its open connections' totals: those that changed since the whole set was last
    /// written, or, when they are many, the whole set again.
    pub fn save_changed(
        &mut self,
        changes: u64,
        conns: Option<&mut ConnTable>,
        build: impl FnOnce() -> Saved,
    ) -> io::Result<()> {
        if self.written_at == Some(changes) {
            return Ok(());
        }
        let mut saved = build();
        let mut new_base = None;
        if let Some(table) = conns {
            match (self.conns_base, self.conns_written) {
                (Some(base), Some(written))
                    if table.accounted_changes_len() <= (written / 4).max(CONNS_CHANGED_MIN) =>
                {
                    (saved.conns, saved.conns_gone) = table.accounted_changes();
                    saved.conns_base = Some(base);
                }
                _ => {
                    // Until this set is written and named, the next state writes one too.
                    self.conns_written = None;
                    table.accounted_marked();
                    let base = self.conns_base.map_or(0, |base| base + 1);
                    let set = serde_json::to_vec(&table.accounted()).map_err(io::Error::other)?;
                    self.write_new(&self.conns_path(base), &set)?;
                    saved.conns_base = Some(base);
                    new_base = Some((base, table.len()));
                }
            }
        }
        if let Err(err) = self.save(&saved) {
            // Else the next start removes it: no state names it.
            if let Some((base, _)) = new_base {
                let _ = fs::remove_file(self.conns_path(base));
            }
            return Err(err);
        }
        let old = std::mem::replace(&mut self.conns_base, saved.conns_base);
        if let Some(old) = old.filter(|old| Some(*old) != saved.conns_base) {
            fs::remove_file(self.conns_path(old))?;
        }
        if let Some((_, len)) = new_base {
            self.conns_written = Some(len);
        }
        self.written_at = Some(changes);
        Ok(())
    }

    /// Writes `saved` unless it is what was last written.
    fn save(&mut self, saved: &Saved) -> io::Result<()> {
        let bytes = serde_json::to_vec(saved).map_err(io::Error::other)?;
        if bytes == self.last {
            return Ok(());
        }
        self.write_new(&self.path, &bytes)?;
        self.last = bytes;
        Ok(())
    }

    /// Writes `bytes` to `path` through a temporary file renamed over it.
    fn write_new(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        if bytes.len() as u64 > self.max_bytes {
            return Err(io::Error::other(format!(
                "{} bytes, over the {}-byte bound the next agent would refuse: not saved",
                bytes.len(),
                self.max_bytes
            )));
        }
        let tmp = path.with_extension("json.tmp");
        // A new file, never one that is there (an earlier agent's, or a link).
        match fs::remove_file(&tmp) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        drop(file);
        fs::rename(&tmp, path)
    }
}

impl Saved {
    pub fn new(uid_seed: [u64; 2]) -> Self {
        Self {
            version: VERSION,
            boot_id: boot_id(),
            uid_seed,
            conns: Vec::new(),
            conns_base: None,
            conns_gone: Vec::new(),
            rules: Map::new(),
            suppressor: Value::Null,
        }
    }

    /// Whether an agent of this boot with a map of `capacity` connections and these
    /// `rules` could have written this by `now`: no more open connections than the map
    /// holds, totals that packets give, and every rule's state and suppression timer
    /// readable and not in the future. The first value that is not says why.
    pub fn check(&self, now: Now, capacity: u32, rules: &[Box<dyn Rule>]) -> Result<(), String> {
        if self.conns.len() > capacity as usize {
            return Err(format!(
                "{} open connections, more than the map holds ({capacity})",
                self.conns.len()
            ));
        }
        for (uid, totals) in &self.conns {
            if !totals.iter().all(possible) {
                return Err(format!("connection {uid}: totals no packets give"));
            }
        }
        for rule in rules {
            rule.check_saved(&self.rules, now)?;
        }
        Suppressor::check_saved(&self.suppressor, now.mono_ns)
    }
}

/// Totals packets can give: payload within the IP bytes, and each packet at least a byte
/// of them.
fn possible(t: &Totals) -> bool {
    t.bytes <= t.ip_bytes && t.pkts <= t.ip_bytes && (t.pkts == 0) == (t.ip_bytes == 0)
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), empty where unreadable.
fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use clap::Parser as _;
    use serde_json::json;

    use super::*;
    use crate::{
        cli::{Cli, Command},
        rules::{
            self,
            testkit::{ConnSpec, at, finish, update},
        },
    };

    const CAPACITY: u32 = 1024;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("monitor-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn saved_state_comes_back_whole() {
        let dir = scratch("roundtrip");
        let (mut state, none) = StateDir::open(&dir, CAPACITY).unwrap();
        assert_eq!(none, None);
        let mut saved = Saved::new([1, 2]);
        saved
            .rules
            .insert("LargeUpload".into(), serde_json::json!(["Cabc"]));
        state.save(&saved).unwrap();
        let (_, back) = StateDir::open(&dir, CAPACITY).unwrap();
        assert_eq!(back, Some(saved));
        assert!(!dir.join("state.json.tmp").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unchanged_state_is_neither_built_nor_written() {
        let dir = scratch("unchanged");
        let (mut state, _) = StateDir::open(&dir, CAPACITY).unwrap();
        state.save_changed(7, None, || Saved::new([1, 2])).unwrap();
        fs::remove_file(dir.join(FILE)).unwrap();
        state
            .save_changed(7, None, || unreachable!("nothing changed: not built"))
            .unwrap();
        assert!(!dir.join(FILE).exists(), "nothing changed: not written");
        state.save_changed(8, None, || Saved::new([3, 4])).unwrap();
        let (_, back) = StateDir::open(&dir, CAPACITY).unwrap();
        assert_eq!(back.map(|saved| saved.uid_seed), Some([3, 4]));
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A connection from port `port`, with `bytes` of upload.
    fn snap(port: u16, bytes: u64) -> crate::poller::FlowSnapshot {
        let spec = ConnSpec {
            orig: ("198.18.1.2", port),
            orig_bytes: bytes,
            ..ConnSpec::timed()
        };
        spec.conn().snap()
    }

    fn on_disk(dir: &Path) -> Value {
        serde_json::from_slice(&fs::read(dir.join(FILE)).unwrap()).unwrap()
    }

    #[test]
    fn connection_totals_are_written_whole_then_only_as_they_change() {
        let dir = scratch("conns");
        let (mut state, _) = StateDir::open(&dir, CAPACITY).unwrap();
        let mut table = ConnTable::new(
            std::time::Duration::from_secs(30),
            crate::conntable::Uids::new([1, 2]),
        );
        for port in [1, 2, 3] {
            table.observe(snap(port, 1000));
        }
        let save = |state: &mut StateDir, table: &mut ConnTable| {
            let changes = table.changes();
            state
                .save_changed(changes, Some(table), || Saved::new([1, 2]))
                .unwrap();
        };
        save(&mut state, &mut table);
        assert!(dir.join("conns.0.json").exists());
        assert_eq!(on_disk(&dir)["conns"], json!([]));

        table.observe(snap(1, 2000));
        let two = snap(2, 1000).key;
        let gone = table.get(&two).unwrap().uid;
        table.take(&two, None);
        table.observe(snap(4, 1000));
        save(&mut state, &mut table);
        let written = on_disk(&dir);
        assert_eq!(written["conns_base"], 0);
        assert_eq!(written["conns"].as_array().unwrap().len(), 2, "{written}");
        assert_eq!(written["conns_gone"], json!([gone.to_string()]));
        let (_, back) = StateDir::open(&dir, CAPACITY).unwrap();
        assert_eq!(back.unwrap().conns, table.accounted());

        for port in 10..10 + CONNS_CHANGED_MIN as u16 {
            table.observe(snap(port, 1000));
        }
        save(&mut state, &mut table);
        assert!(
            dir.join("conns.1.json").exists(),
            "many changed: whole again"
        );
        assert!(!dir.join("conns.0.json").exists());
        assert_eq!(on_disk(&dir)["conns"], json!([]));
        fs::write(dir.join("conns.7.json"), "[]").unwrap();
        let (_, back) = StateDir::open(&dir, CAPACITY).unwrap();
        assert_eq!(back.unwrap().conns, table.accounted());
        assert!(!dir.join("conns.7.json").exists(), "a set no state names");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn another_boot_or_garbage_is_ignored() {
        let dir = scratch("stale");
        let (mut state, _) = StateDir::open(&dir, CAPACITY).unwrap();
        let mut saved = Saved::new([1, 2]);
        saved.boot_id = "another-boot".into();
        state.save(&saved).unwrap();
        assert_eq!(StateDir::open(&dir, CAPACITY).unwrap().1, None);
        fs::write(dir.join(FILE), b"{not json").unwrap();
        assert_eq!(StateDir::open(&dir, CAPACITY).unwrap().1, None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unwritable_dir_fails_at_open() {
        let err = StateDir::open(Path::new("/proc/monitor-state"), CAPACITY)
            .err()
            .expect("/proc takes no directories");
        assert!(format!("{err:#}").contains("--state-dir /proc/monitor-state"));
    }

    fn rules_config(args: &crate::cli::RunArgs) -> rules::RulesConfig {
        let sources = crate::config::list_sources(&args.rules, &args.local_nets);
        crate::config::rules(&args.rules, sources.load().unwrap())
    }

    fn default_rules() -> Vec<Box<dyn Rule>> {
        let Command::Run(args) = Cli::parse_from(["monitor", "run"]).command else {
            unreachable!("`monitor run`");
        };
        rules::from_config(&rules_config(&args))
    }

    #[test]
    fn rules_count_a_change_exactly_when_their_saved_state_changes() {
        let argv = ["monitor", "run", "--restricted-net", "198.18.1.0/24"];
        let Command::Run(args) =
            Cli::parse_from(argv.iter().chain(&["--upload-threshold", "1MB"])).command
        else {
            unreachable!("`monitor run`");
        };
        let mut rules = rules::from_config(&rules_config(&args));
        let upload = ConnSpec {
            orig_bytes: 2_000_000,
            start: 1.0,
            last: 1.0,
            ..ConnSpec::default()
        }
        .conn();
        let inside = ConnSpec {
            resp: ("198.18.2.3", 443),
            ..ConnSpec::timed()
        }
        .conn();
        let (upload, inside) = (&upload, &inside);
        let reloaded = rules::Lists {
            allowed: rules::allowlist::Allowed {
                dst: vec!["203.0.113.0/24".parse().unwrap()],
                ..Default::default()
            },
            exclude_dst: vec!["203.0.113.0/24".parse().unwrap()],
            long_ignore: vec!["192.0.2.0/24".parse().unwrap()],
            ..rules::Lists::default()
        };
        let reloaded = &reloaded;
        type Step<'a> = Box<dyn Fn(&mut dyn Rule) -> Vec<crate::alerts::Alert> + 'a>;
        let tick = |secs: f64| -> Step<'static> {
            Box::new(move |rule| {
                rule.on_tick(at(secs));
                Vec::new()
            })
        };
        let steps: Vec<(&str, bool, Step)> = vec![
            (
                "an upload",
                true,
                Box::new(move |r| update(r, upload, at(2.0))),
            ),
            ("a tick in the same window", false, tick(2.0)),
            (
                "lists reloaded: what the rules know stays",
                false,
                Box::new(move |r| {
                    r.set_lists(reloaded);
                    Vec::new()
                }),
            ),
            (
                "traffic no rule keeps",
                false,
                Box::new(move |r| update(r, inside, at(3.0))),
            ),
            (
                "a LongConnection crossing",
                true,
                Box::new(move |r| update(r, upload, at(700.0))),
            ),
            (
                "the upload finished",
                true,
                Box::new(move |r| finish(r, upload, at(701.0))),
            ),
            ("a window aged out", true, tick(1e6)),
            ("nothing left to age", false, tick(1e6 + 1.0)),
        ];
        let state = |rule: &dyn Rule| {
            let mut saved = rules::Saved::new();
            rule.save(&mut saved);
            (saved, rule.changes())
        };
        for (what, changes, step) in steps {
            let mut changed = false;
            for rule in &mut rules {
                let (saved, counted) = state(rule.as_ref());
                step(rule.as_mut());
                let (now_saved, now_counted) = state(rule.as_ref());
                let name = now_saved.keys().next().cloned().unwrap_or_default();
                assert_eq!(now_counted != counted, now_saved != saved, "{what}: {name}");
                changed |= now_saved != saved;
            }
            assert_eq!(changed, changes, "{what}");
        }
    }

    /// What an agent 1000 s after boot may have written: a connection's totals, rule state
    /// and a suppression timer, all in the past (windows of 300 s).
    fn plausible() -> Saved {
        let mut saved = Saved::new([1, 2]);
        let uid: Uid = "Cabc".parse().unwrap();
        let sent = Totals {
            pkts: 10,
            ip_bytes: 5_000,
            bytes: 4_480,
        };
        saved.conns = vec![(uid, [sent, Totals::default()])];
        let window = (at(1000.0).epoch / 300.0) as u64;
        saved.rules = json!({
            "LargeUpload": ["Cabc"],
            "RestrictedOutbound": [],
            "LongConnection": {"Cabc": 1},
            "Windows.groups": [[{"src": "198.18.1.2", "dst": "203.0.113.2"}, {
                "window": window, "bytes": 6_000_000, "exceeded": true,
                "past": [[window - 2, 7_000_000]], "last_leak": at(900.0).epoch,
            }]],
        })
        .as_object()
        .unwrap()
        .clone();
        saved.suppressor = json!([["LargeUpload", "Cabc", 900_000_000_000u64]]);
        saved
    }

    #[test]
    fn check_takes_what_this_boot_could_have_written() {
        assert_eq!(
            plausible().check(at(1000.0), CAPACITY, &default_rules()),
            Ok(())
        );
    }

    type Tamper = Box<dyn Fn(&mut Saved)>;

    #[test]
    fn check_refuses_the_future_and_the_absurd() {
        let window = (at(1000.0).epoch / 300.0) as u64;
        let group = |g: Value| json!([[{"src": "198.18.1.2", "dst": "203.0.113.2"}, g]]);
        let tampered: Vec<(&str, Tamper)> = vec![
            (
                "starts in the future",
                Box::new(|s| s.suppressor = json!([["LargeUpload", "k", 1_000_000_000_001u64]])),
            ),
            (
                "a window in the future",
                Box::new(move |s| {
                    s.rules["Windows.groups"] = group(json!({
                        "window": window + 1, "bytes": 1, "exceeded": false,
                        "past": [], "last_leak": null,
                    }))
                }),
            ),
            (
                "exceeded windows out of order",
                Box::new(move |s| {
                    s.rules["Windows.groups"] = group(json!({
                        "window": window, "bytes": 1, "exceeded": false,
                        "past": [[window, 9_000_000]], "last_leak": null,
                    }))
                }),
            ),
            (
                "a DataLeak in the future",
                Box::new(move |s| {
                    s.rules["Windows.groups"] = group(json!({
                        "window": window, "bytes": 1, "exceeded": false,
                        "past": [], "last_leak": at(1001.0).epoch,
                    }))
                }),
            ),
            (
                "longer than this boot",
                Box::new(|s| s.rules["LongConnection"] = json!({"Cabc": 2})),
            ),
            (
                "LargeUpload: ",
                Box::new(|s| s.rules["LargeUpload"] = json!("every connection")),
            ),
            (
                "more than the map holds",
                Box::new(|s| s.conns = vec![Default::default(); CAPACITY as usize + 1]),
            ),
            (
                "totals no packets give",
                Box::new(|s| s.conns[0].1[1].bytes = 1),
            ),
            (
                "suppression timers: ",
                Box::new(|s| s.suppressor = json!({"LargeUpload": 0})),
            ),
        ];
        for (why, tamper) in tampered {
            let mut saved = plausible();
            tamper(&mut saved);
            let err = saved
                .check(at(1000.0), CAPACITY, &default_rules())
                .expect_err(why);
            assert!(err.contains(why), "{why}: {err}");
        }
    }

    #[test]
    fn an_oversized_or_linked_file_is_not_read() {
        let dir = scratch("bounds");
        StateDir::open(&dir, CAPACITY).unwrap();
        let file = dir.join(FILE);
        let text = serde_json::to_string(&Saved::new([1, 2])).unwrap();
        let padding = max_bytes(CAPACITY) as usize + 1 - text.len();
        fs::write(&file, format!("{text}{}", " ".repeat(padding))).unwrap();
        assert_eq!(StateDir::open(&dir, CAPACITY).unwrap().1, None);
        fs::write(&file, &text).unwrap();
        assert!(StateDir::open(&dir, CAPACITY).unwrap().1.is_some());

        let elsewhere = scratch("bounds-elsewhere");
        fs::create_dir_all(&elsewhere).unwrap();
        fs::rename(&file, elsewhere.join(FILE)).unwrap();
        symlink(elsewhere.join(FILE), &file).unwrap();
        assert_eq!(StateDir::open(&dir, CAPACITY).unwrap().1, None);
        fs::remove_dir_all(&dir).unwrap();
        fs::remove_dir_all(&elsewhere).unwrap();
    }

    #[test]
    fn saving_never_writes_through_a_planted_link() {
        let dir = scratch("planted");
        let (mut state, _) = StateDir::open(&dir, CAPACITY).unwrap();
        let target = scratch("planted-target");
        fs::write(&target, "precious").unwrap();
        symlink(&target, dir.join("state.json.tmp")).unwrap();
        state.save(&Saved::new([1, 2])).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "precious");
        assert!(StateDir::open(&dir, CAPACITY).unwrap().1.is_some());
        fs::remove_dir_all(&dir).unwrap();
        fs::remove_file(&target).unwrap();
    }
}
