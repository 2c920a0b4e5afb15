//! Data-path workers: each runs a mio event loop that copies the bytes of its TCP connections.
//!
//! A worker receives connection pairs (the accepted client, the socket the helper opened
//! inside) from the control loop, waits for the inner connect to finish, then moves bytes both
//! ways with splice(2) through one pipe per direction, so payload never enters user space.
//! Half-close is propagated: when a direction reads end of file and its pipe is drained, the
//! other socket is shut down for writing; the pair closes once both directions have ended. An
//! error on either side resets both. Workers never block and own no listener.

use std::collections::VecDeque;
use std::io;
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use rkport_core::PortId;

use crate::sys::{self, Pipe};

/// Capacity asked for the pipe of a bulk direction, and the most bytes moved by one splice.
const PIPE_SIZE: usize = 256 * 1024;
/// Bytes a direction moves before its pipe grows to `PIPE_SIZE`. Short exchanges keep the
/// default 64 KiB pipe: pipe capacity counts against a per-user budget
/// (`/proc/sys/fs/pipe-user-pages-soft`), past which new pipes shrink to a page.
const GROW_AFTER: usize = 1024 * 1024;
/// Splice calls per direction before a busy pair yields to the others.
const BUDGET: usize = 32;
/// Empty pipes kept for reuse by a worker.
const POOL_MAX: usize = 16;
const WAKER: Token = Token(0);

/// What the control loop and the driver ask of a worker.
#[derive(Debug)]
pub(crate) enum WorkerCmd {
    /// Forward between `client` and `inner` (whose connect may still be in progress).
    Conn {
        port: PortId,
        client: TcpStream,
        inner: OwnedFd,
    },
    /// Close every connection of `port`, then signal `done`.
    Remove { port: PortId, done: SyncSender<()> },
    /// Close everything and end the thread.
    Stop,
}

/// The sending side of a worker's command queue.
#[derive(Debug, Clone)]
pub(crate) struct WorkerTx {
    tx: Sender<WorkerCmd>,
    waker: Arc<Waker>,
}

impl WorkerTx {
    /// Queues `cmd` and wakes the worker; false when the worker has stopped.
    pub fn send(&self, cmd: WorkerCmd) -> bool {
        self.queue(cmd) && self.wake()
    }

    /// Queues `cmd` without waking the worker; call [`WorkerTx::wake`] after a batch.
    pub fn queue(&self, cmd: WorkerCmd) -> bool {
        self.tx.send(cmd).is_ok()
    }

    /// Wakes the worker to apply what was queued; false when the worker has stopped.
    pub fn wake(&self) -> bool {
        self.waker.wake().is_ok()
    }
}

/// Starts worker thread number `n`.
pub(crate) fn spawn(n: usize) -> io::Result<(WorkerTx, JoinHandle<()>)> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = Worker {
        poll,
        _waker: waker.clone(),
        rx,
        pairs: Vec::new(),
        free: Vec::new(),
        pool: Vec::new(),
        again: VecDeque::new(),
    };
    let thread = std::thread::Builder::new()
        .name(format!("rkport-builtin-{n}"))
        .spawn(move || worker.run())?;
    Ok((WorkerTx { tx, waker }, thread))
}

/// One direction of a pair: bytes read from one socket, waiting in `pipe` for the other.
#[derive(Debug)]
struct Flow {
    pipe: Option<Pipe>,
    buffered: usize,
    /// Bytes moved so far, up to `GROW_AFTER`.
    moved: usize,
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

#[derive(Debug)]
struct Worker {
    poll: Poll,
    /// Kept here too: closing the eventfd while a wake-up is pending would lose it.
    _waker: Arc<Waker>,
    rx: Receiver<WorkerCmd>,
    pairs: Vec<Option<Pair>>,
    free: Vec<usize>,
    pool: Vec<Pipe>,
    again: VecDeque<usize>,
}

/// Slot `i` registers its client as token `2i + 1` and its inner socket as `2i + 2`.
fn slot_of(token: Token) -> usize {
    (token.0 - 1) / 2
}

impl Worker {
    fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = (!self.again.is_empty()).then_some(Duration::ZERO);
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::debug!(error = %e, "worker poll failed, closing its connections");
                return;
            }

