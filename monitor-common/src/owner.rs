//! Which process owns a socket of the watched host. Programs that run in the owning
//! process when a socket is created, connects or binds keep the process in the
//! socket's storage; the TC egress program hands it to the agent, through the
//! `OWNER_EVENTS` ring buffer, with the key of each connection the socket opens.

use crate::flow::FlowKey;

/// Ring buffer size in bytes (a power of two): with the kernel's 8-byte record header,
/// about 3,600 events between two drains.
pub const OWNER_RING_BYTES: u32 = 256 << 10;

/// A process, as a socket's storage keeps it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Owner {
    /// The thread group (the process) and its user.
    pub tgid: u32,
    pub uid: u32,
    /// The cgroup v2 id: the inode number of its directory under the cgroup mount.
    pub cgroup: u64,
    /// The thread-group leader's `comm`, NUL-padded.
    pub comm: [u8; 16],
}

/// One connection's owner: the key is the flow map's, as the packet that opened the
/// connection (or a listener's reply to it) left.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OwnerEvent {
    pub key: FlowKey,
    pub owner: Owner,
}

/// Offsets, in bytes, of the `struct task_struct` fields the programs read to name the
/// thread-group leader. They differ between kernel builds, so the agent reads them from
/// the running kernel's BTF and sets them before loading; while 0, the programs name the
/// current thread instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TaskOffsets {
    pub group_leader: u32,
    pub comm: u32,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain #[repr(C)] data with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::TaskOffsets {}
}
