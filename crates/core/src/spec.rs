//! Port specs: `[PARENT_IP]:PARENT_PORT:[CHILD_IP:]CHILD_PORT/PROTO`.
//!
//! The grammar is RootlessKit's (its `portutil` package): IPv6 addresses in square brackets,
//! an empty parent IP meaning every address, an optional child IP. This is a clean
//! implementation of that grammar, not of upstream's tokenizer: inputs upstream accepts only by
//! accident (`+8080`, whitespace before a colon, a sixth field glued onto the child port) are
//! refused here with a message naming the field.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::SpecError;
use crate::proto::{Family, Proto};
use crate::status::PortStatus;

/// One port to publish: where to listen on the host and where to connect inside.
///
/// Serialises as RootlessKit's `PortSpec` JSON: keys `proto`, `parentIP`, `parentPort`,
/// `childPort`, `childIP` in that order, each omitted when empty or zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawSpec")]
pub struct PortSpec {
    pub proto: Proto,
    /// Address to listen on in the host's network namespace; `None` means every address.
    #[serde(rename = "parentIP", skip_serializing_if = "Option::is_none")]
    pub parent_ip: Option<IpAddr>,
    #[serde(rename = "parentPort")]
    pub parent_port: u16,
    #[serde(rename = "childPort")]
    pub child_port: u16,
    /// Address to connect to inside the namespace; `None` leaves the choice to the driver.
    #[serde(rename = "childIP", skip_serializing_if = "Option::is_none")]
    pub child_ip: Option<IpAddr>,
}

/// A socket address a spec listens on, and whether an IPv6 socket is v6-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr {
    pub addr: SocketAddr,
    /// Meaningful for IPv6 only: `false` makes a dual-stack socket that also takes IPv4.
    pub v6only: bool,
}

impl PortSpec {
    /// A spec with no IPs: every host address, the driver's default address inside.
    pub fn new(proto: Proto, parent_port: u16, child_port: u16) -> Self {
        PortSpec {
            proto,
            parent_ip: None,
            parent_port,
            child_port,
            child_ip: None,
        }
    }

    /// Checks the fields of a spec on its own (ports in range, proto and IP family agree).
    ///
    /// # Errors
    /// The first problem found, naming its field.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.parent_port == 0 {
            return Err(SpecError::InvalidParentPort("0".into()));
        }
        if self.child_port == 0 {
            return Err(SpecError::InvalidChildPort("0".into()));
        }
        self.listen_addr().map(|_| ())
    }

    /// Checks the spec on its own and against the ports already published.
    ///
    /// Two specs conflict when they would listen on an overlapping address with the same
    /// transport and parent port: a wildcard overlaps every address of its family, and a
    /// dual-stack wildcard (`tcp` on `0.0.0.0`, `::` or no IP) overlaps both families. This
    /// finds, as `conflict with ID n`, what upstream's string comparison leaves to a later
    /// `bind: address already in use`, while still allowing `tcp4` and `tcp6` on one port.
    ///
    /// # Errors
    /// The spec's own problem, or [`SpecError::Conflict`] with the lowest conflicting id.
    pub fn validate_against<'a>(
        &self,
        existing: impl IntoIterator<Item = &'a PortStatus>,
    ) -> Result<(), SpecError> {
        self.validate()?;
        let mine = self.listen_addr()?;
        for port in existing {
            let Ok(theirs) = port.spec.listen_addr() else {
                continue;
            };
            if port.spec.proto.transport() == self.proto.transport() && overlaps(mine, theirs) {
                return Err(SpecError::Conflict(port.id));
            }
        }
        Ok(())
    }

    /// Where a host-side listener for this spec binds, with Go's `net.Listen` semantics that
    /// RootlessKit's builtin driver has.
    ///
    /// `tcp`/`udp` on no IP, `0.0.0.0` or `::` make one dual-stack socket; `tcp4` on any
    /// wildcard binds `0.0.0.0`; `tcp6` on no IP or `::` binds a v6-only `[::]`. An IPv4-mapped
    /// IPv6 parent IP listens as the IPv4 address it maps.
    ///
    /// # Errors
    /// [`SpecError::FamilyMismatch`] when the proto pins a family the parent IP is not of.
    pub fn listen_addr(&self) -> Result<ListenAddr, SpecError> {
        let port = self.parent_port;
        let ip = self.parent_ip.map(canonical_ip);
        let wildcard = ip.is_none_or(|ip| ip.is_unspecified());
        let v4 = |ip: Ipv4Addr| ListenAddr {
            addr: SocketAddr::new(ip.into(), port),
            v6only: false,
        };
        let v6 = |ip: Ipv6Addr, v6only| ListenAddr {
            addr: SocketAddr::new(ip.into(), port),
            v6only,
        };
        let mismatch = |hint| SpecError::FamilyMismatch {
            proto: self.proto,
            ip: ip.map(|ip| ip.to_string()).unwrap_or_default(),
            hint,
        };
        Ok(match (self.proto.family(), ip) {
            (None, _) if wildcard => v6(Ipv6Addr::UNSPECIFIED, false),
            (None, Some(IpAddr::V4(ip))) => v4(ip),
            (None, Some(IpAddr::V6(ip))) => v6(ip, true),
            (Some(Family::V4), _) if wildcard => v4(Ipv4Addr::UNSPECIFIED),
            (Some(Family::V4), Some(IpAddr::V4(ip))) => v4(ip),
            (Some(Family::V4), _) => return Err(mismatch("an IPv4 address or the unsuffixed proto")),
            (Some(Family::V6), None) => v6(Ipv6Addr::UNSPECIFIED, true),
            (Some(Family::V6), Some(IpAddr::V6(ip))) => v6(ip, true),
            (Some(Family::V6), Some(IpAddr::V4(_))) => {
                return Err(mismatch("[::] or an IPv6 address, or the unsuffixed proto"))
            }
            (None, None) => unreachable!("no parent IP is a wildcard"),
        })
    }
}

