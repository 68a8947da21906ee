//! What the transport tests share: test credentials from `ci/make-tls-certs` and a connected
//! pair of streams over loopback.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use transport::{Security, Stream, TlsCredentials};

/// Mutual TLS with fresh credentials for 127.0.0.1 in a directory of its own (remove it after).
pub fn credentials(name: &str) -> (Security, PathBuf) {
    let dir = std::env::temp_dir().join(format!("transport-{name}-{}", std::process::id()));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ci/make-tls-certs");
    let made = std::process::Command::new(script)
        .arg(&dir)
        .arg("127.0.0.1")
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "ci/make-tls-certs: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let tls = Security::Tls(Arc::new(TlsCredentials::load(&dir).unwrap()));
    (tls, dir)
}

/// (dialling end, accepted end).
pub fn pair(security: &Security) -> (Stream, Stream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accept_security = security.clone();
    let server = thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        accept_security
            .accept(tcp, Duration::from_secs(10))
            .unwrap()
    });
    let client = transport::dial(&addr.to_string(), security, Duration::from_secs(10)).unwrap();
    (client, server.join().unwrap())
}
