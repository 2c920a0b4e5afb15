//! The gate in front of the API server: accepts on `api.sock`, admits only the socket's owner
//! (and root), checks how each request is framed, and relays admitted connections to tiny_http.
//!
//! tiny_http accepts connections itself and never hands out the accepted socket, so the peer's
//! credentials (`SO_PEERCRED`, unix(7)) cannot be read on its side. The gate therefore owns the
//! public socket: it accepts, reads the peer's uid, answers anyone else with a 403 and closes,
//! and connects admitted clients to tiny_http's own listener, on two threads per connection
//! (the API sees a few requests a second at most): one hands the client's requests on, the
//! other copies tiny_http's answers back.
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
//!
//! # Request framing
//!
//! tiny_http believes what a request head says: it reads heads of any length, and it discards
//! an unread body by allocating a buffer as large as the declared remainder (a `Content-Length`
//! of a terabyte aborts the process). So the gate reads each request head itself, up to the
//! blank line, before any of it reaches tiny_http, and answers these on its own, then closes:
//!
//! | request | answer |
//! |---|---|
//! | a head longer than [`MAX_HEAD`] bytes | 431 |
//! | a head that is not ASCII, has a bare CR or LF, an empty request line, a folded or malformed header line | 400 |
//! | a `Content-Length` that is not a decimal number, several that differ, or one beside `Transfer-Encoding` | 400 |
//! | a transfer coding other than `chunked` | 501 |
//! | a body larger than [`MAX_BODY`]: declared, or decoded so far when chunked | 413 |
//! | bad chunk framing | 400 |
//!
//! The answers carry `{"message":"..."}` like the server's own errors. A body of declared
//! length is copied on as it arrives; a chunked body is read and decoded here first and handed
//! on with a `Content-Length` (tiny_http does not discard the rest of a chunked body it has not
//! read, and cannot take trailers). So tiny_http only ever sees bodies of a known length within
//! the limit, and heads within [`MAX_HEAD`].
//!
//! The first request of a connection is checked before tiny_http is involved at all. Later
//! ones (keep-alive) are checked in turn; an answer of the gate's to one of them must come after
//! tiny_http's answers to those before it, so the gate stops sending to tiny_http, which
//! answers what it has and closes its side, and only then writes its own answer.

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

use crate::server::{MAX_BODY, MAX_HEAD};
use crate::types::ErrorBody;

/// How long the gate rests after a resource error on accept (EMFILE and the like).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// How long a connection the gate answered itself is kept open to read what its client still
/// sends.
const LINGER: Duration = Duration::from_secs(1);
/// The most refused connections lingering at once.
const MAX_LINGERING: usize = 16;
/// The most bytes read and dropped from a connection refused with a 403.
const REFUSED_DISCARD: usize = 64 * 1024;
/// The most bytes read and dropped after the gate's own answer to a request: the body of a
/// refused request up to this size is taken whole, so that a client that sends it before
/// reading still gets the answer.
const ANSWERED_DISCARD: usize = 1024 * 1024;
/// Descriptors that must be free before a connection is handed to tiny_http (see
/// [`headroom`]): its two, the gate's own to tiny_http, and one to spare.
const HEADROOM: usize = 4;
/// Bytes read from a client at a time.
const READ_SIZE: usize = 8 * 1024;
/// The longest line of chunk framing (a chunk size and its extensions).
const MAX_CHUNK_LINE: usize = 1024;

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
    let answer = Refusal::new(
        403,
        format!("permission denied: uid {uid} is not the owner (uid {owner}) of this socket"),
    );
    let _ = client.set_nonblocking(true);
    let _ = (&client).write_all(&answer.to_bytes());
    let _ = client.shutdown(Shutdown::Write);

    if shared.lingering.fetch_add(1, Ordering::SeqCst) >= MAX_LINGERING {
        shared.lingering.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    let shared = shared.clone();
    let spawned = thread::Builder::new()
        .name("api-refuse".into())
        .spawn(move || {
            discard_until_closed(&client, REFUSED_DISCARD);
            shared.lingering.fetch_sub(1, Ordering::SeqCst);
        });
    if spawned.is_err() {
        // The closure, and the count it would have released, went with the error.
        tracing::debug!("cannot start a thread to close a refused API connection");
    }
}

