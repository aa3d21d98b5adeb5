//! Small helpers for tests that run the kernel programs through BPF_PROG_TEST_RUN.

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
};

use monitor_common::flow::FlowKey;

/// A flow key written for people: `proto 6 family 4: [10.0.0.1]:40000 <-> [10.0.0.2]:443`.
pub struct K<'a>(pub &'a FlowKey);

impl fmt::Display for K<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = self.0;
        let (a, b) = if k.family == 4 {
            let a: [u8; 4] = k.addr_a[..4].try_into().expect("4 bytes");
            let b: [u8; 4] = k.addr_b[..4].try_into().expect("4 bytes");
            (Ipv4Addr::from(a).to_string(), Ipv4Addr::from(b).to_string())
        } else {
            (
                Ipv6Addr::from(k.addr_a).to_string(),
                Ipv6Addr::from(k.addr_b).to_string(),
            )
        };
        write!(
            f,
            "proto {} family {}: [{a}]:{} <-> [{b}]:{}",
            k.proto, k.family, k.port_a, k.port_b
        )
    }
}

/// The index of `lo` in this thread's namespace: where test_run runs the programs.
pub fn loopback_ifindex() -> u32 {
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    assert_ne!(index, 0, "this network namespace has no lo");
    index
}
