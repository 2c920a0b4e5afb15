//! The builtin driver against a helper in a fresh user + network namespace.
//!
//! Each test starts its own namespace side (see `support`) and driver; nothing here needs
//! root. Time is never asserted on: timeouts only guard against hangs.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::FromRawFd;
use std::process::{Command, Stdio};
use std::thread;

use rkport_builtin::{channel, protos, BuiltinDriver, PortDriver, NAME};
use rkport_core::{PortError, PortSpec};
use support::*;

fn spec(s: &str) -> PortSpec {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn local(port: u16) -> SocketAddr {
    (Ipv4Addr::LOCALHOST, port).into()
}

/// Publishes `127.0.0.1:<free>:<child>/<proto>` and returns the host address.
fn publish(driver: &BuiltinDriver, child: u16, proto: &str) -> Result<SocketAddr> {
    let port = free_port()?;
    driver.add_port(&spec(&format!("127.0.0.1:{port}:{child}/{proto}")))?;
    Ok(local(port))
}

#[test]
#[ignore = "namespace side of the builtin tests, started by them"]
fn namespace_side() -> Result {
    if std::env::var_os(ENV).is_none() {
        eprintln!("namespace_side: not started by a test, nothing to do");
        return Ok(());
    }
    namespace_main()
}

#[test]
fn tcp_forward_64mib_checksummed() -> Result {
    let (ns, driver) = Ns::start()?;
    let addr = publish(&driver, ECHO, "tcp")?;
    const WORDS: usize = 8 * 1024 * 1024; // 64 MiB

    let s = connect(addr)?;
    let mut w = s.try_clone()?;
    let writer = thread::spawn(move || -> Result<u64> {
        let mut next = pattern(42);
        let mut sum = FNV_INIT;
        let mut chunk = Vec::with_capacity(64 * 1024);
        for _ in 0..WORDS / 8192 {
            chunk.clear();
            (0..8192).for_each(|_| chunk.extend_from_slice(&next().to_le_bytes()));
            sum = fnv(sum, &chunk);
            w.write_all(&chunk)?;
        }
        w.shutdown(Shutdown::Write)?;
        Ok(sum)
    });

    let (mut r, mut sum, mut total) = (s, FNV_INIT, 0usize);
    let mut buf = vec![0; 256 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sum = fnv(sum, &buf[..n]);
        total += n;
    }
    let sent = writer.join().expect("writer panicked")?;
    assert_eq!(total, WORDS * 8);
    assert_eq!(sum, sent, "checksum of echoed data");
    ns.finish(driver)
}

#[test]
fn half_close_propagates_both_ways() -> Result {
    let (mut ns, driver) = Ns::start()?;

    // Client half-closes; the server still answers everything, then closes.
    let echo = publish(&driver, ECHO, "tcp")?;
    assert_eq!(
        request(echo, b"ping after half-close")?,
        b"ping after half-close"
    );

    // Server half-closes; the client reads end of file and can still send.
    let rev = publish(&driver, REV, "tcp")?;
    let mut s = connect(rev)?;
    let mut got = Vec::new();
    s.read_to_end(&mut got)?;
    assert_eq!(got, b"greeting");
    s.write_all(b"late data from the client")?;
    s.shutdown(Shutdown::Write)?;
    let query = publish(&driver, REV_QUERY, "tcp")?;
    assert_eq!(
        request(query, b"")?,
        b"25",
        "bytes the server read after its SHUT_WR"
    );

    assert_eq!(ns.ask("ping")?, "pong");
    ns.finish(driver)
}

#[test]
fn nothing_listening_inside_closes_promptly_and_recovers() -> Result {
    let (mut ns, driver) = Ns::start()?;
    let addr = publish(&driver, LATE, "tcp")?;

    for _ in 0..3 {
        let mut s = connect(addr)?;
        let mut buf = [0; 16];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("expected end of file or reset, got {other:?}"),
        }
    }
    assert_eq!(ns.ask("late-tcp")?, "ok");
    for _ in 0..2 {
        assert_eq!(request(addr, b"now it works")?, b"now it works");
    }
    assert_eq!(driver.list_ports()?.len(), 1);
    ns.finish(driver)
}

