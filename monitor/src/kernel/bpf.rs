//! Every raw `bpf(2)` call of the agent, its tests and its benchmarks: the commands aya
//! 0.16 does not expose for hash maps (batch reads, lookup-and-delete, lookups without
//! its per-call checks) or for pinned links (detach), and what the tests and benchmarks
//! need to make maps and programs of their own. Each function checks what the kernel will
//! read or write against the buffers it is given, so all of them are safe to call.

use std::{
    borrow::Borrow,
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use aya::{
    Pod,
    maps::{HashMap, IterableMap as _, MapData},
    programs::TcAttachType,
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
/// `BPF_MAP_UPDATE_ELEM`'s flag: only if the key is absent.
const BPF_NOEXIST: u64 = 1;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// Kernel >= 5.14 for hash maps.
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
/// Kernel >= 5.6.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_LINK_CREATE: libc::c_long = 28;
/// Kernel >= 5.9 (XDP links); TCX links have it from the start.
const BPF_LINK_DETACH: libc::c_long = 34;

const BPF_MAP_TYPE_PERCPU_HASH: u32 = 5;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_MAP_TYPE_LRU_PERCPU_HASH: u32 = 10;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

/// bpf(2) with `attr`, a zero-padded prefix of `union bpf_attr` for `cmd`; what it
/// returned, or the error.
///
/// # Safety
///
/// Every pointer in `attr` must be valid for what `cmd` reads and writes through it.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is valid for `size_of::<T>()` bytes; the caller vouches for the
    // pointers in it.
    let ret =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret)
}

/// [`bpf`] for the commands that return a new descriptor.
///
/// # Safety
///
/// As for [`bpf`].
unsafe fn bpf_fd<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: passed on from the caller.
    let fd = unsafe { bpf(cmd, attr) }?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `union bpf_attr` for `BPF_OBJ_PIN` and `BPF_OBJ_GET`.
#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

impl ObjAttr {
    /// For `path`, which must outlive the call the attr is given to.
    fn new(path: &CString, bpf_fd: u32) -> ObjAttr {
        ObjAttr {
            pathname: path.as_ptr() as u64,
            bpf_fd,
            file_flags: 0,
        }
    }
}

/// The leading fields of `union bpf_attr` for map element commands.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// The leading fields of `union bpf_attr` for batch map commands.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// A map element command; whether the key was there (ENOENT: it was not).
///
/// # Safety
///
/// `key` and `value` must point at a key and a value of the map's sizes.
unsafe fn map_elem(
    cmd: libc::c_long,
    map: BorrowedFd<'_>,
    key: *const u8,
    value: *mut u8,
    flags: u64,
) -> io::Result<bool> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as u64,
        value: value as u64,
        flags,
    };
    // SAFETY: the caller vouches for `key` and `value`.
    match unsafe { bpf(cmd, &mut attr) } {
        Ok(_) => Ok(true),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(err) => Err(err),
    }
}

fn hash_map_fd<T: Borrow<MapData>, K: Pod, V: Pod>(map: &HashMap<T, K, V>) -> BorrowedFd<'_> {
    map.map().fd().as_fd()
}

/// A map element command that reads a key's value.
#[derive(Clone, Copy, Debug)]
pub enum Lookup {
    /// `BPF_MAP_LOOKUP_ELEM`, without aya's per-call map checks.
    Read,
    /// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (aya 0.16 exposes it only for queues and stacks):
    /// the entry is read and removed in one step.
    Take,
}

/// `key`'s value into `value`, as `how` says. Returns whether the key was there.
pub fn lookup<T: Borrow<MapData>, K: Pod, V: Pod>(
    map: &HashMap<T, K, V>,
    how: Lookup,
    key: &K,
    value: &mut V,
) -> io::Result<bool> {
    let cmd = match how {
        Lookup::Read => BPF_MAP_LOOKUP_ELEM,
        Lookup::Take => BPF_MAP_LOOKUP_AND_DELETE_ELEM,
    };
    // SAFETY: aya checked that the map's keys and values are `K` and `V`.
    unsafe {
        map_elem(
            cmd,
            hash_map_fd(map),
            std::ptr::from_ref(key).cast(),
            std::ptr::from_mut(value).cast(),
            0,
        )
    }
}

/// `BPF_MAP_UPDATE_ELEM` with `BPF_NOEXIST`: inserts `key` with `value` unless the map
/// holds it already or is full (`E2BIG`). Returns whether it was inserted.
pub fn insert_new<T: Borrow<MapData>, K: Pod, V: Pod>(
    map: &HashMap<T, K, V>,
    key: &K,
    value: &V,
) -> io::Result<bool> {
    // SAFETY: aya checked that the map's keys and values are `K` and `V`; the kernel only
    // reads the value.
    let inserted = unsafe {
        map_elem(
            BPF_MAP_UPDATE_ELEM,
            hash_map_fd(map),
            std::ptr::from_ref(key).cast(),
            std::ptr::from_ref(value).cast_mut().cast(),
            BPF_NOEXIST,
        )
    };
    match inserted {
        Err(err) if matches!(err.raw_os_error(), Some(libc::EEXIST | libc::E2BIG)) => Ok(false),
        other => other,
    }
}

