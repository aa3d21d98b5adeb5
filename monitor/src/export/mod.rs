//! Flow export to the collectors operators already run.
//!
//! The exporter is fed by the connection table, never by the kernel maps: the poller calls
//! [`IpfixExporter::update`] for open connections and [`IpfixExporter::finish`] for the
//! finished ones, then [`IpfixExporter::flush`] once per poll.

pub mod ipfix;

pub use ipfix::{COLLECTOR_SCHEMES, Collector, ExportStats, IpfixConfig, IpfixExporter};
