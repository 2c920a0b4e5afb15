//! The gate in front of the API server: accepts on `api.sock`, admits only the socket's owner
//! (and root), and relays admitted connections to tiny_http.
//!
//! tiny_http accepts connections itself and never hands out the accepted socket, so the peer's
//! credentials (`SO_PEERCRED`, unix(7)) cannot be read on its side. The gate therefore owns the
//! public socket: it accepts, reads the peer's uid, answers anyone else with a 403 and closes,
//! and connects admitted clients to tiny_http's own listener, copying bytes both ways on two
//! threads per connection (the API sees a few requests a second at most).
//!
//! tiny_http's listener must be unreachable for everybody else, or the check could be walked
//! around. It has no name: it is bound under a temporary name in the directory of `api.sock`
//! (through `/proc/self/fd/DIR/NAME`, so the long-path limit of `sun_path` does not bite), the
//! socket file is opened with `O_PATH`, and the name is unlinked at once. The gate connects
//! through `/proc/self/fd/N` of that `O_PATH` descriptor, a path that resolves only in this
//! process (or for someone allowed to `ptrace` it, who can do anything the process can).
//!
//! The file mode (0600 in a 0700 directory) stays the first line of defence; the gate is what
//! still holds when the mode is loosened, and it names the reason in its answer.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use nix::fcntl::{open, openat, OFlag};
use nix::sys::socket::{self as sock, sockopt, AddressFamily, Backlog, SockFlag, SockType};
use nix::sys::stat::Mode;
use nix::unistd::{unlinkat, Uid, UnlinkatFlags};

/// How long the gate rests after a resource error on accept (EMFILE and the like).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How long a refused connection is kept open to read what its client still sends.
const LINGER: Duration = Duration::from_secs(1);
/// The most refused connections lingering at once.
const MAX_LINGERING: usize = 16;
/// Descriptors that must be free before a connection is handed to tiny_http (see
/// [`headroom`]): its two, the gate's own to tiny_http, and one to spare.
const HEADROOM: usize = 4;

/// A listening socket without a name, reachable only through this process's descriptors.
#[derive(Debug)]
pub(crate) struct Hidden {
    /// `O_PATH` descriptor of the unlinked socket file.
    file: OwnedFd,
    /// The directory the socket was bound in: tiny_http's `Drop` connects to and removes its
    /// bind path, which names this descriptor, so it must stay open until then.
    _dir: OwnedFd,
}

