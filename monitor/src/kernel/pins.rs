//! `--pin-path DIR`: the maps pinned as `DIR/maps/NAME`, the links that attach the
//! programs as `DIR/links/IFACE:HOOK`. A pinned link keeps its program attached, counting
//! into the pinned maps, after the agent is gone; the next agent reuses both.

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use monitor_common::names;

use super::{IngressAttach, bpf};
use crate::private;

/// `statfs(2)`'s `f_type` for bpffs.
const BPF_FS_MAGIC: libc::c_long = 0xcafe_4a11;

/// The maps a restarted agent must find again: everything the programs write or read
/// (the programs a pinned link keeps attached write DNS messages, hellos and owners to
/// the ring buffers they were loaded with, and read owners from the socket storage they
/// were loaded with). Those an earlier build did not have are made and pinned.
pub const MAPS: [&str; 14] = [
    names::FLOW_MAP,
    names::STATS_MAP,
    names::WATCHED_MAP,
    names::WATCHED_MASK_MAP,
    names::DNS_EVENTS_MAP,
    names::EPOCH_MAP,
    names::CHANGED_MAP,
    names::CHANGES_LOST_MAP,
    names::NEW_ENTRIES_MAP,
    names::HELLO_EVENTS_MAP,
    names::HELLO_LOST_MAP,
    names::OWNERS_MAP,
    names::OWNER_EVENTS_MAP,
    names::OWNER_LOST_MAP,
];

/// Whether `path` is on a BPF filesystem (where pins can be made).
pub fn on_bpf_fs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain data, written by the call.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statfs to write.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type as libc::c_long == BPF_FS_MAGIC
}

/// How one program is hooked to an interface, as a pinned link's name says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    XdpNative,
    XdpGeneric,
    TcIngress,
    TcEgress,
}

impl Hook {
    const INGRESS: [Hook; 3] = [Hook::XdpNative, Hook::XdpGeneric, Hook::TcIngress];

    fn suffix(self) -> &'static str {
        match self {
            Hook::XdpNative => "xdp-native",
            Hook::XdpGeneric => "xdp-skb",
            Hook::TcIngress => "tc-ingress",
            Hook::TcEgress => "tc-egress",
        }
    }

    fn ingress(self) -> Option<IngressAttach> {
        match self {
            Hook::XdpNative => Some(IngressAttach::XdpNative),
            Hook::XdpGeneric => Some(IngressAttach::XdpGeneric),
            Hook::TcIngress => Some(IngressAttach::Tc),
            Hook::TcEgress => None,
        }
    }
}

/// The pin directory of one agent.
#[derive(Debug, Clone)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    /// Makes `root`, `root/maps` and `root/links` (mode 0700) where missing; refuses any
    /// of them that is a symbolic link, someone else's, or writable by group or others
    /// (bpffs is usually world-writable and sticky, like /tmp).
    pub fn create(root: &Path) -> io::Result<Self> {
        let dir = Self {
            root: root.to_owned(),
        };
        for path in [dir.root.clone(), dir.maps(), dir.links()] {
            private::dir(&path)
                .map_err(|err| io::Error::new(err.kind(), format!("{}: {err}", path.display())))?;
        }
        Ok(dir)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    /// bpffs refuses names with a dot, which interface names may have (`eth0.100`): dots
    /// become `%`, which no interface name keeps, and `:` (never in one) separates the hook.
    pub fn link(&self, iface: &str, hook: Hook) -> PathBuf {
        let iface = iface.replace('.', "%");
        self.links().join(format!("{iface}:{}", hook.suffix()))
    }

    /// Whether an earlier agent left its connection map here.
    pub fn has_flows(&self) -> bool {
        self.map(names::FLOW_MAP).exists()
    }

    /// Whether an earlier agent left the list of changed entries here: the programs its
    /// links keep attached were built to write it.
    pub fn has_changes(&self) -> bool {
        self.map(names::CHANGED_MAP).exists()
    }

    /// How an earlier agent hooked `iface`, when both of its links are still pinned. Half
    /// a pair (an agent killed between two attaches) is removed, to be attached afresh.
    pub fn kept(&self, iface: &str) -> io::Result<Option<IngressAttach>> {
        let ingress: Vec<Hook> = Hook::INGRESS
            .into_iter()
            .filter(|hook| self.link(iface, *hook).exists())
            .collect();
        let egress = self.link(iface, Hook::TcEgress).exists();
        if let ([hook], true) = (ingress.as_slice(), egress) {
            return Ok(hook.ingress());
        }
        for hook in ingress.into_iter().chain(egress.then_some(Hook::TcEgress)) {
            fs::remove_file(self.link(iface, hook))?;
        }
        Ok(None)
    }
}

/// What `monitor detach` removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub links: usize,
    pub maps: usize,
}

/// Detaches the programs of the links pinned under `root` and removes those links, then
/// the maps and the directories; leaves anything else there alone.
pub fn remove(root: &Path) -> io::Result<Removed> {
    let dir = PinDir {
        root: root.to_owned(),
    };
    let mut removed = Removed::default();
    match fs::read_dir(dir.links()) {
        Ok(entries) => {
            for entry in entries {
                let path = entry?.path();
                bpf::detach_pinned_link(&path).map_err(|err| {
                    io::Error::new(err.kind(), format!("{}: {err}", path.display()))
                })?;
                fs::remove_file(path)?;
                removed.links += 1;
            }
            fs::remove_dir(dir.links())?;
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    for name in MAPS {
        match fs::remove_file(dir.map(name)) {
            Ok(()) => removed.maps += 1,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    for path in [dir.maps(), dir.root.clone()] {
        match fs::remove_dir(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(io::Error::new(
                    err.kind(),
                    format!("{}: {err}", path.display()),
                ));
            }
        }
    }
    Ok(removed)
}
