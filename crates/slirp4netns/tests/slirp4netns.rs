//! The slirp4netns port driver against a real slirp4netns and real servers in a real user+net
//! namespace.

// One set of namespace fixtures serves the slirp4netns and socat driver tests.
#[path = "../../../tests/shared/netns_fixtures.rs"]
mod common;
#[path = "support/slirp.rs"]
mod slirp;

use std::error::Error;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::Command;

use rkport_core::{PortDriver, PortError, PortSpec, SpecError};
use rkport_slirp4netns::{api, apply_host_loopback_guard, Slirp4netnsDriver};

use common::{free_port, pattern, tcp_exchange, udp_exchange, Netns, IO_TIMEOUT};
use slirp::Slirp;

type TestResult = Result<(), Box<dyn Error>>;

const TAP_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

fn driver(slirp: &Slirp) -> Slirp4netnsDriver {
    Slirp4netnsDriver::new(&slirp.socket, TAP_IP)
}

/// A namespace with tap0 and slirp4netns; `extra` are more slirp4netns flags.
fn network(extra: &[&str]) -> Result<(Netns, Slirp), Box<dyn Error>> {
    let ns = Netns::new()?;
    ns.add_tap()?;
    let slirp = Slirp::start(ns.pid(), extra)?;
    Ok((ns, slirp))
}

fn spec(s: &str) -> PortSpec {
    s.parse().expect("valid spec")
}

fn local(port: u16) -> SocketAddr {
    (Ipv4Addr::LOCALHOST, port).into()
}

#[test]
fn tcp_and_udp_add_list_remove() -> TestResult {
    let (ns, slirp) = network(&["--disable-host-loopback"])?;
    let _tcp = ns.python(common::TCP_SERVER, &["9001"])?;
    let _udp = ns.python(common::UDP_SERVER, &["9002"])?;
    let driver = driver(&slirp);
    let tp = free_port();
    let up = common::free_port_but(&[tp]);

    // Publish, and check the ids are slirp4netns's own.
    let t = driver.add_port(&spec(&format!("127.0.0.1:{tp}:9001/tcp4")))?;
    let u = driver.add_port(&spec(&format!("127.0.0.1:{up}:9002/udp")))?;
    let entries = driver.api().list_hostfwd()?;
    assert_eq!(
        entries.iter().map(|e| e.id).collect::<Vec<_>>(),
        [t.id, u.id]
    );
    assert_eq!(
        entries[0].fwd.proto,
        api::FwdProto::Tcp,
        "tcp4 is sent as tcp"
    );
    assert_eq!(driver.list_ports()?, [t.clone(), u.clone()]);

    // Bytes both ways, with half-close, through slirp4netns.
    let payload = pattern(1 << 20);
    let (peer, echoed) = tcp_exchange(local(tp), &payload)?;
    assert_eq!(
        peer,
        format!("peer={GATEWAY}"),
        "loopback clients appear as the gateway"
    );
    assert!(
        echoed == payload,
        "echo differs: {} of {} bytes",
        echoed.len(),
        payload.len()
    );

    // No UDP exchange here: with --disable-host-loopback slirp4netns drops the replies to
    // loopback clients (see the c16 tests and the guard module).
    driver.remove_port(t.id)?;
    assert_eq!(driver.list_ports()?, std::slice::from_ref(&u));
    assert!(
        TcpListener::bind(local(tp)).is_ok(),
        "removed port is free again"
    );
    driver.remove_port(u.id)?;
    assert!(driver.api().list_hostfwd()?.is_empty());
    assert!(matches!(driver.remove_port(u.id), Err(PortError::UnknownId(id)) if id == u.id));
    Ok(())
}

#[test]
fn udp_roundtrip_without_host_loopback_flag() -> TestResult {
    let (ns, slirp) = network(&[])?;
    let _udp = ns.python(common::UDP_SERVER, &["9002"])?;
    let driver = driver(&slirp);
    let port = free_port();
    driver.add_port(&spec(&format!("127.0.0.1:{port}:9002/udp4")))?;
    for size in [1, 1400, 60000] {
        let payload = pattern(size);
        let reply = udp_exchange(local(port), &payload)?;
        assert_eq!(&reply[..5], b"echo:");
        assert!(reply[5..] == payload[..], "{size}-byte datagram");
    }
    Ok(())
}

