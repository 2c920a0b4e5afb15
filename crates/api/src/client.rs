//! The API client: talks to `api.sock` (ours or upstream's) and implements [`PortDriver`].
//!
//! Requests go over HTTP/1.1 with ureq, through a connector that opens a `UnixStream` to the
//! socket path instead of resolving and dialling the URL's host (the host, `rootlesskit`, is
//! only a label). Connections are kept alive and reused between calls.
//!
//! Error handling follows upstream's client: any 2xx is success; otherwise a body of the form
//! `{"message":"..."}` becomes that message verbatim, and anything else becomes
//! `unexpected HTTP status <code> <reason>, body="<body>"`.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rkport_core::{DriverInfo, PortDriver, PortError, PortId, PortSpec, PortStatus};
use serde::de::DeserializeOwned;
use ureq::http::{Response, StatusCode};
use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, LazyBuffers, NextTimeout, Transport,
};
use ureq::Body;

use crate::types::{ErrorBody, Info};

/// How much of an error body is read.
const MAX_ERROR_BODY: u64 = 64 * 1024;

/// How much of a success body is read (a port list of thousands of ports fits).
const MAX_BODY: u64 = 16 * 1024 * 1024;

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error message, shown verbatim (`conflict with ID 1`).
    #[error("{0}")]
    Api(String),
    /// The server answered with an error status and no `{"message":...}` body.
    #[error("unexpected HTTP status {code} {reason}, body={body:?}")]
    Status {
        code: u16,
        reason: String,
        body: String,
    },
    /// The socket could not be reached or the exchange broke off.
    #[error("cannot talk to API socket {}: {detail}", path.display())]
    Transport { path: PathBuf, detail: String },
    /// A success response whose body is not what the API defines.
    #[error("invalid response from API socket {}: {detail}", path.display())]
    Decode { path: PathBuf, detail: String },
}

impl From<ClientError> for PortError {
    fn from(e: ClientError) -> Self {
        PortError::Backend(e.to_string())
    }
}

/// A client of the API on one unix socket.
///
/// Cheap to share: calls take `&self` and may run concurrently.
#[derive(Debug, Clone)]
pub struct Client {
    socket: Arc<PathBuf>,
    agent: ureq::Agent,
}

