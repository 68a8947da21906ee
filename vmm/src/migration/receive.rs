//! The destination side of live migration, off the control loop: a `migration-rx` thread
//! accepts the source, reads its Hello within a handshake timeout and then memory and state
//! with a per-read timeout. The control loop owns the VM, so the thread asks it (a channel plus
//! an eventfd that wakes the loop's epoll) to build the VM when the configuration arrives and
//! to restore it when the state is complete; the loop itself never waits on the network, so a
//! silent or slow source cannot stall the API.

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::memory::GuestMemoryMmap;
use crate::migration::live::{parse_url, security_for, MigrationStream, MigrationUrl};
use crate::migration::protocol::{ProtocolError, Receiver, TransferStats};
use crate::vm::VmSnapshotState;
use transport::Security;

/// How long a connected source has to deliver its whole Hello.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the source may stay silent once the transfer runs. Pre-copy streams without
/// pause and the final pause lasts far less; a quiet source this long is gone or stuck.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceiveTimeouts {
    /// From accepting the source to its complete Hello.
    pub handshake: Duration,
    /// For each read (and write) after that.
    pub read: Duration,
}

impl Default for ReceiveTimeouts {
    fn default() -> Self {
        Self {
            handshake: HANDSHAKE_TIMEOUT,
            read: READ_TIMEOUT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("{0}")]
    Url(String),
    #[error("cannot listen on {url}: {source}")]
    Listen { url: String, source: io::Error },
    #[error("cannot start the migration receiver thread: {0}")]
    Spawn(io::Error),
}

/// What the receiver thread asks of the control loop, in this order.
pub enum IncomingEvent {
    /// The source's Hello arrived (configuration already validated): build the VM and answer
    /// with its memory, which the thread fills with the pages it receives.
    Prepare {
        config: Box<VmConfig>,
        reply: mpsc::Sender<Result<GuestMemoryMmap, String>>,
    },
    /// Memory and state are complete: restore the VM and run it; on Ok the thread
    /// acknowledges to the source, which then stops for good.
    Restore {
        state: Box<VmSnapshotState>,
        reply: mpsc::Sender<Result<(), String>>,
    },
    /// The receive is over: Ok once the source has the acknowledgement, else why it failed.
    Finished(Result<TransferStats, String>),
}

/// A receive in progress. Dropping it cancels a receive still waiting for its source.
pub struct IncomingMigration {
    url: String,
    events: mpsc::Receiver<IncomingEvent>,
    stop: Arc<EventFd>,
}

impl IncomingMigration {
    /// Listens on `url` (so a bad address fails here) and starts the `migration-rx` thread,
    /// which writes `wake` whenever an [`IncomingEvent`] is queued.
    pub fn start(
        url: &str,
        tls_dir: Option<&Path>,
        insecure_plaintext: bool,
        timeouts: ReceiveTimeouts,
        wake: Arc<EventFd>,
    ) -> Result<Self, ReceiveError> {
        let parsed = parse_url(url).map_err(ReceiveError::Url)?;
        let security =
            security_for(&parsed, tls_dir, insecure_plaintext).map_err(ReceiveError::Url)?;
        let listen_err = |source| ReceiveError::Listen {
            url: url.to_string(),
            source,
        };
        let listener = Listener::bind(&parsed).map_err(listen_err)?;
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(ReceiveError::Spawn)?);
        let (sender, events) = mpsc::channel();
        let thread = ReceiverThread {
            events: sender,
            wake,
            stop: stop.clone(),
            timeouts,
            security,
        };
        std::thread::Builder::new()
            .name("migration-rx".into())
            .spawn(move || {
                if crate::seccomp::apply_or_log(crate::seccomp::ThreadRole::Replication) {
                    thread.run(listener)
                }
            })
            .map_err(ReceiveError::Spawn)?;
        Ok(Self {
            url: url.to_string(),
            events,
            stop,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The next queued event, if any. A thread that ended without [`IncomingEvent::Finished`]
    /// (it cannot, short of a panic) reads as a failure.
    pub fn try_next(&self) -> Option<IncomingEvent> {
        match self.events.try_recv() {
            Ok(event) => Some(event),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => Some(IncomingEvent::Finished(Err(
                "the migration receiver thread ended unexpectedly".into(),
            ))),
        }
    }
}

impl Drop for IncomingMigration {
    fn drop(&mut self) {
        // Wakes a thread still waiting in accept; one already receiving ends at its next
        // reply from the loop (the channel is gone) or its next timeout.
        let _ = self.stop.write(1);
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    fn bind(url: &MigrationUrl) -> io::Result<Self> {
        let listener = match url {
            MigrationUrl::Tcp(addr) => Listener::Tcp(TcpListener::bind(addr)?),
            MigrationUrl::Unix(path) => {
                let _ = std::fs::remove_file(path);
                Listener::Unix(UnixListener::bind(path)?, path.clone())
            }
        };
        // Non-blocking so that a readiness report the connection no longer backs (the peer
        // went away) cannot block accept; readiness comes from epoll.
        match &listener {
            Listener::Tcp(l) => l.set_nonblocking(true)?,
            Listener::Unix(l, _) => l.set_nonblocking(true)?,
        }
        Ok(listener)
    }

    fn as_raw_fd(&self) -> i32 {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }

    /// A connection, not yet secured (TCP) or ready (Unix).
    fn accept(&self) -> io::Result<Accepted> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept()?;
                log::info!("migration source connected from {peer}");
                stream.set_nonblocking(false)?;
                stream.set_nodelay(true)?;
                Accepted::Tcp(stream, peer)
            }
            Listener::Unix(l, path) => {
                let (stream, _) = l.accept()?;
                log::info!("migration source connected on {}", path.display());
                stream.set_nonblocking(false)?;
                Accepted::Unix(stream)
            }
        })
    }
}

