use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair};

use super::*;

const SHORT: Duration = Duration::from_secs(5);

struct Ca {
    cert: Certificate,
    key: KeyPair,
}

fn new_ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    Ca { cert, key }
}

fn issue(ca: &Ca, names: &[&str], expired: bool) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names).unwrap();
    if expired {
        params.not_before = rcgen::date_time_ymd(2001, 1, 1);
        params.not_after = rcgen::date_time_ymd(2002, 1, 1);
    }
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A credentials directory: `server` names what the listener's certificate names.
fn make_dir(tag: &str, ca: &Ca, trust: &Ca, server: &[&str], expired: bool) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tls-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(CA_CERT), trust.cert.pem()).unwrap();
    let (cert, key) = issue(ca, server, expired);
    std::fs::write(dir.join(SERVER_CERT), cert).unwrap();
    std::fs::write(dir.join(SERVER_KEY), key).unwrap();
    let (cert, key) = issue(ca, &["client"], expired);
    std::fs::write(dir.join(CLIENT_CERT), cert).unwrap();
    std::fs::write(dir.join(CLIENT_KEY), key).unwrap();
    dir
}

fn pair(
    dir_server: &Path,
    dir_client: &Path,
    host: &str,
) -> (Result<TlsStream, TlsError>, Result<TlsStream, TlsError>) {
    let server_creds = TlsCredentials::load(dir_server).unwrap();
    let client_creds = TlsCredentials::load(dir_client).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        server_creds.accept(tcp, SHORT)
    });
    let tcp = TcpStream::connect(addr).unwrap();
    let client = client_creds.connect(tcp, host, SHORT);
    (server.join().unwrap(), client)
}

/// The error of a session whose handshake "succeeded" on the dialling side (TLS 1.3 lets the
/// client finish before the listener checked its certificate): it shows at the first read.
fn first_read_error(side: Result<TlsStream, TlsError>) -> String {
    match side {
        Err(e) => e.to_string(),
        Ok(mut stream) => {
            stream.set_read_timeout(Some(SHORT)).unwrap();
            let mut byte = [0u8; 1];
            match stream.read(&mut byte) {
                Err(e) => e.to_string(),
                Ok(n) => format!("read {n} bytes"),
            }
        }
    }
}

#[test]
fn both_directions_at_once_with_split_halves() {
    let ca = new_ca("ca");
    let dir = make_dir("ok", &ca, &ca, &["127.0.0.1", "localhost"], false);
    let (server, client) = pair(&dir, &dir, "127.0.0.1");
    let (server, client) = (server.unwrap(), client.unwrap());
    // Each side writes 16 MiB while its other half reads the peer's 16 MiB: with a session
    // lock held across blocking socket I/O this would deadlock once both socket buffers fill.
    const TOTAL: usize = 16 << 20;
    let run = |stream: TlsStream, seed: u8| {
        let mut reader = stream.try_clone().unwrap();
        let mut writer = stream;
        let sender = thread::spawn(move || {
            let block: Vec<u8> = (0..65536).map(|i| (i as u8).wrapping_add(seed)).collect();
            for _ in 0..TOTAL / block.len() {
                writer.write_all(&block).unwrap();
            }
            writer
        });
        let receiver = thread::spawn(move || {
            let mut got = 0usize;
            let mut buf = vec![0u8; 40000];
            let peer_seed = seed ^ 1;
            while got < TOTAL {
                let n = reader.read(&mut buf).unwrap();
                assert!(n > 0, "early end after {got}");
                for (i, b) in buf[..n].iter().enumerate() {
                    assert_eq!(*b, (((got + i) % 65536) as u8).wrapping_add(peer_seed));
                }
                got += n;
            }
            got
        });
        (sender, receiver)
    };
    let (s1, r1) = run(server, 0);
    let (s2, r2) = run(client, 1);
    assert_eq!(r1.join().unwrap(), TOTAL);
    assert_eq!(r2.join().unwrap(), TOTAL);
    let _ = s1.join().unwrap();
    let _ = s2.join().unwrap();
}

