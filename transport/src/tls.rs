//! Mutual TLS for every TCP channel between hosts.
//!
//! Credentials come from one directory laid out like QEMU's x509 credentials directory:
//!
//! ```text
//! ca-cert.pem      the CA both sides trust; a peer's certificate must chain to it
//! server-cert.pem  this host's certificate when it accepts (must name the address peers dial)
//! server-key.pem
//! client-cert.pem  this host's certificate when it dials
//! client-key.pem
//! ```
//!
//! The dialling side checks that the listener's certificate names the host or address it
//! dialled; the listening side requires a client certificate from the same CA. TLS 1.3 and
//! 1.2 only, with the `ring` provider.
//!
//! [`TlsStream`] can be cloned into a reader half and a writer half used from two threads, as
//! the FT sender and ack threads do with a plain socket: reading from the socket never holds
//! the connection's lock, so a blocked reader never stops the writer, nor the reverse.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::client::WebPkiServerVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};
use rustls::{ServerConnection, SupportedProtocolVersion};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use thiserror::Error;

pub const CA_CERT: &str = "ca-cert.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";
pub const CLIENT_CERT: &str = "client-cert.pem";
pub const CLIENT_KEY: &str = "client-key.pem";

/// Default time a handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest chunk read from the socket at once.
const READ_CHUNK: usize = 64 * 1024;

static VERSIONS: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("TLS credentials: cannot read {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("TLS credentials: {path} holds no {what}")]
    Empty { path: PathBuf, what: &'static str },
    #[error("TLS credentials in {dir}: {reason}")]
    Config { dir: PathBuf, reason: String },
    #[error("TLS: {0:?} is not a host name or address a certificate can name")]
    ServerName(String),
    #[error("TLS handshake with {peer} failed: {reason}")]
    Handshake { peer: String, reason: String },
}

/// ring's suites with AES-128-GCM first: strong enough for the channel and cheaper than
/// AES-256 on the FT sender's path (`cargo bench -p transport` measures the channel).
fn provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::ring::cipher_suite;
    let mut provider = rustls::crypto::ring::default_provider();
    let preferred = [
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    let rest: Vec<_> = provider
        .cipher_suites
        .iter()
        .copied()
        .filter(|s| !preferred.iter().any(|p| p.suite() == s.suite()))
        .collect();
    provider.cipher_suites = preferred.into_iter().chain(rest).collect();
    provider
}

/// The five files of a credentials directory, loaded and checked once.
pub struct TlsCredentials {
    dir: PathBuf,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl std::fmt::Debug for TlsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCredentials")
            .field("dir", &self.dir)
            .finish()
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |reason: String| TlsError::File {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_path_buf(),
            what: "PEM certificate",
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            path: path.to_path_buf(),
            what: "PEM private key",
        },
        e => TlsError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        },
    })
}