#[test]
fn conflicts_are_refused_and_nothing_is_registered() -> TestResult {
    let (_ns, slirp) = network(&[])?;
    let driver = driver(&slirp);
    let port = free_port();
    let first = driver.add_port(&spec(&format!("127.0.0.1:{port}:80/tcp")))?;
    for dup in [
        format!("127.0.0.1:{port}:81/tcp"),
        format!("0.0.0.0:{port}:80/tcp4"),
    ] {
        let err = driver.add_port(&spec(&dup)).expect_err(&dup);
        assert!(
            matches!(err, PortError::Spec(SpecError::Conflict(id)) if id == first.id),
            "{err}"
        );
    }
    driver.add_port(&spec(&format!("127.0.0.1:{port}:80/udp")))?;
    assert_eq!(driver.api().list_hostfwd()?.len(), 2);
    assert_eq!(driver.list_ports()?.len(), 2);
    Ok(())
}

#[test]
fn host_port_in_use_is_reported_clearly() -> TestResult {
    let (_ns, slirp) = network(&[])?;
    let driver = driver(&slirp);
    let busy = TcpListener::bind("127.0.0.1:0")?;
    let port = busy.local_addr()?.port();
    let err = driver
        .add_port(&spec(&format!("127.0.0.1:{port}:80/tcp")))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "slirp4netns: add_hostfwd: slirp_add_hostfwd failed (could not listen on \
             127.0.0.1:{port}/tcp: is it already in use?)"
        )
    );
    assert!(driver.list_ports()?.is_empty());
    Ok(())
}

/// C07: IPv6 and sctp are refused by the driver itself; slirp4netns is never asked.
#[test]
fn c07_ipv6_and_sctp_refused_before_slirp4netns() -> TestResult {
    let (_ns, slirp) = network(&["--disable-host-loopback"])?;
    let driver = driver(&slirp);
    let cases = [
        (
            "[::]:18007:80/tcp6",
            "port driver slirp4netns does not support IPv6 (proto tcp6",
        ),
        (
            "[::1]:18007:80/tcp",
            "port driver slirp4netns does not support IPv6 (parent IP ::1",
        ),
        (
            "127.0.0.1:18007:80/sctp",
            "protocol sctp is not supported by port driver slirp4netns",
        ),
        (
            "127.0.0.1:18007:[::1]:80/tcp4",
            "port driver slirp4netns does not support IPv6 (child IP ::1",
        ),
    ];
    for (s, want) in cases {
        let err = driver.add_port(&spec(s)).expect_err(s).to_string();
        assert!(err.starts_with(want), "{s}: {err}");
    }
    assert!(
        driver.api().list_hostfwd()?.is_empty(),
        "slirp4netns was not asked"
    );
    assert!(driver.list_ports()?.is_empty());
    let info = driver.info()?;
    assert_eq!(serde_json_protos(&info), ["tcp", "tcp4", "udp", "udp4"]);
    Ok(())
}

fn serde_json_protos(info: &rkport_core::DriverInfo) -> Vec<String> {
    info.protos.iter().map(|p| p.to_string()).collect()
}

/// C08: a loopback child IP is refused; the tap address and the default reach the server.
#[test]
fn c08_loopback_child_ip_refused_tap_address_works() -> TestResult {
    let (ns, slirp) = network(&["--disable-host-loopback"])?;
    let _tcp = ns.python(common::TCP_SERVER, &["80"])?;
    let driver = driver(&slirp);

    let err = driver
        .add_port(&spec("127.0.0.1:18008:127.0.0.1:80/tcp"))
        .unwrap_err();
    assert!(
        err.to_string().contains("loopback child IP 127.0.0.1"),
        "{err}"
    );
    assert!(driver.info()?.disallow_loopback_child_ip);

    for child in ["10.0.2.100:", ""] {
        let port = free_port();
        driver.add_port(&spec(&format!("127.0.0.1:{port}:{child}80/tcp")))?;
        let (peer, echoed) = tcp_exchange(local(port), b"ping")?;
        assert_eq!(
            (peer.as_str(), &echoed[..]),
            ("peer=10.0.2.2", &b"ping"[..])
        );
    }
    assert_eq!(driver.api().list_hostfwd()?.len(), 2);
    Ok(())
}

