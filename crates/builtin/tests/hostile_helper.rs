//! A misbehaving helper on the channel: the helper runs inside the namespace, next to the
//! contained (untrusted) program, so the parent must survive anything it sends.
//!
//! The fake helper here is a thread of this test on the helper end of [`channel()`] and on the
//! further channels the driver opens through it (one per worker; each is flooded with
//! unsolicited messages first). For each request it follows the behaviour the test queued for
//! it: garbage, replies to ids that were
//! never asked, a pipe, a listening socket, a socket of the wrong type or domain, too many
//! descriptors, an errno with a descriptor attached, duplicates, silence; and at the end it
//! closes the channel. Every client must either work (when a correct reply eventually came) or
//! be closed promptly, every driver call must return, descriptors sent by the helper must not
//! pile up in the parent, and `shutdown` must return.
//!
//! Everything runs in the host's network namespace on loopback; no privilege is needed. The
//! whole test is one function because it counts this process's descriptors.

mod support;

use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use rkport_builtin::wire::{Kind, Reply, Request, REQUEST_LEN};
use rkport_builtin::{channel, BuiltinDriver, PortDriver};
use rkport_core::PortSpec;
use socket2::{Domain, Socket, Type};
use support::{connect, fd_targets, free_port, init_tracing, wait_until, Result};

/// What the fake helper does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Misbehave {
    /// Garbage and an unknown-id reply with a socket first, then a correct reply.
    GarbageThenGood,
    /// A reply to an id never asked (with a socket), then `ECONNREFUSED` for the real one.
    WrongIdThenRefused,
    /// Success with a pipe instead of a socket.
    Pipe,
    /// Success with a listening TCP socket.
    Listening,
    /// Success with a UDP socket for a TCP request (and a TCP one for a UDP request).
    WrongType,
    /// Success with a unix stream socket.
    WrongDomain,
    /// Success with two good sockets.
    TwoFds,
    /// Success with 200 descriptors (more than the parent takes: truncated).
    ManyFds,
    /// An errno with a good socket attached.
    ErrnoWithFd,
    /// A correct reply, then another for the same id with another socket.
    Duplicate,
    /// Success with a good socket left blocking (no `O_NONBLOCK`).
    Blocking,
    /// Success with a good socket, of which the helper keeps a copy and, 300 ms later, clears
    /// `O_NONBLOCK` on it (a flag the copies share), holding it for 10 s more.
    BlockingLater,
    /// No answer at all.
    Silence,
}

/// Whether the client of a request with this behaviour is served.
fn served(b: Misbehave) -> bool {
    matches!(
        b,
        Misbehave::GarbageThenGood | Misbehave::Duplicate | Misbehave::Blocking
    )
}

fn spec(s: &str) -> PortSpec {
    s.parse().expect("valid spec")
}

fn echo_server() -> Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut r = s.try_clone().expect("clone");
                let _ = std::io::copy(&mut r, &mut s);
            });
        }
    });
    Ok(addr)
}

/// A socket of `domain`/`ty`; TCP ones start connecting to `echo`, UDP ones connect to it.
fn sock(domain: Domain, ty: Type, echo: SocketAddr) -> OwnedFd {
    let s = Socket::new(domain, ty.nonblocking(), None).expect("socket");
    if domain == Domain::IPV4 {
        match s.connect(&echo.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => panic!("connect: {e}"),
        }
    }
    s.into()
}

fn good(kind: Kind, echo: SocketAddr) -> OwnedFd {
    match kind {
        Kind::Udp => sock(Domain::IPV4, Type::DGRAM, echo),
        Kind::Tcp | Kind::Channel | Kind::Spare => sock(Domain::IPV4, Type::STREAM, echo),
    }
}

/// Sends `data` with `fds` attached; a parent that has gone is not an error here.
fn send(chan: &OwnedFd, data: &[u8], fds: &[RawFd]) {
    let cmsgs = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsgs };
    let iov = [IoSlice::new(data)];
    let _ = sendmsg::<()>(chan.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None);
}

fn reply(chan: &OwnedFd, id: u64, errno: i32, fds: &[RawFd]) {
    send(chan, &Reply { id, errno }.encode(), fds);
}