impl TlsCredentials {
    /// Loads and checks a credentials directory; every error names the file at fault.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let config_error = |reason: String| TlsError::Config {
            dir: dir.to_path_buf(),
            reason,
        };
        let provider = Arc::new(provider());

        let mut roots = RootCertStore::empty();
        for cert in read_certs(&dir.join(CA_CERT))? {
            roots
                .add(cert)
                .map_err(|e| config_error(format!("{CA_CERT}: {e}")))?;
        }
        let roots = Arc::new(roots);

        let server_verifier =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| config_error(format!("{CA_CERT}: {e}")))?;
        let client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| config_error(e.to_string()))?
            .with_webpki_verifier(server_verifier)
            .with_client_auth_cert(
                read_certs(&dir.join(CLIENT_CERT))?,
                read_key(&dir.join(CLIENT_KEY))?,
            )
            .map_err(|e| config_error(format!("{CLIENT_CERT}/{CLIENT_KEY}: {e}")))?;

        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| config_error(format!("{CA_CERT}: {e}")))?;
        let server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(VERSIONS)
            .map_err(|e| config_error(e.to_string()))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(
                read_certs(&dir.join(SERVER_CERT))?,
                read_key(&dir.join(SERVER_KEY))?,
            )
            .map_err(|e| config_error(format!("{SERVER_CERT}/{SERVER_KEY}: {e}")))?;

        Ok(TlsCredentials {
            dir: dir.to_path_buf(),
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Dials side: the handshake over `tcp`, checking that the listener's certificate names
    /// `host` (the host name or address that was dialled).
    pub fn connect(
        &self,
        tcp: TcpStream,
        host: &str,
        timeout: Duration,
    ) -> Result<TlsStream, TlsError> {
        // An IPv6 literal may come bracketed from HOST:PORT syntax.
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(bare.to_string())
            .map_err(|_| TlsError::ServerName(host.to_string()))?;
        let peer = peer_label(&tcp);
        let conn =
            ClientConnection::new(self.client.clone(), name).map_err(|e| TlsError::Handshake {
                peer: peer.clone(),
                reason: e.to_string(),
            })?;
        TlsStream::handshake(Connection::Client(conn), tcp, timeout)
    }

    /// Listening side: the handshake over an accepted `tcp`, requiring a client certificate
    /// from our CA.
    pub fn accept(&self, tcp: TcpStream, timeout: Duration) -> Result<TlsStream, TlsError> {
        let peer = peer_label(&tcp);
        let conn = ServerConnection::new(self.server.clone()).map_err(|e| TlsError::Handshake {
            peer,
            reason: e.to_string(),
        })?;
        TlsStream::handshake(Connection::Server(conn), tcp, timeout)
    }
}

fn peer_label(tcp: &TcpStream) -> String {
    tcp.peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "an unknown peer".to_string())
}

/// The cause of a failed handshake in words an operator acts on.
fn explain(error: &io::Error) -> String {
    if let Some(tls) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return explain_tls(tls);
    }
    match error.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            "no TLS answer in time (is the peer speaking plaintext, or not TLS at all?)".to_string()
        }
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
            "the peer closed the connection during the handshake (it may have refused our \
             certificate, or it expects plaintext)"
                .to_string()
        }
        _ => error.to_string(),
    }
}

fn explain_tls(error: &rustls::Error) -> String {
    use rustls::{AlertDescription as Alert, CertificateError as Cert, Error as E};
    match error {
        E::InvalidCertificate(Cert::Expired)
        | E::InvalidCertificate(Cert::ExpiredContext { .. }) => {
            "the peer's certificate has expired".to_string()
        }
        E::InvalidCertificate(Cert::NotValidYet)
        | E::InvalidCertificate(Cert::NotValidYetContext { .. }) => {
            "the peer's certificate is not valid yet".to_string()
        }
        E::InvalidCertificate(Cert::UnknownIssuer) => {
            "the peer's certificate does not chain to our CA (ca-cert.pem)".to_string()
        }
        E::InvalidCertificate(Cert::BadSignature) => {
            "the peer's certificate does not chain to our CA (ca-cert.pem): its signature \
             does not verify (another CA with the same name?)"
                .to_string()
        }
        E::InvalidCertificate(Cert::NotValidForName)
        | E::InvalidCertificate(Cert::NotValidForNameContext { .. }) => {
            "the peer's certificate does not name the host or address we dialled".to_string()
        }
        E::AlertReceived(Alert::UnknownCA)
        | E::AlertReceived(Alert::BadCertificate)
        | E::AlertReceived(Alert::DecryptError) => {
            "the peer refused our certificate (it does not chain to the peer's CA)".to_string()
        }
        E::AlertReceived(Alert::CertificateExpired) => {
            "the peer refused our certificate: it has expired".to_string()
        }
        E::AlertReceived(Alert::CertificateRequired) => {
            "the peer requires a client certificate".to_string()
        }
        E::InvalidMessage(_) => {
            "the peer does not speak TLS (a plaintext peer on a TLS channel?)".to_string()
        }
        E::DecryptError => {
            "a record failed its integrity check (the stream was damaged or tampered with in \
             transit)"
                .to_string()
        }
        e => e.to_string(),
    }
}

