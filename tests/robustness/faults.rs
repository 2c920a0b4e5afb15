//! Faults: the server inside refuses, vanishes or dies mid-stream; slirp4netns dies;
//! rootlesskit gets SIGTERM or SIGKILL under load; a second rootlesskit wants the same state
//! dir.
//!
//! Covered elsewhere and not repeated: SIGTERM and SIGKILL of an idle rootlesskit, and a state
//! dir too long for `api.sock` (tests/launcher.rs: `sigterm_stops_everything_and_removes_the_
//! state_dir`, `sigkill_takes_helpers_along_and_restart_recovers`,
//! `long_state_dir_fails_before_the_command`).

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rkport_e2e::{api_request, children, describe, pid_alive, retry, rootlessctl, run_kit, Kit};

use super::lab::{connect, drain, exchange, payload, short_echo, Lab, HANG_GUARD};
use super::ns::{pattern, STREAM_LEN};

fn sigkill(pid: i32) {
    kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
}

fn wait_gone(what: &str, pid: i32) {
    assert!(
        retry(|| (!pid_alive(pid)).then_some(())).is_some(),
        "{what} {pid} is still alive"
    );
}

/// A connection whose inner side is gone ends, with no byte, by end of file or reset.
fn ends_empty(s: &mut TcpStream, what: &str) {
    let (n, end) = drain(s);
    assert_eq!(n, 0, "{what}: bytes from nowhere");
    if let Err(e) = end {
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{what}: {e}");
    }
}

/// A connection to a port with nothing listening inside is closed at once.
fn refused(port: u16, what: &str) {
    let mut s = connect(port).expect("the host side accepts");
    let _ = s.write_all(b"anyone there?");
    ends_empty(&mut s, what);
}

fn echo_works(lab: &Lab, seed: u64) {
    let data = payload(seed, 1000);
    short_echo(lab.echo, &data).expect("echo");
}

#[test]
fn refused_and_vanished_servers_close_clients_and_the_port_recovers() {
    let lab = Lab::start(&[]);
    refused(lab.echo, "before any server");

    let server = lab.spawn_server();
    echo_works(&lab, 1);
    let mut held = connect(lab.echo).expect("connect");
    exchange(&mut held, b"before the crash").expect("exchange");

    sigkill(server);
    wait_gone("server", server);
    ends_empty(&mut held, "held while the server vanished");
    refused(lab.echo, "while no server runs");

    lab.spawn_server();
    echo_works(&lab, 2);
}

/// Reads the stream port's data, checking every byte, until `limit` bytes or its end.
fn read_stream(s: &mut TcpStream, from: u64, limit: u64) -> (u64, std::io::Result<()>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = from;
    while at < limit {
        let want = buf.len().min((limit - at) as usize);
        match s.read(&mut buf[..want]) {
            Ok(0) => return (at, Ok(())),
            Ok(n) => {
                let bad = (0..n).find(|&i| buf[i] != pattern(at + i as u64));
                assert!(bad.is_none(), "stream byte {} corrupted", at);
                at += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                let hung = matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
                assert!(!hung, "stream read hung for {HANG_GUARD:?}");
                return (at, Err(e));
            }
        }
    }
    (at, Ok(()))
}

#[test]
fn server_killed_while_sending_cuts_the_client_short() {
    let lab = Lab::start(&[]);
    let server = lab.spawn_server();
    let mut s = connect(lab.stream).expect("connect");
    let (got, end) = read_stream(&mut s, 0, 4 << 20);
    end.expect("the first 4 MiB");
    assert_eq!(got, 4 << 20);

    // The server is now blocked writing into full buffers.
    sigkill(server);
    let (total, end) = read_stream(&mut s, got, STREAM_LEN);
    assert!(
        total < STREAM_LEN,
        "the whole stream arrived from a killed server"
    );
    eprintln!("faults: stream cut after {total} of {STREAM_LEN} bytes ({end:?})");
    if let Err(e) = end {
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
    }
}

