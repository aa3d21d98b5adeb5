//! Alerts: what the rules raise, suppression, and the sinks they go to.

pub mod dispatch;
pub mod sinks;
pub mod suppress;

use std::{net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::logs::conn::{ConnFields, ConnRecord};

/// The rule that raised an alert: the alert's `note` (docs/logs.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Note {
    LargeUpload,
    UploadRatio,
    LongConnection,
    RestrictedOutbound,
    WindowExceeded,
    DataLeak,
    DnsTunnel,
    IntelMatch,
}

impl Note {
    pub const ALL: [Note; 8] = [
        Note::LargeUpload,
        Note::UploadRatio,
        Note::LongConnection,
        Note::RestrictedOutbound,
        Note::WindowExceeded,
        Note::DataLeak,
        Note::DnsTunnel,
        Note::IntelMatch,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Note::LargeUpload => "LargeUpload",
            Note::UploadRatio => "UploadRatio",
            Note::LongConnection => "LongConnection",
            Note::RestrictedOutbound => "RestrictedOutbound",
            Note::WindowExceeded => "WindowExceeded",
            Note::DataLeak => "DataLeak",
            Note::DnsTunnel => "DnsTunnel",
            Note::IntelMatch => "IntelMatch",
        }
    }
}

/// One alert, serialised as one JSON object: `ts` (now), `note`, `msg`, `src`, `dst`, the
/// connection's fields where one connection is concerned (with `first_seen`, its first
/// packet), and the rule's figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Alert {
    pub ts: f64,
    pub note: Note,
    pub msg: String,
    pub src: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_seen: Option<f64>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub conn: Option<ConnFields>,
    #[serde(flatten)]
    pub figures: Map<String, Value>,
    /// What makes two alerts "the same" for suppression: the rule's key.
    #[serde(skip)]
    pub key: String,
    /// How long the same alert is then only counted; `None`: `--suppress`, from the alert
    /// that went out.
    #[serde(skip)]
    pub quiet: Option<Quiet>,
    /// The connection log the alert's connection record also goes to, sent or not.
    #[serde(skip)]
    pub conn_log: Option<ConnLog>,
}

/// A quiet time a rule sets for its alerts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quiet {
    pub time: Duration,
    /// Whether a repeat within the quiet time starts it again; else it runs from the
    /// alert that went out.
    pub repeats_restart: bool,
}

/// Connection logs an alert's connection record can go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnLog {
    /// `--conn-long-log`.
    Long,
}

impl Alert {
    /// An alert about one connection.
    pub fn for_conn(
        ts: f64,
        note: Note,
        msg: String,
        src: IpAddr,
        dst: IpAddr,
        record: ConnRecord,
        key: String,
    ) -> Self {
        Self {
            ts,
            note,
            msg,
            src,
            dst: Some(dst),
            first_seen: Some(record.ts),
            conn: Some(record.fields),
            figures: Map::new(),
            key,
            quiet: None,
            conn_log: None,
        }
    }

    /// The connection's record, for an alert about one connection.
    pub fn conn_record(&self) -> Option<ConnRecord> {
        Some(ConnRecord {
            ts: self.first_seen?,
            fields: self.conn.clone()?,
        })
    }

    /// Sets the suppression key.
    pub fn keyed(mut self, key: String) -> Self {
        self.key = key;
        self
    }

    /// Sets the quiet time.
    pub fn quiet(mut self, quiet: Quiet) -> Self {
        self.quiet = Some(quiet);
        self
    }

    /// Has the connection's record also written to `log`.
    pub fn logged_to(mut self, log: ConnLog) -> Self {
        self.conn_log = Some(log);
        self
    }

    /// Adds one of the rule's figures (`threshold`, `bytes`, `window`, ...).
    pub fn with(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.figures.insert(name.to_owned(), value.into());
        self
    }
}
