//! The egress monitor agent: kernel programs count, this crate polls, assembles
//! connections, and writes what it saw.
//!
//! maps -> poller -> connection table -> logs.

pub mod addr;
pub mod alerts;
pub mod cgroups;
pub mod cidr;
pub mod cli;
pub mod clock;
pub mod config;
pub mod conntable;
pub mod consumer;
pub mod dense;
pub mod dns;
pub mod endpoint;
pub mod export;
pub mod finishing;
pub mod iface;
pub mod joined;
pub mod kernel;
#[cfg(test)]
mod layering;
pub mod lists;
pub mod logs;
pub mod metrics;
pub mod nat;
pub mod owners;
pub mod parse_watch;
pub mod poller;
pub mod private;
pub mod privileges;
pub mod proto;
pub mod records;
pub mod resolve;
pub mod rules;
pub mod run;
pub mod shed;
pub mod sni;
pub mod state;
pub mod top;
pub mod worker;
