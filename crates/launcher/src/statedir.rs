//! The state directory: `lock`, `child_pid`, `api.sock` and the network files.
//!
//! Layout and rules follow RootlessKit (api.md §9): a given directory is made absolute and
//! created, everything in it except `lock` is deleted at start (recovery after a crash), `lock`
//! is held with an exclusive non-blocking `flock` for the whole run, and the directory is
//! removed on exit. Unlike upstream, the directory is private (mode 0700), socket paths that do
//! not fit in `sun_path` are refused before anything is created, and a failed start removes it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// The API socket's file name.
pub const API_SOCK: &str = "api.sock";
/// The lock file's name.
pub const LOCK: &str = "lock";
/// The file holding the child's pid.
pub const CHILD_PID: &str = "child_pid";
/// slirp4netns's API socket (only with `--port-driver=slirp4netns`).
pub const SLIRP4NETNS_SOCK: &str = ".s4nn.sock";

/// The longest unix socket path: `sun_path` is 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// Why the state directory could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error(
        "state directory path is too long: socket path {path:?} is {len} bytes, more than the \
         {MAX_SOCKET_PATH}-byte limit of a unix socket path; use a shorter --state-dir"
    )]
    SocketPathTooLong { path: PathBuf, len: usize },
    #[error(
        "failed to lock {path}, another rootlesskit is running with the same state directory?"
    )]
    Locked { path: PathBuf },
    #[error("failed to prepare state directory {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StateDirError + '_ {
    move |source| StateDirError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A locked, private state directory, removed when dropped.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
    _lock: Flock<File>,
}

impl StateDir {
    /// Creates and locks `requested`, or a fresh `$TMPDIR/rootlesskitXXXX` when `None`.
    ///
    /// `sockets` are the socket file names that will live in the directory; each full path must
    /// fit in `sun_path`, which is checked before anything is created.
    ///
    /// # Errors
    /// [`StateDirError::SocketPathTooLong`], [`StateDirError::Locked`] when another instance
    /// holds the lock, and I/O failures. On error nothing this call created is left behind.
    pub fn create(requested: Option<&Path>, sockets: &[&str]) -> Result<StateDir, StateDirError> {
        match requested {
            Some(dir) => {
                let path = std::path::absolute(dir).map_err(io_err(dir))?;
                check_socket_paths(&path, sockets)?;
                Self::create_given(path)
            }
            None => Self::create_temp(sockets),
        }
    }

    fn create_given(path: PathBuf) -> Result<StateDir, StateDirError> {
        let existed = path.exists();
        fs::create_dir_all(&path).map_err(io_err(&path))?;
        let result = Self::lock_and_clean(path.clone());
        if result.is_err() && !existed {
            let _ = fs::remove_dir_all(&path);
        }
        result
    }

    fn create_temp(sockets: &[&str]) -> Result<StateDir, StateDirError> {
        let tmp = std::env::temp_dir();
        // The random part is fixed-length, so the check can run before the directory exists.
        let sample = tmp.join("rootlesskitXXXXXXXXXX");
        check_socket_paths(&sample, sockets)?;
        let dir = tempfile::Builder::new()
            .prefix("rootlesskit")
            .rand_bytes(10)
            .tempdir_in(&tmp)
            .map_err(io_err(&tmp))?;
        let path = dir.keep();
        let result = Self::lock_and_clean(path.clone());
        if result.is_err() {
            let _ = fs::remove_dir_all(&path);
        }
        result
    }

    fn lock_and_clean(path: PathBuf) -> Result<StateDir, StateDirError> {
        let lock_path = path.join(LOCK);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|_| {
            StateDirError::Locked {
                path: lock_path.clone(),
            }
        })?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).map_err(io_err(&path))?;
        remove_all_but_lock(&path)?;
        Ok(StateDir { path, _lock: lock })
    }

    /// The absolute path of the directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of file `name` in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `child_pid`: decimal, no newline, read-only.
    ///
    /// # Errors
    /// The write failure.
    pub fn write_child_pid(&self, pid: i32) -> io::Result<()> {
        let path = self.file(CHILD_PID);
        fs::write(&path, pid.to_string())?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o444))
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if let Err(err) = fs::remove_dir_all(&self.path) {
            tracing::debug!(path = %self.path.display(), %err, "failed to remove state dir");
        }
    }
}

/// Refuses socket paths that `bind()` would reject with `EINVAL` (upstream issue: podman#9486).
fn check_socket_paths(dir: &Path, sockets: &[&str]) -> Result<(), StateDirError> {
    for name in sockets {
        let path = dir.join(name);
        let len = path.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(StateDirError::SocketPathTooLong { path, len });
        }
    }
    Ok(())
}

/// Deletes the leftovers of a previous run (RootlessKit issue 220), keeping the lock file.
fn remove_all_but_lock(dir: &Path) -> Result<(), StateDirError> {
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        if entry.file_name() == LOCK {
            continue;
        }
        let path = entry.path();
        let removed = match entry.file_type().map_err(io_err(&path))?.is_dir() {
            true => fs::remove_dir_all(&path),
            false => fs::remove_file(&path),
        };
        removed.map_err(io_err(&path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_stale_files_and_keeps_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("child_pid"), "1").unwrap();
        fs::write(dir.join(LOCK), "").unwrap();
        let state = StateDir::create(Some(&dir), &[API_SOCK]).unwrap();
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![LOCK]);
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        drop(state);
        assert!(!dir.exists());
    }

    #[test]
    fn second_instance_is_refused_and_leaves_the_first_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let first = StateDir::create(Some(&dir), &[API_SOCK]).unwrap();
        let err = StateDir::create(Some(&dir), &[API_SOCK]).unwrap_err();
        assert!(err.to_string().starts_with("failed to lock "), "{err}");
        assert!(err
            .to_string()
            .ends_with("/lock, another rootlesskit is running with the same state directory?"));
        assert!(dir.join(LOCK).exists());
        drop(first);
    }

    #[test]
    fn long_socket_path_is_refused_before_creation() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("y".repeat(120));
        let err = StateDir::create(Some(&dir), &[API_SOCK]).unwrap_err();
        assert!(matches!(err, StateDirError::SocketPathTooLong { .. }));
        assert!(err.to_string().contains("107-byte limit"), "{err}");
        assert!(!dir.exists());
    }

    #[test]
    fn temp_dir_is_private() {
        let state = StateDir::create(None, &[API_SOCK]).unwrap();
        let name = state
            .path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert!(name.starts_with("rootlesskit"), "{name}");
        let mode = fs::metadata(state.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
