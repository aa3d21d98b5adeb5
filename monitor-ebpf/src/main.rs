//! Kernel programs: count every connection's packets and bytes as on the wire.
//!
//! They never drop or change a packet: every path ends in `XDP_PASS` / `TC_ACT_OK`.
#![no_std]
#![no_main]
// Atomic adds, OR and compare-and-swap on the shared flow map: see `atomic`.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

mod owner;

use core::sync::atomic::{Ordering, compiler_fence};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        __sk_buff, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST, TC_ACT_OK,
        bpf_fib_lookup, xdp_action, xdp_md,
    },
    helpers::{
        bpf_ktime_get_coarse_ns, bpf_ktime_get_ns,
        generated::{bpf_fib_lookup as fib_lookup, bpf_skb_load_bytes, bpf_xdp_load_bytes},
    },
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{TcContext, XdpContext},
};
use monitor_common::{
    DEFAULT_FLOW_MAP_SIZE, MAX_WATCHED_IFACES,
    dns::{
        DIRECTION_EGRESS, DIRECTION_INGRESS, DNS_CAPTURE_MAX, DNS_RING_BYTES, DnsEvent,
        DnsEventHeader, dns_span, flags as dns_flags, is_dns_port,
    },
    flow::{
        CHANGED_RING_BYTES, ChangedKey, DirStats, EPOCH_WITH_VALUE, FlowKey, FlowValue,
        NEW_ENTRIES_RING_BYTES, NewEntry, tcp_flags,
    },
    hello::{HELLO_CAPTURE_MAX, HELLO_RING_BYTES, HelloEvent, QUIC_MIN_INITIAL, is_hello},
    parse::{Frame, IPPROTO_TCP, Link, PacketInfo, parse_packet},
    stats, watched,
};

/// One value per connection, shared by the CPUs (every count an atomic add): a poll
/// copies one value per entry instead of one per CPU, and an insert initialises one.
/// Not LRU: a full map must refuse new connections (counted in `stats::FLOW_MAP_FULL`)
/// rather than silently evict one with its counts.
#[map(name = "FLOWS")]
static FLOWS: HashMap<FlowKey, FlowValue> = HashMap::with_max_entries(DEFAULT_FLOW_MAP_SIZE, 0);

#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::SLOTS, 0);

/// The agent's interfaces (ifindex -> `watched` bits), filled by the agent. A forwarded
/// packet that came in on one whose ingress is hooked was counted there: TC egress leaves
/// it alone, so a gateway watched on several interfaces counts each packet once.
#[map(name = "WATCHED")]
static WATCHED: HashMap<u32, u8> = HashMap::with_max_entries(MAX_WATCHED_IFACES, 0);

/// The bits of the interfaces in `WATCHED` (see [`watched::mask_bit`]), set by the agent
/// with each interface.
#[map(name = "WATCHED_MASK")]
static WATCHED_MASK: Array<u64> = Array::with_max_entries(1, 0);

/// DNS messages (port 53) for the agent; a full buffer counts `stats::DNS_EVENTS_LOST`.
#[map(name = "DNS_EVENTS")]
static DNS_EVENTS: RingBuf = RingBuf::with_byte_size(DNS_RING_BYTES, 0);

/// First payloads that may name the server (TLS ClientHello, QUIC Initial) for the agent.
#[map(name = "HELLO_EVENTS")]
static HELLO_EVENTS: RingBuf = RingBuf::with_byte_size(HELLO_RING_BYTES, 0);

/// First payloads not handed over because `HELLO_EVENTS` was full. A map of its own, not
/// a `STATS` slot, for the reason `CHANGES_LOST` is.
#[map(name = "HELLO_LOST")]
static HELLO_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The agent's poll epoch, raised by the agent before each read of `CHANGED`.
#[map(name = "EPOCH")]
static EPOCH: Array<u32> = Array::with_max_entries(1, 0);

/// Keys of the entries that changed, each once per poll epoch, so the agent reads only
/// those; a full ring counts in `CHANGES_LOST` and the agent reads the whole map.
#[map(name = "CHANGED")]
static CHANGED: RingBuf = RingBuf::with_byte_size(CHANGED_RING_BYTES, 0);