/// Carries out `b` for `req`.
fn act(chan: &OwnedFd, req: &Request, b: Misbehave, echo: SocketAddr) {
    let raw = |fds: &[OwnedFd]| fds.iter().map(AsRawFd::as_raw_fd).collect::<Vec<_>>();
    let wrong_type = match req.kind {
        Kind::Udp => sock(Domain::IPV4, Type::STREAM, echo),
        Kind::Tcp | Kind::Channel | Kind::Spare => sock(Domain::IPV4, Type::DGRAM, echo),
    };
    match b {
        Misbehave::GarbageThenGood => {
            send(chan, b"garbage", &[]);
            send(chan, &[0xff; 100], &[]);
            let stray = good(req.kind, echo);
            reply(chan, req.id + 1_000_000, 0, &raw(&[stray]));
            reply(chan, req.id, 0, &raw(&[good(req.kind, echo)]));
        }
        Misbehave::WrongIdThenRefused => {
            reply(chan, req.id + 1, 0, &raw(&[good(req.kind, echo)]));
            reply(chan, req.id, libc::ECONNREFUSED, &[]);
        }
        Misbehave::Pipe => {
            let (r, _w) = nix::unistd::pipe().expect("pipe");
            reply(chan, req.id, 0, &raw(&[r]));
        }
        Misbehave::Listening => {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listener");
            reply(chan, req.id, 0, &[l.as_raw_fd()]);
        }
        Misbehave::WrongType => reply(chan, req.id, 0, &raw(&[wrong_type])),
        Misbehave::WrongDomain => {
            let (a, _b) = UnixStream::pair().expect("pair");
            reply(chan, req.id, 0, &[a.as_raw_fd()]);
        }
        Misbehave::TwoFds => {
            let two = [good(req.kind, echo), good(req.kind, echo)];
            reply(chan, req.id, 0, &raw(&two));
        }
        Misbehave::ManyFds => {
            let many: Vec<OwnedFd> = (0..200).map(|_| good(req.kind, echo)).collect();
            reply(chan, req.id, 0, &raw(&many));
        }
        Misbehave::ErrnoWithFd => {
            reply(
                chan,
                req.id,
                libc::ECONNREFUSED,
                &raw(&[good(req.kind, echo)]),
            );
        }
        Misbehave::Duplicate => {
            reply(chan, req.id, 0, &raw(&[good(req.kind, echo)]));
            reply(chan, req.id, 0, &raw(&[good(req.kind, echo)]));
        }
        Misbehave::Blocking => {
            // A spare is not connected yet; the others are, as the helper would leave them.
            let s = match req.kind {
                Kind::Spare => Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket"),
                _ => Socket::from(good(req.kind, echo)),
            };
            s.set_nonblocking(false).expect("blocking");
            reply(chan, req.id, 0, &[s.as_raw_fd()]);
        }
        Misbehave::BlockingLater => {
            let s = Socket::from(good(req.kind, echo));
            let copy = s.try_clone().expect("dup");
            reply(chan, req.id, 0, &[s.as_raw_fd()]);
            drop(s);
            thread::spawn(move || {
                thread::sleep(std::time::Duration::from_millis(300));
                copy.set_nonblocking(false).expect("blocking");
                thread::sleep(std::time::Duration::from_secs(10));
            });
        }
        Misbehave::Silence => {}
    }
}

/// Sends 500 unsolicited messages carrying pipes on `chan`.
fn flood(chan: &OwnedFd) {
    for i in 0..500u64 {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let id = u64::MAX - i; // never a request id
        send(
            chan,
            &Reply { id, errno: 0 }.encode(),
            &[r.as_raw_fd(), w.as_raw_fd()],
        );
    }
}