/// Maps `::ffff:a.b.c.d` to `a.b.c.d`; other addresses are returned as they are.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Whether two listeners on the same port and transport would claim a common address.
fn overlaps(a: ListenAddr, b: ListenAddr) -> bool {
    if a.addr.port() != b.addr.port() {
        return false;
    }
    let families = |l: ListenAddr| -> (bool, bool) {
        match l.addr.ip() {
            IpAddr::V4(_) => (true, false),
            IpAddr::V6(ip) => (!l.v6only && ip.is_unspecified(), true),
        }
    };
    let (a4, a6) = families(a);
    let (b4, b6) = families(b);
    let same_family = (a4 && b4) || (a6 && b6);
    let (aip, bip) = (a.addr.ip(), b.addr.ip());
    let wildcard = aip.is_unspecified() || bip.is_unspecified();
    same_family && (wildcard || aip == bip)
}

impl fmt::Display for PortSpec {
    /// Formats the spec in the grammar [`PortSpec::from_str`] parses, IPv6 in brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn ip(f: &mut fmt::Formatter<'_>, ip: Option<IpAddr>) -> fmt::Result {
            match ip {
                None => Ok(()),
                Some(IpAddr::V4(ip)) => write!(f, "{ip}"),
                Some(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            }
        }
        ip(f, self.parent_ip)?;
        write!(f, ":{}:", self.parent_port)?;
        if self.child_ip.is_some() {
            ip(f, self.child_ip)?;
            f.write_str(":")?;
        }
        write!(f, "{}/{}", self.child_port, self.proto)
    }
}

impl FromStr for PortSpec {
    type Err = SpecError;

    /// Parses `[PARENT_IP]:PARENT_PORT:[CHILD_IP:]CHILD_PORT/PROTO` and validates its fields.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = |reason: &str| SpecError::Syntax {
            spec: s.to_owned(),
            reason: reason.to_owned(),
        };
        let field = |source: SpecError| SpecError::Field {
            spec: s.to_owned(),
            source: Box::new(source),
        };

        let (addrs, proto) = s
            .rsplit_once('/')
            .ok_or_else(|| syntax("missing /PROTO (e.g. 127.0.0.1:8080:80/tcp)"))?;
        let proto: Proto = proto.parse().map_err(field)?;

        let fields = split_fields(addrs).map_err(|r| syntax(r))?;
        let (parent_ip, parent_port, child_ip, child_port) = match fields.as_slice() {
            [pip, pport, cport] => (*pip, *pport, None, *cport),
            [pip, pport, cip, cport] => (*pip, *pport, Some(*cip), *cport),
            _ if addrs.matches(':').count() > 4 => {
                return Err(syntax(
                    "too many fields (IPv6 addresses must be in square brackets)",
                ))
            }
            _ => {
                return Err(syntax(
                    "want [PARENT_IP]:PARENT_PORT:[CHILD_IP:]CHILD_PORT/PROTO",
                ))
            }
        };

        let spec = PortSpec {
            proto,
            parent_ip: parse_ip(parent_ip, SpecError::InvalidParentIp).map_err(field)?,
            parent_port: parse_port(parent_port, SpecError::InvalidParentPort).map_err(field)?,
            child_port: parse_port(child_port, SpecError::InvalidChildPort).map_err(field)?,
            child_ip: match child_ip {
                Some(ip) => parse_ip(ip, SpecError::InvalidChildIp).map_err(field)?,
                None => None,
            },
        };
        spec.validate().map_err(field)?;
        Ok(spec)
    }
}