/// New entries with their value, each once: the agent need not look up those that
/// `CHANGED` does not name as well. A full ring leaves them to `CHANGED`.
#[map(name = "NEW_ENTRIES")]
static NEW_ENTRIES: RingBuf = RingBuf::with_byte_size(NEW_ENTRIES_RING_BYTES, 0);

/// Changed entries whose key the full `CHANGED` ring could not take. A map of its own, not
/// a `STATS` slot: maps pinned by builds before it keep their size and are taken over.
#[map(name = "CHANGES_LOST")]
static CHANGES_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Scratch for the reverse-path lookup: its 64 bytes would not fit the stack beside the
/// parser's.
#[map(name = "FIB_PARAMS")]
static FIB_PARAMS: PerCpuArray<bpf_fib_lookup> = PerCpuArray::with_max_entries(1, 0);

/// The parsed packet, from the parser to what follows it. Read from a map, the verifier
/// knows nothing of it: every way through the parser (in the linear part, or copied; of
/// each protocol) then meets the same state at `counted`, which it follows once instead of
/// once per way.
#[map(name = "PARSED")]
static PARSED: PerCpuArray<PacketInfo> = PerCpuArray::with_max_entries(1, 0);

/// Inserted for a new connection; statics keep the 100-odd bytes off the 512-byte stack.
static ZERO_FLOW: FlowValue = FlowValue::ZERO;
static NEW_TCP_FLOW: FlowValue = FlowValue::NEW_TCP;

/// The linear part of a packet, read through bounds checks the verifier can follow.
struct Packet {
    start: usize,
    end: usize,
}

/// Larger than any header offset the parser reaches; keeps offsets provably bounded.
const MAX_HEADER_OFFSET: usize = 32 * 1024;

impl Frame for Packet {
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        if off > MAX_HEADER_OFFSET || self.start + off + N > self.end {
            return None;
        }
        // SAFETY: [start + off, start + off + N) lies inside the packet, checked above.
        Some(unsafe { core::ptr::read_unaligned((self.start + off) as *const [u8; N]) })
    }
}

#[inline(always)]
fn bump(slot: u32) {
    if let Some(counter) = STATS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot; only this CPU writes it while this program runs.
        unsafe { *counter += 1 };
    }
}

/// Copies packet bytes the way the hook allows: the helpers also reach data outside the
/// linear part of an skb or an XDP frame, and take offsets the verifier need not track.
/// The same context asks the routing table.
trait Copier {
    /// 0 on success.
    fn copy(&self, offset: u32, to: *mut u8, len: u32) -> i64;
    /// `bpf_fib_lookup` from this hook: a `BPF_FIB_LKUP_RET_*` code.
    fn route(&self, params: &mut bpf_fib_lookup) -> i64;
}

const FIB_PARAMS_LEN: i32 = core::mem::size_of::<bpf_fib_lookup>() as i32;

struct XdpCopier(*mut xdp_md);

impl Copier for XdpCopier {
    #[inline(always)]
    fn copy(&self, offset: u32, to: *mut u8, len: u32) -> i64 {
        // SAFETY: `to` points to at least `len` writable bytes.
        unsafe { bpf_xdp_load_bytes(self.0, offset, to.cast(), len) }
    }

    #[inline(always)]
    fn route(&self, params: &mut bpf_fib_lookup) -> i64 {
        // SAFETY: `params` is a whole bpf_fib_lookup.
        unsafe { fib_lookup(self.0.cast(), params, FIB_PARAMS_LEN, 0) }
    }
}

struct SkbCopier(*mut __sk_buff);

impl Copier for SkbCopier {
    #[inline(always)]
    fn copy(&self, offset: u32, to: *mut u8, len: u32) -> i64 {
        // SAFETY: as above.
        unsafe { bpf_skb_load_bytes(self.0.cast(), offset, to.cast(), len) }
    }

    #[inline(always)]
    fn route(&self, params: &mut bpf_fib_lookup) -> i64 {
        // SAFETY: as above.
        unsafe { fib_lookup(self.0.cast(), params, FIB_PARAMS_LEN, 0) }
    }
}

