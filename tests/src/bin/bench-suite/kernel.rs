//! Kernel cost per packet through `BPF_PROG_TEST_RUN`: the agent's programs and the two
//! reference programs, on the same frames, in one run. The kernel reports the mean time
//! per repetition; a hot flow repeats one frame (one insert, then updates), a new flow
//! runs each of many distinct frames once (every run an insert), and both are set against
//! the bare "pass" program run the same way, so the timer's own cost cancels out. Hot
//! flows are also run from two CPUs at once on one key, where a map shared by the CPUs
//! pays for the cache line both write.
//!
//! test_run builds linear skbs only. What headers beyond an skb's linear part cost (the
//! programs read them through `bpf_skb_load_bytes`) is measured on `tc_ingress` attached
//! to a veth, fed through AF_PACKET, timed by the kernel's run-time statistics.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    sync::Barrier,
    thread,
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, TcAttachType, Xdp},
    sys::Stats,
};
use monitor_common::{flow::FlowValue, names};
use tests::{
    bpf,
    lab::{self, add_namespace, delete_namespaces, ip, run_in_ns},
    packet::{
        Frame, ethertype,
        tcp_flags::{ACK, PSH},
    },
    traffic::pin_to_cpu,
};

use crate::{
    Plan, median,
    refprog::{self, Kind, Table},
};

const PAYLOAD: usize = 1400;

/// One line of the kernel table.
pub struct Row {
    pub hook: &'static str,
    pub case: &'static str,
    pub ns: f64,
    /// Over the bare program run the same way (`None` for the bare program itself).
    pub added: Option<f64>,
}

fn hot_v4() -> Vec<u8> {
    Frame::eth()
        .ipv4(Ipv4Addr::new(198, 18, 1, 2), Ipv4Addr::new(203, 0, 113, 2))
        .tcp(40000, 443, PSH | ACK)
        .payload_len(PAYLOAD)
        .build()
}

fn hot_v6() -> Vec<u8> {
    Frame::eth()
        .ipv6(
            Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2),
            Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2),
        )
        .tcp(40000, 443, PSH | ACK)
        .payload_len(PAYLOAD)
        .build()
}

fn hot_vlan() -> Vec<u8> {
    Frame::eth()
        .vlan(ethertype::VLAN, 100)
        .ipv4(Ipv4Addr::new(198, 18, 1, 2), Ipv4Addr::new(203, 0, 113, 2))
        .tcp(40000, 443, PSH | ACK)
        .payload_len(PAYLOAD)
        .build()
}

/// Frame `n` of a series of distinct flows (`salt` keeps series apart).
fn new_flow(salt: u32, n: u32) -> Vec<u8> {
    let [_, a, b, c] = (salt << 20 | n).to_be_bytes();
    Frame::eth()
        .ipv4(Ipv4Addr::new(198, 18, 1, 2), Ipv4Addr::new(10, a, b, c))
        .tcp(40000 + (salt as u16), 443, PSH | ACK)
        .payload_len(PAYLOAD)
        .build()
}

/// The agent's program for a hook, loaded from a fresh copy of the object.
struct Agent {
    ebpf: Ebpf,
    name: &'static str,
}

impl Agent {
    fn load(kind: Kind, flows: u32) -> Agent {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::FLOW_MAP, flows)
            .load(monitor::kernel::object())
            .unwrap_or_else(|e| panic!("loading the kernel object (needs root): {e}"));
        let name = match kind {
            Kind::Xdp => names::XDP_INGRESS,
            Kind::Tc => names::TC_EGRESS,
        };
        let program = ebpf.program_mut(name).expect("program in the object");
        let loaded = match kind {
            Kind::Xdp => <&mut Xdp>::try_from(program).expect("XDP").load(),
            Kind::Tc => <&mut SchedClassifier>::try_from(program)
                .expect("classifier")
                .load(),
        };
        loaded.unwrap_or_else(|e| panic!("loading {name}: {e}"));
        Agent { ebpf, name }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.ebpf
            .program(self.name)
            .expect("loaded")
            .fd()
            .expect("loaded program has an fd")
            .as_fd()
    }
}

/// The agent's flow value size: the reference programs' values are as large.
pub const VALUE_SIZE: u32 = std::mem::size_of::<FlowValue>() as u32;

fn repeat_ns(prog: BorrowedFd<'_>, frame: &[u8], repeat: u32) -> f64 {
    f64::from(monitor::kernel::bpf::test_run(prog, frame, repeat).expect("BPF_PROG_TEST_RUN"))
}

