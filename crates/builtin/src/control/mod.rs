//! The control loop: one thread that owns the first helper channel and serves UDP ports.
//!
//! UDP ports are served here entirely ([`udp`]): sockets for new sessions are asked of the
//! helper on the channel (pipelined requests, matched by id). TCP ports are served by the
//! workers ([`crate::worker`]), each with a helper channel of its own. Port additions and
//! removals arrive as [`ControlCmd`]s from the driver; a removal is acknowledged only once the
//! port's socket and pending sessions are closed.

mod udp;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use rkport_core::PortId;
use socket2::{Domain, Type};

use crate::sys;
use crate::wire::{Kind, Reply, Request, REQUEST_LEN};

const CHANNEL: Token = Token(0);
const WAKER: Token = Token(1);
/// How long the channel rests after a shortage of kernel memory (ENOBUFS, ENOMEM).
const CHANNEL_BACKOFF: Duration = Duration::from_millis(75);

/// What the driver asks of the control loop.
#[derive(Debug)]
pub(crate) enum ControlCmd {
    /// Serve a bound UDP socket; datagrams go to `target` inside.
    AddUdp {
        id: PortId,
        socket: UdpSocket,
        target: SocketAddr,
    },
    /// Close port `id` with its pending connections and sessions, then signal `done`.
    Remove {
        id: PortId,
        done: SyncSender<()>,
    },
    SetUdpTimeout(Duration),
    /// Close everything, the helper channel included, and end the thread.
    Stop,
}

/// The sending side of the control loop's command queue.
#[derive(Debug, Clone)]
pub(crate) struct ControlTx {
    tx: Sender<ControlCmd>,
    waker: Arc<Waker>,
}

impl ControlTx {
    /// Queues `cmd` and wakes the loop; false when the loop has stopped.
    pub fn send(&self, cmd: ControlCmd) -> bool {
        self.tx.send(cmd).is_ok() && self.waker.wake().is_ok()
    }
}

/// Starts the control loop on `channel`.
pub(crate) fn spawn(
    channel: OwnedFd,
    udp_timeout: Duration,
) -> io::Result<(ControlTx, JoinHandle<()>)> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    socket2::SockRef::from(&channel).set_nonblocking(true)?;
    let both = Interest::READABLE | Interest::WRITABLE;
    poll.registry()
        .register(&mut SourceFd(&channel.as_raw_fd()), CHANNEL, both)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let control = Control {
        poll,
        _waker: waker.clone(),
        rx,
        channel: Some(channel),
        outbox: VecDeque::new(),
        ports: HashMap::new(),
        sources: HashMap::new(),
        next_token: 2,
        pending: HashMap::new(),
        next_request: 1,
        udp_timeout,
        channel_retry: None,
        buf: vec![0; 65536].into_boxed_slice(),
        datagrams: None,
        datagrams_used: Instant::now(),
        again: Vec::new(),
    };
    let thread = std::thread::Builder::new()
        .name("rkport-builtin-ctl".into())
        .spawn(move || control.run())?;
    Ok((ControlTx { tx, waker }, thread))
}

/// A published port as the control loop serves it.
#[derive(Debug)]
enum Port {
    Udp(udp::UdpPort),
}

/// What a registered token stands for.
#[derive(Debug, Clone, Copy)]
enum Source {
    UdpHost(PortId),
    UdpInner(PortId, SocketAddr),
}

/// A request sent to the helper and not yet answered.
#[derive(Debug)]
enum Pending {
    Udp {
        port: PortId,
        client: SocketAddr,
        target: SocketAddr,
    },
}

impl Pending {
    fn port(&self) -> PortId {
        match self {
            Pending::Udp { port, .. } => *port,
        }
    }

    /// The domain and type of the socket a valid reply must carry.
    fn expected(&self) -> (Domain, Type) {
        match self {
            Pending::Udp { target, .. } => (Domain::for_address(*target), Type::DGRAM),
        }
    }
}

