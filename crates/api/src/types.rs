//! JSON bodies of the API, with RootlessKit's key names and omission rules.

use std::net::IpAddr;

use rkport_core::DriverInfo;
use serde::{Deserialize, Serialize};

/// The API version this crate speaks (`apiVersion` of `GET /v1/info`).
pub const API_VERSION: &str = "1.1.1";

/// `GET /v1/info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    /// Implementation version, without a `v` prefix.
    pub version: String,
    #[serde(rename = "stateDir")]
    pub state_dir: String,
    /// Host pid of the process that owns the namespaces (the `child_pid` file).
    #[serde(rename = "childPID")]
    pub child_pid: i32,
    /// Absent with the host network.
    #[serde(
        rename = "networkDriver",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub network_driver: Option<NetworkDriverInfo>,
    /// Absent with `--port-driver=none`.
    #[serde(
        rename = "portDriver",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub port_driver: Option<DriverInfo>,
}

/// The `networkDriver` member of [`Info`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkDriverInfo {
    pub driver: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<IpAddr>,
    /// The namespace's address on its network, e.g. `10.0.2.100` (API 1.1.1).
    #[serde(rename = "childIP", default, skip_serializing_if = "Option::is_none")]
    pub child_ip: Option<IpAddr>,
    #[serde(
        rename = "dynamicChildIP",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub dynamic_child_ip: bool,
}

/// The body of every error response: `{"message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub message: String,
}
