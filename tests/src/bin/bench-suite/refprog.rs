//! The reference programs the kernel figures are set against, assembled here rather than
//! shipped in the agent's object: a bare "pass" program, one that only bumps a per-CPU
//! counter (the least any counting program does), and the floor of per-connection
//! counting: one lookup of a key the size of the agent's flow key in a per-CPU hash map,
//! with and without reading the clock, and one insert of such a key; and the same in a
//! shared (not per-CPU) hash map, whose counters need atomic adds. For the in-place part,
//! all of it in one program: a counter per address and port pair in a shared hash map that
//! inserts the pairs it does not find.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd, RawFd},
};

use monitor::kernel::bpf::{self, Insn, RawMap, insn};

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
const BPF_FUNC_KTIME_GET_NS: i32 = 5;
const BPF_FUNC_MAP_UPDATE_ELEM: i32 = 2;
const BPF_NOEXIST: i32 = 1;
/// The agent's flow key: two 16-byte addresses, two ports, protocol, family, padding.
const FLOW_KEY_SIZE: usize = 40;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const XDP_PASS: i32 = 2;
const TC_ACT_OK: i32 = 0;

/// `BPF_STX | BPF_DW | BPF_ATOMIC` with `imm = BPF_ADD`: `lock *(u64 *)(dst + off) += src`.
const ATOMIC_ADD_DW: u8 = 0xdb;
const BPF_ADD: i32 = 0;

/// The flow map's kind in a reference program.
#[derive(Clone, Copy, Debug)]
pub enum Table {
    /// `BPF_MAP_TYPE_PERCPU_HASH`: each CPU writes its own copy, plain adds suffice.
    PerCpu,
    /// `BPF_MAP_TYPE_HASH`: one value for all CPUs, counted with atomic adds.
    Shared,
}

impl Table {
    fn map_type(self) -> u32 {
        match self {
            Table::PerCpu => BPF_MAP_TYPE_PERCPU_HASH,
            Table::Shared => BPF_MAP_TYPE_HASH,
        }
    }
}

/// The hook a reference program is loaded for.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Xdp,
    Tc,
}

impl Kind {
    /// Offsets of `data` and `data_end` in the program's context (`xdp_md`, `__sk_buff`).
    fn data_offsets(self) -> (i16, i16) {
        match self {
            Kind::Xdp => (0, 4),
            Kind::Tc => (76, 80),
        }
    }

    fn prog_type(self) -> u32 {
        match self {
            Kind::Xdp => BPF_PROG_TYPE_XDP,
            Kind::Tc => BPF_PROG_TYPE_SCHED_CLS,
        }
    }

    fn pass(self) -> i32 {
        match self {
            Kind::Xdp => XDP_PASS,
            Kind::Tc => TC_ACT_OK,
        }
    }
}

/// `r0 = PASS; exit`.
pub fn bare(kind: Kind) -> io::Result<OwnedFd> {
    load(
        kind,
        &[insn(0xb7, 0, 0, 0, kind.pass()), insn(0x95, 0, 0, 0, 0)],
    )
}

/// Looks up slot 0 of a one-entry per-CPU array, adds one, passes. Returns the program
/// and its map (kept open with it).
pub fn count_only(kind: Kind) -> io::Result<(OwnedFd, RawMap)> {
    let map = create_counter_map()?;
    let fd = map.as_fd().as_raw_fd();
    let prog = [
        // *(u32 *)(r10 - 4) = 0: the key.
        insn(0x62, 10, 0, -4, 0),
        // r2 = r10 - 4
        insn(0xbf, 2, 10, 0, 0),
        insn(0x07, 2, 0, 0, -4),
        // r1 = the map (ld_imm64, two slots)
        insn(0x18, 1, BPF_PSEUDO_MAP_FD, 0, fd),
        insn(0, 0, 0, 0, 0),
        // r0 = bpf_map_lookup_elem(r1, r2)
        insn(0x85, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM),
        // if r0 == 0 goto pass
        insn(0x15, 0, 0, 3, 0),
        // *(u64 *)r0 += 1
        insn(0x79, 1, 0, 0, 0),
        insn(0x07, 1, 0, 0, 1),
        insn(0x7b, 0, 1, 0, 0),
        // pass: r0 = PASS; exit
        insn(0xb7, 0, 0, 0, kind.pass()),
        insn(0x95, 0, 0, 0, 0),
    ];
    Ok((load(kind, &prog)?, map))
}

