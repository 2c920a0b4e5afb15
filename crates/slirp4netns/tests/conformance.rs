//! The shared port-driver conformance suite against the slirp4netns driver, with a real
//! slirp4netns serving a tap device in the suite's namespace.

use std::fs::File;
use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use rkport_core::conformance::Namespace;
use rkport_core::PortDriver;
use rkport_slirp4netns::Slirp4netnsDriver;

/// The namespace's tap address for slirp4netns's default CIDR.
const TAP_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);

/// A running slirp4netns, killed by pid and reaped on drop, with its API socket's directory.
#[derive(Debug)]
struct Slirp {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Slirp {
    /// Starts `slirp4netns --mtu 65520 -r FD --api-socket SOCK PID tap0` and waits until it
    /// writes to the ready fd (by then the API socket listens).
    fn start(pid: i32) -> io::Result<Slirp> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("s4nn.sock");
        let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let fd = ready_w.as_raw_fd();
        let mut cmd = Command::new("slirp4netns");
        cmd.args(["--mtu", "65520", "-r", &fd.to_string(), "--api-socket"])
            .arg(&socket)
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

/// Reads slirp4netns's `1` from the ready pipe; EOF means it exited before it was ready.
fn wait_ready(fd: OwnedFd) -> io::Result<()> {
    let mut byte = [0u8; 1];
    match File::from(fd).read(&mut byte)? {
        1 if byte[0] == b'1' => Ok(()),
        _ => Err(io::Error::other("slirp4netns exited before it was ready")),
    }
}

/// Creates and configures tap0 inside the namespace, as the launcher does for slirp4netns.
fn add_tap(ns: &mut Namespace) -> io::Result<()> {
    let tap = TAP_IP.to_string() + "/24";
    let steps: [&[&str]; 4] = [
        &["ip", "tuntap", "add", "name", "tap0", "mode", "tap"],
        &["ip", "link", "set", "tap0", "up"],
        &["ip", "addr", "add", &tap, "dev", "tap0"],
        &["ip", "route", "add", "default", "via", "10.0.2.2"],
    ];
    steps.iter().try_for_each(|argv| ns.run(argv))
}

fn slirp4netns_driver(ns: &mut Namespace) -> Box<dyn PortDriver> {
    add_tap(ns).expect("tap0 inside the namespace");
    let slirp = Slirp::start(ns.pid()).expect("slirp4netns started");
    let driver = Slirp4netnsDriver::new(&slirp.socket, TAP_IP);
    ns.keep(slirp);
    Box::new(driver)
}

rkport_core::conformance_suite! {
    namespace_side: None,
    driver: slirp4netns_driver,
}
