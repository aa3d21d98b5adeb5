//! `cargo xtask bench` (and `bench --quick`): the agent's cost, side by side with what it
//! is measured against, in one run. Prints a Markdown report; with `--write FILE` it also
//! replaces the suite's section of that file (BENCHMARKS.md). `--only PART` runs one part;
//! `--agent-b FILE` has the in-place part run a second agent build in each round too.

mod e2e;
mod in_place;
mod kernel;
mod latency;
mod lists;
mod nat;
mod new_flows;
mod owners;
mod poll;
mod refprog;
mod throughput;

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Instant,
};

use tests::traffic;

/// How much of everything: the full suite or the quick one.
pub struct Plan {
    pub quick: bool,
    /// Each figure is the median of this many runs.
    pub runs: u32,
    /// Repetitions of a hot-flow frame per test run.
    pub repeat: u32,
    /// Distinct frames per new-flow run.
    pub new_flows: u32,
    /// Rounds of every setup in the lab with offloads off (the issue measured three).
    pub wire_rounds: u32,
    /// A second agent build the in-place part runs beside the first in every round.
    pub agent_b: Option<PathBuf>,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                runs: 3,
                repeat: 200_000,
                new_flows: 5_000,
                wire_rounds: 1,
                agent_b: None,
            }
        } else {
            Plan {
                quick,
                runs: 5,
                repeat: 1_000_000,
                new_flows: 20_000,
                wire_rounds: 3,
                agent_b: None,
            }
        }
    }
}

/// The median of some measurements (the mean of the middle two for an even count).
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.into_iter().collect();
    assert!(!values.is_empty(), "a median of nothing");
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

const START: &str = "<!-- bench-suite:start -->";
const END: &str = "<!-- bench-suite:end -->";

fn main() {
    let mut quick = false;
    let mut write = None;
    let mut only = None;
    let mut agent_b = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--write" => write = Some(PathBuf::from(args.next().expect("--write FILE"))),
            "--only" => only = Some(args.next().expect("--only PART")),
            "--agent-b" => agent_b = Some(PathBuf::from(args.next().expect("--agent-b FILE"))),
            other => panic!(
                "unknown argument {other} (--quick, --write FILE, --only PART, --agent-b FILE)"
            ),
        }
    }
    if let Some(path) = &agent_b
        && !path.is_file()
    {
        eprintln!("bench-suite: --agent-b {}: no such file", path.display());
        std::process::exit(2);
    }
    let plan = Plan {
        agent_b,
        ..Plan::new(quick)
    };
    let started = Instant::now();
    let mut report = String::new();
    let _ = writeln!(report, "{START}");
    let _ = writeln!(report, "{}", header(&plan));

    let runs = |part: &str| only.as_deref().is_none_or(|o| o == part);
    if runs("kernel") {
        eprintln!("bench: kernel cost per packet (BPF_PROG_TEST_RUN)");
        let rows = kernel::measure(&plan);
        let _ = writeln!(report, "{}", kernel_table(&plan, &rows));
    }
    if runs("poll") {
        eprintln!("bench: the agent's poll with many live connections");
        let rows = poll::measure(&plan);
        let _ = writeln!(report, "{}", poll_table(&rows));
        let rows = poll::read_floor(&plan);
        let _ = writeln!(report, "{}", read_floor_table(&rows));
    }
    if runs("poll-busy") {
        eprintln!("bench: the agent's poll when 1% of a million connections move, and all");
        let rows = poll::measure_busy(&plan);
        let _ = writeln!(report, "{}", busy_table(&rows));
    }
    if runs("nat") {
        eprintln!("bench: following address translation");
        let learn = nat::learn(&plan);
        let poll = nat::poll(&plan);
        let _ = writeln!(report, "{}", nat_table(&learn, &poll));
    }
    if runs("e2e") {
        eprintln!("bench: end to end through the lab gateway, against the peers");
        let rows = e2e::measure(&plan);
        let _ = writeln!(report, "{}", e2e_tables(&plan, &rows));
    }
    if runs("throughput") {
        eprintln!("bench: throughput with offloads off, against the peers");
        let rows = throughput::measure(&plan);
        let _ = writeln!(report, "{}", throughput_table(&plan, &rows));
    }
    if runs("new-flows") {
        eprintln!("bench: new UDP flows, against the peers");
        let rows = new_flows::measure(&plan);
        let _ = writeln!(report, "{}", new_flows_table(&plan, &rows));
    }
    if runs("in-place") {
        eprintln!("bench: the agent's kernel cost in place");
        let (rows, ab) = in_place::measure(&plan);
        let _ = writeln!(report, "{}", in_place_table(&plan, &rows));
        if let Some(agent_b) = &plan.agent_b {
            let _ = writeln!(report, "{}", in_place_ab_table(agent_b, &ab));
        }
    }
    if runs("lists") {
        eprintln!("bench: rule lists of 10 and 100,000 entries");
        let rows = lists::measure(&plan);
        let _ = writeln!(report, "{}", lists_table(&rows));
    }
    if runs("owners") {
        eprintln!("bench: naming socket owners, per socket call");
        let row = owners::measure(&plan);
        let _ = writeln!(report, "{}", owners_table(&plan, &row));
    }
    if runs("latency") {
        eprintln!("bench: LargeUpload detection latency");
        let row = latency::measure(&plan);
        let _ = writeln!(report, "{}", latency_table(&row));
    }

    let _ = writeln!(
        report,
        "Suite run time: {:.0} s.\n{END}",
        started.elapsed().as_secs_f64()
    );
    print!("{report}");
    if let Some(path) = write.filter(|_| only.is_none()) {
        replace_section(&path, &report);
        eprintln!("bench: wrote {}", path.display());
    }
}

