//! The `builtin` port driver: rkport's own TCP and UDP forwarder.
//!
//! The driver has two halves joined by a long-lived unix socketpair ([`channel()`]):
//!
//! - [`BuiltinDriver`], in the parent (the host's network namespace), binds the host ports,
//!   accepts connections and copies their bytes;
//! - [`helper::serve`], run by a thread or process inside the target network namespace, opens
//!   sockets there on the parent's request and passes them back with `SCM_RIGHTS`.
//!
//! Unlike RootlessKit's driver, which opens a new unix connection and exchanges JSON for every
//! forwarded connection, requests here are small fixed-size records with ids, pipelined on a
//! channel ([`wire`]). The parent runs one worker thread per CPU (at least two); each watches
//! every TCP listener, accepts, and connects a spare TCP socket that the helper made inside
//! the namespace ahead of need (asked for in batches on a channel of the worker's own, opened
//! through the first), so a new client usually costs no round trip to the helper; a socket made
//! inside keeps to the namespace it was made in, wherever it is connected from. Without a spare,
//! the worker asks the helper for a socket with its connect started. Either way the worker's
//! event loop waits for the handshake. It moves the bytes of its connections itself: short
//! messages through a one-page buffer, bulk (from the first read that fills the page) with
//! splice(2), borrowing a pipe per direction only while bytes wait. Each worker keeps its connections in a descriptor
//! table of its own, so the open-files limit applies per worker. UDP sessions live on one
//! control thread, on the first channel; their datagrams are read in batches and sent on in
//! as few system calls as the kernel allows. No thread is started per connection.
//!
//! The crate does not enter namespaces, start processes or speak the REST API: the launcher
//! puts the helper inside the namespace and the API server calls the [`PortDriver`] methods.
//!
//! # Example
//!
//! ```
//! use std::io::{Read, Write};
//! use std::net::{TcpListener, TcpStream};
//!
//! use rkport_builtin::{channel, helper, BuiltinDriver};
//! use rkport_core::{PortDriver, PortSpec, Proto};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (parent_end, helper_end) = channel()?;
//! // In the launcher `helper_end` goes to a process inside the network namespace. Here the
//! // helper runs on a thread of this process, so "inside" is the host's own loopback.
//! let helper = std::thread::spawn(move || helper::serve(helper_end));
//! let driver = BuiltinDriver::new(parent_end)?;
//!
//! // A server "inside", and a free host port to publish it on.
//! let server = TcpListener::bind("127.0.0.1:0")?;
//! let host_port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
//! let spec: PortSpec =
//!     format!("127.0.0.1:{host_port}:{}/tcp", server.local_addr()?.port()).parse()?;
//! assert_eq!(spec.proto, Proto::Tcp);
//! let status = driver.add_port(&spec)?;
//!
//! let mut client = TcpStream::connect(("127.0.0.1", host_port))?;
//! client.write_all(b"ping")?;
//! let (mut inside, _) = server.accept()?;
//! let mut buf = [0; 4];
//! inside.read_exact(&mut buf)?;
//! assert_eq!(&buf, b"ping");
//!
//! driver.remove_port(status.id)?;
//! driver.shutdown(); // closes the channel: `serve` returns Ok(())
//! helper.join().unwrap()?;
//! # Ok(())
//! # }
//! ```
//!
//! # Limitations
//!
//! - Splicing into a socket whose peer has gone raises `SIGPIPE`; Rust programs ignore that
//!   signal by default, and a host program that does not must ignore it before adding ports.
//! - The server inside sees the helper's address (e.g. 127.0.0.1) as the client's, as with
//!   RootlessKit 1.x; the source-IP-preserving mode of RootlessKit 3 is not implemented.
//! - UDP is forwarded by the control thread alone, one datagram per system call.
//! - A connect to an unreachable child IP lasts as long as the kernel's SYN retries (about two
//!   minutes); the client's connection stays open, idle, until then.

mod control;
mod driver;
pub mod helper;
mod sys;
mod watchdog;
pub mod wire;
mod worker;

use std::io;
use std::os::fd::OwnedFd;

use rkport_core::Proto;
use socket2::{Domain, Socket, Type};

pub use driver::{BuiltinDriver, DEFAULT_UDP_TIMEOUT};
pub use rkport_core::PortDriver;

/// The driver's name, as `--port-driver` and `info` spell it.
pub const NAME: &str = "builtin";

/// The protos this driver forwards, as `info` reports them.
pub fn protos() -> Vec<Proto> {
    vec![
        Proto::Tcp,
        Proto::Tcp4,
        Proto::Tcp6,
        Proto::Udp,
        Proto::Udp4,
        Proto::Udp6,
    ]
}

/// Creates the helper channel: a connected `SOCK_SEQPACKET` unix socketpair, both ends
/// close-on-exec, returned as (parent end, helper end).
///
/// Pass the parent end to [`BuiltinDriver::new`] and the helper end to [`helper::serve`]
/// inside the namespace (clear close-on-exec first if it crosses an `exec`).
///
/// # Errors
/// socketpair(2) failed.
pub fn channel() -> io::Result<(OwnedFd, OwnedFd)> {
    let (parent, helper) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None)?;
    Ok((parent.into(), helper.into()))
}
