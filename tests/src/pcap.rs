//! Classic pcap files (the libpcap format `tcpdump -w` writes): Ethernet frames with
//! microsecond timestamps, written for `tcpreplay` and read back.
//!
//! ```
//! use std::time::Duration;
//! use tests::pcap::{self, Record};
//! let frame = tests::packet::Frame::eth().ipv4([10, 0, 0, 1], [10, 0, 0, 2]).udp(1, 2).build();
//! let mut file = Vec::new();
//! let mut w = pcap::Writer::new(&mut file).unwrap();
//! w.write(Duration::new(1_700_000_000, 1_000), &frame).unwrap();
//! let records = pcap::parse(&file).unwrap();
//! assert_eq!(records, vec![Record { ts: Duration::new(1_700_000_000, 1_000), orig_len: frame.len() as u32, data: frame }]);
//! ```

use std::{
    fs::File,
    io::{self, BufWriter, Write},
    path::Path,
    time::Duration,
};

/// Magic number of a microsecond-resolution file, in the writer's byte order.
pub const MAGIC_USEC: u32 = 0xa1b2_c3d4;
/// Magic number of a nanosecond-resolution file.
pub const MAGIC_NSEC: u32 = 0xa1b2_3c4d;
pub const LINKTYPE_ETHERNET: u32 = 1;
/// Largest frame a record may hold.
pub const SNAPLEN: u32 = 65_535;
const FILE_HEADER_LEN: usize = 24;
const RECORD_HEADER_LEN: usize = 16;

/// One captured frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Since the Unix epoch.
    pub ts: Duration,
    /// The frame as it was on the wire; `data` may be a prefix of it.
    pub orig_len: u32,
    pub data: Vec<u8>,
}

/// Writes a pcap stream: the file header at once, then one record per [`Writer::write`].
pub struct Writer<W: Write> {
    out: W,
}

impl<W: Write> Writer<W> {
    pub fn new(mut out: W) -> io::Result<Self> {
        let mut h = Vec::with_capacity(FILE_HEADER_LEN);
        h.extend_from_slice(&MAGIC_USEC.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes()); // version 2.4
        h.extend_from_slice(&4u16.to_le_bytes());
        h.extend_from_slice(&0i32.to_le_bytes()); // thiszone: UTC
        h.extend_from_slice(&0u32.to_le_bytes()); // sigfigs
        h.extend_from_slice(&SNAPLEN.to_le_bytes());
        h.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        out.write_all(&h)?;
        Ok(Self { out })
    }

    /// A whole frame (captured length = wire length), with its timestamp rounded down to
    /// the microsecond.
    pub fn write(&mut self, ts: Duration, frame: &[u8]) -> io::Result<()> {
        let caplen = u32::try_from(frame.len())
            .ok()
            .filter(|&len| len <= SNAPLEN)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a {}-byte frame exceeds the snaplen {SNAPLEN}", frame.len()),
                )
            })?;
        let secs = u32::try_from(ts.as_secs()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("timestamp {ts:?} does not fit the 32-bit seconds field"),
            )
        })?;
        let mut h = Vec::with_capacity(RECORD_HEADER_LEN);
        h.extend_from_slice(&secs.to_le_bytes());
        h.extend_from_slice(&ts.subsec_micros().to_le_bytes());
        h.extend_from_slice(&caplen.to_le_bytes());
        h.extend_from_slice(&caplen.to_le_bytes());
        self.out.write_all(&h)?;
        self.out.write_all(frame)
    }

    pub fn finish(mut self) -> io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Writes `frames` (timestamp, bytes) to a new file at `path`; panics on any error.
pub fn write_file(path: &Path, frames: &[(Duration, Vec<u8>)]) {
    let write = || -> io::Result<()> {
        let mut w = Writer::new(BufWriter::new(File::create(path)?))?;
        for (ts, frame) in frames {
            w.write(*ts, frame)?;
        }
        w.finish()?
            .into_inner()
            .map_err(|e| e.into_error())?
            .sync_all()
    };
    write().unwrap_or_else(|e| panic!("write pcap {}: {e}", path.display()));
}