fn header(plan: &Plan) -> String {
    let machine = machine();
    format!(
        "## The benchmark suite\n\n\
         Command: `cargo xtask bench{}` (release build)\n\
         Machine: {machine}\n\
         Date: {}\n\n\
         Every figure is the median of {} runs, taken side by side in one run of the suite.\n",
        if plan.quick { " --quick" } else { "" },
        command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        plan.runs,
    )
}

fn kernel_table(plan: &Plan, rows: &[kernel::Row]) -> String {
    let mut out = format!(
        "### Kernel cost per packet\n\n\
         `BPF_PROG_TEST_RUN` of the agent's `xdp_ingress` and `tc_egress` and of reference \
         programs assembled by the benchmark: a bare pass; a count-only program (one per-CPU \
         array counter, the least a counting program does); and the floor of any \
         per-connection counter, one lookup of a 40-byte key (the agent's flow key size) in a \
         per-CPU hash map and an increment, without and with reading the clock as every \
         packet's timestamp needs, and the floor of any new connection, one insert of such a \
         key (taken from the frame) with a zero value of the agent's value size into a \
         preallocated per-CPU hash map of the agent's capacity, and of a known one run the \
         same way, a lookup of that key, three adds and the clock; then the same floors with a \
         shared (not per-CPU) hash map holding values of the agent's size, where a count \
         shared by the CPUs needs an atomic add (`lock xadd` once JITed) for each of a \
         direction's three counts. Frames: TCP with {} bytes of payload. A hot flow repeats \
         one frame {} times per run (one map insert, then updates); \"CPUs 0 and 1 at once\": \
         two threads, one pinned to each CPU, run the same frame that many times together, \
         one connection counted by both CPUs (the mean of the two). One run per call: {} \
         distinct frames run once each, first as new flows (each an insert), then again as \
         known ones, set against the bare program run the same way (each call also pays the \
         kernel's timer and a cold cache). \"TC ingress, attached\": test_run builds linear \
         skbs only, so `tc_ingress` is attached to a veth, fed {} frames per run through \
         AF_PACKET and timed by the kernel's run-time statistics (each run also pays their \
         two clock reads): a 3,000-byte frame is built linear, an 8,000-byte one keeps only \
         its Ethernet header in the linear part, and its headers are read again through \
         `bpf_skb_load_bytes`.\n\n\
         | hook | case | ns per packet | added over bare pass |\n|---|---|---|---|\n",
        1400,
        plan.repeat,
        plan.new_flows,
        kernel::nonlinear_frames(plan)
    );
    for row in rows {
        let added = row
            .added
            .map_or_else(|| "—".to_owned(), |ns| format!("{ns:.1}"));
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {added} |",
            row.hook, row.case, row.ns
        );
    }
    out
}

