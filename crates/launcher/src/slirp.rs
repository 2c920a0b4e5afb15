//! The slirp4netns process that connects the child's tap device to the host network.
//!
//! Command line as RootlessKit builds it (drivers.md §5.1):
//! `slirp4netns --mtu MTU -r 3 [--disable-host-loopback] [--cidr B/N] [--api-socket PATH] PID IFNAME`.
//! slirp4netns writes `1` to fd 3 once the tap is attached and its API socket is bound. The
//! process gets SIGKILL as parent-death signal and is killed and reaped when dropped.

use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::unistd::Pid;

use crate::config::Cidr;
use crate::sys::{configure_child, dup_high, find_program, raw};

/// How long slirp4netns may take to report ready before start-up fails.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// fd number of the ready pipe in slirp4netns.
const READY_FD: i32 = 3;

/// Why slirp4netns could not be started.
#[derive(Debug, thiserror::Error)]
pub enum Slirp4netnsError {
    #[error("slirp4netns binary {0:?} not found in $PATH")]
    NotFound(PathBuf),
    #[error("failed to start {binary}")]
    Spawn {
        binary: String,
        #[source]
        source: io::Error,
    },
    #[error("slirp4netns exited before it was ready ({0}); see its messages above")]
    Exited(std::process::ExitStatus),
    #[error("slirp4netns did not report ready within {0:?}")]
    Timeout(Duration),
    #[error("failed to wait for slirp4netns")]
    Io(#[from] io::Error),
}

/// The slirp4netns options rootlesskit passes on.
#[derive(Debug, Clone)]
pub(crate) struct Slirp4netnsArgs {
    pub mtu: u32,
    pub disable_host_loopback: bool,
    pub cidr: Option<Cidr>,
    pub api_socket: Option<PathBuf>,
    pub ifname: String,
}

impl Slirp4netnsArgs {
    fn to_args(&self, child: Pid) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--mtu".into(), self.mtu.to_string().into()];
        args.extend(["-r".into(), READY_FD.to_string().into()]);
        if self.disable_host_loopback {
            args.push("--disable-host-loopback".into());
        }
        if let Some(cidr) = self.cidr {
            args.extend(["--cidr".into(), cidr.to_string().into()]);
        }
        if let Some(path) = &self.api_socket {
            args.extend(["--api-socket".into(), path.clone().into()]);
        }
        args.extend([child.to_string().into(), self.ifname.clone().into()]);
        args
    }
}

/// A running slirp4netns.
#[derive(Debug)]
pub(crate) struct Slirp4netns {
    process: Child,
}

/// Resolves `--slirp4netns-binary` before anything starts.
pub(crate) fn locate(binary: &Path) -> Result<PathBuf, Slirp4netnsError> {
    find_program(binary).ok_or_else(|| Slirp4netnsError::NotFound(binary.to_owned()))
}

impl Slirp4netns {
    /// Starts slirp4netns for the network namespace of `child` and waits until it is ready.
    ///
    /// # Errors
    /// Spawn failure, slirp4netns exiting early (its stderr is the user's), or no readiness
    /// within 30 s.
    pub fn start(
        binary: &Path,
        args: &Slirp4netnsArgs,
        child: Pid,
    ) -> Result<Self, Slirp4netnsError> {
        let (ready_read, ready_write) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)?;
        let ready_write = dup_high(ready_write)?;
        let mut command = Command::new(binary);
        command.args(args.to_args(child));
        configure_child(&mut command, vec![(raw(&ready_write), READY_FD)]);
        if !tracing::enabled!(tracing::Level::DEBUG) {
            // slirp4netns narrates every tap and API event on stderr; show it with --debug.
            command
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
        }
        tracing::debug!(?command, "starting slirp4netns");
        let process = command.spawn().map_err(|source| Slirp4netnsError::Spawn {
            binary: binary.display().to_string(),
            source,
        })?;
        drop(ready_write);

        let mut slirp = Slirp4netns { process };
        slirp.wait_ready(ready_read)?;
        Ok(slirp)
    }

    /// The host pid of slirp4netns.
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// Reaps slirp4netns once it has exited (blocks until then).
    pub fn reap(&mut self) -> io::Result<std::process::ExitStatus> {
        self.process.wait()
    }

    fn wait_ready(&mut self, pipe: OwnedFd) -> Result<(), Slirp4netnsError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut file = std::fs::File::from(pipe);
        while Instant::now() < deadline {
            if let Some(status) = self.process.try_wait()? {
                return Err(Slirp4netnsError::Exited(status));
            }
            let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(100u16)) {
                Ok(0) | Err(nix::Error::EINTR) => continue,
                Ok(_) => {}
                Err(err) => return Err(io::Error::from(err).into()),
            }
            let mut byte = [0u8; 1];
            if file.read(&mut byte)? == 1 {
                return Ok(());
            }
            // EOF without the byte: slirp4netns closed the fd, normally by exiting.
            let status = self.process.wait()?;
            return Err(Slirp4netnsError::Exited(status));
        }
        Err(Slirp4netnsError::Timeout(READY_TIMEOUT))
    }
}

impl Drop for Slirp4netns {
    fn drop(&mut self) {
        let _ = self.process.kill();
        match self.process.wait() {
            Ok(status) => tracing::debug!(%status, "slirp4netns exited"),
            Err(err) => tracing::debug!(%err, "failed to reap slirp4netns"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_matches_rootlesskit_order() {
        let args = Slirp4netnsArgs {
            mtu: 65520,
            disable_host_loopback: true,
            cidr: Some("10.0.3.0/24".parse().unwrap()),
            api_socket: Some("/s/.s4nn.sock".into()),
            ifname: "tap0".into(),
        };
        let line: Vec<_> = args.to_args(Pid::from_raw(42)).into_iter().collect();
        let want = "--mtu 65520 -r 3 --disable-host-loopback --cidr 10.0.3.0/24 \
                    --api-socket /s/.s4nn.sock 42 tap0";
        assert_eq!(line.join(std::ffi::OsStr::new(" ")), want);
    }
}
