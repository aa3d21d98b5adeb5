//! cgroup v2 ids, which the kernel programs read, as the paths that name a systemd unit
//! or a container (`/system.slice/ssh.service`). An id is the inode number of its
//! directory under the cgroup2 mount.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use foldhash::HashMap;

/// Paths remembered at most, before the memory starts over.
const PATHS_MAX: usize = 65_536;

/// The mount is walked for an id at most this often: ids of cgroups removed before the
/// agent saw them would otherwise walk it once each.
const WALK_EVERY: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Cgroups {
    /// Where cgroup2 is mounted, and the cgroup path of that directory; `None` when it
    /// is not mounted where the agent can see it.
    mount: Option<(PathBuf, String)>,
    looked_for_mount: bool,
    paths: HashMap<u64, String>,
    walked: Option<Instant>,
}

impl Cgroups {
    /// The path of cgroup `id`, which process `pid` was in: from the cgroup mount, else
    /// from the process's own `/proc/PID/cgroup` while the process lives.
    pub fn path(&mut self, id: u64, pid: u32) -> Option<String> {
        if let Some(path) = self.paths.get(&id) {
            return Some(path.clone());
        }
        if !self.looked_for_mount {
            self.looked_for_mount = true;
            self.mount = mount();
        }
        let found = match &self.mount {
            Some(mount) => self.walk(mount.clone(), id),
            None => of_process(pid),
        }?;
        if self.paths.len() >= PATHS_MAX {
            self.paths.clear();
        }
        self.paths.insert(id, found.clone());
        Some(found)
    }

    /// Learns every cgroup's path under the mount (at most once per [`WALK_EVERY`]).
    fn walk(&mut self, (dir, root): (PathBuf, String), id: u64) -> Option<String> {
        if self.walked.is_some_and(|at| at.elapsed() < WALK_EVERY) {
            return None;
        }
        self.walked = Some(Instant::now());
        let mut pending = vec![(dir, root)];
        while let Some((dir, path)) = pending.pop() {
            if let Ok(meta) = fs::metadata(&dir) {
                self.paths.insert(meta.ino(), path.clone());
            }
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    pending.push((entry.path(), join(&path, &name)));
                }
            }
        }
        self.paths.get(&id).cloned()
    }
}

/// The directory of the cgroup v2 root, where programs attach for every process.
pub fn root() -> Option<PathBuf> {
    mount().map(|(dir, _)| dir)
}

/// Where cgroup2 is mounted, and the cgroup path of that directory: as this process sees
/// its mounts, else as PID 1 does, through its root (`ip netns exec` mounts a /sys of
/// its own, without the cgroup tree).
pub fn mount() -> Option<(PathBuf, String)> {
    let seen = |info: &str, prefix: &Path| {
        cgroup2_mount(info).map(|(dir, root)| {
            let inside = dir.strip_prefix("/").unwrap_or(&dir).to_owned();
            (prefix.join(inside), root)
        })
    };
    fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|info| seen(&info, Path::new("/")))
        .or_else(|| {
            fs::read_to_string("/proc/1/mountinfo")
                .ok()
                .and_then(|info| seen(&info, Path::new("/proc/1/root")))
        })
}

fn join(parent: &str, name: &str) -> String {
    if parent.ends_with('/') {
        format!("{parent}{name}")
    } else {
        format!("{parent}/{name}")
    }
}

/// The cgroup2 mount point and the cgroup path it shows, from `/proc/self/mountinfo`
/// (`ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS... - FSTYPE SOURCE ...`).
fn cgroup2_mount(mountinfo: &str) -> Option<(PathBuf, String)> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split(' ').next()? != "cgroup2" {
            return None;
        }
        let mut fields = mount.split(' ').skip(3);
        let root = fields.next()?.to_owned();
        let point = fields.next()?;
        Some((Path::new(point).to_owned(), root))
    })
}

/// The cgroup v2 line of `/proc/PID/cgroup`: `0::/PATH`.
fn of_process(pid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let info = "24 1 0:22 / /sys rw - sysfs sysfs rw\n\
                    35 24 0:30 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(info),
            Some((PathBuf::from("/sys/fs/cgroup/unified"), "/".to_owned()))
        );
        assert_eq!(
            cgroup2_mount("24 1 0:22 / /sys rw - sysfs sysfs rw\n"),
            None
        );
    }

    /// The agent's own cgroup, by the id its directory has.
    #[test]
    fn names_this_process_cgroup() {
        let mut cgroups = Cgroups::default();
        let mine = of_process(std::process::id()).expect("a cgroup v2 line");
        let Some((point, root)) = mount() else {
            // Not mounted here: the path comes from /proc alone.
            assert_eq!(cgroups.path(u64::MAX, std::process::id()), Some(mine));
            return;
        };
        let relative = mine.strip_prefix(&root).unwrap_or(&mine);
        let dir = point.join(relative.trim_start_matches('/'));
        let id = fs::metadata(&dir).unwrap().ino();
        assert_eq!(cgroups.path(id, 0), Some(mine));
    }
}