#[test]
fn loopback_parent_ip_is_dialled_inside() -> Result {
    // C04: a server bound to 127.0.0.2 only, published on 127.0.0.2.
    let (ns, driver) = Ns::start()?;
    let port = free_port()?;
    driver.add_port(&spec(&format!("127.0.0.2:{port}:{C04}/tcp")))?;
    assert_eq!(request((Ipv4Addr::new(127, 0, 0, 2), port), b"")?, b"c04");

    // An explicit child IP wins over the parent IP.
    let port = free_port()?;
    driver.add_port(&spec(&format!("127.0.0.2:{port}:127.0.0.1:{ECHO}/tcp")))?;
    assert_eq!(request((Ipv4Addr::new(127, 0, 0, 2), port), b"x")?, b"x");
    ns.finish(driver)
}

#[test]
fn remove_port_frees_the_address_and_closes_connections() -> Result {
    let (ns, driver) = Ns::start()?;
    let port = free_port()?;
    let tcp = driver.add_port(&spec(&format!("127.0.0.1:{port}:{ECHO}/tcp")))?;
    let udp = driver.add_port(&spec(&format!("127.0.0.1:{port}:{UDP_ECHO}/udp")))?;

    let mut held = connect(local(port))?;
    held.write_all(b"hold")?;
    let mut buf = [0; 4];
    held.read_exact(&mut buf)?;
    let client = udp_client()?;
    assert_eq!(udp_round(&client, local(port), b"u")?, b"u");

    driver.remove_port(tcp.id)?;
    driver.remove_port(udp.id)?;
    match held.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("held connection should be closed, got {other:?}"),
    }
    drop(TcpListener::bind(local(port))?); // std sets SO_REUSEADDR
    drop(UdpSocket::bind(local(port))?);

    let err = driver.remove_port(tcp.id).unwrap_err();
    assert_eq!(err.to_string(), format!("unknown id: {}", tcp.id));
    let again = driver.add_port(&spec(&format!("127.0.0.1:{port}:{ECHO}/tcp")))?;
    assert!(again.id > udp.id, "ids are not reused");
    assert_eq!(request(local(port), b"re-added")?, b"re-added");
    ns.finish(driver)
}

#[test]
fn table_errors_and_listing() -> Result {
    let (ns, driver) = Ns::start()?;
    let info = driver.info()?;
    assert_eq!((info.driver.as_str(), info.protos), (NAME, protos()));

    let port = free_port()?;
    let first = driver.add_port(&spec(&format!("127.0.0.1:{port}:{ECHO}/tcp")))?;
    let err = driver
        .add_port(&spec(&format!(":{port}:{ECHO}/tcp")))
        .unwrap_err();
    assert_eq!(err.to_string(), format!("conflict with ID {}", first.id));

    let err = driver
        .add_port(&spec(&format!("127.0.0.1:{port}:80/sctp")))
        .unwrap_err();
    assert!(matches!(err, PortError::UnsupportedProto { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "protocol sctp is not supported by port driver builtin"
    );

    let busy = TcpListener::bind(local(0))?;
    let busy_port = busy.local_addr()?.port();
    let err = driver
        .add_port(&spec(&format!("127.0.0.1:{busy_port}:{ECHO}/tcp")))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "failed to listen on 127.0.0.1:{busy_port}/tcp: Address already in use (os error 98)"
        )
    );

    let second = driver.add_port(&spec(&format!("127.0.0.1:{port}:{UDP_ECHO}/udp")))?;
    let ids: Vec<_> = driver.list_ports()?.iter().map(|p| p.id).collect();
    assert_eq!(ids, [first.id, second.id], "no id consumed by failed adds");
    ns.finish(driver)
}