fn slirp4netns_of(kit_pid: i32) -> i32 {
    let comm = |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    children(kit_pid)
        .into_iter()
        .find(|&pid| comm(pid).trim() == "slirp4netns")
        .expect("slirp4netns is a child of rootlesskit")
}

#[test]
fn slirp4netns_death_stops_rootlesskit_with_a_clear_error() {
    let mut lab = Lab::start(&["--net=slirp4netns", "--disable-host-loopback"]);
    let server = lab.spawn_server();
    let mut held = connect(lab.echo).expect("connect");
    exchange(&mut held, b"hello").expect("exchange");
    let child = lab.kit.child_pid();
    let command = children(child)[0];

    sigkill(slirp4netns_of(lab.kit.pid()));
    wait_gone("rootlesskit", lab.kit.pid());
    let output = lab.kit.finish();
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "[rootlesskit:parent] error: slirp4netns exited unexpectedly (signal: 9 (SIGKILL)): \
             the namespace has lost its network, so the command was stopped"
        ),
        "{stderr}"
    );
    for (what, pid) in [("child", child), ("command", command), ("server", server)] {
        wait_gone(what, pid);
    }
    assert!(!lab.state.exists(), "state dir left behind");
    ends_empty(&mut held, "held when rootlesskit stopped");
}

/// A command slow to stop: once its SIGTERM trap is set it creates file `$2`; on SIGTERM it
/// waits until file `$1` exists (at most about 30 s, longer than rootlesskit's 10 s grace) and
/// exits 0.
const SLOW_TO_STOP: &str = r#"trap 'i=0; while [ ! -e "$1" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; exit 0' TERM; : > "$2"; while :; do sleep 0.2; done"#;

/// Creates the file that lets [`SLOW_TO_STOP`] exit, also when a test fails.
struct Release<'a>(&'a std::path::Path);

impl Release<'_> {
    fn now(&self) {
        std::fs::write(self.0, "").expect("create the release file");
    }
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0, "");
    }
}

/// `networkDriver.error` of `GET /v1/info`, when the API answers with one.
fn network_error(socket: &std::path::Path) -> Option<String> {
    let (status, body) = api_request(socket, "GET", "/v1/info", None).ok()?;
    assert_eq!(status, 200, "{body}");
    let info: serde_json::Value = serde_json::from_str(&body).expect("info is JSON");
    let net = &info["networkDriver"];
    assert_eq!(net["driver"], "slirp4netns", "{body}");
    assert_eq!(net["childIP"], "10.0.2.100", "{body}");
    net["error"].as_str().map(str::to_owned)
}

#[test]
fn slirp4netns_death_is_reported_by_info_while_the_command_stops() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let state = tmp.path().join("s");
    let (release, trapped) = (tmp.path().join("release"), tmp.path().join("trapped"));
    let mut kit = Kit::spawn(
        &state,
        [
            "--net=slirp4netns".as_ref(),
            "--port-driver=builtin".as_ref(),
            "sh".as_ref(),
            "-c".as_ref(),
            SLOW_TO_STOP.as_ref(),
            "sh".as_ref(),
            release.as_os_str(),
            trapped.as_os_str(),
        ],
    );
    // Dropped before `kit`, so that a failing test does not keep the command waiting.
    let release = Release(&release);
    kit.wait_ready();
    let socket = kit.api_socket();
    assert!(
        retry(|| trapped.exists().then_some(())).is_some(),
        "the command never set its trap"
    );
    assert_eq!(network_error(&socket), None);

    sigkill(slirp4netns_of(kit.pid()));
    let Some(error) = retry(|| network_error(&socket)) else {
        release.now();
        let output = kit.finish_bounded();
        panic!("info never reported the error: {}", describe(&output));
    };
    // The command waits for the release file, so the API is still up.
    let text = rootlessctl(&socket, &["info"]);
    release.now();
    assert_eq!(
        error,
        "slirp4netns exited unexpectedly (signal: 9 (SIGKILL)): the namespace has lost its \
         network, rootlesskit is stopping"
    );
    assert!(text.status.success(), "{}", describe(&text));
    let want = format!("  - IP: 10.0.2.100\n  - Error: {error}\n- Port Driver: builtin\n");
    assert!(
        String::from_utf8_lossy(&text.stdout).contains(&want),
        "{}",
        describe(&text)
    );

    let output = kit.finish_bounded();
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for line in [
        "slirp4netns exited unexpectedly (signal: 9 (SIGKILL)); stopping the command",
        "[rootlesskit:parent] error: slirp4netns exited unexpectedly (signal: 9 (SIGKILL)): \
         the namespace has lost its network, so the command was stopped",
    ] {
        assert!(stderr.contains(line), "{line:?} not in {stderr}");
    }
    assert!(!state.exists(), "state dir left behind");
}

