//! The user scenarios of `cases/` (C02 … C20), one test each, end to end: the built
//! `rootlesskit` and `rootlessctl`, `--net=slirp4netns --disable-host-loopback`, the real port
//! drivers, Python servers inside the namespace and Rust clients on the host, bytes checked.
//!
//! The tests run as root and as an ordinary user with subordinate id ranges. C10 needs an
//! unprivileged host user: run as root, it re-runs itself as `rkport-test` through `runuser`.

#[path = "cases/support.rs"]
mod support;

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use rkport_e2e::{bin, children, describe, free_port, output_within, pid_alive, retry, Kit};
use serde_json::Value;

use support::*;

/// Bound on a launcher run that is expected to end by itself.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// Starts rootlesskit with slirp4netns networking (host loopback disabled), `driver`, the
/// given `-p` specs and `sh -c script`, and waits until its API socket answers.
fn launch(work: &Work, driver: &str, publish: &[String], script: &str) -> Kit {
    let mut kit = Kit::spawn(&work.state_dir(), kit_args(driver, true, publish, script));
    kit.wait_ready();
    kit
}

fn kit_args(driver: &str, no_host_loopback: bool, publish: &[String], script: &str) -> Vec<String> {
    let mut args = vec![
        "--net=slirp4netns".to_owned(),
        format!("--disable-host-loopback={no_host_loopback}"),
        format!("--port-driver={driver}"),
    ];
    for spec in publish {
        args.extend(["-p".to_owned(), spec.clone()]);
    }
    args.extend(["sh".to_owned(), "-c".to_owned(), script.to_owned()]);
    args
}

/// A shell loop that waits until file `go` exists.
fn wait_for(go: &str) -> String {
    format!("while [ ! -e {go} ]; do sleep 0.1; done")
}

/// `GET path` on 127.0.0.1:`port` (HTTP/1.0), each read bounded; the body of a 200.
fn http_get(port: u16, path: &str) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(local(port))?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let end = response.windows(4).position(|w| w == b"\r\n\r\n");
    match end {
        Some(end) if response.starts_with(b"HTTP/1.0 200") => Ok(response[end + 4..].to_vec()),
        _ => Err(std::io::Error::new(ErrorKind::InvalidData, "not a 200")),
    }
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON ({e}): {text}"))
}

/// The descendants of `pid` whose `comm` is `name`.
fn descendants_named(pid: i32, name: &str) -> Vec<i32> {
    let mut found = Vec::new();
    let mut queue = vec![pid];
    while let Some(p) = queue.pop() {
        for child in children(p) {
            let comm = fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
            if comm.trim() == name {
                found.push(child);
            }
            queue.push(child);
        }
    }
    found
}

fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .unwrap_or_default()
}

/// C02: 900 requests through the builtin driver all succeed; the child's descriptor count
/// is unchanged afterwards and the parent's does not grow after the first round.
#[test]
fn c02_builtin_no_descriptor_leak_over_many_connections() {
    let work = Work::new();
    fs::write(work.path().join("index.html"), "c02 index\n").expect("index");
    let port = free_port();
    let script = format!(
        "exec {PYTHON} -m http.server 8000 --bind 127.0.0.1 --directory {}",
        work.path().display()
    );
    let kit = launch(
        &work,
        "builtin",
        &[format!("127.0.0.1:{port}:8000/tcp")],
        &script,
    );
    let child = kit.child_pid();

    retry(|| http_get(port, "/").ok()).expect("http.server never answered");
    // Taken once the first connection went through: by then the start-up descriptors of the
    // namespace side (such as the channels the workers open) have settled.
    let child_before = fd_count(child);
    let mut first_round = None;
    for round in 1..=3 {
        let fails = (0..300)
            .filter(|_| http_get(port, "/index.html").ok().as_deref() != Some(b"c02 index\n"))
            .count();
        assert_eq!(fails, 0, "round {round}: {fails}/300 requests failed");

        let settled = retry(|| (fd_count(child) <= child_before).then_some(()));
        let child_now = fd_count(child);
        assert!(settled.is_some(), "child fds {child_before} -> {child_now}");

        // The parent's count after the first round (its lowest over a short look, as
        // connections still closing come and go) is the bound for the later rounds: a leak
        // per connection would keep it above that. Pipes are pooled by the forwarder's
        // workers for reuse, so their number may move by a few.
        let now = FdKinds::of(kit.pid());
        let bound = *first_round.get_or_insert_with(|| FdKinds::settled(kit.pid()));
        let bounded = retry(|| {
            let fds = FdKinds::of(kit.pid());
            (fds.other <= bound.other && fds.pipes <= bound.pipes + 8).then_some(())
        });
        let last = FdKinds::of(kit.pid());
        assert!(bounded.is_some(), "parent fds grew: {bound:?} -> {last:?}");
        eprintln!("c02 round {round}: fails=0 child_fds={child_now} parent_fds={now:?}");
    }
}