/// Looks up one 40-byte key (all zero, inserted beforehand) in a per-CPU hash map, adds
/// one to its count and, `with_clock`, stores `bpf_ktime_get_ns()` beside it: what any
/// per-connection counter does at the least. Returns the program and its map.
pub fn flow_lookup(kind: Kind, with_clock: bool) -> io::Result<(OwnedFd, RawMap)> {
    let map = create_map(BPF_MAP_TYPE_PERCPU_HASH, FLOW_KEY_SIZE as u32, 16)?;
    map.insert(&[0; FLOW_KEY_SIZE], &vec![0u8; map.value_stride()])?;
    let mut body = vec![
        // *(u64 *)r6 += 1
        insn(0x79, 1, 6, 0, 0),
        insn(0x07, 1, 0, 0, 1),
        insn(0x7b, 6, 1, 0, 0),
    ];
    if with_clock {
        // *(u64 *)(r6 + 8) = bpf_ktime_get_ns()
        body.push(insn(0x85, 0, 0, 0, BPF_FUNC_KTIME_GET_NS));
        body.push(insn(0x7b, 6, 0, 8, 0));
    }
    Ok((load(kind, &zero_key_lookup(kind, &map, body))?, map))
}

/// A program that looks up the all-zero 40-byte key in `map` and, when found, runs
/// `body` with r6 = the value; then passes the packet.
fn zero_key_lookup(kind: Kind, map: &RawMap, body: Vec<Insn>) -> Vec<Insn> {
    let mut prog = vec![
        // The key: fp-40 .. fp-1, zero.
        insn(0x7a, 10, 0, -40, 0),
        insn(0x7a, 10, 0, -32, 0),
        insn(0x7a, 10, 0, -24, 0),
        insn(0x7a, 10, 0, -16, 0),
        insn(0x7a, 10, 0, -8, 0),
        insn(0xbf, 2, 10, 0, 0),
        insn(0x07, 2, 0, 0, -(FLOW_KEY_SIZE as i32)),
        insn(0x18, 1, BPF_PSEUDO_MAP_FD, 0, map.as_fd().as_raw_fd()),
        insn(0, 0, 0, 0, 0),
        insn(0x85, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM),
        // if r0 == 0 skip the body; r6 = the value
        insn(0x15, 0, 0, body.len() as i16 + 1, 0),
        insn(0xbf, 6, 0, 0, 0),
    ];
    prog.extend(body);
    prog.push(insn(0xb7, 0, 0, 0, kind.pass()));
    prog.push(insn(0x95, 0, 0, 0, 0));
    prog
}

/// Looks up one 40-byte key (all zero, inserted beforehand) in a shared hash map with
/// values of `value_size` bytes, adds to three 64-bit counters atomically (packets, IP
/// bytes, payload bytes, as a flow's direction has) and, `with_clock`, stores
/// `bpf_ktime_get_ns()` beside them: what a per-connection counter on a map shared by the
/// CPUs does at the least. Returns the program and its map.
pub fn shared_flow_lookup(
    kind: Kind,
    value_size: u32,
    with_clock: bool,
) -> io::Result<(OwnedFd, RawMap)> {
    let map = create_map(BPF_MAP_TYPE_HASH, FLOW_KEY_SIZE as u32, value_size)?;
    map.insert(&[0; FLOW_KEY_SIZE], &vec![0u8; value_size as usize])?;
    let mut body = add_counts(Table::Shared);
    if with_clock {
        // *(u64 *)(r6 + 32) = bpf_ktime_get_ns(): the last packet's time.
        body.push(insn(0x85, 0, 0, 0, BPF_FUNC_KTIME_GET_NS));
        body.push(insn(0x7b, 6, 0, 32, 0));
    }
    Ok((load(kind, &zero_key_lookup(kind, &map, body))?, map))
}

