//! The checks of the suite, each on a live driver and namespace.

use std::io::{self, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::time::Duration;

use super::Namespace;
use crate::driver::PortDriver;
use crate::error::{PortError, SpecError};
use crate::proto::{Family, Proto, Transport};
use crate::spec::PortSpec;
use crate::status::PortStatus;

/// How long a single read may block before the check fails instead of hanging.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const BIG_TRANSFER: usize = 64 << 20;

pub(super) fn all(driver: &dyn PortDriver, ns: &mut Namespace) {
    let info = driver.info().expect("driver info");
    let protos: Vec<Proto> = info
        .protos
        .iter()
        .copied()
        .filter(|p| p.transport() != Transport::Sctp)
        .collect();
    assert!(
        !protos.is_empty(),
        "driver {} advertises no proto",
        info.driver
    );

    let mut child_port = 2000;
    // The first TCP proto and the port of one of its echo servers, for the big transfer.
    let mut tcp = None;
    for proto in &protos {
        eprintln!("conformance[{}]: {proto}", info.driver);
        child_port += 2;
        for port in [child_port, child_port + 1] {
            ns.listen(&proto.transport().to_string(), port)
                .unwrap_or_else(|e| panic!("echo server on {port}: {e}"));
        }
        two_ports_at_once(driver, *proto, child_port);
        if proto.transport() == Transport::Tcp && tcp.is_none() {
            tcp = Some((*proto, child_port + 1));
        }
    }

    if let Some((proto, port)) = tcp {
        eprintln!("conformance[{}]: 64 MiB over {proto}", info.driver);
        big_transfer(driver, proto, port);
    }
    let first = protos[0];
    eprintln!("conformance[{}]: conflicts with {first}", info.driver);
    conflict_refused(driver, first, child_port);
    assert_eq!(list(driver), vec![], "ports left after the suite");
}

/// Publishes two ports of `proto` and exchanges data over both concurrently.
fn two_ports_at_once(driver: &dyn PortDriver, proto: Proto, child_port: u16) {
    let specs = [child_port, child_port + 1].map(|c| spec_for(proto, c));
    let statuses: Vec<PortStatus> = specs.iter().map(|spec| add(driver, spec)).collect();
    let listed = list(driver);
    for status in &statuses {
        assert!(
            listed.contains(status),
            "{status:?} missing from {listed:?}"
        );
    }

    std::thread::scope(|s| {
        for (i, spec) in specs.iter().enumerate() {
            s.spawn(move || exchange(spec, i));
        }
    });

    for status in &statuses {
        driver
            .remove_port(status.id)
            .unwrap_or_else(|e| panic!("remove {}: {e}", status.id));
        address_free(&status.spec);
    }
    let listed = list(driver);
    for status in &statuses {
        assert!(!listed.contains(status), "removed {status:?} still listed");
    }
}

fn exchange(spec: &PortSpec, seed: usize) {
    let addr = host_addr(spec);
    match spec.proto.transport() {
        Transport::Tcp => {
            let payload = pattern(64 * 1024 + seed, seed as u64);
            let echoed = tcp_round_trip(addr, &payload)
                .unwrap_or_else(|e| panic!("tcp through {spec}: {e}"));
            assert!(
                echoed == payload,
                "tcp through {spec}: echo differs from what was sent"
            );
        }
        Transport::Udp => udp_round_trips(addr, spec, seed),
        Transport::Sctp => unreachable!("sctp is filtered out"),
    }
}

/// Sends `payload`, half-closes, and reads the echo until the server half-closes back.
///
/// The echo server inside replies with its half-close only after it saw ours, so a complete
/// echo followed by EOF proves half-close went both ways.
fn tcp_round_trip(addr: SocketAddr, payload: &[u8]) -> io::Result<Vec<u8>> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    std::thread::scope(|s| {
        let writer = s.spawn(|| -> io::Result<()> {
            (&stream).write_all(payload)?;
            stream.shutdown(Shutdown::Write)
        });
        let mut echoed = Vec::with_capacity(payload.len());
        let read = (&stream).read_to_end(&mut echoed);
        writer.join().expect("writer thread")?;
        read.map(|_| echoed)
    })
}

fn udp_round_trips(addr: SocketAddr, spec: &PortSpec, seed: usize) {
    let bind: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::LOCALHOST, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::LOCALHOST, 0).into(),
    };
    let socket = UdpSocket::bind(bind).expect("client udp socket");
    socket.connect(addr).expect("connect udp client");
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("udp timeout");
    for round in 0..5 {
        let msg = pattern(1000 + round, (seed * 100 + round) as u64);
        let mut buf = vec![0; 65536];
        // A datagram may be lost while the path inside warms up; retry before failing.
        let got = (0..10).find_map(|_| {
            socket.send(&msg).ok()?;
            socket.recv(&mut buf).ok()
        });
        let n = got.unwrap_or_else(|| panic!("udp through {spec}: no echo of datagram {round}"));
        assert!(
            buf[..n] == msg[..],
            "udp through {spec}: echo of {round} differs"
        );
    }
}

