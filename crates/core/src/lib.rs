//! The contract every rkport port driver fulfils.
//!
//! rkport exposes ports of a program that runs inside a rootless user + network namespace on
//! the host, wire-compatible with RootlessKit's port layer. This crate is the bottom of the
//! workspace: it knows nothing of namespaces, HTTP or command lines. It defines
//!
//! - [`Proto`] and [`PortSpec`], the `[PARENT_IP]:PARENT_PORT:[CHILD_IP:]CHILD_PORT/PROTO`
//!   grammar with its parser, formatter and validation ([`spec`]);
//! - [`PortStatus`] and [`DriverInfo`], what drivers report;
//! - [`PortError`], the one error type callers match on;
//! - the [`PortDriver`] trait and [`PortTable`], the id and conflict bookkeeping that drivers
//!   share.
//!
//! Driver crates (`rkport-none`, `rkport-builtin`, `rkport-slirp4netns`, `rkport-socat`) depend
//! on this crate only; the API crate's client implements [`PortDriver`] too, so tools talk to "a
//! driver" whether it runs in-process or behind `api.sock`.

#[cfg(feature = "conformance")]
pub mod conformance;
pub mod driver;
pub mod error;
pub mod proto;
pub mod spec;
pub mod status;
pub mod table;

pub use driver::PortDriver;
pub use error::{PortError, SpecError};
pub use proto::{Family, Proto, Transport};
pub use spec::PortSpec;
pub use status::{DriverInfo, PortId, PortStatus};
pub use table::PortTable;
