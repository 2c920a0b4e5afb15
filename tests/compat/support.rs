//! Running both implementations side by side: ours from the build directory, upstream
//! RootlessKit 1.1.0 from `/usr/bin`.
//!
//! Upstream refuses to run as root, so when the tests run as root its `rootlesskit` runs as
//! the unprivileged user [`TEST_USER`] (through `runuser`, with a runtime directory that user
//! owns); as an ordinary user everything runs as that user. Both `rootlessctl`s and the raw
//! HTTP client always run as the test's own user: root can use any socket, and an ordinary
//! user owns both servers.
//!
//! A server's command is `cat`, reading a pipe the test holds: dropping the [`Server`] closes
//! the pipe, the command ends and rootlesskit tears everything down by itself. Signals (to the
//! pid the test started) are only the fallback.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{Pid, Uid, User};
use rkport_e2e::{bin, retry};

/// Where Debian's `rootlesskit` package installs upstream.
pub const UPSTREAM_KIT: &str = "/usr/bin/rootlesskit";
pub const UPSTREAM_CTL: &str = "/usr/bin/rootlessctl";
/// The upstream release these tests compare against.
pub const UPSTREAM_VERSION: &str = "1.1.0";
/// The unprivileged user upstream runs as when the tests run as root.
pub const TEST_USER: &str = "rkport-test";
/// `PATH` for processes started through `runuser` with a clean environment.
const USER_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";

/// Which implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Impl {
    Ours,
    Upstream,
}

impl Impl {
    pub const BOTH: [Impl; 2] = [Impl::Ours, Impl::Upstream];

    pub fn name(self) -> &'static str {
        match self {
            Impl::Ours => "ours",
            Impl::Upstream => "upstream",
        }
    }
}

/// Panics, failing the test, unless upstream RootlessKit 1.1.0 is installed.
pub fn require_upstream() {
    for path in [UPSTREAM_KIT, UPSTREAM_CTL] {
        assert!(
            Path::new(path).exists(),
            "{path} is missing: these tests compare against upstream RootlessKit \
             {UPSTREAM_VERSION}; install the Debian package `rootlesskit` (cargo xtask ci does)"
        );
    }
    let out = Command::new(UPSTREAM_KIT)
        .arg("--version")
        .output()
        .expect("run rootlesskit --version");
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        version.contains(&format!("version {UPSTREAM_VERSION}")),
        "{UPSTREAM_KIT} is not RootlessKit {UPSTREAM_VERSION}: {version}"
    );
}

fn running_as_root() -> bool {
    Uid::effective().is_root()
}

/// A directory the user running upstream owns (mode 0700), removed when dropped.
#[derive(Debug)]
pub struct RuntimeDir(tempfile::TempDir);

