//! UDP forwarding, served by the control loop.
//!
//! One host socket per port; one session per client address, each with its own UDP socket
//! connected to the target inside the namespace (asked of the helper on the client's first
//! datagram, which waits in a short backlog meanwhile). Datagrams are forwarded one to one,
//! never merged or split: they are read in batches (recvmmsg), and each run of one client's
//! datagrams goes on in as few sends as the kernel allows, equal-sized ones as a single
//! `UDP_SEGMENT` send that the kernel cuts back into the same datagrams, others by sendmmsg.
//! The batch buffers are returned to the system after a second without datagrams. Replies go
//! back from the host socket to the session's client. A session ends after
//! `udp_timeout` without traffic in either direction, when its port is removed, or when the
//! helper cannot open its socket (the next datagram tries again). `ECONNREFUSED` on an inner
//! socket (ICMP port unreachable: nothing listens inside yet) is ignored, so the session keeps
//! working once a server appears.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Interest, Token};
use nix::sys::socket::{recv, send, MsgFlags};
use rkport_core::PortId;

use super::{Control, Pending, Port, Source};
use crate::sys::{self, Datagrams, DATAGRAM_BATCH};
use crate::wire::Kind;

/// Batches a host socket's wake-up takes at most before the loop serves others (commands,
/// helper replies, other ports) and comes back.
const BATCHES_PER_WAKE: usize = 16;
/// The same bound, in datagrams, for one-at-a-time receives.
const DATAGRAMS_PER_WAKE: usize = BATCHES_PER_WAKE * DATAGRAM_BATCH;
/// Datagrams kept per session while its inner socket is being opened.
const BACKLOG_MAX: usize = 64;
/// Longest time between two sweeps for idle sessions.
const SWEEP_MAX: Duration = Duration::from_secs(1);
/// How long the batch buffers stay after the last datagram received.
const DATAGRAMS_KEPT: Duration = Duration::from_secs(1);
/// Consecutive receive errors tolerated in one readiness round.
const ERRORS_MAX: usize = 64;

#[derive(Debug)]
pub(super) struct UdpPort {
    socket: UdpSocket,
    target: SocketAddr,
    sessions: HashMap<SocketAddr, Session>,
    sweep_at: Instant,
}

#[derive(Debug)]
struct Session {
    /// The connected socket inside and its token; `None` while the helper is asked.
    inner: Option<(UdpSocket, Token)>,
    backlog: Vec<Box<[u8]>>,
    last: Instant,
    /// Whether runs of equal datagrams still go as one segmented send (`UDP_SEGMENT`).
    segment: bool,
}

