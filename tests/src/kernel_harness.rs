//! The kernel tests' harness: a fresh copy of the kernel object with some of its programs
//! loaded, crafted frames run through them with `BPF_PROG_TEST_RUN`, and its maps read
//! back with what must hold of every entry checked.
//!
//! `BPF_PROG_TEST_RUN` (net/bpf/test_run.c) refuses frames shorter than an Ethernet
//! header at every hook, and at the skb hooks also an outer EtherType of IPv4 or IPv6
//! without a whole fixed IP header behind it ([`Hook::refuses`]; tests/kernel/kernel.rs tells more).
//! It runs the programs on the namespace's loopback device.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp},
};
use monitor::clock::monotonic_ns;
use monitor_common::{
    dns::{DnsEvent, DnsEventHeader},
    flow::{FlowKey, FlowValue},
    hello::HelloEvent,
    names, stats, watched,
};

use crate::{
    bpf::{K, loopback_ifindex},
    packet::{ETH_HLEN, IPV4_HLEN, IPV6_HLEN, ethertype},
};

const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
pub const SLOTS: usize = stats::SLOTS as usize;

/// The hook a program runs at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    TcIngress,
    TcEgress,
}

impl Hook {
    pub const ALL: [Hook; 3] = [Hook::Xdp, Hook::TcIngress, Hook::TcEgress];
    pub const TC: [Hook; 2] = [Hook::TcIngress, Hook::TcEgress];

    /// The hook's program for Ethernet frames.
    pub fn program(self) -> &'static str {
        match self {
            Hook::Xdp => names::XDP_INGRESS,
            Hook::TcIngress => names::TC_INGRESS,
            Hook::TcEgress => names::TC_EGRESS,
        }
    }

    /// The "let it through" verdict every frame must get.
    pub fn pass(self) -> u32 {
        match self {
            Hook::Xdp => XDP_PASS,
            Hook::TcIngress | Hook::TcEgress => TC_ACT_OK,
        }
    }

    /// Whether a test_run of this frame at this hook fails with EINVAL: shorter than an
    /// Ethernet header, or, for skb runs, an outer EtherType of IPv4/IPv6 without a whole
    /// fixed IP header behind it.
    pub fn refuses(self, frame: &[u8]) -> bool {
        if frame.len() < ETH_HLEN {
            return true;
        }
        if self == Hook::Xdp {
            return false;
        }
        let l3 = frame.len() - ETH_HLEN;
        match u16::from_be_bytes([frame[12], frame[13]]) {
            ethertype::IPV4 => l3 < IPV4_HLEN,
            ethertype::IPV6 => l3 < IPV6_HLEN,
            _ => false,
        }
    }
}

/// The name of a STATS slot: its `reason` label, or what else it counts.
pub fn slot_name(slot: usize) -> &'static str {
    let slot = slot as u32;
    match slot {
        stats::FLOW_MAP_FULL => "flow_map_full",
        stats::DNS_EVENTS_LOST => "dns_events_lost",
        stats::SPOOFED_SOURCE => "spoofed_source",
        _ => stats::unparsed_reason(slot).unwrap_or_else(|| panic!("STATS has no slot {slot}")),
    }
}

/// The slots in which `got` and `want` differ, named.
pub fn stats_diff(got: &[u64; SLOTS], want: &[u64; SLOTS]) -> String {
    let mut out = String::from("STATS differ:");
    for slot in (0..SLOTS).filter(|&s| got[s] != want[s]) {
        let _ = write!(
            out,
            " {}: got {} want {};",
            slot_name(slot),
            got[slot],
            want[slot]
        );
    }
    out
}

/// Bytes in hex, for messages.
pub fn hex(b: &[u8]) -> String {
    b.iter()
        .fold(String::with_capacity(2 * b.len()), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

/// What one direction of a flow counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub pkts: u64,
    pub ip_bytes: u64,
    pub bytes: u64,
    pub tcp_flags: u8,
    pub syn_only: u8,
}

impl Counts {
    /// These and `other`'s packets together.
    pub fn plus(self, other: Counts) -> Self {
        Counts {
            pkts: self.pkts + other.pkts,
            ip_bytes: self.ip_bytes + other.ip_bytes,
            bytes: self.bytes + other.bytes,
            tcp_flags: self.tcp_flags | other.tcp_flags,
            syn_only: self.syn_only | other.syn_only,
        }
    }

    /// `n` packets like this one.
    pub fn times(self, n: u64) -> Self {
        Counts {
            pkts: self.pkts * n,
            ip_bytes: self.ip_bytes * n,
            bytes: self.bytes * n,
            ..self
        }
    }
}

/// A flow entry.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub dir: [Counts; 2],
    /// First and last timestamp of each direction.
    pub first_ns: [u64; 2],
    pub last_ns: [u64; 2],
}