/// The next request on any of `chans`, with the index of its channel; channel requests are
/// taken care of on the way (the channel joins `chans`, flooded). `None` once the first channel
/// has closed.
fn next_request(chans: &mut Vec<OwnedFd>) -> Option<(usize, Request)> {
    loop {
        let mut polled: Vec<PollFd> = chans
            .iter()
            .map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN))
            .collect();
        poll(&mut polled, PollTimeout::NONE).expect("poll");
        let ready: Vec<usize> = polled
            .iter()
            .enumerate()
            .filter(|(_, p)| p.revents().is_some_and(|r| !r.is_empty()))
            .map(|(i, _)| i)
            .collect();
        drop(polled);
        for i in ready {
            let mut buf = [0u8; 64];
            let mut space = nix::cmsg_space!([RawFd; 4]);
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<()>(
                chans[i].as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::empty(),
            );
            let Ok(msg) = msg else { return None };
            let fds: Vec<OwnedFd> = msg
                .cmsgs()
                .into_iter()
                .flatten()
                .flat_map(|c| match c {
                    ControlMessageOwned::ScmRights(fds) => fds,
                    _ => Vec::new(),
                })
                // SAFETY: the kernel has just installed these descriptors for this message.
                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
                .collect();
            let n = msg.bytes;
            if n == 0 {
                if i == 0 {
                    return None;
                }
                chans.remove(i);
                break; // indices have moved; poll again
            }
            assert_eq!(
                n, REQUEST_LEN,
                "the parent sent a request of the wrong size"
            );
            let req = Request::decode(&buf[..n]).expect("the parent's request decodes");
            if req.kind == Kind::Channel {
                let [chan]: [OwnedFd; 1] = fds.try_into().expect("one channel end");
                flood(&chan);
                chans.push(chan);
                continue;
            }
            assert!(fds.is_empty(), "a socket request came with descriptors");
            return Some((i, req));
        }
    }
}

/// How the fake helper answers spare-socket requests, and where socket requests take their
/// behaviour from: [`STRICT`], [`FREE`], or `FIRST_SPARE_MODE + i` for `SPARE_MODES[i]`.
static SPARE_MODE: AtomicUsize = AtomicUsize::new(STRICT);
/// Spare requests are refused; each socket request waits for its behaviour in the plan.
const STRICT: usize = 0;
/// Spare requests are refused; a socket request with no behaviour planned is served well.
const FREE: usize = 1;
const FIRST_SPARE_MODE: usize = 2;
/// What spare requests get in turn; `None` is a real spare (a TCP socket not connected).
const SPARE_MODES: [Option<Misbehave>; 11] = [
    Some(Misbehave::Pipe),
    Some(Misbehave::Listening),
    Some(Misbehave::WrongType),
    Some(Misbehave::WrongDomain),
    Some(Misbehave::TwoFds),
    Some(Misbehave::ManyFds),
    Some(Misbehave::ErrnoWithFd),
    Some(Misbehave::GarbageThenGood),
    Some(Misbehave::Duplicate),
    Some(Misbehave::Blocking),
    None,
];

/// Answers a spare-socket request as [`SPARE_MODE`] says.
fn act_spare(chan: &OwnedFd, req: &Request, echo: SocketAddr) {
    match SPARE_MODE.load(Ordering::SeqCst) {
        STRICT | FREE => reply(chan, req.id, libc::ENOMEM, &[]),
        mode => match SPARE_MODES[mode - FIRST_SPARE_MODE] {
            Some(b) => act(chan, req, b, echo),
            None => {
                let spare =
                    Socket::new(Domain::IPV4, Type::STREAM.nonblocking(), None).expect("socket");
                reply(chan, req.id, 0, &[spare.as_raw_fd()]);
            }
        },
    }
}

/// The fake helper: before any request, floods the parent with unsolicited messages carrying
/// pipes; then answers spare requests as [`SPARE_MODE`] says and every other request as `plan`
/// says (or well, when nothing is planned outside [`STRICT`] mode), reporting its kind on
/// `seen`; returns (closing all its channels) when a request finds `plan` closed.
fn fake_helper(chan: OwnedFd, plan: Receiver<Misbehave>, seen: Sender<Kind>, echo: SocketAddr) {
    flood(&chan);
    let mut chans = vec![chan];
    loop {
        let Some((i, req)) = next_request(&mut chans) else {
            return;
        };
        if req.kind == Kind::Spare {
            act_spare(&chans[i], &req, echo);
            continue;
        }
        let b = match SPARE_MODE.load(Ordering::SeqCst) {
            STRICT => plan.recv().ok(),
            _ => match plan.try_recv() {
                Ok(b) => Some(b),
                Err(mpsc::TryRecvError::Empty) => Some(Misbehave::GarbageThenGood),
                Err(mpsc::TryRecvError::Disconnected) => None,
            },
        };
        let Some(b) = b else { return };
        act(&chans[i], &req, b, echo);
        let _ = seen.send(req.kind);
    }
}

