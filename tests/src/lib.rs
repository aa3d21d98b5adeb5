//! Test support: crafted frames, network-namespace labs, and the agent as a child process.

pub mod agent;
pub mod bpf;
pub mod dashboard;
pub mod dns_lab;
pub mod fleet;
pub mod flood;
pub mod flowmap;
pub mod http;
pub mod ipfix_decoded;
pub mod kernel_harness;
pub mod lab;
pub mod lab_tun;
pub mod netlink;
pub mod nfdump;
pub mod packet;
pub mod pcap;
pub mod peers;
pub mod pmacct;
pub mod postgres;
pub mod procfs;
pub mod prometheus;
pub mod quic;
pub mod replay;
pub mod rules_lab;
pub mod tls;
pub mod traffic;