/// Opens `n` echo connections and exchanges once on each.
fn hold(lab: &Lab, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = connect(lab.echo).expect("connect");
            exchange(&mut s, &payload(i as u64, 100)).expect("exchange");
            s
        })
        .collect()
}

#[test]
fn sigterm_under_load_exits_cleanly() {
    let mut lab = Lab::start(&[]);
    let server = lab.spawn_server();
    let mut held = hold(&lab, 200);
    let mut stream = connect(lab.stream).expect("connect");
    read_stream(&mut stream, 0, 1 << 20)
        .1
        .expect("stream start");
    let child = lab.kit.child_pid();
    let command = children(child)[0];

    lab.kit.signal(Signal::SIGTERM);
    wait_gone("rootlesskit", lab.kit.pid());
    let output = lab.kit.finish();
    assert_eq!(
        output.status.code(),
        Some(128 + 15),
        "{}",
        describe(&output)
    );
    assert!(!lab.state.exists(), "state dir left behind");
    for (what, pid) in [("child", child), ("command", command), ("server", server)] {
        wait_gone(what, pid);
    }
    for (i, s) in held.iter_mut().enumerate() {
        ends_empty(s, &format!("held connection {i}"));
    }
    let (total, _) = read_stream(&mut stream, 1 << 20, STREAM_LEN);
    assert!(total < STREAM_LEN);
}

#[test]
fn sigkill_under_load_takes_the_namespace_along_and_restart_works() {
    let mut lab = Lab::start(&[]);
    let server = lab.spawn_server();
    let mut held = hold(&lab, 50);
    let child = lab.kit.child_pid();
    let command = children(child)[0];

    lab.kit.signal(Signal::SIGKILL);
    let output = lab.kit.finish();
    assert_eq!(output.status.code(), None, "{}", describe(&output));
    for (what, pid) in [("child", child), ("command", command), ("server", server)] {
        wait_gone(what, pid);
    }
    for (i, s) in held.iter_mut().enumerate() {
        ends_empty(s, &format!("held connection {i}"));
    }

    // The same state dir and the same host port work again at once.
    let output = run_kit([
        &format!("--state-dir={}", lab.state.display()),
        "--net=none",
        "--port-driver=builtin",
        "-p",
        &format!("127.0.0.1:{}:7100/tcp", lab.echo),
        "sh",
        "-c",
        "ls -A $ROOTLESSKIT_STATE_DIR",
    ]);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "api.sock\nchild_pid\nlock\n"
    );
}

