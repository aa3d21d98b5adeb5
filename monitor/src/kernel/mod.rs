//! Loading, attaching and detaching the kernel programs: the only code that knows their
//! names.

pub mod bpf;
pub mod btf;
pub mod owners;
pub mod pins;

use std::{io, path::PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError},
    pin::PinError,
    programs::{
        ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode as AyaXdpMode,
        links::{FdLink, LinkError},
        tc,
    },
};
use log::warn;
use monitor_common::{names, watched};
use thiserror::Error;

use crate::iface::{self, Framing, LinkType};
use pins::{Hook, PinDir};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IngressHook {
    /// XDP (see --xdp-mode).
    Xdp,
    /// TC ingress (clsact/TCX).
    Tc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpMode {
    /// Native XDP where the driver has it, else TC ingress (generic XDP cannot count
    /// aggregated packets exactly).
    Auto,
    /// Native (driver) XDP only; fail where the driver lacks it.
    Native,
    /// Generic XDP: works everywhere, but sees GRO/GSO aggregates as one packet.
    Skb,
}

/// The compiled kernel programs (monitor-ebpf), embedded at build time.
pub fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/monitor"))
}

const PRIVILEGES: &str = "CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON";

/// Each message ends with what to try; sources are part of the message, not a chain, so
/// the advice stays last.
#[derive(Debug, Error)]
pub enum KernelError {
    #[error("loading the kernel programs failed: {0}; this needs root, or {PRIVILEGES}")]
    Load(aya::EbpfError),
    #[error("loading program {name} failed: {error}; this needs root, or {PRIVILEGES}")]
    LoadProgram {
        name: &'static str,
        error: ProgramError,
    },
    #[error("no such interface: {0} (see `ip link`)")]
    NoSuchInterface(String),
    #[error(
        "{iface}: link/{link} cannot be parsed: the programs read Ethernet frames, or IP \
         packets on devices without a link-layer header"
    )]
    UnknownLink { iface: String, link: LinkType },
    #[error(
        "attaching native XDP to {iface} failed: {error}; try --xdp-mode skb or --ingress-hook tc"
    )]
    AttachXdp { iface: String, error: ProgramError },
    #[error(
        "attaching TC {direction} to {iface} failed: {error}; this needs root, or {PRIVILEGES}"
    )]
    AttachTc {
        iface: String,
        direction: &'static str,
        error: ProgramError,
    },
    #[error("marking {iface} as watched failed: {error}")]
    Watch { iface: String, error: MapError },
    #[error("setting the watched interfaces' bits in WATCHED_MASK failed: {0}")]
    WatchedMask(MapError),
    #[error("the kernel object lacks map {0}")]
    MissingMap(&'static str),
    #[error(
        "the maps pinned under {dir} do not fit this agent: {error}; remove them with `monitor detach --pin-path {dir}`"
    )]
    PinnedMaps {
        dir: PathBuf,
        error: Box<aya::EbpfError>,
    },
    #[error("reading the links pinned under {dir}: {error}")]
    PinnedLinks { dir: PathBuf, error: io::Error },
    #[error(
        "pinning the {hook:?} link of {iface} failed: {error}; --pin-path needs TCX and XDP links (Linux >= 6.6)"
    )]
    PinLink {
        iface: String,
        hook: Hook,
        error: PinLinkError,
    },
}

#[derive(Debug, Error)]
pub enum PinLinkError {
    #[error(transparent)]
    Program(#[from] ProgramError),
    #[error(transparent)]
    Link(#[from] LinkError),
    /// With its cause (`PinError` alone says only which call failed).
    #[error("{0}")]
    Pin(String),
}

impl From<PinError> for PinLinkError {
    fn from(error: PinError) -> Self {
        Self::Pin(chain(&error))
    }
}

/// An error and its causes, in one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

/// How a watched interface's ingress ended up hooked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngressAttach {
    XdpNative,
    XdpGeneric,
    Tc,
}

impl std::fmt::Display for IngressAttach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::XdpNative => "xdp native",
            Self::XdpGeneric => "xdp skb (generic: aggregates count as one packet)",
            Self::Tc => "tc",
        })
    }
}

