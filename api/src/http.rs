//! The HTTP/1.1 subset the API speaks: request heads parsed with `httparse`, bodies framed by
//! `Content-Length` only, and responses serialized with `Content-Length` (or none for 204).
//!
//! Everything here is pure (bytes in, values out) so that the parser can be unit-tested and
//! fuzzed without sockets.

use std::fmt;

/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD_SIZE: usize = 8 * 1024;
/// Largest request body accepted.
pub const MAX_BODY_SIZE: usize = 1024 * 1024;
/// Most headers in one request (httparse needs a fixed array).
const MAX_HEADERS: usize = 64;

/// What the parser took out of a request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The path without query string or fragment (`/api/v1/vm.info`).
    pub path: String,
    /// Body length from `Content-Length`, 0 without one.
    pub content_length: usize,
    /// The client asked to close after this request (`Connection: close`, or HTTP/1.0 without
    /// `Connection: keep-alive`).
    pub close: bool,
    /// `Expect: 100-continue`: the client waits for an interim response before the body
    /// (curl does this for bodies over 1 KiB).
    pub expect_continue: bool,
}

/// Result of looking at the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The head is not complete yet; read more.
    Incomplete,
    /// A complete head of `head_len` bytes; the body follows.
    Complete { head: RequestHead, head_len: usize },
}

/// A request the server answers with an error and then closes the connection (after a
/// framing error the next request's start is unknown).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status} {message}")]
pub struct HttpError {
    pub status: u16,
    pub message: String,
}

impl HttpError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// Parses the head at the start of `buf`.
pub fn parse_head(buf: &[u8]) -> Result<Parsed, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD_SIZE {
                return Err(head_too_large());
            }
            return Ok(Parsed::Incomplete);
        }
        Ok(httparse::Status::Complete(len)) => len,
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::new(
                431,
                format!("too many header fields (at most {MAX_HEADERS})"),
            ))
        }
        Err(e) => return Err(HttpError::new(400, format!("malformed HTTP request: {e}"))),
    };
    if head_len > MAX_HEAD_SIZE {
        return Err(head_too_large());
    }
    // httparse fills these in on Complete.
    let (Some(method), Some(target), Some(version)) =
        (request.method, request.path, request.version)
    else {
        return Err(HttpError::new(400, "malformed HTTP request line"));
    };

    let mut content_length: Option<usize> = None;
    let mut close = version == 0;
    let mut expect_continue = false;
    for header in request.headers.iter() {
        let name = header.name;
        let value = std::str::from_utf8(header.value)
            .map_err(|_| HttpError::new(400, format!("header {name} is not valid UTF-8")))?
            .trim();
        if name.eq_ignore_ascii_case("content-length") {
            let length = parse_content_length(value)?;
            if content_length.is_some_and(|l| l != length) {
                return Err(HttpError::new(400, "conflicting Content-Length headers"));
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::new(
                411,
                format!(
                    "Transfer-Encoding ({value}) is not supported: send the body with Content-Length"
                ),
            ));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") && version == 0 {
                    close = false;
                }
            }
        } else if name.eq_ignore_ascii_case("expect") && value.eq_ignore_ascii_case("100-continue")
        {
            expect_continue = true;
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > MAX_BODY_SIZE {
        return Err(HttpError::new(
            413,
            format!("request body of {content_length} bytes is larger than the limit of {MAX_BODY_SIZE} bytes"),
        ));
    }
    Ok(Parsed::Complete {
        head: RequestHead {
            method: method.to_string(),
            path: origin_path(target)?,
            content_length,
            close,
            expect_continue,
        },
        head_len,
    })
}

fn head_too_large() -> HttpError {
    HttpError::new(
        431,
        format!("request head is larger than the limit of {MAX_HEAD_SIZE} bytes"),
    )
}

fn parse_content_length(value: &str) -> Result<usize, HttpError> {
    let bad = || HttpError::new(400, format!("invalid Content-Length: {value:?}"));
    // Digits only: no sign, no spaces inside, no hex; overflow is rejected too.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match value.parse::<u64>() {
        Ok(n) => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
        // Too many digits for u64: certainly above the body limit.
        Err(_) => Ok(usize::MAX),
    }
}

