//! The server: an accept thread (`http-server`) and one thread per connection (`http-conn`),
//! at most [`ServerOptions::max_connections`] at a time. A connection that stalls only ties up
//! its own thread, and its read timeout ends it; one that trickles a request in byte by byte
//! is ended by the whole-request deadline ([`ServerOptions::request_timeout`]). The socket
//! file is created with mode 0600 ([`bind`]). Requests on one connection are answered in
//! order (keep-alive and pipelining), each by a blocking [`Backend::call`] to the control loop.
//!
//! Reads go through `recvmsg(2)` with room for `SCM_RIGHTS` ancillary data: descriptors that
//! arrive while a request is read go with it to [`routes::handle_with_fds`] (Cloud
//! Hypervisor's `vm.add-net` takes TAPs that way; every other endpoint refuses them). They are
//! received close-on-exec and closed when the request is done with them, so none leak.

use std::fs;
use std::io::{self, Write};
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vmm::control::ApiSender;

use crate::http::{self, Parsed, Response};
use crate::routes::{self, Backend};

/// Tunables of the server.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// How long a client may stay silent inside a request before the connection is closed
    /// (with a 408). It does not bound how long the control loop takes to answer: no read is
    /// pending while a request is handled, so a `vm.send-migration` or `vm.receive-migration`
    /// that runs for minutes, or a `vm.enable-ft` doing its initial synchronisation, is
    /// answered normally.
    pub read_timeout: Duration,
    /// How long a keep-alive connection may wait idle between requests (None: for ever).
    /// Cloud Hypervisor never closes an idle connection, and clients rely on that: Kata's Go
    /// client keeps one connection for the life of the sandbox, and a non-idempotent PUT it
    /// sends as the server closes that connection fails instead of being retried.
    pub idle_timeout: Option<Duration>,
    /// How long writing a response may block on a client that does not read. The write starts
    /// only once the control loop has answered.
    pub write_timeout: Duration,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// How long one request (head and body) may take to arrive, from its first byte. A
    /// client trickling bytes slowly (slow-loris) is never silent for `read_timeout`, so
    /// this bound is what keeps it from holding a connection slot for ever.
    pub request_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            read_timeout: Duration::from_secs(10),
            idle_timeout: None,
            write_timeout: Duration::from_secs(10),
            max_connections: 64,
            request_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot bind the API socket {path}: {source}")]
    Bind { path: String, source: io::Error },
    #[error("cannot remove the stale API socket {path}: {source}")]
    RemoveStale { path: String, source: io::Error },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: String },
    #[error("--api-socket fd={fd}: {reason}")]
    BadFd { fd: RawFd, reason: String },
}

/// Binds a listening socket at `path`. A socket file left by an earlier run is removed first,
/// as Cloud Hypervisor does; any other kind of file is left alone and refused.
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    let shown = || path.display().to_string();
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            fs::remove_file(path).map_err(|source| BindError::RemoveStale {
                path: shown(),
                source,
            })?;
        }
        Ok(_) => return Err(BindError::NotASocket { path: shown() }),
        Err(_) => {}
    }
    // Mode 0600 from the start: anyone who can connect can drive the VMM.
    vmm::unix_socket::bind_owner_only(path).map_err(|source| BindError::Bind {
        path: shown(),
        source,
    })
}

/// Takes over a listening Unix socket inherited from the parent (`--api-socket fd=N`).
/// Ownership of `fd` passes to the returned listener; call this once per descriptor.
pub fn listener_from_fd(fd: RawFd) -> Result<UnixListener, BindError> {
    let bad = |reason: String| BindError::BadFd { fd, reason };
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { mem::zeroed() };
    // SAFETY: fstat only writes into `st`, which we own; an invalid fd just fails.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(bad(io::Error::last_os_error().to_string()));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(bad("not a socket".into()));
    }
    let mut listening: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `listening`, which we own.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut listening as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(bad(io::Error::last_os_error().to_string()));
    }
    if listening == 0 {
        return Err(bad("the socket is not listening".into()));
    }
    // The descriptor must not leak into processes the VMM starts.
    // SAFETY: F_SETFD on a descriptor checked above; no memory involved.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: `fd` is an open listening socket (checked above) handed to this process on the
    // command line for the API alone, so nothing else owns or closes it.
    Ok(unsafe { UnixListener::from_raw_fd(fd) })
}