/// How an interface got hooked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attached {
    pub link: LinkType,
    pub ingress: IngressAttach,
    /// Left pinned by an earlier agent, and kept as it was.
    pub kept: bool,
}

impl std::fmt::Display for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "link: {}, ingress: {}, egress: tc",
            self.link, self.ingress
        )?;
        if self.kept {
            f.write_str(", pinned by an earlier run")?;
        }
        Ok(())
    }
}

/// The loaded programs. Dropping it detaches every hook it attached (they are bpf_links
/// owned by the programs), except those pinned under `--pin-path`.
pub struct Kernel {
    ebpf: Ebpf,
    pins: Option<PinDir>,
    resumed: bool,
    /// Whether every attached program puts the keys of changed entries in `CHANGED`: not
    /// once a pinned link of a build before it is kept.
    changes_complete: bool,
    /// Whether the pinned `CHANGED` was there before this agent loaded.
    changes_pinned: bool,
}

impl Kernel {
    /// Loads the programs; with `pins`, their maps are the ones pinned there (made and
    /// pinned if missing).
    pub fn load(flow_map_size: u32, pins: Option<PinDir>) -> Result<Self, KernelError> {
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(names::FLOW_MAP, flow_map_size);
        let offsets = owners::task_offsets();
        match &offsets {
            Ok(offsets) => {
                loader.override_global(names::TASK_OFFSETS, offsets, true);
            }
            Err(err) => warn!(
                "{err}: connections name the thread that opened their socket, not its process"
            ),
        }
        let resumed = pins.as_ref().is_some_and(PinDir::has_flows);
        let changes_pinned = pins.as_ref().is_some_and(PinDir::has_changes);
        if let Some(pins) = &pins {
            for name in pins::MAPS {
                loader.map_pin_path(name, pins.map(name));
            }
        }
        let mut ebpf = loader.load(object()).map_err(|error| match &pins {
            Some(pins) if resumed => KernelError::PinnedMaps {
                dir: pins.root().to_owned(),
                error: Box::new(error),
            },
            _ => KernelError::Load(error),
        })?;
        for name in [
            names::TC_INGRESS,
            names::TC_EGRESS,
            names::TC_INGRESS_IP,
            names::TC_EGRESS_IP,
        ] {
            classifier(&mut ebpf, name)
                .load()
                .map_err(|error| KernelError::LoadProgram { name, error })?;
        }
        xdp(&mut ebpf)
            .load()
            .map_err(|error| KernelError::LoadProgram {
                name: names::XDP_INGRESS,
                error,
            })?;
        let mut kernel = Self {
            ebpf,
            pins,
            resumed,
            changes_complete: true,
            changes_pinned,
        };
        if kernel.pins.is_some() {
            kernel.mask_watched()?;
        }
        Ok(kernel)
    }

    /// Keeps the owner of every socket that is created, connects or binds, for
    /// the egress programs to name in `OWNER_EVENTS`.
    pub fn attach_owners(&mut self) -> Result<(), owners::OwnersError> {
        owners::attach(&mut self.ebpf)
    }

    /// Whether the programs attached so far all name the entries they change in `CHANGED`.
    pub fn changes_complete(&self) -> bool {
        self.changes_complete
    }

    /// Whether the maps were pinned by an earlier agent: its connections go on here.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Takes a map out, for the poller; it stays valid after the programs detach.
    pub fn take_map(&mut self, name: &'static str) -> Result<Map, KernelError> {
        self.ebpf
            .take_map(name)
            .ok_or(KernelError::MissingMap(name))
    }