/// Adds one packet of 1454 IP bytes and 1400 payload bytes to the three counters at r6
/// (as a flow's direction holds them): plain adds in a per-CPU value, atomic ones in a
/// shared value.
fn add_counts(table: Table) -> Vec<Insn> {
    let mut insns = Vec::new();
    for (off, amount) in [(0, 1), (8, 1454), (16, 1400)] {
        match table {
            Table::PerCpu => insns.extend([
                insn(0x79, 1, 6, off, 0),
                insn(0x07, 1, 0, 0, amount),
                insn(0x7b, 6, 1, off, 0),
            ]),
            Table::Shared => insns.extend([
                insn(0xb7, 1, 0, 0, amount),
                insn(ATOMIC_ADD_DW, 6, 1, off, BPF_ADD),
            ]),
        }
    }
    insns
}

/// Inserts (`BPF_NOEXIST`) a 40-byte key made of the frame's IPv4 destination, with a
/// zero value of `value_size` bytes, into a preallocated hash map (per-CPU or shared) of
/// `capacity` entries: what any program that counts a new connection does at the least.
/// Returns the program and its map.
pub fn flow_insert(
    kind: Kind,
    table: Table,
    value_size: u32,
    capacity: u32,
) -> io::Result<(OwnedFd, RawMap)> {
    let map = flow_map(table, value_size, capacity)?;
    let fd = map.as_fd().as_raw_fd();
    let value_words = value_size.div_ceil(8) as i16;
    let value_at = -(FLOW_KEY_SIZE as i16) - 8 * value_words;
    // The key at fp-40, the value below it, both zero.
    let mut prog: Vec<Insn> = (value_at / 8..0)
        .map(|word| insn(0x7a, 10, 0, word * 8, 0))
        .collect();
    let (data, data_end) = kind.data_offsets();
    prog.extend([
        // r2 = data, r3 = data_end; the destination address ends at byte 34.
        insn(0x61, 2, 1, data, 0),
        insn(0x61, 3, 1, data_end, 0),
        insn(0xbf, 4, 2, 0, 0),
        insn(0x07, 4, 0, 0, 34),
        // if r4 > r3 goto pass (past the 10 instruction slots after this one)
        insn(0x2d, 4, 3, 10, 0),
        // *(u32 *)(fp - 40) = *(u32 *)(data + 30)
        insn(0x61, 5, 2, 30, 0),
        insn(0x63, 10, 5, -(FLOW_KEY_SIZE as i16), 0),
    ]);
    prog.extend(insert_key(fd, value_at));
    // pass:
    prog.push(insn(0xb7, 0, 0, 0, kind.pass()));
    prog.push(insn(0x95, 0, 0, 0, 0));
    Ok((load(kind, &prog)?, map))
}

/// Looks up the 40-byte key [`flow_insert`] makes of the frame in `map`, a map it filled
/// for `table`, adds to three 64-bit counters of the value (plain adds in a per-CPU map,
/// atomic ones in a shared map) and stores `bpf_ktime_get_ns()` beside them: the floor of
/// counting a packet of a known connection. Returns the program.
pub fn known_flow(kind: Kind, table: Table, map: &RawMap) -> io::Result<OwnedFd> {
    let body = count_found(table);
    // The key at fp-40, zero but for the frame's IPv4 destination.
    let mut prog: Vec<Insn> = (-5..0).map(|word| insn(0x7a, 10, 0, word * 8, 0)).collect();
    let (data, data_end) = kind.data_offsets();
    prog.extend([
        insn(0x61, 2, 1, data, 0),
        insn(0x61, 3, 1, data_end, 0),
        insn(0xbf, 4, 2, 0, 0),
        insn(0x07, 4, 0, 0, 34),
        // if r4 > r3 goto pass (past the 8 instruction slots after this one and the body)
        insn(0x2d, 4, 3, 8 + body.len() as i16, 0),
        insn(0x61, 5, 2, 30, 0),
        insn(0x63, 10, 5, -(FLOW_KEY_SIZE as i16), 0),
    ]);
    prog.extend(lookup_key(map.as_fd().as_raw_fd()));
    // if r0 == 0 skip the body
    prog.push(insn(0x15, 0, 0, body.len() as i16, 0));
    prog.extend(body);
    prog.push(insn(0xb7, 0, 0, 0, kind.pass()));
    prog.push(insn(0x95, 0, 0, 0, 0));
    load(kind, &prog)
}

