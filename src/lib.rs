//! Support code for the end-to-end tests: finding the built binaries, running `rootlesskit`
//! under a guard that always tears it down, and small clients (HTTP over TCP, HTTP over
//! `api.sock`) that need nothing but std.
//!
//! The binaries are not built by `cargo test` of this package: build them first
//! (`cargo build -p rkport-cli`) or point `RKPORT_BIN_DIR` at a directory holding them.
//! Waits here are bounded retries of a condition, never sleeps whose length decides a result.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How many times a condition is retried, and how long between tries.
const RETRIES: u32 = 400;
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// The directory holding `rootlesskit` and `rootlessctl`: `$RKPORT_BIN_DIR`, else the cargo
/// target directory of this test executable (`target/debug`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RKPORT_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("test executable directory");
    match deps.file_name() == Some(OsStr::new("deps")) {
        true => deps.parent().expect("target directory").to_owned(),
        false => deps.to_owned(),
    }
}

/// The path of binary `name`, panicking with instructions when it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} not found: build it with `cargo build -p rkport-cli` or set RKPORT_BIN_DIR",
        path.display()
    );
    path
}

/// Retries `f` until it returns `Some`, at most ~20 s; `None` when it never did.
pub fn retry<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    for _ in 0..RETRIES {
        if let Some(value) = f() {
            return Some(value);
        }
        std::thread::sleep(RETRY_PAUSE);
    }
    None
}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// `N` different free ports: each is held until all are picked, so that two picks cannot
/// return the same port, as separate [`free_port`] calls now and then do.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    std::array::from_fn(|i| held[i].local_addr().expect("local address").port())
}

/// Whether process `pid` exists (zombies count as gone).
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// The pids of the children of `pid`.
pub fn children(pid: i32) -> Vec<i32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A running `rootlesskit`, killed (by pid) and reaped when dropped.
#[derive(Debug)]
pub struct Kit {
    child: Option<Child>,
    state_dir: PathBuf,
}

impl Kit {
    /// Starts `rootlesskit --state-dir=STATE ARGS...` with stdout/stderr piped.
    pub fn spawn<I, S>(state_dir: &Path, args: I) -> Kit
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let child = Command::new(bin("rootlesskit"))
            .arg(format!("--state-dir={}", state_dir.display()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start rootlesskit");
        Kit {
            child: Some(child),
            state_dir: state_dir.to_owned(),
        }
    }

    /// The pid of the `rootlesskit` parent.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn api_socket(&self) -> PathBuf {
        self.state_dir.join("api.sock")
    }

    /// Waits until `api.sock` accepts connections (all `-p` ports are published by then).
    ///
    /// # Panics
    /// When rootlesskit exits first or the socket never answers; the message has its output.
    pub fn wait_ready(&mut self) {
        let socket = self.api_socket();
        let ready = retry(|| {
            if let Some(status) = self.try_wait() {
                return Some(Err(status));
            }
            UnixStream::connect(&socket).ok().map(|_| Ok(()))
        });
        match ready {
            Some(Ok(())) => {}
            Some(Err(status)) => {
                let output = self.finish();
                panic!("rootlesskit exited early ({status}): {}", describe(&output));
            }
            None => panic!("{} never accepted connections", socket.display()),
        }
    }

    /// The child's pid from the `child_pid` file.
    pub fn child_pid(&self) -> i32 {
        let text = std::fs::read_to_string(self.state_dir.join("child_pid")).expect("child_pid");
        text.parse().expect("child_pid is a number without newline")
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Sends `sig` to the rootlesskit parent.
    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig).expect("signal rootlesskit");
    }

    /// Waits for rootlesskit to exit on its own and returns its output.
    pub fn finish(&mut self) -> Output {
        let child = self.child.take().expect("rootlesskit already finished");
        child.wait_with_output().expect("wait for rootlesskit")
    }
}

