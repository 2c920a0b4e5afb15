//! Options the helper sets on the sockets it opens, so that the parent need not.

use std::io::IoSliceMut;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use rkport_builtin::wire::{Kind, Reply, Request, REPLY_LEN};
use rkport_builtin::{channel, helper};
use socket2::Socket;

/// Asks a helper on a thread for a socket to `listener` and returns it.
fn dial(channel_end: &OwnedFd, listener: &TcpListener) -> Socket {
    let req = Request {
        id: 7,
        kind: Kind::Tcp,
        target: listener.local_addr().unwrap(),
    };
    let sender = UnixDatagram::from(channel_end.try_clone().unwrap());
    sender.send(&req.encode()).unwrap();

    let mut buf = [0u8; REPLY_LEN];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        channel_end.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .unwrap();
    let fd = msg
        .cmsgs()
        .unwrap()
        .find_map(|c| match c {
            ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
            _ => None,
        })
        .expect("reply carries a socket");
    let reply = Reply::decode(&buf).unwrap();
    assert_eq!((reply.id, reply.errno), (7, 0));
    // SAFETY: the descriptor was just received with this message and is owned by nobody else.
    Socket::from(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[test]
fn helper_tcp_sockets_are_nonblocking_with_nodelay() {
    let (parent_end, helper_end) = channel().unwrap();
    let helper = std::thread::spawn(move || helper::serve(helper_end));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();

    let sock = dial(&parent_end, &listener);
    assert!(sock.tcp_nodelay().unwrap(), "TCP_NODELAY set by the helper");
    assert!(sock.nonblocking().unwrap(), "created non-blocking");

    drop(parent_end);
    helper.join().unwrap().unwrap();
}