/// Whether a packet that came in on `ifindex` has a source the routing table reaches
/// through another interface (a strict reverse-path check, as `rp_filter=1` does): someone
/// on this side forged it. Where forwarding is off on the interface the kernel answers no
/// route, and the packet passes; so does an unspecified IPv4 source (DHCP). Not inlined:
/// the verifier follows its paths once per call, not once per way the parser took.
#[inline(never)]
fn spoofed<C: Copier>(info: &PacketInfo, ifindex: u32, copier: &C) -> bool {
    let Some(params) = FIB_PARAMS.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's scratch value, used by nothing else while this program runs.
    let params = unsafe { &mut *params };
    // SAFETY: plain data; all-zero is a valid lookup of nothing.
    *params = unsafe { core::mem::zeroed() };
    params.ifindex = ifindex;
    // The way back: from the packet's destination to its source.
    if info.family == 4 {
        let source = [info.src[0], info.src[1], info.src[2], info.src[3]];
        if source == [0; 4] {
            return false;
        }
        params.family = AF_INET;
        params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(source);
        params.__bindgen_anon_3.ipv4_src =
            u32::from_ne_bytes([info.dst[0], info.dst[1], info.dst[2], info.dst[3]]);
    } else {
        params.family = AF_INET6;
        // SAFETY: both are 16 bytes, as the addresses.
        unsafe {
            params.__bindgen_anon_4.ipv6_dst = core::mem::transmute::<[u8; 16], [u32; 4]>(info.src);
            params.__bindgen_anon_3.ipv6_src = core::mem::transmute::<[u8; 16], [u32; 4]>(info.dst);
        }
    }
    let found = copier.route(params);
    // No neighbour entry yet still names the interface the route leaves through.
    (found == i64::from(BPF_FIB_LKUP_RET_SUCCESS) || found == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH))
        && params.ifindex != ifindex
}

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Reads through a copier: what locating a DNS message needs, and headers beyond the
/// linear part of an skb.
struct Copied<'a, C>(&'a C);

impl<C: Copier> Frame for Copied<'_, C> {
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let mut out = [0u8; N];
        (self.0.copy(off as u32, out.as_mut_ptr(), N as u32) == 0).then_some(out)
    }
}

/// What a hook knows of a frame beside its bytes.
struct Seen {
    /// Includes L2.
    frame_len: u32,
    /// Wire segments the frame stands for.
    segs: u32,
    ifindex: u32,
    direction: u8,
}

/// [`counted`]'s flag: the packet was the first of its connection's direction.
const FIRST_IN_DIRECTION: u32 = 1 << 31;

/// Counts one frame. Returns whether it was the first of its connection's direction.
#[inline(always)]
fn count<C: Copier>(pkt: &Packet, link: Link, seen: &Seen, copier: &C) -> bool {
    let parsed = match parse_packet(pkt, link) {
        // An skb built from pages (AF_PACKET, tun, some drivers) may hold no more than the
        // link-layer header in its linear part: the helper reads the rest. Only packets
        // that fail directly pay for it.
        Err(_) if ((pkt.end - pkt.start) as u32) < seen.frame_len => {
            parse_packet(&Copied(copier), link)
        }
        parsed => parsed,
    };
    let info = match parsed {
        Ok(info) => info,
        Err(reason) => {
            bump(reason);
            return false;
        }
    };
    let Some(slot) = PARSED.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's scratch value, used by nothing else while this program runs.
    unsafe { *slot = info };
    // Here, not in `counted`: the calls from there would pass the 512 stack bytes they
    // may use together. So the copy follows the counts by the time it takes; a poll whose
    // map read falls in between finds it unless it is not in the ring yet when the poll
    // drains the ring, a little after that read.
    let outcome = counted(seen, copier);
    let first_payload = outcome & !FIRST_IN_DIRECTION;
    if first_payload != 0 {
        copy_hello(seen, copier, first_payload);
    }
    outcome & FIRST_IN_DIRECTION != 0
}