    /// Hooks egress with TC and ingress as asked, unless an earlier agent's pinned links
    /// still hook the interface. An interface without a link-layer header has its ingress
    /// hooked with TC whatever the hook asked: the XDP program reads Ethernet frames.
    pub fn attach(
        &mut self,
        iface: &str,
        hook: IngressHook,
        xdp_mode: XdpMode,
    ) -> Result<Attached, KernelError> {
        let no_such = || KernelError::NoSuchInterface(iface.to_owned());
        let index = iface::index(iface).ok_or_else(no_such)?;
        let link = iface::link_type(iface).map_err(|_| no_such())?;
        let Some(framing) = link.framing() else {
            return Err(KernelError::UnknownLink {
                iface: iface.to_owned(),
                link,
            });
        };
        let no_l2 = if framing == Framing::Ip {
            watched::NO_L2
        } else {
            0
        };
        if let Some(pins) = &self.pins {
            let kept = pins.kept(iface).map_err(|error| KernelError::PinnedLinks {
                dir: pins.root().to_owned(),
                error,
            })?;
            if let Some(ingress) = kept {
                // An earlier agent's links hook both directions. Its bits may predate
                // NO_L2, which its programs, if older than the `tc_*_ip` ones, read.
                self.mark(iface, index, watched::INGRESS_HOOKED | no_l2)?;
                self.changes_complete &= self.changes_pinned;
                return Ok(Attached {
                    link,
                    ingress,
                    kept: true,
                });
            }
        }
        let iface = Iface {
            name: iface,
            index,
            no_l2: no_l2 != 0,
        };
        let hook = match hook {
            IngressHook::Xdp if no_l2 != 0 => {
                warn!(
                    "{}: link/{link} has no Ethernet header for XDP; counting ingress with TC instead",
                    iface.name
                );
                IngressHook::Tc
            }
            hook => hook,
        };
        // Ingress first, then WATCHED, then egress: a packet forwarded meanwhile is counted
        // at least once, never twice.
        let ingress = match (hook, xdp_mode) {
            (IngressHook::Tc, _) => IngressAttach::Tc,
            (IngressHook::Xdp, XdpMode::Skb) => {
                warn!(
                    "{}: generic XDP sees GRO/GSO aggregates as single packets: counts can be inexact",
                    iface.name
                );
                self.attach_xdp(iface, AyaXdpMode::Skb)?;
                IngressAttach::XdpGeneric
            }
            (IngressHook::Xdp, XdpMode::Native) => {
                self.attach_xdp(iface, AyaXdpMode::Driver)?;
                IngressAttach::XdpNative
            }
            (IngressHook::Xdp, XdpMode::Auto) => match self.attach_xdp(iface, AyaXdpMode::Driver) {
                Ok(()) => IngressAttach::XdpNative,
                Err(KernelError::AttachXdp { error, .. }) => {
                    warn!(
                        "{}: native XDP unavailable ({error}); counting ingress with TC instead",
                        iface.name
                    );
                    IngressAttach::Tc
                }
                Err(other) => return Err(other),
            },
        };
        if ingress == IngressAttach::Tc {
            self.attach_tc(iface, TcAttachType::Ingress)?;
        }
        self.mark(iface.name, index, watched::INGRESS_HOOKED)?;
        self.attach_tc(iface, TcAttachType::Egress)?;
        Ok(Attached {
            link,
            ingress,
            kept: false,
        })
    }

    /// Sets the interface's `watched` bits for the programs, and its bit in `WATCHED_MASK`.
    fn mark(&mut self, iface: &str, index: u32, bits: u8) -> Result<(), KernelError> {
        self.watched()?
            .insert(&index, &bits, 0)
            .map_err(|error| KernelError::Watch {
                iface: iface.to_owned(),
                error,
            })?;
        self.add_to_mask(watched::mask_bit(index))
    }

    /// Gives `WATCHED_MASK` the bits of every interface already in a pinned `WATCHED`: it
    /// may be an earlier build's, which kept no mask. Before any attach.
    fn mask_watched(&mut self) -> Result<(), KernelError> {
        let bits = self
            .watched()?
            .keys()
            .try_fold(0, |mask, index| index.map(|i| mask | watched::mask_bit(i)))
            .map_err(KernelError::WatchedMask)?;
        self.add_to_mask(bits)
    }