/// C04: `-p 127.0.0.2:P:C` reaches a server bound to 127.0.0.2 only (TCP and UDP, and
/// likewise `[::1]`); a server on 0.0.0.0 works too; an explicit child IP overrides the
/// derived one.
#[test]
fn c04_builtin_dials_the_published_loopback_address() {
    let work = Work::new();
    let ip2 = IpAddr::from([127, 0, 0, 2]);
    let ip6 = IpAddr::from(Ipv6Addr::LOCALHOST);
    let [derived, control, explicit] = [(); 3].map(|()| free_port_on(ip2));
    let (udp, v6) = (free_port_on(ip2), free_port_on(ip6));
    let script = format!(
        "{} & {} & {} & {} & exec {}",
        work.py("tcp_peer.py", "9004 127.0.0.2"),
        work.py("tcp_peer.py", "9005 0.0.0.0"),
        work.py("tcp_peer.py", "9008 ::1"),
        work.py("udp_echo.py", "9006 127.0.0.2"),
        work.py("tcp_peer.py", "9007 127.0.0.1"),
    );
    let publish = [
        format!("127.0.0.2:{derived}:9004/tcp"),
        format!("127.0.0.2:{control}:9005/tcp"),
        // The server on 9007 listens on 127.0.0.1 only: only the explicit child IP reaches it.
        format!("127.0.0.2:{explicit}:127.0.0.1:9007/tcp"),
        format!("[::1]:{v6}:9008/tcp"),
        format!("127.0.0.2:{udp}:9006/udp"),
    ];
    let _kit = launch(&work, "builtin", &publish, &script);

    for (what, addr, peer) in [
        // The server sees the source address the kernel picks inside (127.0.0.1 on lo).
        ("derived", SocketAddr::new(ip2, derived), "peer=127.0.0."),
        ("control", SocketAddr::new(ip2, control), "peer=127.0.0."),
        ("explicit", SocketAddr::new(ip2, explicit), "peer=127.0.0.1"),
        ("ipv6", SocketAddr::new(ip6, v6), "peer=::1"),
    ] {
        let line = retry(|| match tcp_attempt(addr, Duration::from_secs(3)) {
            Attempt::Line(line) => Some(line),
            _ => None,
        });
        let last = tcp_attempt(addr, Duration::from_secs(3));
        let line = line.unwrap_or_else(|| panic!("{what}: {addr} never greeted: {last:?}"));
        assert!(line.starts_with(peer), "{what}: {line}");
        let echo = echo_with_half_close(addr, b"c04 payload").expect("echo");
        assert_eq!(echo.echoed, b"c04 payload", "{what}");
        eprintln!("c04 {what}: OK {line}");
    }

    let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
    client.connect((ip2, udp)).expect("connect");
    let reply = udp_reply_when_up(&client, b"c04");
    assert_eq!(reply.as_deref(), Some(&b"echo:c04"[..]), "udp");
}

/// C07: the slirp4netns driver advertises IPv4 TCP/UDP only and refuses IPv6 and SCTP with
/// messages that name them, before asking slirp4netns; tcp4 works; a v6 `-p` stops the
/// launcher before the command runs.
#[test]
fn c07_slirp4netns_refuses_ipv6_and_sctp_clearly() {
    let work = Work::new();
    let kit = launch(&work, "slirp4netns", &[], &work.py("tcp_peer.py", "80"));
    let socket = kit.api_socket();

    let info = json(&ctl_ok(&socket, &["info", "--json"]));
    let driver = &info["portDriver"];
    assert_eq!(driver["driver"], "slirp4netns", "{info}");
    assert_eq!(
        driver["protos"],
        serde_json::json!(["tcp", "tcp4", "udp", "udp4"])
    );
    assert_eq!(driver["disallowLoopbackChildIP"], true, "{info}");

    let port = free_port();
    let refusals = [
        (format!("[::]:{port}:80/tcp6"), vec!["tcp6", "IPv6"]),
        (format!("[::1]:{port}:80/tcp"), vec!["::1", "IPv6"]),
        (format!("127.0.0.1:{port}:80/sctp"), vec!["sctp"]),
    ];
    for (spec, needles) in &refusals {
        let err = ctl_err(&socket, &["add-ports", spec]);
        for needle in needles {
            assert!(err.contains(needle), "{spec}: {err}");
        }
        assert!(!err.contains("add_hostfwd"), "{spec}: raw API error: {err}");
        assert_eq!(list_ports(&socket), "", "{spec} was registered");
        eprintln!("c07 {spec}: {}", err.trim());
    }

    let spec = format!("127.0.0.1:{port}:80/tcp4");
    assert_eq!(ctl_ok(&socket, &["add-ports", &spec]), "1\n");
    assert!(greeting_when_up(port).starts_with("peer="));

    let marker = work.file("c07-ran");
    let state = work.path().join("b");
    let mut command = Command::new(bin("rootlesskit"));
    command.arg(format!("--state-dir={}", state.display()));
    command.args(kit_args(
        "slirp4netns",
        false,
        &[format!("[::1]:{}:80/tcp6", free_port())],
        &format!(": > {marker}"),
    ));
    let output = output_within(command, RUN_LIMIT);
    assert_failed_naming(&output, &["tcp6"]);
    assert!(!Path::new(&marker).exists(), "the command ran");
    assert!(!state.exists(), "state dir left behind");
}