/// Everything after parsing, for the packet in [`PARSED`]. Returns the payload length of
/// a connection's first payload from its originator, else 0, with
/// [`FIRST_IN_DIRECTION`] set if the packet was the first of its direction.
#[inline(never)]
fn counted<C: Copier>(seen: &Seen, copier: &C) -> u32 {
    let Some(info) = PARSED.get_ptr(0) else {
        return 0;
    };
    // SAFETY: as in `count`.
    let info = unsafe { &*info };
    let outcome = match account(info, seen, copier) {
        Some(outcome) => outcome,
        None => {
            bump(stats::SPOOFED_SOURCE);
            return 0;
        }
    };
    if info.ip_len_exceeds_frame(seen.frame_len, seen.segs) {
        bump(stats::IP_LEN_EXCEEDS_FRAME);
    }
    if is_dns_port(info) {
        copy_dns(info, seen, copier);
    }
    outcome
}

/// Hands a DNS message to the agent. Never touches the packet.
#[inline(always)]
fn copy_dns<C: Copier>(info: &PacketInfo, seen: &Seen, copier: &C) {
    let Some(span) = dns_span(&Copied(copier), info, seen.frame_len) else {
        return;
    };
    let Some(mut entry) = DNS_EVENTS.reserve::<DnsEvent>(0) else {
        return bump(stats::DNS_EVENTS_LOST);
    };
    let mut len = span.present;
    if len > DNS_CAPTURE_MAX as u32 {
        len = DNS_CAPTURE_MAX as u32;
    }
    let event = entry.as_mut_ptr();
    let mut flags = span.flags;
    // SAFETY: `event` is the reserved entry, large enough for a DnsEvent; `len` is at
    // most the size of its data array.
    unsafe {
        if len > 0 && copier.copy(span.offset, (*event).data.as_mut_ptr(), len) != 0 {
            flags |= dns_flags::COPY_FAILED;
            len = 0;
        }
        write_header(
            &raw mut (*event).header,
            info,
            seen,
            flags,
            span.msg_len,
            len,
        );
    }
    entry.submit(0);
}

/// Fills a ring entry's header in place: built on the stack, it would cost the calls
/// that reach here bytes of the 512 they may use together.
///
/// SAFETY: `header` points to a reserved ring entry's header.
#[inline(always)]
unsafe fn write_header(
    header: *mut DnsEventHeader,
    info: &PacketInfo,
    seen: &Seen,
    flags: u8,
    msg_len: u32,
    captured_len: u32,
) {
    // SAFETY: as the caller promised.
    unsafe {
        (*header).ts_ns = bpf_ktime_get_ns();
        (*header).src = info.src;
        (*header).dst = info.dst;
        (*header).sport = info.sport;
        (*header).dport = info.dport;
        (*header).ifindex = seen.ifindex;
        (*header).family = info.family;
        (*header).proto = info.proto;
        (*header).direction = seen.direction;
        (*header).flags = flags;
        (*header).msg_len = msg_len as u16;
        (*header).captured_len = captured_len as u16;
    }
}

/// Hands the first payload of a new connection, the packet in [`PARSED`], to the agent
/// when it may name the server (see [`is_hello`]). Never touches the packet. Not inlined:
/// only first payloads call it, and the verifier follows it once.
#[inline(never)]
fn copy_hello<C: Copier>(seen: &Seen, copier: &C, payload: u32) {
    let Some(info) = PARSED.get_ptr(0) else {
        return;
    };
    // SAFETY: as in `count`.
    let info = unsafe { &*info };
    let offset = info.l2_len + info.hdr_len;
    if !is_hello(&Copied(copier), info, offset) {
        return;
    }
    let Some(mut entry) = HELLO_EVENTS.reserve::<HelloEvent>(0) else {
        if let Some(lost) = HELLO_LOST.get_ptr_mut(0) {
            // SAFETY: a per-CPU slot; only this CPU writes it while this program runs.
            unsafe { *lost += 1 };
        }
        return;
    };
    // The caller passes a payload, which LLVM knows and the verifier does not: read
    // afresh, clamped from below too, the verifier sees the copy is never empty.
    // SAFETY: a local.
    let payload = unsafe { core::ptr::read_volatile(&payload) };
    let mut len = payload.clamp(1, HELLO_CAPTURE_MAX as u32);
    let event = entry.as_mut_ptr();
    let mut flags = 0;
    // SAFETY: `event` is the reserved entry, large enough for a HelloEvent; `len` is at
    // most the size of its data array.
    unsafe {
        if copier.copy(offset, (*event).data.as_mut_ptr(), len) != 0 {
            flags = dns_flags::COPY_FAILED;
            len = 0;
        }
        write_header(&raw mut (*event).header, info, seen, flags, payload, len);
    }
    entry.submit(0);
}

