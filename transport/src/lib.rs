//! Connections between VMMs on different hosts: FT replication, live migration and the
//! fencing witness all travel over a [`Stream`].
//!
//! Over TCP a channel is mutual TLS ([`tls`]) unless its operator opted out in so many words
//! ([`Security::InsecurePlaintext`]); nothing here falls back to plaintext by itself. Unix
//! sockets (same host, guarded by file permissions) stay plain.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

pub mod tls;

pub use tls::{TlsCredentials, TlsError, TlsStream, HANDSHAKE_TIMEOUT};

/// How a TCP channel between hosts is secured, as the operator chose it.
#[derive(Clone, Debug)]
pub enum Security {
    /// Mutual TLS with the credentials of one directory.
    Tls(Arc<TlsCredentials>),
    /// Plain TCP, which the operator asked for in so many words (`--insecure-plaintext`).
    InsecurePlaintext,
}

impl Security {
    /// What the operator gave: a credentials directory, or the explicit plaintext opt-out.
    /// Neither is an error naming both ways out; both at once is a contradiction.
    pub fn choose(
        tls_dir: Option<&Path>,
        insecure_plaintext: bool,
        channel: &str,
    ) -> Result<Self, SecurityChoiceError> {
        match (tls_dir, insecure_plaintext) {
            (Some(_), true) => Err(SecurityChoiceError::Both(channel.to_string())),
            (Some(dir), false) => Ok(Security::Tls(Arc::new(TlsCredentials::load(dir)?))),
            (None, true) => Ok(Security::InsecurePlaintext),
            (None, false) => Err(SecurityChoiceError::Neither(channel.to_string())),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Security::Tls(creds) => format!("mutual TLS ({})", creds.dir().display()),
            Security::InsecurePlaintext => "plaintext (insecure)".to_string(),
        }
    }
}

#[derive(Debug, Error)]
pub enum SecurityChoiceError {
    #[error(
        "{0} over TCP needs mutual TLS: give a credentials directory (tls_dir / --tls-dir), \
         or opt out explicitly with insecure_plaintext (--insecure-plaintext); anyone who \
         reaches a plaintext port can feed it a VM"
    )]
    Neither(String),
    #[error("{0}: tls_dir and insecure_plaintext contradict each other; give one")]
    Both(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

#[derive(Debug, Error)]
pub enum DialError {
    #[error("cannot resolve {addr}: {source}")]
    Resolve {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("{addr} resolves to no address")]
    NoAddress { addr: String },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl DialError {
    /// True when the peer could not be reached at all (as opposed to refused).
    pub fn is_timeout(&self) -> bool {
        matches!(self, DialError::Connect { source, .. }
            if matches!(source.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock))
    }
}

/// Connects to `addr` (`HOST:PORT`) within `timeout` per address tried, then secures the
/// connection as `security` says; with TLS the listener's certificate must name `HOST`.
pub fn dial(addr: &str, security: &Security, timeout: Duration) -> Result<Stream, DialError> {
    let candidates: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|source| DialError::Resolve {
            addr: addr.to_string(),
            source,
        })?
        .collect();
    let mut last = None;
    for candidate in candidates {
        match TcpStream::connect_timeout(&candidate, timeout) {
            Ok(tcp) => {
                // Control frames (acks, heartbeats, claims) must not wait for Nagle.
                tcp.set_nodelay(true).map_err(|source| DialError::Connect {
                    addr: addr.to_string(),
                    source,
                })?;
                return security.secure_dialled(tcp, addr, timeout.max(HANDSHAKE_TIMEOUT));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(source) => DialError::Connect {
            addr: addr.to_string(),
            source,
        },
        None => DialError::NoAddress {
            addr: addr.to_string(),
        },
    })
}

/// The host part of `HOST:PORT` (what a listener's certificate must name).
pub fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(host, _)| host)
}

impl Security {
    fn secure_dialled(
        &self,
        tcp: TcpStream,
        addr: &str,
        timeout: Duration,
    ) -> Result<Stream, DialError> {
        Ok(match self {
            Security::InsecurePlaintext => Stream::Tcp(tcp),
            Security::Tls(creds) => Stream::Tls(creds.connect(tcp, host_of(addr), timeout)?),
        })
    }