#[derive(Debug)]
struct Control {
    poll: Poll,
    /// Kept here too: closing the eventfd while a wake-up is pending would lose it.
    _waker: Arc<Waker>,
    rx: Receiver<ControlCmd>,
    /// The parent end of the helper channel; `None` once the helper has gone.
    channel: Option<OwnedFd>,
    /// Encoded requests the channel could not take yet.
    outbox: VecDeque<[u8; REQUEST_LEN]>,
    ports: HashMap<PortId, Port>,
    sources: HashMap<Token, Source>,
    next_token: usize,
    pending: HashMap<u64, Pending>,
    next_request: u64,
    udp_timeout: Duration,
    /// When to try the channel again after a transient error (ENOBUFS, ENOMEM).
    channel_retry: Option<Instant>,
    buf: Box<[u8]>,
    /// Receive buffers for UDP batches, while UDP traffic flows.
    datagrams: Option<crate::sys::Datagrams>,
    datagrams_used: Instant,
    /// Sources that stopped with datagrams still waiting, so that commands and replies get
    /// their turn under a flood; served again after the next poll, which then does not wait.
    again: Vec<Token>,
}

impl Control {
    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = match self.again.is_empty() {
                true => self
                    .next_deadline()
                    .map(|t| t.saturating_duration_since(Instant::now())),
                false => Some(Duration::ZERO),
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::debug!(error = %e, "control poll failed, stopping the forwarder");
                return self.stop();
            }