/// Reads and drops what `client` sends until it closes, stops sending for [`LINGER`], or has
/// sent `max` bytes.
fn discard_until_closed(mut client: &UnixStream, max: usize) {
    let _ = client.set_nonblocking(false);
    let _ = client.set_read_timeout(Some(LINGER));
    let mut buf = [0u8; 8192];
    let mut left = max;
    while left > 0 {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// Serves an admitted connection, registered so that [`Gate::shutdown`] can close it.
fn relay(client: UnixStream, shared: &Shared) {
    let client = Arc::new(client);
    let id = shared.next.fetch_add(1, Ordering::Relaxed);
    lock(&shared.conns).insert(id, client.clone());
    // A shutdown that ran before the insert would have missed this connection.
    if shared.stop.load(Ordering::SeqCst) {
        let _ = client.shutdown(Shutdown::Both);
    }
    serve(&client, shared);
    lock(&shared.conns).remove(&id);
}

/// Checks the first request, then connects the client to tiny_http: this thread copies the
/// answers back while another hands the requests on.
fn serve(client: &Arc<UnixStream>, shared: &Shared) {
    let mut incoming = Incoming::new(ClientStream(client.clone()));
    let first = match incoming.next_request() {
        Ok(first) => first,
        Err(Stop::End) => return,
        Err(Stop::Refuse(refusal)) => return answer(client, &refusal),
    };
    if !headroom(client) {
        tracing::debug!("too few descriptors left to serve an API connection");
        let busy = Refusal::new(503, "too many open files in rootlesskit, try again later");
        return answer(client, &busy);
    }
    (shared.check)();
    let inner = match UnixStream::connect(shared.inner.path()) {
        Ok(inner) => Arc::new(inner),
        Err(e) => return tracing::debug!(error = %e, "cannot reach the API server"),
    };

    let ending = Arc::new(Mutex::new(Ending::Open));
    let upstream = {
        let (inner, ending) = (inner.clone(), ending.clone());
        thread::Builder::new()
            .name("api-relay".into())
            .spawn(move || {
                let refusal = forward(incoming, first, &inner);
                if let Some(refusal) = refusal {
                    let mut ending = lock(&ending);
                    if matches!(*ending, Ending::Open) {
                        *ending = Ending::Refused(refusal);
                    }
                }
                // tiny_http answers what it has, then closes its side.
                let _ = inner.shutdown(Shutdown::Write);
            })
    };
    match upstream {
        Ok(upstream) => {
            copy_answers(&inner, client, &ending);
            let _ = upstream.join();
        }
        Err(e) => {
            tracing::debug!(error = %e, "cannot start an API relay thread");
            let _ = client.shutdown(Shutdown::Both);
        }
    }
}

/// How a relayed connection ends.
///
/// An answer of the gate's must follow everything tiny_http sends before it, so it is written
/// by the thread copying tiny_http's side once that side has closed. tiny_http may also close
/// on its own (after `Connection: close`, or a request line it cannot parse): whichever thread
/// comes first settles it.
enum Ending {
    Open,
    /// A request was refused; tiny_http gets nothing more.
    Refused(Refusal),
    /// tiny_http's side has closed; a refusal found later is not sent.
    Closed,
}

/// Copies tiny_http's answers to the client, then the gate's own answer if there is one.
fn copy_answers(inner: &UnixStream, client: &UnixStream, ending: &Mutex<Ending>) {
    let copied = io::copy(&mut &*inner, &mut &*client);
    let refusal = match std::mem::replace(&mut *lock(ending), Ending::Closed) {
        Ending::Refused(refusal) => Some(refusal),
        Ending::Open | Ending::Closed => None,
    };
    match (copied, refusal) {
        (Ok(_), Some(refusal)) => answer(client, &refusal),
        (Ok(_), None) => {
            let _ = client.shutdown(Shutdown::Write);
        }
        (Err(e), _) => {
            tracing::trace!(error = %e, "API relay ended");
            let _ = inner.shutdown(Shutdown::Both);
            let _ = client.shutdown(Shutdown::Both);
        }
    }
}

/// Hands checked requests to tiny_http until the client is done, tiny_http is gone, or a
/// request is refused (returned).
fn forward(mut incoming: Incoming, first: Forward, mut inner: &UnixStream) -> Option<Refusal> {
    let mut request = first;
    loop {
        inner.write_all(&request.head).ok()?;
        match request.body {
            Body::Decoded(body) => inner.write_all(&body).ok()?,
            Body::Streamed(length) => incoming.copy_body(length, inner).ok()?,
        }
        if request.last {
            return None;
        }
        request = match incoming.next_request() {
            Ok(next) => next,
            Err(Stop::End) => return None,
            Err(Stop::Refuse(refusal)) => return Some(refusal),
        };
    }
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

/// Sends the gate's own answer and closes.
///
/// As for [`refuse`], the answer is followed by end of file and what the client still sends
/// (the body of a refused request, say) is read and dropped, up to [`ANSWERED_DISCARD`] bytes,
/// so that the client reads the answer rather than a reset.
fn answer(mut client: &UnixStream, refusal: &Refusal) {
    tracing::debug!(
        status = refusal.status,
        message = %refusal.message,
        "API gate answering itself"
    );
    let _ = client.write_all(&refusal.to_bytes());
    let _ = client.shutdown(Shutdown::Write);
    discard_until_closed(client, ANSWERED_DISCARD);
}

/// An answer the gate gives itself, after which it closes the connection.
#[derive(Debug)]
struct Refusal {
    status: u16,
    message: String,
}

impl Refusal {
    fn new(status: u16, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
        }
    }

    fn bad(what: impl std::fmt::Display) -> Refusal {
        Refusal::new(400, format!("malformed request: {what}"))
    }

    /// The server's words for the same case.
    fn too_large() -> Refusal {
        Refusal::new(
            413,
            format!("request body too large (limit {MAX_BODY} bytes)"),
        )
    }

    fn head_too_large() -> Refusal {
        Refusal::new(
            431,
            format!("request head too large (limit {MAX_HEAD} bytes)"),
        )
    }

    /// The whole answer, its body `{"message":"..."}` and a newline as the server's errors.
    fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            400 => "Bad Request",
            403 => "Forbidden",
            413 => "Payload Too Large",
            431 => "Request Header Fields Too Large",
            501 => "Not Implemented",
            503 => "Service Unavailable",
            _ => "Error",
        };
        let body = ErrorBody {
            message: self.message.clone(),
        };
        let mut body = serde_json::to_vec(&body).unwrap_or_default();
        body.push(b'\n');
        let mut answer = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            self.status,
            body.len()
        )
        .into_bytes();
        answer.extend_from_slice(&body);
        answer
    }
}

