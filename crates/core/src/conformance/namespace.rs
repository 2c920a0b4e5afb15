//! The namespace side of the suite: a re-executed test binary in a fresh user + network
//! namespace that serves echo servers and, optionally, a driver's in-namespace half.
//!
//! The process maps only the caller's uid and gid to root (a single-id mapping a process may
//! write for itself), so the suite runs unprivileged without `newuidmap` and as root alike.

use std::ffi::CString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

/// Environment variable that marks the re-executed test binary as the namespace side.
pub const ENV: &str = "RKPORT_CONFORMANCE_NAMESPACE";

/// Descriptor numbers the namespace side receives.
const CONTROL_FD: RawFd = 3;
const DRIVER_FD: RawFd = 4;

/// A driver's in-namespace half: runs on the descriptor whose peer the parent half holds.
pub type NamespaceSide = fn(OwnedFd) -> io::Result<()>;

/// A live namespace made for one suite run. Dropping it ends the namespace process.
#[derive(Debug)]
pub struct Namespace {
    child: Child,
    control: BufReader<UnixStream>,
    driver_channel: Option<OwnedFd>,
    keep: Vec<Box<dyn std::any::Any>>,
}

impl Namespace {
    /// Starts `entry` (the name of the suite's ignored entry test) of the current test binary in
    /// a new user + network namespace; `with_side` hands the namespace a driver channel on fd 4.
    pub(crate) fn spawn(entry: &str, with_side: bool) -> io::Result<Namespace> {
        let (control, control_peer) = UnixStream::pair()?;
        let (driver_channel, driver_peer) = if with_side {
            let (a, b) = seqpacket_pair()?;
            (Some(a), Some(b))
        } else {
            (None, None)
        };

        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args([
            "--exact",
            entry,
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
        let setup = ChildSetup::new(control_peer.as_raw_fd(), driver_peer.as_ref())?;
        // SAFETY: the closure runs between fork and exec; `ChildSetup::apply` makes only
        // async-signal-safe system calls on buffers prepared before the fork.
        unsafe { cmd.pre_exec(move || setup.apply()) };
        let child = cmd.spawn()?;
        drop((control_peer, driver_peer));

        let mut ns = Namespace {
            child,
            control: BufReader::new(control),
            driver_channel,
            keep: Vec::new(),
        };
        ns.request("ready")?;
        Ok(ns)
    }

    /// Host pid of the namespace process, for `nsenter -t` and `slirp4netns`.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The parent end of the driver channel (a `SOCK_SEQPACKET` socketpair) whose other end the
    /// namespace side serves.
    ///
    /// # Panics
    /// When the suite was declared without a namespace side, or the channel was taken.
    pub fn take_driver_channel(&mut self) -> OwnedFd {
        self.driver_channel
            .take()
            .expect("the suite has no namespace side, or its channel was taken already")
    }

    /// Runs `argv` inside the namespace, as its root, and waits for it.
    ///
    /// # Errors
    /// When the program cannot start or exits unsuccessfully; the message carries its stderr.
    pub fn run(&mut self, argv: &[&str]) -> io::Result<()> {
        let line = serde_json::to_string(argv).map_err(io::Error::other)?;
        self.request(&format!("run {line}"))
    }

    /// Keeps `value` alive until the namespace is torn down (e.g. a slirp4netns guard).
    pub fn keep(&mut self, value: impl std::any::Any) {
        self.keep.push(Box::new(value));
    }

    /// Starts echo servers inside on every address of both families, port `port`.
    pub(crate) fn listen(&mut self, transport: &str, port: u16) -> io::Result<()> {
        self.request(&format!("listen {transport} {port}"))
    }

    fn request(&mut self, line: &str) -> io::Result<()> {
        self.control
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())?;
        let mut reply = String::new();
        self.control.read_line(&mut reply)?;
        match reply.trim_end().strip_prefix("err ") {
            _ if reply.trim_end() == "ok" => Ok(()),
            Some(msg) => Err(io::Error::other(format!("namespace: {line}: {msg}"))),
            None => Err(io::Error::other(format!("namespace: {line}: no reply"))),
        }
    }

    /// Ends the namespace side and reports how it exited.
    pub(crate) fn finish(mut self) -> io::Result<std::process::ExitStatus> {
        self.keep.clear();
        drop(self.driver_channel.take());
        let _ = self.control.get_mut().shutdown(std::net::Shutdown::Both);
        self.child.wait()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        self.keep.clear();
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Everything the forked child needs, prepared before the fork.
struct ChildSetup {
    control: RawFd,
    driver: Option<RawFd>,
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
    paths: [CString; 3],
}

impl ChildSetup {
    fn new(control: RawFd, driver: Option<&OwnedFd>) -> io::Result<ChildSetup> {
        let path = |p: &str| CString::new(p).map_err(io::Error::other);
        Ok(ChildSetup {
            control,
            driver: driver.map(|fd| fd.as_raw_fd()),
            uid_map: format!("0 {} 1", nix::unistd::geteuid()).into_bytes(),
            gid_map: format!("0 {} 1", nix::unistd::getegid()).into_bytes(),
            paths: [
                path("/proc/self/setgroups")?,
                path("/proc/self/uid_map")?,
                path("/proc/self/gid_map")?,
            ],
        })
    }

    /// Runs in the forked child: place the descriptors, enter new namespaces, map ids.
    fn apply(&self) -> io::Result<()> {
        place_fd(self.control, CONTROL_FD)?;
        if let Some(fd) = self.driver {
            place_fd(fd, DRIVER_FD)?;
        }
        // SAFETY: plain system calls with valid arguments; no memory is shared with them.
        unsafe {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0
                || libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        write_file(&self.paths[0], b"deny")?;
        write_file(&self.paths[1], &self.uid_map)?;
        write_file(&self.paths[2], &self.gid_map)
    }
}

/// The driver channel: a connected `SOCK_SEQPACKET` pair, which keeps message boundaries.
fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)
}

/// Makes `fd` available as `target` across exec.
fn place_fd(fd: RawFd, target: RawFd) -> io::Result<()> {
    // SAFETY: both are descriptor numbers; dup2 and fcntl do not touch memory.
    let rc = unsafe {
        if fd == target {
            libc::fcntl(fd, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, target)
        }
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn write_file(path: &CString, data: &[u8]) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated and `data` outlives the calls.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = libc::write(fd, data.as_ptr().cast(), data.len());
        libc::close(fd);
        if n != data.len() as isize {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The namespace side's main loop: called by the suite's entry test.
///
/// Outside a suite run (no [`ENV`]), it returns at once: the entry is not a test by itself.
pub fn namespace_main(side: Option<NamespaceSide>) {
    if std::env::var_os(ENV).is_none() {
        eprintln!("namespace side of the conformance suite: started by the `conformance` test");
        return;
    }
    if let Err(e) = serve(side) {
        eprintln!("conformance namespace side: {e}");
        std::process::exit(1);
    }
    std::process::exit(0);
}

fn serve(side: Option<NamespaceSide>) -> io::Result<()> {
    // SAFETY: the suite placed these descriptors for this process and nothing else owns them.
    let control = unsafe { UnixStream::from_raw_fd(CONTROL_FD) };
    let side = side.map(|side| {
        // SAFETY: as above.
        let channel = unsafe { OwnedFd::from_raw_fd(DRIVER_FD) };
        std::thread::spawn(move || side(channel))
    });
    set_loopback_up()?;

    let mut reader = BufReader::new(control.try_clone()?);
    let mut writer = control;
    let mut line = String::new();
    while {
        line.clear();
        reader.read_line(&mut line)? > 0
    } {
        let reply = match handle(line.trim_end()) {
            Ok(()) => "ok\n".to_owned(),
            Err(e) => format!("err {}\n", e.to_string().replace('\n', " ")),
        };
        writer.write_all(reply.as_bytes())?;
    }

    match side.map(|t| t.join()) {
        Some(Ok(Err(e))) => Err(io::Error::other(format!("namespace side failed: {e}"))),
        Some(Err(_)) => Err(io::Error::other("namespace side panicked")),
        _ => Ok(()),
    }
}

fn handle(line: &str) -> io::Result<()> {
    let mut words = line.splitn(3, ' ');
    match (words.next(), words.next(), words.next()) {
        (Some("ready"), None, None) => Ok(()),
        (Some("listen"), Some(transport), Some(port)) => {
            let port = port.parse().map_err(io::Error::other)?;
            start_echo(transport, port)
        }
        (Some("run"), Some(first), rest) => {
            let json = rest.map_or(first.to_owned(), |r| format!("{first} {r}"));
            let argv: Vec<String> = serde_json::from_str(&json).map_err(io::Error::other)?;
            run_inside(&argv)
        }
        _ => Err(io::Error::other(format!("unknown request {line:?}"))),
    }
}

fn run_inside(argv: &[String]) -> io::Result<()> {
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| io::Error::other("empty argv"))?;
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{argv:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Brings `lo` up, as `ip link set lo up` would.
fn set_loopback_up() -> io::Result<()> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    // SAFETY: `ifreq` is plain old data; the name fits and stays NUL-terminated.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Echo servers on `0.0.0.0:port` and a v6-only `[::]:port`.
fn start_echo(transport: &str, port: u16) -> io::Result<()> {
    let v4 = SocketAddr::from(([0, 0, 0, 0], port));
    let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    match transport {
        "tcp" => {
            for addr in [v4, v6] {
                let listener = tcp_listener(addr)?;
                std::thread::spawn(move || tcp_echo(listener));
            }
        }
        "udp" => {
            for addr in [v4, v6] {
                let socket = udp_socket(addr)?;
                std::thread::spawn(move || udp_echo(socket));
            }
        }
        other => return Err(io::Error::other(format!("no echo server for {other}"))),
    }
    Ok(())
}

fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(128)?;
    Ok(s.into())
}

fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Per connection: echo until the client half-closes, then half-close back.
fn tcp_echo(listener: TcpListener) {
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut reader = &conn;
            let mut writer = &conn;
            let mut buf = vec![0; 256 * 1024];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || writer.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = conn.shutdown(std::net::Shutdown::Write);
        });
    }
}

fn udp_echo(socket: UdpSocket) {
    let mut buf = vec![0; 65536];
    while let Ok((n, from)) = socket.recv_from(&mut buf) {
        let _ = socket.send_to(&buf[..n], from);
    }
}