/// One `BPF_MAP_LOOKUP_BATCH`.
///
/// # Safety
///
/// `keys` and `values` must have room for `count` keys and values of the map's sizes.
unsafe fn lookup_batch_raw(
    map: BorrowedFd<'_>,
    from: Option<&u64>,
    to: &mut u64,
    keys: *mut u8,
    values: *mut u8,
    count: usize,
) -> io::Result<(usize, bool)> {
    let mut attr = BatchAttr {
        in_batch: from.map_or(0, |p| std::ptr::from_ref(p) as u64),
        out_batch: std::ptr::from_mut(to) as u64,
        keys: keys as u64,
        values: values as u64,
        count: count as u32,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: the caller vouches for `keys` and `values`; the batch positions are 8 bytes,
    // more than the 4 a hash map's bucket index takes.
    match unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) } {
        Ok(_) => Ok((attr.count as usize, false)),
        // The end: what this call read is still in the buffers.
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok((attr.count as usize, true)),
        Err(err) => Err(err),
    }
}

/// `BPF_MAP_LOOKUP_BATCH` (kernel >= 5.6; aya 0.16 does not expose it): up to
/// `keys.len()` entries after position `from` (the start when `None`); the position
/// after them goes to `to`. Returns how many were read and whether the map is done.
/// `ENOSPC`: a hash bucket holds more entries than asked for.
pub fn lookup_batch<T: Borrow<MapData>, K: Pod, V: Pod>(
    map: &HashMap<T, K, V>,
    from: Option<&u64>,
    to: &mut u64,
    keys: &mut [K],
    values: &mut [V],
) -> io::Result<(usize, bool)> {
    let count = keys.len().min(values.len());
    // SAFETY: aya checked that the map's keys and values are `K` and `V`; both slices
    // hold `count` of them.
    unsafe {
        lookup_batch_raw(
            hash_map_fd(map),
            from,
            to,
            keys.as_mut_ptr().cast(),
            values.as_mut_ptr().cast(),
            count,
        )
    }
}

/// One `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// The instruction `code` with registers `dst` and `src`, offset `off` and immediate
/// `imm`.
pub const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

/// `BPF_PROG_LOAD` of `insns` as a GPL program of type `prog_type` named `name` (up to
/// 15 bytes).
pub fn load_program(prog_type: u32, name: &str, insns: &[Insn]) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        rest: [u8; 64],
    }
    let mut prog_name = [0u8; 16];
    let name = &name.as_bytes()[..name.len().min(15)];
    prog_name[..name.len()].copy_from_slice(name);
    let mut attr = ProgLoad {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: c"GPL".as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
        rest: [0; 64],
    };
    // SAFETY: `insns` holds `insn_cnt` instructions and the license is NUL-terminated;
    // no log buffer.
    unsafe { bpf_fd(BPF_PROG_LOAD, &mut attr) }
}

/// Attaches TC program `prog` to interface `ifindex` of the calling thread's network
/// namespace in `direction` through TCX (`BPF_LINK_CREATE`); it stays attached while the
/// returned link is open.
pub fn attach_tcx(
    prog: BorrowedFd<'_>,
    ifindex: u32,
    direction: TcAttachType,
) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_ifindex: u32,
        attach_type: u32,
        flags: u32,
        // tcx: relative_fd, padding, expected_revision; zero: no ordering, any revision.
        tcx: [u64; 2],
        rest: [u8; 32],
    }
    let mut attr = LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: match direction {
            TcAttachType::Ingress => BPF_TCX_INGRESS,
            TcAttachType::Egress => BPF_TCX_EGRESS,
        },
        flags: 0,
        tcx: [0; 2],
        rest: [0; 32],
    };
    // SAFETY: the attr holds no pointers.
    unsafe { bpf_fd(BPF_LINK_CREATE, &mut attr) }
}

/// Detaches the program of the link pinned at `path` now (`BPF_OBJ_GET`,
/// `BPF_LINK_DETACH`). Removing the pin alone detaches it only when the kernel frees the
/// link, after an RCU grace period and a queued work item: on a busy machine, well after
/// the pin is gone.
pub fn detach_pinned_link(path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes())?;
    let mut get = ObjAttr::new(&path, 0);
    // SAFETY: `pathname` is NUL-terminated and outlives the call.
    let link = unsafe { bpf_fd(BPF_OBJ_GET, &mut get) }?;
    let mut attr = link.as_raw_fd() as u32;
    // SAFETY: the attr (`link_detach.link_fd`) holds no pointers.
    unsafe { bpf(BPF_LINK_DETACH, &mut attr) }.map(drop)
}