/// C10: a privileged host port fails with the actionable message before slirp4netns is asked.
///
/// As root, the test runs itself again as `nobody`, since root may bind any port.
#[test]
fn c10_privileged_port_refused_before_slirp4netns() -> TestResult {
    if nix::unistd::geteuid().is_root() {
        let status = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(std::env::current_exe()?)
            .args([
                "--exact",
                "c10_privileged_port_refused_before_slirp4netns",
                "--nocapture",
            ])
            .status()?;
        assert!(status.success(), "the test as nobody failed: {status}");
        return Ok(());
    }
    let start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")?
        .trim()
        .parse()?;
    // No slirp4netns behind this socket: an error from asking it would be a connect error.
    let driver = Slirp4netnsDriver::new("/nonexistent/s4nn.sock", TAP_IP);
    for proto in ["tcp", "udp"] {
        let port = start.saturating_sub(1).max(1);
        let err = driver
            .add_port(&spec(&format!("127.0.0.1:{port}:80/{proto}")))
            .unwrap_err();
        if start <= 1 {
            assert!(
                !matches!(err, PortError::PrivilegedPort { .. }),
                "no port is privileged"
            );
            continue;
        }
        let want = format!(
            "cannot expose privileged port {port}, you can add \
             'net.ipv4.ip_unprivileged_port_start={port}' to /etc/sysctl.conf (currently {start})"
        );
        assert!(err.to_string().starts_with(&want), "{err}");
    }
    // At the limit the driver does ask slirp4netns (and fails to reach it here).
    let err = driver
        .add_port(&spec(&format!("127.0.0.1:{}:80/tcp", start.max(1))))
        .unwrap_err();
    assert!(err.to_string().contains("connect"), "{err}");
    Ok(())
}

/// C16: with the host-loopback guard in the namespace instead of slirp4netns's flag, UDP
/// replies reach loopback clients, and the namespace still cannot open connections to the
/// host's loopback.
#[test]
fn c16_udp_replies_arrive_with_the_host_loopback_guard() -> TestResult {
    let ns = Netns::new()?;
    ns.add_tap()?;
    apply_host_loopback_guard(ns.pid(), GATEWAY)?;
    let slirp = Slirp::start(ns.pid(), &[])?;
    let _udp = ns.python(common::UDP_SERVER, &["9017"])?;
    let _tcp = ns.python(common::TCP_SERVER, &["9018"])?;
    let driver = driver(&slirp);
    assert!(driver.udp_reply_warning().is_none());

    // Forwards work both ways: their replies belong to flows the host opened.
    let up = free_port();
    let tp = common::free_port_but(&[up]);
    driver.add_port(&spec(&format!("127.0.0.1:{up}:9017/udp")))?;
    driver.add_port(&spec(&format!("127.0.0.1:{tp}:9018/tcp")))?;
    assert_eq!(udp_exchange(local(up), b"hello")?, b"echo:hello");
    assert_eq!(tcp_exchange(local(tp), b"x")?.1, b"x");

    // New flows from the namespace to the host's loopback are refused.
    let probe = probe_host_loopback(&ns)?;
    assert_eq!(probe.verdict, "tcp=refused udp=denied", "{probe:?}");
    assert!(
        probe.host_listener_untouched()?,
        "a connection reached the host"
    );
    Ok(())
}

/// The control for C16: without the flag and without the guard the probe does get through,
/// so the refusal above is the guard's doing.
#[test]
fn c16_control_host_loopback_is_open_without_guard() -> TestResult {
    let (ns, _slirp) = network(&[])?;
    let probe = probe_host_loopback(&ns)?;
    assert_eq!(probe.verdict, "tcp=connected udp=sent", "{probe:?}");
    Ok(())
}

#[test]
fn udp_warning_when_slirp4netns_has_the_flag() -> TestResult {
    let (_ns, slirp) = network(&["--disable-host-loopback"])?;
    let driver = driver(&slirp).with_host_loopback_disabled(true);
    assert!(driver.udp_reply_warning().is_some());
    driver.add_port(&spec(&format!("127.0.0.1:{}:53/udp", free_port())))?;
    Ok(())
}

#[derive(Debug)]
struct Probe {
    verdict: String,
    listener: TcpListener,
}

impl Probe {
    /// Whether the host listener has no pending connection.
    fn host_listener_untouched(&self) -> std::io::Result<bool> {
        self.listener.set_nonblocking(true)?;
        match self.listener.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(true),
            Err(e) => Err(e),
            Ok(_) => Ok(false),
        }
    }
}

/// Tries, from inside the namespace, a TCP connect and a UDP send to the gateway, where
/// slirp4netns would map them to a host listener on 127.0.0.1.
fn probe_host_loopback(ns: &Netns) -> Result<Probe, Box<dyn Error>> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let script = format!(
        r#"
import socket
t = socket.socket(); t.settimeout({timeout})
try: t.connect(("{GATEWAY}", {port})); tcp = "connected"
except ConnectionRefusedError: tcp = "refused"
except OSError as e: tcp = "error:%s" % e
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try: u.sendto(b"x", ("{GATEWAY}", {port})); udp = "sent"
except PermissionError: udp = "denied"
except OSError as e: udp = "error:%s" % e
print("tcp=%s udp=%s" % (tcp, udp))
"#,
        timeout = IO_TIMEOUT.as_secs()
    );
    let out = ns.command("python3").args(["-c", &script]).output()?;
    let verdict = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok(Probe { verdict, listener })
}
