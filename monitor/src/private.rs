//! Paths other users of the machine must not be able to plant or change: directories
//! that only this agent may write to, and files opened without following a symbolic
//! link.

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::Path,
};

/// Makes `dir` (mode 0700, its missing parents too), or takes it as it is if it is a
/// directory (not a symbolic link) owned by this process's user that neither group nor
/// others may write to: whoever else could write there could plant links or files.
pub fn dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = fs::symlink_metadata(dir)?;
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let refuse = |why: String| Err(io::Error::new(io::ErrorKind::PermissionDenied, why));
    if meta.file_type().is_symlink() {
        return refuse("a symbolic link: refusing to follow it".into());
    }
    if !meta.is_dir() {
        return refuse("not a directory".into());
    }
    if meta.uid() != euid {
        return refuse(format!(
            "owned by uid {}, not by this agent's (uid {euid}): refusing it \
             (remove it, or chown it)",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return refuse(format!(
            "writable by group or others (mode {:o}): refusing it (chmod 700 it)",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// `options` opening `path`, but not through a symbolic link at its last component.
pub fn open_nofollow(options: &mut fs::OpenOptions, path: &Path) -> io::Result<fs::File> {
    options
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|err| match err.raw_os_error() {
            Some(libc::ELOOP) => io::Error::new(
                io::ErrorKind::PermissionDenied,
                "a symbolic link: refusing to follow it",
            ),
            _ => err,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt as _, symlink};

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("monitor-private-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn made_private_and_refused_when_open_or_linked() {
        let base = scratch("dir");
        let made = base.join("a/b");
        dir(&made).unwrap();
        for d in [&base.join("a"), &made] {
            assert_eq!(
                fs::metadata(d).unwrap().mode() & 0o777,
                0o700,
                "{}",
                d.display()
            );
        }
        fs::set_permissions(&made, fs::Permissions::from_mode(0o757)).unwrap();
        let err = dir(&made).unwrap_err().to_string();
        assert!(
            err.contains("writable by group or others (mode 757)"),
            "{err}"
        );
        let link = base.join("link");
        symlink(base.join("a"), &link).unwrap();
        let err = dir(&link).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn open_refuses_a_link_and_makes_nothing_through_it() {
        let base = scratch("open");
        fs::create_dir_all(&base).unwrap();
        let link = base.join("log");
        symlink(base.join("target"), &link).unwrap();
        let err = open_nofollow(fs::OpenOptions::new().append(true).create(true), &link)
            .unwrap_err()
            .to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert!(!base.join("target").exists());
        fs::remove_dir_all(&base).unwrap();
    }
}
