//! Writes on a mutual TLS stream when the socket's buffer fills: the bytes arrive whole and in
//! order behind a slow reader, a reader that never reads ends the write after the write
//! timeout (`WouldBlock`, as a blocking socket does), a writer waiting for room leaves the
//! session to its reader, and two sides write to each other at once, each reading on another
//! thread.

use std::io::{Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use transport::Stream;

mod common;
use common::{credentials, pair};

/// Byte `i` of a stream tagged `tag`.
fn byte(tag: u8, i: usize) -> u8 {
    (i.wrapping_mul(31) % 251) as u8 ^ tag
}

fn chunk(tag: u8, from: usize, len: usize) -> Vec<u8> {
    (from..from + len).map(|i| byte(tag, i)).collect()
}

/// Writes `total` bytes of stream `tag` in 1 MiB writes.
fn write_stream(stream: &mut Stream, tag: u8, total: usize) {
    let mut at = 0;
    while at < total {
        let len = (1 << 20).min(total - at);
        stream.write_all(&chunk(tag, at, len)).unwrap();
        at += len;
    }
}

/// Reads `total` bytes and checks they are stream `tag`'s, in order.
fn read_stream(stream: &mut Stream, tag: u8, total: usize) {
    let mut buf = vec![0u8; 256 << 10];
    let mut at = 0;
    while at < total {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed after {at} of {total} bytes");
        for (k, b) in buf[..n].iter().enumerate() {
            assert_eq!(*b, byte(tag, at + k), "byte {} of stream {tag}", at + k);
        }
        at += n;
    }
}

#[test]
fn tls_writes_wait_for_room_time_out_and_leave_the_session_to_the_reader() {
    let (tls, dir) = credentials("writes");
    const TOTAL: usize = 24 << 20;

    // A slow reader: the writer waits for room, and every byte arrives in order.
    let (mut writer, mut reader) = pair(&tls);
    let sink = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        read_stream(&mut reader, 1, TOTAL);
    });
    write_stream(&mut writer, 1, TOTAL);
    sink.join().unwrap();

    // A reader that never reads: the write ends after the write timeout.
    let (mut writer, _reader) = pair(&tls);
    writer
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    let big = vec![5u8; 1 << 20];
    let error = loop {
        if let Err(e) = writer.write_all(&big) {
            break e;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the writes never stopped"
        );
    };
    assert_eq!(error.kind(), std::io::ErrorKind::WouldBlock, "{error}");

    // A writer waiting for room leaves the session to its reader: what the peer sends
    // meanwhile is read (decrypted) on another thread.
    let (mut a, mut b) = pair(&tls);
    let mut a_reader = a.try_clone().unwrap();
    let a_closer = a.try_clone().unwrap();
    let stuck = thread::spawn(move || {
        let big = vec![6u8; 1 << 20];
        // Ends when the connection is shut down below.
        while a.write_all(&big).is_ok() {}
    });
    thread::sleep(Duration::from_millis(300));
    b.write_all(b"hello").unwrap();
    let (got, heard) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut buf = [0u8; 5];
        let _ = got.send(a_reader.read_exact(&mut buf).map(|()| buf));
    });
    let hello = heard
        .recv_timeout(Duration::from_secs(10))
        .expect("the reader waited for the stuck writer");
    assert_eq!(&hello.unwrap(), b"hello");
    a_closer.shutdown();
    stuck.join().unwrap();
    drop(b);

    // Both sides write to each other at once, each reading on another thread.
    let (mut a, mut b) = pair(&tls);
    let (mut a_reader, mut b_reader) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let threads = [
        thread::spawn(move || write_stream(&mut a, 2, TOTAL)),
        thread::spawn(move || write_stream(&mut b, 3, TOTAL)),
        thread::spawn(move || read_stream(&mut a_reader, 3, TOTAL)),
        thread::spawn(move || read_stream(&mut b_reader, 2, TOTAL)),
    ];
    let (done, finished) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for t in threads {
            let _ = done.send(t.join().is_ok());
        }
    });
    for _ in 0..4 {
        let ok = finished
            .recv_timeout(Duration::from_secs(60))
            .expect("the two sides stopped moving");
        assert!(ok, "a side failed");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
