//! Kernel timestamps (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) to wall-clock time.

use std::time::{SystemTime, UNIX_EPOCH};

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec to write.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The kernel programs' clock now.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Converts kernel timestamps to epoch seconds with the offset between the two clocks,
/// taken once (so a wall-clock step does not reorder a connection's own timestamps).
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    wall_minus_mono_ns: i128,
}

impl Clock {
    pub fn new() -> Self {
        let mono = monotonic_ns() as i128;
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        Self {
            wall_minus_mono_ns: wall - mono,
        }
    }

    /// A clock whose monotonic zero is the given epoch time (for tests).
    pub fn with_offset_ns(wall_minus_mono_ns: i128) -> Self {
        Self { wall_minus_mono_ns }
    }

    pub fn epoch_secs(&self, mono_ns: u64) -> f64 {
        (mono_ns as i128 + self.wall_minus_mono_ns) as f64 / 1e9
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// The poll's time, on the kernel's clock (to compare with packet timestamps) and as
/// epoch seconds (for alerts and aligned windows).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Now {
    pub mono_ns: u64,
    pub epoch: f64,
}

impl Now {
    pub fn new(mono_ns: u64, clock: &Clock) -> Self {
        Self {
            mono_ns,
            epoch: clock.epoch_secs(mono_ns),
        }
    }
}
