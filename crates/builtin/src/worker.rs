//! Data-path workers: each runs a mio event loop that accepts, dials and forwards its own TCP
//! connections.
//!
//! Every worker watches every TCP listener (with `EPOLLEXCLUSIVE`, so that one worker rather
//! than all is woken per connection), accepts, and connects a spare socket that the helper made
//! inside the namespace ahead of need; spares are asked for in batches on a channel of the
//! worker's own (requests pipelined, replies matched by id), so a new client usually costs no
//! round trip to the helper. Without a spare at hand, the worker asks the helper for a socket
//! with its connect started. It checks what comes back, and moves bytes both ways: through a
//! one-page buffer while a direction carries only short messages (they cost less that way),
//! with splice(2) once a read fills the page, so bulk payload never enters user space. A connection stays on
//! the thread that accepted it: no hand-over between threads on the hot path.
//!
//! A direction borrows a pipe from the worker's pool only while bytes wait in it, so idle
//! connections hold no pipe; a direction that has proved to be a bulk transfer keeps its
//! (grown) pipe. Half-close is propagated: when a direction reads end of file and its pipe is
//! drained, the other socket is shut down for writing; the pair closes once both directions
//! have ended. An error on either side resets both. Workers never block on their own sockets;
//! one held by an inner socket that the helper made blocking behind its back is freed by the
//! [watchdog](crate::watchdog).
//!
//! Each worker has a descriptor table of its own ([`sys::spawn_with_own_fds`]): its listeners,
//! connections and pipes are listed under `/proc/PID/task/TID/fd` of the worker thread, not
//! under `/proc/PID/fd`, and `RLIMIT_NOFILE` applies to each table separately, so the workers
//! together hold as many connections as the limit allows each. The driver talks to a worker
//! over a `SOCK_SEQPACKET` pair ([`WorkerHandle`]), the one way to hand it a listener.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use rkport_core::PortId;
use socket2::{Domain, Type};

use crate::sys::{self, Pipe};
use crate::watchdog::Progress;
use crate::wire::{Kind, Reply, Request, REQUEST_LEN};

/// Capacity asked for the pipe of a bulk direction, and the most bytes moved by one splice.
const PIPE_SIZE: usize = 256 * 1024;
/// Bytes a direction moves before it counts as bulk: it keeps its pipe from then on and grows
/// it to `PIPE_SIZE`. Short exchanges use default 64 KiB pipes: pipe capacity counts against a
/// per-user budget (`/proc/sys/fs/pipe-user-pages-soft`), past which new pipes shrink to a page.
const GROW_AFTER: usize = 1024 * 1024;
/// The copy buffer of a direction that has only carried short messages so far (a read has
/// never filled it): those cost fewer cycles copied than spliced. One page, which an empty pipe
/// always takes whole. The first read that fills it moves the direction to splice(2) for good.
const COPY_BUF: usize = 4096;
/// Splice calls per direction before a busy pair yields to the others.
const BUDGET: usize = 32;
/// Empty pipes kept for reuse by a worker.
const POOL_MAX: usize = 16;
/// Connections accepted from one listener per wake-up. The listener is level-triggered, so
/// the rest are taken on the next round, after the other sources had their turn; taking one
/// at a time spares the accept that would only return EAGAIN.
const ACCEPT_BATCH: usize = 1;
/// How long a listener rests after a resource error on accept (EMFILE and the like), or once
/// this worker's descriptor table is nearly full.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(75);
/// Descriptors kept free in a worker's table for the inner sockets and pipes of connections
/// already accepted (an eighth of the limit, at most this many): a worker whose newest client
/// got a number this close to the limit stops accepting for a while, and the other workers take
/// the new connections.
const FD_RESERVE_MAX: u64 = 256;
/// Spare sockets (TCP, made inside, not connected) a worker keeps per address family once that
/// family is in use; fewer than half of it asks the helper for more, all in one go, so that a
/// new client costs no round trip to the helper and no wake-up of it.
const SPARES: usize = 32;
/// How long a worker asks for no spares after the helper failed to give one (it may be out of
/// descriptors): clients are served by per-connection requests meanwhile.
const SPARES_BACKOFF: Duration = Duration::from_secs(1);

const CMD: Token = Token(0);
const CHANNEL: Token = Token(1);
/// Listener tokens: this bit and the port id. Pair slot `i` uses `2i + 2` (client) and
/// `2i + 3` (inner socket).
const LISTENER: usize = 1 << (usize::BITS - 1);

/// Command codes on the driver's pair, each followed by an encoded [`Request`] naming the port
/// (as its id) and, for an addition, the target.
const OP_ADD_TCP: u8 = 1;
const OP_REMOVE: u8 = 2;
const CMD_LEN: usize = 1 + REQUEST_LEN;

/// The driver's side of a worker: its command pair and its thread.
#[derive(Debug)]
pub(crate) struct WorkerHandle {
    cmd: OwnedFd,
    thread: Option<JoinHandle<()>>,
    progress: Arc<Progress>,
}

