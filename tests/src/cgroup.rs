//! cgroup v2 groups a test makes under the host's cgroup2 mount, to run processes in,
//! removed when dropped (once their processes have exited).

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

pub struct TestCgroup {
    dir: PathBuf,
    /// The path the kernel gives it (`/NAME`, from the cgroup2 root).
    pub path: String,
}

impl TestCgroup {
    /// `NAME` under the cgroup2 mount's root; panics where cgroup2 is not mounted.
    pub fn new(name: &str) -> TestCgroup {
        // Where the agent finds it.
        let (point, root) =
            monitor::cgroups::mount().expect("cgroup2 mounted (`mount -t cgroup2`)");
        let dir = point.join(name);
        let _ = fs::remove_dir(&dir);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let path = Path::new(&root).join(name).to_string_lossy().into_owned();
        TestCgroup { dir, path }
    }

    /// The file a process writes its PID (or `0`, itself) to, to join.
    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // A process that just exited leaves the group a moment later.
        let started = Instant::now();
        while fs::remove_dir(&self.dir).is_err() && started.elapsed() < Duration::from_secs(5) {
            thread::sleep(Duration::from_millis(50));
        }
    }
}