enum Accepted {
    Tcp(TcpStream, SocketAddr),
    Unix(UnixStream),
}

impl Drop for Listener {
    fn drop(&mut self) {
        // One source per receive: nobody else may connect once it is taken (or given up).
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The migration stream with the receive's timeouts: until [`TimedStream::end_handshake`] every
/// read ends at the handshake deadline, after that each read (and write) at the read timeout.
/// Timeouts surface as `TimedOut` errors that say which limit was hit.
struct TimedStream {
    stream: MigrationStream,
    handshake_deadline: Cell<Option<Instant>>,
    timeouts: ReceiveTimeouts,
    /// The read timeout now set on the socket (set again only when it changes).
    socket_timeout: Option<Duration>,
}

impl TimedStream {
    fn new(stream: MigrationStream, timeouts: ReceiveTimeouts) -> io::Result<Self> {
        stream.set_write_timeout(Some(timeouts.read))?;
        Ok(Self {
            stream,
            handshake_deadline: Cell::new(Some(Instant::now() + timeouts.handshake)),
            timeouts,
            socket_timeout: None,
        })
    }

    fn end_handshake(&self) {
        self.handshake_deadline.set(None);
    }

    fn handshake_expired(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no complete Hello from the source within {:?} of its connection (handshake timeout)",
                self.timeouts.handshake
            ),
        )
    }

    fn set_read_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        if self.socket_timeout != Some(timeout) {
            self.stream.set_read_timeout(Some(timeout))?;
            self.socket_timeout = Some(timeout);
        }
        Ok(())
    }
}

impl Read for TimedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let deadline = self.handshake_deadline.get();
        let mut timeout = self.timeouts.read;
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.handshake_expired());
            }
            timeout = timeout.min(left);
        }
        self.set_read_timeout(timeout)?;
        match self.stream.read(buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    Err(self.handshake_expired())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the source sent nothing for {:?} (read timeout)",
                            self.timeouts.read
                        ),
                    ))
                }
            }
            other => other,
        }
    }
}

impl Write for TimedStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

struct ReceiverThread {
    events: mpsc::Sender<IncomingEvent>,
    wake: Arc<EventFd>,
    stop: Arc<EventFd>,
    timeouts: ReceiveTimeouts,
    /// For TCP: TLS or the operator's plaintext opt-out.
    security: Option<Security>,
}

impl ReceiverThread {
    fn run(self, listener: Listener) {
        let result = self.receive(listener);
        if let Err(e) = &result {
            log::error!("receiving a migration failed: {e}");
        }
        self.send(IncomingEvent::Finished(result));
    }

    /// Queues `event` for the control loop and wakes it; false when the loop is gone.
    fn send(&self, event: IncomingEvent) -> bool {
        if self.events.send(event).is_err() {
            return false;
        }
        if let Err(e) = self.wake.write(1) {
            log::error!("cannot wake the control loop: {e}");
            return false;
        }
        true
    }