impl WorkerHandle {
    /// Has the worker serve `listener` (a copy goes to the worker) for port `port`; returns
    /// once it does, false when the worker has stopped.
    pub fn add_tcp(&self, port: PortId, listener: BorrowedFd<'_>, target: SocketAddr) -> bool {
        self.command(OP_ADD_TCP, port, target, Some(listener))
    }

    /// Has the worker close port `port`: its listener copy, pending dials and connections;
    /// returns once it has (or has stopped).
    pub fn remove(&self, port: PortId) {
        let unspecified = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        self.command(OP_REMOVE, port, unspecified, None);
    }

    /// Sends a command and waits for the worker's acknowledgement.
    fn command(
        &self,
        op: u8,
        port: PortId,
        target: SocketAddr,
        fd: Option<BorrowedFd<'_>>,
    ) -> bool {
        let mut msg = [0u8; CMD_LEN];
        msg[0] = op;
        let req = Request {
            id: port as u64,
            kind: Kind::Tcp,
            target,
        };
        msg[1..].copy_from_slice(&req.encode());
        if sys::send_with_fd(self.cmd.as_fd(), &msg, fd).is_err() {
            return false;
        }
        // A closed pair (the worker has stopped) reads as end of file.
        let mut ack = [0u8; 1];
        matches!(sys::recv_with_fds(self.cmd.as_fd(), &mut ack), Ok(r) if r.len == 1)
    }

    /// For [`watchdog::watch`](crate::watchdog::watch).
    pub fn progress(&self) -> Weak<Progress> {
        Arc::downgrade(&self.progress)
    }

