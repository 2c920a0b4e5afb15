//! The socat port driver with real socat, real nsenter and real servers in a real user+net
//! namespace.

// One set of namespace fixtures serves the slirp4netns and socat driver tests.
#[path = "../../../tests/shared/netns_fixtures.rs"]
mod common;

use std::error::Error;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;

use rkport_core::{PortDriver, PortError, PortSpec, SpecError};
use rkport_socat::{SocatDriver, DEPRECATION};

use common::{free_port, pattern, tcp_exchange, udp_exchange, Netns, IO_TIMEOUT};

type TestResult = Result<(), Box<dyn Error>>;

fn spec(s: &str) -> PortSpec {
    s.parse().expect("valid spec")
}

fn local(port: u16) -> SocketAddr {
    (Ipv4Addr::LOCALHOST, port).into()
}

/// The live (non-zombie) processes of process group `pgid`, from /proc.
fn group_members(pgid: u32) -> Vec<u32> {
    let dir = std::fs::read_dir("/proc").expect("read /proc");
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            f.first() != Some(&"Z") && f.get(2) == Some(&pgid.to_string().as_str())
        })
        .collect()
}

/// The pid of the socat listening on `port` on the host (a member of our process's children).
fn listener_pid(port: u16) -> Option<u32> {
    let out = Command::new("ss")
        .args(["-Htlnp", &format!("sport = :{port}")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text.find("pid=")? + 4;
    text[at..].split(',').next()?.parse().ok()
}

#[test]
fn tcp_bytes_and_half_close_both_ways() -> TestResult {
    let ns = Netns::new()?;
    let _echo = ns.python(common::TCP_SERVER, &["9001"])?;
    let mut rev = ns.python(common::TCP_SERVER, &["9003", "rev"])?;
    let driver = SocatDriver::new(ns.pid())?;
    let p1 = free_port();
    let p2 = common::free_port_but(&[p1]);
    driver.add_port(&spec(&format!("127.0.0.1:{p1}:9001/tcp")))?;
    driver.add_port(&spec(&format!("127.0.0.1:{p2}:9003/tcp4")))?;

    // Client half-closes: the server sees EOF, and its echo still comes back in full.
    let payload = pattern(4 << 20);
    let (peer, echoed) = tcp_exchange(local(p1), &payload)?;
    assert_eq!(peer, "peer=127.0.0.1");
    assert!(
        echoed == payload,
        "echo differs: {} of {} bytes",
        echoed.len(),
        payload.len()
    );

    // Server half-closes: the client sees EOF and can still send.
    let mut stream = TcpStream::connect(local(p2))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut greeting = String::new();
    BufReader::new(stream.try_clone()?).read_to_string(&mut greeting)?;
    assert_eq!(greeting, "greeting\n");
    stream.write_all(b"late data")?;
    stream.shutdown(Shutdown::Write)?;
    assert_eq!(rev.read_line()?.trim_end(), "late=late data");
    Ok(())
}

#[test]
fn udp_roundtrip_for_several_peers() -> TestResult {
    let ns = Netns::new()?;
    let _udp = ns.python(common::UDP_SERVER, &["9002"])?;
    let driver = SocatDriver::new(ns.pid())?;
    let port = free_port();
    driver.add_port(&spec(&format!("127.0.0.1:{port}:9002/udp")))?;

    for size in [1, 1400, 30000] {
        let payload = pattern(size);
        let reply = udp_exchange(local(port), &payload)?;
        assert!(
            reply[..5] == *b"echo:" && reply[5..] == payload[..],
            "{size}-byte datagram"
        );
    }

    // One peer, several datagrams: they all go through its own forked socat.
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut buf = [0u8; 64];
    for msg in ["one", "two", "three"] {
        sock.send_to(msg.as_bytes(), local(port))?;
        let n = sock.recv(&mut buf)?;
        assert_eq!(&buf[..n], format!("echo:{msg}").as_bytes());
    }
    Ok(())
}

#[test]
fn add_list_remove_kills_helpers_and_frees_the_port() -> TestResult {
    let ns = Netns::new()?;
    let _echo = ns.python(common::TCP_SERVER, &["9001"])?;
    let driver = SocatDriver::new(ns.pid())?;
    let p1 = free_port();
    let p2 = common::free_port_but(&[p1]);
    let a = driver.add_port(&spec(&format!("127.0.0.1:{p1}:9001/tcp")))?;
    let b = driver.add_port(&spec(&format!("127.0.0.1:{p2}:9001/tcp")))?;
    assert_eq!(driver.list_ports()?, [a.clone(), b.clone()]);

    // A held connection means per-connection processes (nsenter → socat) in the group.
    let mut held = TcpStream::connect(local(p1))?;
    held.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(held.try_clone()?).read_line(&mut line)?;
    assert_eq!(line, "peer=127.0.0.1\n");
    let pgid = listener_pid(p1).ok_or("no socat listening")?;
    let members = group_members(pgid);
    assert!(
        members.len() >= 2,
        "listener and connection helper: {members:?}"
    );

    driver.remove_port(a.id)?;
    assert_eq!(driver.list_ports()?, std::slice::from_ref(&b));
    assert!(
        group_members(pgid).is_empty(),
        "helpers left: {:?}",
        group_members(pgid)
    );
    assert_eq!(
        held.read(&mut [0u8; 16])?,
        0,
        "the held connection is closed"
    );
    TcpListener::bind(local(p1))?;

    assert!(matches!(
        driver.remove_port(a.id),
        Err(PortError::UnknownId(_))
    ));
    let pgid_b = listener_pid(p2).ok_or("no socat listening")?;
    driver.shutdown();
    assert!(driver.list_ports()?.is_empty());
    assert!(group_members(pgid_b).is_empty());
    TcpListener::bind(local(p2))?;
    Ok(())
}

#[test]
fn conflicts_and_unsupported_specs_are_refused() -> TestResult {
    let ns = Netns::new()?;
    let driver = SocatDriver::new(ns.pid())?;
    let port = free_port();
    let first = driver.add_port(&spec(&format!("127.0.0.1:{port}:80/tcp")))?;
    let err = driver
        .add_port(&spec(&format!("0.0.0.0:{port}:80/tcp4")))
        .unwrap_err();
    assert!(
        matches!(err, PortError::Spec(SpecError::Conflict(id)) if id == first.id),
        "{err}"
    );

    let refused = [
        (
            "[::]:18020:80/tcp6",
            "port driver socat does not support IPv6 (proto tcp6)",
        ),
        (
            "[::1]:18020:80/tcp",
            "port driver socat does not support IPv6 (parent IP ::1",
        ),
        (
            "127.0.0.1:18020:80/sctp",
            "protocol sctp is not supported by port driver socat",
        ),
    ];
    for (s, want) in refused {
        let err = driver.add_port(&spec(s)).expect_err(s).to_string();
        assert!(err.starts_with(want), "{s}: {err}");
    }
    assert_eq!(driver.list_ports()?, [first]);
    Ok(())
}

#[test]
fn bind_failure_is_reported_with_socats_message() -> TestResult {
    let ns = Netns::new()?;
    let driver = SocatDriver::new(ns.pid())?;
    let busy = TcpListener::bind("127.0.0.1:0")?;
    let port = busy.local_addr()?.port();
    let err = driver
        .add_port(&spec(&format!("127.0.0.1:{port}:80/tcp")))
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(&format!("socat failed to listen on 127.0.0.1:{port}/tcp")),
        "{text}"
    );
    assert!(text.contains("Address already in use"), "{text}");
    assert!(driver.list_ports()?.is_empty());
    Ok(())
}

/// C20: the driver warns, advertises IPv4 protos only, and a missing socat is named.
#[test]
fn c20_deprecation_info_and_missing_socat() -> TestResult {
    assert!(DEPRECATION.contains("deprecated") && DEPRECATION.contains("builtin"));
    let ns = Netns::new()?;
    let info = SocatDriver::new(ns.pid())?.info()?;
    let protos: Vec<String> = info.protos.iter().map(|p| p.to_string()).collect();
    assert_eq!(
        (info.driver.as_str(), protos),
        (
            "socat",
            vec!["tcp".into(), "tcp4".into(), "udp".into(), "udp4".into()]
        )
    );

    Ok(())
}

/// Runs the test named `name` again in a new process of this test binary, changed by `setup`
/// (PATH and uid are process state), and checks that it passed there.
fn rerun(name: &str, setup: impl FnOnce(&mut Command)) -> TestResult {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["--exact", name, "--nocapture"]).env(RERUN, "1");
    setup(&mut cmd);
    let out = cmd.output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1 passed"), "{stdout}");
    Ok(())
}

