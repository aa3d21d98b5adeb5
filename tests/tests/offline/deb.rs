//! The Debian package: `cargo xtask package` makes it from the agent under test (the code
//! path that packages the release build), its files and modes are exactly the expected
//! ones, and it installs, runs and purges in a throwaway root: a private mount namespace
//! where an overlay on `/` with a tmpfs on top takes every write, Rust's toolchain hidden
//! and the environment cleared; an upgrade keeps the admin's flags, and the purge must
//! also undo an admin's `systemctl enable`.
//! The machine itself is never touched.
//!
//! Needs root (mounts, chroot), `unshare` and `dpkg-deb` (Debian packages `util-linux`
//! and `dpkg`, always present), `systemd-analyze` (package `systemd`) and `logrotate`.

use std::{env, fs, path::PathBuf, process::Command};

use tests::agent::Agent;

use crate::deploy::{describe, repo_root};

const PACKAGE: &str = "egress-monitor";

/// `dpkg-deb -c`: mode and path of every entry, all owned by root/root.
const CONTENTS: &str = "\
drwxr-xr-x ./
drwxr-xr-x ./etc/
drwxr-xr-x ./etc/default/
-rw-r--r-- ./etc/default/egress-monitor
drwxr-xr-x ./etc/logrotate.d/
-rw-r--r-- ./etc/logrotate.d/egress-monitor
drwxr-xr-x ./usr/
drwxr-xr-x ./usr/bin/
-rwxr-xr-x ./usr/bin/monitor
drwxr-xr-x ./usr/lib/
drwxr-xr-x ./usr/lib/systemd/
drwxr-xr-x ./usr/lib/systemd/system/
-rw-r--r-- ./usr/lib/systemd/system/egress-monitor.service
drwxr-xr-x ./usr/lib/sysusers.d/
-rw-r--r-- ./usr/lib/sysusers.d/egress-monitor.conf
drwxr-xr-x ./usr/share/
drwxr-xr-x ./usr/share/doc/
drwxr-xr-x ./usr/share/doc/egress-monitor/
-rw-r--r-- ./usr/share/doc/egress-monitor/changelog.gz
-rw-r--r-- ./usr/share/doc/egress-monitor/copyright
drwxr-xr-x ./usr/share/egress-monitor/
-rw-r--r-- ./usr/share/egress-monitor/egress-monitor.json
-rw-r--r-- ./usr/share/egress-monitor/egress-monitor.rules.test.yml
-rw-r--r-- ./usr/share/egress-monitor/egress-monitor.rules.yml
drwxr-xr-x ./var/
drwxr-xr-x ./var/log/
drwxr-x--- ./var/log/egress-monitor/
";

const CONFFILES: &str = "/etc/default/egress-monitor\n/etc/logrotate.d/egress-monitor\n";

const UNIT: &str = "/usr/lib/systemd/system/egress-monitor.service";

/// Paths the purge must remove: the package's own, dpkg's records of it and
/// deb-systemd-helper's state.
const GONE_AFTER_PURGE: &[&str] = &[
    "/usr/bin/monitor",
    UNIT,
    "/usr/lib/sysusers.d/egress-monitor.conf",
    "/etc/default/egress-monitor",
    "/etc/logrotate.d/egress-monitor",
    "/usr/share/egress-monitor",
    "/usr/share/doc/egress-monitor",
    "/var/log/egress-monitor",
    "/var/lib/dpkg/info/egress-monitor.list",
    "/var/lib/dpkg/info/egress-monitor.postinst",
    "/var/lib/systemd/deb-systemd-helper-enabled/egress-monitor.service.dsh-also",
    // An admin's `systemctl enable` (the test makes one).
    "/etc/systemd/system/multi-user.target.wants/egress-monitor.service",
];

/// Outside the chroot: an overlay of `/` whose writes go to a tmpfs, with its own /proc,
/// /dev, /run (so that the maintainer scripts see no running systemd) and /tmp; the
/// toolchain's directories under tmpfs and its binaries under /dev/null. Then the steps
/// of INSIDE, in the chroot with a clean environment.
/// Arguments: work directory, package, paths to hide.
const OUTSIDE: &str = r#"
work=$1 deb=$2
shift 2
root=$work/root
mkdir "$work/cow" "$root"
mount -t tmpfs tmpfs "$work/cow"
mkdir "$work/cow/upper" "$work/cow/work"
mount -t overlay overlay \
    -o "lowerdir=/,upperdir=$work/cow/upper,workdir=$work/cow/work" "$root"
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount -t tmpfs tmpfs "$root/run"
mount -t tmpfs tmpfs "$root/tmp"
mkdir "$root/tmp/out"
mount --bind "$work/out" "$root/tmp/out"
cp "$deb" "$root/tmp/$(basename "$deb")"
for path; do
    if [ -d "$root$path" ]; then
        mount -t tmpfs tmpfs "$root$path"
    elif [ -e "$root$path" ]; then
        mount --bind /dev/null "$root$path"
    fi
