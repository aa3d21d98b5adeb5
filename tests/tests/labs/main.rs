//! Network-namespace labs with the agent, and captures replayed into a lab. Each test
//! names its namespaces, pin paths and scratch directories apart from every other test's
//! (by the process ID and a counter, or a name of its own), so that the tests of all the
//! modules here run side by side. One binary, so that the `monitor` library is linked once
//! for them. The two tests that time the agent while it works hard (`lab_flow_flood.rs`,
//! `lab_long_poll.rs`) are binaries of their own: cargo runs test binaries one after
//! another, so nothing shares their CPUs.

mod lab_alertmanager;
mod lab_counts;
mod lab_dashboard;
mod lab_dns;
mod lab_dns_tunnels;
mod lab_fleet;
mod lab_floods;
mod lab_hardening;
mod lab_hooks;
mod lab_ipfix;
mod lab_jumbo;
mod lab_lists;
mod lab_logs;
mod lab_map_pressure;
mod lab_metrics;
mod lab_nat;
mod lab_offloads;
mod lab_owners;
mod lab_pmacct;
mod lab_poll_changes;
mod lab_privileges;
mod lab_quic;
mod lab_restart;
mod lab_rules;
mod lab_sink_outages;
mod lab_sni;
mod lab_spoofed;
mod lab_top;
mod lab_tun;
mod replay;
