//! `--state-dir`: what the rules and the suppressor know, kept on disk so that a restart
//! neither repeats an alert nor forgets a window's bytes. Written after every poll that
//! changed it, to a temporary file renamed over the last: a kill at any moment leaves one
//! whole state, the old or the new.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use log::{info, warn};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::conntable::{Totals, Uid};

const FILE: &str = "state.json";
const VERSION: u32 = 1;

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
    /// already accounted for.
    pub conns: Vec<(Uid, [Totals; 2])>,
    /// Each stateful rule's own, under its name.
    pub rules: Map<String, Value>,
    pub suppressor: Value,
}

/// The state directory, and what was last written there.
pub struct StateDir {
    path: PathBuf,
    last: Vec<u8>,
}

impl StateDir {
    /// Opens (makes, mode 0700) the directory, checks that it takes writes, and returns
    /// the state an earlier agent of this boot left there.
    pub fn open(dir: &Path) -> anyhow::Result<(Self, Option<Saved>)> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("--state-dir {}: creating it", dir.display()))?;
        let probe = dir.join(".probe");
        fs::write(&probe, b"")
            .and_then(|()| fs::remove_file(&probe))
            .with_context(|| format!("--state-dir {}: not writable", dir.display()))?;
        let path = dir.join(FILE);
        let saved = match fs::read(&path) {
            Ok(bytes) => Self::parse(&path, &bytes),
            Err(err) if err.kind() == io::ErrorKind::NotFound => None,
            Err(err) => {
                return Err(err).with_context(|| format!("reading {}", path.display()));
            }
        };
        Ok((
            Self {
                path,
                last: Vec::new(),
            },
            saved,
        ))
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

    /// Writes `saved` unless it is what was last written.
    pub fn save(&mut self, saved: &Saved) -> io::Result<()> {
        let bytes = serde_json::to_vec(saved).map_err(io::Error::other)?;
        if bytes == self.last {
            return Ok(());
        }
        let tmp = self.path.with_extension("json.tmp");
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&bytes)?;
        drop(file);
        fs::rename(&tmp, &self.path)?;
        self.last = bytes;
        Ok(())
    }
}

impl Saved {
    pub fn new(uid_seed: [u64; 2]) -> Self {
        Self {
            version: VERSION,
            boot_id: boot_id(),
            uid_seed,
            conns: Vec::new(),
            rules: Map::new(),
            suppressor: Value::Null,
        }
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), empty where unreadable.
fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("monitor-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn saved_state_comes_back_whole() {
        let dir = scratch("roundtrip");
        let (mut state, none) = StateDir::open(&dir).unwrap();
        assert_eq!(none, None);
        let mut saved = Saved::new([1, 2]);
        saved
            .rules
            .insert("LargeUpload".into(), serde_json::json!(["Cabc"]));
        state.save(&saved).unwrap();
        let (_, back) = StateDir::open(&dir).unwrap();
        assert_eq!(back, Some(saved));
        assert!(!dir.join("state.json.tmp").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn another_boot_or_garbage_is_ignored() {
        let dir = scratch("stale");
        let (mut state, _) = StateDir::open(&dir).unwrap();
        let mut saved = Saved::new([1, 2]);
        saved.boot_id = "another-boot".into();
        state.save(&saved).unwrap();
        assert_eq!(StateDir::open(&dir).unwrap().1, None);
        fs::write(dir.join(FILE), b"{not json").unwrap();
        assert_eq!(StateDir::open(&dir).unwrap().1, None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unwritable_dir_fails_at_open() {
        let err = StateDir::open(Path::new("/proc/monitor-state"))
            .err()
            .expect("/proc takes no directories");
        assert!(format!("{err:#}").contains("--state-dir /proc/monitor-state"));
    }
}