/// Splits on `:` outside square brackets; a bracketed field must be followed by `:` or the end.
fn split_fields(s: &str) -> Result<Vec<&str>, &'static str> {
    let mut fields = Vec::new();
    let mut rest = s;
    loop {
        if let Some(inner) = rest.strip_prefix('[') {
            let end = inner.find(']').ok_or("unclosed '['")?;
            fields.push(&inner[..end]);
            rest = &inner[end + 1..];
            match rest.strip_prefix(':') {
                Some(r) => rest = r,
                None if rest.is_empty() => return Ok(fields),
                None => return Err("expected ':' after ']'"),
            }
        } else {
            match rest.split_once(':') {
                Some((f, r)) => {
                    fields.push(f);
                    rest = r;
                }
                None => {
                    fields.push(rest);
                    return Ok(fields);
                }
            }
        }
    }
}

fn parse_ip(s: &str, err: fn(String) -> SpecError) -> Result<Option<IpAddr>, SpecError> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| err(s.to_owned()))
}

fn parse_port(s: &str, err: fn(String) -> SpecError) -> Result<u16, SpecError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err(format!("{s:?}")));
    }
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(err(s.trim_start_matches('0').to_owned()).or_zero(s)),
        Ok(port) => Ok(port),
    }
}

trait OrZero {
    fn or_zero(self, s: &str) -> Self;
}

impl OrZero for SpecError {
    /// Shows `0` rather than an empty string for an all-zero port such as `00`.
    fn or_zero(self, s: &str) -> Self {
        match self {
            SpecError::InvalidParentPort(v) if v.is_empty() && !s.is_empty() => {
                SpecError::InvalidParentPort("0".into())
            }
            SpecError::InvalidChildPort(v) if v.is_empty() && !s.is_empty() => {
                SpecError::InvalidChildPort("0".into())
            }
            other => other,
        }
    }
}

/// The JSON shape before validation: ports as any integer so that 70000 is reported as such.
#[derive(Deserialize)]
struct RawSpec {
    #[serde(default)]
    proto: String,
    #[serde(rename = "parentIP", default)]
    parent_ip: String,
    #[serde(rename = "parentPort", default)]
    parent_port: i64,
    #[serde(rename = "childPort", default)]
    child_port: i64,
    #[serde(rename = "childIP", default)]
    child_ip: String,
}

impl TryFrom<RawSpec> for PortSpec {
    type Error = SpecError;

    fn try_from(raw: RawSpec) -> Result<Self, SpecError> {
        PortSpec::from_parts(
            &raw.proto,
            &raw.parent_ip,
            raw.parent_port,
            &raw.child_ip,
            raw.child_port,
        )
    }
}

impl PortSpec {
    /// Builds a spec from the loosely typed fields of an API request, validating each one in
    /// RootlessKit's order: proto, parent IP, child IP, parent port, child port.
    ///
    /// # Errors
    /// The first invalid field.
    pub fn from_parts(
        proto: &str,
        parent_ip: &str,
        parent_port: i64,
        child_ip: &str,
        child_port: i64,
    ) -> Result<Self, SpecError> {
        let port = |n: i64, err: fn(String) -> SpecError| {
            u16::try_from(n)
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| err(n.to_string()))
        };
        let spec = PortSpec {
            proto: proto.parse()?,
            parent_ip: parse_ip(parent_ip, SpecError::InvalidParentIp)?,
            child_ip: parse_ip(child_ip, SpecError::InvalidChildIp)?,
            parent_port: port(parent_port, SpecError::InvalidParentPort)?,
            child_port: port(child_port, SpecError::InvalidChildPort)?,
        };
        spec.validate()?;
        Ok(spec)
    }
}
