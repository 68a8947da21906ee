//! Fuzzing the connection handler in memory: arbitrary bytes and mutated valid requests, in
//! arbitrary chunking, must never panic and must produce only well-formed HTTP responses
//! (possibly none) before a clean close.

use std::io;
use std::sync::atomic::AtomicUsize;

use api::routes::Backend;
use api::server::{serve_connection, Transport};
use proptest::prelude::*;
use vmm::control::{SendError, VmmPingResponse, VmmRequest, VmmResponse, VmmResult};

/// Answers everything at once, like a VMM with a running VM.
struct Instant;

impl Backend for Instant {
    fn call(&self, request: VmmRequest) -> Result<VmmResult, SendError> {
        Ok(Ok(match request {
            VmmRequest::Ping => VmmResponse::Ping(VmmPingResponse {
                build_version: "f".into(),
                version: "f".into(),
                pid: 1,
                features: vec![],
            }),
            VmmRequest::Counters => VmmResponse::Counters(Default::default()),
            VmmRequest::FtStatus => VmmResponse::FtStatus(Box::default()),
            _ => VmmResponse::Empty,
        }))
    }
}

/// Input in fixed chunks, then end of stream; output collected.
struct Memory {
    input: Vec<u8>,
    pos: usize,
    chunk: usize,
    output: Vec<u8>,
}

impl Transport for Memory {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.chunk.min(buf.len()).min(self.input.len() - self.pos);
        buf[..n].copy_from_slice(&self.input[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
    fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.output.extend_from_slice(data);
        Ok(())
    }
}

/// Splits `out` into responses, checking each is well formed. Returns their statuses.
fn check_responses(out: &[u8]) -> Result<Vec<u16>, String> {
    let mut rest = out;
    let mut statuses = Vec::new();
    while !rest.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut response = httparse::Response::new(&mut headers);
        let head_len = match response.parse(rest) {
            Ok(httparse::Status::Complete(n)) => n,
            other => return Err(format!("bad response head {other:?}: {rest:?}")),
        };
        let status = response.code.ok_or("no status")?;
        if response.version != Some(1) {
            return Err("not HTTP/1.1".into());
        }
        let length = response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .map(|h| {
                std::str::from_utf8(h.value)
                    .unwrap()
                    .parse::<usize>()
                    .unwrap()
            });
        let body_len = match (status, length) {
            (100 | 204, None) => 0,
            (100 | 204, Some(_)) => return Err(format!("{status} with Content-Length")),
            (_, Some(n)) => n,
            (_, None) => return Err(format!("{status} without Content-Length")),
        };
        if rest.len() < head_len + body_len {
            return Err("truncated body".into());
        }
        let body = &rest[head_len..head_len + body_len];
        if status >= 400 {
            serde_json::from_slice::<Vec<String>>(body)
                .map_err(|e| format!("error body is not a list of strings: {e}"))?;
        } else if body_len > 0 {
            serde_json::from_slice::<serde_json::Value>(body)
                .map_err(|e| format!("body is not JSON: {e}"))?;
        }
        statuses.push(status);
        rest = &rest[head_len + body_len..];
    }
    Ok(statuses)
}

fn run(input: Vec<u8>, chunk: usize) -> Vec<u8> {
    let mut memory = Memory {
        input,
        pos: 0,
        chunk: chunk.max(1),
        output: Vec::new(),
    };
    serve_connection(&mut memory, &Instant, &AtomicUsize::new(0));
    memory.output
}

const VALID: &[&str] = &[
    "GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 52\r\n\r\n{\"payload\":{\"kernel\":\"/k\"},\"console\":{\"mode\":\"Off\"}}",
    "PUT /api/v1/vm.boot HTTP/1.1\r\nConnection: keep-alive\r\n\r\n",
    "PUT /api/v1/vm.enable-ft HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 120\r\n\r\n{\"peer\":\"10.0.0.2:7000\",\"epoch_ms\":20,\"disk_mode\":\"shared\",\"heartbeat_timeout_ms\":null,\"witness\":\"w:1\",\"compress\":false}",
    "PUT /api/v1/vm.receive-ft HTTP/1.1\r\nContent-Length: 77\r\n\r\n{\"receiver_url\":\"tcp:0.0.0.0:7000\",\"disk_paths\":[\"/b/d0.img\"],\"witness\":null}",
    "GET /api/v1/vm.ft-status HTTP/1.1\r\nAccept: */*\r\n\r\n",
    "PUT /api/v1/vm.disable-ft HTTP/1.1\r\n\r\n",
    "GET /api/v1/vm.info HTTP/1.0\r\n\r\n",
    "GET /api/v1/vm.counters HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}",
    "PUT /api/v1/vm.pause HTTP/1.1\r\nConnection: close\r\n\r\n",
];

fn mutated() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(0..VALID.len(), 1..4),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 0..6),
    )
        .prop_map(|(picks, edits)| {
            let mut bytes: Vec<u8> = picks.iter().flat_map(|&i| VALID[i].bytes()).collect();
            for (at, byte, op) in edits {
                if bytes.is_empty() {
                    break;
                }
                let i = at.index(bytes.len());
                match op {
                    0 => bytes[i] = byte,
                    1 => bytes.insert(i, byte),
                    _ => {
                        bytes.remove(i);
                    }
                }
            }
            bytes
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(input in prop::collection::vec(any::<u8>(), 0..2048), chunk in 1usize..600) {
        let out = run(input, chunk);
        if let Err(e) = check_responses(&out) {
            prop_assert!(false, "{}", e);
        }
    }

    #[test]
    fn mutated_requests_never_panic(input in mutated(), chunk in 1usize..300) {
        let out = run(input, chunk);
        if let Err(e) = check_responses(&out) {
            prop_assert!(false, "{}", e);
        }
    }
}

#[test]
fn valid_pipeline_in_any_chunking() {
    let all: Vec<u8> = VALID.iter().flat_map(|r| r.bytes()).collect();
    for chunk in [1, 2, 3, 7, 64, 4096] {
        let statuses = check_responses(&run(all.clone(), chunk)).unwrap();
        // The HTTP/1.0 request (vm.info, which this backend answers with 204) ends the connection.
        assert_eq!(
            statuses,
            vec![200, 204, 204, 204, 204, 200, 204, 204],
            "chunk {chunk}"
        );
    }
}
