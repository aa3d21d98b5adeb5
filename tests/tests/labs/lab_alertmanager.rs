//! Alerts posted to a real Alertmanager (Debian's prometheus-alertmanager) in the lab,
//! read back from its v2 API.

use std::time::Duration;

use serde_json::Value;
use tests::{
    agent::Agent,
    http::{self, eventually},
    lab::{self, Lab},
    traffic,
};

const ALERTMANAGER: &str = "127.0.0.1:9093";

#[test]
fn restricted_host_alert_reaches_alertmanager() {
    let lab = Lab::new();
    let dir = std::env::temp_dir().join(format!("lab-am-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("alertmanager.yml");
    std::fs::write(
        &config,
        "route:\n  receiver: nowhere\nreceivers:\n  - name: nowhere\n",
    )
    .expect("write alertmanager.yml");
    let (config_arg, storage_arg) = (
        format!("--config.file={}", config.display()),
        format!("--storage.path={}", dir.join("data").display()),
    );
    lab.spawn_in(
        &lab.gw,
        &[
            "prometheus-alertmanager",
            &config_arg,
            &storage_arg,
            &format!("--web.listen-address={ALERTMANAGER}"),
            "--cluster.listen-address=",
            "--log.level=error",
        ],
    );
    eventually("Alertmanager answers", Duration::from_secs(60), || {
        http::get(&lab.gw, ALERTMANAGER, "/api/v2/status")
    });
    let agent = Agent::start(
        &lab.gw,
        &lab.gw_wan_if,
        &[
            "--local-net",
            lab::LOCAL_NET_V4,
            "--poll-interval",
            "200ms",
            "--restricted-net",
            "198.18.1.2/32",
            "--alertmanager-url",
            &format!("http://{ALERTMANAGER}"),
        ],
    );
    let ping = traffic::ping(&lab.lan, lab::WAN_HOST_V4.into(), 2, 56);
    assert!(
        ping.received > 0,
        "the restricted host reaches the wan host: {ping:?}"
    );

    let alert = eventually(
        "the RestrictedOutbound alert in Alertmanager",
        Duration::from_secs(30),
        || {
            let alerts: Value =
                serde_json::from_str(&http::get(&lab.gw, ALERTMANAGER, "/api/v2/alerts")?).ok()?;
            alerts
                .as_array()?
                .iter()
                .find(|a| a["labels"]["note"] == "RestrictedOutbound")
                .cloned()
        },
    );
    assert_eq!(alert["labels"]["src"], "198.18.1.2", "{alert}");
    assert_eq!(alert["labels"]["dst"], "203.0.113.2", "{alert}");
    assert_eq!(
        alert["labels"]["alertname"], "RestrictedOutbound",
        "{alert}"
    );
    let msg = alert["annotations"]["msg"].as_str().unwrap_or_default();
    assert!(
        msg.contains("198.18.1.2") && msg.contains("203.0.113.2") && msg.contains("icmp"),
        "the message says who, to where, how: {msg:?}"
    );
    agent.stop();
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}