fn poll_table(rows: &[poll::Row]) -> String {
    let mut out = String::from(
        "### Agent poll cost\n\n\
         The agent (`--pin-path`, 1 s polls, 1 h idle timeout) on a map the benchmark fills \
         with synthetic TCP connections, each to its own remote host, their last packet \
         \"now\". Written from user space, they reach the agent through one whole read (the \
         fill counts a lost change) and then carry nothing: the polls measured are of a \
         table where nothing moves, which a poll no longer reads (see the next table for \
         one where some do). Poll time: the mean of the agent's `poll_duration_seconds` over the window; map read alone: the \
         agent's own map reader (`BPF_MAP_LOOKUP_BATCH`, 256 entries per call) run by the \
         benchmark on the same map after the agent stopped, the floor of any poll; CPU: the \
         agent's utime + stime per second of wall time; memory: its VmRSS beyond what it held \
         with the map empty, per connection (the connection table, and the window sums of \
         each local-remote pair).\n\n\
         | live connections | poll time (ms) | map read alone (ms) | agent CPU (s per s) | agent memory per connection (bytes) |\n\
         |---|---|---|---|---|\n",
    );
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.1} | {:.3} | {:.0} |",
            row.entries, row.poll_ms, row.read_ms, row.cpu_per_sec, row.bytes_per_conn
        );
    }
    out
}

fn busy_table(rows: &[poll::BusyRow]) -> String {
    let mut out = String::from(
        "### Agent poll cost when few connections move, and when all do\n\n\
         The agent as above on a map of synthetic connections, idle since the benchmark \
         wrote them (an hour from their timeout), while real UDP connections on the lab \
         gateway's loopback carry one packet each per second, spread over the second; then \
         on a map of real connections only, every one of them carrying a packet each \
         second. Entries read: the agent's `poll_entries_read` at the end of the window. \
         Whole reads: the share of the window's polls that read the whole map \
         (`poll_reads_total{coverage=\"whole\"}`): the agent reads the map whole when \
         looking up what changed key by key would cost more. Map read alone: the agent's \
         map reader run by the benchmark on the same map after the agent stopped, what one \
         whole read costs; before polls followed what changed, every poll read the map \
         whole.\n\n\
         | connections | active per second | poll time (ms) | map read alone (ms) | agent CPU (s per s) | entries read per poll | whole reads |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {:.1} | {:.3} | {:.0} | {:.0} % |",
            row.entries,
            row.active,
            row.poll_ms,
            row.read_ms,
            row.cpu_per_sec,
            row.entries_read,
            row.whole_share * 100.0
        );
    }
    out
}

fn nat_table(learn: &nat::LearnRow, poll: &nat::PollRow) -> String {
    format!(
        "### Following address translation (NAT)\n\n\
         Learning: the agent's NAT stage in a masquerading lab gateway (nftables) reads the \
         conntrack events of {} real translated connections (one UDP datagram from the lan \
         host to each of as many ports of the wan host, its events read every {} \
         datagrams), then, as at start, the whole conntrack table holding them.\n\n\
         | translations | reading new-entry events, µs per translation | reading the table at start, µs per entry |\n\
         |---|---|---|\n\
         | {} | {:.2} | {:.2} |\n\n\
         The table stage of a poll (the map read excluded: see the poll table) with {} \
         connections as the WAN side's map holds them, each to its own remote host: handed \
         to the connection table as read (no NAT stage), through the NAT stage with nothing \
         translated, and with every one translated (its conntrack entry learned); the second \
         of two polls, in process. Memory: resident growth of the translations and their \
         bindings beyond the connection table's own, per translated connection.\n\n\
         | connections | no NAT stage (ms) | nothing translated (ms) | all translated (ms) | memory per translation (bytes) |\n\
         |---|---|---|---|---|\n\
         | {} | {:.1} | {:.1} | {:.1} | {:.0} |\n",
        learn.translations,
        nat::BURST,
        learn.translations,
        learn.event_us,
        learn.dump_us,
        poll.connections,
        poll.connections,
        poll.direct_ms,
        poll.untranslated_ms,
        poll.translated_ms,
        poll.bytes_per_translation,
    )
}

