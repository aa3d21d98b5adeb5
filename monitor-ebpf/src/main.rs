//! Kernel programs: count every connection's packets and bytes as on the wire.
//!
//! They never drop or change a packet: every path ends in `XDP_PASS` / `TC_ACT_OK`.
#![no_std]
#![no_main]
// Atomic adds, OR and compare-and-swap on the shared flow map: see `atomic`.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

use aya_ebpf::{
    EbpfContext,
    bindings::{
        __sk_buff, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_NOEXIST, TC_ACT_OK,
        bpf_fib_lookup, xdp_action, xdp_md,
    },
    helpers::{
        bpf_ktime_get_ns,
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
    flow::{CHANGED_RING_BYTES, ChangedKey, DirStats, FlowKey, FlowValue, tcp_flags},
    parse::{Frame, Link, PacketInfo, parse_packet},
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
/// it alone, so a gateway watched on several interfaces counts each packet once. On one
/// without a link-layer header, the TC programs parse from the IP header.
#[map(name = "WATCHED")]
static WATCHED: HashMap<u32, u8> = HashMap::with_max_entries(MAX_WATCHED_IFACES, 0);

/// DNS messages (port 53) for the agent; a full buffer counts `stats::DNS_EVENTS_LOST`.
#[map(name = "DNS_EVENTS")]
static DNS_EVENTS: RingBuf = RingBuf::with_byte_size(DNS_RING_BYTES, 0);

/// The agent's poll epoch, raised by the agent before each read of `CHANGED`.
#[map(name = "EPOCH")]
static EPOCH: Array<u32> = Array::with_max_entries(1, 0);

/// Keys of the entries that changed, each once per poll epoch, so the agent reads only
/// those; a full ring counts in `CHANGES_LOST` and the agent reads the whole map.
#[map(name = "CHANGED")]
static CHANGED: RingBuf = RingBuf::with_byte_size(CHANGED_RING_BYTES, 0);

/// Changed entries whose key the full `CHANGED` ring could not take. A map of its own, not
/// a `STATS` slot: maps pinned by builds before it keep their size and are taken over.
#[map(name = "CHANGES_LOST")]
static CHANGES_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Scratch for the reverse-path lookup: its 64 bytes would not fit the stack beside the
/// parser's.
#[map(name = "FIB_PARAMS")]
static FIB_PARAMS: PerCpuArray<bpf_fib_lookup> = PerCpuArray::with_max_entries(1, 0);

/// Inserted for a new connection; a static keeps the 100-odd bytes off the 512-byte stack.
static ZERO_FLOW: FlowValue = FlowValue::ZERO;

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
/// route, and the packet passes; so does an unspecified IPv4 source (DHCP) and a packet
/// that is not plain IP behind at most one VLAN tag. It reads the addresses on its own,
/// before the parser, in a function of its own: the verifier sees the parser's paths
/// start from one state, not one per way through this check.
#[inline(never)]
fn spoofed<C: Copier>(link: Link, ifindex: u32, copier: &C) -> bool {
    let at = |off: u32| {
        Copied(copier)
            .load::<2>(off as usize)
            .map(u16::from_be_bytes)
    };
    let (ethertype, l3) = match link {
        Link::Ip { protocol } => (protocol, 0),
        Link::Ethernet { .. } => match at(12) {
            Some(0x8100 | 0x88a8) => (at(16).unwrap_or(0), 18),
            Some(ethertype) => (ethertype, 14),
            None => return false,
        },
    };
    let Some(params) = FIB_PARAMS.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's scratch value, used by nothing else while this program runs.
    let params = unsafe { &mut *params };
    // SAFETY: plain data; all-zero is a valid lookup of nothing.
    *params = unsafe { core::mem::zeroed() };
    params.ifindex = ifindex;
    // The way back: from the packet's destination to its source.
    let copied = match ethertype {
        0x0800 => {
            params.family = AF_INET;
            // SAFETY: each field is 4 writable bytes.
            unsafe {
                copier.copy(l3 + 12, (&raw mut params.__bindgen_anon_4).cast(), 4) == 0
                    && copier.copy(l3 + 16, (&raw mut params.__bindgen_anon_3).cast(), 4) == 0
                    && params.__bindgen_anon_4.ipv4_dst != 0
            }
        }
        0x86dd => {
            params.family = AF_INET6;
            copier.copy(l3 + 8, (&raw mut params.__bindgen_anon_4).cast(), 16) == 0
                && copier.copy(l3 + 24, (&raw mut params.__bindgen_anon_3).cast(), 16) == 0
        }
        _ => false,
    };
    if !copied {
        return false;
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

/// Counts one frame standing for `segs` wire segments; `frame_len` includes L2.
#[inline(always)]
fn count<C: Copier>(
    pkt: &Packet,
    frame_len: u32,
    segs: u32,
    ifindex: u32,
    link: Link,
    hook: (u8, &C),
) {
    if hook.0 == DIRECTION_INGRESS && spoofed(link, ifindex, hook.1) {
        return bump(stats::SPOOFED_SOURCE);
    }
    let parsed = match parse_packet(pkt, link) {
        // An skb built from pages (AF_PACKET, tun, some drivers) may hold no more than the
        // link-layer header in its linear part: the helper reads the rest. Only packets
        // that fail directly pay for it.
        Err(_) if ((pkt.end - pkt.start) as u32) < frame_len => parse_packet(&Copied(hook.1), link),
        parsed => parsed,
    };
    let info = match parsed {
        Ok(info) => info,
        Err(reason) => return bump(reason),
    };
    if info.ip_len_exceeds_frame(frame_len, segs) {
        bump(stats::IP_LEN_EXCEEDS_FRAME);
    }
    if is_dns_port(&info) {
        copy_dns(&info, frame_len, ifindex, hook);
    }
    account(&info, frame_len, segs, ifindex);
}

/// Hands a DNS message to the agent. Never touches the packet.
#[inline(always)]
fn copy_dns<C: Copier>(
    info: &PacketInfo,
    frame_len: u32,
    ifindex: u32,
    (direction, copier): (u8, &C),
) {
    let Some(span) = dns_span(&Copied(copier), info, frame_len) else {
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
        (*event).header = DnsEventHeader {
            ts_ns: bpf_ktime_get_ns(),
            src: info.src,
            dst: info.dst,
            sport: info.sport,
            dport: info.dport,
            ifindex,
            family: info.family,
            proto: info.proto,
            direction,
            flags,
            msg_len: span.msg_len as u16,
            captured_len: len as u16,
        };
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

// `tcp_flags` and `syn_only` are the two low bytes of one aligned little-endian word
// (the rest is padding, always 0): one atomic OR sets both.
const _: () = {
    assert!(core::mem::offset_of!(DirStats, tcp_flags) % 8 == 0);
    assert!(
        core::mem::offset_of!(DirStats, syn_only) == core::mem::offset_of!(DirStats, tcp_flags) + 1
    );
};
const SYN_ONLY_BIT: u64 = 1 << 8;

#[inline(always)]
fn account(info: &PacketInfo, frame_len: u32, segs: u32, ifindex: u32) {
    let (key, dir) = info.flow_key();
    let value = match FLOWS.get_ptr_mut(&key) {
        Some(value) => value,
        None => {
            // Another CPU may have inserted the key meanwhile (EEXIST): the lookup below
            // still finds it. Only a full map leaves no entry.
            let inserted = FLOWS.insert(&key, &ZERO_FLOW, BPF_NOEXIST as u64).is_ok();
            match FLOWS.get_ptr_mut(&key) {
                Some(value) => {
                    if inserted {
                        // SAFETY: the entry this CPU created; no other CPU writes ifindex.
                        unsafe { (*value).ifindex = ifindex };
                    }
                    value
                }
                None => return bump(stats::FLOW_MAP_FULL),
            }
        }
    };
    let (pkts, ip_bytes, bytes) = info.wire_counts(frame_len, segs);
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: `value` is the map's entry, which other CPUs update at the same time: every
    // read-modify-write below is atomic. Fields are 8-byte aligned (#[repr(C)] of u64s).
    unsafe {
        let d: *mut DirStats = if dir == 0 {
            &raw mut (*value).dir[0]
        } else {
            &raw mut (*value).dir[1]
        };
        atomic::add(&raw mut (*d).pkts, pkts);
        atomic::add(&raw mut (*d).ip_bytes, ip_bytes);
        atomic::add(&raw mut (*d).bytes, bytes);
        // Set once: a CPU racing the one that sets it read the clock a few ns apart.
        let first = &raw mut (*d).first_ns;
        if first.read_volatile() == 0 {
            atomic::set_if_zero(first, now);
        }
        // CPUs racing here differ by the few ns between their clock reads and stores.
        (&raw mut (*d).last_ns).write_volatile(now);
        let mut bits = u64::from(info.tcp_flags);
        if info.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN {
            bits |= SYN_ONLY_BIT;
        }
        let flags = (&raw mut (*d).tcp_flags).cast::<u64>();
        if flags.read_volatile() & bits != bits {
            atomic::or(flags, bits);
        }
    }
    mark_changed(&key, value);
}

/// Puts the key of an entry just written in `CHANGED`, unless it is there already for
/// this poll epoch. After every write to the entry: a read that follows the ring's record
/// sees them all, and a later write in the same epoch is read after the next epoch starts
/// (the agent reads again next poll the keys that carry its current epoch). Two CPUs may
/// both put the key: the agent reads it once.
#[inline(always)]
fn mark_changed(key: &FlowKey, value: *mut FlowValue) {
    let Some(current) = EPOCH.get_ptr(0) else {
        return;
    };
    // SAFETY: `current` is the array's value; `value` the flow map's entry, whose epoch
    // only this function writes (a lost race puts the key twice).
    let epoch = unsafe {
        let epoch = current.read_volatile();
        let marked = &raw mut (*value).epoch;
        if marked.read_volatile() == epoch {
            return;
        }
        marked.write_volatile(epoch);
        epoch
    };
    let Some(mut entry) = CHANGED.reserve::<ChangedKey>(0) else {
        if let Some(lost) = CHANGES_LOST.get_ptr_mut(0) {
            // SAFETY: a per-CPU slot; only this CPU writes it while this program runs.
            unsafe { *lost += 1 };
        }
        return;
    };
    let changed = entry.as_mut_ptr();
    // SAFETY: the reserved entry, the size of a ChangedKey; every field is written.
    unsafe {
        (*changed).key = *key;
        (*changed).epoch = epoch;
        (*changed)._pad = 0;
    }
    entry.submit(0);
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
    count(
        &pkt,
        frame_len,
        1,
        ifindex,
        link,
        (DIRECTION_INGRESS, &copier),
    );
    xdp_action::XDP_PASS
}

#[classifier]
fn tc_ingress(ctx: TcContext) -> i32 {
    count_skb(&ctx, DIRECTION_INGRESS);
    TC_ACT_OK
}

#[classifier]
fn tc_egress(ctx: TcContext) -> i32 {
    let skb = ctx.as_ptr() as *const __sk_buff;
    // SAFETY: the context pointer is valid for the program's run. ingress_ifindex is 0
    // for locally sent packets.
    let came_in = unsafe { (*skb).ingress_ifindex };
    if came_in == 0 || watched_bits(came_in) & watched::INGRESS_HOOKED == 0 {
        count_skb(&ctx, DIRECTION_EGRESS);
    }
    TC_ACT_OK
}

/// The interface's `watched` bits; 0 when the agent does not watch it.
#[inline(always)]
fn watched_bits(ifindex: u32) -> u8 {
    // SAFETY: a plain read of a value the agent wrote.
    unsafe { WATCHED.get(&ifindex) }.copied().unwrap_or(0)
}

/// A TC skb may be a GSO/GRO aggregate: `gso_segs` says how many wire segments it is.
#[inline(always)]
fn count_skb(ctx: &TcContext, direction: u8) {
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
    let link = if watched_bits(ifindex) & watched::NO_L2 != 0 {
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
    let copier = SkbCopier(ctx.as_ptr().cast());
    count(&pkt, len, segs, ifindex, link, (direction, &copier));
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
