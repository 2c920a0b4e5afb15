//! The system calls the driver needs that the safe wrappers leave awkward: descriptor passing,
//! splice through pipes, socket identification and the descriptor limit.
//!
//! Every `unsafe` block of the crate lives here.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::socket::{getsockopt, sendmsg, sockopt, ControlMessage, MsgFlags};
use socket2::{Domain, SockRef, Type};

/// The most descriptors accepted with one message; more are closed and the message refused.
const MAX_FDS: usize = 4;

/// Sends `data` on `sock`, with `fd` attached as `SCM_RIGHTS` when given.
///
/// `MSG_NOSIGNAL` turns a vanished peer into `EPIPE` instead of `SIGPIPE`.
pub fn send_with_fd(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let fds: Vec<RawFd> = fd.iter().map(|fd| fd.as_raw_fd()).collect();
    let cmsgs: &[ControlMessage] = if fds.is_empty() {
        &[]
    } else {
        &[ControlMessage::ScmRights(&fds)]
    };
    let iov = [IoSlice::new(data)];
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// One message received by [`recv_with_fds`].
#[derive(Debug)]
pub struct Received {
    /// Bytes of the message; 0 with no descriptors means end of file.
    pub len: usize,
    /// Descriptors that came with it, already owned (and close-on-exec).
    pub fds: Vec<OwnedFd>,
    /// The message or its control data did not fit and was cut.
    pub truncated: bool,
}

/// Receives one message into `buf`, taking ownership of any descriptors attached to it.
///
/// Written against libc rather than nix because nix refuses to walk the control data of a
/// message flagged `MSG_CTRUNC`, which is exactly when it matters: at the descriptor limit the
/// kernel installs none or only some of the descriptors, and any it did install must still be
/// found and closed.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    // Room for MAX_FDS descriptors plus headers; u64 gives cmsghdr its alignment.
    let mut control = [0u64; 2 + MAX_FDS];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all zeroes is a valid empty header.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr().cast();
    hdr.msg_controllen = std::mem::size_of_val(&control) as _;

    let len = loop {
        // SAFETY: `hdr` points at `iov` (into `buf`) and `control`, both live and writable for
        // the lengths given.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut hdr, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };

    let truncated = hdr.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0;
    Ok(Received {
        len,
        fds: take_fds(&hdr),
        truncated,
    })
}

/// Takes ownership of the descriptors in the `SCM_RIGHTS` messages of a received header.
fn take_fds(hdr: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: the kernel set `msg_controllen` to the bytes of complete control messages it
    // wrote into our buffer; CMSG_FIRSTHDR/CMSG_NXTHDR stay within that length.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(hdr) };
    while !c.is_null() {
        // SAFETY: `c` is a complete header inside the control buffer (see above).
        let (level, ty, len) = unsafe { ((*c).cmsg_level, (*c).cmsg_type, (*c).cmsg_len as usize) };
        if level == libc::SOL_SOCKET && ty == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN only computes a length.
            let header = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = len.saturating_sub(header) / std::mem::size_of::<RawFd>();
            // SAFETY: the message holds `count` descriptors after its header.
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: `i < count`, within the message; the data may be unaligned.
                let fd = unsafe { data.add(i).read_unaligned() };
                // SAFETY: the kernel has just installed this descriptor in this process for
                // this message; nothing else knows of it, so taking ownership is sound.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        c = unsafe { libc::CMSG_NXTHDR(hdr, c) };
    }
    fds
}

/// Whether `fd` is a socket of `domain` and `ty` (`SO_DOMAIN`, `SO_TYPE`) that is not
/// listening (`SO_ACCEPTCONN`).
pub fn is_socket_of(fd: BorrowedFd<'_>, domain: Domain, ty: Type) -> bool {
    let sock = SockRef::from(&fd);
    let kind = matches!((sock.domain(), sock.r#type()), (Ok(d), Ok(t)) if d == domain && t == ty);
    kind && matches!(getsockopt(&fd, sockopt::AcceptConn), Ok(false))
}

/// A pipe for splice, both ends non-blocking and close-on-exec.
#[derive(Debug)]
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

impl Pipe {
    /// Creates a pipe of the default size (64 KiB on Linux).
    pub fn new() -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        Ok(Pipe { read, write })
    }

    /// Asks for `size` bytes of capacity; a refusal (`EPERM` past `/proc/sys/fs/pipe-max-size`
    /// or the per-user pipe budget, `/proc/sys/fs/pipe-user-pages-soft`) keeps the old size.
    pub fn grow(&self, size: usize) {
        let size = i32::try_from(size).unwrap_or(i32::MAX);
        if let Err(e) = nix::fcntl::fcntl(&self.write, FcntlArg::F_SETPIPE_SZ(size)) {
            tracing::trace!(error = %e, size, "F_SETPIPE_SZ refused, keeping the pipe size");
        }
    }
}

/// Moves up to `len` bytes from `from` to `to` without copying to user space; one of them must
/// be a pipe. Returns 0 at end of file of `from`.
///
/// `EINTR` is returned, not retried: on non-blocking descriptors splice(2) does not wait, so
/// only a socket made blocking behind the worker's back gets here, interrupted by the
/// [watchdog](crate::watchdog).
pub fn splice(from: impl AsFd, to: impl AsFd, len: usize) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    nix::fcntl::splice(&from, None, &to, None, len, flags).map_err(io::Error::from)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: every forwarded TCP connection holds
/// two sockets, and up to four pipe ends while bytes are in flight.
pub fn raise_nofile_limit() {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::debug!(error = %e, soft, hard, "cannot raise RLIMIT_NOFILE");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "cannot read RLIMIT_NOFILE"),
    }
}