impl Hidden {
    /// The path that connects to the hidden listener, valid in this process only.
    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

/// Creates a listening unix socket in `dir` and removes its name; see the module docs.
///
/// # Errors
/// Opening `dir`, creating, binding or opening the socket failed (e.g. no `/proc`).
pub(crate) fn hidden_listener(dir: &Path) -> io::Result<(UnixListener, Hidden)> {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let dirfd = open(
        dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let name = format!(
        ".api-gate-{}-{}",
        std::process::id(),
        SERIAL.fetch_add(1, Ordering::Relaxed)
    );
    let bind_path = format!("/proc/self/fd/{}/{name}", dirfd.as_raw_fd());

    let fd = sock::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    nix::sys::stat::fchmod(&fd, Mode::S_IRUSR | Mode::S_IWUSR)?;
    sock::bind(fd.as_raw_fd(), &sock::UnixAddr::new(bind_path.as_str())?)?;
    let file = openat(
        &dirfd,
        name.as_str(),
        OFlag::O_PATH | OFlag::O_CLOEXEC,
        Mode::empty(),
    );
    // The name goes whatever happened: from now on only `file` leads to the socket.
    let unlinked = unlinkat(&dirfd, name.as_str(), UnlinkatFlags::NoRemoveDir);
    let file = file?;
    unlinked?;
    sock::listen(&fd, Backlog::MAXCONN)?;
    Ok((UnixListener::from(fd), Hidden { file, _dir: dirfd }))
}

/// The running gate: an accept thread and the connections it relays.
#[derive(Debug)]
pub(crate) struct Gate {
    /// A second handle on the public listener, to stop the accept thread.
    listener: UnixListener,
    thread: JoinHandle<()>,
    shared: Arc<Shared>,
}

struct Shared {
    stop: AtomicBool,
    /// The uid allowed besides root: the server's effective uid, which owns the socket file.
    owner: Uid,
    inner: Arc<Hidden>,
    /// Client sockets of the relayed connections, to close them at shutdown.
    conns: Mutex<HashMap<u64, Arc<UnixStream>>>,
    next: AtomicU64,
    /// Refused connections lingering (see [`refuse`]).
    lingering: AtomicUsize,
    /// Called before a connection is handed to tiny_http (the server restarts it if needed).
    check: Box<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("owner", &self.owner)
            .finish()
    }
}

impl Gate {
    /// Starts admitting connections from `public` to the hidden listener `inner`.
    ///
    /// # Errors
    /// Cloning the listener or starting the thread failed.
    /// `check` runs before each admitted connection is handed over.
    pub(crate) fn spawn(
        public: UnixListener,
        inner: Arc<Hidden>,
        check: Box<dyn Fn() + Send + Sync>,
    ) -> io::Result<Gate> {
        let listener = public.try_clone()?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            owner: Uid::effective(),
            inner,
            conns: Mutex::default(),
            next: AtomicU64::new(0),
            lingering: AtomicUsize::new(0),
            check,
        });
        let thread = {
            let shared = shared.clone();
            thread::Builder::new()
                .name("api-gate".into())
                .spawn(move || accept_loop(&public, &shared))?
        };
        Ok(Gate {
            listener,
            thread,
            shared,
        })
    }

    /// Stops accepting and closes every relayed connection (their clients see end of file).
    pub(crate) fn shutdown(self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // accept() on a shut-down listener fails with EINVAL, ending the loop.
        let _ = sock::shutdown(self.listener.as_raw_fd(), sock::Shutdown::Both);
        if self.thread.join().is_err() {
            tracing::debug!("API gate thread panicked");
        }
        let conns = std::mem::take(&mut *lock(&self.shared.conns));
        for conn in conns.values() {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn accept_loop(public: &UnixListener, shared: &Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match public.accept() {
            Ok((client, _)) => admit(client, shared),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) if shared.stop.load(Ordering::SeqCst) => return,
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => return,
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS, ENOMEM, ECONNABORTED pass: keep the API alive.
                tracing::debug!(error = %e, "API accept failed, retrying");
                thread::sleep(ACCEPT_BACKOFF);
            }
        }
    }
}

/// Checks the peer of `client` and relays it, or refuses it with a 403.
fn admit(client: UnixStream, shared: &Arc<Shared>) {
    let uid = match sock::getsockopt(&client, sockopt::PeerCredentials) {
        Ok(cred) => Uid::from_raw(cred.uid()),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read API peer credentials, closing");
            return;
        }
    };
    if uid != shared.owner && !uid.is_root() {
        tracing::debug!(%uid, owner = %shared.owner, "refusing API connection from another user");
        return refuse(client, uid, shared.owner, shared);
    }

    let shared_conn = shared.clone();
    let spawned = thread::Builder::new()
        .name("api-relay".into())
        .spawn(move || relay(client, &shared_conn));
    if let Err(e) = spawned {
        tracing::debug!(error = %e, "cannot start an API relay thread");
    }
}