/// Mean ns per run when two threads, one on CPU 0 and one on CPU 1, each repeat one frame
/// at the same time: one connection whose packets two CPUs count together.
fn two_cpus_ns(prog: BorrowedFd<'_>, frame: &[u8], repeat: u32) -> f64 {
    let start = Barrier::new(2);
    let start = &start;
    thread::scope(|scope| {
        let runs = [0, 1].map(|cpu| {
            scope.spawn(move || {
                pin_to_cpu(cpu);
                start.wait();
                repeat_ns(prog, frame, repeat)
            })
        });
        runs.map(|run| run.join().expect("a test-run thread"))
            .iter()
            .sum::<f64>()
            / 2.0
    })
}

/// Mean ns of one run each over `frames`.
fn once_each_ns(prog: BorrowedFd<'_>, frames: &[Vec<u8>]) -> f64 {
    let total: f64 = frames.iter().map(|f| repeat_ns(prog, f, 1)).sum();
    total / frames.len() as f64
}

pub fn measure(plan: &Plan) -> Vec<Row> {
    let mut rows = measure_test_run(plan);
    rows.extend(measure_nonlinear(plan));
    rows
}

fn measure_test_run(plan: &Plan) -> Vec<Row> {
    let mut rows = Vec::new();
    for (kind, hook) in [(Kind::Xdp, "XDP"), (Kind::Tc, "TC")] {
        let bare = refprog::bare(kind).expect("load the bare reference program");
        let (count, _counter) =
            refprog::count_only(kind).expect("load the count-only reference program");
        let (lookup, _lookup_map) =
            refprog::flow_lookup(kind, false).expect("load the flow-lookup reference program");
        let (lookup_clock, _clock_map) =
            refprog::flow_lookup(kind, true).expect("load the flow-lookup reference program");
        let (shared, _shared_map) = refprog::shared_flow_lookup(kind, VALUE_SIZE, false)
            .expect("load the shared flow-lookup reference program");
        let (shared_clock, _shared_clock_map) = refprog::shared_flow_lookup(kind, VALUE_SIZE, true)
            .expect("load the shared flow-lookup reference program");
        let flows = plan.runs * plan.new_flows + 16;
        let agent = Agent::load(kind, flows);
        let hot = |prog: BorrowedFd<'_>, frame: &[u8]| {
            median((0..plan.runs).map(|_| repeat_ns(prog, frame, plan.repeat)))
        };
        let v4 = hot_v4();
        let bare_hot = hot(bare.as_fd(), &v4);
        rows.push(Row {
            hook,
            case: "bare pass (reference)",
            ns: bare_hot,
            added: None,
        });
        for (case, prog, frame) in [
            ("count-only (reference)", count.as_fd(), &v4),
            (
                "40-byte key lookup in a per-CPU hash, +1 (reference)",
                lookup.as_fd(),
                &v4,
            ),
            (
                "the same and the clock (bpf_ktime_get_ns) (reference)",
                lookup_clock.as_fd(),
                &v4,
            ),
            (
                "40-byte key lookup in a shared hash, three atomic adds (reference)",
                shared.as_fd(),
                &v4,
            ),
            (
                "the same and the clock (bpf_ktime_get_ns) (reference)",
                shared_clock.as_fd(),
                &v4,
            ),
            ("agent: hot IPv4 TCP flow", agent.fd(), &v4),
            ("agent: hot IPv6 TCP flow", agent.fd(), &hot_v6()),
            ("agent: hot VLAN-tagged IPv4 flow", agent.fd(), &hot_vlan()),
        ] {
            let ns = hot(prog, frame);
            rows.push(Row {
                hook,
                case,
                ns,
                added: Some(ns - bare_hot),
            });
        }
        let two_cpus = |prog: BorrowedFd<'_>| {
            median((0..plan.runs).map(|_| two_cpus_ns(prog, &v4, plan.repeat)))
        };
        let bare_two = two_cpus(bare.as_fd());
        rows.push(Row {
            hook,
            case: "bare pass, CPUs 0 and 1 at once (reference)",
            ns: bare_two,
            added: None,
        });
        for (case, prog) in [
            (
                "per-CPU hash lookup, +1 and the clock, one key from CPUs 0 and 1 at once (reference)",
                lookup_clock.as_fd(),
            ),
            (
                "shared hash lookup, three atomic adds and the clock, one key from CPUs 0 and 1 at once (reference)",
                shared_clock.as_fd(),
            ),
            (
                "agent: hot IPv4 TCP flow from CPUs 0 and 1 at once",
                agent.fd(),
            ),
        ] {
            let ns = two_cpus(prog);
            rows.push(Row {
                hook,
                case,
                ns,
                added: Some(ns - bare_two),
            });
        }
        // New flows: every frame once, so the timer is taken once per frame; the bare
        // program run the same way carries the same overhead.
        // The same frames again are known flows: the insert's own cost is the difference.
        let (insert, insert_map) = refprog::flow_insert(kind, Table::PerCpu, VALUE_SIZE, flows)
            .expect("load the insert reference program");
        let (shared_insert, shared_insert_map) =
            refprog::flow_insert(kind, Table::Shared, VALUE_SIZE, flows)
                .expect("load the shared insert reference program");
        let known = refprog::known_flow(kind, Table::PerCpu, &insert_map)
            .expect("load the known-flow reference program");
        let shared_known = refprog::known_flow(kind, Table::Shared, &shared_insert_map)
            .expect("load the shared known-flow reference program");
        let mut bare_once = Vec::new();
        let mut insert_once = Vec::new();
        let mut shared_insert_once = Vec::new();
        let mut known_once = [Vec::new(), Vec::new()];
        let mut agent_new = Vec::new();
        let mut agent_known = Vec::new();
        for run in 0..plan.runs {
            let frames: Vec<Vec<u8>> = (0..plan.new_flows).map(|n| new_flow(run, n)).collect();
            bare_once.push(once_each_ns(bare.as_fd(), &frames));
            // Each insert program's known-key twin right after it, as the agent's known
            // flows follow its new ones.
            insert_once.push(once_each_ns(insert.as_fd(), &frames));
            known_once[0].push(once_each_ns(known.as_fd(), &frames));
            shared_insert_once.push(once_each_ns(shared_insert.as_fd(), &frames));
            known_once[1].push(once_each_ns(shared_known.as_fd(), &frames));
            agent_new.push(once_each_ns(agent.fd(), &frames));
            agent_known.push(once_each_ns(agent.fd(), &frames));
        }
        // The references must really have inserted every frame's key.
        for (map, table) in [
            (&insert_map, Table::PerCpu),
            (&shared_insert_map, Table::Shared),
        ] {
            assert_eq!(
                refprog::read_batched(map).expect("read the map"),
                (plan.runs * plan.new_flows) as usize,
                "the {table:?} insert reference program's map"
            );
        }
        let (bare_once, insert_once, shared_insert_once, agent_new, agent_known) = (
            median(bare_once),
            median(insert_once),
            median(shared_insert_once),
            median(agent_new),
            median(agent_known),
        );
        rows.push(Row {
            hook,
            case: "bare pass, one run per call (reference)",
            ns: bare_once,
            added: None,
        });
        rows.push(Row {
            hook,
            case: "insert of a 40-byte key into a per-CPU hash, one run per call (reference)",
            ns: insert_once,
            added: Some(insert_once - bare_once),
        });
        rows.push(Row {
            hook,
            case: "insert of a 40-byte key into a shared hash, one run per call (reference)",
            ns: shared_insert_once,
            added: Some(shared_insert_once - bare_once),
        });
        for (case, ns) in [
            "lookup of a known 40-byte key in a per-CPU hash, three adds and the clock, one run per call (reference)",
            "the same in a shared hash, three atomic adds (reference)",
        ]
        .into_iter()
        .zip(known_once)
        {
            let ns = median(ns);
            rows.push(Row {
                hook,
                case,
                ns,
                added: Some(ns - bare_once),
            });
        }
        rows.push(Row {
            hook,
            case: "agent: known flow, one run per call",
            ns: agent_known,
            added: Some(agent_known - bare_once),
        });
        rows.push(Row {
            hook,
            case: "agent: new flow (map insert), one run per call",
            ns: agent_new,
            added: Some(agent_new - bare_once),
        });
    }
    rows
}

