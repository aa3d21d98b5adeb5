//! Socket owners. Programs attached to the root cgroup run in the owning process when a
//! socket is created, connects or binds (a listener's children inherit nothing, but their
//! SYN-ACK leads back to the listener), and keep that process in the socket's storage.
//! When a watched interface's TC egress sees the first packet of a direction from a
//! socket of this host, it hands the agent the owner with the connection's key.
//! Forwarded packets have no socket.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{__sk_buff, BPF_SK_STORAGE_GET_F_CREATE},
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_get_current_uid_gid, bpf_probe_read_kernel,
        generated::{bpf_get_listener_sock, bpf_sk_fullsock, bpf_sk_storage_get},
    },
    macros::{btf_map, cgroup_sock, cgroup_sock_addr, map},
    maps::{PerCpuArray, RingBuf},
    programs::{SockAddrContext, SockContext},
};
use monitor_common::{
    owner::{OWNER_RING_BYTES, Owner, OwnerEvent, TaskOffsets},
    parse::PacketInfo,
};

/// Set by the agent before loading, from the running kernel's BTF.
#[unsafe(no_mangle)]
static TASK_OFFSETS: TaskOffsets = TaskOffsets {
    group_leader: 0,
    comm: 0,
};

/// Each socket's owner, freed with the socket.
#[btf_map]
static OWNERS: SkStorage<Owner> = SkStorage::new();

#[map(name = "OWNER_EVENTS")]
static OWNER_EVENTS: RingBuf = RingBuf::with_byte_size(OWNER_RING_BYTES, 0);

/// Owners not handed over because `OWNER_EVENTS` was full. A map of its own, not a
/// `STATS` slot, for the reason `CHANGES_LOST` is.
#[map(name = "OWNER_LOST")]
static OWNER_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The cgroup programs' verdict: the call goes on as it would without them.
const PROCEED: i32 = 1;

/// `connect()`: TCP's active open, or a datagram socket's peer. The owner is the caller.
#[cgroup_sock_addr(connect4)]
pub fn owner_connect4(ctx: SockAddrContext) -> i32 {
    keep(&ctx);
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn owner_connect6(ctx: SockAddrContext) -> i32 {
    keep(&ctx);
    PROCEED
}

/// `bind()`: a listener's owner, named when its SYN-ACKs leave.
#[cgroup_sock_addr(bind4)]
pub fn owner_bind4(ctx: SockAddrContext) -> i32 {
    keep(&ctx);
    PROCEED
}

#[cgroup_sock_addr(bind6)]
pub fn owner_bind6(ctx: SockAddrContext) -> i32 {
    keep(&ctx);
    PROCEED
}

/// `socket()`: every IPv4 and IPv6 socket starts owned by its creator, which is how a
/// datagram socket that neither binds nor connects (it sends to addresses) is named,
/// without a program in the path of each datagram.
#[cgroup_sock(sock_create)]
pub fn owner_sock_create(ctx: SockContext) -> i32 {
    let mut owner = current();
    // SAFETY: the context is the new socket; the storage is created with `owner`.
    unsafe {
        bpf_sk_storage_get(
            core::ptr::addr_of!(OWNERS) as *mut c_void,
            ctx.sock.cast(),
            (&raw mut owner).cast(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        );
    }
    PROCEED
}

fn keep(ctx: &SockAddrContext) {
    let mut owner = current();
    let slot = OWNERS.get_or_insert_ptr_mut(ctx, Some(&mut owner));
    if !slot.is_null() {
        // SAFETY: this socket's storage; the kernel holds the socket's lock here.
        unsafe { *slot = owner };
    }
}

/// The calling process, its user, cgroup and thread-group leader's name.
fn current() -> Owner {
    // SAFETY: helpers without pointer arguments.
    let (pid_tgid, uid_gid, cgroup) = unsafe {
        (
            bpf_get_current_pid_tgid(),
            bpf_get_current_uid_gid(),
            bpf_get_current_cgroup_id(),
        )
    };
    Owner {
        tgid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        cgroup,
        comm: leader_comm().unwrap_or_else(|| bpf_get_current_comm().unwrap_or_default()),
    }
}

/// `current->group_leader->comm`, at the offsets the agent set.
fn leader_comm() -> Option<[u8; 16]> {
    // SAFETY: a global the loader fills in, read-only to the programs.
    let offsets = unsafe { core::ptr::read_volatile(&TASK_OFFSETS) };
    if offsets.comm == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks each address; a bad one only fails the read.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let leader: *const u8 =
            bpf_probe_read_kernel(task.add(offsets.group_leader as usize).cast()).ok()?;
        bpf_probe_read_kernel(leader.add(offsets.comm as usize).cast()).ok()
    }
}

/// The first packet of a direction, leaving through TC egress: if a socket of this host
/// sent it (or, for a SYN-ACK, a listener's request), its owner goes to the agent with
/// the connection's key.
#[inline(never)]
pub fn report(skb: *const __sk_buff, info: *const PacketInfo) {
    // SAFETY: the context pointer is valid for the program's run.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: helpers that check the socket they are given.
    let holder = unsafe {
        let full = bpf_sk_fullsock(sk);
        if full.is_null() {
            bpf_get_listener_sock(sk)
        } else {
            full
        }
    };
    if holder.is_null() {
        return;
    }
    // SAFETY: a lookup (no create) in this program's storage map, of a full socket.
    let owner = unsafe {
        bpf_sk_storage_get(
            core::ptr::addr_of!(OWNERS) as *mut c_void,
            holder.cast(),
            core::ptr::null_mut(),
            0,
        )
    } as *const Owner;
    if owner.is_null() {
        return;
    }
    let Some(mut entry) = OWNER_EVENTS.reserve::<OwnerEvent>(0) else {
        if let Some(lost) = OWNER_LOST.get_ptr_mut(0) {
            // SAFETY: a per-CPU slot; only this CPU writes it while this program runs.
            unsafe { *lost += 1 };
        }
        return;
    };
    // SAFETY: the reserved record is ours until submitted; the owner is the storage's;
    // `info` is this CPU's scratch value, which the packet's count filled.
    unsafe {
        let event = entry.as_mut_ptr();
        (*event).key = (*info).flow_key().0;
        (*event).owner = *owner;
    }
    entry.submit(0);
}