    /// Ends the worker, closing everything it holds, and waits for its thread.
    pub fn stop(&mut self) {
        let _ = socket2::SockRef::from(&self.cmd).shutdown(Shutdown::Both);
        self.progress.set_thread(None);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts worker number `n`, asking for inner sockets on `channel` (a helper channel of its
/// own).
pub(crate) fn spawn(n: usize, channel: OwnedFd) -> io::Result<WorkerHandle> {
    let (cmd, theirs) = crate::channel()?;
    let progress = Arc::new(Progress::default());
    let theirs_progress = Arc::clone(&progress);
    let thread = sys::spawn_with_own_fds(format!("rkport-worker-{n}"), vec![theirs, channel], {
        move |mut fds| {
            let (Some(channel), Some(cmd)) = (fds.pop(), fds.pop()) else {
                return;
            };
            match Worker::new(cmd, channel) {
                Ok(worker) => worker.run(&theirs_progress),
                Err(e) => tracing::debug!(error = %e, "cannot start a forwarding worker"),
            }
        }
    })?;
    progress.set_thread(Some(thread.as_pthread_t()));
    Ok(WorkerHandle {
        cmd,
        thread: Some(thread),
        progress,
    })
}

/// One direction of a pair: bytes read from one socket, waiting in `pipe` for the other.
#[derive(Debug, Default)]
struct Flow {
    /// Borrowed from the pool while bytes wait in it; kept once the direction is bulk.
    pipe: Option<Pipe>,
    buffered: usize,
    /// Bytes spliced so far, up to `GROW_AFTER`.
    moved: usize,
    /// Whether a read has filled the copy buffer: the direction carries more than short
    /// messages, and moves by splice(2) from then on.
    bulk: bool,
    eof: bool,
    shut: bool,
}

/// A forwarded connection: client side on the host, inner side in the namespace.
#[derive(Debug)]
struct Pair {
    port: PortId,
    client: TcpStream,
    inner: TcpStream,
    connected: bool,
    /// Whether writable readiness of the client is watched (only while `down` is stuck).
    client_w: bool,
    /// Whether writable readiness of the inner socket is watched (the connect, or `up` stuck).
    inner_w: bool,
    /// Listed in `Worker::again`; keeps a busy pair from being listed twice.
    queued: bool,
    /// Client to inner.
    up: Flow,
    /// Inner to client.
    down: Flow,
}

/// How pumping a pair ended.
enum Pumped {
    /// Waiting for readiness.
    Idle,
    /// Used its budget with work left; pump again soon.
    Busy,
    /// Both directions ended; close the pair.
    Done,
}

/// A published TCP port as a worker serves it.
#[derive(Debug)]
struct Listener {
    socket: TcpListener,
    target: SocketAddr,
}

/// An accepted client waiting for the helper's socket.
#[derive(Debug)]
struct Dial {
    port: PortId,
    client: TcpStream,
    target: SocketAddr,
}

/// What a request to the helper is for.
#[derive(Debug)]
enum Pending {
    /// The inner socket of an accepted client, its connect started by the helper.
    Dial(Dial),
    /// A spare socket of this family (IPv6 when true).
    Spare(bool),
}

/// Spare sockets of one address family, and how many more have been asked for.
#[derive(Debug, Default)]
struct Spares {
    ready: Vec<OwnedFd>,
    asked: usize,
    /// When the helper last failed a spare request: no more are asked for a while.
    failed: Option<Instant>,
}

#[derive(Debug)]
struct Worker {
    poll: Poll,
    cmd: OwnedFd,
    /// This worker's helper channel; `None` once the helper has gone.
    channel: Option<OwnedFd>,
    /// Encoded requests the channel could not take yet.
    outbox: VecDeque<[u8; REQUEST_LEN]>,
    pending: HashMap<u64, Pending>,
    next_request: u64,
    /// Spare sockets for IPv4 and IPv6 targets.
    spares: [Spares; 2],
    listeners: HashMap<PortId, Listener>,
    /// Listeners resting after an accept error, with the time to resume.
    backoff: Vec<(Instant, PortId)>,
    /// When to try the channel again after a transient error (ENOBUFS, ENOMEM).
    channel_retry: Option<Instant>,
    pairs: Vec<Option<Pair>>,
    free: Vec<usize>,
    pool: Vec<Pipe>,
    again: VecDeque<usize>,
    /// The soft `RLIMIT_NOFILE` as last read: the bound of this worker's descriptor numbers.
    fd_limit: u64,
}

/// The pair slot of a connection token.
fn slot_of(token: Token) -> usize {
    (token.0 - 2) / 2
}

fn client_token(slot: usize) -> Token {
    Token(2 * slot + 2)
}

fn inner_token(slot: usize) -> Token {
    Token(2 * slot + 3)
}

impl Worker {
    fn new(cmd: OwnedFd, channel: OwnedFd) -> io::Result<Worker> {
        let poll = Poll::new()?;
        let both = Interest::READABLE | Interest::WRITABLE;
        for (fd, token, interest) in [(&cmd, CMD, Interest::READABLE), (&channel, CHANNEL, both)] {
            socket2::SockRef::from(fd).set_nonblocking(true)?;
            poll.registry()
                .register(&mut SourceFd(&fd.as_raw_fd()), token, interest)?;
        }
        Ok(Worker {
            poll,
            cmd,
            channel: Some(channel),
            outbox: VecDeque::new(),
            pending: HashMap::new(),
            next_request: 1,
            spares: Default::default(),
            listeners: HashMap::new(),
            backoff: Vec::new(),
            channel_retry: None,
            pairs: Vec::new(),
            free: Vec::new(),
            pool: Vec::new(),
            again: VecDeque::new(),
            fd_limit: sys::nofile_limit(),
        })
    }

    fn run(mut self, progress: &Progress) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = if self.again.is_empty() {
                self.next_deadline()
                    .map(|t| t.saturating_duration_since(Instant::now()))
            } else {
                Some(Duration::ZERO)
            };
            progress.polling();
            let polled = self.poll.poll(&mut events, timeout);
            progress.working();
            if let Err(e) = polled {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::debug!(error = %e, "worker poll failed, closing its connections");
                return;
            }
            if !self.backoff.is_empty() || self.channel_retry.is_some() {
                self.timers(Instant::now());
            }

            let mut replies = false;
            for event in events.iter() {
                match event.token() {
                    CMD => {
                        if !self.commands() {
                            return;
                        }
                    }
                    CHANNEL => replies = true,
                    Token(t) if t & LISTENER != 0 => self.accept((t & !LISTENER) as PortId),
                    token => {
                        let hint = Hint {
                            inner: token.0 % 2 == 1,
                            readable: event.is_readable(),
                            writable: event.is_writable(),
                            failed: event.is_error() || event.is_read_closed(),
                        };
                        self.service(slot_of(token), Some(hint));
                    }
                }
            }
            // After the accepts of this round, so that their requests go out in one go.
            self.flush();
            if replies {
                self.receive();
            }
            for _ in 0..self.again.len() {
                if let Some(slot) = self.again.pop_front() {
                    if let Some(Some(pair)) = self.pairs.get_mut(slot) {
                        pair.queued = false;
                    }
                    self.service(slot, None);
                }
            }
        }
    }

    /// The earliest timer: a listener to resume or the channel to retry.
    fn next_deadline(&self) -> Option<Instant> {
        let resume = self.backoff.iter().map(|(t, _)| *t);
        resume.chain(self.channel_retry).min()
    }

    fn timers(&mut self, now: Instant) {
        let (due, rest) = std::mem::take(&mut self.backoff)
            .into_iter()
            .partition(|(t, _)| *t <= now);
        self.backoff = rest;
        for (_, id) in due {
            self.resume_listener(id);
        }
        if self.channel_retry.is_some_and(|t| t <= now) {
            self.channel_retry = None;
            self.channel_ready();
        }
    }

    /// Applies the driver's commands; false when the worker must stop (the driver closed its
    /// end).
    fn commands(&mut self) -> bool {
        let mut buf = [0u8; CMD_LEN + 1];
        loop {
            let msg = match sys::recv_with_fds(self.cmd.as_fd(), &mut buf) {
                Ok(msg) => msg,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) => {
                    tracing::debug!(error = %e, "worker command pair failed");
                    return false;
                }
            };
            if msg.len == 0 && msg.fds.is_empty() {
                return false;
            }
            let req = (msg.len == CMD_LEN && !msg.truncated)
                .then(|| Request::decode(&buf[1..CMD_LEN]))
                .flatten();
            let Some(req) = req else {
                tracing::debug!(len = msg.len, "malformed worker command");
                let _ = sys::send_with_fd(self.cmd.as_fd(), &[0], None);
                continue;
            };
            match (buf[0], msg.fds.into_iter().next()) {
                (OP_ADD_TCP, Some(fd)) => self.add_listener(req.id as PortId, fd, req.target),
                (OP_REMOVE, _) => self.close_port(req.id as PortId),
                (op, _) => tracing::debug!(op, "unknown worker command"),
            }
            // The driver waits for this; the pair's buffer always has room for one byte.
            let _ = sys::send_with_fd(self.cmd.as_fd(), &[1], None);
        }
    }