/// Read-modify-write instructions on memory that other CPUs write at the same time.
/// `AtomicU64::fetch_add` and its kin do not exist on the BPF target (rustc's target has
/// no compare-and-swap), so the intrinsics are called directly: with the result unused,
/// LLVM emits `BPF_ATOMIC | BPF_DW` add and or (`lock xadd` / `lock or` once JITed), and
/// `BPF_CMPXCHG`. The host build exists for clippy alone.
mod atomic {
    #[cfg(target_arch = "bpf")]
    use core::intrinsics::{AtomicOrdering::Relaxed, atomic_cxchg, atomic_or, atomic_xadd};
    #[cfg(not(target_arch = "bpf"))]
    use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

    /// `*dst += value`. SAFETY: `dst` is valid and 8-byte aligned.
    #[inline(always)]
    pub unsafe fn add(dst: *mut u64, value: u64) {
        #[cfg(target_arch = "bpf")]
        // SAFETY: as the caller promised.
        unsafe {
            atomic_xadd::<u64, u64, { Relaxed }>(dst, value)
        };
        #[cfg(not(target_arch = "bpf"))]
        // SAFETY: as the caller promised.
        unsafe { AtomicU64::from_ptr(dst) }.fetch_add(value, Relaxed);
    }

    /// `*dst |= bits`. SAFETY: as for [`add`].
    #[inline(always)]
    pub unsafe fn or(dst: *mut u64, bits: u64) {
        #[cfg(target_arch = "bpf")]
        // SAFETY: as the caller promised.
        unsafe {
            atomic_or::<u64, u64, { Relaxed }>(dst, bits)
        };
        #[cfg(not(target_arch = "bpf"))]
        // SAFETY: as the caller promised.
        unsafe { AtomicU64::from_ptr(dst) }.fetch_or(bits, Relaxed);
    }

    /// `*dst = value` if `*dst` is still 0. SAFETY: as for [`add`].
    #[inline(always)]
    pub unsafe fn set_if_zero(dst: *mut u64, value: u64) {
        #[cfg(target_arch = "bpf")]
        // SAFETY: as the caller promised.
        unsafe {
            atomic_cxchg::<u64, { Relaxed }, { Relaxed }>(dst, 0, value)
        };
        #[cfg(not(target_arch = "bpf"))]
        // SAFETY: as the caller promised.
        let _ = unsafe { AtomicU64::from_ptr(dst) }.compare_exchange(0, value, Relaxed, Relaxed);
    }
}

// `tcp_flags`, `syn_only` and `awaiting_hello` are the three low bytes of one aligned
// little-endian word: one atomic OR sets them, and leaves the word's other bytes
// (`source_checked_on`) as they are.
const _: () = {
    assert!(core::mem::offset_of!(DirStats, tcp_flags) % 8 == 0);
    assert!(
        core::mem::offset_of!(DirStats, syn_only) == core::mem::offset_of!(DirStats, tcp_flags) + 1
    );
    assert!(
        core::mem::offset_of!(DirStats, awaiting_hello)
            == core::mem::offset_of!(DirStats, tcp_flags) + 2
    );
};
const SYN_ONLY_BIT: u64 = 1 << 8;
const AWAITING_HELLO_BIT: u64 = 1 << 16;

