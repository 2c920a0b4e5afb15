//! RootlessKit's REST API on `api.sock`: the JSON types, the server and the client.
//!
//! The wire format is upstream's API version 1.1.1 (`GET /v1/info`, `GET/POST /v1/ports`,
//! `DELETE /v1/ports/{id}`), so upstream's `rootlessctl`, Docker and nerdctl can talk to this
//! server and this client can talk to upstream's.
//!
//! - [`types`]: the JSON bodies ([`Info`], [`NetworkDriverInfo`], [`ErrorBody`]); port specs and
//!   statuses are `rkport-core`'s types, which serialise in the API's format.
//! - [`server`]: [`ApiServer`], serving a [`rkport_core::PortDriver`] on a unix socket.
//! - [`client`]: [`Client`], which implements [`rkport_core::PortDriver`] by calling a server.
//! - [`decode_port_spec`]: the lenient request-body decoder the server uses.
//!
//! This crate neither creates the state directory nor decides when the socket appears; the
//! launcher does.

pub mod client;
mod decode;
mod gate;
pub mod server;
pub mod types;

pub use client::{Client, ClientError};
pub use decode::decode_port_spec;
#[doc(hidden)]
pub use gate::{head_body_length, read_requests, GateRead};
pub use server::{ApiServer, ApiState};
pub use types::{ErrorBody, Info, NetworkDriverInfo, API_VERSION};