/// A message written in many pieces at once (more than a session buffers before it must
/// send) arrives whole and in order.
#[test]
fn a_write_in_pieces_arrives_whole() {
    let ca = new_ca("ca");
    let dir = make_dir("pieces", &ca, &ca, &["localhost"], false);
    let (server, client) = pair(&dir, &dir, "localhost");
    let (mut server, mut client) = (server.unwrap(), client.unwrap());
    let message: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    let pieces: Vec<&[u8]> = {
        let (mut rest, mut size, mut pieces) = (&message[..], 1usize, Vec::new());
        while !rest.is_empty() {
            let (piece, after) = rest.split_at(size.min(rest.len()));
            pieces.push(piece);
            rest = after;
            size = size * 7 % 1500 + 1;
        }
        pieces
    };
    let expected = message.clone();
    let reader = thread::spawn(move || {
        let mut got = vec![0u8; expected.len()];
        server.read_exact(&mut got).unwrap();
        assert!(got == expected, "the message arrived changed");
    });
    let mut slices: Vec<IoSlice> = pieces.iter().map(|p| IoSlice::new(p)).collect();
    let mut slices = &mut slices[..];
    let mut calls = 0;
    while !slices.is_empty() {
        let n = client.write_vectored(slices).unwrap();
        assert!(n > 0);
        IoSlice::advance_slices(&mut slices, n);
        calls += 1;
    }
    assert!(
        calls < pieces.len() / 10,
        "{calls} calls for {} pieces",
        pieces.len()
    );
    reader.join().unwrap();
}

#[test]
fn a_clean_close_reads_as_end_of_stream_and_shutdown_wakes_a_reader() {
    let ca = new_ca("ca");
    let dir = make_dir("close", &ca, &ca, &["localhost"], false);
    let (server, client) = pair(&dir, &dir, "localhost");
    let (server, mut client) = (server.unwrap(), client.unwrap());
    let mut reader = server.try_clone().unwrap();
    let blocked = thread::spawn(move || {
        let mut buf = [0u8; 16];
        let mut seen = Vec::new();
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => return seen,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    });
    client.write_all(b"hello").unwrap();
    thread::sleep(Duration::from_millis(100));
    server.shutdown().unwrap();
    assert_eq!(blocked.join().unwrap(), b"hello");
}

#[test]
fn a_client_from_another_ca_is_refused() {
    let ca = new_ca("ca");
    let other = new_ca("other");
    let server_dir = make_dir("srv", &ca, &ca, &["127.0.0.1"], false);
    // The client trusts our CA but its own certificate comes from another one.
    let client_dir = make_dir("cli", &other, &ca, &["127.0.0.1"], false);
    let (server, client) = pair(&server_dir, &client_dir, "127.0.0.1");
    let server_error = server.err().expect("listener must refuse").to_string();
    assert!(
        server_error.contains("does not chain to our CA"),
        "{server_error}"
    );
    let client_error = first_read_error(client);
    assert!(
        client_error.contains("refused our certificate"),
        "{client_error}"
    );
}

#[test]
fn a_listener_from_another_ca_is_refused() {
    let ca = new_ca("ca");
    let other = new_ca("other");
    let server_dir = make_dir("srv2", &other, &ca, &["127.0.0.1"], false);
    let client_dir = make_dir("cli2", &ca, &ca, &["127.0.0.1"], false);
    let (_server, client) = pair(&server_dir, &client_dir, "127.0.0.1");
    let error = client.err().expect("dialler must refuse").to_string();
    assert!(error.contains("does not chain to our CA"), "{error}");
}

#[test]
fn a_listener_certificate_for_another_host_is_refused() {
    let ca = new_ca("ca");
    let dir = make_dir("name", &ca, &ca, &["10.200.0.9", "backup.example"], false);
    let (_server, client) = pair(&dir, &dir, "127.0.0.1");
    let error = client
        .err()
        .expect("wrong name must be refused")
        .to_string();
    assert!(error.contains("does not name the host"), "{error}");
}

#[test]
fn an_expired_certificate_is_refused() {
    let ca = new_ca("ca");
    let dir = make_dir("expired", &ca, &ca, &["127.0.0.1"], true);
    let (_server, client) = pair(&dir, &dir, "127.0.0.1");
    let error = client.err().expect("expired must be refused").to_string();
    assert!(error.contains("expired"), "{error}");
}