/// One copy of the kernel object (fresh maps) with some of its programs loaded: they
/// share its maps.
pub struct Kernel {
    ebpf: Ebpf,
    /// The program run at each hook loaded.
    programs: Vec<(Hook, &'static str)>,
    /// What every message starts with: the hooks loaded, or what [`Self::labelled`] set.
    label: String,
    lo: u32,
    /// CLOCK_MONOTONIC before the first and after the last run: every timestamp in the
    /// flow map must fall inside.
    window: Window,
}

/// The span of the runs so far. Atomic, so that threads may run the programs at once.
struct Window {
    first: AtomicU64,
    last: AtomicU64,
}

impl Window {
    fn new() -> Self {
        Window {
            first: AtomicU64::new(u64::MAX),
            last: AtomicU64::new(0),
        }
    }

    /// Takes in a run from `start` to `end`.
    fn widen(&self, start: u64, end: u64) {
        self.first.fetch_min(start, Relaxed);
        self.last.fetch_max(end, Relaxed);
    }

    /// From before the first run to after the last, once a run was made.
    fn get(&self) -> Option<(u64, u64)> {
        let first = self.first.load(Relaxed);
        (first != u64::MAX).then(|| (first, self.last.load(Relaxed)))
    }
}

impl Kernel {
    /// The programs of `hooks`.
    pub fn load(hooks: &[Hook]) -> Self {
        Self::with_programs(EbpfLoader::new(), hooks.iter().map(|&h| (h, h.program())))
    }

    /// The programs of `hooks`, with a flow map of this many entries.
    pub fn load_with_capacity(hooks: &[Hook], flows: u32) -> Self {
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(names::FLOW_MAP, flows);
        Self::with_programs(loader, hooks.iter().map(|&h| (h, h.program())))
    }

    /// The TC hook's program for interfaces whose packets start at the IP header.
    pub fn load_ip(hook: Hook) -> Self {
        let name = match hook {
            Hook::TcIngress => names::TC_INGRESS_IP,
            Hook::TcEgress => names::TC_EGRESS_IP,
            Hook::Xdp => panic!("XDP reads Ethernet frames only"),
        };
        Self::with_programs(EbpfLoader::new(), [(hook, name)])
    }