/// Counts the packet in its connection's entry, made if new; `None` for a forged source,
/// else the payload length when the packet is the first payload from the connection's
/// originator (0 when not).
///
/// An ingress packet's source is checked against the routing table when its connection
/// is new and when its direction arrives on an interface other than the one that last
/// passed the check: a known connection's packets pay for one comparison, and a forger
/// cannot add to a connection from the side its source is not routed through.
#[inline(always)]
fn account<C: Copier>(info: &PacketInfo, seen: &Seen, copier: &C) -> Option<u32> {
    let (ifindex, ingress) = (seen.ifindex, seen.direction == DIRECTION_INGRESS);
    let mut source_checked = false;
    let (key, dir) = info.flow_key();
    let value = match FLOWS.get_ptr_mut(&key) {
        Some(value) => value,
        None => {
            if ingress {
                if spoofed(info, ifindex, copier) {
                    return None;
                }
                source_checked = true;
            }
            // Another CPU may have inserted the key meanwhile (EEXIST): the lookup below
            // still finds it. Only a full map leaves no entry.
            let new = if info.proto == IPPROTO_TCP {
                &NEW_TCP_FLOW
            } else {
                &ZERO_FLOW
            };
            let inserted = FLOWS.insert(&key, new, BPF_NOEXIST as u64).is_ok();
            match FLOWS.get_ptr_mut(&key) {
                Some(value) => {
                    if inserted {
                        // SAFETY: the entry this CPU created; no other CPU writes ifindex.
                        unsafe { (*value).ifindex = ifindex };
                    }
                    value
                }
                None => {
                    bump(stats::FLOW_MAP_FULL);
                    return Some(0);
                }
            }
        }
    };
    // SAFETY: a field of the map's entry.
    let d: *mut DirStats = unsafe {
        if dir == 0 {
            &raw mut (*value).dir[0]
        } else {
            &raw mut (*value).dir[1]
        }
    };
    if ingress {
        // SAFETY: as above; CPUs racing here store the same interface.
        unsafe {
            let checked_on = &raw mut (*d).source_checked_on;
            if checked_on.read_volatile() != ifindex {
                if !source_checked && spoofed(info, ifindex, copier) {
                    return None;
                }
                checked_on.write_volatile(ifindex);
            }
        }
    }
    let (pkts, ip_bytes, bytes) = info.wire_counts(seen.frame_len, seen.segs);
    // SAFETY: a field of the map's entry; CPUs racing with a direction's first packets
    // may each see none before theirs.
    let first = unsafe { (&raw const (*d).pkts).read_volatile() } == 0;
    // The one test every other packet pays: whether its direction awaits its first
    // payload (TCP: since its SYN or the entry's making; UDP: a flow's first datagram,
    // nothing came back yet, if long enough for a QUIC Initial).
    // SAFETY: fields of the map's entry. Clearing `awaiting_hello` with a plain store of
    // its byte leaves the other bytes of its word to the atomic ORs of other CPUs; two
    // CPUs racing here with a payload each both copy theirs.
    let opens = bytes != 0
        && unsafe {
            if info.proto == IPPROTO_TCP {
                let awaiting = &raw mut (*d).awaiting_hello;
                let armed = awaiting.read_volatile() != 0;
                if armed {
                    awaiting.write_volatile(0);
                }
                armed
            } else {
                let other = if dir == 0 { 1 } else { 0 };
                bytes >= QUIC_MIN_INITIAL
                    && (&raw const (*d).bytes).read_volatile() == 0
                    && (&raw const (*value).dir[other].pkts).read_volatile() == 0
            }
        };
    // SAFETY: `value` is the map's entry, which other CPUs update at the same time: every
    // read-modify-write below is atomic. Fields are 8-byte aligned (#[repr(C)] of u64s).
    unsafe {
        atomic::add(&raw mut (*d).pkts, pkts);
        atomic::add(&raw mut (*d).ip_bytes, ip_bytes);
        atomic::add(&raw mut (*d).bytes, bytes);
        stamp(d, info.tcp_flags);
        let mut bits = u64::from(info.tcp_flags);
        if info.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN {
            bits |= SYN_ONLY_BIT | AWAITING_HELLO_BIT;
        }
        let flags = (&raw mut (*d).tcp_flags).cast::<u64>();
        if flags.read_volatile() & bits != bits {
            atomic::or(flags, bits);
        }
    }
    mark_changed(&key, value);
    let first_payload = if opens { bytes as u32 } else { 0 };
    Some(if first {
        first_payload | FIRST_IN_DIRECTION
    } else {
        first_payload
    })
}

