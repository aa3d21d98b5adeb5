//! Slots of the per-CPU `STATS` array: why packets were not parsed or are malformed, and
//! updates lost to a full flow map or ring buffer. Slot numbers never change: pinned maps
//! and the agent must agree on them.

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
/// Malformed but counted: a single packet whose IP header claims more bytes than its frame
/// holds. It counts what the frame holds.
pub const IP_LEN_EXCEEDS_FRAME: u32 = 15;
/// Not counted: a packet that came in on an interface its source address is not routed
/// through (a strict reverse-path check), so its source is forged.
pub const SPOOFED_SOURCE: u32 = 16;
pub const SLOTS: u32 = 17;

/// The `reason` label of `packets_unparsed_total` of each slot that has one.
pub const UNPARSED_REASONS: [(u32, &str); 14] = [
    (TRUNCATED_ETHERNET, "truncated_ethernet"),
    (TRUNCATED_VLAN, "truncated_vlan"),
    (VLAN_TOO_DEEP, "vlan_too_deep"),
    (NOT_IP, "not_ip"),
    (TRUNCATED_IPV4, "truncated_ipv4"),
    (BAD_IPV4_HEADER, "bad_ipv4_header"),
    (TRUNCATED_IPV6, "truncated_ipv6"),
    (TRUNCATED_IPV6_EXT, "truncated_ipv6_ext"),
    (IPV6_EXT_LIMIT, "ipv6_ext_limit"),
    (TRUNCATED_TCP, "truncated_tcp"),
    (BAD_TCP_HEADER, "bad_tcp_header"),
    (TRUNCATED_UDP, "truncated_udp"),
    (TRUNCATED_ICMP, "truncated_icmp"),
    (IP_LEN_EXCEEDS_FRAME, "ip_len_exceeds_frame"),
];

/// The `reason` label of a slot, if it has one.
pub fn unparsed_reason(slot: u32) -> Option<&'static str> {
    UNPARSED_REASONS
        .iter()
        .find(|(s, _)| *s == slot)
        .map(|(_, reason)| *reason)
}
