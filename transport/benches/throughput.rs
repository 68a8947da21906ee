//! The cost of mutual TLS on a channel between hosts, measured side by side in one run:
//! loopback TCP plaintext vs TLS (this crate's split reader/writer stream), one stream, the
//! writer sending 4 MiB frames as the FT sender does, the reader on its own thread. Credentials
//! from `ci/make-tls-certs` (openssl CLI). Prints MB/s per case and the TLS/plaintext ratio.
//!
//! `cargo bench -p transport --bench throughput [-- SECONDS]`

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use transport::{Security, Stream, TlsCredentials};

const FRAME: usize = 4 << 20;

fn pair(security: &Security) -> (Stream, Stream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accept_security = security.clone();
    let server = thread::spawn(move || {
        let (tcp, _) = listener.accept().expect("accept");
        accept_security
            .accept(tcp, Duration::from_secs(10))
            .expect("server handshake")
    });
    let client =
        transport::dial(&addr.to_string(), security, Duration::from_secs(10)).expect("dial");
    (client, server.join().expect("server thread"))
}

/// MB/s (10^6) of `seconds` of frames from a writer to a reader thread.
fn run(security: &Security, seconds: f64) -> f64 {
    let (mut writer, mut reader) = pair(security);
    let total = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = total.clone();
    let sink = thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    counted.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    });
    let frame: Vec<u8> = (0..FRAME).map(|i| (i * 31 % 251) as u8).collect();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds {
        writer.write_all(&frame).expect("write");
    }
    writer.shutdown();
    let _ = sink.join();
    let bytes = total.load(std::sync::atomic::Ordering::Relaxed);
    bytes as f64 / start.elapsed().as_secs_f64() / 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let seconds: f64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2.0);
    let dir = std::env::temp_dir().join(format!("transport-bench-{}", std::process::id()));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ci/make-tls-certs");
    let made = std::process::Command::new(script)
        .arg(&dir)
        .arg("127.0.0.1")
        .output();
    match made {
        Ok(out) if out.status.success() => {}
        _ => {
            println!("SKIP: transport throughput: ci/make-tls-certs (openssl) failed");
            return;
        }
    }
    let tls = Security::Tls(Arc::new(TlsCredentials::load(&dir).expect("credentials")));
    let plain = Security::InsecurePlaintext;
    let (mut p, mut t) = (Vec::new(), Vec::new());
    // Alternating, three rounds each: the machine's drift hits both alike.
    for round in 0..3 {
        if round % 2 == 0 {
            p.push(run(&plain, seconds));
            t.push(run(&tls, seconds));
        } else {
            t.push(run(&tls, seconds));
            p.push(run(&plain, seconds));
        }
    }
    let (p, t) = (median(p), median(t));
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    println!("transport throughput, loopback, one stream, {FRAME} B writes, median of 3 x {seconds} s ({cores} cores)");
    println!("case              |     MB/s");
    println!("------------------|---------");
    println!("TCP plaintext     | {p:8.0}");
    println!("mutual TLS        | {t:8.0}");
    println!("TLS / plaintext   | {:8.3}", t / p);
    let _ = std::fs::remove_dir_all(&dir);
}