fn read_floor_table(rows: &[poll::ReadRow]) -> String {
    let mut out = String::from(
        "The floor of that read per map kind: `BPF_MAP_LOOKUP_BATCH` (256 entries per call) \
         of every entry of a per-CPU hash map (one value per possible CPU per entry, as the \
         agent's flow map had before it was shared) and of a shared hash map (one value per \
         entry, as the agent's flow map has), both with the \
         flow map's key and value sizes (40 and 104 bytes) and twice the entries as \
         capacity, filled by the benchmark and read in turn, without the agent. Then the \
         shared map read key by key, one `BPF_MAP_LOOKUP_ELEM` per entry, as the agent reads \
         the entries its programs name as changed.\n\n\
         | entries | per-CPU hash read (ms) | shared hash read (ms) | shared / per-CPU | shared hash, key by key (ms) |\n\
         |---|---|---|---|---|\n",
    );
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.1} | {:.2} | {:.1} |",
            row.entries,
            row.per_cpu_ms,
            row.shared_ms,
            row.shared_ms / row.per_cpu_ms,
            row.by_key_ms
        );
    }
    out
}

fn e2e_tables(plan: &Plan, rows: &[e2e::Row]) -> String {
    let pmacctd = rows
        .iter()
        .find(|r| r.setup == e2e::Setup::Pmacctd)
        .expect("a pmacctd row");
    let mut out = format!(
        "### End to end through the lab gateway, against the peers\n\n\
         The test lab (lan host — gateway — wan host, veth pairs; TSO and GSO on, as the \
         kernel sets them). Each monitor watches the gateway's WAN-facing veth: this agent \
         with its default hooks; pmacctd (pmacct, libpcap) with the memory plugin aggregating \
         by src_host, dst_host, src_port, dst_port, proto, its core-to-plugin queue sized as \
         pmacct's QUICKSTART advises for heavy traffic (plugin_buffer_size 10240, \
         plugin_pipe_size 10240000), its table allowed 65,536 memory pools \
         (imt_mem_pools_number; 16 hold about 8,000 flows); `softflowd -d` (libpcap) \
         exporting NetFlow v5 to the gateway's loopback. \
         iperf3 from the lan host to the wan host: a TCP upload for {} s, then UDP with {} B \
         of payload offered at `-b {}` for {} s. Each round runs every setup in turn in one \
         lab; every figure is the median over the rounds, and \"vs no monitor\" the median of \
         each round's ratio to that round's no-monitor run. \"Seen\": the UDP packets the \
         monitor counted (its conn log, pmacct's table, softflowd's flows) per packet the \
         WAN veth counted (tx + rx) during the UDP test, which checks that it watched the \
         traffic: a peer that falls behind loses packets (from its capture ring, or \
         pmacctd's queue) and the work they would have cost, so under 90 % the suite \
         fails.\n\n\
         | setup | TCP Gbit/s | vs no monitor | TCP retransmits | UDP datagrams/s delivered | vs no monitor | UDP loss % | seen |\n\
         |---|---|---|---|---|---|---|---|\n",
        e2e::test_secs(plan),
        e2e::UDP_PAYLOAD,
        e2e::UDP_RATE,
        e2e::test_secs(plan),
    );
    for row in rows {
        let seen = row
            .seen
            .map_or_else(|| "—".to_owned(), |s| format!("{:.0} %", s * 100.0));
        let _ = writeln!(
            out,
            "| {} | {:.2} | {:.2} | {:.0} | {:.0} | {:.2} | {:.1} | {seen} |",
            row.setup.label(),
            row.gbits,
            row.tcp_vs_none,
            row.retransmits,
            row.udp_pps,
            row.udp_vs_none,
            row.udp_loss_pct,
        );
    }
    let _ = writeln!(
        out,
        "\nCPU seconds spent monitoring over each test. Process: utime + stime of the \
         monitor's own processes (/proc/PID/stat; for pmacctd its core process and its \
         plugin process). Softirq extra: the whole machine's softirq time (/proc/stat) over \
         the test, less that of the same round's no-monitor test scaled by the ratio of \
         packets the gateway forwarded (WAN veth tx) in the two tests; BPF programs and the \
         copies of packets to AF_PACKET sockets are accounted there. Monitoring: process + \
         softirq extra, per round, then the median (so it need not equal the sum of the \
         two medians). Softirq time is sampled at the scheduler tick and shared with \
         everything else the machine does: too coarse for the agent's share, so the run \
         time of its BPF programs (bpf_stats, which are on during this part and add two \
         clock reads to each run) is shown beside it.\n\n\
         | setup | test | process CPU s | softirq extra s | monitoring CPU s | vs pmacctd | BPF run time s |\n\
         |---|---|---|---|---|---|---|"
    );
    for row in rows.iter().filter(|r| r.setup != e2e::Setup::None) {
        for (test, cpu, peer) in [
            ("TCP", row.tcp_cpu, pmacctd.tcp_cpu),
            ("UDP", row.udp_cpu, pmacctd.udp_cpu),
        ] {
            let bpf = if row.setup == e2e::Setup::Agent {
                format!("{:.3}", cpu.bpf)
            } else {
                "—".to_owned()
            };
            let _ = writeln!(
                out,
                "| {} | {test} | {:.2} | {:.2} | {:.2} | {} | {bpf} |",
                row.setup.label(),
                cpu.process,
                cpu.softirq_extra,
                cpu.monitoring,
                ratio(cpu.monitoring, peer.monitoring),
            );
        }
    }
    if let Some(agent) = rows.iter().find(|r| r.setup == e2e::Setup::Agent) {
        let share = |own: e2e::Cpu, peer: e2e::Cpu| ratio(own.process + own.bpf, peer.monitoring);
        let _ = writeln!(
            out,
            "\nWith the agent's monitoring CPU taken as its process CPU plus its BPF run time \
             instead: {} of pmacctd's monitoring CPU in the TCP test, {} in the UDP test.",
            share(agent.tcp_cpu, pmacctd.tcp_cpu),
            share(agent.udp_cpu, pmacctd.udp_cpu),
        );
    }
    out
}

