//! The deployment files under `deploy/`: the Prometheus alerting rules pass
//! `promtool check rules` and their unit tests (`promtool test rules`), every alert has a
//! firing and a quiet case there, and the systemd unit passes `systemd-analyze verify`
//! without a warning and keeps a low `systemd-analyze security` exposure, and every
//! selector of the Grafana dashboard's queries follows its `job` and `instance` variables
//! (`tests/tests/labs/lab_dashboard.rs` runs the queries themselves).
//!
//! Needs `promtool` (Debian package `prometheus`) and `systemd-analyze` (package
//! `systemd`); a missing tool fails the test, naming the package `cargo xtask setup` must
//! install. Nothing here needs root or a running systemd.

use std::{
    ffi::OsStr,
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use tests::{agent::Agent, dashboard};

const RULES: &str = "deploy/prometheus/egress-monitor.rules.yml";
const RULES_TEST: &str = "deploy/prometheus/egress-monitor.rules.test.yml";
const UNIT: &str = "deploy/systemd/egress-monitor.service";
const UNIT_NAME: &str = "egress-monitor.service";
const INSTALLED_BINARY: &str = "/usr/bin/monitor";
/// `systemd-analyze security` exposure (0-100, shown as 0.0-10.0) the unit must not exceed:
/// 1.7 when written. Raise it only with a reason in the unit's comments.
const MAX_EXPOSURE: &str = "20";

pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace root")
        .to_path_buf()
}

/// Runs `tool args...` in `dir`; panics naming the Debian package if `tool` is missing.
fn run<S: AsRef<OsStr>>(tool: &str, package: &str, args: &[S], dir: &Path) -> Output {
    match Command::new(tool).args(args).current_dir(dir).output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "{tool} is not installed: `cargo xtask setup` must install the Debian package \
             {package} (apt-get install -y {package})"
        ),
        Err(e) => panic!("running {tool}: {e}"),
    }
}

pub(crate) fn describe(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every selector (`{...}`) of every panel's query starts with the dashboard's `job` and
/// `instance` variables, so that the dashboard's choice of agents applies to all panels.
#[test]
fn dashboard_queries_follow_job_and_instance() {
    const SELECTOR: &str = r#"{job=~"$job", instance=~"$instance""#;
    for query in dashboard::queries(&dashboard::load()) {
        let selectors = query.expr.matches('{').count();
        assert!(
            selectors > 0 && query.expr.matches(SELECTOR).count() == selectors,
            "panel {:?}: every selector must start with {SELECTOR}: {}",
            query.panel,
            query.expr
        );
    }
}

fn promtool(args: &[&str]) -> Output {
    run("promtool", "prometheus", args, &repo_root())
}

#[test]
fn prometheus_rules_pass_promtool_check() {
    let out = promtool(&["check", "rules", RULES]);
    assert!(
        out.status.success(),
        "promtool check rules {RULES} failed: {}",
        describe(&out)
    );
}

#[test]
fn prometheus_rules_unit_tests_pass() {
    let out = promtool(&["test", "rules", RULES_TEST]);
    assert!(
        out.status.success(),
        "promtool test rules {RULES_TEST} failed: {}",
        describe(&out)
    );
}

/// Every `alert:` of the rules file is tested at least once firing (`exp_alerts:` with
/// entries) and once quiet (`exp_alerts: []`).
#[test]
fn every_alert_has_a_firing_and_a_quiet_test() {
    let root = repo_root();
    let read = |path: &str| {
        fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
    };
    let rules = read(RULES);
    let tests = read(RULES_TEST);
    let value = |line: &str, key: &str| {
        line.trim()
            .trim_start_matches("- ")
            .strip_prefix(key)
            .map(|v| v.trim().trim_matches(['"', '\'']).to_string())
    };
    let mut alerts: Vec<String> = rules.lines().filter_map(|l| value(l, "alert:")).collect();
    alerts.dedup();
    assert!(!alerts.is_empty(), "no alert: found in {RULES}");

    // (alertname, fires) of each alert_rule_test: the line after `alertname:` is
    // `exp_alerts: []` (quiet) or `exp_alerts:` followed by expected alerts (firing).
    let lines: Vec<&str> = tests.lines().collect();
    let mut cases = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if let Some(name) = value(line, "alertname:") {
            let next = lines[i + 1..]
                .iter()
                .map(|l| l.trim())
                .find(|l| !l.is_empty() && !l.starts_with('#'))
                .unwrap_or_else(|| panic!("{RULES_TEST}: nothing after alertname: {name}"));
            let fires = match next {
                "exp_alerts: []" => false,
                "exp_alerts:" => true,
                other => panic!(
                    "{RULES_TEST}: after alertname: {name}, expected exp_alerts, got {other:?}"
                ),
            };
            cases.push((name, fires));
        }
    }
    for alert in &alerts {
        for fires in [true, false] {
            assert!(
                cases.iter().any(|(n, f)| n == alert && *f == fires),
                "{RULES_TEST} has no case where {alert} is {}",
                if fires { "firing" } else { "quiet" }
            );
        }
    }
    for (name, _) in &cases {
        assert!(
            alerts.contains(name),
            "{RULES_TEST} tests {name}, which {RULES} does not define"
        );
    }
}

