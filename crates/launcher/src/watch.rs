//! Waiting for the child while watching slirp4netns.
//!
//! Without slirp4netns the namespace has no network: its servers stay up but nothing reaches
//! them, and a launcher that kept waiting for the command would look healthy while serving
//! nothing. So while the command runs, the parent polls a pidfd (pidfd_open(2), Linux 5.3) of
//! the child and one of slirp4netns; when slirp4netns exits first, [`Running::wait`] stops the
//! command (SIGTERM through the child, which forwards it, then SIGKILL after
//! [`GRACE`]) and returns an error naming slirp4netns and its exit status. Meanwhile the
//! failure is logged and `GET /v1/info` reports it as `networkDriver.error`; the API serves
//! until the launcher exits.
//!
//! On a kernel without pidfds only the child is waited for, as before.
//!
//! [`Running::wait`]: crate::Running::wait

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::sys::pidfd_open;

/// How long the command may take to exit after SIGTERM once slirp4netns is gone.
pub(crate) const GRACE: Duration = Duration::from_secs(10);

/// Which of the watched processes ended first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum First {
    Child,
    Slirp4netns,
}

/// Blocks until `child` or `slirp` has exited (neither is reaped).
///
/// Falls back to [`First::Child`] at once when pidfds are unavailable: the caller then simply
/// waits for the child.
pub(crate) fn first_exit(child: u32, slirp: u32) -> First {
    let fds = match (pidfd_open(child), pidfd_open(slirp)) {
        (Ok(c), Ok(s)) => [c, s],
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(error = %e, "no pidfd, slirp4netns is not watched");
            return First::Child;
        }
    };
    loop {
        match readable(&fds, PollTimeout::NONE) {
            Ok([true, _]) => return First::Child,
            Ok([false, true]) => return First::Slirp4netns,
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, "polling pidfds failed, waiting for the child only");
                return First::Child;
            }
        }
    }
}

/// Waits up to [`GRACE`] for process `pid` to exit (without reaping it); whether it did.
pub(crate) fn exited_within_grace(pid: u32) -> bool {
    let Ok(fd) = pidfd_open(pid) else {
        return false;
    };
    let deadline = Instant::now() + GRACE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        match readable(std::slice::from_ref(&fd), PollTimeout::from(ms)) {
            Ok([true]) => return true,
            Ok(_) if left.is_zero() => return false,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
}

/// Polls pidfds (readable once the process has exited); EINTR counts as nothing ready.
fn readable<const N: usize>(fds: &[OwnedFd], timeout: PollTimeout) -> io::Result<[bool; N]> {
    let mut polled: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
        .collect();
    let mut ready = [false; N];
    match poll(&mut polled, timeout) {
        Ok(_) => {}
        Err(nix::Error::EINTR) => return Ok(ready),
        Err(e) => return Err(e.into()),
    }
    for (slot, fd) in ready.iter_mut().zip(&polled) {
        *slot = fd.revents().is_some_and(|r| !r.is_empty());
    }
    Ok(ready)
}
