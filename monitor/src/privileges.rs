//! Least privilege: once the programs are attached, polling needs no capability. Every
//! capability but CAP_NET_ADMIN is dropped from every set, for good; CAP_NET_ADMIN stays
//! because a program attached through netlink (kernels without TCX or XDP links) can only
//! be detached with it at shutdown.
//!
//! Capabilities belong to threads: this runs before the agent starts any thread, so every
//! thread it starts later inherits the reduced sets.

use caps::{CapSet, Capability, CapsHashSet};
use log::info;

/// What remains after [`drop_after_attach`].
pub const KEPT: [Capability; 1] = [Capability::CAP_NET_ADMIN];

pub fn drop_after_attach() -> Result<(), caps::errors::CapsError> {
    let keep: CapsHashSet = KEPT.into_iter().collect();
    // Lowering the bounding set needs CAP_SETPCAP; without it (a service given only the
    // capabilities it needs) the bounding set is already that small.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP)? {
        for cap in caps::all().difference(&keep) {
            caps::drop(None, CapSet::Bounding, *cap)?;
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    let permitted = caps::read(None, CapSet::Permitted)?;
    let kept: CapsHashSet = permitted.intersection(&keep).copied().collect();
    caps::set(None, CapSet::Effective, &kept)?;
    caps::set(None, CapSet::Permitted, &kept)?;
    info!("dropped all capabilities but {kept:?}");
    Ok(())
}