/// The soft `RLIMIT_NOFILE`: every descriptor table of the process holds numbers below it.
pub fn nofile_limit() -> u64 {
    getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
}

/// Socket buffer size asked for UDP sockets, so that bursts of datagrams are not dropped
/// while the forwarding thread is busy.
const UDP_BUFFER: usize = 4 * 1024 * 1024;

/// Asks for bigger receive and send buffers on a UDP socket; the kernel caps the request at
/// `net.core.rmem_max`/`wmem_max`, and a refusal keeps the defaults.
pub fn grow_socket_buffers(sock: &socket2::Socket) {
    for result in [
        sock.set_recv_buffer_size(UDP_BUFFER),
        sock.set_send_buffer_size(UDP_BUFFER),
    ] {
        if let Err(e) = result {
            tracing::trace!(error = %e, "cannot grow a UDP socket buffer");
        }
    }
}

/// Gives the calling thread a descriptor table of its own (`unshare(CLONE_FILES)`) holding only
/// the standard streams and `keep`: whatever the process had open is closed in the copy.
///
/// `RLIMIT_NOFILE` bounds the descriptor numbers of each table, not of the process, so every
/// worker can hold as many connections as the limit allows. Returns false, changing nothing,
/// when the kernel refuses to unshare.
pub fn private_fd_table(keep: &[RawFd]) -> bool {
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_FILES) {
        tracing::debug!(error = %e, "cannot unshare the descriptor table, sharing it");
        return false;
    }
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|fd| *fd > 2).collect();
    keep.sort_unstable();
    let mut first: RawFd = 3;
    for fd in keep.into_iter().chain([RawFd::MAX]) {
        if fd > first {
            close_range(first, fd - 1);
        }
        first = fd.saturating_add(1);
    }
    true
}

/// Closes descriptors `first..=last` of this thread's table.
fn close_range(first: RawFd, last: RawFd) {
    // SAFETY: close_range(2) takes plain integers; the descriptors closed belong to the copy
    // of the table this thread has just made its own, and nothing in it refers to them.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first as u32, last as u32, 0u32) };
    if rc == 0 {
        return;
    }
    // Kernels before 5.9: close what the table holds, one by one.
    let open: Vec<RawFd> = std::fs::read_dir("/proc/thread-self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|fd| (first..=last).contains(fd))
        .collect();
    for fd in open {
        // SAFETY: as above; a descriptor of the directory listing itself is already closed
        // and yields EBADF, which is harmless.
        unsafe { libc::close(fd) };
    }
}

/// Watches `fd` for readability in the epoll instance `epfd`, level-triggered and with
/// `EPOLLEXCLUSIVE`: of the workers watching one listener, one is woken per connection, not all.
pub fn epoll_add_exclusive(epfd: RawFd, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
    let mut event = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
        u64: token,
    };
    // SAFETY: plain integers and a valid epoll_event; a stale `epfd` only yields EBADF.
    let rc = unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd.as_raw_fd(), &mut event) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Stops watching `fd` in `epfd`. Needed before closing a descriptor whose socket stays open
