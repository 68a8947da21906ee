//! A minimal client for the API: one request, one response, over a Unix socket. Used by
//! `ch-remote`, the tests and the latency benchmark.

use std::io::{self, Read, Write};
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
}

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

/// Sends one request on an open connection and reads its response; with `close` false the
/// connection stays usable for the next request (keep-alive).
pub fn request_on(
    stream: &mut UnixStream,
    method: &str,
    endpoint: &str,
    body: Option<&str>,
    close: bool,
) -> Result<ApiResponse, ClientError> {
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
                            let n = stream.read(&mut chunk)?;
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
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(ClientError::Truncated);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