/// A running server.
pub struct ApiServer {
    thread: JoinHandle<()>,
    busy: Arc<AtomicUsize>,
}

impl ApiServer {
    /// Waits until no request is being handled (its response has been written), at most
    /// `timeout`. The control loop calls this after answering `vmm.shutdown` and before the
    /// process exits, so that the client still receives its 204. Returns whether it went idle.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.busy.load(Ordering::Acquire) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// A handle that can wait for idleness from another thread.
    pub fn idle_waiter(&self) -> IdleWaiter {
        IdleWaiter {
            busy: self.busy.clone(),
        }
    }

    pub fn into_join_handle(self) -> JoinHandle<()> {
        self.thread
    }
}

/// See [`ApiServer::wait_idle`].
#[derive(Clone)]
pub struct IdleWaiter {
    busy: Arc<AtomicUsize>,
}

impl IdleWaiter {
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.busy.load(Ordering::Acquire) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

/// Starts the server on `listener` with default options; requests go to the control loop
/// through `sender`.
pub fn start_server(listener: UnixListener, sender: ApiSender) -> io::Result<JoinHandle<()>> {
    spawn_server(listener, Arc::new(sender), ServerOptions::default()).map(|s| s.thread)
}

/// Starts the server with any [`Backend`] and options.
pub fn spawn_server(
    listener: UnixListener,
    backend: Arc<dyn Backend>,
    options: ServerOptions,
) -> io::Result<ApiServer> {
    let busy = Arc::new(AtomicUsize::new(0));
    let busy_for_thread = busy.clone();
    let thread = thread::Builder::new()
        .name("http-server".into())
        .spawn(move || accept_loop(listener, backend, options, busy_for_thread))?;
    Ok(ApiServer { thread, busy })
}

fn accept_loop(
    listener: UnixListener,
    backend: Arc<dyn Backend>,
    options: ServerOptions,
    busy: Arc<AtomicUsize>,
) {
    // Connection threads inherit this filter.
    if !vmm::seccomp::apply_or_log(vmm::seccomp::ThreadRole::Api) {
        return;
    }
    let connections = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR | libc::ECONNABORTED | libc::EAGAIN | libc::EPROTO) => continue,
                // Out of descriptors or memory: wait for connections to end rather than spin.
                Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                    log::warn!("API server: accept: {e}");
                    thread::sleep(Duration::from_millis(100));
                    continue;
                }
                _ => {
                    log::error!("API server stops: accept: {e}");
                    return;
                }
            },
        };
        let _ = stream.set_read_timeout(Some(options.read_timeout));
        let _ = stream.set_write_timeout(Some(options.write_timeout));
        if connections.fetch_add(1, Ordering::AcqRel) >= options.max_connections {
            connections.fetch_sub(1, Ordering::AcqRel);
            let response = Response::error_one(
                503,
                format!(
                    "too many API connections (at most {})",
                    options.max_connections
                ),
            );
            let _ = (&stream).write_all(&response.serialize(true));
            continue;
        }
        let backend = backend.clone();
        let busy = busy.clone();
        let guard = ConnectionSlot(connections.clone());
        let spawned = thread::Builder::new()
            .name("http-conn".into())
            .spawn(move || {
                let _slot = guard;
                let mut transport = SocketTransport::new(stream)
                    .with_request_timeout(options.request_timeout)
                    .with_idle_timeout(options.idle_timeout);
                serve_connection(&mut transport, backend.as_ref(), &busy);
            });
        if let Err(e) = spawned {
            // The closure (and with it the slot and the stream) was dropped.
            log::warn!("API server: cannot start a connection thread: {e}");
        }
    }
}