impl Control {
    pub(super) fn add_udp(&mut self, id: PortId, mut socket: UdpSocket, target: SocketAddr) {
        let token = self.token(Source::UdpHost(id));
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut socket, token, Interest::READABLE)
        {
            tracing::debug!(port = id, error = %e, "cannot watch UDP socket");
        }
        let port = UdpPort {
            socket,
            target,
            sessions: HashMap::new(),
            sweep_at: Instant::now(),
        };
        self.ports.insert(id, Port::Udp(port));
    }

    pub(super) fn close_udp(&mut self, mut port: UdpPort) {
        let registry = self.poll.registry();
        let _ = registry.deregister(&mut port.socket);
        for (_, session) in port.sessions.drain() {
            if let Some((mut inner, _)) = session.inner {
                let _ = registry.deregister(&mut inner);
            }
        }
    }

    /// When the next idle sweep is due, if any session exists.
    pub(super) fn next_sweep(&self) -> Option<Instant> {
        self.ports
            .values()
            .filter_map(|p| match p {
                Port::Udp(p) if !p.sessions.is_empty() => Some(p.sweep_at),
                _ => None,
            })
            .min()
    }

    /// Ends the sessions idle for `udp_timeout` or more.
    pub(super) fn sweep(&mut self, now: Instant) {
        let timeout = self.udp_timeout;
        let interval = (timeout / 2).clamp(Duration::from_millis(10), SWEEP_MAX);
        let mut expired = Vec::new();
        for (&id, port) in &mut self.ports {
            let Port::Udp(port) = port;
            if now < port.sweep_at {
                continue;
            }
            port.sweep_at = now + interval;
            let idle = port
                .sessions
                .iter()
                .filter(|(_, s)| now - s.last >= timeout);
            expired.extend(idle.map(|(client, _)| (id, *client)));
        }
        for (id, client) in expired {
            tracing::trace!(port = id, %client, "UDP session idle, closing");
            self.end_session(id, client);
        }
    }

    fn end_session(&mut self, id: PortId, client: SocketAddr) {
        let Some(Port::Udp(port)) = self.ports.get_mut(&id) else {
            return;
        };
        let Some(session) = port.sessions.remove(&client) else {
            return;
        };
        if let Some((mut inner, token)) = session.inner {
            let _ = self.poll.registry().deregister(&mut inner);
            self.sources.remove(&token);
        }
    }

    /// Reads every waiting datagram of port `id`'s host socket, a batch per system call, and
    /// forwards them: each run of datagrams from one client goes to its session in as few
    /// sends as the kernel allows.
    ///
    /// True when it stopped at [`BATCHES_PER_WAKE`] with more perhaps waiting.
    pub(super) fn udp_host_ready(&mut self, id: PortId) -> bool {
        let mut batch = match self.datagrams.take() {
            Some(batch) => batch,
            None => match Datagrams::new() {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::debug!(port = id, error = %e, "no memory for a UDP batch, taking datagrams one at a time");
                    return self.udp_host_ready_one_by_one(id);
                }
            },
        };
        let mut errors = 0;
        let mut more = false;
        for round in 1.. {
            if errors >= ERRORS_MAX {
                break;
            }
            let Some(Port::Udp(port)) = self.ports.get(&id) else {
                break;
            };
            let n = match batch.recv(port.socket.as_fd()) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    tracing::trace!(port = id, error = %e, "UDP receive failed");
                    errors += 1;
                    continue;
                }
            };
            let now = Instant::now();
            let mut first = 0;
            while first < n {
                let client = batch.source(first);
                let end = (first + 1..n)
                    .find(|&i| batch.source(i) != client)
                    .unwrap_or(n);
                if let Some(client) = client {
                    let run: Vec<&[u8]> = (first..end).map(|i| batch.data(i)).collect();
                    self.udp_datagrams(id, client, &run, now);
                }
                first = end;
            }
            // A short batch emptied the queue; a datagram arriving since wakes the poll again.
            if n < DATAGRAM_BATCH {
                break;
            }
            if round == BATCHES_PER_WAKE {
                more = true;
                break;
            }
        }
        self.datagrams = Some(batch);
        self.datagrams_used = Instant::now();
        more
    }

    /// [`Control::udp_host_ready`] without batch buffers: one datagram per system call, into
    /// the shared buffer.
    fn udp_host_ready_one_by_one(&mut self, id: PortId) -> bool {
        let mut errors = 0;
        let mut more = true;
        let mut buf = std::mem::take(&mut self.buf);
        for _ in 0..DATAGRAMS_PER_WAKE {
            let Some(Port::Udp(port)) = self.ports.get(&id).filter(|_| errors < ERRORS_MAX) else {
                more = false;
                break;
            };
            match port.socket.recv_from(&mut buf) {
                Ok((n, client)) => self.udp_datagrams(id, client, &[&buf[..n]], Instant::now()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    more = false;
                    break;
                }
                Err(e) => {
                    tracing::trace!(port = id, error = %e, "UDP receive failed");
                    errors += 1;
                }
            }
        }
        self.buf = buf;
        more
    }

    /// Forwards `datagrams` from `client` through its session, opening one if needed.
    fn udp_datagrams(&mut self, id: PortId, client: SocketAddr, datagrams: &[&[u8]], now: Instant) {
        let expired = match self.ports.get(&id) {
            Some(Port::Udp(port)) => port
                .sessions
                .get(&client)
                .is_some_and(|s| now - s.last >= self.udp_timeout),
            _ => return,
        };
        if expired {
            self.end_session(id, client);
        }

        let Some(Port::Udp(port)) = self.ports.get_mut(&id) else {
            return;
        };
        if let Some(session) = port.sessions.get_mut(&client) {
            session.last = now;
            match &session.inner {
                // ECONNREFUSED from an earlier datagram and a full buffer both drop these.
                Some((inner, _)) => {
                    sys::send_datagrams(inner.as_fd(), datagrams, &mut session.segment);
                }
                None => {
                    let room = BACKLOG_MAX.saturating_sub(session.backlog.len());
                    let kept = datagrams.iter().take(room).map(|d| Box::from(*d));
                    session.backlog.extend(kept);
                }
            }
            return;
        }

        let session = Session {
            inner: None,
            backlog: datagrams
                .iter()
                .take(BACKLOG_MAX)
                .map(|d| Box::from(*d))
                .collect(),
            last: now,
            segment: true,
        };
        port.sessions.insert(client, session);
        let target = port.target;
        let pending = Pending::Udp {
            port: id,
            client,
            target,
        };
        self.request(Kind::Udp, target, pending);
    }

    /// Gives the batch buffers back to the system once UDP has been quiet for a while.
    pub(super) fn release_datagrams(&mut self, now: Instant) {
        if self.datagrams.is_some() && now - self.datagrams_used >= DATAGRAMS_KEPT {
            self.datagrams = None;
        }
    }

    /// When [`Control::release_datagrams`] is due, if buffers are held.
    pub(super) fn datagrams_release_at(&self) -> Option<Instant> {
        self.datagrams
            .as_ref()
            .map(|_| self.datagrams_used + DATAGRAMS_KEPT)
    }

    /// Sends every reply waiting on `client`'s inner socket back to the client.
    ///
    /// True when it stopped at [`DATAGRAMS_PER_WAKE`] with more perhaps waiting.
    pub(super) fn udp_inner_ready(&mut self, id: PortId, client: SocketAddr) -> bool {
        let mut errors = 0;
        for _ in 0..DATAGRAMS_PER_WAKE {
            if errors >= ERRORS_MAX {
                return false;
            }
            let Some(Port::Udp(port)) = self.ports.get_mut(&id) else {
                return false;
            };
            let Some(session) = port.sessions.get_mut(&client) else {
                return false;
            };
            let Some((inner, _)) = &session.inner else {
                return false;
            };
            // MSG_DONTWAIT rather than the descriptor's flag: the helper may hold a copy of
            // this socket and could have cleared O_NONBLOCK on it.
            let got = recv(inner.as_raw_fd(), &mut self.buf, MsgFlags::MSG_DONTWAIT);
            match got.map_err(io::Error::from) {
                Ok(n) => {
                    session.last = Instant::now();
                    // A full host socket drops the reply, as the network would.
                    let _ = port.socket.send_to(&self.buf[..n], client);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => {
                    tracing::trace!(port = id, %client, error = %e, "UDP receive inside failed");
                    errors += 1;
                }
            }
        }
        true
    }

    /// Puts the helper's socket to work for `client`'s session and sends its backlog.
    pub(super) fn udp_connected(&mut self, id: PortId, client: SocketAddr, fd: OwnedFd) {
        let sock = std::net::UdpSocket::from(fd);
        if let Err(e) = sock.set_nonblocking(true) {
            tracing::debug!(port = id, %client, error = %e, "cannot use the inner UDP socket");
            return self.end_session(id, client);
        }
        let mut sock = UdpSocket::from_std(sock);
        let token = self.token(Source::UdpInner(id, client));
        let Some(Port::Udp(port)) = self.ports.get_mut(&id) else {
            self.sources.remove(&token);
            return;
        };
        let Some(session) = port.sessions.get_mut(&client).filter(|s| s.inner.is_none()) else {
            self.sources.remove(&token);
            return;
        };

        if let Err(e) = self
            .poll
            .registry()
            .register(&mut sock, token, Interest::READABLE)
        {
            tracing::debug!(port = id, %client, error = %e, "cannot watch the inner UDP socket");
            self.sources.remove(&token);
            return self.end_session(id, client);
        }
        for datagram in session.backlog.drain(..) {
            let _ = send(sock.as_raw_fd(), &datagram, MsgFlags::MSG_DONTWAIT);
        }
        session.segment = sys::udp_segment_supported(sock.as_fd());
        session.inner = Some((sock, token));
    }

    pub(super) fn udp_failed(&mut self, id: PortId, client: SocketAddr) {
        self.end_session(id, client);
    }

    /// Forgets the sessions still waiting for the helper (it has gone).
    pub(super) fn drop_pending_sessions(&mut self) {
        for port in self.ports.values_mut() {
            let Port::Udp(port) = port;
            port.sessions.retain(|_, s| s.inner.is_some());
        }
    }
}
