//! The API server: RootlessKit's REST API on a unix socket, backed by a [`PortDriver`].
//!
//! [`ApiServer::start`] binds the socket and serves on background threads until
//! [`ApiServer::shutdown`]. HTTP parsing is tiny_http's; this module routes, decodes and
//! answers exactly as upstream does on the wire (API 1.1.1):
//!
//! | Request | Success |
//! |---|---|
//! | `GET /v1/info` | 200, [`Info`] with `portDriver` asked from the driver at request time, and `networkDriver.error` once [`ApiServer::report_network_error`] was called |
//! | `GET /v1/ports` | 200, array of `PortStatus` in ascending id order, `null` when empty |
//! | `POST /v1/ports` | 201, the new `PortStatus` |
//! | `DELETE /v1/ports/{id}` | 200, empty body |
//!
//! Other paths (also `/v1/ports/`) get 404 `404 page not found\n`, a known path with another
//! method gets an empty 405. Every port operation failure is a 400 with
//! `{"message":"..."}\n`; a driver failing to describe itself or to list is a 500.
//!
//! # Choices where upstream's behaviour is accidental
//!
//! - **Empty port list:** upstream sends the 4 bytes `null` (a Go nil slice). We send `null`
//!   too: upstream's client (rootlessctl, Docker's port proxy) and ours accept `null` and `[]`
//!   alike, and byte compatibility keeps scripts that compare output working. Non-empty lists
//!   come in ascending id order, where upstream's order is random.
//! - **Error content type:** upstream means to send `application/json` but sets the header too
//!   late, so `text/plain; charset=utf-8` goes out. No known client looks at it (upstream's
//!   client parses the body whatever the type), so we send what the body is:
//!   `application/json`.
//! - **Limits:** request bodies above [`MAX_BODY`] get 413 and request heads above
//!   [`MAX_HEAD`] 431, answered by the gate (see below) before tiny_http sees the request; the
//!   gate also refuses ambiguous framing. Upstream has no limits.
//!
//! # Access control
//!
//! The socket file is created with mode 0600 (set on the socket before `bind`, so it is never
//! wider, whatever the umask) inside the 0700 state directory, so only the owner (and root)
//! can connect. Behind that, a gate ([`crate::gate`]) accepts each connection itself and
//! checks the peer's uid with `SO_PEERCRED`: a peer that is neither the server's effective uid
//! nor root gets `403 Forbidden` with a `{"message":...}` body naming both uids, and is
//! closed, even when the file mode or the directory has been loosened. Admitted connections are
//! relayed to tiny_http, which listens on a socket that has no name (tiny_http accepts
//! connections itself and never hands out the socket, so it cannot check peers).
//!
//! # Threads and limits
//!
//! tiny_http reads request heads on a thread per connection (bodies up to 1 KiB too). A
//! dispatcher thread takes requests in arrival order; a body still on the socket is read on a
//! thread of its own (at most [`MAX_IN_FLIGHT`] at once, more get 503 from a refusing thread),
//! so a client that sends a large body slowly delays only its own request. One executor thread
//! then handles the requests in order, which keeps pipelined requests in order as Go's server
//! does. Neither the dispatcher nor the executor ever answers a request whose body is still on
//! the socket: tiny_http would read that body to discard it, blocking on a stalled client.
//!
//! tiny_http stops accepting for good at the first failed accept(2) (e.g. `EMFILE` while the
//! port driver, which shares the process's descriptors, has used them all); the dispatcher then
//! starts another tiny_http server on the same listening socket, so the API comes back once
//! descriptors are free again.
//!
//! tiny_http sets no socket timeouts, so a client that stalls mid-body holds its reader thread
//! (and the gate's two relay threads) until it disconnects, and one that stalls mid-head holds
//! a gate thread. Only the socket's owner can connect, so these are robustness limits, not an
//! exposure. [`ApiServer::shutdown`] closes every relayed connection.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::{self, JoinHandle};