            for event in events.iter() {
                if event.token() == WAKER {
                    if !self.commands() {
                        return;
                    }
                } else {
                    let hint = Hint {
                        inner: event.token().0 % 2 == 0,
                        writable: event.is_writable(),
                        failed: event.is_error() || event.is_read_closed(),
                    };
                    self.service(slot_of(event.token()), Some(hint));
                }
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

    /// Applies queued commands; false when the worker must stop.
    fn commands(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(WorkerCmd::Conn {
                    port,
                    client,
                    inner,
                }) => self.add(port, client, inner),
                Ok(WorkerCmd::Remove { port, done }) => {
                    self.close_port(port);
                    let _ = done.send(());
                }
                Ok(WorkerCmd::Stop) | Err(TryRecvError::Disconnected) => return false,
                Err(TryRecvError::Empty) => return true,
            }
        }
    }

    fn add(&mut self, port: PortId, client: TcpStream, inner: OwnedFd) {
        let inner = std::net::TcpStream::from(inner);
        if let Err(e) = inner.set_nonblocking(true) {
            tracing::debug!(port, error = %e, "cannot use the inner socket");
            return reset(&client);
        }
        let pair = match self.new_pair(port, client, TcpStream::from_std(inner)) {
            Ok(pair) => pair,
            Err((client, e)) => {
                tracing::debug!(port, error = %e, "cannot set up a forwarded connection");
                return reset(&client);
            }
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
            .register(&mut pair.client, Token(2 * slot + 1), Interest::READABLE)
            .and_then(|()| registry.register(&mut pair.inner, Token(2 * slot + 2), both));
        if let Err(e) = registered {
            tracing::debug!(port, error = %e, "cannot watch a forwarded connection");
            self.close(slot, true);
        }
    }

    /// Builds a pair with a pipe per direction, handing the client back on failure.
    fn new_pair(
        &mut self,
        port: PortId,
        client: TcpStream,
        inner: TcpStream,
    ) -> Result<Pair, (TcpStream, io::Error)> {
        let up = self.pipe();
        let down = self.pipe();
        let (up, down) = match (up, down) {
            (Ok(up), Ok(down)) => (up, down),
            (Err(e), _) | (_, Err(e)) => return Err((client, e)),
        };
        // TCP_NODELAY (as Go sets on every connection) is inherited by `client` from its
        // listener and set on `inner` by the helper.
        Ok(Pair {
            port,
            client,
            inner,
            connected: false,
            client_w: false,
            inner_w: true,
            queued: false,
            up: Flow::new(up),
            down: Flow::new(down),
        })
    }

    fn pipe(&mut self) -> io::Result<Pipe> {
        match self.pool.pop() {
            Some(pipe) => Ok(pipe),
            None => Pipe::new(),
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
        if !pair.connected {
            spurious = None;
            match pair.connecting(hint) {
                Ok(false) => return,
                Ok(true) => pair.connected = true,
                Err(e) => {
                    tracing::debug!(port = pair.port, error = %e, "forwarded connection failed before connect");
                    return self.close(slot, true);
                }
            }
        }

        let pumped = pair.pump();
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
            Ok(Pumped::Idle) => self.recycle(slot),
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

    /// Takes back the pipes of directions that have ended, for later pairs.
    fn recycle(&mut self, slot: usize) {
        let Some(Some(pair)) = self.pairs.get_mut(slot) else {
            return;
        };
        for flow in [&mut pair.up, &mut pair.down] {
            if flow.shut && self.pool.len() < POOL_MAX {
                if let Some(pipe) = flow.pipe.take() {
                    self.pool.push(pipe);
                }
            }
        }
    }

    /// Closes slot `slot`, resetting both sockets when `abort`.
    fn close(&mut self, slot: usize, abort: bool) {
        let Some(pair) = self.pairs.get_mut(slot).and_then(Option::take) else {
            return;
        };
        // Closing the sockets below removes them from the poll; no deregister needed.
        if abort {
            reset(&pair.client);
            reset(&pair.inner);
        }
        for flow in [pair.up, pair.down] {
            if let Some(pipe) = flow.pipe.filter(|_| flow.buffered == 0) {
                if self.pool.len() < POOL_MAX {
                    self.pool.push(pipe);
                }
            }
        }
        self.free.push(slot);
    }

    fn close_port(&mut self, port: PortId) {
        for slot in 0..self.pairs.len() {
            if matches!(&self.pairs[slot], Some(pair) if pair.port == port) {
                self.close(slot, false);
            }
        }
    }
}

/// What woke a pair: which socket, and how.
#[derive(Debug, Clone, Copy)]
struct Hint {
    /// The inner socket (else the client).
    inner: bool,
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
            registry.reregister(&mut self.client, Token(2 * slot + 1), interest)?;
            self.client_w = want_client;
        }
        let want_inner = self.up.buffered > 0;
        let woke_inner = matches!(spurious, Some(h) if h.inner);
        if want_inner != self.inner_w && (want_inner || woke_inner) {
            let interest = if want_inner { both } else { Interest::READABLE };
            registry.reregister(&mut self.inner, Token(2 * slot + 2), interest)?;
            self.inner_w = want_inner;
        }
        Ok(())
    }

    /// Moves what can be moved in both directions.
    fn pump(&mut self) -> io::Result<Pumped> {
        let up = self.up.pump(&self.client, &self.inner)?;
        let down = self.down.pump(&self.inner, &self.client)?;
        Ok(match (up, down) {
            (Pumped::Busy, _) | (_, Pumped::Busy) => Pumped::Busy,
            (Pumped::Done, Pumped::Done) => Pumped::Done,
            _ => Pumped::Idle,
        })
    }
}

impl Flow {
    fn new(pipe: Pipe) -> Flow {
        Flow {
            pipe: Some(pipe),
            buffered: 0,
            moved: 0,
            eof: false,
            shut: false,
        }
    }

    /// Drains the pipe into `dst` and refills it from `src` until one would block, the budget
    /// is spent, or `src` has ended and `dst` has been shut down for writing.
    fn pump(&mut self, src: &TcpStream, dst: &TcpStream) -> io::Result<Pumped> {
        if self.shut {
            return Ok(Pumped::Done);
        }
        let Some(pipe) = &self.pipe else {
            return Ok(Pumped::Done);
        };
        for _ in 0..BUDGET {
            if self.buffered > 0 {
                match sys::splice(&pipe.read, dst, self.buffered) {
                    Ok(n) => self.buffered -= n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Pumped::Idle),
                    Err(e) => return Err(e),
                }
            } else if self.eof {
                // The peer of `dst` sees end of file but may still send (half-close).
                if let Err(e) = dst.shutdown(Shutdown::Write) {
                    if e.raw_os_error() != Some(libc::ENOTCONN) {
                        return Err(e);
                    }
                }
                self.shut = true;
                return Ok(Pumped::Done);
            } else {
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

/// Makes the coming close send a reset (`SO_LINGER` 0) rather than an orderly FIN.
pub(crate) fn reset(sock: &TcpStream) {
    let _ = socket2::SockRef::from(sock).set_linger(Some(Duration::ZERO));
}
