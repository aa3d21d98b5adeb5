//! A JSON-lines file (or stdout) that survives a failing disk and logrotate: records wait
//! in memory while the file cannot take them, and SIGHUP reopens the path.

use std::{
    fs::OpenOptions,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use log::{info, warn};
use serde::Serialize;

use crate::private;

/// Bumped on SIGHUP: every file log reopens its path before its next write, so logrotate
/// can move files away without losing a line.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Lines a log keeps while its file cannot take them (a full disk, a read-only remount);
/// past this, new records are counted as lost.
const PENDING_MAX: usize = 4 << 20;

/// Asks every [`JsonLines`] file to reopen its path on its next write.
pub fn request_reopen() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// A log's troubles since the agent started: `log_write_errors_total` and
/// `log_records_lost_total`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Flushes that failed (each is retried at the next one).
    pub errors: u64,
    /// Records dropped because [`PENDING_MAX`] bytes were already waiting for a file that
    /// would not take them.
    pub lost: u64,
}

/// Appends JSON objects, one per line, to a file (or stdout for `-`). Records wait in
/// memory until [`JsonLines::flush`]; a flush that fails keeps what the file did not take
/// and writes it first next time, so a line is never cut or written twice.
pub struct JsonLines {
    path: PathBuf,
    /// None after a reopen failed: tried again at the next flush.
    out: Option<Box<dyn Write + Send>>,
    pending: Vec<u8>,
    generation: u64,
    stats: LogStats,
    /// In a failure episode: said once when it starts and once when it ends.
    failing: bool,
}

fn open_out(path: &Path) -> io::Result<Box<dyn Write + Send>> {
    if path == Path::new("-") {
        return Ok(Box::new(io::stdout()));
    }
    // Owner and group only: records name hosts and what they sent. Not through a symbolic
    // link: one planted where the log goes would have the agent append to any file.
    let file = private::open_nofollow(
        OpenOptions::new().create(true).append(true).mode(0o640),
        path,
    )?;
    Ok(Box::new(file))
}