    fn add_to_mask(&mut self, bits: u64) -> Result<(), KernelError> {
        let mut mask = self.watched_mask()?;
        let old = mask.get(&0, 0).map_err(KernelError::WatchedMask)?;
        mask.set(0, &(old | bits), 0)
            .map_err(KernelError::WatchedMask)
    }

    fn watched_mask(&mut self) -> Result<Array<&mut MapData, u64>, KernelError> {
        let map = self
            .ebpf
            .map_mut(names::WATCHED_MASK_MAP)
            .ok_or(KernelError::MissingMap(names::WATCHED_MASK_MAP))?;
        Array::try_from(map).map_err(|_| KernelError::MissingMap(names::WATCHED_MASK_MAP))
    }

    fn watched(&mut self) -> Result<HashMap<&mut MapData, u32, u8>, KernelError> {
        let map = self
            .ebpf
            .map_mut(names::WATCHED_MAP)
            .ok_or(KernelError::MissingMap(names::WATCHED_MAP))?;
        HashMap::try_from(map).map_err(|_| KernelError::MissingMap(names::WATCHED_MAP))
    }

    fn attach_xdp(&mut self, iface: Iface<'_>, mode: AyaXdpMode) -> Result<(), KernelError> {
        let program = xdp(&mut self.ebpf);
        let id = program
            .attach(iface.index, mode)
            .map_err(|error| KernelError::AttachXdp {
                iface: iface.name.to_owned(),
                error,
            })?;
        let Some(pins) = &self.pins else {
            return Ok(());
        };
        let hook = if mode == AyaXdpMode::Skb {
            Hook::XdpGeneric
        } else {
            Hook::XdpNative
        };
        pin_link(pins, iface, hook, || {
            Ok(FdLink::try_from(program.take_link(id)?)?)
        })
    }

    fn attach_tc(&mut self, iface: Iface<'_>, direction: TcAttachType) -> Result<(), KernelError> {
        let (name, label) = match (direction, iface.no_l2) {
            (TcAttachType::Ingress, false) => (names::TC_INGRESS, "ingress"),
            (TcAttachType::Ingress, true) => (names::TC_INGRESS_IP, "ingress"),
            (TcAttachType::Egress, false) => (names::TC_EGRESS, "egress"),
            (TcAttachType::Egress, true) => (names::TC_EGRESS_IP, "egress"),
        };
        let program = classifier(&mut self.ebpf, name);
        let attached = program.attach(iface.index, direction).or_else(|_| {
            // Kernels before 6.6 have no TCX: the netlink path needs a clsact qdisc.
            let _ = tc::qdisc_add_clsact(iface.index);
            program.attach(iface.index, direction)
        });
        let id = attached.map_err(|error| KernelError::AttachTc {
            iface: iface.name.to_owned(),
            direction: label,
            error,
        })?;
        let Some(pins) = &self.pins else {
            return Ok(());
        };
        let hook = match direction {
            TcAttachType::Ingress => Hook::TcIngress,
            TcAttachType::Egress => Hook::TcEgress,
        };
        pin_link(pins, iface, hook, || {
            Ok(FdLink::try_from(program.take_link(id)?)?)
        })
    }
}

/// Pins the link that `take` hands over; once pinned, it outlives the agent.
fn pin_link(
    pins: &PinDir,
    iface: Iface<'_>,
    hook: Hook,
    take: impl FnOnce() -> Result<FdLink, PinLinkError>,
) -> Result<(), KernelError> {
    take()
        .and_then(|link| Ok(link.pin(pins.link(iface.name, hook))?))
        .map(drop)
        .map_err(|error| KernelError::PinLink {
            iface: iface.name.to_owned(),
            hook,
            error,
        })
}

#[derive(Clone, Copy)]
struct Iface<'a> {
    name: &'a str,
    index: u32,
    /// No link-layer header: packets start at the IP header.
    no_l2: bool,
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> &'a mut SchedClassifier {
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .expect("the embedded object has its classifiers")
}

fn xdp(ebpf: &mut Ebpf) -> &mut Xdp {
    ebpf.program_mut(names::XDP_INGRESS)
        .and_then(|p| p.try_into().ok())
        .expect("the embedded object has its XDP program")
}