            self.timers(Instant::now());
            for event in events.iter() {
                match event.token() {
                    WAKER => {
                        if !self.commands() {
                            return self.stop();
                        }
                    }
                    CHANNEL => self.channel_ready(),
                    token => self.source_ready(token),
                }
            }
            for token in std::mem::take(&mut self.again) {
                self.source_ready(token);
            }
        }
    }

    /// The earliest timer: a UDP sweep or a channel retry.
    fn next_deadline(&self) -> Option<Instant> {
        self.next_sweep()
            .into_iter()
            .chain(self.channel_retry)
            .chain(self.datagrams_release_at())
            .min()
    }

    fn timers(&mut self, now: Instant) {
        if self.channel_retry.is_some_and(|t| t <= now) {
            self.channel_retry = None;
            self.channel_ready();
        }
        self.sweep(now);
        self.release_datagrams(now);
    }

    /// Applies queued commands; false when the loop must stop.
    fn commands(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(ControlCmd::AddUdp { id, socket, target }) => self.add_udp(id, socket, target),
                Ok(ControlCmd::Remove { id, done }) => {
                    self.remove(id);
                    let _ = done.send(());
                }
                Ok(ControlCmd::SetUdpTimeout(t)) => self.udp_timeout = t,
                Ok(ControlCmd::Stop) | Err(TryRecvError::Disconnected) => return false,
                Err(TryRecvError::Empty) => return true,
            }
        }
    }

    fn token(&mut self, source: Source) -> Token {
        let token = Token(self.next_token);
        self.next_token += 1;
        self.sources.insert(token, source);
        token
    }

    /// Closes port `id`: its listener or host socket, pending dials and sessions.
    fn remove(&mut self, id: PortId) {
        match self.ports.remove(&id) {
            Some(Port::Udp(port)) => self.close_udp(port),
            None => {}
        }
        self.pending.retain(|_, p| p.port() != id);
        self.sources.retain(|_, s| match s {
            Source::UdpHost(p) | Source::UdpInner(p, _) => *p != id,
        });
    }

    fn stop(mut self) {
        let ids: Vec<PortId> = self.ports.keys().copied().collect();
        for id in ids {
            self.remove(id);
        }
        // Dropping the channel tells the helper to return.
    }

    fn source_ready(&mut self, token: Token) {
        let more = match self.sources.get(&token).copied() {
            Some(Source::UdpHost(id)) => self.udp_host_ready(id),
            Some(Source::UdpInner(id, client)) => self.udp_inner_ready(id, client),
            None => false,
        };
        if more && !self.again.contains(&token) {
            self.again.push(token);
        }
    }

    /// Sends a request for a socket to `target` inside; `pending` waits for the reply.
    fn request(&mut self, kind: Kind, target: SocketAddr, pending: Pending) {
        if self.channel.is_none() {
            // The session is dropped with its datagrams; the next one asks again.
            tracing::debug!(port = pending.port(), "helper is gone, dropping datagrams");
            return;
        }
        let id = self.next_request;
        self.next_request += 1;
        self.pending.insert(id, pending);
        self.outbox.push_back(Request { id, kind, target }.encode());
        self.flush();
    }

    /// Writes queued requests until the channel would block.
    fn flush(&mut self) {
        while let Some(msg) = self.outbox.front() {
            let Some(channel) = &self.channel else { return };
            match sys::send_with_fd(channel.as_fd(), msg, None) {
                Ok(()) => {
                    self.outbox.pop_front();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => return self.channel_error(e),
            }
        }
    }

    /// Sends what waits in the outbox and takes the helper's replies.
    fn channel_ready(&mut self) {
        self.flush();
        self.receive();
    }

    fn receive(&mut self) {
        let mut buf = [0u8; 64];
        // Read until EAGAIN even with no request left unanswered: a helper that misbehaves may
        // have sent more than asked, and a sender blocked on a full channel is woken only once
        // half of it has been read.
        while let Some(channel) = &self.channel {
            match sys::recv_with_fds(channel.as_fd(), &mut buf) {
                Ok(msg) if msg.len == 0 && msg.fds.is_empty() => {
                    return self.lose_channel(io::ErrorKind::UnexpectedEof.into())
                }
                Ok(msg) => self.reply(&buf[..msg.len], msg.fds, msg.truncated),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => return self.channel_error(e),
            }
        }
    }

    /// Retries the channel a little later after a shortage of kernel memory; any other error
    /// means the helper is gone.
    fn channel_error(&mut self, error: io::Error) {
        match error.raw_os_error() {
            Some(libc::ENOBUFS | libc::ENOMEM) => {
                tracing::debug!(%error, "helper channel busy, retrying");
                self.channel_retry = Some(Instant::now() + CHANNEL_BACKOFF);
            }
            _ => self.lose_channel(error),
        }
    }

    /// The helper is gone: every waiting connection fails, and so will new ones.
    fn lose_channel(&mut self, error: io::Error) {
        tracing::debug!(%error, "helper channel closed");
        if let Some(channel) = self.channel.take() {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&channel.as_raw_fd()));
        }
        self.outbox.clear();
        self.pending.clear();
        self.drop_pending_sessions();
    }

    /// Checks one reply and completes its request.
    ///
    /// Anything that is not a well-formed reply to a pending request, with exactly one socket
    /// of the requested domain and type on success, is dropped: the helper runs inside the
    /// namespace, where the contained program may have tampered with it.
    ///
    /// A reply whose descriptor could not be installed (`MSG_CTRUNC`, e.g. at the descriptor
    /// limit) fails its request, so that the client is closed rather than left waiting.
    fn reply(&mut self, msg: &[u8], mut fds: Vec<OwnedFd>, truncated: bool) {
        let Some(reply) = Reply::decode(msg) else {
            return tracing::debug!(len = msg.len(), "malformed reply from helper");
        };
        let Some(pending) = self.pending.remove(&reply.id) else {
            return tracing::debug!(id = reply.id, "reply to no pending request");
        };
        if truncated {
            tracing::debug!(
                id = reply.id,
                port = pending.port(),
                "reply truncated, socket lost"
            );
            return self.failed(pending);
        }
        if reply.errno != 0 {
            let error = io::Error::from_raw_os_error(reply.errno);
            tracing::debug!(id = reply.id, port = pending.port(), %error, "helper could not dial");
            return self.failed(pending);
        }

        let (domain, ty) = pending.expected();
        let fd = fds
            .pop()
            .filter(|fd| fds.is_empty() && sys::is_socket_of(fd.as_fd(), domain, ty));
        match fd {
            Some(fd) => self.complete(pending, fd),
            None => {
                tracing::debug!(id = reply.id, "reply without a usable socket");
                self.failed(pending);
            }
        }
    }

    fn complete(&mut self, pending: Pending, inner: OwnedFd) {
        match pending {
            Pending::Udp { port, client, .. } => self.udp_connected(port, client, inner),
        }
    }

    fn failed(&mut self, pending: Pending) {
        match pending {
            Pending::Udp { port, client, .. } => self.udp_failed(port, client),
        }
    }
}