use nix::sys::socket::{self as sock, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use nix::sys::stat::{fchmod, Mode};
use rkport_core::{PortDriver, PortError, PortId};
use serde::Serialize;
use tiny_http::{Header, Method, Request, Response, ResponseBox, StatusCode};

use crate::decode::decode_port_spec;
use crate::gate::{self, Gate};
use crate::types::{ErrorBody, Info};

/// The largest request body accepted, in bytes (a port spec is about 120); larger ones get 413.
pub const MAX_BODY: usize = 64 * 1024;

/// The longest request head accepted (request line, headers and the blank line), in bytes;
/// longer ones get 431.
pub const MAX_HEAD: usize = 16 * 1024;

/// The most request bodies read from the socket at the same time; more get 503 at once.
pub const MAX_IN_FLIGHT: usize = 64;

/// What the server serves: the port driver and the static part of `GET /v1/info`.
pub struct ApiState {
    /// `None` for `--port-driver=none`: port operations fail with `no PortDriver is available`.
    pub driver: Option<Arc<dyn PortDriver>>,
    /// Everything but `portDriver`, which is asked from the driver at request time.
    pub info: Info,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("driver", &self.driver.as_ref().map(|_| "<dyn PortDriver>"))
            .field("info", &self.info)
            .finish()
    }
}

/// A running API server on a unix socket.
///
/// Dropping it shuts it down.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    running: Mutex<Option<Running>>,
}

struct Running {
    /// Kept until the tiny_http servers are dropped (see [`gate::Hidden`]).
    _hidden: Arc<gate::Hidden>,
    /// The gate on the public socket; `None` once shut down.
    gate: Option<Gate>,
    /// The executor's queue, to stop it.
    jobs: Sender<Message>,
    /// For restarting tiny_http from the gate.
    queues: Queues,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("listener", &self.shared.listener)
            .finish()
    }
}

/// State shared by the server's threads.
struct Shared {
    state: ApiState,
    /// `true` once shutting down. Driver calls run under the read lock, so taking the write
    /// lock waits for them and no driver call starts afterwards.
    stopped: RwLock<bool>,
    /// Threads reading a request body.
    readers: AtomicUsize,
    /// A handle of ours on tiny_http's listening socket: to start another accept loop on it
    /// ([`restart`]) and to stop them all.
    listener: UnixListener,
    /// Every tiny_http server started on `listener`, with its dispatcher thread.
    servers: Mutex<Vec<Served>>,
    /// What `/proc/self/fd/N` reads for a descriptor of `listener` (`socket:[INODE]`).
    listener_link: PathBuf,
    /// `networkDriver.error` of `GET /v1/info`, once reported.
    network_error: Mutex<Option<String>>,
}

/// A tiny_http server, its dispatcher, and the descriptor its accept loop owns.
struct Served {
    http: Arc<tiny_http::Server>,
    dispatcher: JoinHandle<()>,
    /// tiny_http's own duplicate of the listening socket: closed when its accept loop ends.
    accept_fd: RawFd,
}

