//! The helper channel's messages: fixed-size little-endian records on a `SOCK_SEQPACKET` pair.
//!
//! The parent sends a [`Request`] (32 bytes) per socket it wants opened inside the namespace;
//! the helper answers each with a [`Reply`] (16 bytes) carrying the same id, and, when the
//! reply's errno is 0, exactly one descriptor as `SCM_RIGHTS`. Requests may be pipelined; the
//! helper answers them in order, but the parent matches replies by id only.
//!
//! A [`Kind::Spare`] request asks for a TCP socket that is not connected yet: the parent asks
//! for a few ahead of need, in one go, so that a new client costs no round trip to the helper.
//!
//! A [`Kind::Channel`] request is the exception: it carries one end of a further channel as
//! `SCM_RIGHTS` (its target is unused), gets no reply, and the helper serves the new channel
//! alongside the first, so that each data-path worker of the parent has a channel of its own.
//! Nothing here does I/O.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Length of an encoded [`Request`].
pub const REQUEST_LEN: usize = 32;
/// Length of an encoded [`Reply`].
pub const REPLY_LEN: usize = 16;

/// The kind of socket a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A TCP socket with a non-blocking connect to the target started.
    Tcp = 1,
    /// A UDP socket connected to the target.
    Udp = 2,
    /// Serve the channel end attached to this request too; no reply.
    Channel = 3,
    /// A TCP socket of the target's address family, not connected: the parent keeps a few
    /// and starts the connect itself when a client arrives (the socket stays in the
    /// namespace it was made in). The target's address and port are unused.
    Spare = 4,
}

/// Ask the helper for a socket connected (or connecting) to `target` inside the namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub id: u64,
    pub kind: Kind,
    pub target: SocketAddr,
}

/// The helper's answer to the request with the same id: `errno == 0` means a descriptor came
/// with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub id: u64,
    pub errno: i32,
}

impl Request {
    /// Encodes as `id u64 | kind u8 | family u8 (4 or 6) | port u16 | addr [u8; 16] | 0 u32`.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..8].copy_from_slice(&self.id.to_le_bytes());
        b[8] = self.kind as u8;
        b[10..12].copy_from_slice(&self.target.port().to_le_bytes());
        match self.target.ip() {
            IpAddr::V4(ip) => {
                b[9] = 4;
                b[12..16].copy_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                b[9] = 6;
                b[12..28].copy_from_slice(&ip.octets());
            }
        }
        b
    }

    /// Decodes a request; `None` for a message of the wrong length or with unknown fields.
    pub fn decode(b: &[u8]) -> Option<Request> {
        let b: &[u8; REQUEST_LEN] = b.try_into().ok()?;
        let kind = match b[8] {
            1 => Kind::Tcp,
            2 => Kind::Udp,
            3 => Kind::Channel,
            4 => Kind::Spare,
            _ => return None,
        };
        let port = u16::from_le_bytes([b[10], b[11]]);
        let ip: IpAddr = match b[9] {
            4 => Ipv4Addr::from(<[u8; 4]>::try_from(&b[12..16]).ok()?).into(),
            6 => Ipv6Addr::from(<[u8; 16]>::try_from(&b[12..28]).ok()?).into(),
            _ => return None,
        };
        Some(Request {
            id: request_id(b)?,
            kind,
            target: SocketAddr::new(ip, port),
        })
    }
}

/// The id of a message that may not decode as a whole, so that it can still be answered.
pub fn request_id(b: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(0..8)?.try_into().ok()?))
}

impl Reply {
    /// Encodes as `id u64 | errno i32 | 0 u32`.
    pub fn encode(&self) -> [u8; REPLY_LEN] {
        let mut b = [0u8; REPLY_LEN];
        b[0..8].copy_from_slice(&self.id.to_le_bytes());
        b[8..12].copy_from_slice(&self.errno.to_le_bytes());
        b
    }

    /// Decodes a reply; `None` for a message of the wrong length.
    pub fn decode(b: &[u8]) -> Option<Reply> {
        let b: &[u8; REPLY_LEN] = b.try_into().ok()?;
        Some(Reply {
            id: request_id(b)?,
            errno: i32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips() {
        for target in ["127.0.0.2:80", "[::1]:8080"] {
            let req = Request {
                id: 0x0102_0304_0506_0708,
                kind: Kind::Udp,
                target: target.parse().unwrap(),
            };
            assert_eq!(Request::decode(&req.encode()), Some(req));
        }
    }

    #[test]
    fn reply_round_trips() {
        let reply = Reply { id: 7, errno: 111 };
        assert_eq!(Reply::decode(&reply.encode()), Some(reply));
    }

    #[test]
    fn malformed_messages_are_refused() {
        let good = Request {
            id: 1,
            kind: Kind::Tcp,
            target: "127.0.0.1:1".parse().unwrap(),
        }
        .encode();
        assert_eq!(Request::decode(&good[..31]), None);
        let mut bad_kind = good;
        bad_kind[8] = 9;
        assert_eq!(Request::decode(&bad_kind), None);
        let mut bad_family = good;
        bad_family[9] = 5;
        assert_eq!(Request::decode(&bad_family), None);
        assert_eq!(Reply::decode(&[0; 15]), None);
    }
}
