//! Test support: a helper in a fresh user + network namespace, with servers inside.
//!
//! [`Ns::start`] re-runs this test binary as the entry test `namespace_side` in a new user and
//! network namespace (mapped to the caller's uid/gid, so no privilege is needed), with the
//! helper end of the channel as fd 3 and an answer pipe as fd 4. The namespace side brings `lo`
//! up, starts the servers listed below as threads, answers commands read from stdin on fd 4,
//! and runs `helper::serve` on fd 3 until the driver closes the channel.

#![allow(dead_code)]

use std::error::Error;
use std::ffi::CStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use rkport_builtin::{channel, helper, BuiltinDriver};

pub type Result<T = ()> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

/// Marks a process as the namespace side.
pub const ENV: &str = "RKPORT_BUILTIN_TEST_NS";
/// TCP echo on 127.0.0.1: echoes until end of file, then closes.
pub const ECHO: u16 = 7001;
/// TCP on 127.0.0.1: sends `greeting`, shuts down writing, counts what it still reads.
pub const REV: u16 = 7002;
/// TCP on 127.0.0.1: waits for REV's count and sends it.
pub const REV_QUERY: u16 = 7003;
/// TCP on 127.0.0.2 only: sends `c04` and closes.
pub const C04: u16 = 7004;
/// TCP echo on 127.0.0.1, started by the `late-tcp` command.
pub const LATE: u16 = 7005;
/// UDP echo on 127.0.0.1.
pub const UDP_ECHO: u16 = 7006;
/// UDP echo on 127.0.0.1, started by the `late-udp` command.
pub const UDP_LATE: u16 = 7007;
/// TCP echo on [::1], when the namespace has IPv6.
pub const ECHO6: u16 = 7008;
/// UDP on 127.0.0.1: answers each datagram with the sender's address.
pub const UDP_PEER: u16 = 7009;

/// TCP on 127.0.0.1: reads to end of file, then sends the byte count.
pub const DISCARD: u16 = 7010;

/// Generous guard against hangs; never an assertion on time.
pub const HANG_GUARD: Duration = Duration::from_secs(30);

/// A namespace-side process serving the helper channel.
#[derive(Debug)]
pub struct Ns {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    answers: BufReader<File>,
}

impl Ns {
    /// Starts the namespace side and a driver connected to it; waits until the servers run.
    pub fn start() -> Result<(Ns, BuiltinDriver)> {
        let (ns, parent_end) = Ns::start_raw()?;
        Ok((ns, BuiltinDriver::new(parent_end)?))
    }