done
exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    /bin/sh -eu -c "$INSIDE" sh "/tmp/$(basename "$deb")"
"#;

/// Each step writes its output to /tmp/out/STEP.out and its status to STEP.rc.
const INSIDE: &str = r#"
step() {
    name=$1
    shift
    if "$@" >"/tmp/out/$name.out" 2>&1; then echo 0; else echo $?; fi >"/tmp/out/$name.rc"
}
step install dpkg -i "$1"
step status dpkg-query -W -f '${Status} ${Version}' egress-monitor
step user getent passwd egress-monitor
step log_dir stat -c '%A %U %G' /var/log/egress-monitor
step toolchain sh -c '
    for tool in cargo rustc rustup bpf-linker; do command -v "$tool" || true; done
    while read -r path; do
        if [ -d "$path" ]; then ls -A "$path"; elif [ -f "$path" ]; then echo "$path"; fi
    done </tmp/out/hidden'
step help monitor --help
step logrotate sh -c '
    set -e
    echo "{}" >/var/log/egress-monitor/conn.log
    logrotate --force --state /tmp/logrotate.state /etc/logrotate.d/egress-monitor
    ls /var/log/egress-monitor
    rm /var/log/egress-monitor/*'
step verify systemd-analyze verify /usr/lib/systemd/system/egress-monitor.service
step reinstall sh -c '
    set -e
    echo "MONITOR_ARGS=\"--iface eth0\"" >/etc/default/egress-monitor
    dpkg -i "$1" </dev/null
    cat /etc/default/egress-monitor' sh "$1"
step enable systemctl enable egress-monitor.service
step purge dpkg --purge egress-monitor
step purged dpkg -s egress-monitor
step leftovers sh -c 'while read -r path; do ls -d "$path" 2>/dev/null || true; done </tmp/out/gone'
"#;

/// A fresh directory for the package and the steps' results; removed on drop.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", describe(&out));
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// The toolchain the package must not need: cargo's and rustup's homes, and every
/// `cargo`, `rustc`, `rustup` and `bpf-linker` on this process's PATH.
fn toolchain_paths() -> Vec<PathBuf> {
    let home = env::var_os("HOME").map(PathBuf::from);
    let mut paths: Vec<PathBuf> = [("CARGO_HOME", ".cargo"), ("RUSTUP_HOME", ".rustup")]
        .into_iter()
        .filter_map(|(var, default)| {
            env::var_os(var)
                .map(PathBuf::from)
                .or_else(|| home.as_ref().map(|home| home.join(default)))
        })
        .collect();
    let path = env::var_os("PATH").unwrap_or_default();
    for dir in env::split_paths(&path) {
        for tool in ["cargo", "rustc", "rustup", "bpf-linker"] {
            let file = dir.join(tool);
            if file.is_file() {
                paths.push(file);
            }
        }
    }
    // Directories first: a tool inside one is then hidden with it.
    paths.sort_by_key(|path| !path.is_dir());
    paths
}

#[test]
fn package_installs_runs_and_purges_without_rust() {
    let work = WorkDir(env::temp_dir().join(format!("egress-monitor-deb-{}", std::process::id())));
    let _ = fs::remove_dir_all(&work.0);
    fs::create_dir_all(work.0.join("out")).expect("create the work directory");

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let deb = run(Command::new(cargo)
        .args(["run", "--quiet", "-p", "xtask", "--", "package", "--binary"])
        .arg(Agent::binary())
        .arg("--out-dir")
        .arg(&work.0)
        .current_dir(repo_root()));
    let deb = PathBuf::from(deb.trim());
    let arch = run(Command::new("dpkg").arg("--print-architecture"));
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        deb.file_name().and_then(|name| name.to_str()),
        Some(format!("{PACKAGE}_{version}_{}.deb", arch.trim()).as_str()),
        "the package's file name"
    );

    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let mut entries = Vec::new();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields.len(), 6, "dpkg-deb -c line: {line}");
        assert_eq!(fields[1], "root/root", "owner of {}", fields[5]);
        entries.push((fields[5], fields[0]));
    }
    entries.sort();
    let entries: String = entries
        .iter()
        .map(|(path, mode)| format!("{mode} {path}\n"))
        .collect();
    assert_eq!(entries, CONTENTS, "dpkg-deb -c {}", deb.display());

    let field = |name: &str| run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(name));
    assert_eq!(field("Package").trim(), PACKAGE);
    assert_eq!(field("Version").trim(), version);
    let depends = field("Depends");
    assert!(
        depends.starts_with("libc6 (>= 2."),
        "Depends (dpkg-shlibdeps) should name libc6's minimum version: {depends}"
    );
    let conffiles = run(Command::new("dpkg-deb")
        .arg("-I")
        .arg(&deb)
        .arg("conffiles"));
    assert_eq!(conffiles, CONFFILES, "the package's conffiles");

    let lines = |paths: &[&str]| {
        paths
            .iter()
            .map(|path| format!("{path}\n"))
            .collect::<String>()
    };
    fs::write(work.0.join("out/gone"), lines(GONE_AFTER_PURGE))
        .expect("write the list of paths a purge removes");
    let hidden = toolchain_paths();
    let hidden_names: Vec<&str> = hidden
        .iter()
        .map(|path| path.to_str().expect("a UTF-8 path"))
        .collect();
    fs::write(work.0.join("out/hidden"), lines(&hidden_names))
        .expect("write the list of hidden paths");
    let mut isolated = Command::new("unshare");
    isolated
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-eu",
            "-c",
            OUTSIDE,
            "sh",
        ])
        .arg(&work.0)
        .arg(&deb)
        .args(&hidden)
        .env("INSIDE", INSIDE);
    let out = isolated.output().expect("start unshare");
    assert!(
        out.status.success(),
        "setting up the throwaway root failed: {}",
        describe(&out)
    );

    let step = |name: &str| {
        let read = |ext: &str| {
            fs::read_to_string(work.0.join("out").join(format!("{name}.{ext}")))
                .unwrap_or_else(|e| panic!("step {name} left no {ext}: {e}"))
        };
        (
            read("rc").trim().parse::<i32>().expect("a status"),
            read("out"),
        )
    };
    let ok = |name: &str, what: &str| {
        let (rc, out) = step(name);
        assert_eq!(rc, 0, "{what} failed ({rc}):\n{out}");
        out
    };
    ok("install", "dpkg -i");
    assert_eq!(
        ok("status", "dpkg-query -W"),
        format!("install ok installed {version}")
    );
    assert!(
        ok(
            "user",
            "the egress-monitor user (postinst: systemd-sysusers)"
        )
        .starts_with("egress-monitor:"),
    );
    assert_eq!(
        ok("log_dir", "stat /var/log/egress-monitor").trim(),
        "drwxr-x--- root root"
    );
    assert_eq!(
        ok("toolchain", "looking for the toolchain"),
        "",
        "Rust's toolchain is still visible in the throwaway root (hidden: {hidden:?})"
    );
    assert!(ok("help", "monitor --help without Rust").contains("run"));
    // The postrotate's reload finds no systemd here and is ignored, as the snippet says.
    assert_eq!(
        ok("logrotate", "logrotate --force with the package's snippet"),
        "conn.log.1\n",
        "a rotation moves conn.log aside (compressed only at the next one)"
    );
    let verify = ok("verify", "systemd-analyze verify on the installed unit");
    let about_unit: Vec<&str> = verify
        .lines()
        .filter(|line| line.contains(PACKAGE))
        .collect();
    assert!(
        about_unit.is_empty(),
        "systemd-analyze verify {UNIT} complained:\n{verify}"
    );
    let reinstall = ok("reinstall", "dpkg -i over the installed package");
    assert!(
        reinstall.ends_with("MONITOR_ARGS=\"--iface eth0\"\n"),
        "an upgrade must keep the admin's /etc/default/egress-monitor (a conffile):\n{reinstall}"
    );
    ok("enable", "systemctl enable (offline: links only)");
    ok("purge", "dpkg --purge");
    let (rc, out) = step("purged");
    assert_ne!(
        rc, 0,
        "dpkg -s still knows the package after its purge:\n{out}"
    );
    assert_eq!(
        ok("leftovers", "looking for leftovers"),
        "",
        "left after the purge"
    );
}