    fn with_programs(
        mut loader: EbpfLoader<'_>,
        programs: impl IntoIterator<Item = (Hook, &'static str)>,
    ) -> Self {
        let mut ebpf = loader
            .load(monitor::kernel::object())
            .unwrap_or_else(|e| panic!("loading the kernel object (needs root): {e}"));
        let programs: Vec<_> = programs.into_iter().collect();
        for &(hook, name) in &programs {
            let program = ebpf
                .program_mut(name)
                .unwrap_or_else(|| panic!("the object has no program {name}"));
            let loaded = match hook {
                Hook::Xdp => <&mut Xdp>::try_from(program)
                    .unwrap_or_else(|e| panic!("{name} is not XDP: {e}"))
                    .load(),
                Hook::TcIngress | Hook::TcEgress => <&mut SchedClassifier>::try_from(program)
                    .unwrap_or_else(|e| panic!("{name} is not a classifier: {e}"))
                    .load(),
            };
            loaded.unwrap_or_else(|e| panic!("loading {name}: {e:?}"));
        }
        let hooks: Vec<Hook> = programs.iter().map(|&(hook, _)| hook).collect();
        Self {
            ebpf,
            programs,
            label: format!("{hooks:?}"),
            lo: loopback_ifindex(),
            window: Window::new(),
        }
    }

    /// Messages start with `label` instead of the hooks loaded.
    pub fn labelled(self, label: String) -> Self {
        Self { label, ..self }
    }

    /// The object, for what the harness does not do.
    pub fn ebpf(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// One test_run at `hook`, as it is.
    pub fn test_run(
        &self,
        hook: Hook,
        opts: TestRunOptions<'_>,
    ) -> Result<TestRunResult, ProgramError> {
        let name = self
            .programs
            .iter()
            .find_map(|&(h, name)| (h == hook).then_some(name))
            .unwrap_or_else(|| panic!("{}: no program loaded for {hook:?}", self.label));
        let program = self.ebpf.program(name).expect("loaded");
        let start = monotonic_ns();
        let result = match hook {
            Hook::Xdp => <&Xdp>::try_from(program).expect("XDP").test_run(opts),
            Hook::TcIngress | Hook::TcEgress => <&SchedClassifier>::try_from(program)
                .expect("classifier")
                .test_run(opts),
        };
        let end = monotonic_ns();
        self.window.widen(start, end);
        result
    }

    /// Runs a frame once; asserts the verdict and that the frame came out unchanged.
    #[track_caller]
    pub fn run(&self, hook: Hook, frame: &[u8]) {
        self.run_with(hook, frame, 1, None, true);
    }

    /// Runs a frame `repeat` times in one test_run; asserts as [`Self::run`].
    #[track_caller]
    pub fn run_repeat(&self, hook: Hook, frame: &[u8], repeat: u32) {
        self.run_with(hook, frame, repeat, None, true);
    }

    /// Runs a frame `repeat` times in one test_run, with the context `ctx_in` if given;
    /// asserts the verdict and the frame's length out and, with `check_data`, its bytes.
    /// Returns the context written back.
    #[track_caller]
    pub fn run_with(
        &self,
        hook: Hook,
        frame: &[u8],
        repeat: u32,
        ctx_in: Option<&[u8]>,
        check_data: bool,
    ) -> Option<Vec<u8>> {
        let label = &self.label;
        let mut data_out = vec![0u8; if check_data { frame.len() } else { 0 }];
        let mut ctx_out = ctx_in.map(|c| vec![0u8; c.len()]);
        let result = self
            .test_run(
                hook,
                TestRunOptions {
                    data_in: Some(frame),
                    data_out: check_data.then_some(&mut data_out[..]),
                    ctx_in,
                    ctx_out: ctx_out.as_deref_mut(),
                    repeat,
                    ..TestRunOptions::default()
                },
            )
            .unwrap_or_else(|e| {
                panic!(
                    "{label}: {hook:?}: test_run of a {}-byte frame failed: {e:?}; frame {}",
                    frame.len(),
                    hex(frame)
                )
            });
        assert_eq!(
            result.return_value,
            hook.pass(),
            "{label}: {hook:?} must pass every frame (repeat {repeat}); frame {}",
            hex(frame)
        );
        assert_eq!(
            result.data_size_out as usize,
            frame.len(),
            "{label}: {hook:?} changed the frame's length; frame {}",
            hex(frame)
        );
        assert!(
            !check_data || data_out == frame,
            "{label}: {hook:?} changed the frame: in {} out {}",
            hex(frame),
            hex(&data_out)
        );
        ctx_out
    }

    /// Asserts that test_run refuses the frame at `hook` with EINVAL (the program never
    /// runs).
    #[track_caller]
    pub fn assert_refused(&self, hook: Hook, frame: &[u8]) {
        let mut out = vec![0u8; frame.len().max(ETH_HLEN)];
        match self.test_run(
            hook,
            TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            },
        ) {
            Err(ProgramError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EINVAL) => {}
            other => panic!(
                "{}: {hook:?}: test_run of a {}-byte frame: expected EINVAL, got {other:?}; frame {}",
                self.label,
                frame.len(),
                hex(frame)
            ),
        }
    }

    /// Sets an interface's `watched` bits and its bit in `WATCHED_MASK`, as the agent does.
    pub fn mark(&mut self, ifindex: u32, bits: u8) {
        let map = self.ebpf.map_mut(names::WATCHED_MAP).expect("WATCHED map");
        HashMap::<_, u32, u8>::try_from(map)
            .expect("WATCHED is a hash map")
            .insert(&ifindex, &bits, 0)
            .expect("insert into WATCHED");
        let map = self
            .ebpf
            .map_mut(names::WATCHED_MASK_MAP)
            .expect("WATCHED_MASK map");
        let mut mask = Array::<_, u64>::try_from(map).expect("WATCHED_MASK is an array");
        let old = mask.get(&0, 0).expect("read WATCHED_MASK");
        mask.set(0, &(old | watched::mask_bit(ifindex)), 0)
            .expect("set WATCHED_MASK");
    }

    /// Marks an interface as watched, as the agent does when it hooks its ingress.
    pub fn watch(&mut self, ifindex: u32) {
        self.mark(ifindex, watched::INGRESS_HOOKED);
    }

    fn flow_map(&self) -> HashMap<&MapData, FlowKey, FlowValue> {
        let map = self
            .ebpf
            .map(names::FLOW_MAP)
            .unwrap_or_else(|| panic!("no map {}", names::FLOW_MAP));
        HashMap::try_from(map).unwrap_or_else(|e| panic!("{} as a hash: {e}", names::FLOW_MAP))
    }

    /// The flow map, after checking what must hold of every entry.
    pub fn flows(&self) -> BTreeMap<FlowKey, Flow> {
        self.flow_map()
            .iter()
            .map(|entry| {
                let (key, value) =
                    entry.unwrap_or_else(|e| panic!("{}: reading the flow map: {e}", self.label));
                (key, self.checked(&key, &value))
            })
            .collect()
    }

    /// The flow map's counters only.
    pub fn counts(&self) -> BTreeMap<FlowKey, [Counts; 2]> {
        self.flows().into_iter().map(|(k, f)| (k, f.dir)).collect()
    }

    /// One entry's counters, checked as in [`Self::flows`]; zero when absent.
    pub fn flow(&self, key: &FlowKey) -> [Counts; 2] {
        match self.flow_map().get(key, 0) {
            Ok(value) => self.checked(key, &value).dir,
            Err(MapError::KeyNotFound) => [Counts::default(); 2],
            Err(e) => panic!("{}: reading the flow map at {}: {e}", self.label, K(key)),
        }
    }

    /// An entry, after checking what must hold of it.
    fn checked(&self, key: &FlowKey, v: &FlowValue) -> Flow {
        let k = format!("{}: {}", self.label, K(key));
        let lo = self.lo;
        assert_eq!(key._pad, [0; 2], "{k}: key padding");
        assert!(key.family == 4 || key.family == 6, "{k}: family");
        if key.family == 4 {
            assert_eq!(key.addr_a[4..], [0; 12], "{k}: IPv4 address a");
            assert_eq!(key.addr_b[4..], [0; 12], "{k}: IPv4 address b");
        }
        assert!(
            (key.addr_a, key.port_a) <= (key.addr_b, key.port_b),
            "{k}: endpoint a must be the smaller"
        );
        assert_eq!(v.ifindex, lo, "{k}: ifindex");
        assert_eq!(v.epoch, 0, "{k}: epoch (no agent raised it)");
        let mut flow = Flow {
            dir: [Counts::default(); 2],
            first_ns: [0; 2],
            last_ns: [0; 2],
        };
        for (i, d) in v.dir.iter().enumerate() {
            assert!(d.syn_only <= 1, "{k}: syn_only {}", d.syn_only);
            assert!(
                d.awaiting_hello <= 1,
                "{k}: awaiting_hello {}",
                d.awaiting_hello
            );
            assert_eq!(d._pad, 0, "{k}: direction {i}: padding");
            assert!(
                [0, lo].contains(&d.source_checked_on),
                "{k}: direction {i}: source checked on {}",
                d.source_checked_on
            );
            flow.dir[i] = Counts {
                pkts: d.pkts,
                ip_bytes: d.ip_bytes,
                bytes: d.bytes,
                tcp_flags: d.tcp_flags,
                syn_only: d.syn_only,
            };
            if d.pkts == 0 {
                assert_eq!(
                    (
                        d.ip_bytes,
                        d.bytes,
                        d.first_ns,
                        d.last_ns,
                        d.tcp_flags,
                        d.syn_only
                    ),
                    (0, 0, 0, 0, 0, 0),
                    "{k}: direction {i} counted no packet"
                );
                continue;
            }
            assert!(
                0 < d.first_ns && d.first_ns <= d.last_ns,
                "{k}: direction {i}: first {} last {}",
                d.first_ns,
                d.last_ns
            );
            if let Some((start, end)) = self.window.get() {
                assert!(
                    start <= d.first_ns && d.last_ns <= end,
                    "{k}: direction {i}: timestamps {}..{} outside the runs {start}..{end}",
                    d.first_ns,
                    d.last_ns
                );
            }
            flow.first_ns[i] = d.first_ns;
            flow.last_ns[i] = d.last_ns;
        }
        assert!(
            flow.dir.iter().any(|d| d.pkts != 0),
            "{k}: an entry without packets"
        );
        flow
    }

    /// Removes an entry from the flow map, if it is there.
    pub fn remove(&mut self, key: &FlowKey) {
        let map = self.ebpf.map_mut(names::FLOW_MAP).expect("FLOWS map");
        let mut map = HashMap::<_, FlowKey, FlowValue>::try_from(map)
            .unwrap_or_else(|e| panic!("FLOWS as a hash: {e}"));
        match map.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => panic!("{}: removing FLOWS[{}]: {e:?}", self.label, K(key)),
        }
    }