/// The path of a request target: origin form (`/a/b?q`) or absolute form
/// (`http://localhost/a/b`), without query and fragment.
fn origin_path(target: &str) -> Result<String, HttpError> {
    let rest = match target.find("://") {
        Some(at) if !target[..at].contains('/') => {
            let after = &target[at + 3..];
            match after.find('/') {
                Some(slash) => &after[slash..],
                None => "/",
            }
        }
        _ => target,
    };
    if !rest.starts_with('/') {
        return Err(HttpError::new(
            400,
            format!("request target {target:?} is not a path"),
        ));
    }
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    Ok(rest[..end].to_string())
}

/// A response the server sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// A JSON body; `None` for 204.
    pub body: Option<Vec<u8>>,
    /// `Allow` header of a 405 for a wrong method.
    pub allow: Option<&'static str>,
}

impl Response {
    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
            allow: None,
        }
    }

    pub fn json(status: u16, body: Vec<u8>) -> Self {
        Self {
            status,
            body: Some(body),
            allow: None,
        }
    }

    /// An error in Cloud Hypervisor's shape: a JSON list of messages, outermost first.
    pub fn error(status: u16, messages: &[String]) -> Self {
        let body = serde_json::to_vec(messages).unwrap_or_else(|_| b"[]".to_vec());
        Self::json(status, body)
    }

    pub fn error_one(status: u16, message: impl fmt::Display) -> Self {
        Self::error(status, &[message.to_string()])
    }

    /// The bytes on the wire. `close` adds `Connection: close`.
    pub fn serialize(&self, close: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(160 + self.body.as_ref().map_or(0, Vec::len));
        out.extend_from_slice(
            format!(
                "HTTP/1.1 {} {}\r\nServer: Cloud Hypervisor API\r\n",
                self.status,
                reason(self.status)
            )
            .as_bytes(),
        );
        out.extend_from_slice(if close {
            b"Connection: close\r\n"
        } else {
            b"Connection: keep-alive\r\n"
        });
        if let Some(allow) = self.allow {
            out.extend_from_slice(format!("Allow: {allow}\r\n").as_bytes());
        }
        match &self.body {
            // RFC 9110: no Content-Length in a 204.
            None if self.status == 204 => out.extend_from_slice(b"\r\n"),
            None => out.extend_from_slice(b"Content-Length: 0\r\n\r\n"),
            Some(body) => {
                out.extend_from_slice(
                    format!(
                        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    )
                    .as_bytes(),
                );
                out.extend_from_slice(body);
            }
        }
        out
    }
}

