//! The namespace side: opens sockets inside the network namespace on the parent's request.
//!
//! [`serve`] reads [`Request`]s from the channel, creates each socket in the namespace it runs
//! in, starts its connect and passes it back at once with `SCM_RIGHTS`, then closes its own copy
//! (no descriptor growth however many connections are forwarded, rootlesskit#156). It never
//! waits for a TCP handshake: the parent does, in its event loop, so one slow or refused target
//! delays no other request. It copies no data.
//!
//! The parent opens one further channel per data-path worker ([`Kind::Channel`]); each is served
//! the same way on a thread of its own, until the parent closes it.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};

use socket2::{Domain, Socket, Type};

use crate::sys;
use crate::wire::{request_id, Kind, Reply, Request};

/// The most further channels served at once; the parent opens one per worker thread.
const CHANNELS_MAX: usize = 256;

/// Runs the namespace side on `channel` until the parent end closes.
///
/// Blocks the calling thread, which must be inside the target network namespace. Requests are
/// answered in order; a malformed one is answered with `EINVAL` when its id can be read and
/// skipped otherwise.
///
/// # Errors
/// A failure to receive from or send on the channel other than the parent going away; on a
/// clean end of file (the parent dropped or shut down its driver) this returns `Ok(())`.
pub fn serve(channel: OwnedFd) -> io::Result<()> {
    let channel = Socket::from(channel);
    channel.set_nonblocking(false)?;
    let mut buf = [0u8; 64];
    loop {
        let msg = match sys::recv_with_fds(channel.as_fd(), &mut buf) {
            Ok(msg) => msg,
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => return Ok(()),
            Err(e) => return Err(e),
        };
        if msg.len == 0 && msg.fds.is_empty() {
            tracing::debug!("helper channel closed by the parent");
            return Ok(());
        }
        let kind = Request::decode(&buf[..msg.len]).map(|r| r.kind);
        if kind == Some(Kind::Channel) {
            // Gets no reply, well-formed or not: nothing waits for one.
            if let Some(channel) = channel_end(msg.truncated, msg.fds) {
                spawn_serve(channel);
            }
            continue;
        }
        // Only a channel request carries a descriptor; any others are closed here.
        drop(msg.fds);

        let reply = answer(&buf[..msg.len], msg.truncated);
        let Some((reply, fd)) = reply else { continue };
        let mut sent = sys::send_with_fd(
            channel.as_fd(),
            &reply.encode(),
            fd.as_ref().map(|fd| fd.as_fd()),
        );
        if let (Err(e), Some(errno)) = (&sent, refused_descriptor(&sent, fd.is_some())) {
            // The socket could not travel, but the channel is fine: this one request fails
            // (its client is closed) and the next ones go on.
            tracing::debug!(id = reply.id, error = %e, "cannot pass the socket, failing the request");
            let failed = Reply {
                id: reply.id,
                errno,
            };
            sent = sys::send_with_fd(channel.as_fd(), &failed.encode(), None);
        }
        match sent {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)) => {
                return Ok(())
            }
            Err(e) => return Err(e),
        }
        // `fd` drops here: the parent holds the only copy from now on.
    }
}

/// The errno to report when a reply failed only because of the descriptor it carried: too
/// many descriptors in flight for this process's open-files limit (`ETOOMANYREFS`, when the
/// parent is slow to take them) or a passing shortage of kernel memory.
fn refused_descriptor(sent: &io::Result<()>, had_fd: bool) -> Option<i32> {
    let errno = sent.as_ref().err()?.raw_os_error()?;
    (had_fd && matches!(errno, libc::ETOOMANYREFS | libc::ENOBUFS | libc::ENOMEM)).then_some(errno)
}

/// The channel end attached to a [`Kind::Channel`] request: exactly one unix `SOCK_SEQPACKET`
/// socket, or nothing.
fn channel_end(truncated: bool, mut fds: Vec<OwnedFd>) -> Option<OwnedFd> {
    let fd = fds.pop().filter(|fd| {
        !truncated && fds.is_empty() && sys::is_socket_of(fd.as_fd(), Domain::UNIX, Type::SEQPACKET)
    });
    if fd.is_none() {
        tracing::debug!("channel request without a usable channel");
    }
    fd
}

/// Serves `channel` on a new thread, within [`CHANNELS_MAX`].
fn spawn_serve(channel: OwnedFd) {
    static SERVING: AtomicUsize = AtomicUsize::new(0);
    if SERVING.fetch_add(1, Ordering::Relaxed) >= CHANNELS_MAX {
        SERVING.fetch_sub(1, Ordering::Relaxed);
        return tracing::debug!("too many helper channels, closing a new one");
    }
    let spawned = std::thread::Builder::new()
        .name("rkport-helper".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            if let Err(e) = serve(channel) {
                tracing::debug!(error = %e, "helper channel failed");
            }
            SERVING.fetch_sub(1, Ordering::Relaxed);
        });
    if let Err(e) = spawned {
        SERVING.fetch_sub(1, Ordering::Relaxed);
        tracing::debug!(error = %e, "cannot serve a further helper channel");
    }
}

/// Handles one message: the reply to send and the descriptor to attach, or nothing for a
/// message too short to carry an id.
fn answer(msg: &[u8], truncated: bool) -> Option<(Reply, Option<OwnedFd>)> {
    let req = if truncated {
        None
    } else {
        Request::decode(msg)
    };
    let Some(req) = req else {
        let id = request_id(msg)?;
        tracing::debug!(id, len = msg.len(), "malformed request from the parent");
        return Some((
            Reply {
                id,
                errno: libc::EINVAL,
            },
            None,
        ));
    };

    match open(&req) {
        Ok(fd) => Some((
            Reply {
                id: req.id,
                errno: 0,
            },
            Some(fd),
        )),
        Err(e) => {
            tracing::debug!(id = req.id, target = %req.target, error = %e, "cannot open socket inside");
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            Some((Reply { id: req.id, errno }, None))
        }
    }
}

/// Creates the requested socket: TCP with its connect in progress, UDP connected, or a spare
/// TCP socket not connected.
fn open(req: &Request) -> io::Result<OwnedFd> {
    let domain = Domain::for_address(req.target);
    let ty = match req.kind {
        Kind::Tcp | Kind::Spare => Type::STREAM,
        Kind::Udp => Type::DGRAM,
        Kind::Channel => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    let sock = Socket::new(domain, ty.nonblocking(), None)?;
    match req.kind {
        // Best effort: the forwarder works without it, only small writes may wait for an ack.
        Kind::Tcp | Kind::Spare => {
            let _ = sock.set_tcp_nodelay(true);
        }
        Kind::Udp => sys::grow_socket_buffers(&sock),
        Kind::Channel => {}
    }
    if req.kind == Kind::Spare {
        return Ok(sock.into());
    }
    match sock.connect(&req.target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(sock.into())
}