/// `own / peer`, or a dash where the peer's figure is lost in the noise (not positive).
fn ratio(own: f64, peer: f64) -> String {
    if peer > 0.0 {
        format!("{:.2}", own / peer)
    } else {
        "—".to_owned()
    }
}

/// What the parts in the lab with offloads off share.
const WIRE_LAB: &str = "The test lab as above, but with TSO, GSO, UDP segmentation and \
     GSO lists off on all four veths (a veth has GRO off unless asked): each sender \
     segments before its veth, so every wire packet crosses the gateway, and the \
     monitors' hooks, as a packet of its own. The monitors watch the gateway's WAN-facing \
     veth, each run as above: the agent at its defaults (TC ingress and egress), pmacctd \
     and softflowd as configured there.";

fn throughput_table(plan: &Plan, rows: &[throughput::Row]) -> String {
    let mut out = format!(
        "### Throughput with every wire packet through the hooks\n\n\
         {WIRE_LAB} iperf3 TCP uploads from the lan host to the wan host for {} s: one \
         stream, then {} streams (`-P {}`). {}, each running every setup in turn in \
         one lab; Gbit/s is the median over the rounds, \"vs no monitor\" the median of each \
         round's ratio to that round's no-monitor run. \"Seen\": the TCP packets the \
         monitor counted (its conn log, pmacct's table, softflowd's flows) per packet the \
         WAN veth counted (tx + rx) over both tests; not checked, but a monitor that misses \
         packets also skips the work they would have cost. The counting floor is not a \
         monitor: the reference program of the in-place part below (a 40-byte key looked up \
         in a shared hash map of the agent's size, inserted when absent, three atomic adds \
         and the clock), attached as the agent attaches (TCX ingress and egress) in place of \
         a monitor, with a new map in each round: the throughput that exact per-connection \
         counting on these hooks leaves at the most; its \"seen\" is the packets its map \
         counted.\n\n\
         | setup | 1 stream Gbit/s | vs no monitor | {} streams Gbit/s | vs no monitor | seen |\n\
         |---|---|---|---|---|---|\n",
        e2e::test_secs(plan),
        throughput::STREAMS,
        throughput::STREAMS,
        rounds(plan.wire_rounds),
        throughput::STREAMS,
    );
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {:.2} | {:.3} | {:.2} | {:.3} | {} |",
            row.setup.label(),
            row.gbits[0],
            row.vs_none[0],
            row.gbits[1],
            row.vs_none[1],
            percent(row.seen),
        );
    }
    out
}