/// Answers 403 without reading the request and closes, never blocking the gate.
///
/// Closing a unix socket with unread data resets it: the client would read `ECONNRESET`
/// instead of the answer. So the answer is followed by end of file, and the socket lingers on a
/// short-lived thread that discards what the client still sends, for at most [`LINGER`] (at
/// most [`MAX_LINGERING`] such threads; beyond that the socket is closed at once).
fn refuse(client: UnixStream, uid: Uid, owner: Uid, shared: &Arc<Shared>) {
    let body = format!(
        "{{\"message\":\"permission denied: uid {uid} is not the owner (uid {owner}) of this socket\"}}\n"
    );
    let answer = format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = client.set_nonblocking(true);
    let _ = (&client).write_all(answer.as_bytes());
    let _ = client.shutdown(Shutdown::Write);

    if shared.lingering.fetch_add(1, Ordering::SeqCst) >= MAX_LINGERING {
        shared.lingering.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    let shared = shared.clone();
    let spawned = thread::Builder::new()
        .name("api-refuse".into())
        .spawn(move || {
            discard_until_closed(client);
            shared.lingering.fetch_sub(1, Ordering::SeqCst);
        });
    if spawned.is_err() {
        // The closure, and the count it would have released, went with the error.
        tracing::debug!("cannot start a thread to close a refused API connection");
    }
}

/// Reads and drops what `client` sends until it closes, for at most [`LINGER`] and 64 KiB.
fn discard_until_closed(mut client: UnixStream) {
    let _ = client.set_nonblocking(false);
    let _ = client.set_read_timeout(Some(LINGER));
    let mut buf = [0u8; 4096];
    let mut left: usize = 64 * 1024;
    while left > 0 {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// Connects `client` to tiny_http and copies both ways until both directions end.
fn relay(client: UnixStream, shared: &Shared) {
    if !headroom(&client) {
        return busy(client);
    }
    (shared.check)();
    let inner = match UnixStream::connect(shared.inner.path()) {
        Ok(inner) => Arc::new(inner),
        Err(e) => return tracing::debug!(error = %e, "cannot reach the API server"),
    };
    let client = Arc::new(client);
    let id = shared.next.fetch_add(1, Ordering::Relaxed);
    lock(&shared.conns).insert(id, client.clone());
    // A shutdown that ran before the insert would have missed this connection.
    if shared.stop.load(Ordering::SeqCst) {
        let _ = client.shutdown(Shutdown::Both);
    }

    let upstream = {
        let (client, inner) = (client.clone(), inner.clone());
        thread::Builder::new()
            .name("api-relay".into())
            .spawn(move || pump(&client, &inner))
    };
    match upstream {
        Ok(upstream) => {
            pump(&inner, &client);
            let _ = upstream.join();
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot start an API relay thread");
            let _ = client.shutdown(Shutdown::Both);
        }
    }
    lock(&shared.conns).remove(&id);
}

/// Whether a few descriptors are free for tiny_http to take the connection.
///
/// tiny_http's accept thread needs two descriptors per connection, and it panics (ending the
/// API for good) when duplicating the second fails (`EMFILE`, tiny_http 0.12
/// `RefinedTcpStream::new`). The port driver shares the process's descriptors and may have
/// taken them all under load; then the client gets a 503 instead. Another thread can still
/// take the last descriptors between this check and tiny_http's accept: this narrows that
/// window, it does not close it.
fn headroom(client: &UnixStream) -> bool {
    let spares: Vec<_> = (0..HEADROOM)
        .map_while(|_| client.try_clone().ok())
        .collect();
    spares.len() == HEADROOM
}

/// Answers 503 (out of descriptors) without reading the request and closes.
fn busy(client: UnixStream) {
    tracing::debug!("too few descriptors left to serve an API connection");
    let body = "{\"message\":\"too many open files in rootlesskit, try again later\"}\n";
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = client.set_nonblocking(true);
    let _ = (&client).write_all(answer.as_bytes());
    let _ = client.shutdown(Shutdown::Write);
}

/// Copies `from` to `to`; at end of file half-closes `to`, on error closes both.
fn pump(from: &UnixStream, to: &UnixStream) {
    match io::copy(&mut &*from, &mut &*to) {
        Ok(_) => {
            let _ = to.shutdown(Shutdown::Write);
        }
        Err(e) => {
            tracing::trace!(error = %e, "API relay ended");
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        }
    }
}
