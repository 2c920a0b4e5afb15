//! RootlessKit's REST API on `api.sock`: the JSON types, the server and the client.
//!
//! The wire format is upstream's API version 1.1.1 (`GET /v1/info`, `GET/POST /v1/ports`,
//! `DELETE /v1/ports/{id}`), so upstream's `rootlessctl`, Docker and nerdctl can talk to this
//! server and this client can talk to upstream's.

pub mod types;

pub use types::{ErrorBody, Info, NetworkDriverInfo, API_VERSION};
