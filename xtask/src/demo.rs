//! `cargo xtask demo`: the main job, end to end.
//!
//! Starts `python3 -m http.server` on 127.0.0.1:8000 inside a new user + network namespace with
//! only a loopback interface (`--net=none`), publishes it on the host's 127.0.0.1:18080 with the
//! builtin driver, fetches a page through the published port, lists the ports with
//! `rootlessctl`, and stops the namespace with SIGTERM.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util::{cargo, run as sh, workspace_root};

const HOST_PORT: u16 = 18080;
const PAGE: &str = "hello from inside the namespace\n";

pub fn run() -> Result<()> {
    sh(cargo().args(["build", "--quiet", "-p", "rkport-cli"]))?;
    let bin = workspace_root().join("target/debug");
    let work = std::env::temp_dir().join(format!("rkport-demo-{}", std::process::id()));
    let www = work.join("www");
    fs::create_dir_all(&www)?;
    fs::write(www.join("index.html"), PAGE)?;
    let state = work.join("state");

    let mut kit = Command::new(bin.join("rootlesskit"))
        .arg("--net=none")
        .arg("--port-driver=builtin")
        .arg(format!("--state-dir={}", state.display()))
        .arg(format!("--publish=127.0.0.1:{HOST_PORT}:8000/tcp"))
        .args([
            "python3",
            "-m",
            "http.server",
            "8000",
            "--bind",
            "127.0.0.1",
        ])
        .current_dir(&www)
        .spawn()
        .context("starting rootlesskit")?;
    let result = exercise(&bin, &state);
    let stopped = stop(&mut kit);
    let _ = fs::remove_dir_all(&work);
    result?;
    let status = stopped?;
    println!(
        "rootlesskit exited ({status}); state dir removed: {}",
        !state.exists()
    );
    Ok(())
}

fn exercise(bin: &Path, state: &Path) -> Result<()> {
    let body = fetch_with_retry(Duration::from_secs(30))?;
    println!(
        "GET http://127.0.0.1:{HOST_PORT}/ from the host answered:\n  {}",
        body.trim()
    );
    if body != PAGE {
        bail!("unexpected page through the published port: {body:?}");
    }
    let list = Command::new(bin.join("rootlessctl"))
        .arg(format!("--socket={}", state.join("api.sock").display()))
        .arg("list-ports")
        .output()?;
    println!(
        "rootlessctl list-ports:\n{}",
        String::from_utf8_lossy(&list.stdout)
    );
    Ok(())
}

/// GETs `/` through the published port until the server inside answers.
fn fetch_with_retry(limit: Duration) -> Result<String> {
    let start = Instant::now();
    loop {
        match fetch() {
            Ok(body) => return Ok(body),
            Err(e) if start.elapsed() > limit => bail!("no answer through the port: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn fetch() -> Result<String> {
    let mut conn = TcpStream::connect(("127.0.0.1", HOST_PORT))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply)?;
    let (head, body) = reply.split_once("\r\n\r\n").context("no HTTP reply")?;
    if !head.starts_with("HTTP/1.0 200") {
        bail!("HTTP status {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_owned())
}

fn stop(kit: &mut Child) -> Result<std::process::ExitStatus> {
    if let Ok(Some(status)) = kit.try_wait() {
        return Ok(status);
    }
    // SAFETY: kill(2) on the pid of a child we started and have not reaped.
    unsafe { libc::kill(kit.id() as libc::pid_t, libc::SIGTERM) };
    Ok(kit.wait()?)
}