impl Client {
    /// A client of the server at `socket`; nothing is connected until the first call.
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        let socket = Arc::new(socket.into());
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .build();
        let connector = UnixConnector {
            path: socket.clone(),
        };
        Client {
            socket,
            agent: ureq::Agent::with_parts(config, connector, LabelResolver),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET /v1/info`.
    ///
    /// # Errors
    /// See [`ClientError`].
    pub fn info(&self) -> Result<Info, ClientError> {
        let response = self.agent.get(url("/v1/info")).call();
        self.json(response)
    }

    fn json<T: DeserializeOwned>(
        &self,
        response: Result<Response<Body>, ureq::Error>,
    ) -> Result<T, ClientError> {
        let body = self.success_body(response)?;
        serde_json::from_slice(&body).map_err(|e| self.decode_error(e.to_string()))
    }

    /// The body of a 2xx response, or the error the response stands for.
    fn success_body(
        &self,
        response: Result<Response<Body>, ureq::Error>,
    ) -> Result<Vec<u8>, ClientError> {
        let mut response = response.map_err(|e| self.transport_error(e))?;
        let status = response.status();
        let limit = if status.is_success() {
            MAX_BODY
        } else {
            MAX_ERROR_BODY
        };
        let body = response
            .body_mut()
            .with_config()
            .limit(limit)
            .read_to_vec()
            .map_err(|e| self.transport_error(e))?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(status_error(status, &body))
        }
    }

    fn transport_error(&self, e: ureq::Error) -> ClientError {
        let detail = match e {
            ureq::Error::Io(io) => io.to_string(),
            other => other.to_string(),
        };
        ClientError::Transport {
            path: self.socket.to_path_buf(),
            detail,
        }
    }

    fn decode_error(&self, detail: String) -> ClientError {
        ClientError::Decode {
            path: self.socket.to_path_buf(),
            detail,
        }
    }
}

fn url(path: &str) -> String {
    format!("http://rootlesskit{path}")
}

fn status_error(status: StatusCode, body: &[u8]) -> ClientError {
    if let Ok(ErrorBody { message }) = serde_json::from_slice::<ErrorBody>(body) {
        return ClientError::Api(message);
    }
    ClientError::Status {
        code: status.as_u16(),
        reason: status.canonical_reason().unwrap_or("").to_owned(),
        body: String::from_utf8_lossy(body).into_owned(),
    }
}

impl PortDriver for Client {
    /// The server's `portDriver`; [`PortError::NoDriver`] when it has none.
    fn info(&self) -> Result<DriverInfo, PortError> {
        Client::info(self)?.port_driver.ok_or(PortError::NoDriver)
    }

    fn add_port(&self, spec: &PortSpec) -> Result<PortStatus, PortError> {
        let body = serde_json::to_vec(spec).map_err(|e| PortError::Backend(e.to_string()))?;
        let response = self
            .agent
            .post(url("/v1/ports"))
            .header("Content-Type", "application/json")
            .send(&body[..]);
        Ok(self.json(response)?)
    }

    /// The ports in ascending id order; `null` and `[]` both mean none.
    fn list_ports(&self) -> Result<Vec<PortStatus>, PortError> {
        let response = self.agent.get(url("/v1/ports")).call();
        let mut ports: Vec<PortStatus> = self
            .json::<Option<Vec<PortStatus>>>(response)?
            .unwrap_or_default();
        ports.sort_by_key(|port| port.id);
        Ok(ports)
    }

    fn remove_port(&self, id: PortId) -> Result<(), PortError> {
        let response = self.agent.delete(url(&format!("/v1/ports/{id}"))).call();
        self.success_body(response)?;
        Ok(())
    }
}

/// Resolves nothing: the URL's host is a label, [`UnixConnector`] knows where to go.
#[derive(Debug)]
struct LabelResolver;

impl Resolver for LabelResolver {
    fn resolve(
        &self,
        _uri: &ureq::http::Uri,
        _config: &ureq::config::Config,
        _timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        // ureq wants at least one address; it is never dialled.
        let mut addrs = self.empty();
        addrs.push(std::net::SocketAddr::from(([127, 0, 0, 1], 80)));
        Ok(addrs)
    }
}

/// Opens every connection to one unix socket path.
#[derive(Debug)]
struct UnixConnector {
    path: Arc<PathBuf>,
}

impl Connector for UnixConnector {
    type Out = UnixTransport;

    fn connect(
        &self,
        details: &ConnectionDetails,
        _chained: Option<()>,
    ) -> Result<Option<UnixTransport>, ureq::Error> {
        let stream = UnixStream::connect(self.path.as_path())
            .map_err(|e| ureq::Error::Io(io::Error::new(e.kind(), format!("connect: {e}"))))?;
        tracing::trace!(path = %self.path.display(), "connected to API socket");
        let buffers = LazyBuffers::new(
            details.config.input_buffer_size(),
            details.config.output_buffer_size(),
        );
        Ok(Some(UnixTransport { stream, buffers }))
    }
}

/// One HTTP/1.1 connection over a unix stream.
#[derive(Debug)]
struct UnixTransport {
    stream: UnixStream,
    buffers: LazyBuffers,
}

impl Transport for UnixTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        let timeout = timeout.for_write();
        self.stream
            .set_write_timeout(timeout.not_zero().map(|d| *d))?;
        let output = &self.buffers.output()[..amount];
        self.stream
            .write_all(output)
            .map_err(|e| io_error(e, timeout))
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        let timeout = timeout.for_read();
        self.stream
            .set_read_timeout(timeout.not_zero().map(|d| *d))?;
        let input = self.buffers.input_append_buf();
        let amount = loop {
            match self.stream.read(input) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other.map_err(|e| io_error(e, timeout))?,
            }
        };
        self.buffers.input_appended(amount);
        Ok(amount > 0)
    }

    fn is_open(&mut self) -> bool {
        // A kept-alive connection is reusable when reading would block: no EOF, no stray bytes.
        if self.stream.set_nonblocking(true).is_err() {
            return false;
        }
        let mut byte = [0u8];
        let open = matches!(
            self.stream.read(&mut byte),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        );
        open && self.stream.set_nonblocking(false).is_ok()
    }
}

fn io_error(e: io::Error, timeout: NextTimeout) -> ureq::Error {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ureq::Error::Timeout(timeout.reason),
        _ => ureq::Error::Io(e),
    }
}
