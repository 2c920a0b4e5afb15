//! A client of slirp4netns's API socket (`slirp4netns --api-socket PATH`).
//!
//! The protocol is described in slirp4netns(1), section "API SOCKET", and its `api.c`: a UNIX
//! stream socket that takes one JSON request per connection. The request must arrive in a single
//! `read()` of fewer than 4096 bytes; the client then shuts down its write side and reads one
//! compact JSON object up to EOF. slirp4netns serves requests synchronously in its main loop.
//!
//! Replies as slirp4netns 1.2.0 sends them:
//!
//! | request | success reply |
//! |---|---|
//! | `add_hostfwd` | `{"return":{"id":N}}` |
//! | `list_hostfwd` | `{"entries":[...]}`, **not** wrapped in `return` (the man page says otherwise) |
//! | `remove_hostfwd` | `{"return":{}}` |
//!
//! and every failure is `{"error":{"desc":"..."}}`. This module knows nothing of port specs or
//! port ids; [`crate::Slirp4netnsDriver`] maps them.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// How long one request may take. slirp4netns answers at once unless it is stuck, and a stuck
/// slirp4netns must not hang the caller (an API server thread) for ever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// slirp4netns reads a request with one `read()` into a 4096-byte buffer.
const MAX_REQUEST: usize = 4095;

/// Why an API request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be used; `op` says which step failed.
    #[error("slirp4netns API socket {}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// slirp4netns answered with `{"error":{"desc":...}}`.
    #[error("slirp4netns refused {execute}: {desc}")]
    Refused { execute: &'static str, desc: String },
    /// The reply was not what the protocol promises.
    #[error("slirp4netns sent an unexpected reply to {execute}: {reply}")]
    UnexpectedReply {
        execute: &'static str,
        reply: String,
    },
    /// The request would not fit in the single read slirp4netns does.
    #[error("slirp4netns request {execute} is {len} bytes, more than {MAX_REQUEST}")]
    TooLarge { execute: &'static str, len: usize },
}

/// The transport of a host forward: slirp4netns knows only these two names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FwdProto {
    Tcp,
    Udp,
}

/// One host forward: slirp4netns listens on `host_addr:host_port` in the host's network
/// namespace and delivers to `guest_addr:guest_port` through the tap device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HostFwd {
    pub proto: FwdProto,
    /// `0.0.0.0` listens on every IPv4 address; slirp4netns cannot listen on IPv6.
    pub host_addr: Ipv4Addr,
    pub host_port: u16,
    pub guest_addr: Ipv4Addr,
    pub guest_port: u16,
}

/// A host forward as `list_hostfwd` reports it, with slirp4netns's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HostFwdEntry {
    pub id: i64,
    #[serde(flatten)]
    pub fwd: HostFwd,
}

/// A handle on one slirp4netns API socket. Cheap to clone; holds no connection.
///
/// Each call opens its own connection, so a client is safe to share between threads; slirp4netns
/// serialises the requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    path: PathBuf,
}

impl Client {
    /// A client of the API socket at `path` (slirp4netns's `--api-socket`).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Client { path: path.into() }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Asks slirp4netns to forward `fwd` and returns the id it assigned (1, 2, ..., never reused).
    ///
    /// # Errors
    /// [`ApiError::Refused`] with `bad request: add_hostfwd: slirp_add_hostfwd failed` when the
    /// host address cannot be bound (in use, privileged port, duplicate forward).
    pub fn add_hostfwd(&self, fwd: &HostFwd) -> Result<i64, ApiError> {
        const EXECUTE: &str = "add_hostfwd";
        let reply = self.request(EXECUTE, &json!({"execute": EXECUTE, "arguments": fwd}))?;
        reply
            .get("return")
            .and_then(|r| r.get("id"))
            .and_then(Value::as_i64)
            .filter(|&id| id > 0)
            .ok_or_else(|| unexpected(EXECUTE, &reply))
    }

    /// Lists slirp4netns's host forwards, in its order (ascending id).
    ///
    /// # Errors
    /// I/O errors, or a reply without an `entries` array.
    pub fn list_hostfwd(&self) -> Result<Vec<HostFwdEntry>, ApiError> {
        const EXECUTE: &str = "list_hostfwd";
        let reply = self.request(EXECUTE, &json!({"execute": EXECUTE}))?;
        let entries = reply
            .get("entries")
            .cloned()
            .ok_or_else(|| unexpected(EXECUTE, &reply))?;
        serde_json::from_value(entries).map_err(|_| unexpected(EXECUTE, &reply))
    }