#[test]
fn helper_descriptors_do_not_grow() -> Result {
    // C02: the helper closes its copy of every socket it passes.
    let (ns, driver) = Ns::start()?;
    let addr = publish(&driver, ECHO, "tcp")?;
    // Counted after a first connection: by then the helper serves the channels every worker
    // opened at start (a descriptor and a thread each), which it may not have had yet before.
    assert_eq!(request(addr, b"first")?, b"first");
    let before = ns.fd_count()?;
    for i in 0..300 {
        let msg = format!("connection {i}");
        assert_eq!(request(addr, msg.as_bytes())?, msg.as_bytes());
    }
    // The helper closes its copy just after sending it, which may still be under way for the
    // last connection; a leak would keep the count above `before` for good.
    wait_until(
        "namespace-side descriptors to return to their count",
        || Ok(ns.fd_count()? <= before),
    )?;
    ns.finish(driver)
}

#[test]
fn concurrent_tcp_connections() -> Result {
    let (ns, driver) = Ns::start()?;
    let addr = publish(&driver, ECHO, "tcp4")?;
    let clients: Vec<_> = (0..16)
        .map(|c| {
            thread::spawn(move || -> Result {
                for i in 0..20 {
                    let msg = format!("client {c} message {i}").repeat(100);
                    assert_eq!(request(addr, msg.as_bytes())?, msg.as_bytes());
                }
                Ok(())
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client panicked")?;
    }
    ns.finish(driver)
}

#[test]
fn udp_echo_with_many_clients() -> Result {
    let (ns, driver) = Ns::start()?;
    let addr = publish(&driver, UDP_ECHO, "udp")?;
    let clients: Vec<_> = (0..8)
        .map(|c| {
            thread::spawn(move || -> Result {
                let s = udp_client()?;
                for i in 0..25 {
                    let msg = format!("client {c} datagram {i}");
                    assert_eq!(udp_round(&s, addr, msg.as_bytes())?, msg.as_bytes());
                }
                Ok(())
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client panicked")?;
    }
    ns.finish(driver)
}

/// A burst of datagrams from one client is taken in batches and sent on in as few sends as
/// the kernel allows (runs of equal sizes as one segmented send): every datagram must still
/// arrive whole, on its own, with its own bytes, whatever its size and neighbours.
#[test]
fn udp_burst_keeps_datagram_boundaries() -> Result {
    let (ns, driver) = Ns::start()?;
    let addr = publish(&driver, UDP_ECHO, "udp")?;
    let s = udp_client()?;
    socket2::SockRef::from(&s).set_recv_buffer_size(8 << 20)?;
    // Mostly runs of 1200 bytes, broken by odd sizes (shorter, longer, a few large ones, and
    // empty ones, which carry no index and are only counted).
    let empty = |i: usize| i % 50 == 12;
    let size = |i: usize| match i % 50 {
        12 => 0,
        49 => 8 + (i * 37) % 900,
        24 => 1500,
        37 if i % 200 == 37 => 40_000,
        _ => 1200,
    };
    let datagram = |i: usize| -> Vec<u8> {
        let mut next = pattern(i as u64);
        let mut d: Vec<u8> = (0..size(i)).map(|_| next() as u8).collect();
        if !d.is_empty() {
            d[..4].copy_from_slice(&(i as u32).to_be_bytes());
        }
        d
    };
    const COUNT: usize = 1000;
    // The first one opens the session; the rest go while the forwarder is busy with it.
    assert_eq!(udp_round(&s, addr, &datagram(0))?, datagram(0));
    for i in 1..COUNT {
        s.send_to(&datagram(i), addr)?;
    }
    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    let mut seen = vec![false; COUNT];
    let mut buf = vec![0u8; 65536];
    let mut got = 0;
    let mut empties = 0;
    while let Ok(n) = s.recv(&mut buf) {
        if n == 0 {
            empties += 1;
            continue;
        }
        let i = u32::from_be_bytes(buf[..4].try_into()?) as usize;
        assert!(
            i > 0 && i < COUNT,
            "datagram with unknown index {i} ({n} bytes)"
        );
        assert!(!seen[i], "datagram {i} arrived twice");
        assert_eq!(buf[..n], datagram(i)[..], "datagram {i} changed on the way");
        seen[i] = true;
        got += 1;
    }
    let sent_empty = (1..COUNT).filter(|&i| empty(i)).count();
    let sent = COUNT - 1 - sent_empty;
    eprintln!(
        "UDP burst: {got} of {sent} datagrams and {empties} of {sent_empty} empty ones came back"
    );
    // Buffers of megabytes on every socket hold the whole burst: losing most of it would be a
    // bug, not the network. Each empty datagram follows a run of equal ones, where a segmented
    // send would have swallowed it.
    assert!(got >= sent / 2, "only {got} of {sent} came back");
    assert!(
        empties >= sent_empty / 2,
        "only {empties} of {sent_empty} empty datagrams came back"
    );
    assert!(
        empties <= sent_empty,
        "{empties} empty datagrams came back, {sent_empty} sent"
    );
    ns.finish(driver)
}

#[test]
fn udp_session_survives_refusal_and_expires_when_idle() -> Result {
    let (mut ns, driver) = Ns::start()?;
    let driver = driver.with_udp_timeout(std::time::Duration::from_secs(1));

    // C11 (UDP): nothing listens yet; the ICMP refusal must not end the session.
    let late = publish(&driver, UDP_LATE, "udp4")?;
    let s = udp_client()?;
    s.send_to(b"early", late)?;
    // The helper answers in order: once a TCP connection made after the datagram works, the
    // session's inner socket exists and has sent "early" to the closed port.
    let echo = publish(&driver, ECHO, "tcp")?;
    assert_eq!(request(echo, b"sync")?, b"sync");
    assert_eq!(ns.ask("late-udp")?, "ok");
    let mut reply = udp_round(&s, late, b"again")?;
    if reply == b"early" {
        // The refusal had not arrived before the server started; "early" was served then.
        reply = udp_recv(&s)?;
    }
    assert_eq!(reply, b"again");
    assert_eq!(udp_round(&udp_client()?, late, b"fresh")?, b"fresh");

    // One session keeps its inner socket; after the idle timeout a new one is opened.
    let peer = publish(&driver, UDP_PEER, "udp")?;
    let first = udp_round(&s, peer, b"a")?;
    assert_eq!(
        udp_round(&s, peer, b"b")?,
        first,
        "same session, same inner socket"
    );
    thread::sleep(std::time::Duration::from_secs(3));
    assert_ne!(
        udp_round(&s, peer, b"c")?,
        first,
        "idle session should have been replaced"
    );
    ns.finish(driver)
}

#[test]
fn ipv6_and_mixed_families() -> Result {
    let (mut ns, driver) = Ns::start()?;
    let host_v6 = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok();
    if !host_v6 || ns.ask("v6")? != "yes" {
        eprintln!("SKIPPED ipv6_and_mixed_families: no ::1 on the host or in the namespace");
        return ns.finish(driver);
    }
    let v6 = |port| SocketAddr::from((Ipv6Addr::LOCALHOST, port));

    // [::1] parent IP: dialled as ::1 inside.
    let p = free_port()?;
    driver.add_port(&spec(&format!("[::1]:{p}:{ECHO6}/tcp6")))?;
    assert_eq!(request(v6(p), b"v6 to v6")?, b"v6 to v6");
    // v4 -> v6 and v6 -> v4.
    let p = free_port()?;
    driver.add_port(&spec(&format!("0.0.0.0:{p}:[::1]:{ECHO6}/tcp4")))?;
    assert_eq!(request(local(p), b"v4 to v6")?, b"v4 to v6");
    let p = free_port()?;
    driver.add_port(&spec(&format!("[::]:{p}:127.0.0.1:{ECHO}/tcp6")))?;
    assert_eq!(request(v6(p), b"v6 to v4")?, b"v6 to v4");
    // A dual-stack wildcard takes both families.
    let p = free_port()?;
    driver.add_port(&spec(&format!(":{p}:{ECHO}/tcp")))?;
    assert_eq!(request(local(p), b"dual v4")?, b"dual v4");
    assert_eq!(request(v6(p), b"dual v6")?, b"dual v6");
    ns.finish(driver)
}

#[test]
#[ignore = "user-namespace side of privileged_port_is_explained, started by it"]
fn privileged_side() -> Result {
    if std::env::var_os(ENV).is_none() {
        eprintln!("privileged_side: not started by a test, nothing to do");
        return Ok(());
    }
    let (parent_end, _helper_end) = channel()?;
    let driver = BuiltinDriver::new(parent_end)?;
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")?;
    let start = start.trim();
    for (spec_text, proto) in [
        ("127.0.0.1:80:80/tcp", "tcp"),
        ("127.0.0.1:53:53/udp", "udp"),
    ] {
        let err = driver.add_port(&spec(spec_text)).unwrap_err();
        let port = &spec_text[10..12];
        assert!(matches!(err, PortError::PrivilegedPort { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "cannot expose privileged port {port}, you can add \
                 'net.ipv4.ip_unprivileged_port_start={port}' to /etc/sysctl.conf (currently \
                 {start}), or set CAP_NET_BIND_SERVICE on the rootlesskit binary, or choose a \
                 larger port number (>= {start}): failed to listen on 127.0.0.1:{port}/{proto}: \
                 Permission denied (os error 13)"
            )
        );
    }
    assert!(driver.list_ports()?.is_empty());
    Ok(())
}

#[test]
fn privileged_port_is_explained() -> Result {
    // C10. A new user namespace has no CAP_NET_BIND_SERVICE in the host's network namespace,
    // so this runs the same as root and as an ordinary user.
    let start: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")?
        .trim()
        .parse()?;
    if start <= 80 {
        eprintln!("SKIPPED privileged_port_is_explained: ip_unprivileged_port_start is {start}");
        return Ok(());
    }
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args([
        "--exact",
        "privileged_side",
        "--include-ignored",
        "--nocapture",
    ])
    .env(ENV, "1")
    .stdout(Stdio::null());
    prepare_child(&mut cmd, libc::CLONE_NEWUSER, None);
    let status = cmd.status()?;
    assert!(status.success(), "privileged_side failed: {status}");
    Ok(())
}

#[test]
#[ignore = "descriptor-starved driver of accept_survives_descriptor_exhaustion, started by it"]
fn emfile_side() -> Result {
    let Ok(port) = std::env::var("RKPORT_BUILTIN_TEST_PORT") else {
        eprintln!("emfile_side: not started by a test, nothing to do");
        return Ok(());
    };
    init_tracing();
    // SAFETY: fd 3 was placed by the parent for this process alone (the channel's parent end).
    let channel = unsafe { std::os::fd::OwnedFd::from_raw_fd(3) };
    let driver = BuiltinDriver::new(channel)?;
    driver.add_port(&spec(&format!("127.0.0.1:{port}:{ECHO}/tcp")))?;

    // Room for a handful of forwarded connections per descriptor table only (the limit bounds
    // descriptor numbers in each table, and every worker has a table of its own).
    let open = std::fs::read_dir("/proc/self/fd")?.count() as u64;
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, open + 16, hard)?;
    println!("ready");
    std::io::stdout().flush()?;
    std::io::stdin().read_to_end(&mut Vec::new())?;
    assert_eq!(driver.list_ports()?.len(), 1);
    driver.shutdown();
    Ok(())
}

#[test]
fn accept_survives_descriptor_exhaustion() -> Result {
    // C12: the driver runs in its own process with a tiny descriptor limit.
    let (ns, parent_end) = Ns::start_raw()?;
    let port = free_port()?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["--exact", "emfile_side", "--include-ignored", "--nocapture"])
        .env("RKPORT_BUILTIN_TEST_PORT", port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let spare = channel()?.0; // fd 4 must be something; it is unused.
    prepare_child(&mut cmd, 0, Some((&parent_end, &spare)));
    let mut driver = KillOnDrop(cmd.spawn()?);
    drop((parent_end, spare));
    let out = std::io::BufReader::new(driver.0.stdout.take().ok_or("no stdout")?);
    let mut lines = std::io::BufRead::lines(out);
    for line in lines.by_ref() {
        if line? == "ready" {
            break;
        }
    }

    let addr = local(port);
    let pid = driver.0.id();
    let baseline = socket_count(pid, ns.pid())?; // no connection yet
    assert_eq!(request(addr, b"sanity")?, b"sanity");
    let held: Vec<_> = (0..60).map(|_| connect(addr)).collect::<Result<_>>()?;
    drop(held);
    let drained = wait_until("the spike to drain", || {
        Ok(accept_queue(port)? == 0 && socket_count(pid, ns.pid())? == baseline)
    });
    if let Err(e) = drained {
        let (queue, sockets) = (accept_queue(port)?, socket_count(pid, ns.pid())?);
        let fds = support::fd_targets(pid)?;
        return Err(format!(
            "{e}: accept queue {queue}, {sockets} sockets (baseline {baseline}): {fds:?}"
        )
        .into());
    }
    for i in 0..3 {
        let msg = format!("after the spike {i}");
        assert_eq!(request(addr, msg.as_bytes())?, msg.as_bytes());
    }

    drop(driver.0.stdin.take());
    lines.for_each(drop); // the rest of its test output
    assert!(driver.0.wait()?.success(), "emfile_side failed");
    ns.wait()
}

/// Ends a child process this test started if the test fails before waiting for it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
#[ignore = "benchmark; run: cargo test --release -p rkport-builtin --test namespace -- --ignored throughput --nocapture"]
fn throughput() -> Result {
    const TOTAL: usize = 4 << 30;
    let (ns, driver) = Ns::start()?;
    let forwarded = publish(&driver, DISCARD, "tcp")?;
    let direct = TcpListener::bind(local(0))?;
    let direct_addr = direct.local_addr()?;
    thread::spawn(move || direct.incoming().flatten().for_each(discard));

    for (name, addr) in [
        ("loopback, no forwarder", direct_addr),
        ("builtin forwarder", forwarded),
    ] {
        let mut s = connect(addr)?;
        let chunk = vec![0x5a; 1 << 20];
        let start = std::time::Instant::now();
        for _ in 0..TOTAL / chunk.len() {
            s.write_all(&chunk)?;
        }
        s.shutdown(Shutdown::Write)?;
        let mut count = String::new();
        s.read_to_string(&mut count)?;
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(count, TOTAL.to_string());
        println!(
            "{name}: {:.1} Gbit/s ({TOTAL} bytes in {secs:.2} s)",
            TOTAL as f64 * 8.0 / secs / 1e9
        );
    }
    ns.finish(driver)
}

/// Sockets passed over the channel count, while in flight, against the sending process's
/// open-files limit, and the helper never has the privilege to exceed it (`ETOOMANYREFS`).
/// When the parent is slow to take them, the requests past the limit fail one by one, each
/// with an error reply, and the channel goes on serving.
#[test]
fn helper_survives_too_many_sockets_in_flight() -> Result {
    use rkport_builtin::wire::{Kind, Reply, Request, REPLY_LEN};
    use std::os::fd::{AsRawFd, OwnedFd};

    let (mut ns, parent_end) = Ns::start_raw()?;
    assert_eq!(ns.ask("nofile 40")?, "ok");
    let channel = std::os::unix::net::UnixDatagram::from(parent_end.try_clone()?);
    channel.set_read_timeout(Some(HANG_GUARD))?;
    channel.set_write_timeout(Some(HANG_GUARD))?;
    // UDP sockets: unlike TCP ones, they take no descriptor from a server inside.
    let ask = |id: u64| {
        let target = local(UDP_ECHO);
        channel.send(
            &Request {
                id,
                kind: Kind::Udp,
                target,
            }
            .encode(),
        )
    };
    let take = || -> Result<(Reply, Option<OwnedFd>)> {
        let mut buf = [0u8; REPLY_LEN];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = nix::sys::socket::recvmsg::<()>(
            parent_end.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let fd = msg.cmsgs()?.find_map(|c| match c {
            nix::sys::socket::ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
            _ => None,
        });
        // SAFETY: received with this message, owned by nobody else.
        let fd = fd.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
        Ok((Reply::decode(&buf).ok_or("malformed reply")?, fd))
    };

    // Rounds of 200 requests before reading any reply: far more sockets than 40 can be in
    // flight. When the kernel counts them is up to its timing, so rounds go on until one had
    // refusals (most do within a few); every reply of every round must be well-formed.
    let mut next = 1;
    let (mut passed, mut refused) = (0, 0);
    for _round in 0..100 {
        let first = next;
        for id in first..first + 200 {
            ask(id)?;
        }
        next += 200;
        let mut held = Vec::new();
        for id in first..first + 200 {
            let (reply, fd) = take()?;
            assert_eq!(reply.id, id, "replies come in order, one per request");
            match (reply.errno, fd) {
                (0, Some(fd)) => held.push(fd),
                (libc::ETOOMANYREFS, None) => refused += 1,
                (errno, fd) => panic!("request {id}: errno {errno}, socket {fd:?}"),
            }
        }
        passed += held.len();
        if refused > 0 {
            break;
        }
    }
    eprintln!("in flight: {passed} sockets passed, {refused} refused");
    assert!(refused > 0, "the limit of 40 was never reached");

    // The channel still serves, now that the sockets have been taken.
    ask(next)?;
    let (reply, fd) = take()?;
    assert_eq!((reply.id, reply.errno), (next, 0));
    assert!(fd.is_some(), "a socket after the refusals");
    assert_eq!(ns.ask("ping")?, "pong");
    drop((channel, parent_end));
    ns.wait()
}

#[test]
fn udp_flood_leaves_room_for_port_changes() -> Result {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    // Datagrams arriving faster than the forwarder takes them must not keep its loop from
    // the driver's commands: it serves them between bounded rounds of batches.
    let (ns, driver) = Ns::start()?;
    let addr = publish(&driver, UDP_ECHO, "udp")?;
    let stop = Arc::new(AtomicBool::new(false));
    let flooders: Vec<_> = (0..4)
        .map(|_| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || -> Result<(u64, bool)> {
                let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
                s.set_nonblocking(true)?;
                let payload = [0x5a; 1200];
                let mut buf = [0u8; 2048];
                let end = Instant::now() + Duration::from_secs(20);
                let mut sent = 0;
                while !stop.load(Ordering::Relaxed) {
                    if Instant::now() > end {
                        return Ok((sent, true));
                    }
                    for _ in 0..64 {
                        if s.send_to(&payload, addr).is_ok() {
                            sent += 1;
                        }
                    }
                    while s.recv(&mut buf).is_ok() {}
                }
                Ok((sent, false))
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    for _ in 0..5 {
        let other = free_port()?;
        let status = driver.add_port(&spec(&format!("127.0.0.1:{other}:{UDP_ECHO}/udp")))?;
        driver.remove_port(status.id)?;
    }
    stop.store(true, Ordering::Relaxed);
    for flooder in flooders {
        let (sent, ended) = flooder.join().expect("flooder")?;
        assert!(sent > 0, "the flood sent nothing");
        assert!(!ended, "port changes waited 20 s, until the flood ended");
    }
    let client = udp_client()?;
    assert_eq!(
        udp_round(&client, addr, b"after the flood")?,
        b"after the flood"
    );
    ns.finish(driver)
}