impl RuntimeDir {
    pub fn new() -> RuntimeDir {
        let dir = tempfile::Builder::new()
            .prefix("rkport-compat")
            .tempdir()
            .expect("runtime dir");
        if running_as_root() {
            let user = User::from_name(TEST_USER)
                .expect("look up the test user")
                .unwrap_or_else(|| {
                    panic!(
                        "user {TEST_USER} is missing: upstream rootlesskit refuses root, so as \
                         root these tests run it as {TEST_USER} (cargo xtask ci creates it)"
                    )
                });
            nix::unistd::chown(dir.path(), Some(user.uid), Some(user.gid)).expect("chown");
        }
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
        RuntimeDir(dir)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// A command running upstream's `program` as the user upstream needs.
pub fn upstream_command(program: &str, runtime: &Path) -> Command {
    if !running_as_root() {
        return Command::new(program);
    }
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", TEST_USER, "--", "env", "-i"])
        .arg(format!("PATH={USER_PATH}"))
        .arg(format!("HOME={}", runtime.display()))
        .arg(format!("XDG_RUNTIME_DIR={}", runtime.display()))
        .arg(program)
        .current_dir(runtime);
    cmd
}

/// Runs `rootlesskit ARGS` of `which` to completion, stdin closed.
pub fn run_kit(which: Impl, runtime: &Path, args: &[String]) -> Output {
    let mut cmd = match which {
        Impl::Ours => Command::new(bin("rootlesskit")),
        Impl::Upstream => upstream_command(UPSTREAM_KIT, runtime),
    };
    cmd.args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run rootlesskit")
}

/// Exit code (-1 for a signal), stdout and stderr of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Outcome {
    fn from(out: Output) -> Outcome {
        Outcome {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// Runs `rootlessctl` of `which` with `--socket=SOCKET ARGS`.
pub fn ctl(which: Impl, socket: &Path, args: &[String]) -> Outcome {
    let program = match which {
        Impl::Ours => bin("rootlessctl"),
        Impl::Upstream => PathBuf::from(UPSTREAM_CTL),
    };
    Command::new(program)
        .arg(format!("--socket={}", socket.display()))
        .args(args)
        .env_remove("ROOTLESSKIT_STATE_DIR")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run rootlessctl")
        .into()
}

/// A running `rootlesskit ... cat` of either implementation, torn down when dropped.
#[derive(Debug)]
pub struct Server {
    which: Impl,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    stderr_path: PathBuf,
    state_dir: PathBuf,
    /// Holds the state dir; dropped (removed) after rootlesskit has exited.
    _runtime: RuntimeDir,
}

impl Server {
    /// Starts `rootlesskit --state-dir=RUNTIME/state ARGS cat` and waits until `api.sock`
    /// answers.
    ///
    /// # Panics
    /// When rootlesskit exits first or the socket never answers, with its stderr.
    pub fn start(which: Impl, args: &[&str]) -> Server {
        Server::start_with_env(which, args, &[])
    }

    /// [`Server::start`] with extra environment variables (ours only).
    pub fn start_with_env(which: Impl, args: &[&str], env: &[(&str, &str)]) -> Server {
        let runtime = RuntimeDir::new();
        let state_dir = runtime.path().join("state");
        // Upstream's stderr file is created here, by the test, so root can read it later.
        let stderr_path = runtime.path().join("stderr.log");
        let stderr = File::create(&stderr_path).expect("stderr file");
        let mut cmd = match which {
            Impl::Ours => Command::new(bin("rootlesskit")),
            Impl::Upstream => upstream_command(UPSTREAM_KIT, runtime.path()),
        };
        cmd.arg(format!("--state-dir={}", state_dir.display()))
            .args(args)
            .arg("cat")
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(stderr);
        let mut child = cmd.spawn().expect("start rootlesskit");
        let stdin = child.stdin.take();
        let mut server = Server {
            which,
            child: Some(child),
            stdin,
            stderr_path,
            state_dir,
            _runtime: runtime,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let socket = self.api_socket();
        let ready = retry(|| {
            if let Some(status) = self.child.as_mut()?.try_wait().ok().flatten() {
                return Some(Err(status));
            }
            UnixStream::connect(&socket).ok().map(|_| Ok(()))
        });
        match ready {
            Some(Ok(())) => {}
            Some(Err(status)) => panic!(
                "{} rootlesskit exited early ({status}):\n{}",
                self.which.name(),
                self.stderr()
            ),
            None => panic!("{} never accepted connections", socket.display()),
        }
    }

    pub fn api_socket(&self) -> PathBuf {
        self.state_dir.join("api.sock")
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn child_pid(&self) -> String {
        fs::read_to_string(self.state_dir.join("child_pid")).expect("child_pid")
    }

    /// What rootlesskit wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Ends the command (closes its stdin), waits for rootlesskit to exit and returns its
    /// exit code and stderr.
    pub fn stop(mut self) -> (i32, String) {
        let code = self.finish();
        (code, self.stderr())
    }

    fn finish(&mut self) -> i32 {
        drop(self.stdin.take());
        let Some(mut child) = self.child.take() else {
            return -1;
        };
        let pid = Pid::from_raw(child.id() as i32);
        let mut status = retry(|| child.try_wait().ok().flatten());
        if status.is_none() {
            let _ = kill(pid, Signal::SIGTERM);
            status = retry(|| child.try_wait().ok().flatten());
        }
        if status.is_none() {
            let _ = kill(pid, Signal::SIGKILL);
        }
        let status = child.wait().expect("wait for rootlesskit");
        status.code().unwrap_or(-1)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.finish();
        }
    }
}

/// A raw HTTP response read from `api.sock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    pub status: u16,
    /// Header names lowercased, in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `METHOD PATH` (HTTP/1.1, `Connection: close`) with `body` to `socket`.
pub fn raw_request(socket: &Path, method: &str, path: &str, body: &str) -> io::Result<RawResponse> {
    let mut stream = UnixStream::connect(socket)?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: rootlesskit\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    parse_response(&response)
}

fn parse_response(response: &[u8]) -> io::Result<RawResponse> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&response[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = String::from_utf8_lossy(&response[end + 4..]).into_owned();
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

/// `n` distinct loopback TCP ports that were free a moment ago, also free for UDP.
pub fn free_ports(n: usize) -> Vec<u16> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    while ports.len() < n {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = tcp.local_addr().expect("addr").port();
        if let Ok(udp) = std::net::UdpSocket::bind(("127.0.0.1", port)) {
            ports.push(port);
            held.push((tcp, udp));
        }
    }
    ports
}

/// `args` as owned strings.
pub fn strings<S: AsRef<OsStr>>(args: &[S]) -> Vec<String> {
    args.iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect()
}