#[test]
fn plaintext_against_tls_and_the_reverse_fail_clearly() {
    let ca = new_ca("ca");
    let dir = make_dir("plain", &ca, &ca, &["127.0.0.1"], false);
    let creds = TlsCredentials::load(&dir).unwrap();

    // A plaintext peer (say, an old sender) against a TLS listener.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let plain = thread::spawn(move || {
        let mut tcp = TcpStream::connect(addr).unwrap();
        let _ = tcp.write_all(b"{\"hello\":1}\n some plaintext frame that is not TLS at all\n");
        thread::sleep(Duration::from_millis(300));
    });
    let (tcp, _) = listener.accept().unwrap();
    let error = creds
        .accept(tcp, SHORT)
        .err()
        .expect("plaintext refused")
        .to_string();
    assert!(error.contains("does not speak TLS"), "{error}");
    plain.join().unwrap();

    // A TLS dialler against a plaintext listener that answers in plaintext.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let plain = thread::spawn(move || {
        let (mut tcp, _) = listener.accept().unwrap();
        let mut buf = [0u8; 512];
        let _ = tcp.read(&mut buf);
        let _ = tcp.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    let tcp = TcpStream::connect(addr).unwrap();
    let error = creds
        .connect(tcp, "127.0.0.1", SHORT)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        error.contains("does not speak TLS") || error.contains("closed the connection"),
        "{error}"
    );
    plain.join().unwrap();

    // A TLS dialler against a listener that says nothing: the handshake times out.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let error = creds
        .connect(tcp, "127.0.0.1", Duration::from_millis(300))
        .err()
        .expect("silence refused")
        .to_string();
    assert!(error.contains("no TLS answer in time"), "{error}");
}

#[test]
fn missing_or_broken_files_are_named() {
    let ca = new_ca("ca");
    let dir = make_dir("files", &ca, &ca, &["127.0.0.1"], false);
    std::fs::remove_file(dir.join(CLIENT_KEY)).unwrap();
    let error = TlsCredentials::load(&dir).err().unwrap().to_string();
    assert!(error.contains(CLIENT_KEY), "{error}");

    std::fs::write(dir.join(CLIENT_KEY), "not a key").unwrap();
    let error = TlsCredentials::load(&dir).err().unwrap().to_string();
    assert!(
        error.contains(CLIENT_KEY) && error.contains("no PEM private key"),
        "{error}"
    );

    std::fs::write(dir.join(CA_CERT), "").unwrap();
    let error = TlsCredentials::load(&dir).err().unwrap().to_string();
    assert!(error.contains(CA_CERT), "{error}");

    let error = TlsCredentials::load(Path::new("/nonexistent-dir"))
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("/nonexistent-dir/ca-cert.pem"), "{error}");
}

/// The project's `ci/make-tls-certs` (the openssl CLI) makes credentials this crate accepts,
/// naming each address given.
#[test]
fn credentials_from_the_ci_helper_work() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ci/make-tls-certs");
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!(
            "SKIP: credentials_from_the_ci_helper_work: no openssl CLI (ci/setup installs it)"
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("tls-test-{}-ci", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let made = std::process::Command::new(script)
        .arg(&dir)
        .args(["127.0.0.1", "backup.example"])
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let (server, client) = pair(&dir, &dir, "127.0.0.1");
    let (mut server, mut client) = (server.unwrap(), client.unwrap());
    client.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    server.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    let (_server, client) = pair(&dir, &dir, "localhost");
    let error = client
        .err()
        .expect("a name not in the certificate")
        .to_string();
    assert!(error.contains("does not name the host"), "{error}");
}

/// A peer that trickles one byte at a time (each within any per-read timeout) cannot hold a
/// listener's handshake past its whole deadline.
#[test]
fn a_trickling_peer_cannot_stretch_the_handshake() {
    let ca = new_ca("ca");
    let dir = make_dir("trickle", &ca, &ca, &["127.0.0.1"], false);
    let creds = TlsCredentials::load(&dir).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let trickle = thread::spawn(move || {
        let mut tcp = TcpStream::connect(addr).unwrap();
        // A handshake record header announcing 16 KiB, then a byte every 100 ms.
        let _ = tcp.write_all(&[0x16, 0x03, 0x01, 0x40, 0x00]);
        for _ in 0..30 {
            thread::sleep(Duration::from_millis(100));
            if tcp.write_all(&[0x01]).is_err() {
                return;
            }
        }
    });
    let (tcp, _) = listener.accept().unwrap();
    let started = std::time::Instant::now();
    let error = creds
        .accept(tcp, Duration::from_millis(700))
        .err()
        .expect("a trickle must fail")
        .to_string();
    let took = started.elapsed();
    assert!(error.contains("no TLS answer in time"), "{error}");
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    trickle.join().unwrap();
}