impl ApiServer {
    /// Binds `path` and serves `state` on background threads; returns once listening.
    ///
    /// A stale socket at `path` (one nobody listens on) is removed first. The socket file is
    /// created with mode 0600.
    ///
    /// # Errors
    /// `path` exists and is not a socket or is a live socket, or binding fails; the message
    /// names the path. Nothing is left behind on failure.
    pub fn start(path: &Path, state: ApiState) -> io::Result<ApiServer> {
        remove_stale_socket(path)?;
        let public = bind_private(path)?;
        let serve = || -> io::Result<Running> {
            let (listener, hidden) = gate::hidden_listener(path.parent().unwrap_or(Path::new("")))?;
            let hidden = Arc::new(hidden);
            let mut running = spawn_threads(listener, hidden.clone(), state)?;
            let check = {
                let (shared, queues) = (running.shared.clone(), running.queues.clone());
                Box::new(move || ensure_accepting(&shared, &queues))
            };
            match Gate::spawn(public, hidden, check) {
                Ok(gate) => running.gate = Some(gate),
                Err(e) => {
                    running.stop();
                    return Err(e);
                }
            }
            Ok(running)
        };
        match serve() {
            Ok(running) => {
                tracing::debug!(path = %path.display(), "API server listening");
                Ok(ApiServer {
                    path: path.to_owned(),
                    running: Mutex::new(Some(running)),
                })
            }
            Err(e) => {
                let _ = std::fs::remove_file(path);
                Err(io::Error::new(
                    e.kind(),
                    format!("failed to serve API on {}: {e}", path.display()),
                ))
            }
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reports that the network is gone: from now on `GET /v1/info` carries `message` as
    /// `networkDriver.error` (when there is a network driver). No effect once shut down.
    pub fn report_network_error(&self, message: &str) {
        if let Some(running) = lock(&self.running).as_ref() {
            *lock(&running.shared.network_error) = Some(message.to_owned());
        }
    }

    /// Stops serving and removes the socket file.
    ///
    /// Waits for driver calls in progress; no driver call starts afterwards (requests already
    /// taken get 503). Idempotent.
    ///
    /// Connections that clients keep alive are closed by the gate: their clients read end of
    /// file after any answer already sent.
    pub fn shutdown(&self) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(running) = running else {
            return;
        };

        // No driver call may start from now on.
        *running
            .shared
            .stopped
            .write()
            .unwrap_or_else(PoisonError::into_inner) = true;

        // Remove the name first so that nobody new connects, then stop the gate.
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::debug!(path = %self.path.display(), error = %e, "cannot remove API socket");
        }
        running.stop();
        tracing::debug!(path = %self.path.display(), "API server stopped");
    }
}

impl Running {
    /// Stops the gate (closing relayed connections), tiny_http's accept loops and the
    /// dispatchers; the executor ends after answering what is queued.
    fn stop(mut self) {
        *self
            .shared
            .stopped
            .write()
            .unwrap_or_else(PoisonError::into_inner) = true;
        if let Some(gate) = self.gate.take() {
            gate.shutdown();
        }
        // accept() on a shut-down listener fails with EINVAL and tiny_http's threads exit.
        let _ = sock::shutdown(self.shared.listener.as_raw_fd(), sock::Shutdown::Both);

        // No server is added once `stopped` is set (see `start_server`).
        let servers = std::mem::take(&mut *lock(&self.shared.servers));
        for served in &servers {
            served.http.unblock();
        }
        for served in servers {
            if served.dispatcher.join().is_err() {
                tracing::debug!("API dispatcher thread panicked");
            }
            drop(served.http);
        }
        // The executor is not joined: it may be blocked writing to a client that does not
        // read. It answers what is queued with 503 and ends at this message.
        let _ = self.jobs.send(Message::Stop);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Removes a socket nobody listens on; refuses other files and live sockets.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("stat {}: {e}", path.display()),
            ))
        }
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{}: another server is listening on it", path.display()),
        ));
    }
    tracing::debug!(path = %path.display(), "removing stale API socket");
    std::fs::remove_file(path)
        .map_err(|e| io::Error::new(e.kind(), format!("remove {}: {e}", path.display())))
}

/// Creates a listening unix socket at `path` whose file has mode 0600 from the start.
///
/// Linux creates the socket file with the mode of the socket inode, masked by the umask, so
/// `fchmod` before `bind` avoids touching the process-wide umask (unix(7), "Pathname socket
/// ownership and permissions").
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let err = |what: &str, e: nix::Error| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("failed to {what} API socket {}: {e}", path.display()),
        )
    };
    let fd = sock::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| err("create", e))?;
    fchmod(&fd, Mode::S_IRUSR | Mode::S_IWUSR).map_err(|e| err("chmod", e))?;

    let addr = UnixAddr::new(path).map_err(|e| err("bind", e))?;
    sock::bind(fd.as_raw_fd(), &addr).map_err(|e| err("bind", e))?;
    if let Err(e) = sock::listen(&fd, Backlog::MAXCONN) {
        let _ = std::fs::remove_file(path);
        return Err(err("listen on", e));
    }
    Ok(UnixListener::from(fd))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Starts the executor, the refusing thread and a tiny_http server with its dispatcher on