/// C08: a loopback child IP is refused by the slirp4netns driver (it would be a dead
/// mapping); the tap address and the default child IP deliver.
#[test]
fn c08_slirp4netns_refuses_a_loopback_child_ip() {
    let work = Work::new();
    let kit = launch(&work, "slirp4netns", &[], &work.py("tcp_peer.py", "80"));
    let socket = kit.api_socket();
    let [looped, tap, default] = [(); 3].map(|()| free_port());

    for child in ["127.0.0.1", "127.0.0.5"] {
        let spec = format!("127.0.0.1:{looped}:{child}:80/tcp");
        let err = ctl_err(&socket, &["add-ports", &spec]);
        assert!(
            err.contains("loopback") && err.contains(child),
            "{spec}: {err}"
        );
        eprintln!("c08 {spec}: {}", err.trim());
    }
    assert_eq!(list_ports(&socket), "", "a loopback mapping was registered");
    assert!(
        tcp_attempt(local(looped), Duration::from_secs(3)) == Attempt::Refused,
        "something listens on the refused port"
    );

    let specs = [
        format!("127.0.0.1:{tap}:10.0.2.100:80/tcp"),
        format!("127.0.0.1:{default}:80/tcp"),
    ];
    assert_eq!(
        ctl_ok(&socket, &["add-ports", &specs[0], &specs[1]]),
        "1\n2\n"
    );
    for port in [tap, default] {
        assert_eq!(greeting_when_up(port), "peer=10.0.2.2");
        assert_eq!(tcp_local(port), Attempt::Line("peer=10.0.2.2".into()));
    }
}

/// C10 as the unprivileged user: privileged host ports get an actionable error with both
/// drivers; the first unprivileged port works, and port 80 inside is fine.
fn c10_unprivileged() {
    let start: u16 = fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .expect("read ip_unprivileged_port_start")
        .trim()
        .parse()
        .expect("ip_unprivileged_port_start");
    if start <= 80 {
        eprintln!("c10 SKIPPED: ip_unprivileged_port_start is {start}, nothing to refuse");
        return;
    }
    for driver in ["builtin", "slirp4netns"] {
        let work = Work::new();
        let script = format!(
            "{} & exec {}",
            work.py("tcp_peer.py", "80"),
            work.py("udp_echo.py", "53")
        );
        let kit = launch(&work, driver, &[], &script);
        let socket = kit.api_socket();
        for (port, spec) in [(80, "127.0.0.1:80:80/tcp"), (53, "127.0.0.1:53:53/udp")] {
            let err = ctl_err(&socket, &["add-ports", spec]);
            for needle in [
                format!("privileged port {port}"),
                format!("net.ipv4.ip_unprivileged_port_start={port}"),
                format!("currently {start}"),
                "CAP_NET_BIND_SERVICE".to_owned(),
                format!(">= {start}"),
            ] {
                assert!(
                    err.contains(&needle),
                    "{driver} {spec}: no {needle:?}: {err}"
                );
            }
            eprintln!("c10 {driver} {spec}: {}", err.trim());
        }
        assert_eq!(
            list_ports(&socket),
            "",
            "{driver}: a refused port was listed"
        );

        let port = if TcpListener::bind(local(start)).is_ok() {
            start
        } else {
            eprintln!("c10: port {start} is taken on this host; checking a higher one");
            free_port()
        };
        let spec = format!("127.0.0.1:{port}:80/tcp");
        assert_eq!(ctl_ok(&socket, &["add-ports", &spec]), "1\n", "{driver}");
        assert!(greeting_when_up(port).starts_with("peer="), "{driver}");
    }
}

/// The unprivileged account the root run uses for C10.
const TEST_USER: &str = "rkport-test";