/// Times a packet in its direction's `first_ns` and `last_ns`. The precise clock costs more
/// than the rest of a known connection's update: it times a direction's first packet and a
/// close. Every other packet reads the clock as of the last tick, so `last_ns` can be up to
/// one tick early.
#[inline(always)]
fn stamp(d: *mut DirStats, tcp_flags: u8) {
    // SAFETY: `d` is a direction of the map's entry (8-byte aligned fields).
    unsafe {
        let first = &raw mut (*d).first_ns;
        let last = &raw mut (*d).last_ns;
        let now = if first.read_volatile() == 0 {
            let now = bpf_ktime_get_ns();
            // Set once: a CPU racing the one that sets it read the clock a few ns apart.
            atomic::set_if_zero(first, now);
            now
        } else if tcp_flags & (tcp_flags::FIN | tcp_flags::RST) != 0 {
            bpf_ktime_get_ns()
        } else {
            bpf_ktime_get_coarse_ns()
        };
        // Forward only: a tick-old reading after a precise one would put the last packet
        // before the first. CPUs racing here differ by the few ns between their clock reads
        // and stores.
        if last.read_volatile() < now {
            last.write_volatile(now);
        }
    }
}

/// Puts the key of an entry just written in `CHANGED`, unless it is there already for
/// this poll epoch. After every write to the entry: a read that follows the ring's record
/// sees them all, and a later write in the same epoch is read after the next epoch starts
/// (the agent reads again next poll the keys that carry its current epoch). Two CPUs may
/// both put the key: the agent reads it once.
///
/// An entry no program named before goes in `NEW_ENTRIES` instead, with its value, marked
/// so that the next write, even in the same epoch, puts it in `CHANGED`: a connection of
/// one packet costs the agent no lookup.
#[inline(always)]
fn mark_changed(key: &FlowKey, value: *mut FlowValue) {
    let Some(current) = EPOCH.get_ptr(0) else {
        return;
    };
    // SAFETY: `current` is the array's value; `value` the flow map's entry, whose epoch
    // only this function writes (a lost race puts the key twice).
    let (epoch, new) = unsafe {
        let epoch = current.read_volatile();
        let marked = &raw mut (*value).epoch;
        let was = marked.read_volatile();
        if was == epoch {
            return;
        }
        let new = was == 0;
        marked.write_volatile(if new { epoch | EPOCH_WITH_VALUE } else { epoch });
        (epoch, new)
    };
    if new && let Some(mut entry) = NEW_ENTRIES.reserve::<NewEntry>(0) {
        let record = entry.as_mut_ptr();
        // SAFETY: the reserved entry, the size of a NewEntry; every field is written. The
        // value is read after its mark is set: a write the copy misses finds the mark, or,
        // racing this one, puts a record of its own.
        unsafe {
            changed_key(&raw mut (*record).changed, key, epoch);
            compiler_fence(Ordering::SeqCst);
            // From the entry to the record directly: a copy on the stack would not fit.
            core::ptr::copy_nonoverlapping(value, &raw mut (*record).value, 1);
        }
        entry.submit(0);
        return;
    }
    let Some(mut entry) = CHANGED.reserve::<ChangedKey>(0) else {
        if let Some(lost) = CHANGES_LOST.get_ptr_mut(0) {
            // SAFETY: a per-CPU slot; only this CPU writes it while this program runs.
            unsafe { *lost += 1 };
        }
        return;
    };
    // SAFETY: the reserved entry, the size of a ChangedKey.
    unsafe { changed_key(entry.as_mut_ptr(), key, epoch) };
    entry.submit(0);
}

/// Fills a record's key part.
///
/// # Safety
/// `record` points to a reserved ring entry at least the size of a `ChangedKey`.
#[inline(always)]
unsafe fn changed_key(record: *mut ChangedKey, key: &FlowKey, epoch: u32) {
    // SAFETY: as the caller promises.
    unsafe {
        (*record).key = *key;
        (*record).epoch = epoch;
        (*record)._pad = 0;
    }
}