/// `listener`.
fn spawn_threads(
    listener: UnixListener,
    hidden: Arc<gate::Hidden>,
    state: ApiState,
) -> io::Result<Running> {
    let listener_link = fd_link(listener.as_raw_fd())?;
    let shared = Arc::new(Shared {
        state,
        stopped: RwLock::new(false),
        readers: AtomicUsize::new(0),
        listener,
        servers: Mutex::default(),
        listener_link,
        network_error: Mutex::default(),
    });
    let (jobs, queue) = mpsc::channel();
    {
        let shared = shared.clone();
        thread::Builder::new()
            .name("api-execute".into())
            .spawn(move || execute(&queue, &shared))?;
    }
    let (refusals, refused) = mpsc::channel::<Request>();
    // Ends when the dispatchers (the only senders) have ended and the queue is answered.
    thread::Builder::new()
        .name("api-refuse".into())
        .spawn(move || {
            for request in refused {
                let _ = request.respond(error_response(503, "too many concurrent API requests"));
            }
        })?;
    let queues = Queues {
        jobs: jobs.clone(),
        refusals,
    };
    let running = Running {
        _hidden: hidden,
        gate: None,
        jobs,
        queues: queues.clone(),
        shared,
    };
    if let Err(e) = start_server(&running.shared, &queues) {
        running.stop();
        return Err(e);
    }
    Ok(running)
}

/// Starts a tiny_http server on the shared listening socket, with a dispatcher thread.
///
/// # Errors
/// Duplicating the socket or starting a thread failed.
fn start_server(shared: &Arc<Shared>, queues: &Queues) -> io::Result<()> {
    let listener = shared.listener.try_clone()?;
    let accept_fd = listener.as_raw_fd();
    let http =
        Arc::new(tiny_http::Server::from_listener(listener, None).map_err(io::Error::other)?);
    let mut servers = lock(&shared.servers);
    if shared.is_stopped() {
        // Its accept loop ends with the shut-down listener.
        return Ok(());
    }
    let dispatcher = {
        let (http, shared, queues) = (http.clone(), shared.clone(), queues.clone());
        thread::Builder::new()
            .name("api-dispatch".into())
            .spawn(move || dispatch(&http, &shared, &queues))?
    };
    servers.push(Served {
        http,
        dispatcher,
        accept_fd,
    });
    Ok(())
}

/// What `/proc/self/fd/FD` links to.
fn fd_link(fd: RawFd) -> io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
}

/// Restarts tiny_http if the accept loop of the latest server has ended; called by the gate
/// before it hands over a connection.
///
/// tiny_http's accept thread can also end by panicking (on `EMFILE` while duplicating an
/// accepted socket), which reports nothing to the dispatcher. Its end shows in its descriptor,
/// a duplicate of the listening socket that it owns: once that number no longer refers to the
/// listening socket, the loop is gone. Connections already waiting on the socket are taken by
/// the new server.
fn ensure_accepting(shared: &Arc<Shared>, queues: &Queues) {
    let alive = {
        let servers = lock(&shared.servers);
        let latest = servers.last().map(|s| s.accept_fd);
        latest.is_none_or(|fd| fd_link(fd).is_ok_and(|link| link == shared.listener_link))
    };
    if !alive {
        tracing::debug!("API accept loop is gone, starting another");
        restart(shared, queues);
    }
}