impl JsonLines {
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            path: path.to_owned(),
            out: Some(open_out(path)?),
            pending: Vec::new(),
            generation: GENERATION.load(Ordering::Relaxed),
            stats: LogStats::default(),
            failing: false,
        })
    }

    /// Queues one record as a line; written by the next [`JsonLines::flush`], or at once
    /// when [`PENDING_MAX`] bytes are waiting: only a file that refuses them loses records.
    pub fn write<T: Serialize>(&mut self, record: &T) {
        self.reopen_if_asked();
        if self.pending.len() >= PENDING_MAX {
            self.flush_or_count();
            if self.pending.len() >= PENDING_MAX {
                self.stats.lost += 1;
                return;
            }
        }
        let start = self.pending.len();
        match serde_json::to_writer(&mut self.pending, record) {
            Ok(()) => self.pending.push(b'\n'),
            Err(err) => {
                self.pending.truncate(start);
                self.stats.lost += 1;
                warn!(
                    "{}: a record could not be encoded: {err}",
                    self.path.display()
                );
            }
        }
    }

    /// Whether lines are waiting for the file: after a failed flush, or before any flush.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Writes every waiting line. On failure what the file did not take stays, in order.
    pub fn flush(&mut self) -> io::Result<()> {
        self.reopen_if_asked();
        self.write_pending()
    }

    /// After SIGHUP, lines queued before it go to the old file while it takes them; the
    /// rest, and every line after, to a file opened at the path.
    fn reopen_if_asked(&mut self) {
        let generation = GENERATION.load(Ordering::Relaxed);
        if generation != self.generation && self.path != Path::new("-") {
            let _ = self.write_pending();
            self.out = None;
            self.generation = generation;
        }
    }

    fn write_pending(&mut self) -> io::Result<()> {
        let out = match &mut self.out {
            Some(out) => out,
            None => self.out.insert(open_out(&self.path)?),
        };
        let mut written = 0;
        let result = loop {
            if written == self.pending.len() {
                break out.flush();
            }
            match out.write(&self.pending[written..]) {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => break Err(err),
            }
        };
        self.pending.drain(..written);
        result
    }

    /// For logs that must never hold up the pipeline: flushes, and counts and reports a
    /// failure instead of returning it, once when an episode starts and once when it ends.
    pub fn flush_or_count(&mut self) {
        match self.flush() {
            Ok(()) if self.failing => {
                self.failing = false;
                info!(
                    "{}: writes succeed again ({} records lost meanwhile in all)",
                    self.path.display(),
                    self.stats.lost
                );
            }
            Ok(()) => {}
            Err(err) => {
                self.stats.errors += 1;
                if !self.failing {
                    self.failing = true;
                    warn!(
                        "{}: writing failed: {err}; records wait in memory (up to {} MiB, then \
                         they are counted in log_records_lost_total) and are retried every poll",
                        self.path.display(),
                        PENDING_MAX >> 20
                    );
                }
            }
        }
    }

    /// The last flush, at shutdown: what still cannot be written is reported.
    pub fn close(&mut self) {
        self.flush_or_count();
        if self.has_pending() {
            warn!(
                "{}: {} bytes of records could not be written before exit",
                self.path.display(),
                self.pending.len()
            );
        }
    }

    pub fn stats(&self) -> LogStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("jsonl-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn reopens_a_moved_file_on_request() {
        let dir = Scratch::new("reopen");
        let (path, rotated) = (dir.0.join("conn.log"), dir.0.join("conn.log.1"));
        let mut log = JsonLines::open(&path).unwrap();
        log.write(&1);
        log.flush().unwrap();
        std::fs::rename(&path, &rotated).unwrap();
        log.write(&2);
        log.flush().unwrap();
        request_reopen();
        log.write(&3);
        log.flush().unwrap();
        assert_eq!(std::fs::read_to_string(&rotated).unwrap(), "1\n2\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "3\n");
    }

    /// What a [`Disk`] took, and the room it has left.
    type Taken = std::sync::Arc<std::sync::Mutex<(Vec<u8>, usize)>>;

    /// A writer that takes `room` bytes, then fails until it is given more.
    struct Disk {
        taken: Taken,
    }

    impl Write for Disk {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut taken = self.taken.lock().unwrap();
            let (data, room) = &mut *taken;
            if *room == 0 {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            let n = buf.len().min(*room);
            data.extend_from_slice(&buf[..n]);
            *room -= n;
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A log on a [`Disk`] with `room` bytes. It carries stdout's name: a reopen that
    /// another test requests meanwhile leaves it alone.
    fn on_disk(room: usize) -> (JsonLines, Taken) {
        let taken = std::sync::Arc::new(std::sync::Mutex::new((Vec::new(), room)));
        let log = JsonLines {
            path: "-".into(),
            out: Some(Box::new(Disk {
                taken: taken.clone(),
            })),
            pending: Vec::new(),
            generation: GENERATION.load(Ordering::Relaxed),
            stats: LogStats::default(),
            failing: false,
        };
        (log, taken)
    }

    #[test]
    fn a_full_disk_cuts_no_line_and_loses_none_once_it_has_room() {
        let (mut log, taken) = on_disk(5);
        log.write(&"first");
        log.write(&"second");
        log.flush_or_count();
        log.flush_or_count();
        assert_eq!(log.stats(), LogStats { errors: 2, lost: 0 });
        assert!(log.has_pending());
        taken.lock().unwrap().1 = 1000;
        log.write(&"third");
        log.flush_or_count();
        assert!(!log.has_pending());
        assert_eq!(
            String::from_utf8(taken.lock().unwrap().0.clone()).unwrap(),
            "\"first\"\n\"second\"\n\"third\"\n"
        );
    }

    /// Thousands of connections finishing at once, or every open one written at
    /// shutdown, are more than the bound: a file that takes them loses none.
    #[test]
    fn a_file_that_takes_them_loses_no_record_past_the_bound() {
        let (mut log, taken) = on_disk(usize::MAX);
        let record = "x".repeat(1 << 20);
        for _ in 0..6 {
            log.write(&record);
        }
        log.close();
        assert_eq!(log.stats(), LogStats::default());
        assert_eq!(taken.lock().unwrap().0.len(), 6 * ((1 << 20) + 3));
    }

    #[test]
    fn past_the_bound_records_are_counted_as_lost() {
        let (mut log, _) = on_disk(0);
        let record = "x".repeat(1 << 20);
        for _ in 0..6 {
            log.write(&record);
        }
        assert_eq!(log.stats().lost, 2);
    }
}
