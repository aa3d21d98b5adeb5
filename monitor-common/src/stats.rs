//! Slots of the per-CPU `STATS` array: why packets were not parsed, and updates lost to
//! a full flow map or ring buffer.

pub const TRUNCATED_ETHERNET: u32 = 0;
pub const TRUNCATED_VLAN: u32 = 1;
pub const VLAN_TOO_DEEP: u32 = 2;
pub const NOT_IP: u32 = 3;
pub const TRUNCATED_IPV4: u32 = 4;
pub const BAD_IPV4_HEADER: u32 = 5;
pub const TRUNCATED_IPV6: u32 = 6;
pub const TRUNCATED_IPV6_EXT: u32 = 7;
pub const IPV6_EXT_LIMIT: u32 = 8;
pub const TRUNCATED_TCP: u32 = 9;
pub const BAD_TCP_HEADER: u32 = 10;
pub const TRUNCATED_UDP: u32 = 11;
pub const TRUNCATED_ICMP: u32 = 12;
/// Not a parse failure: a new connection that found the flow map full.
pub const FLOW_MAP_FULL: u32 = 13;
/// Not a parse failure: a DNS message not copied because the ring buffer was full.
pub const DNS_EVENTS_LOST: u32 = 14;
pub const SLOTS: u32 = 15;

/// The `reason` label of `packets_unparsed_total`, indexed by slot.
pub const UNPARSED_REASONS: [&str; FLOW_MAP_FULL as usize] = [
    "truncated_ethernet",
    "truncated_vlan",
    "vlan_too_deep",
    "not_ip",
    "truncated_ipv4",
    "bad_ipv4_header",
    "truncated_ipv6",
    "truncated_ipv6_ext",
    "ipv6_ext_limit",
    "truncated_tcp",
    "bad_tcp_header",
    "truncated_udp",
    "truncated_icmp",
];
