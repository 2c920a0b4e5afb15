//! End-to-end tests of `rootlesskit`: real namespaces, real slirp4netns, real servers.
//!
//! They run as whatever user runs them: as root, and (in CI) as an ordinary user with
//! `/etc/subuid` and `/etc/subgid` ranges and a readable `/dev/net/tun`. Servers inside the
//! namespace are `python3 -m http.server` and `sh`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::sys::signal::Signal;
use rkport_e2e::{
    api_request, children, describe, free_port, http_get, pid_alive, retry, rootlessctl, run_kit,
    Kit,
};

const PYTHON: &str = "/usr/bin/python3";

/// Arguments running an HTTP server for `dir` on 127.0.0.1:8000 inside the namespace.
fn http_server(dir: &Path, bind: &str) -> Vec<String> {
    let dir = dir.display().to_string();
    [
        PYTHON,
        "-m",
        "http.server",
        "8000",
        "--bind",
        bind,
        "--directory",
        &dir,
    ]
    .map(String::from)
    .to_vec()
}

/// A temp dir that the namespace's root (the test user) can read.
fn www() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    fs::write(dir.path().join("index.html"), "hello from the namespace\n").expect("index");
    dir
}

/// Deterministic pseudo-random bytes (xorshift), so a corrupted copy cannot match by chance.
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// FNV-1a, to report a checksum instead of dumping 64 MiB on mismatch.
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn get_when_up(port: u16, path: &str) -> Vec<u8> {
    retry(|| http_get(port, path).ok())
        .unwrap_or_else(|| panic!("GET {path} on {port} never worked"))
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn builtin_publishes_before_the_command_and_serves_64_mib() {
    let www = www();
    let big = pseudo_random(64 << 20);
    fs::write(www.path().join("big.bin"), &big).expect("write big file");
    let state = tempfile::tempdir().expect("temp dir");
    let port = free_port();

    let mut args = vec![
        "--net=none".to_owned(),
        "--port-driver=builtin".to_owned(),
        "-p".to_owned(),
        format!("127.0.0.1:{port}:8000/tcp"),
    ];
    args.extend(http_server(www.path(), "127.0.0.1"));
    let mut kit = Kit::spawn(&state.path().join("s"), &args);
    kit.wait_ready();

    let index = get_when_up(port, "/index.html");
    assert_eq!(index, b"hello from the namespace\n");
    let body = http_get(port, "/big.bin").expect("GET big.bin");
    assert_eq!(body.len(), big.len());
    assert_eq!(checksum(&body), checksum(&big));
}

#[test]
fn rootlessctl_adds_lists_and_removes_ports() {
    let www = www();
    let state = tempfile::tempdir().expect("temp dir");
    let mut args = vec!["--net=none".to_owned(), "--port-driver=builtin".to_owned()];
    args.extend(http_server(www.path(), "127.0.0.1"));
    let mut kit = Kit::spawn(&state.path().join("s"), &args);
    kit.wait_ready();
    let socket = kit.api_socket();
    let port = free_port();

    let spec = format!("127.0.0.1:{port}:8000/tcp");
    let added = rootlessctl(&socket, &["add-ports", &spec]);
    assert!(added.status.success(), "{}", describe(&added));
    let id = String::from_utf8_lossy(&added.stdout).trim().to_owned();
    assert_eq!(id, "1");

    let listed = rootlessctl(&socket, &["list-ports", "--json"]);
    let line = String::from_utf8_lossy(&listed.stdout);
    let want = format!(
        "{{\"id\":1,\"spec\":{{\"proto\":\"tcp\",\"parentIP\":\"127.0.0.1\",\"parentPort\":{port},\"childPort\":8000}}}}\n"
    );
    assert_eq!(line, want, "{}", describe(&listed));
    assert_eq!(
        get_when_up(port, "/index.html"),
        b"hello from the namespace\n"
    );

    let removed = rootlessctl(&socket, &["remove-ports", "1"]);
    assert!(removed.status.success(), "{}", describe(&removed));
    let refused = std::net::TcpStream::connect(("127.0.0.1", port));
    assert!(
        refused.is_err(),
        "port {port} still accepts after remove-ports"
    );
    let (status, body) = api_request(&socket, "GET", "/v1/ports", None).expect("GET /v1/ports");
    assert_eq!((status, body.as_str()), (200, "null"));
}

#[test]
fn sigterm_stops_everything_and_removes_the_state_dir() {
    let state = tempfile::tempdir().expect("temp dir");
    let dir = state.path().join("s");
    let mut kit = Kit::spawn(
        &dir,
        ["--net=none", "--port-driver=builtin", "sleep", "1000"],
    );
    kit.wait_ready();
    let child = kit.child_pid();
    let command = retry(|| children(child).first().copied()).expect("command pid");

    kit.signal(Signal::SIGTERM);
    let output = kit.finish();
    assert_eq!(
        output.status.code(),
        Some(128 + 15),
        "{}",
        describe(&output)
    );
    assert!(!dir.exists(), "state dir left behind");
    assert!(!pid_alive(child), "child {child} still alive");
    assert!(!pid_alive(command), "command {command} still alive");
}

#[test]
fn exit_status_is_the_commands() {
    let output = run_kit(["sh", "-c", "exit 3"]);
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
    let output = run_kit(["--net=none", "sh", "-c", "kill -USR1 $$"]);
    assert_eq!(
        output.status.code(),
        Some(128 + 10),
        "{}",
        describe(&output)
    );
    let output = run_kit(["true"]);
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
}

#[test]
fn state_dir_is_private_and_environment_is_set() {
    let state = tempfile::tempdir().expect("temp dir");
    let dir = state.path().join("s");
    let report = state.path().join("report");
    fs::set_permissions(state.path(), fs::Permissions::from_mode(0o777)).expect("chmod");
    let script = format!(
        "stat -c %a $ROOTLESSKIT_STATE_DIR $ROOTLESSKIT_STATE_DIR/api.sock > {r}; \
         env | grep -e ^ROOTLESSKIT -e ^_RKPORT -e ^_ROOTLESSKIT | sort >> {r}",
        r = report.display()
    );
    let mut kit = Kit::spawn(&dir, ["--net=none", "sh", "-c", &script]);
    let output = kit.finish();
    assert!(output.status.success(), "{}", describe(&output));

    let text = fs::read_to_string(&report).expect("report");
    let lines: Vec<&str> = text.lines().collect();
    let euid = nix::unistd::geteuid();
    let egid = nix::unistd::getegid();
    let want = [
        "700".to_owned(),
        "600".to_owned(),
        format!("ROOTLESSKIT_PARENT_EGID={egid}"),
        format!("ROOTLESSKIT_PARENT_EUID={euid}"),
        format!("ROOTLESSKIT_STATE_DIR={}", dir.display()),
    ];
    assert_eq!(lines, want);
    assert!(!dir.exists());
}

#[test]
fn child_pid_file_names_the_child() {
    let state = tempfile::tempdir().expect("temp dir");
    let mut kit = Kit::spawn(&state.path().join("s"), ["--net=none", "sleep", "1000"]);
    kit.wait_ready();
    let raw = fs::read(kit.state_dir().join("child_pid")).expect("child_pid");
    assert!(!raw.ends_with(b"\n"));
    let child = kit.child_pid();
    let parent_of_child = fs::read_to_string(format!("/proc/{child}/stat")).expect("stat");
    let ppid = parent_of_child
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(1)
        .unwrap();
    assert_eq!(ppid, kit.pid().to_string());
}

#[test]
fn bad_publish_spec_fails_before_the_command_runs() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let marker = tmp.path().join("marker");
    let dir = tmp.path().join("s");
    let touch = format!("touch {}", marker.display());
    let output = run_kit([
        format!("--state-dir={}", dir.display()).as_str(),
        "--net=none",
        "--port-driver=builtin",
        "-p",
        "127.0.0.1:8080:80/bogus",
        "sh",
        "-c",
        &touch,
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let err = stderr(&output);
    assert!(err.starts_with("[rootlesskit:parent] error: "), "{err}");
    assert!(err.contains("bogus"), "{err}");
    assert!(!marker.exists(), "the command ran");
    assert!(!dir.exists(), "state dir left behind");
}

#[test]
fn publish_failure_aborts_and_leaves_nothing() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let marker = tmp.path().join("marker");
    let dir = tmp.path().join("s");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().unwrap().port();
    let touch = format!("touch {}", marker.display());
    let output = run_kit([
        format!("--state-dir={}", dir.display()).as_str(),
        "--net=none",
        "--port-driver=builtin",
        "-p",
        &format!("127.0.0.1:{port}:80/tcp"),
        "sh",
        "-c",
        &touch,
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    assert!(stderr(&output).contains(&format!("failed to expose port 127.0.0.1:{port}:80/tcp")));
    assert!(!marker.exists(), "the command ran");
    assert!(!dir.exists(), "state dir left behind");
}

#[test]
fn driver_combinations_are_checked_first() {
    let cases: [(&[&str], &str); 6] = [
        (
            &["--port-driver=builtin"],
            "port driver requires non-host network",
        ),
        (
            &["--net=none", "--port-driver=slirp4netns"],
            "network \"none\" requires",
        ),
        (
            &["-p", "127.0.0.1:8080:80/tcp"],
            "port driver \"none\" does not support publishing ports",
        ),
        (&["--net=vpnkit"], "vpnkit"),
        (&["--pidns"], "--pidns=true"),
        (
            &["--cidr=10.0.2.100/24", "--net=slirp4netns"],
            "cidr must be like 10.0.2.0/24, not like 10.0.2.100/24",
        ),
    ];
    for (flags, message) in cases {
        let mut args: Vec<&str> = flags.to_vec();
        args.push("true");
        let output = run_kit(&args);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{flags:?}: {}",
            describe(&output)
        );
        assert!(
            stderr(&output).contains(message),
            "{flags:?}: {}",
            describe(&output)
        );
    }
    let output = run_kit(["--net=none"]);
    assert!(
        stderr(&output).contains("no command specified"),
        "{}",
        describe(&output)
    );
}

#[test]
fn second_instance_on_the_same_state_dir_is_refused() {
    let state = tempfile::tempdir().expect("temp dir");
    let dir = state.path().join("s");
    let mut first = Kit::spawn(&dir, ["--net=none", "sleep", "1000"]);
    first.wait_ready();
    let output = run_kit([&format!("--state-dir={}", dir.display()), "true"]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let want = format!(
        "failed to lock {}/lock, another rootlesskit is running with the same state directory?",
        dir.display()
    );
    assert!(stderr(&output).contains(&want), "{}", describe(&output));
    assert!(
        first.api_socket().exists(),
        "the second instance damaged the first"
    );
}

#[test]
fn stale_state_is_cleaned_at_start() {
    let state = tempfile::tempdir().expect("temp dir");
    let dir = state.path().join("s");
    fs::create_dir_all(dir.join("junk-dir")).expect("mkdir");
    for name in ["api.sock", "child_pid", "lock", ".bp.sock"] {
        fs::write(dir.join(name), "stale").expect("stale file");
    }
    let script = "ls -A $ROOTLESSKIT_STATE_DIR";
    let output = run_kit([
        &format!("--state-dir={}", dir.display()),
        "sh",
        "-c",
        script,
    ]);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "api.sock\nchild_pid\nlock\n"
    );
}

/// Case C14: a state dir whose `api.sock` does not fit in `sun_path`.
#[test]
fn long_state_dir_fails_before_the_command() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let base = tmp.path().display().to_string();
    // "<base>/x...x" + "/api.sock" is exactly 107 bytes.
    let ok = format!(
        "{base}/{}",
        "x".repeat(107 - "/api.sock".len() - base.len() - 1)
    );
    let long = format!("{base}/{}", "y".repeat(120));
    let marker = tmp.path().join("marker");
    let script = format!("touch {}; exit 3", marker.display());

    let output = run_kit([
        &format!("--state-dir={ok}"),
        "--net=none",
        "--port-driver=builtin",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
    assert!(marker.exists());
    fs::remove_file(&marker).expect("rm marker");

    let output = run_kit([
        &format!("--state-dir={long}"),
        "--net=none",
        "--port-driver=builtin",
        "sh",
        "-c",
        &script,
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let err = stderr(&output);
    assert!(
        err.contains(&format!("{long}/api.sock")) && err.contains("107-byte limit"),
        "{err}"
    );
    assert!(!marker.exists(), "the command ran");
    assert!(!Path::new(&long).exists());
}

#[test]
fn slirp4netns_network_with_every_port_driver() {
    let www = www();
    for driver in ["builtin", "slirp4netns", "socat"] {
        let state = tempfile::tempdir().expect("temp dir");
        let report = state.path().join("addr");
        fs::set_permissions(state.path(), fs::Permissions::from_mode(0o777)).expect("chmod");
        let port = free_port();
        // The slirp4netns driver delivers to the tap address, the others to loopback.
        let bind = if driver == "slirp4netns" {
            "10.0.2.100"
        } else {
            "127.0.0.1"
        };
        let server = http_server(www.path(), bind).join(" ");
        let script = format!(
            "ip -4 -o addr show dev tap0 > {r}; ip route >> {r}; cat /etc/resolv.conf >> {r}; exec {server}",
            r = report.display()
        );
        let mut kit = Kit::spawn(
            &state.path().join("s"),
            [
                "--net=slirp4netns",
                "--disable-host-loopback",
                &format!("--port-driver={driver}"),
                "-p",
                &format!("127.0.0.1:{port}:8000/tcp"),
                "sh",
                "-c",
                &script,
            ],
        );
        kit.wait_ready();
        assert_eq!(
            get_when_up(port, "/index.html"),
            b"hello from the namespace\n",
            "{driver}"
        );
        let text = fs::read_to_string(&report).expect("address report");
        assert!(text.contains("inet 10.0.2.100/24"), "{text}");
        assert!(text.contains("default via 10.0.2.2 dev tap0"), "{text}");
        assert!(text.contains("nameserver 10.0.2.3"), "{text}");
        let (status, info) = api_request(&kit.api_socket(), "GET", "/v1/info", None).expect("info");
        assert_eq!(status, 200);
        assert!(info.contains("\"networkDriver\":{\"driver\":\"slirp4netns\",\"dns\":[\"10.0.2.3\"],\"childIP\":\"10.0.2.100\"}"), "{info}");
        assert!(
            info.contains(&format!("\"portDriver\":{{\"driver\":\"{driver}\"")),
            "{info}"
        );
    }
}

#[test]
fn copy_up_etc_makes_it_writable_inside_only() {
    let state = tempfile::tempdir().expect("temp dir");
    let name = format!("rkport-copyup-{}", std::process::id());
    let script =
        format!("echo x > /etc/{name} && cat /etc/{name} && head -c 100 /etc/passwd >/dev/null");
    let output = run_kit([
        &format!("--state-dir={}", state.path().join("s").display()),
        "--copy-up=/etc",
        "--net=none",
        "sh",
        "-c",
        &script,
    ]);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout), "x\n");
    assert!(
        !Path::new("/etc").join(&name).exists(),
        "copy-up wrote to the host's /etc"
    );
}

#[test]
fn go_style_flags_are_accepted() {
    let output = run_kit([
        "-net=none",
        "-port-driver=builtin",
        "--disable-host-loopback=false",
        "sh",
        "-c",
        "exit 7",
    ]);
    assert_eq!(output.status.code(), Some(7), "{}", describe(&output));
    let output = run_kit(["--version"]);
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("rootlesskit version "));
}

fn comm(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// rootlesskit killed with SIGKILL takes the child, the command and slirp4netns along
/// (parent-death signals), and the next start on the same state dir cleans up after it.
#[test]
fn sigkill_takes_helpers_along_and_restart_recovers() {
    let state = tempfile::tempdir().expect("temp dir");
    let dir = state.path().join("s");
    let args = [
        "--net=slirp4netns",
        "--disable-host-loopback",
        "--port-driver=builtin",
        "sleep",
        "1000",
    ];
    let mut kit = Kit::spawn(&dir, args);
    kit.wait_ready();
    let child = kit.child_pid();
    let command = retry(|| children(child).first().copied()).expect("command pid");
    let slirp = children(kit.pid())
        .into_iter()
        .find(|&pid| comm(pid) == "slirp4netns")
        .expect("slirp4netns pid");

    kit.signal(Signal::SIGKILL);
    let output = kit.finish();
    assert_eq!(output.status.code(), None, "{}", describe(&output));
    for (what, pid) in [
        ("child", child),
        ("command", command),
        ("slirp4netns", slirp),
    ] {
        let gone = retry(|| (!pid_alive(pid)).then_some(()));
        assert!(gone.is_some(), "{what} {pid} survived rootlesskit");
    }

    let output = run_kit([
        &format!("--state-dir={}", dir.display()),
        "--net=none",
        "--port-driver=builtin",
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

/// Case C16: UDP replies through the slirp4netns port driver reach a loopback client even
/// with `--disable-host-loopback`.
#[test]
fn slirp4netns_udp_replies_with_host_loopback_disabled() {
    let state = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let echo = "import socket\n\
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                s.bind(('0.0.0.0', 9017))\n\
                while True:\n    d, a = s.recvfrom(2048)\n    s.sendto(b'echo:' + d, a)\n";
    let mut kit = Kit::spawn(
        &state.path().join("s"),
        [
            "--net=slirp4netns",
            "--disable-host-loopback",
            "--port-driver=slirp4netns",
            "-p",
            &format!("127.0.0.1:{port}:9017/udp"),
            PYTHON,
            "-c",
            echo,
        ],
    );
    kit.wait_ready();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket
        .set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .expect("timeout");
    socket.connect(("127.0.0.1", port)).expect("connect");
    let reply = retry(|| {
        socket.send(b"hello").ok()?;
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf).ok()?;
        Some(buf[..n].to_vec())
    });
    assert_eq!(reply.as_deref(), Some(&b"echo:hello"[..]));
}