    /// STATS, summed over the CPUs.
    pub fn stats(&self) -> [u64; SLOTS] {
        let map = self
            .ebpf
            .map(names::STATS_MAP)
            .unwrap_or_else(|| panic!("no map {}", names::STATS_MAP));
        let map = PerCpuArray::<_, u64>::try_from(map)
            .unwrap_or_else(|e| panic!("{} as a per-CPU array: {e}", names::STATS_MAP));
        assert_eq!(map.len(), stats::SLOTS, "STATS slots");
        std::array::from_fn(|slot| {
            map.get(&(slot as u32), 0)
                .unwrap_or_else(|e| panic!("reading STATS[{slot}]: {e}"))
                .iter()
                .sum()
        })
    }

    /// Everything in the DNS ring buffer, taken out as the agent does: each event's
    /// header and copied bytes.
    pub fn dns_events(&mut self) -> Vec<(DnsEventHeader, Vec<u8>)> {
        self.ring_events(names::DNS_EVENTS_MAP, size_of::<DnsEvent>())
    }

    /// Everything in the first-payload ring buffer (`HELLO_EVENTS`), as [`Self::dns_events`].
    pub fn hello_events(&mut self) -> Vec<(DnsEventHeader, Vec<u8>)> {
        self.ring_events(names::HELLO_EVENTS_MAP, size_of::<HelloEvent>())
    }