    /// Secures a connection a listener accepted; with TLS the peer must present a client
    /// certificate from our CA within `timeout`.
    pub fn accept(&self, tcp: TcpStream, timeout: Duration) -> Result<Stream, TlsError> {
        Ok(match self {
            Security::InsecurePlaintext => Stream::Tcp(tcp),
            Security::Tls(creds) => Stream::Tls(creds.accept(tcp, timeout)?),
        })
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Security::Tls(_))
    }
}

/// A connection between VMMs.
pub enum Stream {
    /// Plain TCP: only when the operator opted out of TLS.
    Tcp(TcpStream),
    Tls(TlsStream),
    /// Same host (and in-process test links).
    Unix(UnixStream),
}

impl Stream {
    /// Another handle on the same connection, for a reader or writer thread.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Tls(s) => Stream::Tls(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Closes both directions (wakes a thread blocked reading the other half).
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Tls(s) => s.shutdown(),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(timeout),
            Stream::Tls(s) => s.set_read_timeout(timeout),
            Stream::Unix(s) => s.set_read_timeout(timeout),
        }
    }

    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(timeout),
            Stream::Tls(s) => s.set_write_timeout(timeout),
            Stream::Unix(s) => s.set_write_timeout(timeout),
        }
    }

    /// Small control frames (acks, heartbeats) must not wait for Nagle.
    pub fn set_nodelay(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nodelay(true),
            Stream::Tls(s) => s.set_nodelay(true),
            Stream::Unix(_) => Ok(()),
        }
    }

    /// Whether a read would return at once (bytes, or the end of the stream) rather than
    /// wait. A reader that answers each message can hold its answer back while more is
    /// already here, and answer once for all of it. False when that cannot be told.
    pub fn readable_now(&self) -> bool {
        match self {
            Stream::Tcp(s) => socket_readable_now(s.as_raw_fd()),
            Stream::Tls(s) => s.readable_now(),
            Stream::Unix(s) => socket_readable_now(s.as_raw_fd()),
        }
    }

    /// Whether the stream itself authenticates every byte it delivers (TLS: each record's
    /// AEAD tag), so that a frame checksum on top of it checks nothing more.
    pub fn authenticates_bytes(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// The peer, for the status and the log.
    pub fn peer(&self) -> Option<String> {
        match self {
            Stream::Tcp(s) => s.peer_addr().ok().map(|a| a.to_string()),
            Stream::Tls(s) => s.peer_addr().ok().map(|a| format!("{a} (TLS)")),
            Stream::Unix(_) => Some("local socket".to_string()),
        }
    }
}

/// Whether `fd` has bytes to read, or its peer's end of the stream, right now.
pub(crate) fn socket_readable_now(fd: RawFd) -> bool {
    poll_one(fd, libc::POLLIN, 0).unwrap_or(false)
}

/// Waits at most `timeout_ms` (0: not at all; -1: without end) for `events` on `fd`. True
/// when they came, or an error or hang-up that the next read or write reports.
pub fn poll_one(fd: RawFd, events: libc::c_short, timeout_ms: libc::c_int) -> io::Result<bool> {
    let mut poll = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: `poll` points at one initialized pollfd that lives across the call, and the
    // count says one.
    let ready = unsafe { libc::poll(&mut poll, 1, timeout_ms) };
    if ready < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ready > 0)
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Tls(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_takes_the_part_a_certificate_names() {
        assert_eq!(host_of("10.0.0.2:7000"), "10.0.0.2");
        assert_eq!(host_of("backup.example:7000"), "backup.example");
        assert_eq!(host_of("[fd00::2]:7000"), "[fd00::2]");
    }

    #[test]
    fn the_operator_chooses_tls_or_says_plaintext_in_so_many_words() {
        let error = Security::choose(None, false, "FT replication")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("needs mutual TLS") && error.contains("--insecure-plaintext"),
            "{error}"
        );
        assert!(matches!(
            Security::choose(None, true, "x"),
            Ok(Security::InsecurePlaintext)
        ));
        let error = Security::choose(Some(Path::new("/tmp")), true, "x")
            .unwrap_err()
            .to_string();
        assert!(error.contains("contradict"), "{error}");
    }
}
