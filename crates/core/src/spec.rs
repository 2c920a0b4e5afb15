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
            (Some(Family::V4), _) => {
                return Err(mismatch("an IPv4 address or the unsuffixed proto"))
            }
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

        let fields = split_fields(addrs).map_err(&syntax)?;
        let (parent_ip, parent_port, child_ip, child_port) = match fields.as_slice() {
            [pip, pport, cport] => (*pip, *pport, None, *cport),
            [pip, pport, cip, cport] => (*pip, *pport, Some(*cip), *cport),
            [pport, cport] => {
                return Err(syntax(&format!(
                    "want [PARENT_IP]:PARENT_PORT:[CHILD_IP:]CHILD_PORT/PROTO \
                     (for every host address write :{pport}:{cport}/{proto})"
                )))
            }
            _ if (addrs.contains("::") || addrs.matches(':').count() > 4)
                && !addrs.contains('[') =>
            {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::PortId;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    const BASE: PortSpec = PortSpec {
        proto: Proto::Tcp,
        parent_ip: None,
        parent_port: 8080,
        child_port: 80,
        child_ip: None,
    };

    /// Upstream's `TestParsePortSpec` table (tests-upstream §1.1).
    #[test]
    fn parse_upstream_table() {
        let ok = [
            (
                "127.0.0.1:8080:80/tcp",
                PortSpec {
                    parent_ip: ip("127.0.0.1"),
                    ..BASE
                },
            ),
            (
                "127.0.0.1:8080:80/tcp4",
                PortSpec {
                    proto: Proto::Tcp4,
                    parent_ip: ip("127.0.0.1"),
                    ..BASE
                },
            ),
            (
                "127.0.0.1:8080:10.0.2.100:80/tcp",
                PortSpec {
                    parent_ip: ip("127.0.0.1"),
                    child_ip: ip("10.0.2.100"),
                    ..BASE
                },
            ),
            (
                "[::1]:8080:80/tcp",
                PortSpec {
                    parent_ip: ip("::1"),
                    ..BASE
                },
            ),
            (
                "[::1]:8080:[::2]:80/udp",
                PortSpec {
                    proto: Proto::Udp,
                    parent_ip: ip("::1"),
                    child_ip: ip("::2"),
                    ..BASE
                },
            ),
        ];
        for (text, want) in ok {
            assert_eq!(text.parse::<PortSpec>(), Ok(want), "{text}");
        }
        for bad in ["bad", "127.0.0.1:8080:80/tcp,127.0.0.1:4040:40/tcp", "8080"] {
            assert!(bad.parse::<PortSpec>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn parse_empty_and_bracketed_ips() {
        for text in [":18091:80/tcp", "[]:18091:80/tcp"] {
            let spec: PortSpec = text.parse().unwrap();
            assert_eq!(spec.parent_ip, None, "{text}");
        }
        let spec: PortSpec = "[127.0.0.1]:8080:[::1]:80/tcp".parse().unwrap();
        assert_eq!(
            (spec.parent_ip, spec.child_ip),
            (ip("127.0.0.1"), ip("::1"))
        );
        let spec: PortSpec = "[::ffff:127.0.0.1]:8080:80/tcp".parse().unwrap();
        assert_eq!(spec.to_string(), "[::ffff:127.0.0.1]:8080:80/tcp");
    }

    /// Case C09 and cli.md §3.3: every message names the field and shows the value.
    #[test]
    fn parse_errors_name_the_field() {
        let cases = [
            ("127.0.0.1:8080:80", "missing /PROTO"),
            ("127.0.0.1:8080:80/TCP", "unknown proto: \"TCP\""),
            ("127.0.0.1:8080:80/foo", "unknown proto: \"foo\""),
            ("127.0.0.1:8080:80/", "unknown proto: \"\""),
            ("8080:80/tcp", "write :8080:80/tcp"),
            ("999.0.0.1:18009:80/tcp", "invalid ParentIP: \"999.0.0.1\""),
            ("localhost:18009:80/tcp", "invalid ParentIP: \"localhost\""),
            (
                "127.0.0.1:18009:not-an-ip:80/tcp",
                "invalid ChildIP: \"not-an-ip\"",
            ),
            ("127.0.0.1:8080:zz:80/tcp", "invalid ChildIP: \"zz\""),
            ("127.0.0.1:0:80/tcp", "invalid ParentPort: 0 "),
            ("127.0.0.1:00:80/tcp", "invalid ParentPort: 0 "),
            ("127.0.0.1:70000:80/tcp", "invalid ParentPort: 70000 "),
            ("127.0.0.1:18009:0/tcp", "invalid ChildPort: 0 "),
            ("127.0.0.1:x:80/tcp", "invalid ParentPort: \"x\""),
            ("127.0.0.1:8080:y/tcp", "invalid ChildPort: \"y\""),
            ("127.0.0.1:+8080:80/tcp", "invalid ParentPort: \"+8080\""),
            ("127.0.0.1: 8080:80/tcp", "invalid ParentPort: \" 8080\""),
            ("::1:18094:80/tcp", "square brackets"),
            ("1.2.3.4:5:6:7:8/tcp", "want [PARENT_IP]"),
            ("/tcp", "want [PARENT_IP]"),
            ("[::1:8080:80/tcp", "unclosed"),
            ("[0.0.0.0]:8080:80/tcp6", "tcp6 cannot listen on 0.0.0.0"),
            ("[::1]:8080:80/udp4", "udp4 cannot listen on ::1"),
        ];
        for (text, want) in cases {
            let msg = text.parse::<PortSpec>().unwrap_err().to_string();
            assert!(msg.contains(want), "{text}: {msg:?} lacks {want:?}");
            assert!(
                msg.contains(&format!("{text:?}")),
                "{text}: {msg:?} lacks the spec"
            );
        }
    }

    /// Upstream's `TestValidatePortSpec` table (tests-upstream §1.2).
    #[test]
    fn validate_upstream_table() {
        let existing = [
            PortStatus {
                id: 1,
                spec: PortSpec {
                    parent_port: 80,
                    ..BASE
                },
            },
            PortStatus {
                id: 2,
                spec: PortSpec {
                    parent_ip: ip("10.10.10.10"),
                    parent_port: 8080,
                    child_port: 8080,
                    ..BASE
                },
            },
        ];
        let base = ("tcp", "127.0.0.1", 1001_i64, "", 1001_i64);
        let check = |(proto, pip, pport, cip, cport): (&str, &str, i64, &str, i64)| {
            PortSpec::from_parts(proto, pip, pport, cip, cport)
                .and_then(|spec| spec.validate_against(&existing))
                .map_err(|e| e.to_string())
        };
        for proto in ["", "NaN", "TCP"] {
            let err = check((proto, base.1, base.2, base.3, base.4)).unwrap_err();
            assert!(err.contains("unknown proto"), "{proto}: {err}");
        }
        for proto in ["udp", "tcp", "sctp"] {
            assert_eq!(
                check((proto, base.1, base.2, base.3, base.4)),
                Ok(()),
                "{proto}"
            );
        }
        let err = check(("tcp", "invalid", 1001, "", 1001)).unwrap_err();
        assert!(err.contains("invalid ParentIP"), "{err}");
        let err = check(("tcp", "127.0.0.1", 1001, "invalid", 1001)).unwrap_err();
        assert!(err.contains("invalid ChildIP"), "{err}");
        for port in [-200, 0, 1_000_000] {
            let err = check(("tcp", "127.0.0.1", port, "", 1001)).unwrap_err();
            assert!(
                err.starts_with(&format!("invalid ParentPort: {port} ")),
                "{err}"
            );
            let err = check(("tcp", "127.0.0.1", 1001, "", port)).unwrap_err();
            assert!(
                err.starts_with(&format!("invalid ChildPort: {port} ")),
                "{err}"
            );
        }
        for port in [20, 500, 1337, 65000] {
            assert_eq!(check(("tcp", "127.0.0.1", port, "", 1001)), Ok(()));
            assert_eq!(check(("tcp", "127.0.0.1", 1001, "", port)), Ok(()));
        }
        assert_eq!(check(("udp", "", 80, "", 80)), Ok(()));
        assert_eq!(check(("tcp", "10.10.10.11", 8080, "", 8080)), Ok(()));
        assert_eq!(check(("tcp", "10.10.10.10", 8081, "", 8080)), Ok(()));
        assert_eq!(
            check(("tcp", "", 80, "", 90)),
            Err("conflict with ID 1".into())
        );
        assert_eq!(
            check(("tcp", "10.10.10.10", 8080, "", 8080)),
            Err("conflict with ID 2".into())
        );
    }

    /// What upstream leaves to `bind()` is a conflict here; families that do not overlap are not.
    #[test]
    fn conflicts_by_overlapping_address() {
        let one = |proto: Proto, pip: &str| PortStatus {
            id: 7 as PortId,
            spec: PortSpec {
                proto,
                parent_ip: if pip.is_empty() { None } else { ip(pip) },
                ..BASE
            },
        };
        let conflict = |a: PortStatus, proto: Proto, pip: &str| {
            PortSpec {
                proto,
                parent_ip: if pip.is_empty() { None } else { ip(pip) },
                ..BASE
            }
            .validate_against([&a])
            .is_err()
        };
        assert!(conflict(one(Proto::Tcp, "0.0.0.0"), Proto::Tcp4, "0.0.0.0"));
        assert!(conflict(one(Proto::Tcp, ""), Proto::Tcp, "0.0.0.0"));
        assert!(conflict(
            one(Proto::Tcp, "127.0.0.1"),
            Proto::Tcp,
            "::ffff:127.0.0.1"
        ));
        assert!(conflict(
            one(Proto::Tcp4, "0.0.0.0"),
            Proto::Tcp,
            "127.0.0.1"
        ));
        assert!(conflict(one(Proto::Tcp, "::"), Proto::Tcp6, "::1"));
        assert!(!conflict(one(Proto::Tcp4, "0.0.0.0"), Proto::Tcp6, "::"));
        assert!(!conflict(
            one(Proto::Tcp, "127.0.0.1"),
            Proto::Tcp,
            "127.0.0.2"
        ));
        assert!(!conflict(
            one(Proto::Tcp, "127.0.0.1"),
            Proto::Udp,
            "127.0.0.1"
        ));
        assert!(!conflict(one(Proto::Tcp6, "::1"), Proto::Tcp4, "127.0.0.1"));
    }

    /// Go `net.Listen` semantics (cli.md §4.2).
    #[test]
    fn listen_addresses() {
        let listen = |text: &str| {
            let l = text.parse::<PortSpec>().unwrap().listen_addr().unwrap();
            (l.addr.to_string(), l.v6only)
        };
        assert_eq!(listen(":8080:80/tcp"), ("[::]:8080".into(), false));
        assert_eq!(listen("0.0.0.0:8080:80/udp"), ("[::]:8080".into(), false));
        assert_eq!(listen("[::]:8080:80/tcp"), ("[::]:8080".into(), false));
        assert_eq!(
            listen("127.0.0.2:8080:80/tcp"),
            ("127.0.0.2:8080".into(), false)
        );
        assert_eq!(listen("[::1]:8080:80/tcp"), ("[::1]:8080".into(), true));
        assert_eq!(listen("[::]:8080:80/tcp4"), ("0.0.0.0:8080".into(), false));
        assert_eq!(listen(":8080:80/tcp6"), ("[::]:8080".into(), true));
        assert_eq!(
            listen("[::ffff:127.0.0.1]:8080:80/tcp"),
            ("127.0.0.1:8080".into(), false)
        );
    }

    #[test]
    fn json_keys_order_and_omission() {
        let spec: PortSpec = "127.0.0.1:18082:10.0.2.100:82/udp".parse().unwrap();
        assert_eq!(
            serde_json::to_string(&spec).unwrap(),
            r#"{"proto":"udp","parentIP":"127.0.0.1","parentPort":18082,"childPort":82,"childIP":"10.0.2.100"}"#
        );
        let spec: PortSpec = ":8080:80/tcp".parse().unwrap();
        assert_eq!(
            serde_json::to_string(&spec).unwrap(),
            r#"{"proto":"tcp","parentPort":8080,"childPort":80}"#
        );
        let err = serde_json::from_str::<PortSpec>(
            r#"{"proto":"tcp","parentPort":70000,"childPort":80}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("invalid ParentPort: 70000"), "{err}");
    }

    mod props {
        use proptest::prelude::*;

        use super::*;

        fn any_ip() -> impl Strategy<Value = Option<IpAddr>> {
            prop_oneof![
                Just(None),
                any::<[u8; 4]>().prop_map(|b| Some(IpAddr::from(b))),
                any::<[u8; 16]>().prop_map(|b| Some(IpAddr::from(b))),
            ]
        }

        fn any_spec() -> impl Strategy<Value = PortSpec> {
            (
                0..Proto::ALL.len(),
                any_ip(),
                1..=u16::MAX,
                1..=u16::MAX,
                any_ip(),
            )
                .prop_filter_map(
                    "family pin must fit the parent IP",
                    |(p, parent_ip, parent_port, child_port, child_ip)| {
                        let spec = PortSpec {
                            proto: Proto::ALL[p],
                            parent_ip,
                            parent_port,
                            child_port,
                            child_ip,
                        };
                        spec.validate().is_ok().then_some(spec)
                    },
                )
        }

        proptest! {
            #[test]
            fn format_then_parse_round_trips(spec in any_spec()) {
                prop_assert_eq!(spec.to_string().parse::<PortSpec>(), Ok(spec));
            }

            #[test]
            fn json_round_trips(spec in any_spec()) {
                let json = serde_json::to_string(&spec).unwrap();
                prop_assert_eq!(serde_json::from_str::<PortSpec>(&json).unwrap(), spec);
            }

            #[test]
            fn parse_never_panics(text in "\\PC{0,40}") {
                let _ = text.parse::<PortSpec>();
            }
        }
    }
}
