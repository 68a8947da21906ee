//! The replication connection: TCP between hosts, or a Unix socket pair, which lets the FT
//! state machines be driven in-process (tests with a fake VM and a frame-mangling link).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

pub enum FtStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl FtStream {
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(match self {
            FtStream::Tcp(s) => FtStream::Tcp(s.try_clone()?),
            FtStream::Unix(s) => FtStream::Unix(s.try_clone()?),
        })
    }

    /// Closes both directions (wakes a thread blocked reading the other half).
    pub fn shutdown(&self) {
        let _ = match self {
            FtStream::Tcp(s) => s.shutdown(Shutdown::Both),
            FtStream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        match self {
            FtStream::Tcp(s) => s.set_read_timeout(timeout),
            FtStream::Unix(s) => s.set_read_timeout(timeout),
        }
    }

    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        match self {
            FtStream::Tcp(s) => s.set_write_timeout(timeout),
            FtStream::Unix(s) => s.set_write_timeout(timeout),
        }
    }

    /// Small control frames (acks, heartbeats) must not wait for Nagle.
    pub fn set_nodelay(&self) -> std::io::Result<()> {
        match self {
            FtStream::Tcp(s) => s.set_nodelay(true),
            FtStream::Unix(_) => Ok(()),
        }
    }

    /// The peer, for the status and the log.
    pub fn peer(&self) -> Option<String> {
        match self {
            FtStream::Tcp(s) => s.peer_addr().ok().map(|a| a.to_string()),
            FtStream::Unix(_) => Some("local socket".to_string()),
        }
    }
}

impl Read for FtStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            FtStream::Tcp(s) => s.read(buf),
            FtStream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for FtStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            FtStream::Tcp(s) => s.write(buf),
            FtStream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            FtStream::Tcp(s) => s.flush(),
            FtStream::Unix(s) => s.flush(),
        }
    }
}