#[xdp]
fn xdp_ingress(ctx: XdpContext) -> u32 {
    let pkt = Packet {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    // SAFETY: the context pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    // Native XDP sees wire frames, one segment each: the header's length counts, and the
    // frame's where the header has none (generic XDP on a BIG TCP aggregate).
    let frame_len = (pkt.end - pkt.start) as u32;
    let copier = XdpCopier(ctx.ctx);
    // The agent hooks only Ethernet devices with XDP.
    let link = Link::Ethernet { stripped_tags: 0 };
    let seen = Seen {
        frame_len,
        segs: 1,
        ifindex,
        direction: DIRECTION_INGRESS,
    };
    count(&pkt, link, &seen, &copier);
    xdp_action::XDP_PASS
}

/// The TC programs come in two kinds, chosen per interface when the agent attaches them:
/// for interfaces with an Ethernet header, and for those whose packets start at the IP
/// header (tun, WireGuard, PPP). Knowing it at load costs a packet no map lookup.
#[classifier]
fn tc_ingress(ctx: TcContext) -> i32 {
    count_skb(&ctx, DIRECTION_INGRESS, false);
    TC_ACT_OK
}

#[classifier]
fn tc_ingress_ip(ctx: TcContext) -> i32 {
    count_skb(&ctx, DIRECTION_INGRESS, true);
    TC_ACT_OK
}

#[classifier]
fn tc_egress(ctx: TcContext) -> i32 {
    count_egress(&ctx, false);
    TC_ACT_OK
}

#[classifier]
fn tc_egress_ip(ctx: TcContext) -> i32 {
    count_egress(&ctx, true);
    TC_ACT_OK
}

#[inline(always)]
fn count_egress(ctx: &TcContext, no_l2: bool) {
    let skb = ctx.as_ptr() as *const __sk_buff;
    // SAFETY: the context pointer is valid for the program's run. ingress_ifindex is 0
    // for locally sent packets.
    let came_in = unsafe { (*skb).ingress_ifindex };
    if (came_in == 0 || !counted_at_ingress(came_in))
        && count_skb(ctx, DIRECTION_EGRESS, no_l2)
        && let Some(info) = PARSED.get_ptr(0)
    {
        owner::report(skb, info);
    }
}

/// Whether a forwarded packet that came in on `ifindex` was counted there: the agent
/// hooks that interface's ingress. Most came in on one the agent does not watch, whose
/// bit in `WATCHED_MASK` says so without a lookup in `WATCHED`.
#[inline(always)]
fn counted_at_ingress(ifindex: u32) -> bool {
    let mask = WATCHED_MASK.get(0).copied().unwrap_or(u64::MAX);
    // SAFETY: a plain read of a value the agent wrote.
    mask & watched::mask_bit(ifindex) != 0
        && unsafe { WATCHED.get(&ifindex) }.is_some_and(|bits| bits & watched::INGRESS_HOOKED != 0)
}

/// A TC skb may be a GSO/GRO aggregate: `gso_segs` says how many wire segments it is.
/// Returns whether it was the first packet of its connection's direction.
#[inline(always)]
fn count_skb(ctx: &TcContext, direction: u8, no_l2: bool) -> bool {
    let skb = ctx.as_ptr() as *const __sk_buff;
    // SAFETY: the context pointer is valid for the program's run.
    let (len, segs, ifindex, vlan_present, protocol) = unsafe {
        (
            (*skb).len,
            (*skb).gso_segs,
            (*skb).ifindex,
            (*skb).vlan_present,
            (*skb).protocol,
        )
    };
    let pkt = Packet {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let link = if no_l2 {
        // The kernel's word on what the packet is (tun's packet information, PPP's
        // protocol field, the tunnel's inner type), in network byte order.
        Link::Ip {
            protocol: u16::from_be(protocol as u16),
        }
    } else {
        // On receive the kernel moves the outer VLAN tag into the skb (vlan_present); the
        // wire frame still had it. Its 4 bytes are L2, which no count includes.
        Link::Ethernet {
            stripped_tags: if vlan_present != 0 { 1 } else { 0 },
        }
    };
    let seen = Seen {
        frame_len: len,
        segs,
        ifindex,
        direction,
    };
    count(&pkt, link, &seen, &SkbCopier(ctx.as_ptr().cast()))
}

// On the host (clippy), a dependency brings std and its handler.
#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