    /// Removes host forward `id`, closing its host-side listener.
    ///
    /// # Errors
    /// [`ApiError::Refused`] with `bad request: remove_hostfwd: bad arguments.id` for an id
    /// slirp4netns does not know.
    pub fn remove_hostfwd(&self, id: i64) -> Result<(), ApiError> {
        const EXECUTE: &str = "remove_hostfwd";
        let reply = self.request(
            EXECUTE,
            &json!({"execute": EXECUTE, "arguments": {"id": id}}),
        )?;
        match reply.get("return") {
            Some(Value::Object(_)) => Ok(()),
            _ => Err(unexpected(EXECUTE, &reply)),
        }
    }

    /// Sends one request on a new connection and returns the parsed reply, errors mapped.
    fn request(&self, execute: &'static str, body: &Value) -> Result<Value, ApiError> {
        let bytes = serde_json::to_vec(body).expect("a JSON value always serialises");
        if bytes.len() > MAX_REQUEST {
            return Err(ApiError::TooLarge {
                execute,
                len: bytes.len(),
            });
        }
        let raw = self.exchange(&bytes)?;
        tracing::trace!(path = %self.path.display(), execute, reply = %String::from_utf8_lossy(&raw));

        let reply: Value = serde_json::from_slice(&raw).map_err(|_| ApiError::UnexpectedReply {
            execute,
            reply: String::from_utf8_lossy(&raw).into_owned(),
        })?;
        if let Some(err) = reply.get("error") {
            let desc = err.get("desc").and_then(Value::as_str);
            return Err(ApiError::Refused {
                execute,
                desc: desc.map_or_else(|| err.to_string(), str::to_owned),
            });
        }
        Ok(reply)
    }

    /// Connects, writes `request` with one `write()`, half-closes and reads to EOF.
    fn exchange(&self, request: &[u8]) -> Result<Vec<u8>, ApiError> {
        let io = |op| {
            move |source| ApiError::Io {
                path: self.path.clone(),
                op,
                source,
            }
        };
        let mut stream = UnixStream::connect(&self.path).map_err(io("connect"))?;
        stream
            .set_read_timeout(Some(REQUEST_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(REQUEST_TIMEOUT)))
            .map_err(io("set timeout"))?;

        // A request under 4 KiB fits in the socket buffer, so this is a single write() and
        // slirp4netns's single read() sees all of it.
        stream.write_all(request).map_err(io("write"))?;
        stream.shutdown(Shutdown::Write).map_err(io("shutdown"))?;

        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).map_err(io("read"))?;
        Ok(reply)
    }
}

fn unexpected(execute: &'static str, reply: &Value) -> ApiError {
    ApiError::UnexpectedReply {
        execute,
        reply: reply.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_hostfwd_request_has_slirp4netns_field_names() -> Result<(), serde_json::Error> {
        let fwd = HostFwd {
            proto: FwdProto::Udp,
            host_addr: Ipv4Addr::LOCALHOST,
            host_port: 19180,
            guest_addr: Ipv4Addr::new(10, 0, 2, 100),
            guest_port: 80,
        };
        let body = json!({"execute": "add_hostfwd", "arguments": fwd});
        assert_eq!(
            serde_json::to_string(&body)?,
            r#"{"arguments":{"guest_addr":"10.0.2.100","guest_port":80,"host_addr":"127.0.0.1","host_port":19180,"proto":"udp"},"execute":"add_hostfwd"}"#
        );
        Ok(())
    }

    #[test]
    fn list_entries_parse_as_slirp4netns_sends_them() -> Result<(), serde_json::Error> {
        let raw = r#"[{"id":2,"proto":"udp","host_addr":"0.0.0.0","host_port":19181,"guest_addr":"10.0.2.100","guest_port":81}]"#;
        let entries: Vec<HostFwdEntry> = serde_json::from_str(raw)?;
        assert_eq!(entries[0].id, 2);
        assert_eq!(entries[0].fwd.proto, FwdProto::Udp);
        assert_eq!(entries[0].fwd.host_addr, Ipv4Addr::UNSPECIFIED);
        Ok(())
    }

    #[test]
    fn connect_failure_names_the_socket() {
        let err = Client::new("/nonexistent/s4nn.sock")
            .list_hostfwd()
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("slirp4netns API socket /nonexistent/s4nn.sock: connect: "),
            "{text}"
        );
    }
}
