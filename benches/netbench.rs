//! Traffic tool of the port-forwarding benchmark run by `cargo xtask bench`.
//!
//! One release-built executable plays both ends, chosen by the first argument:
//!
//! - `serve IPERF_PORT CLOSE_PORT ECHO_PORT`: the workload inside the namespace. Starts
//!   `iperf3 -s` on IPERF_PORT, waits until it listens, then serves CLOSE_PORT (read one
//!   message, send it back, close: the server closes first, so no TIME_WAIT piles up on the
//!   client's ports) and ECHO_PORT (echo until the client closes). Dies with its parent.
//! - `connrate ADDR SECS THREADS`: short connections (connect, send 8 bytes, read the echo and
//!   the end of stream, close) for SECS seconds from THREADS threads; prints JSON.
//! - `rtt ADDR COUNT`: COUNT ping-pongs of 16 bytes over one connection; prints the p50 and
//!   p99 round trip in microseconds as JSON.
//! - `idle ADDR COUNT`: opens COUNT echo connections, makes one round trip on each, prints
//!   `ready` and holds them until its stdin closes.
//!
//! It is not part of `cargo test`; `cargo bench` alone only prints how to run the benchmark.

use std::io::{BufRead, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Threads that accept on the reply-and-close port.
const CLOSE_ACCEPTORS: usize = 4;
/// Bytes of one short-connection message.
const SHORT_MSG: &[u8; 8] = b"rkbench\n";
/// Bytes of one ping-pong message.
const PING: &[u8; 16] = b"rkbench-ping-16\n";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match argv.as_slice() {
        ["serve", iperf, close, echo] => serve(iperf.parse().ok(), close, echo),
        ["connrate", addr, secs, threads] => connrate(addr, secs, threads),
        ["rtt", addr, count] => rtt(addr, count),
        ["idle", addr, count] => idle(addr, count),
        [] | ["--bench", ..] => {
            println!("netbench: run the port-forwarding benchmark with `cargo xtask bench`");
            Ok(())
        }
        _ => Err(format!("unknown arguments {args:?}").into()),
    };
    if let Err(e) = result {
        eprintln!("netbench: {e}");
        std::process::exit(1);
    }
}

// ---- server side ----

fn serve(iperf_port: Option<u16>, close: &str, echo: &str) -> Result<()> {
    die_with_parent();
    let port = iperf_port.ok_or("bad iperf3 port")?;
    let mut iperf = start_iperf3(port)?;
    wait_listening(port, &mut iperf)?;

    let close = TcpListener::bind(("0.0.0.0", close.parse::<u16>()?))?;
    let echo = TcpListener::bind(("0.0.0.0", echo.parse::<u16>()?))?;
    for _ in 0..CLOSE_ACCEPTORS {
        let close = close.try_clone()?;
        std::thread::spawn(move || serve_close(close));
    }
    std::thread::spawn(move || serve_echo(echo));

    let status = iperf.wait()?;
    Err(format!("iperf3 server exited: {status}").into())
}

/// Asks the kernel to kill this process when its parent exits.
fn die_with_parent() {
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag of the calling process.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
}

fn start_iperf3(port: u16) -> Result<Child> {
    use std::os::unix::process::CommandExt;

    let mut cmd = Command::new("iperf3");
    cmd.args(["-s", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stdin(Stdio::null());
    // SAFETY: the closure only calls prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    };
    Ok(cmd
        .spawn()
        .map_err(|e| format!("cannot start iperf3: {e}"))?)
}

/// Waits until a TCP socket listens on `port` in this network namespace (from /proc/net), so
/// that iperf3 never sees a probe connection.
fn wait_listening(port: u16, iperf: &mut Child) -> Result<()> {
    let needle = format!(":{port:04X} ");
    for _ in 0..400 {
        if let Some(status) = iperf.try_wait()? {
            return Err(format!("iperf3 server exited: {status}").into());
        }
        let listening = ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
            std::fs::read_to_string(f).is_ok_and(|t| {
                t.lines()
                    .any(|l| l.contains(&needle) && l.split_whitespace().nth(3) == Some("0A"))
            })
        });
        if listening {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Err(format!("iperf3 does not listen on port {port}").into())
}

fn serve_close(listener: TcpListener) {
    for conn in listener.incoming().flatten() {
        let _ = reply_and_close(conn);
    }
}

fn reply_and_close(mut conn: TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; 64];
    let n = conn.read(&mut buf)?;
    conn.write_all(&buf[..n])
}

fn serve_echo(listener: TcpListener) {
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || echo_until_eof(conn));
    }
}

fn echo_until_eof(mut conn: TcpStream) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut buf = [0u8; 4096];
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        conn.write_all(&buf[..n])?;
    }
}

// ---- client side ----

fn connrate(addr: &str, secs: &str, threads: &str) -> Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let secs: f64 = secs.parse()?;
    let threads: usize = threads.parse()?;
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));

    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let counter = if short_conn(addr).is_ok() {
                        &done
                    } else {
                        &failed
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }

    let elapsed = start.elapsed().as_secs_f64();
    let (done, failed) = (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(r#"{{"conns":{done},"errors":{failed},"secs":{elapsed}}}"#);
    Ok(())
}

/// One short connection: the reply must be the message, followed by the end of stream.
fn short_conn(addr: SocketAddr) -> Result<()> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(SHORT_MSG)?;
    let mut reply = Vec::with_capacity(16);
    conn.read_to_end(&mut reply)?;
    if reply != SHORT_MSG {
        return Err(format!("bad reply of {} bytes", reply.len()).into());
    }
    Ok(())
}

fn rtt(addr: &str, count: &str) -> Result<()> {
    let count: usize = count.parse()?;
    let mut conn = echo_conn(addr.parse()?)?;
    for _ in 0..count / 10 {
        ping(&mut conn)?;
    }

    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        ping(&mut conn)?;
        samples.push(start.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!(
        r#"{{"p50_us":{},"p99_us":{},"n":{count}}}"#,
        at(0.5),
        at(0.99)
    );
    Ok(())
}

fn echo_conn(addr: SocketAddr) -> Result<TcpStream> {
    let conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(conn)
}

fn ping(conn: &mut TcpStream) -> Result<()> {
    conn.write_all(PING)?;
    let mut reply = [0u8; PING.len()];
    conn.read_exact(&mut reply)?;
    if &reply != PING {
        return Err("echo mismatch".into());
    }
    Ok(())
}

fn idle(addr: &str, count: &str) -> Result<()> {
    let addr: SocketAddr = addr.parse()?;
    let count: usize = count.parse()?;
    let mut conns = Vec::with_capacity(count);
    for _ in 0..count {
        let mut conn = echo_conn(addr)?;
        ping(&mut conn)?;
        conns.push(conn);
    }
    println!("ready");
    std::io::stdout().flush()?;

    // Hold the connections until the runner closes our stdin.
    let mut line = String::new();
    while std::io::stdin().lock().read_line(&mut line)? > 0 {
        line.clear();
    }
    for conn in &conns {
        let _ = conn.shutdown(Shutdown::Both);
    }
    Ok(())
}