/// Why the gate stops reading a client's requests.
enum Stop {
    /// The client closed or failed (also in the middle of a request: nothing is owed to a
    /// request never completed), or tiny_http did.
    End,
    /// A request the gate answers itself.
    Refuse(Refusal),
}

/// A checked request, as it goes to tiny_http.
struct Forward {
    head: Vec<u8>,
    body: Body,
    /// tiny_http reads no further request on the connection after this one.
    last: bool,
}

enum Body {
    /// This many bytes follow the head on the client's stream.
    Streamed(usize),
    /// A chunked body, decoded.
    Decoded(Vec<u8>),
}

/// The client's side of a relayed connection, read one request at a time.
struct Incoming<R = ClientStream> {
    client: R,
    /// Bytes read from the client and not handed on yet, from `pos`.
    buf: Vec<u8>,
    pos: usize,
}

/// A relayed client's stream, read through its shared handle.
struct ClientStream(Arc<UnixStream>);

impl Read for ClientStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self.0).read(buf)
    }
}

impl<R: Read> Incoming<R> {
    fn new(client: R) -> Incoming<R> {
        Incoming {
            client,
            buf: Vec::new(),
            pos: 0,
        }
    }

    fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Reads more from the client; [`Stop::End`] at end of file or on an error.
    fn fill(&mut self) -> Result<(), Stop> {
        self.buf.drain(..self.pos);
        self.pos = 0;
        let old = self.buf.len();
        self.buf.resize(old + READ_SIZE, 0);
        loop {
            match self.client.read(&mut self.buf[old..]) {
                Ok(n) if n > 0 => {
                    self.buf.truncate(old + n);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => {
                    self.buf.truncate(old);
                    return Err(Stop::End);
                }
            }
        }
    }

    /// Has at least `n` bytes buffered.
    fn want(&mut self, n: usize) -> Result<(), Stop> {
        while self.buffered().len() < n {
            self.fill()?;
        }
        Ok(())
    }

    /// Takes the next line without its CRLF; `None` if it is longer than `max` bytes.
    fn line(&mut self, max: usize) -> Result<Option<Vec<u8>>, Stop> {
        let mut from = 0;
        loop {
            if let Some(at) = find(&self.buffered()[from..], b"\r\n") {
                let end = from + at;
                if end > max {
                    return Ok(None);
                }
                let line = self.buffered()[..end].to_vec();
                self.pos += end + 2;
                return Ok(Some(line));
            }
            if self.buffered().len() > max {
                return Ok(None);
            }
            from = self.buffered().len().saturating_sub(1);
            self.fill()?;
        }
    }

    /// Reads and checks the next request head, and a chunked body with it.
    fn next_request(&mut self) -> Result<Forward, Stop> {
        let mut from = 0;
        let end = loop {
            if let Some(at) = find(&self.buffered()[from..], b"\r\n\r\n") {
                break from + at + 4;
            }
            if self.buffered().len() >= MAX_HEAD {
                return Err(Stop::Refuse(Refusal::head_too_large()));
            }
            from = self.buffered().len().saturating_sub(3);
            self.fill()?;
        };
        if end > MAX_HEAD {
            return Err(Stop::Refuse(Refusal::head_too_large()));
        }
        let head = self.buffered()[..end].to_vec();
        self.pos += end;

        let checked = check_head(&head).map_err(Stop::Refuse)?;
        let (head, body) = match checked.framing {
            Framing::Length(length) => match usize::try_from(length) {
                Ok(length) if length <= MAX_BODY => (head, Body::Streamed(length)),
                _ => return Err(Stop::Refuse(Refusal::too_large())),
            },
            Framing::Chunked => {
                let body = self.chunked_body()?;
                (dechunked_head(&head, body.len()), Body::Decoded(body))
            }
        };
        Ok(Forward {
            head,
            body,
            last: checked.last,
        })
    }

    /// Reads a chunked body (RFC 9112 section 7.1) and returns it decoded; trailer fields are
    /// dropped, the API has no use for them.
    fn chunked_body(&mut self) -> Result<Vec<u8>, Stop> {
        let bad = |what: &str| Stop::Refuse(Refusal::bad(format!("chunked body: {what}")));
        let mut body = Vec::new();
        loop {
            let line = self
                .line(MAX_CHUNK_LINE)?
                .ok_or_else(|| bad("chunk size line too long"))?;
            let size = chunk_size(&line).ok_or_else(|| bad("bad chunk size"))?;
            if size == 0 {
                break;
            }
            let size = match usize::try_from(size) {
                Ok(size) if size <= MAX_BODY - body.len() => size,
                _ => return Err(Stop::Refuse(Refusal::too_large())),
            };
            self.want(size + 2)?;
            let chunk = &self.buffered()[..size + 2];
            if !chunk.ends_with(b"\r\n") {
                return Err(bad("chunk data not followed by CRLF"));
            }
            body.extend_from_slice(&chunk[..size]);
            self.pos += size + 2;
        }
        let mut left = MAX_HEAD;
        loop {
            let line = self
                .line(left)?
                .ok_or_else(|| Stop::Refuse(Refusal::head_too_large()))?;
            if line.is_empty() {
                return Ok(body);
            }
            left = left.saturating_sub(line.len() + 2);
        }
    }

    /// Copies the next `length` bytes of the client's stream to `to`.
    fn copy_body(&mut self, mut length: usize, mut to: impl Write) -> Result<(), Stop> {
        loop {
            let now = length.min(self.buffered().len());
            if now > 0 {
                to.write_all(&self.buffered()[..now])
                    .map_err(|_| Stop::End)?;
                self.pos += now;
                length -= now;
            }
            if length == 0 {
                return Ok(());
            }
            self.fill()?;
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// How a request's body is framed.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    /// This many bytes follow the head (0 without `Content-Length`).
    Length(u64),
    Chunked,
}

/// What the gate needs to know of a request head.
#[derive(Debug, PartialEq, Eq)]
struct Checked {
    framing: Framing,
    /// tiny_http's rule for the last request of a connection: `Connection` (its first such
    /// header) containing `close` or `upgrade`, or HTTP/1.0 without `keep-alive`.
    last: bool,
}

/// Checks a request head (up to and with the blank line) and finds how its body is framed.
///
/// Stricter than tiny_http wherever the two could disagree on where a body ends, so that both
/// see the same requests. tiny_http reads the first `Content-Length` and ignores it beside a
/// `Transfer-Encoding`; differing or unparsable lengths and the combination are refused here.
fn check_head(head: &[u8]) -> Result<Checked, Refusal> {
    let text = head.strip_suffix(b"\r\n\r\n").unwrap_or(head);
    let text = std::str::from_utf8(text)
        .ok()
        .filter(|text| text.is_ascii())
        .ok_or_else(|| Refusal::bad("request head is not ASCII"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    if request_line.trim().is_empty() {
        return Err(Refusal::bad("empty request line"));
    }
    if request_line.contains(['\r', '\n']) {
        return Err(Refusal::bad("bare CR or LF in the request line"));
    }

    let mut length: Option<u64> = None;
    let mut codings: Vec<&str> = Vec::new();
    let mut connection: Option<String> = None;
    for line in lines {
        if line.contains(['\r', '\n']) {
            return Err(Refusal::bad("bare CR or LF in a header line"));
        }
        if line.starts_with([' ', '\t']) {
            return Err(Refusal::bad("folded header line"));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| Refusal::bad(format!("header line without a colon: {line:?}")))?;
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Refusal::bad(format!("bad header name: {name:?}")));
        }
        let value = value.trim();
        if name.eq_ignore_ascii_case("Content-Length") {
            let declared = content_length(value)?;
            if length.is_some_and(|earlier| earlier != declared) {
                return Err(Refusal::bad("Content-Length headers that differ"));
            }
            length = Some(declared);
        } else if name.eq_ignore_ascii_case("Transfer-Encoding") {
            codings.push(value);
        } else if name.eq_ignore_ascii_case("Connection") && connection.is_none() {
            connection = Some(value.to_ascii_lowercase());
        }
    }

    let framing = match (codings.as_slice(), length) {
        ([], length) => Framing::Length(length.unwrap_or(0)),
        (_, Some(_)) => return Err(Refusal::bad("both Transfer-Encoding and Content-Length")),
        ([coding], None) if coding.eq_ignore_ascii_case("chunked") => Framing::Chunked,
        (codings, None) => {
            return Err(Refusal::new(
                501,
                format!("unsupported Transfer-Encoding: {}", codings.join(", ")),
            ))
        }
    };
    let http10 = request_line.trim().split(' ').nth(2) == Some("HTTP/1.0");
    let last = match connection.as_deref() {
        Some(value) if value.contains("close") || value.contains("upgrade") => true,
        Some(value) => http10 && !value.contains("keep-alive"),
        None => http10,
    };
    Ok(Checked { framing, last })
}

/// A `Content-Length` value: decimal digits only (no sign, no list); too many digits saturate,
/// which is over any limit anyway.
fn content_length(value: &str) -> Result<u64, Refusal> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Refusal::bad(format!("bad Content-Length: {value:?}")));
    }
    Ok(value.bytes().fold(0u64, |n, digit| {
        n.saturating_mul(10).saturating_add(u64::from(digit - b'0'))
    }))
}