fn new_flows_table(plan: &Plan, rows: &[new_flows::Row]) -> String {
    let mut out = format!(
        "### New UDP flows\n\n\
         {WIRE_LAB} The lan host opens {} new UDP flows per second for {} s: one {}-byte \
         datagram each, from one socket to port after port of the wan host ({}–{}), from \
         a new socket (a new source port) whenever the ports run out, so that every \
         datagram is a flow of its own; the sender keeps the pace in 1 ms batches. The wan \
         host drops them (nftables, in its input): nothing answers. The window runs from \
         the first datagram to {} s after the last (the agent's next poll and the peers' \
         queues fall in it). Host CPU: the whole machine's busy time over the window \
         (/proc/stat: user, nice, system, irq, softirq, steal) per 100k flows: the \
         generator, the forwarding, the monitor and anything else the machine runs; \
         \"beyond no monitor\": less that of the same round's no-monitor run, per round, \
         then the median. Watcher's own CPU: utime + stime of the monitor's own processes \
         (/proc/PID/stat; pmacctd's core and its plugin) per 100k flows. For the agent \
         that is its user-space process alone: its BPF programs run in the packet path and \
         are charged to no process of its own, so their run time (bpf_stats, on during this \
         part, which adds two clock reads to each run) is shown beside it, and is in the \
         host CPU. softflowd runs at its defaults, which track at most 8,192 flows and \
         expire the oldest early to make room. \"Seen\": the flows the monitor saw (the \
         connections the agent's table learned, its `connections_total` before it stops; \
         pmacct's UDP table entries; softflowd's active and expired flows) per flow sent; \
         under 90 % the suite fails. \
         {}, each running every setup in turn in one lab; medians over the \
         rounds.\n\n\
         | setup | flows sent | flows/s | host CPU s per 100k flows | beyond no monitor | watcher's own CPU s per 100k flows | BPF run time s per 100k flows | seen |\n\
         |---|---|---|---|---|---|---|---|\n",
        new_flows::RATE,
        new_flows::secs(plan),
        new_flows::PAYLOAD,
        traffic::NEW_FLOW_PORTS.start,
        traffic::NEW_FLOW_PORTS.end - 1,
        new_flows::SETTLE.as_secs(),
        rounds(plan.wire_rounds),
    );
    for row in rows {
        let (extra, own) = if row.setup == e2e::Setup::None {
            ("—".to_owned(), "—".to_owned())
        } else {
            (
                format!("{:.3}", row.host_extra),
                format!("{:.3}", row.own_cpu),
            )
        };
        let bpf = row
            .bpf
            .map_or_else(|| "—".to_owned(), |s| format!("{s:.3}"));
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.3} | {extra} | {own} | {bpf} | {} |",
            row.setup.label(),
            row.flows,
            row.flows_per_sec,
            row.host_cpu,
            percent(row.seen),
        );
    }
    if let Some((records, lost)) = rows.iter().find_map(|r| r.conn_log) {
        let _ = writeln!(
            out,
            "\nThe agent's conn log once it stopped (its open connections are written at \
             the stop): {:.1} % of the flows sent as UDP records; records it had counted as \
             lost before the stop (`log_records_lost_total`): {lost:.0}.",
            records * 100.0
        );
    }
    out
}

