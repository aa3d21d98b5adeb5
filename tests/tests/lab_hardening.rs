//! What other users of the machine may plant or change must not steer the agent: a log
//! path that is a symbolic link is refused (its target untouched), and a pin directory is
//! made private and refused when someone else owns it or may write to it.

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use tests::{
    agent::Agent,
    lab::{self, Lab},
    rules_lab::Scratch,
};

/// Long enough for a loaded 2-core machine; an agent that should have refused its input
/// and runs instead is killed then.
const LIMIT: Duration = Duration::from_secs(20);
const NOBODY: u32 = 65534;

/// `monitor run --iface gw-wan ARGS` in the lab's gateway, seeing /sys/fs/bpf, to its end.
fn run_to_end(lab: &Lab, args: &[&str]) -> Output {
    lab::run_bounded(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lab.gw))
            .arg(Agent::binary())
            .args(["run", "--iface", &lab.gw_wan_if])
            .args(args),
        LIMIT,
    )
}

/// Exit status 1 and one line on stderr holding every part.
fn assert_refused(out: &Output, parts: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line, got {stderr:?}");
    for part in parts {
        assert!(lines[0].contains(part), "{part:?} missing from {stderr:?}");
    }
}

fn utf8(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

#[test]
fn symlinked_logs_are_refused_and_not_followed() {
    let lab = Lab::new();
    let scratch = Scratch::new("symlinked-logs");
    let target = scratch.path("precious");
    fs::write(&target, "precious\n").expect("write the target");
    let missing = scratch.path("created-through-the-link");
    for flag in ["--conn-log", "--alert-log", "--dns-log"] {
        for (name, points_to) in [("to-file", &target), ("dangling", &missing)] {
            let link = scratch.path(&format!("{flag}-{name}"));
            symlink(points_to, &link).expect("plant the symlink");
            let out = run_to_end(&lab, &[flag, utf8(&link)]);
            assert_refused(&out, &[utf8(&link), "symbolic link"]);
            assert_eq!(
                fs::read_to_string(&target).expect("read the target"),
                "precious\n",
                "{flag} {name}: the target is untouched"
            );
            assert!(
                !missing.exists(),
                "{flag} {name}: nothing made through the link"
            );
        }
    }
}

/// A pin directory, removed when the test ends whatever it holds.
struct PinDir(PathBuf);

impl PinDir {
    fn new(tag: &str) -> PinDir {
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/monitor-test-{tag}-{}",
            std::process::id()
        ));
        let _ = monitor::kernel::pins::remove(&dir);
        let _ = fs::remove_file(&dir);
        let _ = fs::remove_dir(&dir);
        PinDir(dir)
    }

    fn arg(&self) -> &str {
        utf8(&self.0)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = monitor::kernel::pins::remove(&self.0);
        let _ = fs::remove_file(&self.0);
        let _ = fs::remove_dir(&self.0);
    }
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .mode()
        & 0o7777
}

#[test]
fn pin_directories_are_private_and_refused_when_not_ours() {
    let lab = Lab::new();

    let made = PinDir::new("private");
    let agent = Agent::start_seeing_pins(&lab.gw, &lab.gw_wan_if, &["--pin-path", made.arg()]);
    for dir in [made.0.clone(), made.0.join("maps"), made.0.join("links")] {
        assert_eq!(mode(&dir), 0o700, "{} is private", dir.display());
    }
    agent.stop();

    let foreign = PinDir::new("foreign");
    fs::create_dir(&foreign.0).expect("make the pin directory");
    std::os::unix::fs::chown(&foreign.0, Some(NOBODY), Some(NOBODY)).expect("chown to nobody");
    let out = run_to_end(&lab, &["--pin-path", foreign.arg()]);
    assert_refused(&out, &["--pin-path", foreign.arg(), "owned by uid 65534"]);

    let open = PinDir::new("open");
    fs::create_dir(&open.0).expect("make the pin directory");
    fs::set_permissions(&open.0, fs::Permissions::from_mode(0o777)).expect("chmod 777");
    let out = run_to_end(&lab, &["--pin-path", open.arg()]);
    assert_refused(
        &out,
        &["--pin-path", open.arg(), "writable by group or others"],
    );

    let linked = PinDir::new("linked");
    symlink(&made.0, &linked.0).expect("plant the symlink");
    let out = run_to_end(&lab, &["--pin-path", linked.arg()]);
    assert_refused(&out, &["--pin-path", linked.arg(), "symbolic link"]);
}