/// A copy of the unit in a fresh directory, with ExecStart pointing at the built agent
/// (systemd-analyze verify checks that the binary exists). Removed on drop.
struct UnitCopy {
    dir: PathBuf,
}

impl UnitCopy {
    fn new(tag: &str) -> Self {
        let unit = fs::read_to_string(repo_root().join(UNIT))
            .unwrap_or_else(|e| panic!("read {UNIT}: {e}"));
        let exec_starts: Vec<&str> = unit
            .lines()
            .filter(|l| l.starts_with("ExecStart="))
            .collect();
        let prefix = format!("ExecStart={INSTALLED_BINARY} run ");
        assert!(
            exec_starts.len() == 1 && exec_starts[0].starts_with(&prefix),
            "{UNIT}: want one ExecStart= running `{INSTALLED_BINARY} run ...`, got {exec_starts:?}"
        );
        let binary = Agent::binary();
        let binary = binary.to_str().expect("agent binary path is UTF-8");
        let unit = unit.replace(&prefix, &format!("ExecStart={binary} run "));

        let dir = std::env::temp_dir().join(format!(
            "egress-monitor-deploy-{tag}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        fs::write(dir.join(UNIT_NAME), unit)
            .unwrap_or_else(|e| panic!("write {}: {e}", dir.display()));
        UnitCopy { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(UNIT_NAME)
    }
}

impl Drop for UnitCopy {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn systemd_analyze<S: AsRef<OsStr>>(args: &[S]) -> Output {
    run("systemd-analyze", "systemd", args, &repo_root())
}

#[test]
fn systemd_unit_verifies_without_warnings() {
    let unit = UnitCopy::new("verify");
    let out = systemd_analyze(&[OsStr::new("verify"), unit.path().as_os_str()]);
    // Unknown keys, bad values and missing binaries are warnings with status 0, so the
    // output is checked too. Lines about other units of this machine (the targets the
    // unit orders itself after) are not the unit's business.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let about_unit: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("egress-monitor"))
        .collect();
    assert!(
        out.status.success() && about_unit.is_empty(),
        "systemd-analyze verify {UNIT} (ExecStart rewritten to the built agent) complained: {}",
        describe(&out)
    );
}

#[test]
fn systemd_unit_exposure_stays_low() {
    let unit = UnitCopy::new("security");
    let threshold = format!("--threshold={MAX_EXPOSURE}");
    let out = systemd_analyze(&[
        OsStr::new("security"),
        OsStr::new("--offline=yes"),
        OsStr::new(&threshold),
        OsStr::new("--no-pager"),
        unit.path().as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "systemd-analyze security: {UNIT} is more exposed than {MAX_EXPOSURE}/100 \
         (a hardening setting was dropped?): {}",
        describe(&out)
    );
}