fn in_place_table(plan: &Plan, rows: &[in_place::Row]) -> String {
    let mut out = format!(
        "### Kernel cost in place\n\n\
         {WIRE_LAB} With kernel.bpf_stats_enabled on, the run_time_ns and run_cnt of the \
         agent's programs (by their IDs, from the kernel) over each workload; then the \
         same workloads with an empty program (`r0 = TC_ACT_OK; exit`) attached the same \
         way (TCX ingress and egress) in the same place instead: what the hooks and the \
         statistics' two clock reads per run cost by themselves. Raw: the agent's ns per \
         run (a run is one packet through one hook); net: raw less the empty program's, \
         per round, then the median. Hot TCP flow: one iperf3 upload stream for {} s, its \
         data segments through TC egress, its ACKs through TC ingress, one connection the \
         map already knows. New UDP flows: {} per second for {} s as in the new-flows \
         test, each datagram one run of TC egress and one insert into the agent's flow \
         map. New TLS connections: {} connections, one after another, from the lan host \
         to a server on the wan host that accepts and closes them; each sends one \
         ClientHello record (the first payload, which the programs copy to their ring) \
         and closes: the net cost per connection is the net ns per packet times the runs \
         per test over the connections. Counting floor: a reference program assembled by \
         the benchmark, attached the same way after the empty program, with a shared hash \
         map (`BPF_MAP_TYPE_HASH`) of the agent's value size ({} bytes) and capacity ({} \
         entries), new in each round. For each IPv4 frame it makes a 40-byte key of the \
         addresses and ports (the rest zero), looks it up, inserts it when absent \
         (`BPF_NOEXIST`) and looks it up again, then makes three atomic 64-bit adds and \
         stores `bpf_ktime_get_ns()` in the value: the least any exact per-connection \
         counter with a timestamp does per packet, of a known connection (the hot flow) \
         or a new one (each new flow's packet is an insert). It keys each direction apart \
         and does nothing else the agent does (no IPv6, VLAN or option parsing, no \
         orientation, flags, change ring or payload copy); the suite fails unless its map \
         gained an entry per flow sent (two for the hot flow; 99 % of the new UDP flows, \
         a datagram being droppable in the lab). Floor net: its ns per run \
         less the empty program's, per round, then the median: the least the agent's net \
         can be on the same packets. {}, the agent, the empty program, then the counting \
         floor in each; medians.\n\n\
         | workload | runs per test | raw ns per packet | empty program ns per packet | net ns per packet | counting floor ns per packet | floor net ns per packet |\n\
         |---|---|---|---|---|---|---|\n",
        in_place::secs(plan),
        new_flows::RATE,
        in_place::secs(plan),
        in_place::tls_connections(plan),
        kernel::VALUE_SIZE,
        monitor_common::DEFAULT_FLOW_MAP_SIZE,
        rounds(plan.wire_rounds),
    );
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            row.workload.label(),
            row.runs,
            row.raw_ns,
            row.empty_ns,
            row.net_ns,
            row.floor_ns,
            row.floor_net_ns,
        );
    }
    out
}

/// "1 round", "3 rounds".
fn rounds(n: u32) -> String {
    if n == 1 {
        "1 round".to_owned()
    } else {
        format!("{n} rounds")
    }
}

/// A share as a whole percentage, or a dash without one.
fn percent(share: Option<f64>) -> String {
    share.map_or_else(|| "—".to_owned(), |s| format!("{:.0} %", s * 100.0))
}

fn lists_table(rows: &[lists::Row]) -> String {
    let mut table = String::from(
        "### Rule lists: matching cost per connection\n\n\
         A destination matched against an `--allow-dst` list (half networks, half host names \
         with their resolved addresses), in process: through the agent's matcher (a prefix \
         trie for networks, a table of the names' addresses), and by a scan of every entry as lists \
         were matched before; destinations a third in a listed network, a third at a listed \
         name's address, a third unlisted, 3,000 in all; each figure per connection in the \
         fastest of passes over them for 300 ms, the pass least disturbed by other work on \
         the machine. Floor: one lookup of the destination in a hash \
         set of the list's addresses, the least any lookup in a table of that size costs. \
         Load: reading the list from its file and building the matcher, as a reload \
         (SIGHUP) does, with its table of the names' addresses, which the matcher builds \
         again whenever the resolver answers anew.\n\n\
         | entries | matcher (ns per connection) | scan (ns per connection) | floor (ns) | load (ms) |\n\
         |---|---|---|---|---|\n",
    );
    for row in rows {
        let _ = writeln!(
            table,
            "| {} | {:.0} | {:.0} | {:.0} | {:.2} |",
            row.entries, row.matcher_ns, row.scan_ns, row.floor_ns, row.load_ms
        );
    }
    table
}

