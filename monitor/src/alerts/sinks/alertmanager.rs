//! `--alertmanager-url`: each alert posted to Alertmanager's v2 API, with labels
//! `alertname` and `note` (the rule), `src`, `dst`, and the message as annotations.
//! Plain HTTP only: this build has no TLS.

use std::{io, time::Duration};

use serde_json::{Value, json};

use super::{Sink, syslog::timestamp};
use crate::{
    alerts::Alert,
    endpoint::{Scheme, Url},
};

/// How long one post may take before it counts as failed (and is retried).
const TIMEOUT: Duration = Duration::from_secs(5);

pub struct AlertmanagerSink {
    agent: ureq::Agent,
    endpoint: String,
}

/// The scheme of `--alertmanager-url`.
pub const SCHEMES: &[Scheme] = &[Scheme::Http];

impl AlertmanagerSink {
    /// `base` is Alertmanager's address, `http://HOST[:PORT][/PREFIX]`.
    pub fn new(base: &Url) -> Self {
        let config = ureq::Agent::config_builder()
            .timeout_global(Some(TIMEOUT))
            .http_status_as_error(true)
            .build();
        Self {
            agent: config.into(),
            endpoint: format!("{base}/api/v2/alerts"),
        }
    }
}

/// The v2 API's postable alert for one of ours.
pub fn postable(alert: &Alert) -> Value {
    let mut labels = json!({
        "alertname": alert.note.as_str(),
        "note": alert.note.as_str(),
        "src": alert.src.to_string(),
        "severity": "warning",
    });
    if let Some(dst) = alert.dst {
        labels["dst"] = dst.to_string().into();
    }
    json!([{
        "labels": labels,
        "annotations": {
            "msg": alert.msg,
            "summary": alert.msg,
        },
        "startsAt": timestamp(alert.ts),
    }])
}

impl Sink for AlertmanagerSink {
    fn name(&self) -> &'static str {
        "alertmanager"
    }

    fn deliver(&mut self, alert: &Alert) -> io::Result<()> {
        let body = postable(alert).to_string();
        self.agent
            .post(&self.endpoint)
            .header("Content-Type", "application/json")
            .send(&body)
            .map(drop)
            .map_err(|err| io::Error::other(format!("{}: {err}", self.endpoint)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::Note;

    #[test]
    fn posts_under_the_base() {
        let base = Url::parse("http://127.0.0.1:9093/prefix/", SCHEMES).unwrap();
        assert_eq!(
            AlertmanagerSink::new(&base).endpoint,
            "http://127.0.0.1:9093/prefix/api/v2/alerts"
        );
        assert!(Url::parse("https://am.example:9093", SCHEMES).is_err());
        assert!(Url::parse("udp://am.example:9093", SCHEMES).is_err());
    }

    #[test]
    fn labels_and_annotations() {
        let alert = Alert {
            ts: 1_795_478_400.5,
            note: Note::RestrictedOutbound,
            msg: "198.18.5.7 opened a connection".into(),
            src: "198.18.5.7".parse().unwrap(),
            dst: Some("203.0.113.2".parse().unwrap()),
            first_seen: None,
            conn: None,
            figures: Default::default(),
            key: String::new(),
            quiet: None,
            conn_log: None,
        };
        let v = postable(&alert);
        assert_eq!(v[0]["labels"]["note"], "RestrictedOutbound");
        assert_eq!(v[0]["labels"]["alertname"], "RestrictedOutbound");
        assert_eq!(v[0]["labels"]["src"], "198.18.5.7");
        assert_eq!(v[0]["labels"]["dst"], "203.0.113.2");
        assert_eq!(v[0]["annotations"]["msg"], alert.msg);
        assert!(
            v[0]["startsAt"]
                .as_str()
                .unwrap()
                .starts_with("2026-11-24T00:00:00.5")
        );
    }
}