/// elsewhere: epoll watches the socket, not the descriptor.
pub fn epoll_del(epfd: RawFd, fd: BorrowedFd<'_>) {
    // SAFETY: plain integers; DEL ignores the event argument.
    let rc = unsafe {
        libc::epoll_ctl(
            epfd,
            libc::EPOLL_CTL_DEL,
            fd.as_raw_fd(),
            std::ptr::null_mut(),
        )
    };
    if rc != 0 {
        tracing::trace!(error = %io::Error::last_os_error(), "epoll_ctl DEL failed");
    }
}

/// Starts thread `name` with a descriptor table of its own (see [`private_fd_table`]) that
/// holds `fds`, and runs `f` there with ownership of them. The calling thread's copies are
/// closed. Where the kernel refuses a private table, the thread shares the process's and `fds`
/// simply move to it.
///
/// # Errors
/// The thread could not be spawned; `fds` are closed.
pub fn spawn_with_own_fds<F>(
    name: String,
    fds: Vec<OwnedFd>,
    f: F,
) -> io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce(Vec<OwnedFd>) + Send + 'static,
{
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new().name(name).spawn(move || {
        let private = private_fd_table(&raw);
        if tx.send(private).is_err() {
            return;
        }
        let owned = raw
            .iter()
            // SAFETY: with a private table, these numbers are this table's copies, which
            // nothing else in it refers to (the spawning thread closes its own copies); with a
            // shared table, the spawning thread gives up its `OwnedFd`s without closing them.
            // Either way this thread is their only owner from here on.
            .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) })
            .collect();
        f(owned);
    })?;
    match rx.recv() {
        Ok(true) | Err(_) => drop(fds),
        Ok(false) => {
            for fd in fds {
                let _ = std::os::fd::IntoRawFd::into_raw_fd(fd);
            }
        }
    }
    Ok(thread)
}

/// The most messages [`recv_batch`] takes in one call.
pub const BATCH: usize = 16;

/// Receives up to [`BATCH`] waiting messages in one recvmmsg(2) call, without blocking, each
/// into its slot of `bufs`; an empty result means none was waiting (`EAGAIN` is not an error
/// here). Descriptors are taken as [`recv_with_fds`] takes them.
pub fn recv_batch(sock: BorrowedFd<'_>, bufs: &mut [[u8; 64]; BATCH]) -> io::Result<Vec<Received>> {
    let mut controls = [[0u64; 2 + MAX_FDS]; BATCH];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .zip(controls.iter_mut())
        .map(|(iov, control)| {
            // SAFETY: mmsghdr is plain old data; all zeroes is a valid empty header.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_control = control.as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = std::mem::size_of_val(control) as _;
            m
        })
        .collect();
    let n = loop {
        // SAFETY: every header points at its own iovec (into `bufs`) and control buffer, all
        // live and writable for the lengths given, for the duration of the call.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
                std::ptr::null_mut(),
            )
        };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(Vec::new()),
            _ => return Err(e),
        }
    };
    Ok(msgs[..n]
        .iter()
        .map(|m| Received {
            len: m.msg_len as usize,
            fds: take_fds(&m.msg_hdr),
            truncated: m.msg_hdr.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0,
        })
        .collect())
}

/// Datagrams taken by one [`Datagrams::recv`] call.
pub const DATAGRAM_BATCH: usize = 32;
/// Room for the largest UDP payload (65,507 bytes over IPv4, 65,527 over IPv6).
const DATAGRAM_SLOT: usize = 65536;
/// The most segments one `UDP_SEGMENT` send may carry (the kernel's `UDP_MAX_SEGMENTS` is 64
/// or more, depending on its version).
const SEGMENTS_MAX: usize = 64;

/// Receive buffers for a batch of datagrams, with their sources.
///
/// The slots are anonymous memory of their own (2 MiB of address space): pages are only
/// resident once a datagram has been written to them, and all of them go back to the system
/// when the batch is dropped.
pub struct Datagrams {
    mem: std::ptr::NonNull<u8>,
    names: Box<[libc::sockaddr_storage; DATAGRAM_BATCH]>,
    name_lens: [libc::socklen_t; DATAGRAM_BATCH],
    lens: [usize; DATAGRAM_BATCH],
    count: usize,
}

// SAFETY: `mem` is a private mapping owned by this value alone; nothing else points into it.
unsafe impl Send for Datagrams {}

impl std::fmt::Debug for Datagrams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datagrams")
            .field("count", &self.count)
            .finish()
    }
}

impl Drop for Datagrams {
    fn drop(&mut self) {
        // SAFETY: `mem` was mapped in `new` with this length and is not used after this.
        unsafe { libc::munmap(self.mem.as_ptr().cast(), DATAGRAM_BATCH * DATAGRAM_SLOT) };
    }
}

