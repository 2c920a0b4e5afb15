//! Shared pieces of the case tests: the Python servers run inside the namespace (embedded, so
//! the test executable works wherever it is copied), Rust clients for the host side, and
//! small checks on `/proc`.
//!
//! Every wait here is a bounded retry or a socket timeout that turns "never" into a failure;
//! none measures how long something took.

use std::fs;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use rkport_e2e::{bin, describe, output_within, retry};

/// The Python interpreter used for servers inside the namespace.
pub const PYTHON: &str = "/usr/bin/python3";

/// How long a client waits for any one read before calling the forward stalled.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// First lines of every helper script: die with the process that started it
/// (`PR_SET_PDEATHSIG`), so that a server started in the background by the command's shell
/// does not outlive the test.
const DIE_WITH_PARENT: &str = "import ctypes, signal\nctypes.CDLL(None).prctl(1, signal.SIGKILL)\n";

/// Per connection: sends `peer=<client ip>\n`, echoes until end of file, closes.
const TCP_PEER: &str = r#"
import socket, sys, threading
bind = sys.argv[2] if len(sys.argv) > 2 else "0.0.0.0"
s = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((bind, int(sys.argv[1])))
s.listen(128)
def h(c, a):
    try:
        c.sendall(("peer=%s\n" % a[0]).encode())
        while (d := c.recv(65536)):
            c.sendall(d)
    finally:
        c.close()
while True:
    c, a = s.accept()
    threading.Thread(target=h, args=(c, a), daemon=True).start()
"#;

/// Replies `echo:` + payload to each datagram's sender.
const UDP_ECHO: &str = r#"
import socket, sys
bind = sys.argv[2] if len(sys.argv) > 2 else "0.0.0.0"
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((bind, int(sys.argv[1])))
while True:
    d, a = s.recvfrom(65535)
    s.sendto(b"echo:" + d, a)
"#;

/// Per connection: sends `greeting\n`, shuts down its write side, then reads the client's
/// late data to end of file and appends it, one line per connection, to the file argv[2].
const REV_HALF_SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
while True:
    c, a = s.accept()
    c.sendall(b"greeting\n")
    c.shutdown(socket.SHUT_WR)
    late = b""
    while (d := c.recv(65536)):
        late += d
    c.close()
    with open(sys.argv[2], "ab") as f:
        f.write(late + b"\n")
"#;

/// Tries a TCP connection to argv[1]:argv[2] and prints `reached` or `failed: <error>`.
const PROBE_CONNECT: &str = r#"
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), 5).close()
    print("reached")
except OSError as e:
    print("failed: %s" % e)
"#;

/// A directory readable by the namespace's processes, holding the helper scripts and
/// whatever files a test shares with its servers. Removed when dropped.
#[derive(Debug)]
pub struct Work {
    dir: tempfile::TempDir,
}

impl Work {
    pub fn new() -> Work {
        let dir = tempfile::tempdir().expect("temp dir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        for (name, text) in [
            ("tcp_peer.py", TCP_PEER),
            ("udp_echo.py", UDP_ECHO),
            ("rev_half_server.py", REV_HALF_SERVER),
            ("probe_connect.py", PROBE_CONNECT),
        ] {
            let script = format!("{DIE_WITH_PARENT}{text}");
            fs::write(dir.path().join(name), script).expect("write helper script");
        }
        Work { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `path/name` as a string, for shell command lines.
    pub fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// A state dir for rootlesskit inside this directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("s")
    }

    /// `python3 <script> ARGS...` as one shell word list.
    pub fn py(&self, script: &str, args: &str) -> String {
        format!("{PYTHON} {} {args}", self.file(script))
    }
}

/// How a TCP attempt through a forward ended (the outcomes of the cases' `tcp_client.py`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// The first line the server sent, without its newline.
    Line(String),
    Refused,
    Reset,
    /// End of file before a full line; what had arrived.
    Eof(Vec<u8>),
    Timeout,
    Other(String),
}

impl Attempt {
    /// A line that starts with `peer=`.
    pub fn is_greeting(&self) -> bool {
        matches!(self, Attempt::Line(line) if line.starts_with("peer="))
    }