/// Frees a connection slot when the connection's thread ends (even by panic).
struct ConnectionSlot(Arc<AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where a connection's bytes come from and go to: a socket, or memory in tests.
pub trait Transport {
    /// Reads some bytes; `Ok(0)` at end of stream. A timeout is an error of kind `WouldBlock`
    /// or `TimedOut`.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    fn send(&mut self, data: &[u8]) -> io::Result<()>;
    /// The first byte of a request has arrived: its whole-request deadline starts, if the
    /// transport has one. Called again while the request is incomplete; only the first call
    /// of a request counts.
    fn request_begun(&mut self) {}
    /// The request was read in full: no deadline until the next one begins.
    fn request_read(&mut self) {}
    /// The descriptors received since the last call (those sent with the request just read).
    fn take_fds(&mut self) -> Vec<OwnedFd> {
        Vec::new()
    }
}

/// Room for this many descriptors in one message's ancillary data.
const MAX_FDS: usize = 16;

/// A connected client socket read with `recvmsg`.
pub struct SocketTransport {
    stream: UnixStream,
    /// The per-read timeout inside a request (the one set on the stream when it was handed
    /// over).
    read_timeout: Option<Duration>,
    /// The read timeout between requests (None: wait for ever).
    idle_timeout: Option<Duration>,
    /// How long a request may take to arrive from its first byte (None: no bound).
    request_timeout: Option<Duration>,
    /// When the request being read must be complete.
    deadline: Option<Instant>,
    /// The read timeout currently set on the socket, to skip redundant `setsockopt` calls.
    applied: Option<Duration>,
    /// Descriptors received with the request being read (at most [`MAX_FDS`]).
    fds: Vec<OwnedFd>,
}

impl SocketTransport {
    pub fn new(stream: UnixStream) -> Self {
        let read_timeout = stream.read_timeout().ok().flatten();
        Self {
            stream,
            read_timeout,
            idle_timeout: read_timeout,
            request_timeout: None,
            deadline: None,
            applied: read_timeout,
            fds: Vec::new(),
        }
    }

    /// Bounds the time a whole request (head and body) may take to arrive.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = Some(timeout);
        self
    }

    /// Bounds how long the connection may wait idle between requests (None: no bound).
    pub fn with_idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Shortens the socket's read timeout so that no read waits past the request deadline.
    fn arm_timeout(&mut self) -> io::Result<()> {
        let wanted = match self.deadline {
            None => self.idle_timeout,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                Some(self.read_timeout.map_or(left, |t| t.min(left)))
            }
        };
        if wanted != self.applied {
            self.stream.set_read_timeout(wanted)?;
            self.applied = wanted;
        }
        Ok(())
    }

    /// Reads bytes and any descriptors passed with them (`SCM_RIGHTS`).
    pub fn recv_with_fds(&mut self, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
        // u64 storage keeps the control buffer aligned for `cmsghdr`.
        let mut control = [0u64; 64];
        // SAFETY: CMSG_SPACE is a pure computation on its argument.
        let space = unsafe { libc::CMSG_SPACE((MAX_FDS * mem::size_of::<RawFd>()) as u32) };
        let control_len = (space as usize).min(mem::size_of_val(&control));
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: an all-zero msghdr is a valid empty message header.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control_len as _;
        let n = loop {
            // SAFETY: `msg` points at `iov` (covering `buf`) and `control`, all alive and
            // exclusively borrowed for the call; the kernel writes within the given lengths.
            // MSG_CMSG_CLOEXEC keeps received descriptors from leaking into children.
            let n =
                unsafe { libc::recvmsg(self.stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let mut fds = Vec::new();
        // SAFETY: the CMSG_* macros walk the control buffer the kernel just filled, within
        // `msg.msg_controllen`; each SCM_RIGHTS payload holds descriptors now owned by us.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                    let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..payload / mem::size_of::<RawFd>() {
                        let fd = std::ptr::read_unaligned(data.add(i));
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        Ok((n, fds))
    }
}

impl Transport for SocketTransport {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm_timeout()?;
        let (n, fds) = self.recv_with_fds(buf)?;
        for fd in fds {
            // A client cannot pile up descriptors in the VMM: beyond what one request can
            // carry they are closed (dropped) at once; the request still sees too many.
            if self.fds.len() < MAX_FDS {
                self.fds.push(fd);
            } else {
                log::debug!("API server: closing a file descriptor beyond {MAX_FDS}");
            }
        }
        Ok(n)
    }

    fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.stream.write_all(data)
    }

    fn request_begun(&mut self) {
        if self.deadline.is_none() {
            // A timeout too large to add is no bound at all.
            self.deadline = self
                .request_timeout
                .and_then(|t| Instant::now().checked_add(t));
        }
    }

    fn request_read(&mut self) {
        self.deadline = None;
    }

    fn take_fds(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.fds)
    }
}

