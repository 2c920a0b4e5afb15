//! What to launch: [`LaunchConfig`] and the checks that run before anything is started.
//!
//! Every combination rule of RootlessKit's `--net`/`--port-driver` flags lives here, so that a
//! bad command line fails with exit status 1 before a directory, namespace or process exists.

use std::ffi::OsString;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

use rkport_core::PortSpec;

/// The default slirp4netns MTU (RootlessKit and slirp4netns both use 65520).
pub const SLIRP4NETNS_DEFAULT_MTU: u32 = 65520;

/// The largest MTU slirp4netns accepts.
pub const MAX_MTU: u32 = 65521;

/// The tap device name used when `--ifname` is not given.
pub const DEFAULT_IFNAME: &str = "tap0";

/// The network the command gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkMode {
    /// The host's network namespace (no new netns); upstream's default.
    #[default]
    Host,
    /// A new network namespace with only `lo` up.
    None,
    /// A new network namespace with a tap device connected to the host by slirp4netns.
    Slirp4netns,
}

impl NetworkMode {
    /// The name used by `--net` and in `GET /v1/info`.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Host => "host",
            NetworkMode::None => "none",
            NetworkMode::Slirp4netns => "slirp4netns",
        }
    }
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NetworkMode {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "host" => Ok(NetworkMode::Host),
            "none" => Ok(NetworkMode::None),
            "slirp4netns" => Ok(NetworkMode::Slirp4netns),
            "vpnkit" | "lxc-user-nic" | "pasta" | "gvisor-tap-vsock" => {
                Err(ConfigError::UnsupportedNetwork(s.to_owned()))
            }
            _ => Err(ConfigError::UnknownNetwork(s.to_owned())),
        }
    }
}

/// Which port driver publishes ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PortDriverKind {
    /// No driver: the API answers `no PortDriver is available`.
    #[default]
    None,
    /// Host-side listeners in the parent, connections opened inside the namespace.
    Builtin,
    /// Forwarding done by slirp4netns through its API socket.
    Slirp4netns,
    /// One socat per port entering the namespace with nsenter (deprecated upstream).
    Socat,
}

impl PortDriverKind {
    /// The name used by `--port-driver` and in `GET /v1/info`.
    pub fn as_str(self) -> &'static str {
        match self {
            PortDriverKind::None => rkport_none::NAME,
            PortDriverKind::Builtin => rkport_builtin::NAME,
            PortDriverKind::Slirp4netns => rkport_slirp4netns::NAME,
            PortDriverKind::Socat => rkport_socat::NAME,
        }
    }
}

impl fmt::Display for PortDriverKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PortDriverKind {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        [
            PortDriverKind::None,
            PortDriverKind::Builtin,
            PortDriverKind::Slirp4netns,
            PortDriverKind::Socat,
        ]
        .into_iter()
        .find(|kind| kind.as_str() == s)
        .ok_or_else(|| ConfigError::UnknownPortDriver(s.to_owned()))
    }
}

/// Mount propagation of `/` in the child's mount namespace (`--propagation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Propagation {
    #[default]
    Rprivate,
    Private,
    Rslave,
    Slave,
    Rshared,
    Shared,
}

impl FromStr for Propagation {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        Ok(match s {
            "rprivate" => Propagation::Rprivate,
            "private" => Propagation::Private,
            "rslave" => Propagation::Rslave,
            "slave" => Propagation::Slave,
            "rshared" => Propagation::Rshared,
            "shared" => Propagation::Shared,
            _ => return Err(ConfigError::UnknownPropagation(s.to_owned())),
        })
    }
}

/// An IPv4 network for slirp4netns (`--cidr`), e.g. `10.0.2.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Default for Cidr {
    fn default() -> Self {
        Cidr {
            network: Ipv4Addr::new(10, 0, 2, 0),
            prefix: 24,
        }
    }
}

impl Cidr {
    /// The address `offset` hosts after the network address (slirp4netns: +2 gateway, +3 DNS,
    /// +100 the namespace).
    pub fn host(self, offset: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network).wrapping_add(offset))
    }

    /// The namespace's own address (base+100).
    pub fn child_ip(self) -> Ipv4Addr {
        self.host(100)
    }

    /// The default gateway, which is also the host (base+2).
    pub fn gateway(self) -> Ipv4Addr {
        self.host(2)
    }

    /// slirp4netns's DNS forwarder (base+3).
    pub fn dns(self) -> Ipv4Addr {
        self.host(3)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::InvalidCidr(s.to_owned());
        let (ip, prefix) = s.split_once('/').ok_or_else(bad)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        // base+100 must stay inside the network: /25 is the smallest that holds it.
        if !(1..=25).contains(&prefix) {
            return Err(bad());
        }
        let mask = u32::MAX << (32 - u32::from(prefix));
        let network = Ipv4Addr::from(u32::from(ip) & mask);
        if network != ip {
            return Err(ConfigError::CidrNotNetwork {
                given: s.to_owned(),
                network: format!("{network}/{prefix}"),
            });
        }
        Ok(Cidr {
            network: ip,
            prefix,
        })
    }
}

