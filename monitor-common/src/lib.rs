//! Types shared by the kernel programs and the agent, and the packet parser both use.
//!
//! Everything here is `#[repr(C)]` with explicit padding: the kernel rejects map writes of
//! uninitialised padding, and both sides must agree on every byte.
#![no_std]

pub mod dns;
pub mod flow;
pub mod hello;
pub mod owner;
pub mod parse;
pub mod stats;

/// Names of the kernel objects; the agent looks them up by these names.
pub mod names {
    pub const FLOW_MAP: &str = "FLOWS";
    pub const STATS_MAP: &str = "STATS";
    pub const WATCHED_MAP: &str = "WATCHED";
    pub const WATCHED_MASK_MAP: &str = "WATCHED_MASK";
    pub const DNS_EVENTS_MAP: &str = "DNS_EVENTS";
    pub const EPOCH_MAP: &str = "EPOCH";
    pub const CHANGED_MAP: &str = "CHANGED";
    pub const CHANGES_LOST_MAP: &str = "CHANGES_LOST";
    pub const NEW_ENTRIES_MAP: &str = "NEW_ENTRIES";
    pub const HELLO_EVENTS_MAP: &str = "HELLO_EVENTS";
    pub const HELLO_LOST_MAP: &str = "HELLO_LOST";
    pub const OWNER_EVENTS_MAP: &str = "OWNER_EVENTS";
    pub const OWNER_LOST_MAP: &str = "OWNER_LOST";
    pub const OWNERS_MAP: &str = "OWNERS";
    /// The global the agent sets to the running kernel's `task_struct` offsets.
    pub const TASK_OFFSETS: &str = "TASK_OFFSETS";
    /// The cgroup programs that keep a socket's owner (each named after its hook): at
    /// `socket()`, and at `connect()` and `bind()`.
    pub const OWNER_SOCK_CREATE: &str = "owner_sock_create";
    pub const OWNER_SOCK_ADDR_PROGRAMS: [&str; 4] = [
        "owner_connect4",
        "owner_connect6",
        "owner_bind4",
        "owner_bind6",
    ];
    pub const XDP_INGRESS: &str = "xdp_ingress";
    pub const TC_INGRESS: &str = "tc_ingress";
    pub const TC_EGRESS: &str = "tc_egress";
    /// The TC programs for interfaces whose packets start at the IP header.
    pub const TC_INGRESS_IP: &str = "tc_ingress_ip";
    pub const TC_EGRESS_IP: &str = "tc_egress_ip";
}

/// Interfaces one agent can watch.
pub const MAX_WATCHED_IFACES: u32 = 64;

/// Bits of a `WATCHED` map value (ifindex -> bits).
pub mod watched {
    /// The interface's ingress is hooked: a forwarded packet that came in there was
    /// counted there. Alone, it is the value agents before link types wrote.
    pub const INGRESS_HOOKED: u8 = 1;
    /// The interface has no link-layer header: packets start at the IP header. Programs
    /// of this version know it from the program attached (`tc_*_ip`); those of earlier
    /// agents, whose pinned links a restart keeps, read it here.
    pub const NO_L2: u8 = 2;

    /// An interface's bit in `WATCHED_MASK`, the one value of which has the bits of every
    /// interface in `WATCHED`: a forwarded packet that came in on an interface whose bit
    /// is clear (one the agent does not watch, on a gateway watched on its WAN link) is
    /// counted at egress without a lookup in `WATCHED`.
    #[inline(always)]
    pub const fn mask_bit(ifindex: u32) -> u64 {
        1 << (ifindex % 64)
    }
}

/// Capacity of the flow map unless the agent asks for another with `--flow-map-size`.
pub const DEFAULT_FLOW_MAP_SIZE: u32 = 262_144;
