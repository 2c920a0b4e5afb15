//! A real slirp4netns for the driver's tests: started for a namespace's tap0, killed by pid and
//! reaped on drop. Shared by the driver tests and the conformance suite.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long slirp4netns may take to report ready (a hang guard, not a timing assertion).
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running slirp4netns with its API socket's directory.
#[derive(Debug)]
pub struct Slirp {
    child: Child,
    /// The `--api-socket` path.
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Slirp {
    /// Starts `slirp4netns --api-socket SOCK -r FD --mtu 65520 [extra] PID tap0` and waits
    /// until it writes to the ready fd (by then the API socket listens).
    pub fn start(pid: i32, extra: &[&str]) -> io::Result<Slirp> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("s4nn.sock");
        let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let fd = ready_w.as_raw_fd();

        let mut cmd = Command::new("slirp4netns");
        cmd.arg("--api-socket")
            .arg(&socket)
            .args(["-r", &fd.to_string(), "--mtu", "65520"])
            .args(extra)
            .args([&pid.to_string(), "tap0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: fcntl is async-signal-safe; it only clears close-on-exec on the pipe's write
        // end so that slirp4netns inherits it as its ready fd.
        unsafe {
            cmd.pre_exec(move || match libc::fcntl(fd, libc::F_SETFD, 0) {
                -1 => Err(io::Error::last_os_error()),
                _ => Ok(()),
            });
        }
        let child = cmd.spawn()?;
        drop(ready_w);
        let slirp = Slirp {
            child,
            socket,
            _dir: dir,
        };
        wait_ready(ready_r)?;
        Ok(slirp)
    }
}

impl Drop for Slirp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads slirp4netns's `1` from the ready pipe, failing if it exits (EOF) or never answers.
fn wait_ready(fd: OwnedFd) -> io::Result<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        let ready = File::from(fd)
            .read(&mut byte)
            .map(|n| n == 1 && byte[0] == b'1');
        let _ = tx.send(ready);
    });
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(Ok(true)) => Ok(()),
        Ok(_) => Err(io::Error::other("slirp4netns exited before it was ready")),
        Err(_) => Err(io::Error::other("slirp4netns did not get ready")),
    }
}