    /// Asks the control loop and waits for its answer.
    fn ask<T>(
        &self,
        event: impl FnOnce(mpsc::Sender<Result<T, String>>) -> IncomingEvent,
    ) -> Result<T, String> {
        let (reply, answer) = mpsc::channel();
        if !self.send(event(reply)) {
            return Err("the receive was cancelled".into());
        }
        answer
            .recv()
            .map_err(|_| "the receive was cancelled".to_string())?
    }

    fn receive(&self, listener: Listener) -> Result<TransferStats, String> {
        let stream = self.accept(&listener)?;
        drop(listener);
        let authenticated = stream.authenticates_bytes();
        let stream = TimedStream::new(stream, self.timeouts).map_err(|e| e.to_string())?;
        let mut receiver = Receiver::new(stream);
        receiver.set_authenticated(authenticated);
        let config = receiver.recv_hello().map_err(|e| e.to_string())?;
        receiver.get_ref().end_handshake();
        if let Err(e) = config.validate() {
            let message = format!("the migrated VM's configuration is invalid: {e}");
            let _ = receiver.send_error(&message);
            return Err(message);
        }
        // The VM is built during the source's pre-copy, so the downtime window holds only
        // the state restore.
        let memory = self
            .ask(|reply| IncomingEvent::Prepare {
                config: Box::new(config),
                reply,
            })
            .inspect_err(|e| {
                let _ = receiver.send_error(e);
            })?;
        let state: VmSnapshotState = receiver
            .recv_state(&memory)
            .map_err(|e: ProtocolError| e.to_string())?;
        self.ask(|reply| IncomingEvent::Restore {
            state: Box::new(state),
            reply,
        })
        .inspect_err(|e| {
            let _ = receiver.send_error(e);
        })?;
        // The source stops for good once it reads this. If the ack is lost, a source with
        // disks stays paused (it cannot take their locks back from us); fencing a disk-less
        // VM against such a split is fault tolerance's job, not migration's.
        receiver.send_ack().map_err(|e| {
            format!("the VM runs here, but the source did not get the acknowledgement: {e}")
        })?;
        Ok(receiver.stats())
    }