impl Datagrams {
    pub fn new() -> io::Result<Datagrams> {
        // SAFETY: a fresh private anonymous mapping; the result is checked before use.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                DATAGRAM_BATCH * DATAGRAM_SLOT,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mem == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Datagrams {
            mem: std::ptr::NonNull::new(mem.cast()).ok_or_else(io::Error::last_os_error)?,
            // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
            names: Box::new(unsafe { std::mem::zeroed() }),
            name_lens: [0; DATAGRAM_BATCH],
            lens: [0; DATAGRAM_BATCH],
            count: 0,
        })
    }

    /// Receives up to [`DATAGRAM_BATCH`] waiting datagrams in one recvmmsg(2) call without
    /// blocking; how many (0 when none was waiting).
    pub fn recv(&mut self, sock: BorrowedFd<'_>) -> io::Result<usize> {
        self.count = 0;
        let base = self.mem.as_ptr();
        let mut iovs: [libc::iovec; DATAGRAM_BATCH] = std::array::from_fn(|i| libc::iovec {
            // SAFETY: slot `i` lies within the mapping.
            iov_base: unsafe { base.add(i * DATAGRAM_SLOT) }.cast(),
            iov_len: DATAGRAM_SLOT,
        });
        // SAFETY: mmsghdr is plain old data; all zeroes is a valid empty header.
        let mut msgs: [libc::mmsghdr; DATAGRAM_BATCH] = unsafe { std::mem::zeroed() };
        for (i, m) in msgs.iter_mut().enumerate() {
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as _;
        }
        let n = loop {
            // SAFETY: every header points at its own iovec (a slot of the mapping) and name
            // buffer, all live and writable for the lengths given, for the duration of the call.
            let n = unsafe {
                libc::recvmmsg(
                    sock.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    DATAGRAM_BATCH as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(e),
            }
        };
        for (i, m) in msgs[..n].iter().enumerate() {
            self.lens[i] = m.msg_len as usize;
            self.name_lens[i] = m.msg_hdr.msg_namelen;
        }
        self.count = n;
        Ok(n)
    }

    /// Datagram `i` of the last batch.
    pub fn data(&self, i: usize) -> &[u8] {
        assert!(i < self.count, "datagram {i} of {}", self.count);
        let len = self.lens[i].min(DATAGRAM_SLOT);
        // SAFETY: slot `i` lies within the mapping, and its first `len` bytes were written by
        // the last recvmmsg (anonymous memory is initialised to zeroes anyway).
        unsafe { std::slice::from_raw_parts(self.mem.as_ptr().add(i * DATAGRAM_SLOT), len) }
    }

    /// The source address of datagram `i` of the last batch.
    pub fn source(&self, i: usize) -> Option<std::net::SocketAddr> {
        assert!(i < self.count, "datagram {i} of {}", self.count);
        let storage = &self.names[i];
        let len = self.name_lens[i] as usize;
        match i32::from(storage.ss_family) {
            libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
                // SAFETY: the kernel wrote a sockaddr_in here (family and length checked);
                // the storage is aligned and large enough for any address.
                let a = unsafe {
                    &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>()
                };
                let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                Some((ip, u16::from_be(a.sin_port)).into())
            }
            libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
                // SAFETY: as above, for a sockaddr_in6.
                let a = unsafe {
                    &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
                };
                let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                let v6 = std::net::SocketAddrV6::new(
                    ip,
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                );
                Some(v6.into())
            }
            _ => None,
        }
    }
}