/// Checks that `client` is either served (its message echoed) or closed promptly; true when
/// it was served.
fn served_or_closed(client: &mut TcpStream, what: &str) -> bool {
    let _ = client.write_all(what.as_bytes());
    let _ = client.shutdown(Shutdown::Write);
    let mut back = Vec::new();
    match client.read_to_end(&mut back) {
        Ok(_) => {
            assert!(
                back.is_empty() || back == what.as_bytes(),
                "{what}: got {back:?}"
            );
            !back.is_empty()
        }
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{what}: {e}");
            false
        }
    }
}

/// Empty pipes each worker may keep for reuse (the driver's pool bound), as a margin for pipes.
const POOL_MARGIN: usize = 16;

/// Descriptors open in this process, in all its tables: (pipes, everything else).
fn fd_count() -> (usize, usize) {
    let targets = fd_targets(std::process::id()).unwrap_or_default();
    let pipes = targets.iter().filter(|t| t.starts_with("pipe:")).count();
    (pipes, targets.len() - pipes)
}

/// What this process's descriptors are, for a failure message.
fn fd_list() -> String {
    let targets = fd_targets(std::process::id()).unwrap_or_default();
    format!("{}: {targets:?}", targets.len())
}

/// Whether a read on `client` ends (end of file or reset) rather than hanging; panics on a
/// timeout of the hang guard.
fn closed_promptly(client: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 16];
    match client.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("{what}: read {n} bytes from a connection that has no inner side"),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: expected end of file or reset, got {e}"),
    }
}

fn echoes(client: &mut TcpStream, what: &str) -> Result {
    client.write_all(what.as_bytes())?;
    client.shutdown(Shutdown::Write)?;
    let mut back = String::new();
    client.read_to_string(&mut back)?;
    assert_eq!(back, what);
    Ok(())
}