const RERUN: &str = "RKPORT_SOCAT_TEST_RERUN";

/// C20: with nsenter but no socat in PATH, the driver names the missing binary.
#[test]
fn c20_missing_socat_is_named() -> TestResult {
    if std::env::var_os(RERUN).is_none() {
        let dir = tempfile::tempdir()?;
        std::os::unix::fs::symlink("/usr/bin/nsenter", dir.path().join("nsenter"))?;
        return rerun("c20_missing_socat_is_named", |cmd| {
            cmd.env("PATH", dir.path());
        });
    }
    let err = SocatDriver::new(1).unwrap_err().to_string();
    assert!(
        err.starts_with("port driver socat needs `socat`, which is not in PATH"),
        "{err}"
    );
    Ok(())
}

/// C10 for socat: a privileged host port is refused up front, with the actionable message.
/// Root may bind any port, so as root the test runs again as `nobody`.
#[test]
fn c10_privileged_port_refused_before_socat_starts() -> TestResult {
    if nix::unistd::geteuid().is_root() {
        return rerun("c10_privileged_port_refused_before_socat_starts", |cmd| {
            let exe = cmd.get_program().to_owned();
            let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
            *cmd = Command::new("setpriv");
            cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(exe)
                .args(args);
        });
    }
    let start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")?
        .trim()
        .parse()?;
    assert!(
        start > 1,
        "this host has no privileged ports (ip_unprivileged_port_start={start})"
    );
    let driver = SocatDriver::new(std::process::id() as i32)?;
    let port = start - 1;
    let err = driver
        .add_port(&spec(&format!("127.0.0.1:{port}:80/tcp")))
        .unwrap_err();
    let want = format!("cannot expose privileged port {port}, you can add 'net.ipv4.ip_unprivileged_port_start={port}'");
    assert!(err.to_string().starts_with(&want), "{err}");
    assert!(driver.list_ports()?.is_empty());
    Ok(())
}
