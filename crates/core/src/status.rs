//! What drivers report: a published port with its id, and the driver's capabilities.

use serde::{Deserialize, Serialize};

use crate::proto::Proto;
use crate::spec::PortSpec;

/// A port id: assigned by the driver, starting at 1, never reused within a run.
///
/// Signed because the wire format is a plain integer and `DELETE /v1/ports/-1` must be an
/// `unknown id`, not a parse failure.
pub type PortId = i64;

/// A published port, as `GET /v1/ports` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortStatus {
    pub id: PortId,
    pub spec: PortSpec,
}

/// What a port driver is and can do (`portDriver` of `GET /v1/info`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverInfo {
    pub driver: String,
    pub protos: Vec<Proto>,
    /// The driver cannot reach a loopback address inside the namespace (API 1.1.1).
    #[serde(
        rename = "disallowLoopbackChildIP",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub disallow_loopback_child_ip: bool,
}