    fn add_listener(&mut self, id: PortId, fd: OwnedFd, target: SocketAddr) {
        let socket = TcpListener::from_std(std::net::TcpListener::from(fd));
        self.listeners.insert(id, Listener { socket, target });
        self.resume_listener(id);
    }

    /// Starts watching the listener of port `id` again (or for the first time).
    fn resume_listener(&mut self, id: PortId) {
        let Some(listener) = self.listeners.get(&id) else {
            return;
        };
        let token = (LISTENER | id as usize) as u64;
        let watched =
            sys::epoll_add_exclusive(self.poll.as_raw_fd(), listener.socket.as_fd(), token);
        if let Err(e) = watched {
            // Retried by the backoff timer: the port stays listed and starts serving then.
            tracing::debug!(port = id, error = %e, "cannot watch listener, retrying");
            self.backoff.push((Instant::now() + ACCEPT_BACKOFF, id));
        }
    }

    /// Whether descriptor number `fd` is within the reserve of this worker's table limit
    /// (the limit is read again before saying yes: it may have been raised).
    fn nearly_full(&mut self, fd: u64) -> bool {
        let reserve = |limit: u64| (limit / 8).min(FD_RESERVE_MAX);
        if fd + reserve(self.fd_limit) < self.fd_limit {
            return false;
        }
        self.fd_limit = sys::nofile_limit();
        fd + reserve(self.fd_limit) >= self.fd_limit
    }

    /// Stops watching a listener for a while after an accept error.
    ///
    /// EMFILE, ENFILE, ENOBUFS, ENOMEM and ECONNABORTED pass; treating them as fatal is what
    /// left published ports dead in rootlesskit#536. The port stays listed and resumes.
    fn pause_listener(&mut self, id: PortId, error: io::Error) {
        tracing::debug!(port = id, %error, "accept failed, pausing the listener");
        if let Some(listener) = self.listeners.get(&id) {
            sys::epoll_del(self.poll.as_raw_fd(), listener.socket.as_fd());
            self.backoff.push((Instant::now() + ACCEPT_BACKOFF, id));
        }
    }

    /// Accepts up to [`ACCEPT_BATCH`] waiting connections of port `id` and asks the helper for
    /// their inner sockets.
    fn accept(&mut self, id: PortId) {
        for _ in 0..ACCEPT_BATCH {
            let Some(listener) = self.listeners.get(&id) else {
                return;
            };
            let target = listener.target;
            match listener.socket.accept() {
                Ok((client, _)) => {
                    let fd = client.as_raw_fd() as u64;
                    self.dial(Dial {
                        port: id,
                        client,
                        target,
                    });
                    if self.nearly_full(fd) {
                        let full = io::Error::other("descriptor table nearly full");
                        return self.pause_listener(id, full);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.fd_limit = sys::nofile_limit();
                    return self.pause_listener(id, e);
                }
            }
        }
    }

    /// Starts the inner connection of `dial`: on a spare socket when one is ready, else by
    /// asking the helper for a socket with its connect started.
    fn dial(&mut self, dial: Dial) {
        let v6 = dial.target.is_ipv6();
        if let Some(spare) = self.spares[usize::from(v6)].ready.pop() {
            self.refill(v6);
            // A blocking connect would hold this worker for as long as the kernel keeps trying.
            let Some(spare) = nonblocking(spare, dial.port) else {
                return reset(&dial.client);
            };
            let sock = socket2::Socket::from(spare);
            return match sock.connect(&dial.target.into()) {
                Ok(()) => self.add(dial.port, dial.client, sock.into()),
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
                    self.add(dial.port, dial.client, sock.into())
                }
                Err(e) => {
                    tracing::debug!(port = dial.port, target = %dial.target, error = %e, "cannot connect inside");
                    reset(&dial.client)
                }
            };
        }
        if self.channel.is_none() {
            tracing::debug!(port = dial.port, "helper is gone, dropping connection");
            return reset(&dial.client);
        }
        let target = dial.target;
        self.request(Kind::Tcp, target, Pending::Dial(dial));
        self.refill(v6);
    }

