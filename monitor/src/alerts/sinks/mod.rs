//! Where alerts go. Each sink runs behind its own [`Dispatcher`](super::dispatch), so a
//! slow or unreachable one never holds up polling or the other sinks.

pub mod alertmanager;
pub mod syslog;

use std::{io, path::Path};

use super::Alert;
use crate::logs::JsonLines;

pub trait Sink: Send + 'static {
    /// Names the sink in logs and metrics: `alert-log`, `syslog`, ...
    fn name(&self) -> &'static str;
    /// Delivers one alert. An error means "not delivered": the dispatcher keeps the alert
    /// and tries again later.
    fn deliver(&mut self, alert: &Alert) -> io::Result<()>;
}

/// `--alert-log`: JSON lines to a file or stdout, flushed per alert.
pub struct AlertLog(JsonLines);

impl AlertLog {
    pub fn open(path: &Path) -> io::Result<Self> {
        JsonLines::open(path).map(Self)
    }
}

impl Sink for AlertLog {
    fn name(&self) -> &'static str {
        "alert-log"
    }

    fn deliver(&mut self, alert: &Alert) -> io::Result<()> {
        // A line still waiting is this alert's: the dispatcher retries its head until
        // delivered, so writing it again would log it twice.
        if !self.0.has_pending() {
            self.0.write(alert);
        }
        self.0.flush()
    }
}