/// The socket during the handshake: each read and write gets only the time left.
struct Deadline<'a> {
    tcp: &'a mut TcpStream,
    until: Instant,
}

impl Deadline<'_> {
    fn left(&self) -> io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(io::Error::from(io::ErrorKind::TimedOut))
        } else {
            Ok(left)
        }
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.tcp.set_read_timeout(Some(left))?;
        self.tcp.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.tcp.set_write_timeout(Some(left))?;
        self.tcp.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

struct Inner {
    conn: Mutex<Connection>,
    /// Serializes writers so that records leave in the order they were sealed.
    send: Mutex<()>,
    /// For `shutdown`, which must reach every handle.
    socket: TcpStream,
}

/// A TLS connection whose clones share the session: one thread may read while another writes.
pub struct TlsStream {
    inner: Arc<Inner>,
    /// This handle's descriptor of the socket (a `try_clone`): the halves read and write on
    /// their own, while socket options such as timeouts stay shared, as with plain TCP clones.
    socket: TcpStream,
    /// Ciphertext this handle read from the socket and the session has not taken yet.
    pending: Ciphertext,
}

/// A reading handle's ciphertext buffer: allocated once, read into in place, consumed from
/// the front (no copy per record).
#[derive(Default)]
struct Ciphertext {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Ciphertext {
    fn unread(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// One read from `socket` into the free space (made room for if needed).
    fn fill_from(&mut self, socket: &mut TcpStream) -> io::Result<usize> {
        if self.data.is_empty() {
            self.data = vec![0; READ_CHUNK];
        }
        if self.end == self.data.len() {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                // A record larger than what is buffered: make room rather than read nothing.
                self.data.resize(self.data.len() * 2, 0);
            }
        }
        let n = socket.read(&mut self.data[self.end..])?;
        self.end += n;
        Ok(n)
    }
}

fn lock(conn: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    // A thread that panicked while holding the lock left the session in an unknown state;
    // the next read or write reports that through the connection's own errors.
    conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl TlsStream {
    fn handshake(
        mut conn: Connection,
        mut tcp: TcpStream,
        timeout: Duration,
    ) -> Result<TlsStream, TlsError> {
        let peer = peer_label(&tcp);
        let handshake_error = |reason: String| TlsError::Handshake {
            peer: peer.clone(),
            reason,
        };
        let old_read = tcp.read_timeout().ok().flatten();
        let old_write = tcp.write_timeout().ok().flatten();
        {
            // The whole handshake, not each read, is bounded: a peer trickling a byte at a
            // time cannot hold a listener longer than `timeout`.
            let mut io = Deadline {
                tcp: &mut tcp,
                until: Instant::now() + timeout,
            };
            while conn.is_handshaking() {
                conn.complete_io(&mut io)
                    .map_err(|e| handshake_error(explain(&e)))?;
            }
            while conn.wants_write() {
                conn.write_tls(&mut io)
                    .map_err(|e| handshake_error(explain(&e)))?;
            }
        }
        tcp.set_read_timeout(old_read)
            .and_then(|()| tcp.set_write_timeout(old_write))
            .map_err(|e| handshake_error(e.to_string()))?;
        let socket = tcp
            .try_clone()
            .map_err(|e| handshake_error(e.to_string()))?;
        Ok(TlsStream {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                send: Mutex::new(()),
                socket: tcp,
            }),
            socket,
            pending: Ciphertext::default(),
        })
    }

    /// See [`crate::Stream::readable_now`]: ciphertext or plaintext this handle or the
    /// session holds already, or bytes on the socket.
    pub fn readable_now(&self) -> bool {
        if !self.pending.unread().is_empty() {
            return true;
        }
        let buffered = match lock(&self.inner.conn).process_new_packets() {
            Ok(state) => state.plaintext_bytes_to_read() > 0 || state.peer_has_closed(),
            // A read reports the error at once.
            Err(_) => true,
        };
        buffered || crate::socket_readable_now(self.socket.as_raw_fd())
    }

