//! The host ends of the virtio console (`--console`): opened once per VM from its
//! configuration and kept across the VM's reboots (as the serial port's output is), so a pty
//! keeps its path, a socket its listener and a file is not truncated again. Each boot's
//! console device gets its own handles to them ([`ConsoleHost::backend`]).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::virtio::console::ConsoleBackend;

use crate::config::{ConsoleConfig, ConsoleOutputMode};
use crate::vmm::{CappedWriter, SERIAL_FILE_CAP};

#[derive(Debug, thiserror::Error)]
pub enum ConsoleHostError {
    #[error("cannot open console output file {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on console socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create the console pty: {0}")]
    Pty(#[source] io::Error),
    #[error("cannot hand the console's host end to the device: {0}")]
    Clone(#[source] io::Error),
}

enum Kind {
    Null,
    Tty,
    File(Arc<Mutex<CappedWriter<File>>>),
    /// The slave stays open here so that the master never reports a hang-up while no
    /// program has the pty open (output then fills the pty's buffer and is dropped).
    Pty {
        master: File,
        _slave: File,
    },
    Socket(UnixListener),
}

/// The host side of a VM's virtio console.
pub struct ConsoleHost {
    kind: Kind,
    pty_path: Option<PathBuf>,
    cols: u16,
    rows: u16,
}

/// Output to a file shared by the devices of successive boots.
struct SharedFile(Arc<Mutex<CappedWriter<File>>>);

impl Write for SharedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

impl ConsoleHost {
    /// Opens what `config` names; None for `off` (no console device).
    pub fn open(config: &ConsoleConfig) -> Result<Option<ConsoleHost>, ConsoleHostError> {
        let (kind, pty_path, (cols, rows)) = match config.mode {
            ConsoleOutputMode::Off => return Ok(None),
            ConsoleOutputMode::Null => (Kind::Null, None, (0, 0)),
            ConsoleOutputMode::Tty => (Kind::Tty, None, terminal_size(&io::stdout())),
            ConsoleOutputMode::File => {
                let path = config.file.clone().unwrap_or_default();
                let file = OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(true)
                    .open(&path)
                    .map_err(|source| ConsoleHostError::File { path, source })?;
                let writer = CappedWriter::new(file, SERIAL_FILE_CAP);
                (Kind::File(Arc::new(Mutex::new(writer))), None, (0, 0))
            }
            ConsoleOutputMode::Socket => {
                let path = config.socket.clone().unwrap_or_default();
                // The console carries the guest's input: only this user may connect.
                let listener = crate::unix_socket::bind_owner_only(&path)
                    .map_err(|source| ConsoleHostError::Socket { path, source })?;
                // The device loop accepts without blocking.
                listener
                    .set_nonblocking(true)
                    .map_err(ConsoleHostError::Clone)?;
                (Kind::Socket(listener), None, (0, 0))
            }
            ConsoleOutputMode::Pty => {
                let (master, slave, path) = open_pty().map_err(ConsoleHostError::Pty)?;
                let size = terminal_size(&slave);
                log::info!("virtio console on pty {}", path.display());
                (
                    Kind::Pty {
                        master,
                        _slave: slave,
                    },
                    Some(path),
                    size,
                )
            }
        };
        Ok(Some(ConsoleHost {
            kind,
            pty_path,
            cols,
            rows,
        }))
    }

    /// Handles for one console device.
    pub fn backend(&self) -> Result<ConsoleBackend, ConsoleHostError> {
        let err = ConsoleHostError::Clone;
        Ok(match &self.kind {
            Kind::Null => ConsoleBackend::Output(Box::new(io::sink())),
            Kind::Tty => {
                let stdin = io::stdin().as_fd().try_clone_to_owned().map_err(err)?;
                ConsoleBackend::Stream {
                    output: Box::new(io::stdout()),
                    input: File::from(stdin),
                }
            }
            Kind::File(file) => ConsoleBackend::Output(Box::new(SharedFile(file.clone()))),
            Kind::Pty { master, .. } => ConsoleBackend::Stream {
                output: Box::new(master.try_clone().map_err(err)?),
                input: master.try_clone().map_err(err)?,
            },
            Kind::Socket(listener) => ConsoleBackend::Socket(listener.try_clone().map_err(err)?),
        })
    }

    /// The pty's path (`pty` mode), which `vm.info` reports as `console.file`.
    pub fn pty_path(&self) -> Option<&Path> {
        self.pty_path.as_deref()
    }

    /// Columns and rows for the device's config space (0 when unknown).
    pub fn size(&self) -> (u16, u16) {
        (self.cols, self.rows)
    }
}

/// The window size of `fd` if it is a terminal, else (0, 0).
fn terminal_size(fd: &impl AsRawFd) -> (u16, u16) {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the valid, exclusively borrowed `ws`.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    if ret == 0 {
        (ws.ws_col, ws.ws_row)
    } else {
        (0, 0)
    }
}

/// A new pty in raw mode: (master, non-blocking; slave; slave path).
fn open_pty() -> io::Result<(File, File, PathBuf)> {
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    // SAFETY: openpty writes the two fds; the name, termios and winsize pointers may be null.
    let ret = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created by openpty and are owned by nothing else.
    let (master, slave) = unsafe {
        (
            File::from(OwnedFd::from_raw_fd(master)),
            File::from(OwnedFd::from_raw_fd(slave)),
        )
    };
    for fd in [&master, &slave] {
        // SAFETY: F_SETFD on an fd we own; no memory is touched.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // Raw mode: the guest's console handles echo and line editing itself.
    // SAFETY: termios is plain data that tcgetattr fills completely on success.
    let mut termios: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr/cfmakeraw/tcsetattr read and write the valid `termios` only.
    unsafe {
        if libc::tcgetattr(slave.as_raw_fd(), &mut termios) != 0 {
            return Err(io::Error::last_os_error());
        }
        libc::cfmakeraw(&mut termios);
        if libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &termios) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: F_GETFL/F_SETFL on an fd we own.
    unsafe {
        let flags = libc::fcntl(master.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(master.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    let mut name = [0u8; 128];
    // SAFETY: ptsname_r writes a NUL-terminated name of at most `name.len()` bytes.
    let ret = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr().cast(), name.len()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let path = PathBuf::from(String::from_utf8_lossy(&name[..len]).into_owned());
    Ok((master, slave, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn off_opens_nothing_and_null_discards() {
        assert!(
            ConsoleHost::open(&ConsoleConfig::with_mode(ConsoleOutputMode::Off))
                .unwrap()
                .is_none()
        );
        let host = ConsoleHost::open(&ConsoleConfig::with_mode(ConsoleOutputMode::Null))
            .unwrap()
            .unwrap();
        assert!(matches!(host.backend().unwrap(), ConsoleBackend::Output(_)));
    }

    #[test]
    fn pty_carries_bytes_both_ways_and_reports_its_path() {
        let host = ConsoleHost::open(&ConsoleConfig::with_mode(ConsoleOutputMode::Pty))
            .unwrap()
            .unwrap();
        let path = host.pty_path().unwrap().to_path_buf();
        assert!(path.starts_with("/dev/pts"), "{}", path.display());
        let ConsoleBackend::Stream { mut output, input } = host.backend().unwrap() else {
            panic!("a pty is a stream");
        };
        let mut other = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        output.write_all(b"to the pty\n").unwrap();
        let mut got = [0u8; 11];
        other.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"to the pty\n");
        other.write_all(b"typed").unwrap();
        let mut input = input;
        let mut buf = [0u8; 5];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut n = 0;
        while n < 5 && std::time::Instant::now() < deadline {
            match input.read(&mut buf[n..]) {
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(&buf, b"typed");
    }

    #[test]
    fn file_output_is_kept_across_backends() {
        let path = std::env::temp_dir().join(format!("console-host-{}.log", std::process::id()));
        let mut config = ConsoleConfig::with_mode(ConsoleOutputMode::File);
        config.file = Some(path.clone());
        let host = ConsoleHost::open(&config).unwrap().unwrap();
        for text in [&b"first boot\n"[..], b"second boot\n"] {
            let ConsoleBackend::Output(mut out) = host.backend().unwrap() else {
                panic!("a file is output only");
            };
            out.write_all(text).unwrap();
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"first boot\nsecond boot\n");
        let _ = std::fs::remove_file(path);
    }
}