/// The interim response to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Reason phrases of the statuses the server sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(raw: &str) -> (RequestHead, usize) {
        match parse_head(raw.as_bytes()) {
            Ok(Parsed::Complete { head, head_len }) => (head, head_len),
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    fn error(raw: &[u8]) -> HttpError {
        match parse_head(raw) {
            Err(e) => e,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(raw)),
        }
    }

    #[test]
    fn simple_get_without_host() {
        let raw = "GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n";
        let (head, len) = complete(raw);
        assert_eq!(len, raw.len());
        assert_eq!(head.method, "GET");
        assert_eq!(head.path, "/api/v1/vmm.ping");
        assert_eq!(head.content_length, 0);
        assert!(!head.close);
        assert!(!head.expect_continue);
    }

    #[test]
    fn put_with_body_and_headers() {
        let raw = "PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\ncontent-length: 12\r\nConnection: Keep-Alive, close\r\nExpect: 100-continue\r\n\r\n{\"cpus\":{}}x";
        let (head, len) = complete(raw);
        assert_eq!(len, raw.len() - 12);
        assert_eq!(head.content_length, 12);
        assert!(head.close);
        assert!(head.expect_continue);
    }

    #[test]
    fn http10_closes_unless_keep_alive() {
        assert!(complete("GET / HTTP/1.0\r\n\r\n").0.close);
        assert!(
            !complete("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .0
                .close
        );
    }

    #[test]
    fn query_fragment_and_absolute_form() {
        assert_eq!(complete("GET /a/b?x=1 HTTP/1.1\r\n\r\n").0.path, "/a/b");
        assert_eq!(complete("GET /a#f HTTP/1.1\r\n\r\n").0.path, "/a");
        assert_eq!(
            complete("GET http://localhost/api/v1/vm.info HTTP/1.1\r\n\r\n")
                .0
                .path,
            "/api/v1/vm.info"
        );
        assert_eq!(error(b"GET * HTTP/1.1\r\n\r\n").status, 400);
    }

    #[test]
    fn incomplete_heads() {
        for raw in [
            "",
            "GET",
            "GET /api/v1/vmm.ping HTTP/1.1\r\n",
            "PUT / HTTP/1.1\r\nA: b",
        ] {
            assert_eq!(
                parse_head(raw.as_bytes()),
                Ok(Parsed::Incomplete),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn garbage_is_400() {
        for raw in [
            &b"\x00\x01\x02\r\n\r\n"[..],
            b"GET /x HTTP/9.9\r\n\r\n",
            b"GET  /x HTTP/1.1\r\n\r\n",
            b"GET /x HTTP/1.1\r\nBad Header\r\n\r\n",
            b"hello world\r\n\r\n",
        ] {
            assert_eq!(error(raw).status, 400, "{:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn bad_content_length_is_400() {
        for value in ["abc", "-1", "+5", "1 2", "0x10", ""] {
            let raw = format!("PUT /x HTTP/1.1\r\nContent-Length: {value}\r\n\r\n");
            let e = error(raw.as_bytes());
            assert_eq!(e.status, 400, "{value:?}: {e}");
            assert!(e.message.contains("Content-Length"), "{e}");
        }
        let e = error(b"PUT /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n");
        assert_eq!(e.status, 400);
        // Repeating the same value is allowed (RFC 9110).
        assert_eq!(
            complete("PUT /x HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n")
                .0
                .content_length,
            3
        );
    }

    #[test]
    fn oversize_body_is_413() {
        let raw = format!(
            "PUT /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_SIZE + 1
        );
        assert_eq!(error(raw.as_bytes()).status, 413);
        let raw = "PUT /x HTTP/1.1\r\nContent-Length: 99999999999999999999999999\r\n\r\n";
        assert_eq!(error(raw.as_bytes()).status, 413);
        let raw = format!("PUT /x HTTP/1.1\r\nContent-Length: {MAX_BODY_SIZE}\r\n\r\n");
        assert_eq!(complete(&raw).0.content_length, MAX_BODY_SIZE);
    }

    #[test]
    fn oversize_head_is_431() {
        let mut raw = b"GET /x HTTP/1.1\r\nX-Big: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', MAX_HEAD_SIZE));
        assert_eq!(error(&raw).status, 431);
        raw.extend_from_slice(b"\r\n\r\n");
        assert_eq!(error(&raw).status, 431);
        let mut many = b"GET /x HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("H{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(error(&many).status, 431);
    }

    #[test]
    fn chunked_is_411() {
        let e = error(b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(e.status, 411);
        assert!(e.message.contains("Content-Length"), "{e}");
    }

    #[test]
    fn pipelined_heads_parse_one_at_a_time() {
        let raw = "GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        let (head, len) = complete(raw);
        assert_eq!(head.path, "/a");
        let (head, _) = complete(&raw[len..]);
        assert_eq!(head.path, "/b");
    }

    #[test]
    fn response_serialization() {
        let r = Response::no_content().serialize(false);
        assert_eq!(
            r,
            b"HTTP/1.1 204 No Content\r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\r\n"
        );
        let r = String::from_utf8(Response::error_one(405, "nope").serialize(true)).unwrap();
        assert!(r.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{r}");
        assert!(r.contains("Connection: close\r\n"), "{r}");
        assert!(r.contains("Content-Type: application/json\r\n"), "{r}");
        assert!(r.ends_with("Content-Length: 8\r\n\r\n[\"nope\"]"), "{r}");
    }
}
