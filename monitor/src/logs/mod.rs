//! Log writers: JSON lines, one object per line.

pub mod conn;
mod jsonl;

pub use jsonl::{JsonLines, request_reopen};
