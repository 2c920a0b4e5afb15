//! The API server: RootlessKit's REST API on a unix socket, backed by a [`PortDriver`].
//!
//! [`ApiServer::start`] binds the socket and serves on background threads until
//! [`ApiServer::shutdown`]. HTTP parsing is tiny_http's; this module routes, decodes and
//! answers exactly as upstream does on the wire (API 1.1.1):
//!
//! | Request | Success |
//! |---|---|
//! | `GET /v1/info` | 200, [`Info`] with `portDriver` asked from the driver at request time |
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
//! - **Body limit:** request bodies above [`MAX_BODY`] get 413; upstream has no limit.
//!
//! # Access control
//!
//! The socket file is created with mode 0600 (set on the socket before `bind`, so it is never
//! wider, whatever the umask) inside the 0700 state directory. That is the protection: only
//! the owner (and root) can connect. The peer's uid is not checked with `SO_PEERCRED` because
//! tiny_http accepts connections itself and does not hand out the socket.
//!
//! # Threads and limits
//!
//! tiny_http reads request heads on a thread per connection (bodies up to 1 KiB too). A
//! dispatcher thread takes requests in arrival order; a body still on the socket is read on a
//! thread of its own (at most [`MAX_IN_FLIGHT`] at once, more get 503), so a client that sends
//! a large body slowly delays only its own request. One executor thread then handles the
//! requests in order, which keeps pipelined requests in order as Go's server does.
//!
//! tiny_http sets no socket timeouts, so a client that stalls mid-body holds its reader thread
//! until it disconnects; tiny_http also does not bound the length of a request head. Only the
//! socket's owner can connect, so these are robustness limits, not an exposure.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
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
use crate::types::{ErrorBody, Info};

/// The largest request body accepted, in bytes (a port spec is about 120).
pub const MAX_BODY: usize = 64 * 1024;

/// The most request bodies read from the socket at the same time; more get 503 at once.
pub const MAX_IN_FLIGHT: usize = 64;

/// Bodies declared larger than this are never read nor answered.
///
/// tiny_http discards an unread body when the request is dropped, and allocates a buffer as
/// large as the declared remainder to do it: a `Content-Length` of a terabyte would abort the
/// process. Such requests are leaked instead (the connection stays open without an answer
/// until the client gives up). Between [`MAX_BODY`] and this the body is answered 413 and
/// discarded normally.
const MAX_DISCARD: usize = 1024 * 1024;

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
    http: Arc<tiny_http::Server>,
    /// A second handle on the listening socket, to stop tiny_http's accept loop.
    listener: UnixListener,
    dispatcher: JoinHandle<()>,
    /// The executor's queue, to stop it.
    jobs: Sender<Message>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("listener", &self.listener)
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
        let listener = bind_private(path)?;
        let serve = || -> io::Result<Running> {
            let keep = listener.try_clone()?;
            let http =
                tiny_http::Server::from_listener(listener, None).map_err(io::Error::other)?;
            spawn_dispatcher(Arc::new(http), keep, state)
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

    /// Stops serving and removes the socket file.
    ///
    /// Waits for driver calls in progress; no driver call starts afterwards (requests already
    /// taken get 503). Idempotent.
    ///
    /// Connections that clients keep alive are not closed: tiny_http keeps no handle on them
    /// that could be shut down. A request sent on one afterwards gets no answer until the
    /// client gives up or the process exits, which for rootlesskit follows right away.
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

        // Remove the name first so that nobody new connects, then stop the accept loop:
        // accept() on a shut-down listener fails with EINVAL and tiny_http's thread exits.
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::debug!(path = %self.path.display(), error = %e, "cannot remove API socket");
        }
        let _ = sock::shutdown(running.listener.as_raw_fd(), sock::Shutdown::Both);

        running.http.unblock();
        if running.dispatcher.join().is_err() {
            tracing::debug!("API dispatcher thread panicked");
        }
        // The executor is not joined: it may be blocked writing to a client that does not
        // read. It answers what is queued with 503 and ends at this message.
        let _ = running.jobs.send(Message::Stop);
        tracing::debug!(path = %self.path.display(), "API server stopped");
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

