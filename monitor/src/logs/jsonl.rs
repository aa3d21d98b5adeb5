use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    path::{Path, PathBuf},
};

use serde::Serialize;

/// Appends JSON objects, one per line, to a file (or stdout for `-`). Buffered: call
/// [`JsonLines::flush`] after each poll so readers see whole lines promptly.
pub struct JsonLines {
    path: PathBuf,
    out: BufWriter<Box<dyn Write + Send>>,
}

impl JsonLines {
    pub fn open(path: &Path) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = if path == Path::new("-") {
            Box::new(io::stdout())
        } else {
            let file: File = OpenOptions::new().create(true).append(true).open(path)?;
            Box::new(file)
        };
        Ok(Self {
            path: path.to_owned(),
            out: BufWriter::new(out),
        })
    }

    pub fn write<T: Serialize>(&mut self, record: &T) -> io::Result<()> {
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
