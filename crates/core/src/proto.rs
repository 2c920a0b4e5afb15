//! Port protocols: the nine proto strings of RootlessKit's grammar.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::SpecError;

/// A transport protocol with an optional address-family pin, as written in a port spec.
///
/// `tcp` listens on whatever family the parent IP implies (dual stack on a wildcard), `tcp4`
/// and `tcp6` pin the family. The strings are case-sensitive, as upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Tcp4,
    Tcp6,
    Udp,
    Udp4,
    Udp6,
    Sctp,
    Sctp4,
    Sctp6,
}

/// The transport part of a [`Proto`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Tcp,
    Udp,
    Sctp,
}

/// An address family pinned by a [`Proto`] suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Proto {
    /// Every proto the grammar accepts, in upstream's order.
    pub const ALL: [Proto; 9] = [
        Proto::Tcp,
        Proto::Tcp4,
        Proto::Tcp6,
        Proto::Udp,
        Proto::Udp4,
        Proto::Udp6,
        Proto::Sctp,
        Proto::Sctp4,
        Proto::Sctp6,
    ];

    /// The spelling used in specs and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Tcp4 => "tcp4",
            Proto::Tcp6 => "tcp6",
            Proto::Udp => "udp",
            Proto::Udp4 => "udp4",
            Proto::Udp6 => "udp6",
            Proto::Sctp => "sctp",
            Proto::Sctp4 => "sctp4",
            Proto::Sctp6 => "sctp6",
        }
    }

    /// The transport without the family pin.
    pub fn transport(self) -> Transport {
        match self {
            Proto::Tcp | Proto::Tcp4 | Proto::Tcp6 => Transport::Tcp,
            Proto::Udp | Proto::Udp4 | Proto::Udp6 => Transport::Udp,
            Proto::Sctp | Proto::Sctp4 | Proto::Sctp6 => Transport::Sctp,
        }
    }

    /// The pinned family, `None` for the unsuffixed protos.
    pub fn family(self) -> Option<Family> {
        match self {
            Proto::Tcp4 | Proto::Udp4 | Proto::Sctp4 => Some(Family::V4),
            Proto::Tcp6 | Proto::Udp6 | Proto::Sctp6 => Some(Family::V6),
            Proto::Tcp | Proto::Udp | Proto::Sctp => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Proto {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Proto::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| SpecError::UnknownProto(s.to_owned()))
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
            Transport::Sctp => "sctp",
        })
    }
}