/// Reads the records of a classic pcap file at `path`; panics if it is not one.
pub fn read_file(path: &Path) -> Vec<Record> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read pcap {}: {e}", path.display()));
    parse(&bytes).unwrap_or_else(|e| panic!("pcap {}: {e}", path.display()))
}

/// Parses a classic pcap file of either byte order and either timestamp resolution.
pub fn parse(bytes: &[u8]) -> Result<Vec<Record>, String> {
    let header = bytes
        .get(..FILE_HEADER_LEN)
        .ok_or_else(|| format!("{} bytes: shorter than the file header", bytes.len()))?;
    let raw_magic = [header[0], header[1], header[2], header[3]];
    let (big_endian, nanos) = match (u32::from_le_bytes(raw_magic), u32::from_be_bytes(raw_magic)) {
        (MAGIC_USEC, _) => (false, false),
        (MAGIC_NSEC, _) => (false, true),
        (_, MAGIC_USEC) => (true, false),
        (_, MAGIC_NSEC) => (true, true),
        _ => return Err(format!("bad magic {raw_magic:02x?}")),
    };
    let u32_at = |b: &[u8], at: usize| {
        let word = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if big_endian {
            u32::from_be_bytes(word)
        } else {
            u32::from_le_bytes(word)
        }
    };
    let linktype = u32_at(header, 20);
    if linktype != LINKTYPE_ETHERNET {
        return Err(format!("link type {linktype}, not Ethernet"));
    }

    let mut records = Vec::new();
    let mut at = FILE_HEADER_LEN;
    while at < bytes.len() {
        let h = bytes
            .get(at..at + RECORD_HEADER_LEN)
            .ok_or_else(|| format!("record {} at byte {at}: header cut short", records.len()))?;
        let (secs, frac, caplen, orig_len) =
            (u32_at(h, 0), u32_at(h, 4), u32_at(h, 8), u32_at(h, 12));
        let start = at + RECORD_HEADER_LEN;
        let data = bytes
            .get(start..start + caplen as usize)
            .ok_or_else(|| format!("record {} at byte {at}: data cut short", records.len()))?;
        let ts = Duration::from_secs(secs.into())
            + if nanos {
                Duration::from_nanos(frac.into())
            } else {
                Duration::from_micros(frac.into())
            };
        records.push(Record {
            ts,
            orig_len,
            data: data.to_vec(),
        });
        at = start + caplen as usize;
    }
    Ok(records)
}

#[cfg(test)]
mod self_tests {
    use super::*;

    #[test]
    fn header_layout_is_libpcap_little_endian() {
        let mut w = Writer::new(Vec::new()).unwrap();
        w.write(Duration::new(0x0102_0304, 5_000_999), &[0xaa; 3])
            .unwrap();
        let file = w.finish().unwrap();
        assert_eq!(
            file[..24],
            [
                0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 1, 0,
                0, 0
            ]
        );
        assert_eq!(
            file[24..40],
            [4, 3, 2, 1, 0x88, 0x13, 0, 0, 3, 0, 0, 0, 3, 0, 0, 0],
            "seconds, 5000 us (rounded down), caplen, len"
        );
        assert_eq!(file[40..], [0xaa; 3]);
    }

    #[test]
    fn reads_big_endian_nanosecond_files() {
        let mut file = Vec::new();
        file.extend_from_slice(&MAGIC_NSEC.to_be_bytes());
        file.extend_from_slice(&[0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        file.extend_from_slice(&LINKTYPE_ETHERNET.to_be_bytes());
        file.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 9, 0, 0, 0, 2, 0, 0, 0, 60, 1, 2]);
        assert_eq!(
            parse(&file).unwrap(),
            vec![Record {
                ts: Duration::new(7, 9),
                orig_len: 60,
                data: vec![1, 2]
            }]
        );
    }

    #[test]
    fn rejects_cut_records() {
        let mut w = Writer::new(Vec::new()).unwrap();
        w.write(Duration::ZERO, &[0; 10]).unwrap();
        let file = w.finish().unwrap();
        assert!(parse(&file[..file.len() - 1]).is_err());
        assert!(parse(&file[..30]).is_err());
    }
}