    /// Starts the namespace side; returns it with the parent end of its channel.
    pub fn start_raw() -> Result<(Ns, OwnedFd)> {
        let (parent_end, helper_end) = channel()?;
        let (answer_r, answer_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args([
            "--exact",
            "namespace_side",
            "--include-ignored",
            "--nocapture",
        ])
        .env(ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
        let flags = libc::CLONE_NEWUSER | libc::CLONE_NEWNET;
        prepare_child(&mut cmd, flags, Some((&helper_end, &answer_w)));
        let child = cmd.spawn()?;
        drop((helper_end, answer_w));

        let mut ns = Ns {
            stdin: None,
            child: Some(child),
            answers: BufReader::new(File::from(answer_r)),
        };
        ns.stdin = ns.child.as_mut().and_then(|c| c.stdin.take());
        assert_eq!(ns.ask("ping")?, "pong");
        Ok((ns, parent_end))
    }

    /// Sends a command to the namespace side and returns its one-line answer.
    pub fn ask(&mut self, command: &str) -> Result<String> {
        let stdin = self.stdin.as_mut().ok_or("namespace side has no stdin")?;
        writeln!(stdin, "{command}")?;
        let mut line = String::new();
        self.answers.read_line(&mut line)?;
        if line.is_empty() {
            return Err(format!("namespace side exited before answering {command:?}").into());
        }
        Ok(line.trim_end().to_owned())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Descriptors open in the namespace-side process.
    pub fn fd_count(&self) -> Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{}/fd", self.pid()))?.count())
    }

    /// Shuts the driver down and checks that the helper then returned cleanly.
    pub fn finish(self, driver: BuiltinDriver) -> Result {
        driver.shutdown();
        drop(driver);
        self.wait()
    }

    /// Waits for the namespace side to return, once its channel's parent end is closed.
    pub fn wait(mut self) -> Result {
        self.stdin = None;
        let status = self.child.take().ok_or("already finished")?.wait()?;
        assert!(status.success(), "namespace side failed: {status}");
        Ok(())
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        // Only on a failed test: end the process we started, by its handle.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Makes `cmd` unshare `flags` (none if 0; with a new user namespace mapping root to the
/// caller) and, when given, find the two descriptors of `fds` at numbers 3 and 4.
pub fn prepare_child(cmd: &mut Command, flags: libc::c_int, fds: Option<(&OwnedFd, &OwnedFd)>) {
    // Formatted before fork: only async-signal-safe calls may run between fork and exec.
    let uid_map = format!("0 {} 1\n", nix::unistd::geteuid());
    let gid_map = format!("0 {} 1\n", nix::unistd::getegid());
    let fds = fds.map(|(a, b)| (a.as_raw_fd(), b.as_raw_fd()));
    // SAFETY: the closure only makes raw system calls (unshare, open, write, close, fcntl,
    // dup2) on preformatted data; it allocates nothing and takes no lock, as required in a
    // child forked from a multi-threaded process.
    unsafe {
        cmd.pre_exec(move || {
            if flags != 0 {
                if libc::unshare(flags) != 0 {
                    return Err(io::Error::last_os_error());
                }
                write_proc(c"/proc/self/setgroups", b"deny")?;
                write_proc(c"/proc/self/uid_map", uid_map.as_bytes())?;
                write_proc(c"/proc/self/gid_map", gid_map.as_bytes())?;
            }
            match fds {
                Some((a, b)) => place_fds(a, b),
                None => Ok(()),
            }
        });
    }
}

/// Writes `data` to a /proc file without allocating.
///
/// # Safety
/// Only raw system calls; callable between fork and exec.
unsafe fn write_proc(path: &CStr, data: &[u8]) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated; the descriptor is closed before returning.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `data` is valid for `data.len()` bytes and `fd` is open.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    // SAFETY: `fd` is ours and open.
    unsafe { libc::close(fd) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Puts `a` at 3 and `b` at 4, without close-on-exec.
///
/// # Safety
/// Only raw system calls; callable between fork and exec.
unsafe fn place_fds(a: RawFd, b: RawFd) -> io::Result<()> {
    // Copies above 10 first, so that neither source can be overwritten by the other's dup2.
    // SAFETY: plain fcntl/dup2/close on descriptors of this process.
    unsafe {
        let (ta, tb) = (
            libc::fcntl(a, libc::F_DUPFD_CLOEXEC, 10),
            libc::fcntl(b, libc::F_DUPFD_CLOEXEC, 10),
        );
        if ta < 0 || tb < 0 || libc::dup2(ta, 3) < 0 || libc::dup2(tb, 4) < 0 {
            return Err(io::Error::last_os_error());
        }
        libc::close(ta);
        libc::close(tb);
    }
    Ok(())
}

/// Logs to stderr when `RUST_LOG` is set (for debugging a failing test).
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// What the open descriptors of process `pid` refer to, in all its descriptor tables: the
/// main one and those of the driver's workers (threads `rkport-worker-N`), which
/// `/proc/PID/fd` does not list.
pub fn fd_targets(pid: u32) -> Result<Vec<String>> {
    let mut dirs = vec![std::path::PathBuf::from(format!("/proc/{pid}/fd"))];
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?.path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.starts_with("rkport-worker") {
            dirs.push(task.join("fd"));
        }
    }
    let mut targets = Vec::new();
    for dir in dirs {
        // A worker that has just ended has no table left to read.
        for entry in std::fs::read_dir(dir).into_iter().flatten() {
            let target = std::fs::read_link(entry?.path()).unwrap_or_default();
            targets.push(target.to_string_lossy().into_owned());
        }
    }
    Ok(targets)
}

/// Sockets among the descriptors of process `pid`, in all its tables, that the kernel lists
/// in the network namespace of `pid` or of `ns` (the namespace side): bound, listening or
/// connected TCP and UDP sockets, and unix sockets. TCP sockets neither bound nor connected,
/// the driver's spares, are not counted: how many it holds follows its refills, not the
/// connections.
pub fn socket_count(pid: u32, ns: u32) -> Result<usize> {
    let mut listed = std::collections::HashSet::new();
    for p in [pid, ns] {
        for (table, column) in [
            ("tcp", 9),
            ("tcp6", 9),
            ("udp", 9),
            ("udp6", 9),
            ("unix", 6),
        ] {
            let text = std::fs::read_to_string(format!("/proc/{p}/net/{table}"))?;
            let rows = text.lines().skip(1);
            listed
                .extend(rows.filter_map(|l| l.split_whitespace().nth(column)?.parse::<u64>().ok()));
        }
    }
    let targets = fd_targets(pid)?;
    let inodes = targets.iter().filter_map(|t| {
        t.strip_prefix("socket:[")?
            .strip_suffix(']')?
            .parse::<u64>()
            .ok()
    });
    Ok(inodes.filter(|i| listed.contains(i)).count())
}

/// Connections waiting in the accept queue of the TCP listener on 127.0.0.1:`port`, from
/// /proc/net/tcp (a listener's `rx_queue`).
pub fn accept_queue(port: u16) -> Result<usize> {
    let local = format!("0100007F:{port:04X}");
    let table = std::fs::read_to_string("/proc/net/tcp")?;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 4 && f[1] == local && f[3] == "0A" {
            let rx = f[4].split(':').nth(1).ok_or("bad /proc/net/tcp")?;
            return Ok(usize::from_str_radix(rx, 16)?);
        }
    }
    Err(format!("no listener on 127.0.0.1:{port}").into())
}

/// Polls `cond` until it holds; fails after `HANG_GUARD`.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> Result<bool>) -> Result {
    let start = std::time::Instant::now();
    while !cond()? {
        if start.elapsed() > HANG_GUARD {
            return Err(format!("gave up waiting for {what}").into());
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A port free for both TCP and UDP on 127.0.0.1, outside the ephemeral range.
pub fn free_port() -> Result<u16> {
    // Below the kernel's range of ephemeral ports (32768–60999 by default), from which
    // connect(2) and bind(0) pick: no connection of a test running alongside can take a port
    // handed out here between its pick and its use (or while a test has it unbound for a
    // moment). Picks walk the range from an offset of this process, so that concurrent tests
    // get different ports.
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let seed = std::process::id().wrapping_mul(7919) % SPAN;
    let _ = NEXT.compare_exchange(u32::MAX, seed, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        let free = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
            && UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).is_ok();
        if free {
            return Ok(port);
        }
    }
    Err("no free port between 20000 and 31999".into())
}

/// Connects to `addr` with the hang guard set for reads and writes.
pub fn connect(addr: impl Into<SocketAddr>) -> Result<TcpStream> {
    let s = TcpStream::connect(addr.into())?;
    s.set_read_timeout(Some(HANG_GUARD))?;
    s.set_write_timeout(Some(HANG_GUARD))?;
    Ok(s)
}

/// Sends `msg`, half-closes, and returns everything read until end of file.
pub fn request(addr: impl Into<SocketAddr>, msg: &[u8]) -> Result<Vec<u8>> {
    let mut s = connect(addr)?;
    s.write_all(msg)?;
    s.shutdown(Shutdown::Write)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(out)
}

/// A UDP socket on 127.0.0.1 with the hang guard as read timeout.
pub fn udp_client() -> Result<UdpSocket> {
    let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    s.set_read_timeout(Some(HANG_GUARD))?;
    Ok(s)
}

/// Sends `msg` to `to` and returns the datagram that comes back.
pub fn udp_round(s: &UdpSocket, to: SocketAddr, msg: &[u8]) -> Result<Vec<u8>> {
    s.send_to(msg, to)?;
    udp_recv(s)
}

/// The next datagram that arrives on `s`.
pub fn udp_recv(s: &UdpSocket) -> Result<Vec<u8>> {
    let mut buf = vec![0; 65536];
    let (n, _) = s.recv_from(&mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// Deterministic test data: the `i`-th 8-byte word of a xorshift stream.
pub fn pattern(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// FNV-1a over `data`, continuing from `h`.
pub fn fnv(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

pub const FNV_INIT: u64 = 0xcbf2_9ce4_8422_2325;

// ---------------------------------------------------------------------------------------------
// The namespace side.

/// Runs inside the namespace: servers, the command loop, then the helper on fd 3.
pub fn namespace_main() -> Result {
    init_tracing();
    lo_up()?;
    let rev_count = Arc::new((Mutex::new(None::<usize>), Condvar::new()));
    spawn_tcp((Ipv4Addr::LOCALHOST, ECHO).into(), echo)?;
    spawn_tcp((Ipv4Addr::new(127, 0, 0, 2), C04).into(), |mut s| {
        let _ = s.write_all(b"c04");
    })?;
    let count = rev_count.clone();
    spawn_tcp((Ipv4Addr::LOCALHOST, REV).into(), move |s| rev(s, &count))?;
    let count = rev_count.clone();
    spawn_tcp((Ipv4Addr::LOCALHOST, REV_QUERY).into(), move |s| {
        rev_query(s, &count)
    })?;
    spawn_udp((Ipv4Addr::LOCALHOST, UDP_ECHO).into(), |_, data| {
        data.to_vec()
    })?;
    spawn_udp((Ipv4Addr::LOCALHOST, UDP_PEER).into(), |peer, _| {
        peer.to_string().into_bytes()
    })?;
    spawn_tcp((Ipv4Addr::LOCALHOST, DISCARD).into(), discard)?;
    let v6 = spawn_tcp("[::1]:7008".parse()?, echo).is_ok();

    // SAFETY: fd 4 was placed by the parent for this process alone (the answer pipe).
    let answers = unsafe { File::from_raw_fd(4) };
    thread::spawn(move || commands(answers, v6));
    // SAFETY: fd 3 was placed by the parent for this process alone (the helper channel).
    let channel = unsafe { OwnedFd::from_raw_fd(3) };
    helper::serve(channel)?;
    Ok(())
}

/// Sets this process's soft open-files limit to `n`.
fn lower_nofile(n: u64) -> io::Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, n.min(hard), hard)?;
    Ok(())
}

/// Answers stdin commands on `answers`, one line each.
fn commands(mut answers: File, v6: bool) {
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { return };
        let answer = match line.as_str() {
            "ping" => "pong".to_owned(),
            "v6" => if v6 { "yes" } else { "no" }.to_owned(),
            "late-tcp" => result(spawn_tcp((Ipv4Addr::LOCALHOST, LATE).into(), echo)),
            "late-udp" => result(spawn_udp((Ipv4Addr::LOCALHOST, UDP_LATE).into(), |_, d| {
                d.to_vec()
            })),
            other => match other.strip_prefix("nofile ").map(str::parse::<u64>) {
                Some(Ok(n)) => result(lower_nofile(n)),
                _ => format!("unknown command {other:?}"),
            },
        };
        if writeln!(answers, "{answer}").is_err() {
            return;
        }
    }
}

fn result(r: io::Result<()>) -> String {
    match r {
        Ok(()) => "ok".to_owned(),
        Err(e) => e.to_string(),
    }
}

/// Listens on `addr` and runs `serve` on a thread per connection.
fn spawn_tcp(
    addr: SocketAddr,
    serve: impl Fn(TcpStream) + Clone + Send + 'static,
) -> io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let serve = serve.clone();
            thread::spawn(move || serve(conn));
        }
    });
    Ok(())
}

/// Answers every datagram on `addr` with `reply(peer, data)`.
fn spawn_udp(
    addr: SocketAddr,
    reply: impl Fn(SocketAddr, &[u8]) -> Vec<u8> + Send + 'static,
) -> io::Result<()> {
    let sock = UdpSocket::bind(addr)?;
    thread::spawn(move || {
        let mut buf = vec![0; 65536];
        while let Ok((n, peer)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&reply(peer, &buf[..n]), peer);
        }
    });
    Ok(())
}

