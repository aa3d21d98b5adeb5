//! A process's and the machine's CPU time and memory, from /proc: how benchmarks measure
//! the agent and its peers from outside.

/// `VmRSS` of `pid`, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(hz > 0, "sysconf(_SC_CLK_TCK) = {hz}");
    hz as f64
}

/// utime + stime of `pid` (all its threads), seconds.
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/stat: {e}"));
    // Fields after "(comm)": state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| -> u64 {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("bad /proc/{pid}/stat: {stat}"))
    };
    (ticks(11) + ticks(12)) as f64 / clock_ticks_per_sec()
}

/// The PIDs of `pid`'s live child processes (from each process's parent PID in
/// /proc/PID/stat).
pub fn children(pid: u32) -> Vec<u32> {
    let dir = std::fs::read_dir("/proc").expect("read /proc");
    dir.flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&candidate| {
            // A process may exit between the listing and this read.
            std::fs::read_to_string(format!("/proc/{candidate}/stat"))
                .ok()
                .and_then(|stat| {
                    // Field 4, the parent's PID, is the second after "(comm)".
                    stat.rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .nth(1)?
                        .parse::<u32>()
                        .ok()
                })
                == Some(pid)
        })
        .collect()
}

/// The whole machine's time in softirq (all CPUs), seconds: where packet processing,
/// BPF programs included, is accounted.
pub fn softirq_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("read /proc/stat");
    // cpu  user nice system idle iowait irq softirq ...
    let ticks: u64 = stat
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(7))
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| panic!("bad /proc/stat: {stat}"));
    ticks as f64 / clock_ticks_per_sec()
}

/// The whole machine's busy time (all CPUs: user, nice, system, irq, softirq and steal,
/// that is everything but idle and iowait), seconds.
pub fn busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("read /proc/stat");
    // cpu  user nice system idle iowait irq softirq steal guest guest_nice; guest time is
    // already in user.
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .take(8)
                .filter_map(|f| f.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(ticks.len(), 8, "bad /proc/stat: {stat}");
    let busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + ticks[7];
    busy as f64 / clock_ticks_per_sec()
}