fn owners_table(plan: &Plan, row: &owners::Row) -> String {
    let mut table = format!(
        "### Naming socket owners: cost per socket call\n\n\
         The lab gateway's own socket calls over loopback, which the agent does not watch: \
         only the programs that keep socket owners (at the root cgroup) are in their path. \
         A TCP `connect()` to a loopback port nothing listens on (refused at once: socket, \
         connect, close); a new UDP socket's `bind()` and first datagram; a datagram from a \
         socket that sent before. Timed without an agent and with one watching the \
         WAN-facing veth at its defaults, in turn, {} rounds; medians. The counting \
         programs' share is in the in-place table: a connection's first packet in each \
         direction looks its socket up, every other packet pays one comparison.\n\n\
         | call | without agent (ns) | with agent (ns) | added (ns) |\n|---|---|---|---|\n",
        plan.runs
    );
    for (call, [without, with]) in [
        ("TCP connect and close", row.connect_ns),
        ("UDP bind and first datagram", row.first_send_ns),
        ("UDP datagram", row.send_ns),
    ] {
        let _ = writeln!(
            table,
            "| {call} | {without:.0} | {with:.0} | {:.0} |",
            with - without
        );
    }
    table
}

fn latency_table(row: &latency::Row) -> String {
    format!(
        "### LargeUpload detection latency\n\n\
         The agent at its default poll interval ({} s) with `--upload-threshold 1MB \
         --upload-min-packets 10` and its alert log in a file. {} crossings, each a new TCP \
         connection from the lan host that writes exactly {} bytes of payload and then \
         stays open and idle; each waits a different fraction of the poll interval before \
         writing (golden-ratio steps), so the crossings fall at spread phases of the poll. \
         Latency: from the moment the server in the wan host has read the last byte (the \
         byte that crosses the threshold has then left the gateway) to the moment the alert \
         line is in the file (read every 2 ms).\n\n\
         | crossings | median ms | min ms | max ms |\n|---|---|---|---|\n\
         | {} | {:.0} | {:.0} | {:.0} |\n",
        latency::POLL_INTERVAL.as_secs(),
        row.crossings,
        latency::THRESHOLD + 1,
        row.crossings,
        row.median_ms,
        row.min_ms,
        row.max_ms,
    )
}

fn in_place_ab_table(agent_b: &Path, ab: &[Vec<in_place::AbRound>]) -> String {
    let mut out = format!(
        "### Kernel cost in place, agent B against the agent\n\n\
         Agent B: `{}`, run in each round of the table above right after the agent, the \
         same way. Net ns per packet of each, and of the counting floor, per round; then \
         the median of B less the agent over the rounds.\n\n\
         | workload | round | the agent, net | agent B, net | B less the agent | counting floor, net |\n\
         |---|---|---|---|---|---|\n",
        agent_b.display()
    );
    for (workload, rounds) in in_place::WORKLOADS.iter().zip(ab) {
        for (i, round) in rounds.iter().enumerate() {
            let _ = writeln!(
                out,
                "| {} | {} | {:.1} | {:.1} | {:+.1} | {:.1} |",
                workload.label(),
                i + 1,
                round.agent,
                round.agent_b,
                round.agent_b - round.agent,
                round.floor
            );
        }
        let _ = writeln!(
            out,
            "| {} | median | | | {:+.1} | |",
            workload.label(),
            median(rounds.iter().map(|r| r.agent_b - r.agent))
        );
    }
    out
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_default();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    format!(
        "{cpus} vCPUs ({model}), {mem_gib:.0} GiB, Linux {}",
        command_output("uname", &["-r"])
    )
}

fn command_output(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Replaces the text between the suite's markers in `path` (appends it when absent).
fn replace_section(path: &PathBuf, report: &str) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let new = match (text.find(START), text.find(END)) {
        (Some(start), Some(end)) if start < end => {
            format!(
                "{}{}{}",
                &text[..start],
                report.trim_end(),
                &text[end + END.len()..]
            )
        }
        _ => format!("{}\n{}", text.trim_end(), report),
    };
    std::fs::write(path, new).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}