/// Counts every IPv4 frame in a shared hash map of `capacity` entries and values of
/// `value_size` bytes, keyed by 40 bytes made of its addresses and ports (as on the wire,
/// the rest zero): looks the key up; when absent inserts it (`BPF_NOEXIST`, a zero value)
/// and looks it up again; then adds to three 64-bit counters atomically and stores
/// `bpf_ktime_get_ns()` beside them. The least any exact per-connection counter with a
/// timestamp does per packet, a new connection's first packet included. Returns the
/// program and its map.
pub fn flow_count(kind: Kind, value_size: u32, capacity: u32) -> io::Result<(OwnedFd, RawMap)> {
    let map = flow_map(Table::Shared, value_size, capacity)?;
    let fd = map.as_fd().as_raw_fd();
    let lookup = lookup_key(fd);
    let count = count_found(Table::Shared);
    // Absent: a zero value below the key, inserted, then looked up again.
    let value_at = -(FLOW_KEY_SIZE as i16) - 8 * value_size.div_ceil(8) as i16;
    let mut insert: Vec<Insn> = (value_at / 8..-(FLOW_KEY_SIZE as i16) / 8)
        .map(|word| insn(0x7a, 10, 0, word * 8, 0))
        .collect();
    insert.extend(insert_key(fd, value_at));
    insert.extend(lookup);
    // if r0 == 0 goto pass (the map is full)
    insert.push(insn(0x15, 0, 0, count.len() as i16, 0));
    let mut body = lookup.to_vec();
    // if r0 != 0 goto found
    body.push(insn(0x55, 0, 0, insert.len() as i16, 0));
    body.extend(insert);
    body.extend(count);
    let mut prog = frame_key(kind, body.len());
    prog.extend(body);
    prog.push(insn(0xb7, 0, 0, 0, kind.pass()));
    prog.push(insn(0x95, 0, 0, 0, 0));
    Ok((load(kind, &prog)?, map))
}

/// `r0 = bpf_map_lookup_elem(map, fp - 40)`: the value of the key at fp-40, or 0.
fn lookup_key(map: RawFd) -> [Insn; 5] {
    [
        insn(0x18, 1, BPF_PSEUDO_MAP_FD, 0, map),
        insn(0, 0, 0, 0, 0),
        insn(0xbf, 2, 10, 0, 0),
        insn(0x07, 2, 0, 0, -(FLOW_KEY_SIZE as i32)),
        insn(0x85, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM),
    ]
}

/// `bpf_map_update_elem(map, fp - 40, fp + value_at, BPF_NOEXIST)`: inserts the key at
/// fp-40 with the value at `value_at`.
fn insert_key(map: RawFd, value_at: i16) -> [Insn; 8] {
    [
        insn(0x18, 1, BPF_PSEUDO_MAP_FD, 0, map),
        insn(0, 0, 0, 0, 0),
        insn(0xbf, 2, 10, 0, 0),
        insn(0x07, 2, 0, 0, -(FLOW_KEY_SIZE as i32)),
        insn(0xbf, 3, 10, 0, 0),
        insn(0x07, 3, 0, 0, i32::from(value_at)),
        insn(0xb7, 4, 0, 0, BPF_NOEXIST),
        insn(0x85, 0, 0, 0, BPF_FUNC_MAP_UPDATE_ELEM),
    ]
}

/// With r0 the value found: r6 = r0, a packet added to its three counters, and
/// `bpf_ktime_get_ns()` stored beside them (`*(u64 *)(r6 + 32)`).
fn count_found(table: Table) -> Vec<Insn> {
    let mut insns = vec![insn(0xbf, 6, 0, 0, 0)];
    insns.extend(add_counts(table));
    insns.push(insn(0x85, 0, 0, 0, BPF_FUNC_KTIME_GET_NS));
    insns.push(insn(0x7b, 6, 0, 32, 0));
    insns
}