#[test]
fn misbehaving_helper_cannot_crash_or_hang_the_parent() -> Result {
    init_tracing();
    // A worker left waiting would hang this test past its failure too (the driver's shutdown
    // waits for its workers): end the process with a message instead.
    thread::spawn(|| {
        thread::sleep(std::time::Duration::from_secs(180));
        // Straight to stderr: the test harness captures `eprintln!`, and aborting loses it.
        let _ = writeln!(
            io::stderr(),
            "misbehaving_helper_cannot_crash_or_hang_the_parent: still running after 180 s, a worker hangs"
        );
        std::process::abort();
    });
    let echo = echo_server()?;
    let (parent_end, helper_end) = channel()?;
    let (plan, plan_rx) = mpsc::channel();
    let (seen_tx, seen) = mpsc::channel();
    let helper = thread::spawn(move || fake_helper(helper_end, plan_rx, seen_tx, echo));
    let driver = BuiltinDriver::new(parent_end)?;
    let port = free_port()?;
    driver.add_port(&spec(&format!("127.0.0.1:{port}:9/tcp")))?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));

    // Correct exchanges first, one per data-path worker, which also wait out the unsolicited
    // floods.
    let workers = thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(2, 64);
    for i in 0..workers {
        plan.send(Misbehave::GarbageThenGood)?;
        echoes(&mut connect(addr)?, &format!("warm-up {i}"))?;
        seen.recv()?;
    }
    let baseline = fd_count();

    // Each behaviour twice, one client at a time so that requests and clients pair up.
    use Misbehave::*;
    let all = [
        GarbageThenGood,
        WrongIdThenRefused,
        Pipe,
        Listening,
        WrongType,
        WrongDomain,
        TwoFds,
        ManyFds,
        ErrnoWithFd,
        Duplicate,
        Blocking,
    ];
    for b in all.iter().chain(&all).copied() {
        plan.send(b)?;
        let mut client = connect(addr)?;
        let what = format!("{b:?}");
        if served(b) {
            echoes(&mut client, &what)?;
        } else {
            closed_promptly(&mut client, &what);
        }
        assert_eq!(seen.recv()?, Kind::Tcp);
    }

    // UDP: a wrong reply to a session request is dropped, the port stays.
    let udp_port = free_port()?;
    let udp = driver.add_port(&spec(&format!("127.0.0.1:{udp_port}:9/udp")))?;
    plan.send(WrongType)?;
    let client = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    client.send_to(b"datagram", (Ipv4Addr::LOCALHOST, udp_port))?;
    assert_eq!(seen.recv()?, Kind::Udp);
    driver.remove_port(udp.id)?;
    drop(client);

    // Spare sockets, asked for ahead of clients: whatever comes back, each client is served
    // or closed promptly. A failed spare request makes a worker rest before asking again.
    for (mode, answer) in SPARE_MODES.iter().enumerate() {
        SPARE_MODE.store(FIRST_SPARE_MODE + mode, Ordering::SeqCst);
        thread::sleep(std::time::Duration::from_millis(1100));
        for i in 0..20 {
            let what = format!("spare {answer:?} client {i}");
            served_or_closed(&mut connect(addr)?, &what);
        }
    }
    // Spares still held (real ones, or sockets that pass for them) are used up by clients,
    // several at a time so that every worker gets some.
    SPARE_MODE.store(FREE, Ordering::SeqCst);
    for round in 0..50 {
        if fd_count().1 <= baseline.1 {
            break;
        }
        let clients: Vec<_> = (0..2 * workers)
            .map(|t| {
                thread::spawn(move || {
                    for i in 0..8 {
                        let mut client = connect(addr).expect("connect");
                        served_or_closed(&mut client, &format!("draining {round}/{t}/{i}"));
                    }
                })
            })
            .collect();
        for c in clients {
            c.join().expect("draining client");
        }
    }
    SPARE_MODE.store(STRICT, Ordering::SeqCst);
    while seen.try_recv().is_ok() {}

    // Nothing the helper sent is left open in the parent.
    let settled = wait_until("descriptors sent by the helper to be closed", || {
        // Workers borrow pipes from pools that may have grown meanwhile (up to POOL_MARGIN ends
        // each); the helper's floods alone sent 1,000 pipe ends per channel.
        let (pipes, other) = fd_count();
        let pipe_margin = 2 * POOL_MARGIN * workers;
        Ok(other <= baseline.1 && pipes <= baseline.0 + pipe_margin)
    });
    assert!(
        settled.is_ok(),
        "{baseline:?} (pipes, other) before, now {}",
        fd_list()
    );

    // The helper makes a socket blocking after handing it over: the worker's next splice from
    // it would wait for ever, holding every connection of that worker. It is interrupted
    // instead, and only this client is closed.
    plan.send(BlockingLater)?;
    let mut client = connect(addr)?;
    let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    client.write_all(&chunk)?;
    let mut back = vec![0u8; chunk.len()];
    client.read_exact(&mut back)?;
    assert!(back == chunk, "echo before the socket became blocking");
    assert_eq!(seen.recv()?, Kind::Tcp);
    thread::sleep(std::time::Duration::from_millis(600));
    let _ = client.write_all(&chunk);
    let mut rest = Vec::new();
    if let Err(e) = client.read_to_end(&mut rest) {
        // A timeout here (the hang guard) means the worker was left waiting.
        assert_eq!(
            e.kind(),
            ErrorKind::ConnectionReset,
            "after the flag changed: {e}"
        );
    }
    assert!(rest.len() <= chunk.len(), "{} bytes came back", rest.len());
    // Every worker answers the driver again.
    let extra = driver.add_port(&spec(&format!("127.0.0.1:{}:9/tcp", free_port()?)))?;
    driver.remove_port(extra.id)?;

    // A request left unanswered, then the helper closes the channel.
    plan.send(Silence)?;
    let mut pending = connect(addr)?;
    assert_eq!(seen.recv()?, Kind::Tcp);
    drop(plan);
    // The next request finds the plan closed, and the helper closes its channels.
    let mut last = connect(addr)?;
    helper.join().expect("fake helper");
    closed_promptly(&mut pending, "pending when the channel closed");
    closed_promptly(&mut last, "asking when the channel closed");

    // Without a helper the driver still answers, clients are closed (a spare still held by a
    // worker that has not yet seen its channel close is connected to a port where nothing
    // listens, and closes its client too), ports come and go.
    for i in 0..2 * workers {
        let what = format!("after the channel closed {i}");
        assert!(
            !served_or_closed(&mut connect(addr)?, &what),
            "{what}: served"
        );
    }
    assert_eq!(driver.list_ports()?.len(), 1);
    let other = free_port()?;
    let status = driver.add_port(&spec(&format!("127.0.0.1:{other}:9/tcp")))?;
    closed_promptly(
        &mut connect((Ipv4Addr::LOCALHOST, other))?,
        "new port after the channel closed",
    );
    driver.remove_port(status.id)?;
    driver.shutdown();
    assert!(
        TcpStream::connect(addr).is_err(),
        "listener left after shutdown"
    );
    Ok(())
}