/// Two namespaces joined by a veth with MTU 9000; deleted on drop.
struct Jumbo {
    inj: String,
    host: String,
}

impl Drop for Jumbo {
    fn drop(&mut self) {
        delete_namespaces(&[&self.inj, &self.host]);
    }
}

/// An AF_PACKET socket in `ns` that sends out of `dev`, and `dev`'s index.
fn packet_socket(ns: &str, dev: &'static str) -> (OwnedFd, i32) {
    run_in_ns(ns, move || {
        let name = std::ffi::CString::new(dev).expect("interface name");
        // SAFETY: a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "no interface {dev}");
        // Protocol 0: the socket only sends.
        // SAFETY: plain syscall.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        // SAFETY: a fresh descriptor nothing else owns.
        (unsafe { OwnedFd::from_raw_fd(fd) }, ifindex as i32)
    })
}

fn send_frames(socket: &(OwnedFd, i32), frame: &[u8], n: u32) {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = socket.1;
    for _ in 0..n {
        // SAFETY: buffer and address are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                socket.0.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(sent, frame.len() as isize, "{}", io::Error::last_os_error());
    }
}

/// AF_PACKET frames per run of the attached `tc_ingress`.
pub fn nonlinear_frames(plan: &Plan) -> u32 {
    plan.new_flows * 4
}