/// Writes the key of an Ethernet frame with an IPv4 header of 20 bytes at fp-40: source
/// address, destination address and the L4 ports at the agent's key offsets, the rest
/// zero. Jumps past the `then` instructions that follow for a frame too short or not
/// IPv4.
fn frame_key(kind: Kind, then: usize) -> Vec<Insn> {
    let mut key: Vec<Insn> = (-5..0).map(|word| insn(0x7a, 10, 0, word * 8, 0)).collect();
    for (from, to) in [(26, -40), (30, -24), (34, -8)] {
        key.push(insn(0x61, 4, 2, from, 0));
        key.push(insn(0x63, 10, 4, to, 0));
    }
    let past = (key.len() + then) as i16;
    let (data, data_end) = kind.data_offsets();
    let mut prog = vec![
        // r2 = data, r3 = data_end; the ports end at byte 38.
        insn(0x61, 2, 1, data, 0),
        insn(0x61, 3, 1, data_end, 0),
        insn(0xbf, 4, 2, 0, 0),
        insn(0x07, 4, 0, 0, 38),
        insn(0x2d, 4, 3, past + 2, 0),
        // if the EtherType (read little-endian) is not IPv4's, pass
        insn(0x69, 4, 2, 12, 0),
        insn(0x55, 4, 0, past, 0x0008),
    ];
    prog.extend(key);
    prog
}

fn create_counter_map() -> io::Result<RawMap> {
    create_map(BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8)
}

/// A one-entry map.
fn create_map(map_type: u32, key_size: u32, value_size: u32) -> io::Result<RawMap> {
    RawMap::create(map_type, key_size, value_size, 1)
}

/// An empty hash map (per-CPU or shared) of 40-byte keys, preallocated as the agent's.
pub fn flow_map(table: Table, value_size: u32, capacity: u32) -> io::Result<RawMap> {
    RawMap::create(table.map_type(), FLOW_KEY_SIZE as u32, value_size, capacity)
}

/// Fills a map made by [`flow_map`] with `entries` distinct keys and non-zero values
/// (`BPF_MAP_UPDATE_BATCH`).
pub fn fill(map: &RawMap, entries: u32) -> io::Result<()> {
    const CHUNK: u32 = 4096;
    let stride = map.value_stride();
    let values = vec![0x11u8; CHUNK as usize * stride];
    let mut keys = vec![0u8; CHUNK as usize * FLOW_KEY_SIZE];
    for start in (0..entries).step_by(CHUNK as usize) {
        let count = CHUNK.min(entries - start);
        for (n, key) in (start..start + count).zip(keys.as_chunks_mut::<FLOW_KEY_SIZE>().0) {
            key[..4].copy_from_slice(&n.to_le_bytes());
        }
        let count = count as usize;
        map.insert_batch(&keys[..count * FLOW_KEY_SIZE], &values[..count * stride])?;
    }
    Ok(())
}

/// Reads every entry of a map made by [`flow_map`] the way the agent's poller does:
/// `BPF_MAP_LOOKUP_BATCH`, 256 entries per call (more where a bucket holds more).
/// Returns the entries read.
pub fn read_batched(map: &RawMap) -> io::Result<usize> {
    let mut read = 0;
    for_each_value(map, |_| read += 1)?;
    Ok(read)
}

/// The packets [`flow_count`]'s map counted: the first counter of every entry.
pub fn packets_counted(map: &RawMap) -> io::Result<u64> {
    let mut packets = 0;
    for_each_value(map, |value| {
        let first: [u8; 8] = value[..8].try_into().expect("a value of 8 bytes or more");
        packets += u64::from_ne_bytes(first);
    })?;
    Ok(packets)
}

/// Hands every value of a map made by [`flow_map`] to `each`, read as
/// [`read_batched`] says.
fn for_each_value(map: &RawMap, mut each: impl FnMut(&[u8])) -> io::Result<()> {
    let stride = map.value_stride();
    let mut size = 256;
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    let (mut position, mut next) = (None::<u64>, 0u64);
    loop {
        keys.resize(size * FLOW_KEY_SIZE, 0u8);
        values.resize(size * stride, 0u8);
        let (count, done) =
            match map.lookup_batch(position.as_ref(), &mut next, &mut keys, &mut values) {
                Ok(read) => read,
                Err(err) if err.raw_os_error() == Some(libc::ENOSPC) => {
                    size *= 2;
                    continue;
                }
                Err(err) => return Err(err),
            };
        values[..count * stride].chunks(stride).for_each(&mut each);
        if done {
            return Ok(());
        }
        position = Some(next);
    }
}

fn load(kind: Kind, insns: &[Insn]) -> io::Result<OwnedFd> {
    bpf::load_program(kind.prog_type(), "reference", insns)
}