    /// Closed by the forwarder: an orderly end of file with no data, or a reset.
    pub fn is_prompt_close(&self) -> bool {
        matches!(self, Attempt::Reset) || matches!(self, Attempt::Eof(data) if data.is_empty())
    }
}

/// Connects to `addr` and reads the first line, each read bounded by `timeout`.
pub fn tcp_attempt(addr: SocketAddr, timeout: Duration) -> Attempt {
    let mut stream = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(stream) => stream,
        Err(e) => return classify(e),
    };
    stream.set_read_timeout(Some(timeout)).expect("timeout");
    match read_line(&mut stream) {
        Ok(Some(line)) => Attempt::Line(line),
        Ok(None) => Attempt::Eof(Vec::new()),
        Err(e) => classify(e),
    }
}

/// Like [`tcp_attempt`], to 127.0.0.1:`port`.
pub fn tcp_local(port: u16) -> Attempt {
    tcp_attempt(local(port), READ_TIMEOUT)
}

fn classify(e: io::Error) -> Attempt {
    match e.kind() {
        ErrorKind::ConnectionRefused => Attempt::Refused,
        ErrorKind::ConnectionReset => Attempt::Reset,
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Attempt::Timeout,
        ErrorKind::UnexpectedEof => Attempt::Eof(e.to_string().into_bytes()),
        _ => Attempt::Other(e.to_string()),
    }
}

/// Reads byte by byte up to a newline: `None` on end of file before any byte, an
/// `UnexpectedEof` error on end of file in the middle of the line.
pub fn read_line(stream: &mut TcpStream) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if stream.read(&mut byte)? == 0 {
            if line.is_empty() {
                return Ok(None);
            }
            let text = String::from_utf8_lossy(&line).into_owned();
            return Err(io::Error::new(ErrorKind::UnexpectedEof, text));
        }
        if byte[0] == b'\n' {
            return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
        }
        line.push(byte[0]);
    }
}

/// Retries [`tcp_local`] until it gets the server's greeting; the greeting line.
///
/// # Panics
/// When no attempt succeeded within the retry bound; the message has the last outcome.
pub fn greeting_when_up(port: u16) -> String {
    let mut last = Attempt::Timeout;
    retry(|| match tcp_attempt(local(port), Duration::from_secs(2)) {
        Attempt::Line(line) if line.starts_with("peer=") => Some(line),
        other => {
            last = other;
            None
        }
    })
    .unwrap_or_else(|| panic!("127.0.0.1:{port} never greeted; last attempt: {last:?}"))
}

/// 127.0.0.1:`port`.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Sends `msg` from `socket` (connected) and waits up to `timeout` for one datagram.
pub fn udp_exchange(socket: &UdpSocket, msg: &[u8], timeout: Duration) -> Option<Vec<u8>> {
    socket.set_read_timeout(Some(timeout)).expect("timeout");
    socket.send(msg).ok()?;
    let mut buf = [0u8; 65536];
    let n = socket.recv(&mut buf).ok()?;
    Some(buf[..n].to_vec())
}

/// A fresh UDP socket connected to 127.0.0.1:`port`.
pub fn udp_client(port: u16) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP client");
    socket.connect(local(port)).expect("connect the UDP client");
    socket
}

/// Resends `msg` from `socket` until a reply comes back; the reply.
pub fn udp_reply_when_up(socket: &UdpSocket, msg: &[u8]) -> Option<Vec<u8>> {
    retry(|| udp_exchange(socket, msg, Duration::from_millis(250)))
}

/// The result of sending `data` through an echoing forward and half-closing.
#[derive(Debug)]
pub struct EchoResult {
    pub greeting: String,
    pub echoed: Vec<u8>,
}