/// Sends `datagrams` on the connected UDP socket `sock`, as few system calls as it takes:
/// runs of equal-sized datagrams (the last of a run may be shorter) go as one `UDP_SEGMENT`
/// send, which the kernel splits into the same datagrams again, while `segment` stays true;
/// the others go by sendmmsg(2). `segment` is cleared when the kernel refuses segmentation.
/// Datagrams that cannot be sent (a full buffer, `ECONNREFUSED` from an earlier one) are
/// dropped, as the network would drop them.
pub fn send_datagrams(sock: BorrowedFd<'_>, datagrams: &[&[u8]], segment: &mut bool) {
    let mut rest = datagrams;
    while !rest.is_empty() {
        let run = if *segment { segment_run(rest) } else { 1 };
        if run > 1 {
            let mut sent = send_segmented(sock, &rest[..run]);
            // ECONNREFUSED reports an earlier datagram's ICMP error, and clears it: these
            // datagrams were never tried.
            if sent
                .as_ref()
                .is_err_and(|e| e.raw_os_error() == Some(libc::ECONNREFUSED))
            {
                sent = send_segmented(sock, &rest[..run]);
            }
            match sent {
                Ok(()) => {
                    rest = &rest[run..];
                    continue;
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINVAL | libc::EIO | libc::ENOPROTOOPT)
                    ) =>
                {
                    tracing::debug!(error = %e, "UDP segmentation refused, sending datagrams one by one");
                    *segment = false;
                }
                // A full buffer or another error: each datagram of the run gets its own
                // chance below, and those that still cannot go are dropped there.
                Err(_) => {
                    send_each(sock, &rest[..run]);
                    rest = &rest[run..];
                    continue;
                }
            }
        }
        // Up to the next run worth segmenting (or all, without segmentation).
        let plain = if *segment {
            (1..rest.len())
                .find(|&i| segment_run(&rest[i..]) > 1)
                .unwrap_or(rest.len())
        } else {
            rest.len()
        };
        send_each(sock, &rest[..plain]);
        rest = &rest[plain..];
    }
}

/// How many datagrams at the start of `d` one segmented send can carry: the same size as the
/// first (the last may be shorter), within the kernel's limits on segments and total size.
fn segment_run(d: &[&[u8]]) -> usize {
    let size = d[0].len();
    if size == 0 || size >= DATAGRAM_SLOT / 2 {
        return 1;
    }
    let by_total = 65_000 / size;
    let mut n = 0;
    for p in d.iter().take(SEGMENTS_MAX.min(by_total)) {
        // An empty datagram cannot be a segment: it would vanish from the run.
        if p.len() > size || p.is_empty() {
            break;
        }
        n += 1;
        if p.len() < size {
            break;
        }
    }
    n.max(1)
}

/// Whether the kernel segments UDP sends on `sock` (`UDP_SEGMENT`, Linux 4.18 and later;
/// older kernels would ignore the option and send a run as one large datagram).
pub fn udp_segment_supported(sock: BorrowedFd<'_>) -> bool {
    getsockopt(&sock, sockopt::UdpGsoSegment).is_ok()
}

/// One sendmsg(2) with `UDP_SEGMENT` set to the size of the first datagram.
fn send_segmented(sock: BorrowedFd<'_>, datagrams: &[&[u8]]) -> io::Result<()> {
    let iov: Vec<IoSlice<'_>> = datagrams.iter().map(|d| IoSlice::new(d)).collect();
    let size = datagrams[0].len() as u16;
    let cmsg = [ControlMessage::UdpGsoSegments(&size)];
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_DONTWAIT, None) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends each datagram on its own, batched in sendmmsg(2) calls; what cannot go is dropped.
fn send_each(sock: BorrowedFd<'_>, datagrams: &[&[u8]]) {
    let mut iovs: Vec<libc::iovec> = datagrams
        .iter()
        .map(|d| libc::iovec {
            iov_base: d.as_ptr() as *mut libc::c_void,
            iov_len: d.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            // SAFETY: mmsghdr is plain old data; all zeroes is a valid empty header.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let mut sent = 0;
    // ECONNREFUSED reports an earlier datagram's ICMP error (and clears it): the one it was
    // returned for is tried once more.
    let mut retried = false;
    while sent < msgs.len() {
        // SAFETY: every header points at its own iovec, which points into a datagram borrowed
        // for the duration of the call; the kernel only reads them.
        let n = unsafe {
            libc::sendmmsg(
                sock.as_raw_fd(),
                msgs[sent..].as_mut_ptr(),
                (msgs.len() - sent) as u32,
                libc::MSG_DONTWAIT,
            )
        };
        if n > 0 {
            sent += n as usize;
            retried = false;
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            // A full buffer: the rest would find it full too, and is dropped.
            io::ErrorKind::WouldBlock => return,
            _ if e.raw_os_error() == Some(libc::ECONNREFUSED) && !retried => retried = true,
            // The first unsent datagram failed: drop it.
            _ => {
                sent += 1;
                retried = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_segmentation_is_seen_on_a_kernel_that_has_it() {
        // UDP_SEGMENT came with Linux 4.18; every kernel this is built and tested on has it.
        let sock = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0)).expect("bind");
        assert!(udp_segment_supported(sock.as_fd()));
        let tcp = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).expect("bind");
        assert!(
            !udp_segment_supported(tcp.as_fd()),
            "a TCP socket has no UDP_SEGMENT"
        );
    }
}