    /// Another handle on the same session (for a reader or writer thread).
    pub fn try_clone(&self) -> io::Result<TlsStream> {
        Ok(TlsStream {
            inner: self.inner.clone(),
            socket: self.socket.try_clone()?,
            pending: Ciphertext::default(),
        })
    }

    /// Closes both directions of the socket (wakes a thread blocked on the other half).
    pub fn shutdown(&self) -> io::Result<()> {
        self.inner.socket.shutdown(Shutdown::Both)
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.socket.set_read_timeout(timeout)
    }

    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.socket.set_write_timeout(timeout)
    }

    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        self.socket.set_nodelay(nodelay)
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.socket.peer_addr()
    }
}

impl TlsStream {
    /// Sends every record the session has sealed, straight from its buffers (no copy of
    /// ours). The session stays locked only while the kernel takes the bytes: when the
    /// socket's buffer is full, the wait for room (at most the write timeout, after which
    /// the error is `WouldBlock`, as with a blocking socket) leaves it to the reader.
    fn send_sealed(&self) -> io::Result<()> {
        let fd = self.socket.as_raw_fd();
        loop {
            {
                let mut conn = lock(&self.inner.conn);
                loop {
                    if !conn.wants_write() {
                        return Ok(());
                    }
                    match conn.write_tls(&mut SendNow(fd)) {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
            }
            wait_writable(fd, self.socket.write_timeout()?)?;
        }
    }
}

/// The socket as rustls writes sealed records to it: without waiting (`WouldBlock` when its
/// buffer is full) and without SIGPIPE (a closed peer is an error to report, not a signal).
struct SendNow(RawFd);

impl Write for SendNow {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // SAFETY: msghdr is a plain C struct for which all zeroes is a valid (empty) value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        // IoSlice is ABI-compatible with iovec on Unix (std documents it); sendmsg only reads.
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len().min(IOV_MAX) as _;
        // SAFETY: `msg` points at `bufs`, which outlive the call; the kernel reads them only.
        let sent = unsafe { libc::sendmsg(self.0, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if sent < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(sent as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Slices one sendmsg takes (Linux's UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// Waits until `fd` has room to write, at most `timeout` (None: without end).
fn wait_writable(fd: RawFd, timeout: Option<Duration>) -> io::Result<()> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let left_ms = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Rounded up: a wait of 0 would spin.
                libc::c_int::try_from(left.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX)
            }
        };
        match crate::poll_one(fd, libc::POLLOUT, left_ms) {
            Ok(true) => return Ok(()),
            Ok(false) => return Err(io::ErrorKind::WouldBlock.into()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Feeds buffered ciphertext to the session until it yields plaintext or has taken all.
fn feed(pending: &mut Ciphertext, conn: &mut Connection) -> io::Result<()> {
    loop {
        let state = conn
            .process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, explain_tls(&e)))?;
        if state.plaintext_bytes_to_read() > 0
            || state.peer_has_closed()
            || pending.unread().is_empty()
        {
            return Ok(());
        }
        let taken = conn.read_tls(&mut pending.unread())?;
        pending.consume(taken);
        if taken == 0 {
            return Ok(());
        }
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut conn = lock(&self.inner.conn);
                feed(&mut self.pending, &mut conn)?;
                match conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            // Wait for ciphertext without holding the session, so writers go on.
            let n = self.pending.fill_from(&mut self.socket)?;
            if n == 0 {
                let mut conn = lock(&self.inner.conn);
                // Lets the session tell a clean close_notify from a truncation.
                conn.read_tls(&mut &[][..])?;
                conn.process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, explain_tls(&e)))?;
                return match conn.reader().read(buf) {
                    Ok(n) => Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection (without ending its TLS session)",
                    )),
                    Err(e) => Err(e),
                };
            }
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    /// Seals the slices into records together (one copy of each byte, into the record it
    /// travels in): a frame written in pieces needs no buffer of its own.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let _order = self
            .inner
            .send
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let written = lock(&self.inner.conn).writer().write_vectored(bufs)?;
        self.send_sealed()?;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.socket.flush()
    }
}

#[cfg(test)]
mod tests;