/// Connects to `addr`, reads the greeting, sends `data` from another thread, shuts down the
/// write side and reads the echo to end of file.
///
/// # Errors
/// Any connect, read or write failure, a read timeout among them (a stall).
pub fn echo_with_half_close(addr: SocketAddr, data: &[u8]) -> io::Result<EchoResult> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let greeting = read_line(&mut stream)?
        .ok_or_else(|| io::Error::new(ErrorKind::UnexpectedEof, "no greeting"))?;
    let mut writer = stream.try_clone()?;
    let echoed = std::thread::scope(|scope| {
        let sender = scope.spawn(move || -> io::Result<()> {
            writer.write_all(data)?;
            writer.shutdown(Shutdown::Write)
        });
        let mut echoed = Vec::with_capacity(data.len());
        let read = stream.read_to_end(&mut echoed);
        let sent = sender.join().expect("sender thread");
        read.and(sent).map(|_| echoed)
    })?;
    Ok(EchoResult { greeting, echoed })
}

/// Deterministic pseudo-random bytes (xorshift), so a corrupted copy cannot match by chance.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Runs `rootlessctl --socket=SOCKET ARGS`, killed if it has not ended within 30 s.
pub fn ctl(socket: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(bin("rootlessctl"));
    command
        .arg(format!("--socket={}", socket.display()))
        .args(args);
    output_within(command, Duration::from_secs(30))
}

/// Runs `rootlessctl ARGS` and asserts it succeeded; its stdout.
pub fn ctl_ok(socket: &Path, args: &[&str]) -> String {
    let output = ctl(socket, args);
    assert!(output.status.success(), "{args:?}: {}", describe(&output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `rootlessctl ARGS` and asserts it failed; its stderr.
pub fn ctl_err(socket: &Path, args: &[&str]) -> String {
    let output = ctl(socket, args);
    assert!(
        !output.status.success(),
        "{args:?} succeeded: {}",
        describe(&output)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `list-ports --json` output.
pub fn list_ports(socket: &Path) -> String {
    ctl_ok(socket, &["list-ports", "--json"])
}

/// The number of open descriptors of `pid`, in all its descriptor tables.
pub fn fd_count(pid: i32) -> usize {
    rkport_e2e::fd_targets(pid).len()
}

/// The open descriptors of a process: pipes and everything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdKinds {
    pub pipes: usize,
    pub other: usize,
}

impl FdKinds {
    pub fn of(pid: i32) -> FdKinds {
        let mut kinds = FdKinds { pipes: 0, other: 0 };
        for target in rkport_e2e::fd_targets(pid) {
            match target.starts_with("pipe:") {
                true => kinds.pipes += 1,
                false => kinds.other += 1,
            }
        }
        kinds
    }

    /// The lowest counts seen over 20 looks 50 ms apart.
    pub fn settled(pid: i32) -> FdKinds {
        let mut low = FdKinds::of(pid);
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(50));
            let now = FdKinds::of(pid);
            low.pipes = low.pipes.min(now.pipes);
            low.other = low.other.min(now.other);
        }
        low
    }
}

/// Whether a socket bound to 127.0.0.1:`port` exists in this network namespace, per
/// `/proc/net/{table}` (`tcp` listeners only, any `udp` socket).
pub fn socket_on(table: &str, port: u16) -> bool {
    let text = fs::read_to_string(format!("/proc/net/{table}")).expect("read /proc/net");
    let local = format!("0100007F:{port:04X}");
    text.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let listening = table != "tcp" || fields.get(3) == Some(&"0A");
        fields.get(1) == Some(&local.as_str()) && listening
    })
}

/// A port free on 127.0.0.1 for TCP and UDP alike, a moment ago.
pub fn free_port_both() -> u16 {
    retry(|| {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
        let port = tcp.local_addr().ok()?.port();
        UdpSocket::bind(local(port)).ok().map(|_| port)
    })
    .expect("a port free for TCP and UDP")
}

/// A port free on `ip` (a loopback address), a moment ago.
pub fn free_port_on(ip: IpAddr) -> u16 {
    let listener = std::net::TcpListener::bind((ip, 0)).expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// Asserts `output` failed and its stderr names every piece of `needles`.
pub fn assert_failed_naming(output: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{}", describe(output));
    for needle in needles {
        assert!(
            err.contains(needle),
            "missing {needle:?}: {}",
            describe(output)
        );
    }
}