/// Echoes until end of file, then closes (both copies drop before the peer sees the FIN).
fn echo(s: TcpStream) {
    let Ok(mut r) = s.try_clone() else { return };
    let mut w = s;
    let _ = io::copy(&mut r, &mut w);
}

/// Reads until end of file, then reports how many bytes came.
pub fn discard(mut s: TcpStream) {
    if let Ok(n) = io::copy(&mut s, &mut io::sink()) {
        let _ = write!(s, "{n}");
    }
}

fn rev(mut s: TcpStream, count: &(Mutex<Option<usize>>, Condvar)) {
    let _ = s.write_all(b"greeting");
    let _ = s.shutdown(Shutdown::Write);
    let mut late = Vec::new();
    let _ = s.read_to_end(&mut late);
    *count.0.lock().unwrap() = Some(late.len());
    count.1.notify_all();
}

fn rev_query(mut s: TcpStream, count: &(Mutex<Option<usize>>, Condvar)) {
    let guard = count.0.lock().unwrap();
    let guard = count.1.wait_while(guard, |c| c.is_none()).unwrap();
    let _ = write!(s, "{}", guard.unwrap_or(0));
}

/// Sets IFF_UP on `lo` (SIOCSIFFLAGS), as `ip link set lo up` does.
fn lo_up() -> io::Result<()> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of the valid `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS has just filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