fn big_transfer(driver: &dyn PortDriver, proto: Proto, child_port: u16) {
    let spec = spec_for(proto, child_port);
    let status = add(driver, &spec);
    let payload = pattern(BIG_TRANSFER, 7);
    let echoed = tcp_round_trip(host_addr(&spec), &payload)
        .unwrap_or_else(|e| panic!("64 MiB through {spec}: {e}"));
    assert_eq!(echoed.len(), payload.len(), "64 MiB through {spec}: length");
    assert_eq!(
        checksum(&echoed),
        checksum(&payload),
        "64 MiB through {spec}: checksum"
    );
    driver
        .remove_port(status.id)
        .expect("remove after transfer");
}

fn conflict_refused(driver: &dyn PortDriver, proto: Proto, child_port: u16) {
    let spec = spec_for(proto, child_port);
    let status = add(driver, &spec);
    let again = PortSpec {
        child_port: child_port - 1,
        ..spec
    };
    match driver.add_port(&again) {
        Err(PortError::Spec(SpecError::Conflict(id))) => assert_eq!(id, status.id),
        other => panic!(
            "conflicting {again}: want conflict with ID {}, got {other:?}",
            status.id
        ),
    }
    let message = driver.add_port(&again).map(|_| ()).unwrap_err().to_string();
    assert_eq!(message, format!("conflict with ID {}", status.id));
    assert_eq!(
        list(driver),
        vec![status.clone()],
        "a refused add changed the list"
    );

    driver.remove_port(status.id).expect("remove");
    match driver.remove_port(status.id) {
        Err(PortError::UnknownId(id)) => assert_eq!(id, status.id),
        other => panic!(
            "second remove of {}: want unknown id, got {other:?}",
            status.id
        ),
    }
}

fn add(driver: &dyn PortDriver, spec: &PortSpec) -> PortStatus {
    let status = driver
        .add_port(spec)
        .unwrap_or_else(|e| panic!("add {spec}: {e}"));
    assert_eq!(&status.spec, spec, "add {spec}: status echoes another spec");
    status
}

fn list(driver: &dyn PortDriver) -> Vec<PortStatus> {
    driver.list_ports().expect("list ports")
}

/// A spec on a free loopback port of the proto's family, with no child IP.
fn spec_for(proto: Proto, child_port: u16) -> PortSpec {
    let ip: IpAddr = match proto.family() {
        Some(Family::V6) => Ipv6Addr::LOCALHOST.into(),
        _ => Ipv4Addr::LOCALHOST.into(),
    };
    PortSpec {
        parent_ip: Some(ip),
        child_ip: None,
        ..PortSpec::new(proto, free_port(ip, proto.transport()), child_port)
    }
}

fn host_addr(spec: &PortSpec) -> SocketAddr {
    let ip = spec.parent_ip.unwrap_or(Ipv4Addr::LOCALHOST.into());
    SocketAddr::new(ip, spec.parent_port)
}

fn free_port(ip: IpAddr, transport: Transport) -> u16 {
    let addr = SocketAddr::new(ip, 0);
    match transport {
        Transport::Udp => UdpSocket::bind(addr).and_then(|s| s.local_addr()),
        _ => TcpListener::bind(addr).and_then(|l| l.local_addr()),
    }
    .map(|a| a.port())
    .unwrap_or_else(|e| panic!("no free port on {ip}: {e}"))
}

/// A removed port's host address must be bindable at once (TCP with SO_REUSEADDR, as the
/// kernel keeps TIME-WAIT entries of the closed connections).
fn address_free(spec: &PortSpec) {
    let addr = host_addr(spec);
    let result = match spec.proto.transport() {
        Transport::Udp => UdpSocket::bind(addr).map(drop),
        _ => {
            let domain = socket2::Domain::for_address(addr);
            socket2::Socket::new(domain, socket2::Type::STREAM, None).and_then(|s| {
                s.set_reuse_address(true)?;
                s.bind(&addr.into())?;
                s.listen(1)
            })
        }
    };
    if let Err(e) = result {
        panic!("{addr} still taken after removing {spec}: {e}");
    }
}

/// Deterministic bytes that differ with `seed`.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// FNV-1a, enough to tell a corrupted or reordered stream from the original.
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