/// Serves requests on one connection until the client closes it, asks to, stalls past the
/// read timeout or the transport's request deadline, or sends something that breaks the
/// framing.
pub fn serve_connection(transport: &mut dyn Transport, backend: &dyn Backend, busy: &AtomicUsize) {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        // 1. A complete head.
        let (head, head_len) = loop {
            if !buf.is_empty() {
                transport.request_begun();
            }
            match http::parse_head(&buf) {
                Ok(Parsed::Complete { head, head_len }) => break (head, head_len),
                Ok(Parsed::Incomplete) => {}
                Err(e) => {
                    let _ =
                        transport.send(&Response::error_one(e.status, &e.message).serialize(true));
                    return;
                }
            }
            match read_more(transport, &mut chunk, &mut buf) {
                Ok(()) => {}
                Err(Stop::Eof) => return,
                Err(Stop::Timeout) => {
                    // Mid-request: tell the client; idle between requests: just close.
                    if !buf.is_empty() {
                        let _ = transport.send(&timeout_response());
                    }
                    return;
                }
            }
        };
        // 2. Its body.
        let total = head_len + head.content_length;
        if buf.len() < total && head.expect_continue && transport.send(http::CONTINUE).is_err() {
            return;
        }
        while buf.len() < total {
            match read_more(transport, &mut chunk, &mut buf) {
                Ok(()) => {}
                Err(Stop::Eof) => return,
                Err(Stop::Timeout) => {
                    let _ = transport.send(&timeout_response());
                    return;
                }
            }
        }
        transport.request_read();
        // 3. The answer. `busy` covers the call and the write, so the VMM can wait for the
        // answer to `vmm.shutdown` to leave before it exits.
        busy.fetch_add(1, Ordering::AcqRel);
        let fds = transport.take_fds();
        let response = routes::handle_with_fds(
            &head.method,
            &head.path,
            &buf[head_len..total],
            fds,
            backend,
        );
        let sent = transport.send(&response.serialize(head.close));
        busy.fetch_sub(1, Ordering::AcqRel);
        buf.drain(..total);
        if head.close || sent.is_err() {
            return;
        }
    }
}

enum Stop {
    Eof,
    Timeout,
}

fn read_more(
    transport: &mut dyn Transport,
    chunk: &mut [u8],
    buf: &mut Vec<u8>,
) -> Result<(), Stop> {
    match transport.recv(chunk) {
        Ok(0) => Err(Stop::Eof),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err(Stop::Timeout)
        }
        Err(_) => Err(Stop::Eof),
    }
}

fn timeout_response() -> Vec<u8> {
    Response::error_one(408, "timed out waiting for the rest of the request").serialize(true)
}