/// `tc_ingress` on a veth fed by AF_PACKET: a 3,000-byte frame is built linear (less
/// than a page), an 8,000-byte one from pages with only its Ethernet header linear, so
/// that the parse from the linear part fails and runs again through the helper. Mean ns
/// per run from the kernel's run-time statistics, which time the program alone.
fn measure_nonlinear(plan: &Plan) -> Vec<Row> {
    let frames_per_run = nonlinear_frames(plan);
    let jumbo = Jumbo {
        inj: format!("bench-nl{}-inj", std::process::id()),
        host: format!("bench-nl{}-host", std::process::id()),
    };
    add_namespace(&jumbo.inj);
    add_namespace(&jumbo.host);
    ip(&[
        "-n",
        &jumbo.inj,
        "link",
        "add",
        "inj0",
        "mtu",
        "9000",
        "type",
        "veth",
        "peer",
        "name",
        "host0",
        "mtu",
        "9000",
        "netns",
        &jumbo.host,
    ]);
    for (ns, dev) in [(&jumbo.inj, "inj0"), (&jumbo.host, "host0")] {
        ip(&["-n", ns, "link", "set", dev, "up"]);
    }
    let _stats = aya::sys::enable_stats(Stats::RunTime).expect("enable bpf run-time stats");
    let mut agent = Agent::load(Kind::Tc, 1024);
    let program: &mut SchedClassifier = agent
        .ebpf
        .program_mut(names::TC_INGRESS)
        .and_then(|p| p.try_into().ok())
        .expect("tc_ingress in the object");
    program.load().expect("load tc_ingress");
    let id = program.info().expect("program info").id();
    // Attached from a thread inside the host namespace, where host0's index means host0.
    let netns = std::fs::File::open(format!("/run/netns/{}", jumbo.host)).expect("host netns");
    thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: plain syscall on a valid fd; it changes only this thread.
                let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
                program
                    .attach(c"host0", TcAttachType::Ingress)
                    .expect("attach tc_ingress to host0");
            })
            .join()
            .expect("attach thread")
    });
    let socket = packet_socket(&jumbo.inj, "inj0");
    lab::wait_quiet(&[(&jumbo.inj, "inj0"), (&jumbo.host, "host0")]);
    let frame = |payload: usize| {
        Frame::eth()
            .ipv4(Ipv4Addr::new(198, 18, 1, 2), Ipv4Addr::new(203, 0, 113, 99))
            .tcp(40000, 443, PSH | ACK)
            .payload_len(payload)
            .build()
    };
    let mut per_case = Vec::new();
    for payload in [3000 - 54, 8000 - 54] {
        let frame = frame(payload);
        per_case.push(median((0..plan.runs).map(|_| {
            let (runs, time) = bpf::run_stats(&[id]);
            send_frames(&socket, &frame, frames_per_run);
            lab::wait_quiet(&[(&jumbo.host, "host0")]);
            let (runs_after, time_after) = bpf::run_stats(&[id]);
            assert_eq!(
                runs_after - runs,
                u64::from(frames_per_run),
                "tc_ingress runs"
            );
            (time_after - time).as_nanos() as f64 / f64::from(frames_per_run)
        })));
    }
    vec![
        Row {
            hook: "TC ingress, attached",
            case: "agent: 3,000-byte AF_PACKET frame, headers in the linear part",
            ns: per_case[0],
            added: None,
        },
        Row {
            hook: "TC ingress, attached",
            case: "agent: 8,000-byte AF_PACKET frame, only the Ethernet header linear: parsed again through bpf_skb_load_bytes (added: over the linear frame)",
            ns: per_case[1],
            added: Some(per_case[1] - per_case[0]),
        },
    ]
}