/// Everything `rootlesskit` needs to start a command (one field per flag).
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    /// The command and its arguments; must not be empty.
    pub command: Vec<OsString>,
    /// `--state-dir`; `None` makes a fresh `/tmp/rootlesskitXXXX`.
    pub state_dir: Option<PathBuf>,
    pub net: NetworkMode,
    pub port_driver: PortDriverKind,
    /// `-p`/`--publish`: published, in order, before the command starts.
    pub publish: Vec<PortSpec>,
    /// `--mtu`; 0 picks the driver default.
    pub mtu: u32,
    /// `--cidr`; `None` is slirp4netns's 10.0.2.0/24.
    pub cidr: Option<Cidr>,
    /// `--ifname`; `None` is `tap0`.
    pub ifname: Option<String>,
    pub disable_host_loopback: bool,
    /// `--slirp4netns-binary`: a name looked up in `$PATH` or a path.
    pub slirp4netns_binary: PathBuf,
    /// `--copy-up`: directories replaced by a writable tmpfs of symlinks to the originals.
    pub copy_up: Vec<PathBuf>,
    pub propagation: Propagation,
    /// Implementation version reported by `GET /v1/info`.
    pub version: String,
}

impl Default for LaunchConfig {
    fn default() -> Self {
        LaunchConfig {
            command: Vec::new(),
            state_dir: None,
            net: NetworkMode::default(),
            port_driver: PortDriverKind::default(),
            publish: Vec::new(),
            mtu: 0,
            cidr: None,
            ifname: None,
            disable_host_loopback: false,
            slirp4netns_binary: PathBuf::from("slirp4netns"),
            copy_up: Vec::new(),
            propagation: Propagation::default(),
            version: crate::VERSION.to_owned(),
        }
    }
}

impl LaunchConfig {
    /// Checks the combination rules (RootlessKit's `--net`/`--port-driver` table).
    ///
    /// # Errors
    /// The first rule broken, with upstream's message where upstream has one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.command.is_empty() {
            return Err(ConfigError::NoCommand);
        }
        self.validate_network()?;
        self.validate_port_driver()?;
        for dir in &self.copy_up {
            if !dir.is_absolute() {
                return Err(ConfigError::RelativeCopyUp(dir.clone()));
            }
        }
        Ok(())
    }

    fn validate_network(&self) -> Result<(), ConfigError> {
        if self.mtu > MAX_MTU {
            return Err(ConfigError::Mtu(self.mtu));
        }
        let slirp = self.net == NetworkMode::Slirp4netns;
        if self.cidr.is_some() && !slirp {
            return Err(ConfigError::CidrNeedsSlirp4netns);
        }
        match &self.ifname {
            Some(name) if self.net == NetworkMode::Host => {
                Err(ConfigError::IfnameWithHost(name.clone()))
            }
            Some(name) if !slirp => Err(ConfigError::IfnameNeedsSlirp4netns(name.clone())),
            Some(name) if !valid_ifname(name) => Err(ConfigError::InvalidIfname(name.clone())),
            _ => Ok(()),
        }
    }

    fn validate_port_driver(&self) -> Result<(), ConfigError> {
        use NetworkMode as N;
        use PortDriverKind as P;
        match (self.net, self.port_driver) {
            (_, P::None) if !self.publish.is_empty() => Err(ConfigError::NoneCannotPublish),
            (N::None, P::Slirp4netns | P::Socat) => Err(ConfigError::NoneNetwork),
            (N::Host, P::Builtin | P::Socat) => Err(ConfigError::NeedsNonHost),
            (N::Host, P::Slirp4netns) => Err(ConfigError::NeedsSlirp4netns),
            _ => Ok(()),
        }
    }

    /// The tap device name inside the namespace.
    pub fn ifname(&self) -> &str {
        self.ifname.as_deref().unwrap_or(DEFAULT_IFNAME)
    }

    /// The MTU of the tap device (slirp4netns's default when `--mtu` is 0).
    pub fn effective_mtu(&self) -> u32 {
        match self.mtu {
            0 => SLIRP4NETNS_DEFAULT_MTU,
            mtu => mtu,
        }
    }
}

/// Linux interface names: 1 to 15 bytes, no `/`, no whitespace, not `.` or `..`.
fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
}