/// The size in a chunk-size line: hex digits, optional blanks, and extensions after `;`
/// (dropped). Too many digits saturate.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let size = line.split(|&b| b == b';').next().unwrap_or_default();
    let blanks = size
        .iter()
        .rev()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    let size = &size[..size.len() - blanks];
    if size.is_empty() {
        return None;
    }
    size.iter().try_fold(0u64, |n, &digit| {
        let digit = char::from(digit).to_digit(16)?;
        Some(n.saturating_mul(16).saturating_add(u64::from(digit)))
    })
}

/// The head tiny_http gets for a decoded chunked body: without `Transfer-Encoding`, which no
/// longer applies, nor `Expect` (the body is already here), and with the decoded length.
///
/// A client that waits for `100 Continue` before sending a chunked body therefore waits for its
/// own timeout first (curl: one second).
fn dechunked_head(head: &[u8], length: usize) -> Vec<u8> {
    let text = String::from_utf8_lossy(head.strip_suffix(b"\r\n\r\n").unwrap_or(head));
    let mut out = Vec::with_capacity(head.len() + 32);
    for (i, line) in text.split("\r\n").enumerate() {
        let name = line.split(':').next().unwrap_or_default();
        let dropped =
            name.eq_ignore_ascii_case("Transfer-Encoding") || name.eq_ignore_ascii_case("Expect");
        if i == 0 || !dropped {
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(format!("Content-Length: {length}\r\n\r\n").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framing(head: &str) -> Result<Checked, u16> {
        check_head(head.as_bytes()).map_err(|refusal| refusal.status)
    }

    fn length(n: u64, last: bool) -> Result<Checked, u16> {
        Ok(Checked {
            framing: Framing::Length(n),
            last,
        })
    }

    #[test]
    fn heads_are_framed_as_tiny_http_reads_them() {
        let get = "GET /v1/info HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(framing(get), length(0, false));
        let post = "POST /v1/ports HTTP/1.1\r\ncontent-length:  12 \r\n\r\n";
        assert_eq!(framing(post), length(12, false));
        let same = "POST / HTTP/1.1\r\nContent-Length: 7\r\nContent-Length: 007\r\n\r\n";
        assert_eq!(framing(same), length(7, false));
        let chunked = "POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n";
        assert_eq!(
            framing(chunked),
            Ok(Checked {
                framing: Framing::Chunked,
                last: false
            })
        );
        let huge = "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n";
        assert_eq!(framing(huge), length(u64::MAX, false));
    }

    #[test]
    fn the_last_request_follows_tiny_http() {
        let close = "GET / HTTP/1.1\r\nConnection: Close\r\n\r\n";
        assert_eq!(framing(close), length(0, true));
        let upgrade = "GET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n";
        assert_eq!(framing(upgrade), length(0, true));
        assert_eq!(framing("GET / HTTP/1.0\r\n\r\n"), length(0, true));
        let kept = "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
        assert_eq!(framing(kept), length(0, false));
    }

    #[test]
    fn ambiguous_or_malformed_heads_are_refused() {
        for (head, status) in [
            ("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nContent-Length:\r\n\r\n", 400),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
            ),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                501,
            ),
            ("GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nno colon\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nX: a\nContent-Length: 9\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nX: \u{e9}\r\n\r\n", 400),
            ("\r\nGET / HTTP/1.1\r\n\r\n", 400),
            ("\r\n\r\n", 400),
        ] {
            assert_eq!(framing(head).map(|_| ()), Err(status), "{head:?}");
        }
    }

    #[test]
    fn chunk_sizes_are_hex_with_extensions() {
        assert_eq!(chunk_size(b"1a"), Some(26));
        assert_eq!(chunk_size(b"0"), Some(0));
        assert_eq!(chunk_size(b"A ;name=value"), Some(10));
        assert_eq!(chunk_size(b"00000000000000000000001"), Some(1));
        assert_eq!(chunk_size(b"fffffffffffffffffffff"), Some(u64::MAX));
        for bad in [&b""[..], b"zz", b"-1", b"+1", b" 1", b"0x10", b";ext"] {
            assert_eq!(chunk_size(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_decoded_head_declares_the_length() {
        let head = b"POST /v1/ports HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\n\
                     Expect: 100-continue\r\n\r\n";
        assert_eq!(
            dechunked_head(head, 42),
            b"POST /v1/ports HTTP/1.1\r\nHost: x\r\nContent-Length: 42\r\n\r\n"
        );
    }

    #[test]
    fn answers_have_the_servers_error_shape() {
        let answer = Refusal::too_large().to_bytes();
        let answer = String::from_utf8(answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
            "{head}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        assert_eq!(
            body,
            format!("{{\"message\":\"request body too large (limit {MAX_BODY} bytes)\"}}\n")
        );
    }
}

/// What the gate makes of one request read by [`read_requests`].
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateRead {
    /// Passed on to the HTTP server: the head as forwarded, and the body's bytes.
    Forwarded { head: Vec<u8>, body: Vec<u8> },
    /// Answered by the gate itself with this status; nothing further is read.
    Refused(u16),
}

/// Reads `data` as the gate reads a client's stream that ends after it: each request head is
/// checked and each body framed, as for relaying to the HTTP server. Stops at the end of the
/// data, after a refusal, or after a request that is the connection's last. Not part of the
/// API: it exists for the fuzz target `api_gate`.
#[doc(hidden)]
pub fn read_requests(data: &[u8]) -> Vec<GateRead> {
    let mut incoming = Incoming::new(data);
    let mut out = Vec::new();
    loop {
        let request = match incoming.next_request() {
            Ok(request) => request,
            Err(Stop::End) => return out,
            Err(Stop::Refuse(refusal)) => {
                out.push(GateRead::Refused(refusal.status));
                return out;
            }
        };
        let body = match request.body {
            Body::Decoded(body) => body,
            Body::Streamed(length) => {
                let mut body = Vec::new();
                if incoming.copy_body(length, &mut body).is_err() {
                    return out; // the stream ended inside the body
                }
                body
            }
        };
        out.push(GateRead::Forwarded {
            head: request.head,
            body,
        });
        if request.last {
            return out;
        }
    }
}

/// Checks a head as the gate does: `Some(body length)` for a head that needs no decoding
/// (`Content-Length` framing), `None` when it would be refused or is chunked. Not part of the
/// API: it exists for the fuzz target `api_gate`, to check that forwarded heads pass again.
#[doc(hidden)]
pub fn head_body_length(head: &[u8]) -> Option<u64> {
    match check_head(head).ok()?.framing {
        Framing::Length(length) => Some(length),
        Framing::Chunked => None,
    }
}
