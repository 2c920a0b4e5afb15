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
    /// Why the network is gone while rootlesskit stops because of it, e.g. `slirp4netns exited
    /// unexpectedly (signal: 9 (SIGKILL)): ...`. Absent while the network works.
    ///
    /// Not in upstream's API: Go clients (upstream's `rootlessctl`, Docker) ignore keys they do
    /// not know, so adding it keeps the wire format compatible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The body of every error response: `{"message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slirp4netns() -> NetworkDriverInfo {
        NetworkDriverInfo {
            driver: "slirp4netns".into(),
            dns: vec!["10.0.2.3".parse().unwrap()],
            child_ip: Some("10.0.2.100".parse().unwrap()),
            dynamic_child_ip: false,
            error: None,
        }
    }

    #[test]
    fn network_error_is_omitted_until_set() {
        let mut net = slirp4netns();
        assert_eq!(
            serde_json::to_string(&net).unwrap(),
            r#"{"driver":"slirp4netns","dns":["10.0.2.3"],"childIP":"10.0.2.100"}"#
        );
        net.error = Some("slirp4netns exited unexpectedly".into());
        assert_eq!(
            serde_json::to_string(&net).unwrap(),
            r#"{"driver":"slirp4netns","dns":["10.0.2.3"],"childIP":"10.0.2.100","error":"slirp4netns exited unexpectedly"}"#
        );
    }

    #[test]
    fn network_info_without_error_decodes() {
        // Upstream 1.1.0's answer (api.md).
        let net: NetworkDriverInfo = serde_json::from_str(
            r#"{"driver":"slirp4netns","dns":["10.0.2.3"],"childIP":"10.0.2.100"}"#,
        )
        .unwrap();
        assert_eq!(net, slirp4netns());
    }
}
