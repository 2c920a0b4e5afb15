//! The control channel between the parent and the child: framed JSON messages on a socketpair.
//!
//! Frames are a 4-byte little-endian length followed by that many bytes of JSON, as in
//! RootlessKit's own parent/child pipe (drivers.md §1.1); the message set is this crate's.
//! Parent and child are always the same binary, so the protocol is internal and unversioned.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::config::Propagation;

/// Frames larger than this are refused (a corrupted length must not allocate gigabytes).
const MAX_FRAME: u32 = 1 << 20;

/// What the parent tells the child, in protocol order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ParentMsg {
    /// First message: what to set up.
    Init(ChildSetup),
    /// The uid/gid maps of the child's user namespace are written.
    MapsWritten,
    /// The network is up on the host side (slirp4netns ready); configure the inside.
    Network(Option<NetConfig>),
    /// Everything is published and the API listens: run the command.
    Start,
}

/// What the child reports, in protocol order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ChildMsg {
    /// The namespaces exist; the parent may write the id maps.
    Unshared,
    /// Root in the namespace, mounts done, `lo` up, tap created.
    NamespacesReady,
    /// Network configured, port-driver helper running.
    Ready,
    /// The command runs with this (host) pid.
    Started(i32),
    /// A step failed; the child exits after sending this.
    Failed(String),
}

/// The child's part of the configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ChildSetup {
    pub unshare_net: bool,
    pub state_dir: PathBuf,
    pub propagation: Propagation,
    pub copy_up: Vec<PathBuf>,
    /// Tap device to create for slirp4netns.
    pub tap: Option<String>,
    /// Serve the builtin port driver's helper on fd 4.
    pub builtin_helper: bool,
    pub command: Vec<OsString>,
}

/// The inside of a slirp4netns network (drivers.md §1.1).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct NetConfig {
    pub ifname: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub dns: Ipv4Addr,
    pub mtu: u32,
}

/// One end of the control socketpair.
#[derive(Debug)]
pub(crate) struct Channel {
    stream: UnixStream,
}

impl Channel {
    pub fn new(stream: UnixStream) -> Self {
        Channel { stream }
    }

    /// Sends one message.
    pub fn send<T: Serialize>(&mut self, msg: &T) -> io::Result<()> {
        let body = serde_json::to_vec(msg)?;
        let len = u32::try_from(body.len())
            .ok()
            .filter(|&len| len <= MAX_FRAME)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "message too large"))?;
        self.stream.write_all(&len.to_le_bytes())?;
        self.stream.write_all(&body)
    }

    /// Receives one message; `UnexpectedEof` when the peer is gone.
    pub fn recv<T: DeserializeOwned>(&mut self) -> io::Result<T> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len);
        if len > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("control message of {len} bytes is too large"),
            ));
        }
        let mut body = vec![0u8; len as usize];
        self.stream.read_exact(&mut body)?;
        Ok(serde_json::from_slice(&body)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Channel::new(a), Channel::new(b));
        a.send(&ChildMsg::Started(42)).unwrap();
        a.send(&ChildMsg::Failed("boom".into())).unwrap();
        assert!(matches!(
            b.recv::<ChildMsg>().unwrap(),
            ChildMsg::Started(42)
        ));
        assert!(matches!(b.recv::<ChildMsg>().unwrap(), ChildMsg::Failed(m) if m == "boom"));
        drop(a);
        let err = b.recv::<ChildMsg>().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