impl Drop for Kit {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = Pid::from_raw(child.id() as i32);
        if child.try_wait().ok().flatten().is_none() {
            let _ = kill(pid, Signal::SIGTERM);
            if retry(|| child.try_wait().ok().flatten()).is_none() {
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
        let _ = child.wait();
    }
}

/// Runs rootlesskit to completion with `args` (no `--state-dir` added).
pub fn run_kit<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(bin("rootlesskit"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run rootlesskit")
}

/// Runs rootlessctl against `socket`.
pub fn rootlessctl(socket: &Path, args: &[&str]) -> Output {
    Command::new(bin("rootlessctl"))
        .arg(format!("--socket={}", socket.display()))
        .args(args)
        .output()
        .expect("run rootlessctl")
}

/// Exit code, stdout and stderr of `output`, for assertion messages.
pub fn describe(output: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `GET path` on 127.0.0.1:`port` with HTTP/1.0; the body of a 200 response.
///
/// # Errors
/// Connection failures, and `InvalidData` for a non-200 or malformed response.
pub fn http_get(port: u16, path: &str) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    body_of_200(response)
}

/// `METHOD path` on the API socket, with an optional JSON body; (status, body).
///
/// # Errors
/// Connection failures and malformed responses.
pub fn api_request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> io::Result<(u16, String)> {
    let mut stream = UnixStream::connect(socket)?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: rootlesskit\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    stream.shutdown(Shutdown::Write)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let (status, body) = split_response(&response)?;
    Ok((status, String::from_utf8_lossy(body).into_owned()))
}

fn split_response(response: &[u8]) -> io::Result<(u16, &[u8])> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed HTTP response");
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = String::from_utf8_lossy(&response[..end]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, &response[end + 4..]))
}

fn body_of_200(response: Vec<u8>) -> io::Result<Vec<u8>> {
    let (status, body) = split_response(&response)?;
    if status != 200 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("HTTP status {status}"),
        ));
    }
    Ok(body.to_vec())
}

impl Kit {
    /// Starts `command`, a rootlesskit invocation whose stdio and limits the caller has set
    /// up (possibly behind a wrapper that execs it), as a guarded [`Kit`] on `state_dir`.
    pub fn spawn_command(state_dir: &Path, mut command: Command) -> Kit {
        let child = command.spawn().expect("start rootlesskit");
        Kit {
            child: Some(child),
            state_dir: state_dir.to_owned(),
        }
    }

    /// Waits for rootlesskit to exit on its own, at most ~20 s, and returns its output.
    ///
    /// # Panics
    /// When it is still running then (it is killed when the `Kit` drops).
    pub fn finish_bounded(&mut self) -> Output {
        let status = retry(|| self.try_wait());
        assert!(status.is_some(), "rootlesskit did not exit");
        self.finish()
    }
}

/// Runs `command` with its output captured, at most `limit`; kills it (by pid) past that.
///
/// # Panics
/// When it could not start or was still running after `limit`.
pub fn output_within(mut command: Command, limit: Duration) -> Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start process");
    let pid = Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(limit) {
        Ok(output) => output.expect("collect output"),
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            let output = rx.recv().ok().and_then(Result::ok);
            let text = output.as_ref().map(describe).unwrap_or_default();
            panic!("process {pid} still running after {limit:?}, killed: {text}");
        }
    }
}

/// What the open descriptors of process `pid` refer to, in every descriptor table it has.
///
/// The builtin driver's workers keep their connections in tables of their own (threads named
/// `rkport-worker-N`), which `/proc/PID/fd` does not list; their `/proc/PID/task/TID/fd` are
/// read too. Sockets that no table of the kernel lists in the network namespaces of `pid` and
/// its children (TCP sockets neither bound nor connected: the builtin driver's spares, made
/// inside the namespace ahead of clients, whose number follows its refills rather than the
/// connections) are left out. A process that has gone yields an empty list.
pub fn fd_targets(pid: i32) -> Vec<String> {
    let listed = listed_sockets(pid);
    let mut dirs = vec![PathBuf::from(format!("/proc/{pid}/fd"))];
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with("rkport-worker") {
            dirs.push(task.path().join("fd"));
        }
    }
    let mut targets = Vec::new();
    for dir in dirs {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let target = std::fs::read_link(entry.path()).unwrap_or_default();
            let target = target.to_string_lossy().into_owned();
            let inode = target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok());
            if inode.is_none_or(|inode| listed.contains(&inode)) {
                targets.push(target);
            }
        }
    }
    targets
}

/// Inodes of the sockets listed in `/proc/P/net/{tcp,tcp6,udp,udp6,unix}` for `pid` and its
/// children: every socket that is bound, listening or connected, and every unix socket, in
/// their network namespaces.
fn listed_sockets(pid: i32) -> std::collections::HashSet<u64> {
    let mut pids = vec![pid.to_string()];
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    for task in tasks.flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        pids.extend(children.split_whitespace().map(str::to_owned));
    }
    let mut inodes = std::collections::HashSet::new();
    for p in &pids {
        for (table, column) in [
            ("tcp", 9),
            ("tcp6", 9),
            ("udp", 9),
            ("udp6", 9),
            ("unix", 6),
        ] {
            let text =
                std::fs::read_to_string(format!("/proc/{p}/net/{table}")).unwrap_or_default();
            let rows = text.lines().skip(1);
            inodes
                .extend(rows.filter_map(|l| l.split_whitespace().nth(column)?.parse::<u64>().ok()));
        }
    }
    inodes
}
