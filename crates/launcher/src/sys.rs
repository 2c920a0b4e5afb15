//! Small system helpers: fd placement and signal state for spawned programs, parent-death
//! signals, exit statuses and program lookup.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::Signal;

/// Lowest fd number used for fds that a child will get at a fixed number, so that placing one
/// at 3 or 4 with `dup2` can never overwrite another.
const HIGH_FD: RawFd = 10;

/// Duplicates `fd` to a number >= 10, close-on-exec.
pub(crate) fn dup_high(fd: impl AsFd) -> io::Result<OwnedFd> {
    let raw = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(HIGH_FD))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Marks `fd` close-on-exec (fds inherited at fixed numbers must not reach the command).
pub(crate) fn set_cloexec(fd: impl AsFd) -> io::Result<()> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}

/// Makes `cmd` run with SIGKILL as its parent-death signal, no blocked signal, SIGPIPE at its
/// default action, and with `fds[i].0` placed at number `fds[i].1` (inherited across exec).
///
/// Every source fd must be >= 10 (see [`dup_high`]) and every target < 10. The parent-death
/// signal fires when the *thread* that spawns `cmd` exits, so spawn from a long-lived thread.
pub(crate) fn configure_child(cmd: &mut Command, fds: Vec<(RawFd, RawFd)>) {
    debug_assert!(fds
        .iter()
        .all(|&(src, dst)| src >= HIGH_FD && dst < HIGH_FD));
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
    // functions (prctl, getppid, sigemptyset, pthread_sigmask, signal, dup2); it allocates
    // nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before the prctl: then nobody would ever kill us.
            if libc::getppid() != parent {
                return Err(io::Error::other("parent died"));
            }
            // Signals blocked for forwarding (crate::signals) and the SIGPIPE that Rust ignores
            // would otherwise be inherited: start the program with the default disposition.
            let mut empty = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(empty.as_mut_ptr());
            libc::pthread_sigmask(libc::SIG_SETMASK, empty.as_ptr(), std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            for &(src, dst) in &fds {
                if libc::dup2(src, dst) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Sets SIGKILL as the calling process's parent-death signal (again: credential changes may
/// clear it, prctl(2)).
pub(crate) fn set_pdeathsig() -> io::Result<()> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
    Ok(())
}

/// The shell-style exit code of a finished process.
///
/// A process killed by signal N yields 128+N, as shells report it. RootlessKit instead exits
/// with 255 in that case (cli.md §1.1); 128+N keeps the signal visible to scripts.
pub fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 255,
    }
}

/// Finds `name` like a shell does: as given when it contains a `/`, else in `$PATH`, then in
/// the system directories that an ordinary user's `$PATH` often lacks (`/usr/sbin`, `/sbin`).
pub(crate) fn find_program(name: &Path) -> Option<PathBuf> {
    if name.as_os_str().as_encoded_bytes().contains(&b'/') {
        return is_executable(name).then(|| name.to_owned());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A pidfd for process `pid` (pidfd_open(2)): readable once the process has exited.
///
/// # Errors
/// No such process, or a kernel older than 5.3 (`ENOSYS`).
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(io::Error::other)?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; it touches
    // no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel has just created this descriptor (close-on-exec) for us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The raw number of an fd, for building [`configure_child`] lists.
pub(crate) fn raw(fd: &impl AsRawFd) -> RawFd {
    fd.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGTERM)), 128 + 15);
    }

    #[test]
    fn finds_programs() {
        assert!(find_program(Path::new("sh")).is_some());
        assert!(find_program(Path::new("/bin/sh")).is_some());
        assert!(find_program(Path::new("no-such-program-here")).is_none());
    }
}
