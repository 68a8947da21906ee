//! `Stream::readable_now` over real loopback connections, plain TCP and mutual TLS: false
//! while nothing is here, true once bytes (or the peer's end) are, and, with TLS, true while
//! the session holds plaintext a read has not taken yet even though the socket is drained.

use std::io::{Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use transport::{Security, Stream};

mod common;
use common::{credentials, pair};

/// Loopback delivers at once, but give the kernel a moment all the same.
fn becomes_readable(stream: &Stream) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if stream.readable_now() {
            return true;
        }
        thread::sleep(Duration::from_millis(1));
    }
    false
}

fn read_exactly(stream: &mut Stream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    stream.read_exact(&mut buf).unwrap();
    buf
}

fn check(security: &Security) {
    let (mut writer, mut reader) = pair(security);
    assert!(!reader.readable_now(), "nothing sent yet");

    writer.write_all(&[1; 100]).unwrap();
    assert!(becomes_readable(&reader), "100 bytes sent");
    assert_eq!(read_exactly(&mut reader, 100), vec![1; 100]);
    assert!(!reader.readable_now(), "everything read");

    // Two writes (two records with TLS), half of the first read: the rest is here, in the
    // socket or (TLS) already decrypted in the session.
    writer.write_all(&[2; 100]).unwrap();
    writer.write_all(&[3; 100]).unwrap();
    assert!(becomes_readable(&reader));
    thread::sleep(Duration::from_millis(20));
    assert_eq!(read_exactly(&mut reader, 50), vec![2; 50]);
    assert!(reader.readable_now(), "150 bytes left to read");
    assert_eq!(read_exactly(&mut reader, 50), vec![2; 50]);
    assert!(reader.readable_now(), "100 bytes left to read");
    assert_eq!(read_exactly(&mut reader, 100), vec![3; 100]);
    assert!(!reader.readable_now(), "everything read again");

    // The peer's end is something a read returns at once.
    writer.shutdown();
    assert!(becomes_readable(&reader), "the peer closed");
}

#[test]
fn plain_tcp_tells_whether_a_read_would_wait() {
    check(&Security::InsecurePlaintext);
}

#[test]
fn tls_tells_whether_a_read_would_wait_including_what_the_session_holds() {
    let (tls, dir) = credentials("readable");
    check(&tls);
    let _ = std::fs::remove_dir_all(&dir);
}