#[test]
fn second_rootlesskit_is_refused_and_the_first_keeps_serving() {
    let mut lab = Lab::start(&[]);
    lab.spawn_server();
    let mut held = connect(lab.echo).expect("connect");
    exchange(&mut held, b"first").expect("exchange");

    let output = run_kit([
        &format!("--state-dir={}", lab.state.display()),
        "--net=none",
        "--port-driver=builtin",
        "-p",
        &format!("127.0.0.1:{}:7100/tcp", rkport_e2e::free_port()),
        "true",
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let want = format!(
        "[rootlesskit:parent] error: failed to lock {}/lock, another rootlesskit is running with \
         the same state directory?",
        lab.state.display()
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains(&want),
        "{}",
        describe(&output)
    );

    // The first is untouched: its connection, its port, its API, its state dir.
    exchange(&mut held, b"still here").expect("held connection");
    echo_works(&lab, 3);
    let (status, _) = api_request(&lab.kit.api_socket(), "GET", "/v1/info", None).expect("info");
    assert_eq!(status, 200);
    let names = ["api.sock", "child_pid", "lock"];
    assert!(names.iter().all(|n| lab.state.join(n).exists()));

    lab.kit.signal(Signal::SIGTERM);
    let output = lab.kit.finish();
    assert_eq!(
        output.status.code(),
        Some(128 + 15),
        "{}",
        describe(&output)
    );
    assert!(!lab.state.exists());
}

/// A rootlesskit started through `prlimit` with a small descriptor limit, ended when dropped.
struct Starved {
    child: std::process::Child,
}

impl Drop for Starved {
    fn drop(&mut self) {
        let pid = Pid::from_raw(self.child.id() as i32);
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(pid, Signal::SIGTERM);
            if retry(|| self.child.try_wait().ok().flatten()).is_none() {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
    }
}

/// `GET /v1/info` with the hang guard; the status, if an answer came.
fn info_status(socket: &std::path::Path) -> Option<u16> {
    let mut s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(HANG_GUARD)).ok()?;
    let _ = s.write_all(b"GET /v1/info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut answer = Vec::new();
    if let Err(e) = s.read_to_end(&mut answer) {
        let hung = matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
        assert!(
            !hung,
            "the API neither answered nor closed within {HANG_GUARD:?}"
        );
    }
    String::from_utf8_lossy(&answer).get(9..12)?.parse().ok()
}

/// Forwarded connections live in the builtin workers' descriptor tables, not in the one the
/// API uses: while they exhaust those tables (each under the same limit of 200), every API call
/// is still answered, and the port works again once the connections are gone.
#[test]
fn descriptor_exhaustion_in_rootlesskit_passes() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let state = tmp.path().join("s");
    let [echo, control] = rkport_e2e::free_ports();
    let exe = std::env::current_exe().expect("test executable");
    let child = std::process::Command::new("prlimit")
        .arg("--nofile=200:200")
        .arg(rkport_e2e::bin("rootlesskit"))
        .arg(format!("--state-dir={}", state.display()))
        .args(["--net=none", "--port-driver=builtin"])
        .args(["-p", &format!("127.0.0.1:{echo}:7100/tcp")])
        .args(["-p", &format!("127.0.0.1:{control}:7199/tcp")])
        .arg("/usr/bin/env")
        .arg(format!("{}=supervisor", super::ns::ROLE))
        .arg(exe)
        .args(["--exact", "robustness::ns::ns_entry", "--include-ignored"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start prlimit rootlesskit");
    let _kit = Starved { child };
    let socket = state.join("api.sock");
    retry(|| (info_status(&socket) == Some(200)).then_some(())).expect("API up");
    super::lab::spawn_server_on(control);

    // Hold up to 300 connections (about 600 descriptors over the workers' tables of 200 each)
    // while calling the API.
    let mut held = std::collections::VecDeque::new();
    let mut answers = Vec::new();
    for i in 0..800 {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", echo)) {
            held.push_back(s);
        }
        if held.len() > 300 {
            held.pop_front();
        }
        if i % 40 == 0 {
            answers.push(info_status(&socket));
        }
    }
    drop(held);
    eprintln!("faults: API answers while the workers' descriptors ran out: {answers:?}");
    assert!(
        answers.iter().all(|a| *a == Some(200)),
        "the API failed while forwarded connections used up descriptors: {answers:?}"
    );

    let back = retry(|| (info_status(&socket) == Some(200)).then_some(()));
    assert!(back.is_some(), "the API did not come back");
    let data = payload(99, 1000);
    let echoed = retry(|| short_echo(echo, &data).ok());
    assert!(echoed.is_some(), "the port did not come back");
}