    /// Waits for the source, however long that takes (as Cloud Hypervisor does), unless the
    /// receive is cancelled.
    fn accept(&self, listener: &Listener) -> Result<MigrationStream, String> {
        const LISTENER: u64 = 1;
        const STOP: u64 = 2;
        let epoll = Epoll::new().map_err(|e| format!("epoll: {e}"))?;
        for (fd, token) in [
            (listener.as_raw_fd(), LISTENER),
            (self.stop.as_raw_fd(), STOP),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(|e| format!("epoll: {e}"))?;
        }
        let mut ready = [EpollEvent::default(); 2];
        loop {
            let n = match epoll.wait(-1, &mut ready) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("epoll: {e}")),
            };
            if ready[..n].iter().any(|e| e.data() == STOP) {
                return Err("cancelled before a source connected".into());
            }
            match listener.accept() {
                Ok(Accepted::Unix(stream)) => return Ok(MigrationStream::Unix(stream)),
                Ok(Accepted::Tcp(tcp, peer)) => {
                    let Some(security) = &self.security else {
                        return Err("a TCP listener without a security choice".into());
                    };
                    // A stranger that fails the handshake is turned away; the receive goes on
                    // waiting for the real source.
                    match security.accept(tcp, self.timeouts.handshake) {
                        Ok(stream) => return Ok(stream),
                        Err(e) => log::warn!("migration: refused {peer}: {e}"),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(format!("accepting the source: {e}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MemoryConfig, PayloadConfig};
    use crate::migration::protocol::Sender;
    use std::os::unix::net::UnixStream;

    const SHORT: ReceiveTimeouts = ReceiveTimeouts {
        handshake: Duration::from_millis(300),
        read: Duration::from_millis(300),
    };

    struct Fixture {
        incoming: IncomingMigration,
        wake: Arc<EventFd>,
        path: PathBuf,
    }

    fn listen(name: &str) -> Fixture {
        let path = std::env::temp_dir().join(format!("rx-{}-{name}.sock", std::process::id()));
        let wake = Arc::new(EventFd::new(0).unwrap());
        let url = format!("unix:{}", path.display());
        let incoming = IncomingMigration::start(&url, None, false, SHORT, wake.clone()).unwrap();
        Fixture {
            incoming,
            wake,
            path,
        }
    }

    /// Waits (blocking on the wake eventfd) for the next event.
    fn next(f: &Fixture) -> IncomingEvent {
        loop {
            if let Some(event) = f.incoming.try_next() {
                return event;
            }
            f.wake.read().unwrap();
        }
    }

    fn failure(f: &Fixture) -> String {
        match next(f) {
            IncomingEvent::Finished(Err(e)) => e,
            IncomingEvent::Finished(Ok(_)) => panic!("the receive succeeded"),
            _ => panic!("unexpected event"),
        }
    }

    fn config() -> VmConfig {
        VmConfig {
            memory: MemoryConfig::with_size(32 << 20),
            payload: Some(PayloadConfig {
                kernel: Some("/nonexistent/kernel".into()),
                ..PayloadConfig::default()
            }),
            ..VmConfig::default()
        }
    }

    #[test]
    fn a_silent_source_fails_the_handshake() {
        let f = listen("silent");
        let _peer = UnixStream::connect(&f.path).unwrap();
        let started = Instant::now();
        let e = failure(&f);
        assert!(e.contains("handshake timeout"), "{e}");
        assert!(
            started.elapsed() >= SHORT.handshake,
            "{:?}",
            started.elapsed()
        );
        // The listener is gone: nobody else may take this receive.
        assert!(!f.path.exists());
    }

    #[test]
    fn half_a_hello_fails_the_handshake() {
        let f = listen("half");
        let mut peer = UnixStream::connect(&f.path).unwrap();
        let mut header = Vec::new();
        header.extend_from_slice(b"TMIG");
        header.extend_from_slice(&[1, 0, 0, 0]);
        header.extend_from_slice(&256u32.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&[b'{'; 100]);
        peer.write_all(&header).unwrap();
        let e = failure(&f);
        assert!(e.contains("handshake timeout"), "{e}");
    }

    #[test]
    fn a_source_silent_after_hello_hits_the_read_timeout() {
        let f = listen("after-hello");
        let peer = UnixStream::connect(&f.path).unwrap();
        let mut sender = Sender::new(peer);
        sender.send_hello(&config()).unwrap();
        match next(&f) {
            IncomingEvent::Prepare { config: c, reply } => {
                assert_eq!(c.memory.size, 32 << 20);
                reply
                    .send(Ok(crate::memory::create(32 << 20).unwrap()))
                    .unwrap();
            }
            IncomingEvent::Finished(r) => panic!("expected Prepare, got {:?}", r.err()),
            _ => panic!("expected Prepare"),
        }
        // Longer than the handshake limit: only the read timeout applies now.
        let started = Instant::now();
        let e = failure(&f);
        assert!(e.contains("read timeout"), "{e}");
        assert!(started.elapsed() >= SHORT.read, "{:?}", started.elapsed());
    }

    #[test]
    fn a_failed_prepare_is_reported_to_the_source() {
        let f = listen("prepare-fails");
        let peer = UnixStream::connect(&f.path).unwrap();
        let mut sender = Sender::new(peer);
        sender.send_hello(&config()).unwrap();
        match next(&f) {
            IncomingEvent::Prepare { reply, .. } => {
                reply.send(Err("no room for this VM".into())).unwrap()
            }
            IncomingEvent::Finished(r) => panic!("expected Prepare, got {:?}", r.err()),
            _ => panic!("expected Prepare"),
        }
        assert_eq!(failure(&f), "no room for this VM");
        let e = sender.recv_ack().unwrap_err();
        assert!(e.to_string().contains("no room for this VM"), "{e}");
    }

    #[test]
    fn dropping_a_waiting_receive_stops_listening() {
        let f = listen("cancel");
        let path = f.path.clone();
        assert!(path.exists());
        drop(f.incoming);
        let deadline = Instant::now() + Duration::from_secs(5);
        while path.exists() {
            assert!(Instant::now() < deadline, "still listening");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_bad_url_fails_at_once() {
        let wake = Arc::new(EventFd::new(0).unwrap());
        let e = IncomingMigration::start("file:///x", None, false, SHORT, wake)
            .err()
            .unwrap();
        assert!(matches!(e, ReceiveError::Url(_)), "{e}");
    }
}
