//! Log writers: JSON lines, one object per line.

pub mod conn;
mod jsonl;

pub use jsonl::{JsonLines, LogStats, request_reopen};
