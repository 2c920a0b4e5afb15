//! Error types: [`SpecError`] for a spec that is wrong on its own or against the current ports,
//! [`PortError`] for everything a driver operation can fail with.

use std::io;

use crate::proto::Proto;
use crate::status::PortId;

/// A port spec that cannot be accepted.
///
/// Messages keep RootlessKit's prefixes (`invalid ParentPort`, `conflict with ID 2`) so that
/// scripts matching them keep working, but always name the field that is wrong and show the
/// value as given, ports as numbers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The text does not follow `[PARENT_IP]:PARENT_PORT:[CHILD_IP:]CHILD_PORT/PROTO`.
    #[error("invalid port spec {spec:?}: {reason}")]
    Syntax { spec: String, reason: String },
    /// A field of a spec string is invalid; `source` says which.
    #[error("invalid port spec {spec:?}: {source}")]
    Field {
        spec: String,
        source: Box<SpecError>,
    },
    #[error(
        "unknown proto: {0:?} (want one of tcp, tcp4, tcp6, udp, udp4, udp6, sctp, sctp4, sctp6)"
    )]
    UnknownProto(String),
    #[error(
        "invalid ParentIP: {0:?} (want an IPv4 or IPv6 literal, IPv6 in brackets in a spec string)"
    )]
    InvalidParentIp(String),
    #[error(
        "invalid ChildIP: {0:?} (want an IPv4 or IPv6 literal, IPv6 in brackets in a spec string)"
    )]
    InvalidChildIp(String),
    /// The parent port as given, e.g. `70000` or `"x"`.
    #[error("invalid ParentPort: {0} (must be a number from 1 to 65535)")]
    InvalidParentPort(String),
    #[error("invalid ChildPort: {0} (must be a number from 1 to 65535)")]
    InvalidChildPort(String),
    /// The address family pinned by the proto cannot listen on the parent IP.
    #[error("proto {proto} cannot listen on {ip} (use {hint})")]
    FamilyMismatch {
        proto: Proto,
        ip: String,
        hint: &'static str,
    },
    /// The spec would listen where an existing port already does.
    #[error("conflict with ID {0}")]
    Conflict(PortId),
}

/// Why a driver operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The driver cannot forward this proto at all.
    #[error("protocol {proto} is not supported by port driver {driver}")]
    UnsupportedProto { proto: Proto, driver: String },
    /// The driver cannot forward this spec for another stated reason.
    #[error("port driver {driver} does not support {what}")]
    Unsupported { driver: String, what: String },
    #[error("unknown id: {0}")]
    UnknownId(PortId),
    /// The network has no port driver (`--port-driver=none`).
    #[error("no PortDriver is available")]
    NoDriver,
    /// Binding a host port below `net.ipv4.ip_unprivileged_port_start` was refused.
    #[error(
        "cannot expose privileged port {port}, you can add \
         'net.ipv4.ip_unprivileged_port_start={port}' to /etc/sysctl.conf (currently {start}), \
         or set CAP_NET_BIND_SERVICE on the rootlesskit binary, or choose a larger port number \
         (>= {start}): {detail}"
    )]
    PrivilegedPort {
        port: u16,
        start: u32,
        detail: String,
    },
    /// A system call failed; `context` says on what.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The driver's backend (slirp4netns, socat, the API server) reported an error.
    #[error("{0}")]
    Backend(String),
}

impl PortError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        PortError::Io {
            context: context.into(),
            source,
        }
    }
}
