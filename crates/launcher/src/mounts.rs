//! Mounts in the child's mount namespace: propagation of `/`, `--copy-up` directories, and the
//! bind mounts of the generated `resolv.conf` and `hosts`.
//!
//! Everything here runs inside the child's own mount namespace, so nothing is visible on the
//! host and everything disappears with the namespace.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};

use crate::config::Propagation;

/// Name of the directory, inside a copied-up tmpfs, where the original directory stays
/// reachable (the symlinks point into it).
const ORIGINAL: &str = ".rkport-ro";

/// Why a mount step failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("failed to {what} {path}")]
    Mount {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("failed to {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn mount_err(what: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> MountError {
    let path = path.to_owned();
    move |source| MountError::Mount { what, path, source }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> MountError {
    let path = path.to_owned();
    move |source| MountError::Io { what, path, source }
}

/// Sets the propagation of every mount under `/` (`--propagation`, default `rprivate`), so that
/// the child's mounts never reach the host.
pub(crate) fn set_propagation(propagation: Propagation) -> Result<(), MountError> {
    let flags = match propagation {
        Propagation::Rprivate => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        Propagation::Private => MsFlags::MS_PRIVATE,
        Propagation::Rslave => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        Propagation::Slave => MsFlags::MS_SLAVE,
        Propagation::Rshared => MsFlags::MS_SHARED | MsFlags::MS_REC,
        Propagation::Shared => MsFlags::MS_SHARED,
    };
    let root = Path::new("/");
    mount(None::<&str>, root, None::<&str>, flags, None::<&str>)
        .map_err(mount_err("set propagation of", root))
}

/// Replaces `dir` by a writable tmpfs holding a symlink to each of its entries (RootlessKit's
/// `tmpfs+symlink` copy-up mode). `scratch` is an empty directory the tmpfs is prepared on.
///
/// The original directory is bind-mounted at `dir/.rkport-ro` inside the tmpfs, and the
/// symlinks point there, so entries can be replaced (e.g. `/etc/resolv.conf`) while the rest
/// of the directory stays as it is.
pub(crate) fn copy_up(dir: &Path, scratch: &Path) -> Result<(), MountError> {
    fs::create_dir(scratch).map_err(io_err("create", scratch))?;
    let flags = MsFlags::empty();
    mount(
        Some("tmpfs"),
        scratch,
        Some("tmpfs"),
        flags,
        Some("mode=0755"),
    )
    .map_err(mount_err("mount tmpfs on", scratch))?;

    let original = scratch.join(ORIGINAL);
    fs::create_dir(&original).map_err(io_err("create", &original))?;
    let bind = MsFlags::MS_BIND | MsFlags::MS_REC;
    mount(Some(dir), &original, None::<&str>, bind, None::<&str>)
        .map_err(mount_err("bind-mount original of", dir))?;

    for entry in fs::read_dir(dir).map_err(io_err("read", dir))? {
        let name = entry.map_err(io_err("read", dir))?.file_name();
        let link = scratch.join(&name);
        symlink(dir.join(ORIGINAL).join(&name), &link).map_err(io_err("symlink", &link))?;
    }

    mount(
        Some(scratch),
        dir,
        None::<&str>,
        MsFlags::MS_MOVE,
        None::<&str>,
    )
    .map_err(mount_err("move tmpfs onto", dir))?;
    fs::remove_dir(scratch).map_err(io_err("remove", scratch))
}

/// Makes `target` show `source`: a bind mount, or, when `target` is a symlink inside a
/// copied-up directory, a regular file replacing the symlink.
pub(crate) fn install_file(
    source: &Path,
    target: &Path,
    copied_up: bool,
) -> Result<(), MountError> {
    if copied_up {
        let _ = fs::remove_file(target);
        fs::copy(source, target).map_err(io_err("write", target))?;
        return Ok(());
    }
    if fs::metadata(target).is_err() {
        // Nothing to mount over (or a dangling symlink): leave the name alone.
        tracing::debug!(target = %target.display(), "no file to bind-mount over");
        return Ok(());
    }
    let flags = MsFlags::MS_BIND;
    mount(Some(source), target, None::<&str>, flags, None::<&str>)
        .map_err(mount_err("bind-mount over", target))
}