/// Starts another tiny_http server after the accept loop of one has ended.
///
/// tiny_http's accept loop ends for good at the first failed accept(2), e.g. `EMFILE` when the
/// process (whose descriptors the port driver shares) has run out: the API would then stay
/// dead after the shortage. The socket is still listening, so a new server on it takes over;
/// the old one keeps serving the connections it had accepted. Retried every 50 ms until it
/// works or the server stops.
fn restart(shared: &Arc<Shared>, queues: &Queues) {
    while !shared.is_stopped() {
        match start_server(shared, queues) {
            Ok(()) => return,
            Err(e) => {
                tracing::debug!(error = %e, "cannot restart the API accept loop, retrying");
                thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

/// A request with its body read (or the answer reading it calls for).
struct Job {
    request: Request,
    body: Result<Vec<u8>, ResponseBox>,
}

enum Message {
    Job(Box<Job>),
    Stop,
}

/// Takes requests from tiny_http in arrival order until shutdown and queues them.
///
/// A body tiny_http already holds in memory is taken here; one still on the socket is read on
/// a thread of its own, so that a slow sender delays only its own request.
fn dispatch(http: &tiny_http::Server, shared: &Arc<Shared>, queues: &Queues) {
    loop {
        match http.recv() {
            Ok(mut request) if body_is_buffered(&request) => {
                let body = read_body(&mut request);
                let _ = queues
                    .jobs
                    .send(Message::Job(Box::new(Job { request, body })));
            }
            Ok(request) => spawn_reader(request, shared, queues),
            Err(e) => {
                if shared.is_stopped() {
                    return;
                }
                // tiny_http reports a failed accept() here and stops accepting.
                tracing::debug!(error = %e, "API accept loop ended, starting another");
                restart(shared, queues);
            }
        }
    }
}

/// Whether tiny_http has read the whole body already (no body, or `Content-Length` up to
/// 1 KiB without `Expect`), so that reading it cannot block.
fn body_is_buffered(request: &Request) -> bool {
    let has = |name: &'static str| request.headers().iter().any(|h| h.field.equiv(name));
    let upgrade = request.headers().iter().any(|h| {
        h.field.equiv("Connection") && h.value.as_str().to_ascii_lowercase().contains("upgrade")
    });
    let streamed = has("Transfer-Encoding") || has("Expect") || upgrade;
    !streamed && request.body_length().is_none_or(|len| len <= 1024)
}

/// Where the dispatcher sends requests: to the executor, or to be refused with 503.
///
/// Answering a request whose body has not been read may block: tiny_http reads the rest of
/// the body to discard it when the request is dropped, and a client that stalls mid-body never
/// sends it. Such answers are therefore never given on the dispatcher or the executor: refusals
/// go to a thread of their own (one stalled client delays only the refusals queued behind it),
/// and errors found while reading a body are answered by the reader thread that found them.
#[derive(Clone)]
struct Queues {
    jobs: Sender<Message>,
    refusals: Sender<Request>,
}

fn spawn_reader(request: Request, shared: &Arc<Shared>, queues: &Queues) {
    if shared.readers.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
        shared.readers.fetch_sub(1, Ordering::AcqRel);
        let _ = queues.refusals.send(request);
        return;
    }
    let (task_shared, jobs) = (shared.clone(), queues.jobs.clone());
    let spawned = thread::Builder::new()
        .name("api-read".into())
        .spawn(move || {
            let _done = Reading(&task_shared.readers);
            let mut request = request;
            match read_body(&mut request) {
                Ok(body) => {
                    let body = Ok(body);
                    let _ = jobs.send(Message::Job(Box::new(Job { request, body })));
                }
                Err(response) => finish(request, response),
            }
        });
    if let Err(e) = spawned {
        // The request went with the closure; tiny_http answers a dropped request with 500.
        shared.readers.fetch_sub(1, Ordering::AcqRel);
        tracing::debug!(error = %e, "cannot spawn API body reader thread");
    }
}

/// Decrements the reader count when a reader thread ends, even by panic.
struct Reading<'a>(&'a AtomicUsize);

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Handles queued requests one at a time, in order.
///
/// One executor keeps pipelined requests of a connection in order, as Go's server does
/// (a `GET` sent after a `POST` sees the new port), and drivers serialise their operations
/// anyway.
fn execute(queue: &Receiver<Message>, shared: &Shared) {
    while let Ok(Message::Job(job)) = queue.recv() {
        handle(*job, shared);
    }
}

impl Shared {
    fn is_stopped(&self) -> bool {
        *self.stopped.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` with the driver unless shutting down or there is none.
    fn with_driver<T>(&self, f: impl FnOnce(&dyn PortDriver) -> T) -> Result<T, ResponseBox> {
        let stopped = self.stopped.read().unwrap_or_else(PoisonError::into_inner);
        if *stopped {
            return Err(error_response(503, "API server is shutting down"));
        }
        match &self.state.driver {
            Some(driver) => Ok(f(driver.as_ref())),
            None => Err(port_error(&PortError::NoDriver)),
        }
    }
}

fn handle(job: Job, shared: &Shared) {
    let Job { request, body } = job;
    tracing::trace!(method = %request.method(), url = request.url(), "API request");
    let response = match body {
        Ok(body) => route(&request, &body, shared),
        Err(response) => response,
    };
    finish(request, response);
}

fn finish(request: Request, response: ResponseBox) {
    if let Err(e) = request.respond(response) {
        tracing::debug!(error = %e, "cannot send API response");
    }
}

/// The four routes of upstream's router, matched exactly on the path (query ignored).
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    Info,
    Ports,
    Port(&'a str),
    NotFound,
}

fn route_of(url: &str) -> Route<'_> {
    let path = url.split_once('?').map_or(url, |(path, _)| path);
    match path {
        "/v1/info" => Route::Info,
        "/v1/ports" => Route::Ports,
        _ => match path.strip_prefix("/v1/ports/") {
            Some(id) if !id.is_empty() && !id.contains('/') => Route::Port(id),
            _ => Route::NotFound,
        },
    }
}

fn route(request: &Request, body: &[u8], shared: &Shared) -> ResponseBox {
    match (route_of(request.url()), request.method()) {
        (Route::NotFound, _) => not_found(),
        (Route::Info, Method::Get) => get_info(shared),
        (Route::Ports, Method::Get) => list_ports(shared),
        (Route::Ports, Method::Post) => add_port(body, shared),
        (Route::Port(id), Method::Delete) => remove_port(id, shared),
        _ => empty_response(405),
    }
}

fn get_info(shared: &Shared) -> ResponseBox {
    let mut info = shared.state.info.clone();
    if let (Some(net), Some(error)) = (&mut info.network_driver, &*lock(&shared.network_error)) {
        net.error = Some(error.clone());
    }
    if shared.state.driver.is_some() {
        info.port_driver = match shared.with_driver(|driver| driver.info()) {
            Err(response) => return response,
            Ok(Err(e)) => return error_response(500, &e.to_string()),
            Ok(Ok(driver_info)) => Some(driver_info),
        };
    }
    json_response(200, &info)
}

fn list_ports(shared: &Shared) -> ResponseBox {
    match shared.with_driver(|driver| driver.list_ports()) {
        Err(response) => response,
        Ok(Err(e)) => error_response(500, &e.to_string()),
        Ok(Ok(mut ports)) if !ports.is_empty() => {
            ports.sort_by_key(|port| port.id);
            json_response(200, &ports)
        }
        // Upstream's nil slice; see the module docs.
        Ok(Ok(_)) => json_response(200, &()),
    }
}

fn add_port(body: &[u8], shared: &Shared) -> ResponseBox {
    // Upstream checks for a driver before looking at the body.
    if shared.state.driver.is_none() {
        return port_error(&PortError::NoDriver);
    }
    let spec = match decode_port_spec(body) {
        Ok(spec) => spec,
        Err(message) => return error_response(400, &message),
    };
    match shared.with_driver(|driver| driver.add_port(&spec)) {
        Err(response) => response,
        Ok(Ok(status)) => json_response(201, &status),
        Ok(Err(e)) => port_error(&e),
    }
}

/// Reads at most [`MAX_BODY`] bytes of body, whatever the method.
///
/// The gate refuses larger bodies before tiny_http sees them (tiny_http would allocate the
/// declared remainder to discard it); the checks here only keep this function within the
/// limit on its own.
fn read_body(request: &mut Request) -> Result<Vec<u8>, ResponseBox> {
    let too_large = || {
        error_response(
            413,
            &format!("request body too large (limit {MAX_BODY} bytes)"),
        )
    };
    if request.body_length().is_some_and(|len| len > MAX_BODY) {
        return Err(too_large());
    }

    let mut body = Vec::new();
    let limit = MAX_BODY as u64 + 1;
    if let Err(e) = request.as_reader().take(limit).read_to_end(&mut body) {
        let message = format!("failed to read request body: {e}");
        return Err(error_response(400, &message));
    }
    if body.len() > MAX_BODY {
        return Err(too_large());
    }
    Ok(body)
}

fn remove_port(raw_id: &str, shared: &Shared) -> ResponseBox {
    // Go's strconv.Atoi: an optional sign and decimal digits.
    let id: PortId = match raw_id.parse() {
        Ok(id) => id,
        Err(e) => return error_response(400, &format!("bad id {raw_id}: {e}")),
    };
    match shared.with_driver(|driver| driver.remove_port(id)) {
        Err(response) => response,
        Ok(Ok(())) => empty_response(200),
        Ok(Err(e)) => port_error(&e),
    }
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("static header is valid")
}

/// Compact JSON without a trailing newline, as upstream's `json.Marshal` + `Write`.
fn json_response(status: u16, value: &impl Serialize) -> ResponseBox {
    match serde_json::to_vec(value) {
        Ok(body) => Response::from_data(body)
            .with_status_code(StatusCode(status))
            .with_header(header("Content-Type", "application/json"))
            .boxed(),
        Err(e) => error_response(500, &format!("cannot encode response: {e}")),
    }
}

/// `{"message":"..."}` and a newline, as upstream's `json.Encoder`.
fn error_response(status: u16, message: &str) -> ResponseBox {
    let body = ErrorBody {
        message: message.to_owned(),
    };
    let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
    bytes.push(b'\n');
    Response::from_data(bytes)
        .with_status_code(StatusCode(status))
        .with_header(header("Content-Type", "application/json"))
        .boxed()
}

/// Every port operation failure is a 400, as upstream (there is no 404 or 409).
fn port_error(e: &PortError) -> ResponseBox {
    error_response(400, &e.to_string())
}

/// Go's `http.NotFound`.
fn not_found() -> ResponseBox {
    Response::from_string("404 page not found\n")
        .with_status_code(StatusCode(404))
        .with_header(header("Content-Type", "text/plain; charset=utf-8"))
        .with_header(header("X-Content-Type-Options", "nosniff"))
        .boxed()
}

/// No body, `Content-Length: 0`, no `Content-Type`.
fn empty_response(status: u16) -> ResponseBox {
    Response::empty(StatusCode(status)).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_exact_paths() {
        assert_eq!(route_of("/v1/info"), Route::Info);
        assert_eq!(route_of("/v1/info?x=1"), Route::Info);
        assert_eq!(route_of("/v1/ports"), Route::Ports);
        assert_eq!(route_of("/v1/ports/7"), Route::Port("7"));
        assert_eq!(route_of("/v1/ports/abc"), Route::Port("abc"));
        for path in [
            "/v1/ports/",
            "/v1/ports/1/2",
            "/v1/info/",
            "/v2/info",
            "/",
            "/v1",
        ] {
            assert_eq!(route_of(path), Route::NotFound, "{path}");
        }
    }
}