/// A launch configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("no command specified")]
    NoCommand,
    #[error("unknown network mode: {0}")]
    UnknownNetwork(String),
    #[error("network mode {0:?} is not implemented (supported: host, none, slirp4netns)")]
    UnsupportedNetwork(String),
    #[error("unknown port driver: {0}")]
    UnknownPortDriver(String),
    #[error("unknown propagation: {0} (want rprivate, private, rslave, slave, rshared or shared)")]
    UnknownPropagation(String),
    #[error("invalid cidr {0:?} (want an IPv4 network like 10.0.2.0/24, prefix length 1 to 25)")]
    InvalidCidr(String),
    #[error("cidr must be like {network}, not like {given}")]
    CidrNotNetwork { given: String, network: String },
    #[error("custom cidr is supported only for --net=slirp4netns")]
    CidrNeedsSlirp4netns,
    #[error("mtu must be <= {MAX_MTU}, got {0}")]
    Mtu(u32),
    #[error("ifname cannot be specified for --net=host (got {0:?})")]
    IfnameWithHost(String),
    #[error("ifname is supported only for --net=slirp4netns (got {0:?})")]
    IfnameNeedsSlirp4netns(String),
    #[error("invalid ifname {0:?} (1 to 15 characters, no '/', ':' or whitespace)")]
    InvalidIfname(String),
    #[error("port driver \"none\" does not support publishing ports")]
    NoneCannotPublish,
    #[error("network \"none\" requires either port driver \"none\" or \"builtin\"")]
    NoneNetwork,
    #[error("port driver requires non-host network")]
    NeedsNonHost,
    #[error("port driver requires slirp4netns network")]
    NeedsSlirp4netns,
    #[error("copy-up directory must be an absolute path, got {0:?}")]
    RelativeCopyUp(PathBuf),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(net: NetworkMode, port_driver: PortDriverKind) -> LaunchConfig {
        LaunchConfig {
            command: vec!["true".into()],
            net,
            port_driver,
            ..LaunchConfig::default()
        }
    }

    #[test]
    fn combination_rules() {
        use NetworkMode as N;
        use PortDriverKind as P;
        let table = [
            (N::Host, P::None, None),
            (N::Host, P::Builtin, Some(ConfigError::NeedsNonHost)),
            (N::Host, P::Slirp4netns, Some(ConfigError::NeedsSlirp4netns)),
            (N::Host, P::Socat, Some(ConfigError::NeedsNonHost)),
            (N::None, P::Builtin, None),
            (N::None, P::Slirp4netns, Some(ConfigError::NoneNetwork)),
            (N::None, P::Socat, Some(ConfigError::NoneNetwork)),
            (N::Slirp4netns, P::Builtin, None),
            (N::Slirp4netns, P::Slirp4netns, None),
            (N::Slirp4netns, P::Socat, None),
        ];
        for (net, driver, want) in table {
            assert_eq!(config(net, driver).validate().err(), want, "{net} {driver}");
        }
    }

    #[test]
    fn none_driver_refuses_publish() {
        let mut c = config(NetworkMode::Slirp4netns, PortDriverKind::None);
        c.publish.push("127.0.0.1:8080:80/tcp".parse().unwrap());
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "port driver \"none\" does not support publishing ports"
        );
    }

    #[test]
    fn cidr_must_be_a_network_address() {
        let err = "10.0.2.100/24".parse::<Cidr>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "cidr must be like 10.0.2.0/24, not like 10.0.2.100/24"
        );
        let cidr: Cidr = "10.0.3.0/24".parse().unwrap();
        assert_eq!(cidr.child_ip(), Ipv4Addr::new(10, 0, 3, 100));
        assert_eq!(cidr.gateway(), Ipv4Addr::new(10, 0, 3, 2));
        assert_eq!(cidr.dns(), Ipv4Addr::new(10, 0, 3, 3));
        assert!("10.0.2.0".parse::<Cidr>().is_err());
        assert!("10.0.2.0/26".parse::<Cidr>().is_err());
    }

    #[test]
    fn network_flag_rules() {
        let mut c = config(NetworkMode::Host, PortDriverKind::None);
        c.cidr = Some(Cidr::default());
        assert_eq!(c.validate(), Err(ConfigError::CidrNeedsSlirp4netns));
        c.cidr = None;
        c.mtu = 70000;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "mtu must be <= 65521, got 70000"
        );
        c.mtu = 0;
        c.ifname = Some("eth0".into());
        assert_eq!(
            c.validate(),
            Err(ConfigError::IfnameWithHost("eth0".into()))
        );
        c.net = NetworkMode::Slirp4netns;
        c.ifname = Some("a/b".into());
        assert_eq!(c.validate(), Err(ConfigError::InvalidIfname("a/b".into())));
    }

    #[test]
    fn unimplemented_networks_are_named() {
        assert_eq!(
            "vpnkit".parse::<NetworkMode>(),
            Err(ConfigError::UnsupportedNetwork("vpnkit".into()))
        );
        assert_eq!(
            "bogus".parse::<NetworkMode>().unwrap_err().to_string(),
            "unknown network mode: bogus"
        );
    }
}
