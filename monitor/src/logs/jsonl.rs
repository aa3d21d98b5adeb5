use std::{
    fs::OpenOptions,
    io::{self, BufWriter, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use serde::Serialize;

use crate::private;

/// Bumped on SIGHUP: every file log reopens its path before its next write, so logrotate
/// can move files away without losing a line.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Asks every [`JsonLines`] file to reopen its path on its next write.
pub fn request_reopen() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// Appends JSON objects, one per line, to a file (or stdout for `-`). Buffered: call
/// [`JsonLines::flush`] after each poll so readers see whole lines promptly.
pub struct JsonLines {
    path: PathBuf,
    out: BufWriter<Box<dyn Write + Send>>,
    generation: u64,
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
            out: BufWriter::new(open_out(path)?),
            generation: GENERATION.load(Ordering::Relaxed),
        })
    }

    pub fn write<T: Serialize>(&mut self, record: &T) -> io::Result<()> {
        let generation = GENERATION.load(Ordering::Relaxed);
        if generation != self.generation && self.path != Path::new("-") {
            self.out.flush()?;
            self.out = BufWriter::new(open_out(&self.path)?);
            self.generation = generation;
        }
        serde_json::to_writer(&mut self.out, record)?;
        self.out.write_all(b"\n")
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopens_a_moved_file_on_request() {
        let dir = std::env::temp_dir().join(format!("jsonl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (path, rotated) = (dir.join("conn.log"), dir.join("conn.log.1"));
        let mut log = JsonLines::open(&path).unwrap();
        log.write(&1).unwrap();
        log.flush().unwrap();
        std::fs::rename(&path, &rotated).unwrap();
        log.write(&2).unwrap();
        request_reopen();
        log.write(&3).unwrap();
        log.flush().unwrap();
        assert_eq!(std::fs::read_to_string(&rotated).unwrap(), "1\n2\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "3\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
