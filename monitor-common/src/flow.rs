//! The flow map's key and value.

/// One connection, whichever way its packets go: endpoint `a` is the smaller of the two
/// (address, port) pairs, so both directions of a connection share one map entry.
/// 8-byte aligned without padding: the same 40 bytes as when it was 2-byte aligned, which
/// the BPF target copied two bytes at a time.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct FlowKey {
    /// IPv4 addresses sit in the first four bytes, the rest zero.
    pub addr_a: [u8; 16],
    pub addr_b: [u8; 16],
    /// Host byte order. For ICMP: type and counterpart type (or code), as Zeek keys them.
    pub port_a: u16,
    pub port_b: u16,
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    pub _pad: [u8; 2],
}

// The flow map's key size, which maps pinned by earlier builds share.
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// Index into [`FlowValue::dir`].
pub const DIR_A_TO_B: usize = 0;
pub const DIR_B_TO_A: usize = 1;

/// What one direction of a connection carried, as on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DirStats {
    pub pkts: u64,
    /// IP header + payload of every packet (Zeek's `*_ip_bytes`, NetFlow octets).
    pub ip_bytes: u64,
    /// L4 payload.
    pub bytes: u64,
    /// `bpf_ktime_get_ns` of the first and last packet; 0 when none was seen. The last is
    /// read from the clock as of the last tick (up to one tick early) unless that packet
    /// was the first or carried FIN or RST.
    pub first_ns: u64,
    pub last_ns: u64,
    /// Union of the TCP flags seen. With `syn_only`, `awaiting_hello` and `_pad`, the low
    /// bytes of one aligned little-endian u64 that the kernel programs update with a
    /// single atomic OR.
    pub tcp_flags: u8,
    /// 1 when a SYN without ACK was seen: its sender is the originator.
    pub syn_only: u8,
    /// 1 until this direction's first payload, which the programs then offer the agent
    /// as a TLS hello: from a SYN without ACK (a reused address and port pair arms it
    /// again), and, both ways, from the making of a TCP entry by any packet (the agent
    /// may have taken a finished connection's entry during the next opening of its
    /// pair); 0 in maps written by builds before it, as padding.
    pub awaiting_hello: u8,
    pub _pad: u8,
    /// The interface whose ingress last found this direction's source routed back through
    /// it (the reverse-path check); 0 before a check. Packets arriving there are not
    /// checked again.
    pub source_checked_on: u32,
}

/// Value of the flow map: one per connection, shared by the CPUs. The kernel programs
/// count with atomic adds, set `first_ns` once with a compare-and-swap and the flags with
/// an atomic OR, so packets counted on several CPUs at once are never lost.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowValue {
    pub dir: [DirStats; 2],
    /// Interface of the packet that created the entry.
    pub ifindex: u32,
    /// The agent's poll epoch (`EPOCH`) in which the programs last put this entry's key
    /// in `CHANGED`, with [`EPOCH_WITH_VALUE`] when that record carried the value; 0 until
    /// then (and in maps written by builds before that ring, as padding).
    pub epoch: u32,
}

/// Set in [`FlowValue::epoch`] beside the epoch when the programs named the entry as new
/// ([`NewEntry`]): a later write in the same epoch names it again. The agent's epochs stay
/// below it.
pub const EPOCH_WITH_VALUE: u32 = 1 << 31;

/// An entry of the `CHANGED` ring: a key whose entry changed, and the poll epoch the
/// programs saw when they put it there.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ChangedKey {
    pub key: FlowKey,
    pub epoch: u32,
    pub _pad: u32,
}

/// An entry of the `NEW_ENTRIES` ring: an entry no program had named before (a new
/// connection) and its value as of the record, every earlier write included. Any later
/// write puts the key in `CHANGED`, so a read that finds only this record for a key has
/// its value without looking it up.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NewEntry {
    pub changed: ChangedKey,
    pub value: FlowValue,
}

/// Size of the `CHANGED` ring in bytes (a power of two): with the kernel's 8-byte record
/// header, about 74,000 keys between two polls.
pub const CHANGED_RING_BYTES: u32 = 4 << 20;

/// Size of the `NEW_ENTRIES` ring in bytes (a power of two): about 52,000 new connections
/// between two polls; those beyond go in `CHANGED` as keys.
pub const NEW_ENTRIES_RING_BYTES: u32 = 8 << 20;

pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

impl DirStats {
    pub const ZERO: Self = Self {
        pkts: 0,
        ip_bytes: 0,
        bytes: 0,
        first_ns: 0,
        last_ns: 0,
        tcp_flags: 0,
        syn_only: 0,
        awaiting_hello: 0,
        _pad: 0,
        source_checked_on: 0,
    };
}

impl FlowValue {
    pub const ZERO: Self = Self {
        dir: [DirStats::ZERO; 2],
        ifindex: 0,
        epoch: 0,
    };

    /// A new TCP entry: awaiting its first payload both ways.
    pub const NEW_TCP: Self = {
        let mut value = Self::ZERO;
        value.dir[0].awaiting_hello = 1;
        value.dir[1].awaiting_hello = 1;
        value
    };
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain #[repr(C)] data with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
}
