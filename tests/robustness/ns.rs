//! The namespace side: this test executable re-run as rootlesskit's command.
//!
//! `rootlesskit ... env RKPORT_ROBUST_ROLE=supervisor <this exe> --exact robustness::ns::ns_entry`
//! runs [`supervisor`]: it answers one-line commands on 127.0.0.1:[`CONTROL`] and, on `spawn`,
//! starts [`server`] as a separate process (so that a test can kill it by pid and start
//! another) and answers with its pid once it listens. There is no pid namespace, so that pid
//! is the host's.
//!
//! The server listens on 127.0.0.1 with a thread per connection:
//! - [`ECHO`]: echoes until end of file, then closes; counts connections, bytes and the sum of
//!   the FNV-1a hashes of what each connection sent, so that the client can check that nothing
//!   was lost or changed on the way;
//! - [`STREAM`]: sends [`STREAM_LEN`] bytes of [`pattern`] (to be killed while sending);
//! - [`STATS`]: sends `live total bytes hashsum` and closes.
//!
//! It dies with the supervisor (parent-death signal), which dies with rootlesskit's child.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use nix::sys::socket::{
    bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    SockaddrIn,
};

/// Selects the role of a re-run test executable.
pub const ROLE: &str = "RKPORT_ROBUST_ROLE";
pub const ECHO: u16 = 7100;
pub const STREAM: u16 = 7101;
pub const STATS: u16 = 7102;
pub const CONTROL: u16 = 7199;
/// What the stream port would send in full.
pub const STREAM_LEN: u64 = 1 << 30;

pub const FNV_INIT: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a over `data`, continuing from `h`.
pub fn fnv(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Byte `i` of the stream port's data: deterministic, and wrong if shifted or repeated.
pub fn pattern(i: u64) -> u8 {
    let x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 56) as u8 ^ (i as u8)
}

static LIVE: AtomicU64 = AtomicU64::new(0);
static TOTAL: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
static SUM: AtomicU64 = AtomicU64::new(0);

#[test]
#[ignore = "the namespace side of the robustness tests, started by them as rootlesskit's command"]
fn ns_entry() {
    match std::env::var(ROLE).as_deref() {
        Ok("supervisor") => supervisor(),
        Ok("server") => server(),
        _ => eprintln!("ns_entry: not started by a test, nothing to do"),
    }
}

/// Raises the soft descriptor limit to the hard one.
pub fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn supervisor() {
    raise_nofile();
    let control = TcpListener::bind((Ipv4Addr::LOCALHOST, CONTROL)).expect("bind control port");
    for conn in control.incoming().flatten() {
        let mut line = String::new();
        let mut reader = BufReader::new(&conn);
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        let answer = match line.trim() {
            "spawn" => spawn_server().map_or_else(|e| format!("error {e}"), |p| p.to_string()),
            other => format!("error unknown command {other:?}"),
        };
        let _ = (&conn).write_all(format!("{answer}\n").as_bytes());
    }
}

/// Starts a server process; its pid once its ports accept connections.
fn spawn_server() -> std::io::Result<u32> {
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "robustness::ns::ns_entry",
            "--include-ignored",
            "--nocapture",
        ])
        .env(ROLE, "server")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    let pid = child.id();
    for _ in 0..400 {
        if TcpStream::connect((Ipv4Addr::LOCALHOST, STATS)).is_ok() {
            thread::spawn(move || child.wait());
            return Ok(pid);
        }
        if child.try_wait()?.is_some() {
            return Err(std::io::Error::other("server exited at start"));
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(std::io::Error::other("server never listened"))
}

fn server() {
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    raise_nofile();
    let echo = listener(ECHO);
    let stream = listener(STREAM);
    let stats = listener(STATS);
    serve(stream, send_stream);
    serve(echo, |s| {
        echo_and_count(s);
        LIVE.fetch_sub(1, Ordering::SeqCst);
    });
    for conn in stats.incoming().flatten() {
        let line = format!(
            "{} {} {} {}\n",
            LIVE.load(Ordering::SeqCst),
            TOTAL.load(Ordering::SeqCst),
            BYTES.load(Ordering::SeqCst),
            SUM.load(Ordering::SeqCst)
        );
        let _ = (&conn).write_all(line.as_bytes());
    }
}

/// A listener on 127.0.0.1:`port` with the largest backlog (std's is 128), so that a burst
/// of thousands of connects is not slowed down by SYN retries.
fn listener(port: u16) -> TcpListener {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
    let addr = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    bind(fd.as_raw_fd(), &addr).expect("bind");
    listen(&fd, Backlog::MAXCONN).expect("listen");
    TcpListener::from(fd)
}

/// Accepts on `listener` in a thread, running `handle` on a small thread per connection.
fn serve(listener: TcpListener, handle: fn(TcpStream)) {
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else {
                thread::sleep(Duration::from_millis(10)); // EMFILE and the like
                continue;
            };
            if listener.local_addr().is_ok_and(|a| a.port() == ECHO) {
                LIVE.fetch_add(1, Ordering::SeqCst);
                TOTAL.fetch_add(1, Ordering::SeqCst);
            }
            let spawned = thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || handle(conn));
            if let Err(e) = spawned {
                eprintln!("server: cannot start a connection thread: {e}");
            }
        }
    });
}

/// Echoes until end of file; counts the bytes and the hash when the connection ended cleanly.
fn echo_and_count(mut s: TcpStream) {
    let mut buf = vec![0u8; 16 * 1024];
    let (mut h, mut n) = (FNV_INIT, 0u64);
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                h = fnv(h, &buf[..k]);
                n += k as u64;
                if s.write_all(&buf[..k]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
    BYTES.fetch_add(n, Ordering::SeqCst);
    SUM.fetch_add(h, Ordering::SeqCst);
}

fn send_stream(mut s: TcpStream) {
    let mut chunk = vec![0u8; 64 * 1024];
    let mut offset = 0u64;
    while offset < STREAM_LEN {
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = pattern(offset + i as u64);
        }
        if s.write_all(&chunk).is_err() {
            return;
        }
        offset += chunk.len() as u64;
    }
}
