//! The socket-owner programs: the `task_struct` offsets they read, taken from the running
//! kernel's BTF before loading, and their attachment to the root of the cgroup v2 tree,
//! where every process's sockets pass them.

use std::fs::File;

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError},
};
use monitor_common::{names, owner::TaskOffsets};
use thiserror::Error;

use super::{
    btf::{Btf, BtfError},
    chain,
};
use crate::cgroups;

#[derive(Debug, Error)]
pub enum OwnersError {
    #[error("no cgroup v2 hierarchy is mounted (mount -t cgroup2)")]
    NoCgroup2,
    #[error("opening the cgroup v2 root {path}: {error}")]
    Root { path: String, error: std::io::Error },
    #[error("attaching {name} to the cgroup v2 root: {}", chain(error))]
    Attach {
        name: &'static str,
        error: ProgramError,
    },
}

/// Where the programs find the thread-group leader's name.
pub fn task_offsets() -> Result<TaskOffsets, BtfError> {
    let btf = Btf::from_sys_fs()?;
    Ok(TaskOffsets {
        group_leader: btf.offset("task_struct", "group_leader")?,
        comm: btf.offset("task_struct", "comm")?,
    })
}

/// Loads the programs and attaches them to the cgroup v2 root, beside whatever else is
/// attached there; they detach when `ebpf` drops.
pub fn attach(ebpf: &mut Ebpf) -> Result<(), OwnersError> {
    let root = cgroups::root().ok_or(OwnersError::NoCgroup2)?;
    let dir = File::open(&root).map_err(|error| OwnersError::Root {
        path: root.display().to_string(),
        error,
    })?;
    // As links, which the kernel adds beside the other programs of the cgroup (a link
    // takes no attach flags).
    let name = names::OWNER_SOCK_CREATE;
    let attach = |error| OwnersError::Attach { name, error };
    let program: &mut CgroupSock = owner_program(ebpf, name);
    program.load().map_err(attach)?;
    program
        .attach(&dir, CgroupAttachMode::Single)
        .map_err(attach)?;
    for name in names::OWNER_SOCK_ADDR_PROGRAMS {
        let attach = |error| OwnersError::Attach { name, error };
        let program: &mut CgroupSockAddr = owner_program(ebpf, name);
        program.load().map_err(attach)?;
        program
            .attach(&dir, CgroupAttachMode::Single)
            .map_err(attach)?;
    }
    Ok(())
}

fn owner_program<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> &'a mut P
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program>,
{
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .expect("the embedded object has its owner programs")
}
