//! The host side: a rootlesskit running the [`ns`](super::ns) supervisor with its ports
//! published, and small measuring helpers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use rkport_e2e::{retry, Kit};

use super::ns::{fnv, CONTROL, ECHO, FNV_INIT, ROLE, STATS, STREAM};

/// Guard against a hang on a socket; never an assertion on time.
pub const HANG_GUARD: Duration = Duration::from_secs(30);

/// A rootlesskit with the builtin driver publishing the namespace side's four ports.
#[derive(Debug)]
pub struct Lab {
    pub kit: Kit,
    pub echo: u16,
    pub stream: u16,
    pub stats: u16,
    pub control: u16,
    pub state: PathBuf,
    _tmp: tempfile::TempDir,
}

/// The echo server's counters (see [`super::ns`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub live: u64,
    pub total: u64,
    pub bytes: u64,
    pub hashsum: u64,
}

impl Lab {
    /// Starts rootlesskit with `--port-driver=builtin` and `net` (`--net=none` when empty) and
    /// waits until it is ready; no server runs yet ([`Lab::spawn_server`]).
    pub fn start(net: &[&str]) -> Lab {
        let tmp = tempfile::tempdir().expect("temp dir");
        let state = tmp.path().join("s");
        let [echo, stream, stats, control] = rkport_e2e::free_ports();
        let mut args: Vec<String> = if net.is_empty() {
            vec!["--net=none".into()]
        } else {
            net.iter().map(|s| s.to_string()).collect()
        };
        args.push("--port-driver=builtin".into());
        for (host, child) in [
            (echo, ECHO),
            (stream, STREAM),
            (stats, STATS),
            (control, CONTROL),
        ] {
            args.extend(["-p".into(), format!("127.0.0.1:{host}:{child}/tcp")]);
        }
        let exe = std::env::current_exe().expect("test executable");
        args.extend([
            "/usr/bin/env".into(),
            format!("{ROLE}=supervisor"),
            exe.display().to_string(),
            "--exact".into(),
            "robustness::ns::ns_entry".into(),
            "--include-ignored".into(),
            "--nocapture".into(),
        ]);
        let mut kit = Kit::spawn(&state, &args);
        kit.wait_ready();
        Lab {
            kit,
            echo,
            stream,
            stats,
            control,
            state,
            _tmp: tmp,
        }
    }

    /// Starts an echo/stream/stats server inside; its (host) pid once it listens.
    pub fn spawn_server(&self) -> i32 {
        spawn_server_on(self.control)
    }

    /// The echo server's counters.
    pub fn stats(&self) -> Stats {
        let mut line = String::new();
        let mut s = connect(self.stats).expect("connect to the stats port");
        s.read_to_string(&mut line).expect("read stats");
        let f: Vec<u64> = line
            .split_whitespace()
            .map(|w| w.parse().expect("number"))
            .collect();
        assert_eq!(f.len(), 4, "stats line {line:?}");
        Stats {
            live: f[0],
            total: f[1],
            bytes: f[2],
            hashsum: f[3],
        }
    }
}

/// Asks the supervisor behind host port `control` for a server; its (host) pid.
pub fn spawn_server_on(control_port: u16) -> i32 {
    let answer = retry(|| control(control_port, "spawn").ok())
        .expect("the supervisor never answered on its control port");
    answer
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("spawn failed: {answer}"))
}

/// Sends `command` to the supervisor and returns its answer line.
fn control(port: u16, command: &str) -> std::io::Result<String> {
    let mut s = connect(port)?;
    s.write_all(format!("{command}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(line)
}

/// Connects to 127.0.0.1:`port` with the hang guard on reads and writes.
pub fn connect(port: u16) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    s.set_read_timeout(Some(HANG_GUARD))?;
    s.set_write_timeout(Some(HANG_GUARD))?;
    Ok(s)
}

/// `len` bytes determined by `seed`.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `data` on an open echo connection and checks that exactly it comes back.
pub fn exchange(s: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    s.write_all(data)?;
    let mut back = vec![0u8; data.len()];
    s.read_exact(&mut back)?;
    if back != data {
        return Err(std::io::Error::other("echo differs from what was sent"));
    }
    Ok(())
}

/// One short echo connection: connect, send, half-close, read all, compare; the FNV-1a hash of
/// what was sent.
pub fn short_echo(port: u16, data: &[u8]) -> std::io::Result<u64> {
    let mut s = connect(port)?;
    s.write_all(data)?;
    s.shutdown(Shutdown::Write)?;
    let mut back = Vec::with_capacity(data.len());
    s.read_to_end(&mut back)?;
    if back != data {
        return Err(std::io::Error::other(format!(
            "echo of {} bytes came back as {} different bytes",
            data.len(),
            back.len()
        )));
    }
    Ok(fnv(FNV_INIT, data))
}

/// Descriptors open in process `pid`, in all its descriptor tables.
pub fn fd_count(pid: i32) -> usize {
    rkport_e2e::fd_targets(pid).len()
}

/// Resident set size of process `pid`, KiB.
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Waits (bounded) until `pid`'s descriptors are down to `at_most`; the count seen last.
pub fn settle_fds(pid: i32, at_most: usize) -> usize {
    retry(|| {
        let n = fd_count(pid);
        (n <= at_most).then_some(n)
    })
    .unwrap_or_else(|| fd_count(pid))
}

/// Reads until end of file or an error; (bytes read, how it ended). Panics on a hang.
pub fn drain(s: &mut TcpStream) -> (u64, std::io::Result<()>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (total, Ok(())),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let hung = matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                );
                assert!(!hung, "read hung for {HANG_GUARD:?} instead of ending");
                return (total, Err(e));
            }
        }
    }
}
