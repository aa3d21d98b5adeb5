//! Debian's Prometheus (installed by `cargo xtask setup`) in a lab's gw namespace,
//! scraping the agent's /metrics every second, and instant queries through its HTTP API.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;

use crate::{
    http::{self, eventually},
    lab::{self, Lab},
    rules_lab::Scratch,
};

/// Prometheus's web address, inside gw.
pub const ADDR: &str = "127.0.0.1:9090";
/// The scrape job's name, as `deploy/README.md` asks users to name it.
pub const JOB: &str = "egress-monitor";
/// The scrape target, the agent's default `--metrics-addr`: also the `instance` label.
pub const INSTANCE: &str = http::AGENT_METRICS;
const SCRAPE_INTERVAL: &str = "1s";

/// A running Prometheus; killed (SIGKILL, by PID) and its data removed when dropped.
pub struct Prometheus {
    child: Child,
    ns: String,
    // Removed after `drop` has reaped Prometheus: nothing writes in it any more.
    _dir: Scratch,
}

impl Prometheus {
    /// Starts Prometheus in `lab`'s gw and returns once it has scraped the agent there.
    pub fn start(lab: &Lab) -> Prometheus {
        lab::require_tool("prometheus", "prometheus");
        let dir = Scratch::new("prometheus");
        let config = dir.path("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  evaluation_interval: {SCRAPE_INTERVAL}\n\
                 scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['{INSTANCE}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.gw, "prometheus"])
            .arg(flag("--config.file", &config))
            .arg(flag("--storage.tsdb.path", &dir.path("data")))
            .arg(format!("--web.listen-address={ADDR}"))
            .arg("--log.level=error")
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn prometheus in {}: {e}", lab.gw));
        let prometheus = Prometheus {
            child,
            ns: lab.gw.clone(),
            _dir: dir,
        };
        eventually(
            "Prometheus scrapes the agent",
            Duration::from_secs(60),
            || {
                prometheus
                    .value(&format!("up{{job=\"{JOB}\"}}"))
                    .filter(|&up| up == 1.0)
            },
        );
        prometheus
    }

    /// The result vector of an instant query, or `None` while Prometheus does not answer
    /// or rejects the query.
    pub fn query(&self, expr: &str) -> Option<Vec<Value>> {
        let encoded: String = expr
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let body = http::get(&self.ns, ADDR, &format!("/api/v1/query?query={encoded}"))?;
        let json: Value = serde_json::from_str(&body).ok()?;
        json["data"]["result"].as_array().cloned()
    }

    /// The value of an instant query's first series, if it has one.
    pub fn value(&self, expr: &str) -> Option<f64> {
        let result = self.query(expr)?;
        result.first()?["value"][1].as_str()?.parse().ok()
    }
}

fn flag(name: &str, path: &Path) -> String {
    format!("{name}={}", path.display())
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