/// `BPF_PROG_TEST_RUN` of `prog` on `frame`, `repeat` times, without reading the packet
/// back: the kernel's mean ns per run.
pub fn test_run(prog: BorrowedFd<'_>, frame: &[u8], repeat: u32) -> io::Result<u32> {
    #[repr(C)]
    struct TestRun {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        rest: [u8; 40],
    }
    let mut attr = TestRun {
        prog_fd: prog.as_raw_fd() as u32,
        retval: 0,
        data_size_in: frame.len() as u32,
        data_size_out: 0,
        data_in: frame.as_ptr() as u64,
        data_out: 0,
        repeat,
        duration: 0,
        rest: [0; 40],
    };
    // SAFETY: the kernel reads `data_size_in` bytes of `frame` and writes no packet out.
    unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) }?;
    Ok(attr.duration)
}

/// A map made here, with the sizes it was made with: the element and batch commands on
/// it check their byte buffers against them.
#[derive(Debug)]
pub struct RawMap {
    fd: OwnedFd,
    key_size: usize,
    /// Bytes of one entry's value in a buffer: for per-CPU maps one copy per possible CPU,
    /// each rounded up to 8 bytes.
    value_stride: usize,
}

impl RawMap {
    /// `BPF_MAP_CREATE` with no flags.
    pub fn create(
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    ) -> io::Result<Self> {
        #[repr(C)]
        struct MapCreate {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            rest: [u8; 56],
        }
        let value_stride = match map_type {
            BPF_MAP_TYPE_PERCPU_HASH | BPF_MAP_TYPE_PERCPU_ARRAY | BPF_MAP_TYPE_LRU_PERCPU_HASH => {
                let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
                value_size.div_ceil(8) as usize * 8 * cpus.get() as usize
            }
            _ => value_size as usize,
        };
        let mut attr = MapCreate {
            map_type,
            key_size,
            value_size,
            max_entries,
            rest: [0; 56],
        };
        // SAFETY: the attr holds no pointers.
        let fd = unsafe { bpf_fd(BPF_MAP_CREATE, &mut attr) }?;
        Ok(Self {
            fd,
            key_size: key_size as usize,
            value_stride,
        })
    }

    /// Bytes of one entry's value in the buffers of [`Self::insert`] and the batch
    /// commands.
    pub fn value_stride(&self) -> usize {
        self.value_stride
    }

    /// Entries that `keys` and `values` hold; an error unless both hold that many whole
    /// entries.
    fn entries(&self, keys: usize, values: usize) -> io::Result<usize> {
        let count = keys.checked_div(self.key_size).unwrap_or(0);
        if keys != count * self.key_size || values != count * self.value_stride {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{keys} bytes of keys and {values} of values are not whole entries of \
                     {}-byte keys and {}-byte values",
                    self.key_size, self.value_stride
                ),
            ));
        }
        Ok(count)
    }

    /// `BPF_MAP_UPDATE_ELEM`: `key` (one key) set to `value` (one value per possible CPU
    /// for a per-CPU map).
    pub fn insert(&self, key: &[u8], value: &[u8]) -> io::Result<()> {
        if self.entries(key.len(), value.len())? != 1 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not one entry"));
        }
        // SAFETY: `key` and `value` are one key and one value of the map's sizes, and
        // the kernel only reads them.
        unsafe {
            map_elem(
                BPF_MAP_UPDATE_ELEM,
                self.fd.as_fd(),
                key.as_ptr(),
                value.as_ptr().cast_mut(),
                0,
            )
        }
        .map(drop)
    }

    /// `BPF_MAP_UPDATE_BATCH`: every key in `keys` set to its value in `values`.
    pub fn insert_batch(&self, keys: &[u8], values: &[u8]) -> io::Result<()> {
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: self.entries(keys.len(), values.len())? as u32,
            map_fd: self.fd.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `keys` and `values` hold `count` keys and values of the map's sizes,
        // which the kernel only reads.
        unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr) }.map(drop)
    }

    /// [`lookup_batch`] on this map's bytes: as many entries as `keys` and `values` hold.
    pub fn lookup_batch(
        &self,
        from: Option<&u64>,
        to: &mut u64,
        keys: &mut [u8],
        values: &mut [u8],
    ) -> io::Result<(usize, bool)> {
        let count = self.entries(keys.len(), values.len())?;
        // SAFETY: `keys` and `values` have room for `count` keys and values of the
        // map's sizes.
        unsafe {
            lookup_batch_raw(
                self.fd.as_fd(),
                from,
                to,
                keys.as_mut_ptr(),
                values.as_mut_ptr(),
                count,
            )
        }
    }

    /// `BPF_OBJ_PIN` at `path`, a file on a BPF file system.
    pub fn pin(&self, path: &Path) -> io::Result<()> {
        let path = CString::new(path.as_os_str().as_bytes())?;
        let mut attr = ObjAttr::new(&path, self.fd.as_raw_fd() as u32);
        // SAFETY: `pathname` is NUL-terminated and outlives the call.
        unsafe { bpf(BPF_OBJ_PIN, &mut attr) }.map(drop)
    }
}

impl AsFd for RawMap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