    /// The records of a ring buffer whose records are a `DnsEventHeader` and its bytes.
    fn ring_events(&mut self, name: &str, size: usize) -> Vec<(DnsEventHeader, Vec<u8>)> {
        let map = self
            .ebpf
            .map_mut(name)
            .unwrap_or_else(|| panic!("{name} map"));
        let mut ring =
            RingBuf::try_from(map).unwrap_or_else(|e| panic!("{name} as a ring buffer: {e}"));
        let mut events = Vec::new();
        while let Some(item) = ring.next() {
            assert_eq!(item.len(), size, "{name}: record size");
            // SAFETY: the kernel wrote a header first; read_unaligned copes with any alignment.
            let header: DnsEventHeader = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let data = &item[size_of::<DnsEventHeader>()..];
            events.push((header, data[..header.captured_len as usize].to_vec()));
        }
        events
    }

    /// The flow map holds exactly these entries with these counters.
    #[track_caller]
    pub fn assert_flows(&self, expected: &[(FlowKey, [Counts; 2])]) {
        let label = &self.label;
        let actual = self.counts();
        let wanted: BTreeMap<FlowKey, [Counts; 2]> = expected.iter().copied().collect();
        assert_eq!(wanted.len(), expected.len(), "a key is expected twice");
        for (key, want) in &wanted {
            let Some(got) = actual.get(key) else {
                panic!(
                    "{label}: no entry for {}; the map holds:\n{}",
                    K(key),
                    describe(&actual)
                );
            };
            for i in 0..2 {
                assert_eq!(
                    got[i],
                    want[i],
                    "{label}: {} direction {i} (0 = a->b)",
                    K(key)
                );
            }
        }
        let unexpected: BTreeMap<_, _> = actual
            .into_iter()
            .filter(|(k, _)| !wanted.contains_key(k))
            .collect();
        assert!(
            unexpected.is_empty(),
            "{label}: unexpected entries:\n{}",
            describe(&unexpected)
        );
    }

    /// STATS holds exactly these counts, every other slot zero.
    #[track_caller]
    pub fn assert_stats(&self, expected: &[(u32, u64)]) {
        let mut want = [0u64; SLOTS];
        for &(slot, n) in expected {
            want[slot as usize] += n;
        }
        let got = self.stats();
        assert_eq!(got, want, "{}: {}", self.label, stats_diff(&got, &want));
    }
}

/// Flow entries, one a line.
pub fn describe(flows: &BTreeMap<FlowKey, [Counts; 2]>) -> String {
    flows
        .iter()
        .map(|(k, d)| format!("  {}: {:?} / {:?}\n", K(k), d[0], d[1]))
        .collect()
}
