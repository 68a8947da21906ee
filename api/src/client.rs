//! A minimal client for the API: one request, one response, over a Unix socket. Used by
//! `ch-remote`, the tests and the latency benchmark.

use std::io::{self, Read, Write};
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the API socket {path}: {source}")]
    Connect { path: String, source: io::Error },
    #[error("error writing to or reading from the API socket: {0}")]
    Socket(#[from] io::Error),
    #[error("the server closed the connection before a complete response")]
    Truncated,
    #[error("malformed HTTP response: {0}")]
    Malformed(String),
    #[error("cannot pass {count} file descriptors with one request (at most {MAX_SEND_FDS})")]
    TooManyFds { count: usize },
}

/// Most descriptors sent with one request (the server keeps at most as many).
pub const MAX_SEND_FDS: usize = 16;

/// A response: status code and body (empty for 204).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: String,
}

impl ApiResponse {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The error messages of a failed request (Cloud Hypervisor's JSON list of strings), or
    /// the raw body when it is not such a list.
    pub fn error_messages(&self) -> Vec<String> {
        match serde_json::from_str::<Vec<String>>(&self.body) {
            Ok(list) => list,
            Err(_) if self.body.is_empty() => Vec::new(),
            Err(_) => vec![self.body.clone()],
        }
    }
}

/// Connects to `socket`, sends `method /api/v1/<endpoint>` with an optional JSON body, and
/// returns the response. The connection is closed afterwards (as `ch-remote` does).
pub fn request(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: Option<&str>,
) -> Result<ApiResponse, ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    request_on(&mut stream, method, endpoint, body, true)
}

/// Like [`request`], passing `fds` with the request (`SCM_RIGHTS`, as Cloud Hypervisor's
/// `ch-remote add-net fd=[...]` does). The server receives duplicates; ours stay open.
pub fn request_with_fds(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: Option<&str>,
    fds: &[BorrowedFd<'_>],
) -> Result<ApiResponse, ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    let out = serialize_request(method, endpoint, body, true);
    if let Err(e) = send_with_fds(&stream, out.as_bytes(), fds) {
        if matches!(e, ClientError::TooManyFds { .. }) {
            return Err(e);
        }
        return read_response(&mut stream).map_err(|_| e);
    }
    read_response(&mut stream)
}

/// Writes `data`, the descriptors going with its first bytes (one `sendmsg`), the rest with
/// plain writes.
pub fn send_with_fds(
    stream: &UnixStream,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), ClientError> {
    if fds.len() > MAX_SEND_FDS {
        return Err(ClientError::TooManyFds { count: fds.len() });
    }
    if fds.is_empty() || data.is_empty() {
        return (&*stream).write_all(data).map_err(ClientError::Socket);
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let payload = mem::size_of_val(raw.as_slice());
    // u64 storage keeps the control buffer aligned for `cmsghdr`; 16 descriptors need 80 bytes.
    let mut control = [0u64; 16];
    // SAFETY: CMSG_SPACE and CMSG_LEN are pure computations on their argument.
    let (space, len) = unsafe {
        (
            libc::CMSG_SPACE(payload as u32),
            libc::CMSG_LEN(payload as u32),
        )
    };
    let space = space as usize;
    if space > mem::size_of_val(&control) {
        return Err(ClientError::TooManyFds { count: fds.len() });
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty message header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at `control`, which has room for one header and `payload` bytes
    // (checked above); CMSG_FIRSTHDR is non-null for such a buffer and CMSG_DATA points
    // inside it, where exactly `payload` bytes are copied.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return Err(ClientError::TooManyFds { count: fds.len() });
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = len as _;
        std::ptr::copy_nonoverlapping(raw.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), payload);
    }
    let sent = loop {
        // SAFETY: `msg` points at `iov` (covering `data`, only read by the kernel) and
        // `control`, all alive for the call. MSG_NOSIGNAL: a closed peer is an error, not
        // SIGPIPE.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(ClientError::Socket(e));
        }
    };
    (&*stream)
        .write_all(&data[sent..])
        .map_err(ClientError::Socket)
}

fn serialize_request(method: &str, endpoint: &str, body: Option<&str>, close: bool) -> String {
    let mut out =
        format!("{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n");
    if close {
        out.push_str("Connection: close\r\n");
    }
    if let Some(body) = body {
        out.push_str("Content-Type: application/json\r\n");
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    if let Some(body) = body {
        out.push_str(body);
    }
    out
}

/// Sends one request on an open connection and reads its response; with `close` false the
/// connection stays usable for the next request (keep-alive).
pub fn request_on(
    stream: &mut UnixStream,
    method: &str,
    endpoint: &str,
    body: Option<&str>,
    close: bool,
) -> Result<ApiResponse, ClientError> {
    let out = serialize_request(method, endpoint, body, close);
    if let Err(e) = stream.write_all(out.as_bytes()) {
        // The server may answer and close before reading everything (503 when too busy, 413
        // for a body too large): its answer is more useful than the broken pipe.
        return read_response(stream).map_err(|_| ClientError::Socket(e));
    }
    read_response(stream)
}

/// Reads one response (skipping `100 Continue`), framed by `Content-Length`, or by the end of
/// the stream when there is none (except 204, which has no body).
pub fn read_response(stream: &mut impl Read) -> Result<ApiResponse, ClientError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let status = response.code.unwrap_or(0);
                if status == 100 {
                    buf.drain(..head_len);
                    continue;
                }
                let mut length = None;
                for h in response.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        let text = std::str::from_utf8(h.value).unwrap_or("").trim();
                        length = Some(text.parse::<usize>().map_err(|_| {
                            ClientError::Malformed(format!("bad Content-Length {text:?}"))
                        })?);
                    }
                }
                let body = match (status, length) {
                    (204 | 304, _) => Vec::new(),
                    (_, Some(len)) => {
                        while buf.len() < head_len + len {
                            let want = (head_len + len - buf.len()).min(chunk.len());
                            let n = stream.read(&mut chunk[..want])?;
                            if n == 0 {
                                return Err(ClientError::Truncated);
                            }
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        buf[head_len..head_len + len].to_vec()
                    }
                    (_, None) => {
                        stream.read_to_end(&mut buf)?;
                        buf[head_len..].to_vec()
                    }
                };
                return Ok(ApiResponse {
                    status,
                    body: String::from_utf8_lossy(&body).into_owned(),
                });
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(ClientError::Malformed(e.to_string())),
        }
        // The head is read a byte at a time so that nothing of a pipelined next answer is
        // taken (and lost) with this one.
        let n = stream.read(&mut chunk[..1])?;
        if n == 0 {
            return Err(ClientError::Truncated);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