/// C10: needs a host user without privileges; as root, reruns this test as [`TEST_USER`].
#[test]
fn c10_privileged_host_port_error_is_actionable() {
    if !nix::unistd::geteuid().is_root() {
        return c10_unprivileged();
    }
    let Some(user) = nix::unistd::User::from_name(TEST_USER).ok().flatten() else {
        eprintln!("c10 SKIPPED: running as root and user {TEST_USER} does not exist");
        return;
    };

    // Binaries and this executable, copied where the user can read them.
    let dir = tempfile::tempdir().expect("temp dir");
    let bins = dir.path().join("bin");
    let home = dir.path().join("run");
    fs::create_dir(&bins).expect("mkdir");
    fs::create_dir(&home).expect("mkdir");
    for d in [dir.path(), &bins] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    nix::unistd::chown(&home, Some(user.uid), Some(user.gid)).expect("chown");
    let exe = std::env::current_exe().expect("test executable");
    let copy = |from: &Path| {
        let to = bins.join(from.file_name().expect("file name"));
        fs::copy(from, &to).expect("copy binary");
        to
    };
    copy(&bin("rootlesskit"));
    copy(&bin("rootlessctl"));
    let exe = copy(&exe);

    let mut command = Command::new("runuser");
    command
        .args(["-u", TEST_USER, "--", "env", "-i"])
        .arg("PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .arg(format!("HOME={}", home.display()))
        .arg(format!("TMPDIR={}", home.display()))
        .arg(format!("XDG_RUNTIME_DIR={}", home.display()))
        .arg(format!("RKPORT_BIN_DIR={}", bins.display()))
        .args(["timeout", "-k", "5", "200"])
        .arg(&exe)
        .args(["--exact", "c10_privileged_host_port_error_is_actionable"])
        .args(["--nocapture", "--test-threads=1"]);
    let output = output_within(command, Duration::from_secs(240));
    eprintln!("c10 as {TEST_USER}:\n{}", describe(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "c10 failed as {TEST_USER}");
    assert!(
        stdout.contains("1 passed"),
        "c10 did not run as {TEST_USER}"
    );
}

/// C11 (a): TCP connections and UDP datagrams sent before anything listens inside do no
/// harm: the TCP attempts close promptly; once the servers are up, TCP works and the same UDP
/// client socket gets replies, as does a fresh one; the port list never changes.
#[test]
fn c11_early_connections_close_promptly_and_do_no_harm() {
    for driver in ["builtin", "slirp4netns"] {
        let work = Work::new();
        let [tcp, udp] = [(); 2].map(|()| free_port_both());
        let go = work.file("go");
        let script = format!(
            "{}; {} & exec {}",
            wait_for(&go),
            work.py("udp_echo.py", "9111"),
            work.py("tcp_peer.py", "9011")
        );
        let publish = [
            format!("127.0.0.1:{tcp}:9011/tcp"),
            format!("127.0.0.1:{udp}:9111/udp"),
        ];
        let kit = launch(&work, driver, &publish, &script);
        let listed = list_ports(&kit.api_socket());

        for i in 1..=3 {
            let attempt = tcp_local(tcp);
            assert!(attempt.is_prompt_close(), "{driver} early {i}: {attempt:?}");
            eprintln!("c11 {driver} early attempt {i}: {attempt:?}");
        }
        let early = udp_client(udp);
        let short = Duration::from_millis(300);
        assert_eq!(udp_exchange(&early, b"early", short), None, "{driver}");

        fs::write(&go, "").expect("start the servers");
        greeting_when_up(tcp);
        for i in 1..=2 {
            let attempt = tcp_local(tcp);
            assert!(attempt.is_greeting(), "{driver} late {i}: {attempt:?}");
        }
        let reply = udp_reply_when_up(&early, b"same");
        assert_eq!(
            reply.as_deref(),
            Some(&b"echo:same"[..]),
            "{driver} old socket"
        );
        let reply = udp_reply_when_up(&udp_client(udp), b"fresh");
        assert_eq!(reply.as_deref(), Some(&b"echo:fresh"[..]), "{driver} fresh");
        assert_eq!(list_ports(&kit.api_socket()), listed, "{driver}");
    }
}

/// C11 (b), builtin: with no listener ever, TCP attempts close promptly (reset preferred)
/// and the ports stay registered; datagrams to a UDP port with no server harm nothing.
#[test]
fn c11_no_listener_ever_builtin() {
    let work = Work::new();
    let port = free_port_both();
    let publish = [
        format!("127.0.0.1:{port}:9012/tcp"),
        format!("127.0.0.1:{port}:9012/udp"),
    ];
    let kit = launch(&work, "builtin", &publish, "exec sleep 1000");
    let socket = kit.api_socket();
    let listed = list_ports(&socket);
    assert_eq!(listed.lines().count(), 2, "{listed}");

    let dead = udp_client(port);
    for i in 1..=3 {
        let attempt = tcp_local(port);
        assert!(attempt.is_prompt_close(), "no-listener {i}: {attempt:?}");
        eprintln!("c11 no listener, attempt {i}: {attempt:?}");
        let short = Duration::from_millis(300);
        assert_eq!(udp_exchange(&dead, b"nobody", short), None);
    }
    assert_eq!(list_ports(&socket), listed);
}

/// Opens `n` connections to 127.0.0.1:`port` (failures are allowed: this is the spike).
fn hold_connections(port: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .filter_map(|_| TcpStream::connect_timeout(&local(port), Duration::from_secs(2)).ok())
        .collect()
}

/// Connections opened at once by C12.
const SPIKE: usize = 200;

/// C12: the builtin forwarder, its descriptor limit lowered to 64 once it runs, survives a spike of connections that
/// exhausts its descriptors: afterwards the TCP port listens, is listed, and serves, and a
/// UDP port of the same forwarder, used during the spike, answers again.
#[test]
fn c12_descriptor_exhaustion_does_not_kill_a_port() {
    let work = Work::new();
    let port = free_port_both();
    let log = fs::File::create(work.path().join("launcher.log")).expect("log file");
    let mut command = Command::new(bin("rootlesskit"));
    command
        .arg("--debug")
        .arg(format!("--state-dir={}", work.state_dir().display()))
        .args(kit_args(
            "builtin",
            true,
            &[
                format!("127.0.0.1:{port}:9013/tcp"),
                format!("127.0.0.1:{port}:9013/udp"),
            ],
            &format!(
                "{} & exec {}",
                work.py("udp_echo.py", "9013"),
                work.py("tcp_peer.py", "9013")
            ),
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let mut kit = Kit::spawn_command(&work.state_dir(), command);
    kit.wait_ready();
    // Only the launcher is starved, not the servers inside, which must outlive the spike.
    let limit = libc::rlimit {
        rlim_cur: 64,
        rlim_max: 64,
    };
    // SAFETY: prlimit(2) reads `limit` and writes nothing (null old limit).
    let rc = unsafe { libc::prlimit(kit.pid(), libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let log_tail = || fs::read_to_string(work.path().join("launcher.log")).unwrap_or_default();

    assert!(greeting_when_up(port).starts_with("peer="));
    let udp = udp_client(port);
    assert!(udp_reply_when_up(&udp, b"before").is_some());
    // More than the 64 descriptors of every table the forwarder has: each data-path worker
    // keeps its connections in a table of its own, and the limit applies to each.
    let held = hold_connections(port, SPIKE);
    let during = udp_exchange(&udp, b"during", Duration::from_millis(500))
        .map(|reply| String::from_utf8_lossy(&reply).into_owned());
    eprintln!(
        "c12: {} of {SPIKE} connections opened; UDP during the spike: {during:?}",
        held.len()
    );
    std::thread::sleep(Duration::from_secs(2));
    drop(held);

    greeting_when_up(port);
    for i in 1..=3 {
        let attempt = tcp_local(port);
        assert!(attempt.is_greeting(), "after the spike {i}: {attempt:?}");
    }
    assert!(socket_on("tcp", port), "listener gone");
    let listed = list_ports(&kit.api_socket());
    assert_eq!(listed.lines().count(), 2, "{listed}");
    let reply = udp_reply_when_up(&udp, b"after");
    assert_eq!(reply.as_deref(), Some(&b"echo:after"[..]), "old UDP socket");
    let reply = udp_reply_when_up(&udp_client(port), b"fresh");
    assert_eq!(
        reply.as_deref(),
        Some(&b"echo:fresh"[..]),
        "fresh UDP socket"
    );
    // Proof that the spike did exhaust the descriptors (logged at debug level).
    let log = log_tail();
    assert!(
        log.contains("Too many open files"),
        "no EMFILE during the spike: {log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

/// C13: remove-ports closes the listener and the UDP socket (and, with the builtin driver,
/// the connections through them); the port is bindable at once; re-adding gives fresh ids
/// and works; unknown ids fail. Both the builtin and the slirp4netns driver.
#[test]
fn c13_remove_ports_frees_the_port_and_ids_stay_unique() {
    for driver in ["builtin", "slirp4netns"] {
        c13_driver(driver);
    }
}

fn c13_driver(driver: &str) {
    let work = Work::new();
    let port = free_port_both();
    let script = format!(
        "{} & exec {}",
        work.py("tcp_peer.py", "9014"),
        work.py("udp_echo.py", "9014")
    );
    let kit = launch(&work, driver, &[], &script);
    let socket = kit.api_socket();
    let tcp = format!("127.0.0.1:{port}:9014/tcp");
    let udp = format!("127.0.0.1:{port}:9014/udp");
    assert_eq!(ctl_ok(&socket, &["add-ports", &tcp, &udp]), "1\n2\n");

    greeting_when_up(port);
    let mut held = TcpStream::connect(local(port)).expect("connect");
    held.set_read_timeout(Some(READ_TIMEOUT)).expect("timeout");
    assert!(read_line(&mut held).expect("greeting").is_some());
    assert_eq!(ctl_ok(&socket, &["remove-ports", "1", "2"]), "1\n2\n");

    assert!(!socket_on("tcp", port), "{driver}: TCP listener left");
    assert!(!socket_on("udp", port), "{driver}: UDP socket left");
    let bound_udp = UdpSocket::bind(local(port)).expect("UDP port bindable after removal");
    let bound_tcp = TcpListener::bind(local(port)).expect("TCP port bindable (SO_REUSEADDR)");
    drop((bound_udp, bound_tcp));
    held_after_removal(driver, &mut held);

    assert_eq!(ctl_ok(&socket, &["add-ports", &tcp, &udp]), "3\n4\n");
    assert!(greeting_when_up(port).starts_with("peer="), "{driver}");
    let reply = udp_reply_when_up(&udp_client(port), b"x");
    assert_eq!(reply.as_deref(), Some(&b"echo:x"[..]), "{driver}");

    let err = ctl_err(&socket, &["remove-ports", "99"]);
    assert!(err.contains("unknown id: 99"), "{driver}: {err}");
    assert_eq!(ctl_ok(&socket, &["remove-ports", "3"]), "3\n");
    let err = ctl_err(&socket, &["remove-ports", "3"]);
    assert!(err.contains("unknown id: 3"), "{driver}: {err}");
    assert_eq!(list_ports(&socket).lines().count(), 1, "{driver}");
}

/// What happens to a connection made through a mapping that was then removed: the builtin
/// driver closes it; slirp4netns (libslirp's `remove_hostfwd`) only closes the listener and
/// leaves established connections alone, which is reported, not asserted.
fn held_after_removal(driver: &str, held: &mut TcpStream) {
    if driver != "builtin" {
        held.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
    }
    let mut buf = [0u8; 16];
    let outcome = held.read(&mut buf);
    eprintln!("c13 {driver}: held connection after removal: {outcome:?}");
    if driver == "builtin" {
        let closed = match &outcome {
            Ok(0) => true,
            Err(e) => e.kind() == ErrorKind::ConnectionReset,
            Ok(_) => false,
        };
        assert!(
            closed,
            "held connection still open after removal: {outcome:?}"
        );
    }
    let _ = held.shutdown(Shutdown::Both);
}

/// How a C14 launch ended.
enum LongDir {
    /// Refused before the command ran.
    Refused(Output),
    /// The command ran (and ports were published); its exit status was passed through.
    Ran(Output),
}

/// Runs rootlesskit on `state` with a published port and a command that exits `code` once
/// allowed to; checks that the command runs only with the port published.
fn c14_launch(work: &Work, state: &Path, code: i32) -> LongDir {
    let port = free_port();
    let marker = work.file("c14-ran");
    let go = work.file("c14-go");
    let _ = fs::remove_file(&marker);
    let _ = fs::remove_file(&go);
    let script = format!(": > {marker}; {}; exit {code}", wait_for(&go));
    let mut command = Command::new(bin("rootlesskit"));
    command
        .arg(format!("--state-dir={}", state.display()))
        .args(kit_args(
            "builtin",
            true,
            &[format!("127.0.0.1:{port}:80/tcp")],
            &script,
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut kit = Kit::spawn_command(state, command);

    let ran = retry(|| Path::new(&marker).exists().then_some(()));
    if ran.is_none() {
        return LongDir::Refused(kit.finish_bounded());
    }
    let published = TcpStream::connect(local(port));
    fs::write(&go, "").expect("let the command exit");
    let output = kit.finish_bounded();
    assert!(
        published.is_ok(),
        "the command ran with port {port} unpublished: {}",
        describe(&output)
    );
    LongDir::Ran(output)
}

/// C14: a state dir whose sockets fit (107 bytes) works; one that does not either works
/// or fails before the command, naming the path and the limit; never a hang.
#[test]
fn c14_state_dir_too_long_for_a_unix_socket() {
    let work = Work::new();
    let base = work.path().join("L");
    fs::create_dir(&base).expect("mkdir");
    let base_text = base.display().to_string();
    assert!(
        base_text.len() < 90,
        "temp dir path too long for C14: {base_text}"
    );
    let fits = base.join("x".repeat(98 - base_text.len() - 1));
    let long = base.join("y".repeat(97));

    match c14_launch(&work, &fits, 3) {
        LongDir::Ran(output) => assert_eq!(output.status.code(), Some(3), "{}", describe(&output)),
        LongDir::Refused(output) => panic!("98-char state dir refused: {}", describe(&output)),
    }
    for (state, code) in [
        (long.clone(), 3),
        (PathBuf::from(format!("{}.0", long.display())), 0),
    ] {
        match c14_launch(&work, &state, code) {
            LongDir::Ran(output) => {
                assert_eq!(output.status.code(), Some(code), "{}", describe(&output));
            }
            LongDir::Refused(output) => {
                let sock = format!("{}/api.sock", state.display());
                assert_failed_naming(&output, &[&sock, "107"]);
                eprintln!(
                    "c14 refused: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
        }
        assert!(!state.exists(), "state dir left behind");
    }
}

/// C16: UDP through the slirp4netns driver gets its replies with and without
/// `--disable-host-loopback`, and the flag still keeps the namespace from host loopback.
#[test]
fn c16_slirp4netns_udp_replies_with_host_loopback_disabled() {
    let host = TcpListener::bind("127.0.0.1:0").expect("host listener");
    let host_port = host.local_addr().expect("addr").port();
    for disabled in [true, false] {
        let work = Work::new();
        let port = free_port_both();
        let go = work.file("go");
        let probe = format!(
            "{} > {}",
            work.py("probe_connect.py", &format!("10.0.2.2 {host_port}")),
            work.file("probe")
        );
        let script = format!(
            "{} & {}; {probe}; : > {}; wait",
            work.py("udp_echo.py", "9017"),
            wait_for(&go),
            work.file("probed")
        );
        let args = kit_args(
            "slirp4netns",
            disabled,
            &[format!("127.0.0.1:{port}:9017/udp")],
            &script,
        );
        let mut kit = Kit::spawn(&work.state_dir(), args);
        kit.wait_ready();

        let reply = udp_reply_when_up(&udp_client(port), b"hello");
        assert_eq!(
            reply.as_deref(),
            Some(&b"echo:hello"[..]),
            "disabled={disabled}"
        );
        fs::write(&go, "").expect("start the probe");
        retry(|| Path::new(&work.file("probed")).exists().then_some(())).expect("probe ran");
        let probe = fs::read_to_string(work.file("probe")).unwrap_or_default();
        assert_eq!(
            probe.trim() == "reached",
            !disabled,
            "disabled={disabled}: {probe}"
        );
        eprintln!(
            "c16 disable-host-loopback={disabled}: reply ok, probe: {}",
            probe.trim()
        );
    }
}

/// C19 for one driver: half-close both ways and byte-exact transfers.
fn c19_driver(driver: &str) {
    let work = Work::new();
    let www = work.path().join("www");
    fs::create_dir(&www).expect("mkdir");
    fs::set_permissions(&www, fs::Permissions::from_mode(0o755)).expect("chmod");
    let blob = pseudo_random(4 << 20, 0xc19);
    fs::write(www.join("blob"), &blob).expect("blob");
    let late = work.file("late");
    let [echo, rev, http] = [(); 3].map(|()| free_port());
    let script = format!(
        "{} & {} & exec {PYTHON} -m http.server 8021 --bind 0.0.0.0 --directory {}",
        work.py("tcp_peer.py", "9019"),
        work.py("rev_half_server.py", &format!("9020 {late}")),
        www.display()
    );
    let publish = [
        format!("127.0.0.1:{echo}:9019/tcp"),
        format!("127.0.0.1:{rev}:9020/tcp"),
        format!("127.0.0.1:{http}:8021/tcp"),
    ];
    let _kit = launch(&work, driver, &publish, &script);

    // (1) The client half-closes; the echo of every byte still arrives, then EOF.
    greeting_when_up(echo);
    for data in [pseudo_random(4 << 20, 7), b"0123456789".to_vec()] {
        let result = echo_with_half_close(local(echo), &data)
            .unwrap_or_else(|e| panic!("{driver}: {} bytes: {e}", data.len()));
        assert!(result.greeting.starts_with("peer="), "{driver}");
        assert_eq!(result.echoed.len(), data.len(), "{driver}");
        assert!(result.echoed == data, "{driver}: echo differs");
    }

    // (2) The server half-closes; the client reads EOF and can still send.
    let mut stream = retry(|| {
        let mut s = TcpStream::connect(local(rev)).ok()?;
        s.set_read_timeout(Some(READ_TIMEOUT)).ok()?;
        (read_line(&mut s).ok()?.as_deref() == Some("greeting")).then_some(s)
    })
    .unwrap_or_else(|| panic!("{driver}: no greeting from the half-closing server"));
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .expect("EOF after the server's FIN");
    assert!(rest.is_empty(), "{driver}: {rest:?}");
    let message = format!("late data via {driver}");
    stream
        .write_all(message.as_bytes())
        .expect("send after EOF");
    stream.shutdown(Shutdown::Write).expect("shutdown");
    let logged = retry(|| {
        let text = fs::read_to_string(&late).ok()?;
        text.contains(&message).then_some(text)
    });
    assert!(
        logged.is_some(),
        "{driver}: the server never got the late data"
    );

    // (3) A 4 MiB download, three times, byte-exact.
    retry(|| http_get(http, "/").ok()).expect("http.server never answered");
    for i in 1..=3 {
        let body = http_get(http, "/blob").unwrap_or_else(|e| panic!("{driver} {i}: {e}"));
        assert_eq!(body.len(), blob.len(), "{driver} download {i}");
        assert!(body == blob, "{driver} download {i} differs");
    }
    eprintln!("c19 {driver}: half-close both ways and 4 MiB transfers ok");
}

/// C19: stream semantics through the builtin and slirp4netns drivers.
#[test]
fn c19_half_close_and_byte_exact_transfers() {
    for driver in ["builtin", "slirp4netns"] {
        c19_driver(driver);
    }
}

/// A directory of symlinks to what rootlesskit needs in PATH, except `socat`.
fn path_without_socat(dir: &Path) -> String {
    let system = ["/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"];
    for name in [
        "sh",
        "ip",
        "slirp4netns",
        "nsenter",
        "newuidmap",
        "newgidmap",
    ] {
        let found = system
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.exists());
        if let Some(target) = found {
            std::os::unix::fs::symlink(target, dir.join(name)).expect("symlink");
        }
    }
    dir.display().to_string()
}

/// C20: the deprecated socat driver forwards TCP and UDP, warns, reports itself, stops the
/// socat of a removed port, and refuses to start without socat.
#[test]
fn c20_socat_driver_works_and_warns() {
    let work = Work::new();
    let port = free_port_both();
    let script = format!(
        "{} & exec {}",
        work.py("tcp_peer.py", "9020"),
        work.py("udp_echo.py", "9020")
    );
    let publish = [
        format!("127.0.0.1:{port}:9020/tcp"),
        format!("127.0.0.1:{port}:9020/udp"),
    ];
    let mut kit = launch(&work, "socat", &publish, &script);
    let socket = kit.api_socket();

    assert!(greeting_when_up(port).starts_with("peer="));
    let reply = udp_reply_when_up(&udp_client(port), b"hi");
    assert_eq!(reply.as_deref(), Some(&b"echo:hi"[..]));
    let info = json(&ctl_ok(&socket, &["info", "--json"]));
    assert_eq!(info["portDriver"]["driver"], "socat", "{info}");
    let protos = info["portDriver"]["protos"]
        .as_array()
        .expect("protos")
        .clone();
    assert!(
        protos.contains(&"tcp".into()) && protos.contains(&"udp".into()),
        "{info}"
    );
    assert!(!protos.iter().any(|p| p
        .as_str()
        .is_some_and(|p| p.contains('6') || p.contains("sctp"))));

    // Removing the TCP port ends its socat and frees the port; UDP keeps working.
    let listen = format!("TCP4-LISTEN:{port},");
    let tcp_socat = || {
        descendants_named(kit.pid(), "socat")
            .into_iter()
            .filter(|&p| cmdline(p).contains(&listen))
            .collect::<Vec<_>>()
    };
    let before = tcp_socat();
    assert!(!before.is_empty(), "no socat listening on {port}");
    assert_eq!(ctl_ok(&socket, &["remove-ports", "1"]), "1\n");
    let gone = retry(|| before.iter().all(|&p| !pid_alive(p)).then_some(()));
    assert!(gone.is_some(), "socat {before:?} survived remove-ports");
    TcpListener::bind(local(port)).expect("TCP port bindable after removal");
    let reply = udp_reply_when_up(&udp_client(port), b"again");
    assert_eq!(reply.as_deref(), Some(&b"echo:again"[..]));

    let all = descendants_named(kit.pid(), "socat");
    kit.signal(Signal::SIGTERM);
    let output = kit.finish_bounded();
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("deprecated"),
        "{}",
        describe(&output)
    );
    let gone = retry(|| all.iter().all(|&p| !pid_alive(p)).then_some(()));
    assert!(gone.is_some(), "socat {all:?} outlived rootlesskit");

    // Without socat in PATH: refused before the command runs.
    let tools = work.path().join("tools");
    fs::create_dir(&tools).expect("mkdir");
    let marker = work.file("c20-ran");
    let state = work.path().join("b");
    let mut command = Command::new(bin("rootlesskit"));
    command
        .env("PATH", path_without_socat(&tools))
        .arg(format!("--state-dir={}", state.display()))
        .args(kit_args(
            "socat",
            true,
            &[format!("127.0.0.1:{}:80/tcp", free_port())],
            &format!(": > {marker}"),
        ));
    let output = output_within(command, RUN_LIMIT);
    assert!(!output.status.success(), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let error = stderr
        .lines()
        .find(|l| l.starts_with("[rootlesskit:parent] error:"))
        .unwrap_or_else(|| panic!("no error line: {}", describe(&output)));
    assert!(error.contains("`socat`"), "{error}");
    assert!(!Path::new(&marker).exists(), "the command ran");
    assert!(!state.exists(), "state dir left behind");
    eprintln!("c20 without socat: {error}");
}