    /// Asks for spare sockets of a family when fewer than half of [`SPARES`] are ready or
    /// asked for.
    fn refill(&mut self, v6: bool) {
        let spares = &self.spares[usize::from(v6)];
        let have = spares.ready.len() + spares.asked;
        let resting = spares.failed.is_some_and(|t| t.elapsed() < SPARES_BACKOFF);
        if have >= SPARES / 2 || resting || self.channel.is_none() {
            return;
        }
        let any: SocketAddr = if v6 {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        };
        for _ in have..SPARES {
            self.request(Kind::Spare, any, Pending::Spare(v6));
        }
        self.spares[usize::from(v6)].asked += SPARES - have;
    }

    /// Queues a request to the helper; sent by [`Worker::flush`].
    fn request(&mut self, kind: Kind, target: SocketAddr, pending: Pending) {
        let id = self.next_request;
        self.next_request += 1;
        self.pending.insert(id, pending);
        self.outbox.push_back(Request { id, kind, target }.encode());
    }

    /// Sends what waits in the outbox and takes the helper's replies.
    fn channel_ready(&mut self) {
        self.flush();
        self.receive();
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

    /// Takes the helper's replies, a batch per system call, until none is waiting. A batch
    /// that is not full means the channel was empty; reading on after the last expected reply
    /// also picks up whatever else a misbehaving helper sent, so that it does not wait in the
    /// channel holding its descriptors.
    fn receive(&mut self) {
        let mut bufs = [[0u8; 64]; sys::BATCH];
        while let Some(channel) = &self.channel {
            let batch = match sys::recv_batch(channel.as_fd(), &mut bufs) {
                Ok(batch) => batch,
                Err(e) => return self.channel_error(e),
            };
            let full = batch.len() == sys::BATCH;
            for (msg, buf) in batch.into_iter().zip(&bufs) {
                if msg.len == 0 && msg.fds.is_empty() {
                    return self.lose_channel(io::ErrorKind::UnexpectedEof.into());
                }
                self.reply(&buf[..msg.len.min(buf.len())], msg.fds, msg.truncated);
            }
            if !full {
                return;
            }
        }
    }

    /// Retries the channel a little later after a shortage of kernel memory; any other error
    /// means the helper is gone.
    fn channel_error(&mut self, error: io::Error) {
        match error.raw_os_error() {
            Some(libc::ENOBUFS | libc::ENOMEM) => {
                tracing::debug!(%error, "helper channel busy, retrying");
                self.channel_retry = Some(Instant::now() + ACCEPT_BACKOFF);
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
        for (_, pending) in self.pending.drain() {
            if let Pending::Dial(dial) = pending {
                reset(&dial.client);
            }
        }
        // Sockets of a namespace whose helper is gone are of no more use.
        self.spares = Default::default();
    }

    /// Checks one reply and completes its request.
    ///
    /// Anything that is not a well-formed reply to a pending request, with exactly one TCP
    /// socket of the target's domain on success, is dropped: the helper runs inside the
    /// namespace, where the contained program may have tampered with it.
    ///
    /// A reply whose descriptor could not be installed (`MSG_CTRUNC`, e.g. at the descriptor
    /// limit) fails its request, so that the client is closed rather than left waiting.
    fn reply(&mut self, msg: &[u8], mut fds: Vec<OwnedFd>, truncated: bool) {
        let Some(reply) = Reply::decode(msg) else {
            return tracing::debug!(len = msg.len(), "malformed reply from helper");
        };
        let dial = match self.pending.remove(&reply.id) {
            Some(Pending::Dial(dial)) => dial,
            Some(Pending::Spare(v6)) => return self.spare(v6, &reply, fds, truncated),
            None => return tracing::debug!(id = reply.id, "reply to no pending request"),
        };
        if truncated {
            tracing::debug!(
                id = reply.id,
                port = dial.port,
                "reply truncated, socket lost"
            );
            return reset(&dial.client);
        }
        if reply.errno != 0 {
            let error = io::Error::from_raw_os_error(reply.errno);
            tracing::debug!(id = reply.id, port = dial.port, %error, "helper could not dial");
            return reset(&dial.client);
        }
        let domain = Domain::for_address(dial.target);
        let fd = fds
            .pop()
            .filter(|fd| fds.is_empty() && sys::is_socket_of(fd.as_fd(), domain, Type::STREAM));
        match fd {
            Some(fd) => match nonblocking(fd, dial.port) {
                Some(fd) => self.add(dial.port, dial.client, fd),
                None => reset(&dial.client),
            },
            None => {
                tracing::debug!(id = reply.id, "reply without a usable socket");
                reset(&dial.client);
            }
        }
    }

    /// Keeps the socket of a reply to a spare request: exactly one TCP socket of the family
    /// asked for, or nothing. Whether it is really unconnected shows when it is used: a
    /// connect on anything else fails, and that one client is closed.
    fn spare(&mut self, v6: bool, reply: &Reply, mut fds: Vec<OwnedFd>, truncated: bool) {
        let spares = &mut self.spares[usize::from(v6)];
        spares.asked = spares.asked.saturating_sub(1);
        if truncated || reply.errno != 0 {
            spares.failed = Some(Instant::now());
            let error = io::Error::from_raw_os_error(reply.errno);
            return tracing::debug!(id = reply.id, truncated, %error, "no spare socket");
        }
        let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
        let fd = fds
            .pop()
            .filter(|fd| fds.is_empty() && sys::is_socket_of(fd.as_fd(), domain, Type::STREAM));
        match fd {
            Some(fd) if spares.ready.len() < SPARES => spares.ready.push(fd),
            Some(_) => {}
            None => {
                spares.failed = Some(Instant::now());
                tracing::debug!(id = reply.id, "spare reply without a usable socket");
            }
        }
    }

    /// Starts forwarding between `client` and `inner` (whose connect may still be in progress).
    /// `inner` must be non-blocking already (see [`nonblocking`]).
    fn add(&mut self, port: PortId, client: TcpStream, inner: OwnedFd) {
        let inner = std::net::TcpStream::from(inner);
        // TCP_NODELAY (as Go sets on every connection) is inherited by `client` from its
        // listener and set on `inner` by the helper.
        let pair = Pair {
            port,
            client,
            inner: TcpStream::from_std(inner),
            connected: false,
            client_w: false,
            inner_w: true,
            queued: false,
            up: Flow::default(),
            down: Flow::default(),
        };
        let slot = self.free.pop().unwrap_or_else(|| {
            self.pairs.push(None);
            self.pairs.len() - 1
        });
        let pair = self.pairs[slot].insert(pair);
        // Writable readiness is watched only when it is awaited: the connect, or a pipe that
        // could not be drained. Watching it always would wake the worker on every ack.
        let both = Interest::READABLE | Interest::WRITABLE;
        let registry = self.poll.registry();
        let registered = registry
            .register(&mut pair.client, client_token(slot), Interest::READABLE)
            .and_then(|()| registry.register(&mut pair.inner, inner_token(slot), both));
        if let Err(e) = registered {
            tracing::debug!(port, error = %e, "cannot watch a forwarded connection");
            self.close(slot, true);
        }
    }

    /// Reacts to readiness of slot `slot` (`hint` describes the event, `None` for a pair
    /// pumped again after spending its budget): finishes the connect, then pumps both
    /// directions.
    fn service(&mut self, slot: usize, hint: Option<Hint>) {
        let Some(Some(pair)) = self.pairs.get_mut(slot) else {
            return;
        };
        let mut spurious = hint.filter(|h| h.writable);
        let mut hint = hint;
        if !pair.connected {
            spurious = None;
            match pair.connecting(hint) {
                Ok(false) => return,
                Ok(true) => {
                    pair.connected = true;
                    // The client may have sent before the connect finished: both ways.
                    hint = None;
                }
                Err(e) => {
                    tracing::debug!(port = pair.port, error = %e, "forwarded connection failed before connect");
                    return self.close(slot, true);
                }
            }
        }

        let pumped = pair.pump(&mut self.pool, directions(hint));
        let open = matches!(pumped, Ok(Pumped::Idle | Pumped::Busy));
        let watched = match open {
            true => pair.watch_writable(&self.poll, slot, spurious),
            false => Ok(()),
        };
        if let Err(e) = watched {
            tracing::debug!(port = pair.port, error = %e, "cannot watch a forwarded connection");
            return self.close(slot, true);
        }
        match pumped {
            Ok(Pumped::Idle) => {}
            Ok(Pumped::Busy) if !pair.queued => {
                pair.queued = true;
                self.again.push_back(slot);
            }
            Ok(Pumped::Busy) => {}
            Ok(Pumped::Done) => self.close(slot, false),
            Err(e) => {
                tracing::debug!(port = pair.port, error = %e, "forwarded connection failed");
                self.close(slot, true);
            }
        }
    }

    /// Closes slot `slot`, resetting both sockets when `abort`.
    fn close(&mut self, slot: usize, abort: bool) {
        let Some(pair) = self.pairs.get_mut(slot).and_then(Option::take) else {
            return;
        };
        // Closing the sockets below removes them from the poll (they live in this table
        // only); no deregister needed.
        if abort {
            reset(&pair.client);
            reset(&pair.inner);
        }
        for flow in [pair.up, pair.down] {
            if let Some(pipe) = flow.pipe.filter(|_| flow.buffered == 0) {
                give_back(&mut self.pool, pipe);
            }
        }
        self.free.push(slot);
    }

    /// Closes port `id`: this worker's copy of its listener, its pending dials and its
    /// connections.
    fn close_port(&mut self, id: PortId) {
        if let Some(listener) = self.listeners.remove(&id) {
            // The listening socket stays open until every worker has closed its copy.
            sys::epoll_del(self.poll.as_raw_fd(), listener.socket.as_fd());
        }
        self.backoff.retain(|(_, p)| *p != id);
        self.pending
            .retain(|_, p| !matches!(p, Pending::Dial(dial) if dial.port == id));
        for slot in 0..self.pairs.len() {
            if matches!(&self.pairs[slot], Some(pair) if pair.port == id) {
                self.close(slot, false);
            }
        }
    }
}

/// Puts an empty pipe back in the pool, or closes it when the pool is full.
fn give_back(pool: &mut Vec<Pipe>, pipe: Pipe) {
    if pool.len() < POOL_MAX {
        pool.push(pipe);
    }
}

/// What woke a pair: which socket, and how.
#[derive(Debug, Clone, Copy)]
struct Hint {
    /// The inner socket (else the client).
    inner: bool,
    readable: bool,
    writable: bool,
    /// Error or end of file.
    failed: bool,
}

impl Pair {
    /// Checks a pending connect on an event: `Ok(true)` once it has succeeded.
    ///
    /// `SO_ERROR` is read once, on the inner socket's first writable (or error) event; a
    /// client event is looked at only when it reports an error, to end the pair early when
    /// the client resets while the connect is pending.
    fn connecting(&self, hint: Option<Hint>) -> io::Result<bool> {
        let Some(hint) = hint else { return Ok(false) };
        if !hint.inner {
            if hint.failed {
                if let Some(e) = self.client.take_error()? {
                    return Err(e);
                }
            }
            return Ok(false);
        }
        // A connect that failed raises EPOLLERR; writable without it means connected, and
        // SO_ERROR need not be read.
        if hint.writable && !hint.failed {
            return Ok(true);
        }
        if let Some(e) = self.inner.take_error()? {
            return Err(e);
        }
        if hint.writable {
            return Ok(true);
        }
        connect_result(&self.inner)
    }

    /// Watches writable readiness of a socket while bytes for it wait in a pipe; stops
    /// watching it after a writable event that found nothing waiting (`spurious`).
    fn watch_writable(
        &mut self,
        poll: &Poll,
        slot: usize,
        spurious: Option<Hint>,
    ) -> io::Result<()> {
        let registry = poll.registry();
        let both = Interest::READABLE | Interest::WRITABLE;
        let want_client = self.down.buffered > 0;
        let woke_client = matches!(spurious, Some(h) if !h.inner);
        if want_client != self.client_w && (want_client || woke_client) {
            let interest = if want_client {
                both
            } else {
                Interest::READABLE
            };
            registry.reregister(&mut self.client, client_token(slot), interest)?;
            self.client_w = want_client;
        }
        let want_inner = self.up.buffered > 0;
        let woke_inner = matches!(spurious, Some(h) if h.inner);
        if want_inner != self.inner_w && (want_inner || woke_inner) {
            let interest = if want_inner { both } else { Interest::READABLE };
            registry.reregister(&mut self.inner, inner_token(slot), interest)?;
            self.inner_w = want_inner;
        }
        Ok(())
    }

    /// Moves what can be moved in the directions asked (client to inner, inner to client),
    /// borrowing pipes from `pool`.
    fn pump(&mut self, pool: &mut Vec<Pipe>, (up, down): (bool, bool)) -> io::Result<Pumped> {
        let up = match up {
            true => self
                .up
                .pump(&self.client, &self.inner, pool, self.down.shut)?,
            false => self.up.state(),
        };
        let down = match down {
            true => self
                .down
                .pump(&self.inner, &self.client, pool, self.up.shut)?,
            false => self.down.state(),
        };
        Ok(match (up, down) {
            (Pumped::Busy, _) | (_, Pumped::Busy) => Pumped::Busy,
            (Pumped::Done, Pumped::Done) => Pumped::Done,
            _ => Pumped::Idle,
        })
    }
}

/// The directions (client to inner, inner to client) an event can have let move: the one
/// reading from a readable socket and the one writing to a writable one. Sockets are watched
/// edge-triggered, so a direction not woken has nothing new to do; errors, ends of file and
/// re-pumps (no hint) look at both.
fn directions(hint: Option<Hint>) -> (bool, bool) {
    match hint {
        Some(h) if !h.failed => {
            let up = (!h.inner && h.readable) || (h.inner && h.writable);
            let down = (h.inner && h.readable) || (!h.inner && h.writable);
            (up, down)
        }
        _ => (true, true),
    }
}

impl Flow {
    /// How the direction stands when it is not pumped.
    fn state(&self) -> Pumped {
        match self.shut {
            true => Pumped::Done,
            false => Pumped::Idle,
        }
    }

    /// Drains the pipe into `dst` and refills it from `src` until one would block, the budget
    /// is spent, or `src` has ended and `dst` has been shut down for writing. The pipe is
    /// borrowed from `pool` for the call and given back when left empty, unless the direction
    /// is bulk.
    ///
    /// `last`: the other direction has ended, so `dst` is about to be closed, which sends its
    /// FIN anyway; no shutdown(2) is needed for it.
    fn pump(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        pool: &mut Vec<Pipe>,
        last: bool,
    ) -> io::Result<Pumped> {
        if self.shut {
            return Ok(Pumped::Done);
        }
        let pumped = self.pump_with(src, dst, pool, last);
        if self.buffered == 0 && self.moved < GROW_AFTER {
            if let Some(pipe) = self.pipe.take() {
                give_back(pool, pipe);
            }
        }
        pumped
    }

    fn pump_with(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        pool: &mut Vec<Pipe>,
        last: bool,
    ) -> io::Result<Pumped> {
        for _ in 0..BUDGET {
            if self.buffered > 0 {
                let Some(pipe) = &self.pipe else {
                    return Err(io::ErrorKind::BrokenPipe.into());
                };
                match sys::splice(&pipe.read, dst, self.buffered) {
                    Ok(n) => self.buffered -= n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Pumped::Idle),
                    Err(e) => return Err(e),
                }
            } else if self.eof {
                if last {
                    self.shut = true;
                    return Ok(Pumped::Done);
                }
                // The peer of `dst` sees end of file but may still send (half-close).
                if let Err(e) = dst.shutdown(Shutdown::Write) {
                    if e.raw_os_error() != Some(libc::ENOTCONN) {
                        return Err(e);
                    }
                }
                self.shut = true;
                return Ok(Pumped::Done);
            } else if !self.bulk && self.pipe.is_none() {
                match self.copy(src, dst, pool) {
                    Ok(true) => {}
                    Ok(false) => return Ok(Pumped::Idle),
                    Err(e) => return Err(e),
                }
            } else {
                let pipe = match self.pipe.take().or_else(|| pool.pop()) {
                    Some(pipe) => self.pipe.insert(pipe),
                    None => self.pipe.insert(Pipe::new()?),
                };
                match sys::splice(src, &pipe.write, PIPE_SIZE) {
                    Ok(0) => self.eof = true,
                    Ok(n) => {
                        self.buffered += n;
                        grow_if_bulk(&mut self.moved, pipe, n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Pumped::Idle),
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(Pumped::Busy)
    }
}

impl Flow {
    /// Moves one read's worth (at most a page) from `src` to `dst` through a buffer on the
    /// stack: for short messages, one read and one write cost less than two splices and a
    /// pipe. What `dst` cannot take at once goes into a
    /// borrowed pipe and leaves from there like spliced bytes, so order is kept. False when
    /// `src` had nothing to read.
    fn copy(&mut self, src: &TcpStream, dst: &TcpStream, pool: &mut Vec<Pipe>) -> io::Result<bool> {
        // Not zeroed: only what recv(2) writes is read.
        let mut buf = [MaybeUninit::<u8>::uninit(); COPY_BUF];
        // MSG_DONTWAIT, not the descriptor's flag alone: the helper inside could hold a copy
        // of an inner socket's descriptor and clear O_NONBLOCK after handing it over.
        let n = match socket2::SockRef::from(src).recv_with_flags(&mut buf, libc::MSG_DONTWAIT) {
            Ok(0) => {
                self.eof = true;
                return Ok(true);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(e) => return Err(e),
        };
        self.bulk = n == COPY_BUF;
        // SAFETY: recv(2) wrote the first `n` bytes of `buf`.
        let buf = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
        let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
        let sent = match socket2::SockRef::from(dst).send_with_flags(buf, flags) {
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        if sent < n {
            // An empty pipe takes a page at once, even one shrunk to a page by the per-user
            // pipe budget; anything short of that is refused rather than lost.
            let pipe = match pool.pop() {
                Some(pipe) => self.pipe.insert(pipe),
                None => self.pipe.insert(Pipe::new()?),
            };
            let rest = &buf[sent..n];
            if nix::unistd::write(&pipe.write, rest)? != rest.len() {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.buffered += rest.len();
        }
        Ok(true)
    }
}

/// Counts `n` more bytes moved through `pipe`, growing it once the direction has proved to be
/// a bulk transfer.
fn grow_if_bulk(moved: &mut usize, pipe: &Pipe, n: usize) {
    if *moved < GROW_AFTER {
        *moved += n;
        if *moved >= GROW_AFTER {
            pipe.grow(PIPE_SIZE);
        }
    }
}

/// Whether a non-blocking connect has finished: `Ok(false)` while in progress.
///
/// # Errors
/// The connect's failure (`SO_ERROR`), e.g. `ECONNREFUSED` when nothing listens inside.
fn connect_result(sock: &TcpStream) -> io::Result<bool> {
    if let Some(e) = sock.take_error()? {
        return Err(e);
    }
    match sock.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `sock` made non-blocking, or `None` (logged) when that fails. The helper makes every socket
/// it sends non-blocking, but a tampered one might not have.
fn nonblocking(sock: OwnedFd, port: PortId) -> Option<OwnedFd> {
    match socket2::SockRef::from(&sock).set_nonblocking(true) {
        Ok(()) => Some(sock),
        Err(e) => {
            tracing::debug!(port, error = %e, "cannot use a socket from the helper");
            None
        }
    }
}

/// Makes the coming close send a reset (`SO_LINGER` 0) rather than an orderly FIN.
pub(crate) fn reset(sock: &TcpStream) {
    let _ = socket2::SockRef::from(sock).set_linger(Some(Duration::ZERO));
}