fn spawn_dispatcher(
    http: Arc<tiny_http::Server>,
    listener: UnixListener,
    state: ApiState,
) -> io::Result<Running> {
    let shared = Arc::new(Shared {
        state,
        stopped: RwLock::new(false),
        readers: AtomicUsize::new(0),
    });
    let (jobs, queue) = mpsc::channel();
    {
        let shared = shared.clone();
        thread::Builder::new()
            .name("api-execute".into())
            .spawn(move || execute(&queue, &shared))?;
    }
    let dispatcher = {
        let (http, shared, jobs) = (http.clone(), shared.clone(), jobs.clone());
        thread::Builder::new()
            .name("api-dispatch".into())
            .spawn(move || dispatch(&http, &shared, &jobs))?
    };
    Ok(Running {
        http,
        listener,
        dispatcher,
        jobs,
        shared,
    })
}

/// A request with its body read (or the answer reading it calls for).
struct Job {
    request: Request,
    body: Result<Vec<u8>, Reply>,
}

enum Message {
    Job(Box<Job>),
    Stop,
}

/// Takes requests from tiny_http in arrival order until shutdown and queues them.
///
/// A body tiny_http already holds in memory is taken here; one still on the socket is read on
/// a thread of its own, so that a slow sender delays only its own request.
fn dispatch(http: &tiny_http::Server, shared: &Arc<Shared>, jobs: &Sender<Message>) {
    loop {
        match http.recv() {
            Ok(mut request) if body_is_buffered(&request) => {
                let body = read_body(&mut request);
                let _ = jobs.send(Message::Job(Box::new(Job { request, body })));
            }
            Ok(request) => spawn_reader(request, shared, jobs),
            Err(e) => {
                if shared.is_stopped() {
                    return;
                }
                // tiny_http reports a failed accept() here and stops accepting.
                tracing::debug!(error = %e, "API server stopped accepting connections");
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

fn spawn_reader(request: Request, shared: &Arc<Shared>, jobs: &Sender<Message>) {
    if shared.readers.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
        shared.readers.fetch_sub(1, Ordering::AcqRel);
        let _ = request.respond(error_response(503, "too many concurrent API requests"));
        return;
    }
    let (task_shared, jobs) = (shared.clone(), jobs.clone());
    let spawned = thread::Builder::new()
        .name("api-read".into())
        .spawn(move || {
            let _done = Reading(&task_shared.readers);
            let mut request = request;
            let body = read_body(&mut request);
            let _ = jobs.send(Message::Job(Box::new(Job { request, body })));
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

/// What to do with a request.
enum Reply {
    Respond(ResponseBox),
    /// Drop the request without reading its body nor answering (see [`MAX_DISCARD`]).
    Abandon,
}

fn handle(job: Job, shared: &Shared) {
    let Job { request, body } = job;
    tracing::trace!(method = %request.method(), url = request.url(), "API request");
    let reply = match body {
        Ok(body) => Reply::Respond(route(&request, &body, shared)),
        Err(reply) => reply,
    };
    match reply {
        Reply::Respond(response) => {
            if let Err(e) = request.respond(response) {
                tracing::debug!(error = %e, "cannot send API response");
            }
        }
        Reply::Abandon => {
            tracing::debug!(
                length = request.body_length(),
                "abandoning API request with an oversized body"
            );
            std::mem::forget(request);
        }
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
fn read_body(request: &mut Request) -> Result<Vec<u8>, Reply> {
    let too_large = || {
        Reply::Respond(error_response(
            413,
            &format!("request body too large (limit {MAX_BODY} bytes)"),
        ))
    };
    match request.body_length() {
        Some(len) if len > MAX_DISCARD => return Err(Reply::Abandon),
        Some(len) if len > MAX_BODY => return Err(too_large()),
        _ => {}
    }

    let mut body = Vec::new();
    let limit = MAX_BODY as u64 + 1;
    if let Err(e) = request.as_reader().take(limit).read_to_end(&mut body) {
        let message = format!("failed to read request body: {e}");
        return Err(Reply::Respond(error_response(400, &message)));
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
