//! The fencing witness over real TCP: decision rules, races, persistence across a restart and
//! pruning, bad input, limits, a client facing an unreachable or lying witness, and mutual TLS:
//! claims from peers without a certificate of the witness's CA are never heard.
//!
//! Credentials are made by the `openssl` command into a temporary directory.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ft::witness::{
    decode_request, spawn_server, spawn_server_with_config, ClaimOutcome, Decision, Role, Security,
    WitnessClient, WitnessConfig, WitnessError, WitnessHandle, MAX_LINE,
};
use proptest::prelude::*;
use transport::{Stream, TlsCredentials};

const TIMEOUT: Duration = Duration::from_secs(5);
const DAY: u64 = 24 * 60 * 60;

// ---- credentials ----

const OPENSSL_CONFIG: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = witness-test
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,IP:::1,DNS:localhost
[client_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectAltName = DNS:client
";

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA and, signed by it, a server certificate naming 127.0.0.1, ::1 and localhost and a
/// client certificate: QEMU's x509 layout in `dir`.
fn make_credentials(dir: &Path, ca_name: &str) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("openssl.cnf"), OPENSSL_CONFIG).unwrap();
    let new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    let mut ca = vec![
        "req",
        "-x509",
        "-config",
        "openssl.cnf",
        "-extensions",
        "ca_ext",
    ];
    ca.extend(new_key);
    ca.extend(["-nodes", "-keyout", "ca-key.pem", "-out", "ca-cert.pem"]);
    let subject = format!("/CN={ca_name}");
    ca.extend(["-days", "30", "-subj", &subject]);
    openssl(dir, &ca);
    for (who, serial) in [("server", "2"), ("client", "3")] {
        let key = format!("{who}-key.pem");
        let csr = format!("{who}.csr");
        let cert = format!("{who}-cert.pem");
        let extensions = format!("{who}_ext");
        let subject = format!("/CN={who}");
        let mut req = vec!["req", "-new", "-config", "openssl.cnf"];
        req.extend(new_key);
        req.extend(["-nodes", "-keyout", &key, "-out", &csr, "-subj", &subject]);
        openssl(dir, &req);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-set_serial",
                serial,
                "-days",
                "30",
                "-extfile",
                "openssl.cnf",
                "-extensions",
                &extensions,
                "-out",
                &cert,
            ],
        );
    }
}

struct Pki {
    /// The witness's and its legitimate claimants' credentials.
    good: Security,
    /// Everything from another CA: trusts only that CA, and has a certificate from it.
    rogue: Security,
    /// Trusts the witness's CA but holds a client certificate from the other CA.
    impostor: Security,
}

fn load(dir: &Path) -> Security {
    Security::Tls(Arc::new(TlsCredentials::load(dir).unwrap()))
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("ft-witness-pki-{}", std::process::id()));
        let good = root.join("good");
        let rogue = root.join("rogue");
        make_credentials(&good, "witness-ca");
        make_credentials(&rogue, "rogue-ca");
        let impostor = root.join("impostor");
        std::fs::create_dir_all(&impostor).unwrap();
        std::fs::copy(good.join("ca-cert.pem"), impostor.join("ca-cert.pem")).unwrap();
        for file in [
            "server-cert.pem",
            "server-key.pem",
            "client-cert.pem",
            "client-key.pem",
        ] {
            std::fs::copy(rogue.join(file), impostor.join(file)).unwrap();
        }
        Pki {
            good: load(&good),
            rogue: load(&rogue),
            impostor: load(&impostor),
        }
    })
}

fn tls() -> Security {
    pki().good.clone()
}

// ---- servers and clients ----

fn local_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").unwrap()
}

/// A witness speaking mutual TLS, decisions in memory.
fn server() -> WitnessHandle {
    spawn_server(local_listener(), tls(), None).unwrap()
}

fn server_with(config: WitnessConfig) -> WitnessHandle {
    spawn_server_with_config(local_listener(), tls(), None, config).unwrap()
}

/// A plaintext witness, for the tests of the line protocol itself (half-closes, `busy`).
fn plain_server() -> WitnessHandle {
    spawn_server(local_listener(), Security::InsecurePlaintext, None).unwrap()
}

fn client(handle: &WitnessHandle) -> WitnessClient {
    WitnessClient::new(handle.local_addr().to_string(), TIMEOUT, tls())
}

fn plain_client(handle: &WitnessHandle) -> WitnessClient {
    WitnessClient::new(
        handle.local_addr().to_string(),
        TIMEOUT,
        Security::InsecurePlaintext,
    )
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ft-witness-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Sends raw bytes on a fresh plain TCP connection, closes the sending side, and returns
/// everything the witness answers until it closes.
fn raw_exchange(handle: &WitnessHandle, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(handle.local_addr()).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    // A TLS witness drops a peer as soon as its bytes are not a handshake, so these may fail
    // with a reset; the answer (if any) is what matters.
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(Shutdown::Write);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// Sends raw bytes inside an authenticated TLS session and returns everything the witness
/// answers until it closes.
fn tls_raw_exchange(handle: &WitnessHandle, bytes: &[u8]) -> String {
    let mut stream = transport::dial(&handle.local_addr().to_string(), &tls(), TIMEOUT).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.write_all(bytes).unwrap();
    let mut answer = Vec::new();
    // The witness closes without a TLS close_notify: the end shows as an error after the data.
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// An authenticated connection that proved (by a full exchange) it holds a slot.
fn held_tls_connection(handle: &WitnessHandle) -> Stream {
    let mut stream = transport::dial(&handle.local_addr().to_string(), &tls(), TIMEOUT).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.write_all(b"{\"status\":{\"pair_id\":1}}\n").unwrap();
    let mut line = String::new();
    BufReader::new(&mut stream).read_line(&mut line).unwrap();
    assert!(line.starts_with("{\"pair_id\":1"), "{line}");
    stream
}

/// A plain connection that proved (by a full exchange) it holds a slot.
fn held_plain_connection(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"{\"status\":{\"pair_id\":1}}\n").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    assert!(line.starts_with("{\"pair_id\":1"), "{line}");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s
}

/// Retries `claim` until it succeeds (a slot coming back) or the timeout passes.
fn claim_eventually(c: &WitnessClient, pair_id: u64, role: Role) -> ClaimOutcome {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match c.claim(pair_id, role, 1, "eventually") {
            Ok(outcome) => return outcome,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("{e}"),
        }
    }
}

// ---- decisions ----

#[test]
fn first_claim_wins_retry_granted_other_denied() {
    let handle = server();
    let client = client(&handle);
    assert_eq!(client.status(1).unwrap(), None);

    let first = client.claim(1, Role::Backup, 17, "host-b").unwrap();
    assert_eq!(
        first,
        ClaimOutcome {
            granted: true,
            winner: Role::Backup,
            epoch: 17
        }
    );
    // A retry (e.g. after a lost answer) is granted and reports the first decision.
    assert_eq!(client.claim(1, Role::Backup, 18, "host-b").unwrap(), first);
    let denied = client.claim(1, Role::Primary, 20, "host-a").unwrap();
    assert_eq!(
        denied,
        ClaimOutcome {
            granted: false,
            winner: Role::Backup,
            epoch: 17
        }
    );
    let decision = Decision {
        winner: Role::Backup,
        epoch: 17,
        claimant: "host-b".to_owned(),
    };
    assert_eq!(client.status(1).unwrap(), Some(decision.clone()));
    assert_eq!(handle.decision(1), Some(decision));
    handle.stop();
}

#[test]
fn pairs_are_independent() {
    let handle = server();
    let client = client(&handle);
    assert!(client.claim(10, Role::Primary, 1, "a").unwrap().granted);
    assert!(client.claim(11, Role::Backup, 2, "b").unwrap().granted);
    assert!(!client.claim(10, Role::Backup, 3, "b").unwrap().granted);
    assert!(!client.claim(11, Role::Primary, 4, "a").unwrap().granted);
    assert!(
        client
            .claim(u64::MAX, Role::Backup, u64::MAX, "")
            .unwrap()
            .granted
    );
    assert_eq!(client.status(12).unwrap(), None);
}

#[test]
fn concurrent_claims_have_exactly_one_winner() {
    let handle = server();
    for pair_id in 0..50u64 {
        let barrier = Arc::new(Barrier::new(2));
        let racers: Vec<_> = [Role::Primary, Role::Backup]
            .into_iter()
            .map(|role| {
                let client = client(&handle);
                let barrier = Arc::clone(&barrier);
                thread::spawn(move || {
                    barrier.wait();
                    (
                        role,
                        client.claim(pair_id, role, pair_id, &role.to_string()),
                    )
                })
            })
            .collect();
        let results: Vec<(Role, ClaimOutcome)> = racers
            .into_iter()
            .map(|t| {
                let (role, outcome) = t.join().unwrap();
                (role, outcome.unwrap())
            })
            .collect();
        let winners: Vec<Role> = results
            .iter()
            .filter(|(_, o)| o.granted)
            .map(|(role, _)| *role)
            .collect();
        assert_eq!(winners.len(), 1, "pair {pair_id}: {results:?}");
        // Both were told the same winner.
        assert!(results.iter().all(|(_, o)| o.winner == winners[0]));
        assert_eq!(handle.decision(pair_id).unwrap().winner, winners[0]);
    }
}

#[test]
fn many_concurrent_claimants_agree() {
    // All from 127.0.0.1 at once: within the default per-address cap.
    let claimants = ft::witness::DEFAULT_MAX_CONNECTIONS_PER_IP;
    let handle = server();
    let barrier = Arc::new(Barrier::new(claimants));
    let threads: Vec<_> = (0..claimants as u64)
        .map(|i| {
            let client = client(&handle);
            let barrier = Arc::clone(&barrier);
            let role = if i % 2 == 0 {
                Role::Primary
            } else {
                Role::Backup
            };
            thread::spawn(move || {
                barrier.wait();
                (role, client.claim(99, role, i, &format!("c{i}")).unwrap())
            })
        })
        .collect();
    let results: Vec<(Role, ClaimOutcome)> =
        threads.into_iter().map(|t| t.join().unwrap()).collect();
    let winner = results[0].1.winner;
    for (role, outcome) in &results {
        assert_eq!(outcome.winner, winner);
        assert_eq!(outcome.granted, *role == winner);
    }
}

// ---- persistence and pruning ----

#[test]
fn decisions_survive_a_restart() {
    let dir = temp_dir("restart");
    let state = dir.join("witness.json");
    let handle = spawn_server(local_listener(), tls(), Some(state.clone())).unwrap();
    let c = client(&handle);
    assert!(c.claim(1, Role::Primary, 5, "host-a").unwrap().granted);
    assert!(c.claim(2, Role::Backup, 6, "host-b").unwrap().granted);
    handle.stop();
    assert!(state.exists());

    let handle = spawn_server(local_listener(), tls(), Some(state.clone())).unwrap();
    let c = client(&handle);
    let denied = c.claim(1, Role::Backup, 9, "host-b").unwrap();
    assert_eq!(
        denied,
        ClaimOutcome {
            granted: false,
            winner: Role::Primary,
            epoch: 5
        }
    );
    assert!(c.claim(2, Role::Backup, 7, "host-b").unwrap().granted);
    assert!(!c.claim(2, Role::Primary, 7, "host-a").unwrap().granted);
    // New decisions after the restart are kept too.
    assert!(c.claim(3, Role::Backup, 1, "host-b").unwrap().granted);
    drop(handle);

    let handle = spawn_server(local_listener(), tls(), Some(state.clone())).unwrap();
    assert_eq!(handle.decision(3).unwrap().winner, Role::Backup);
    assert_eq!(handle.decision(1).unwrap().claimant, "host-a");
    drop(handle);

    // Each decision carries its time on disk.
    let on_disk: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    let now = unix_now();
    for entry in on_disk["decisions"].as_array().unwrap() {
        let at = entry["decided_at"].as_u64().unwrap();
        assert!(at <= now && at + 60 > now, "{entry}");
    }

    // A state file that cannot be read stops the witness from starting empty.
    std::fs::write(&state, b"{\"version\":2,\"decisions\":[").unwrap();
    let err = spawn_server(local_listener(), tls(), Some(state))
        .err()
        .expect("a corrupt state file must be refused");
    assert!(err.to_string().contains("cannot parse"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn old_decisions_are_pruned_fresh_ones_survive_a_restart() {
    let dir = temp_dir("prune");
    let state = dir.join("witness.json");
    let now = unix_now();
    let old = now - 40 * DAY;
    let fresh = now - DAY;
    std::fs::write(
        &state,
        format!(
            r#"{{"version":2,"decisions":[
            {{"pair_id":1,"winner":"backup","epoch":3,"claimant":"old","decided_at":{old}}},
            {{"pair_id":2,"winner":"backup","epoch":4,"claimant":"fresh","decided_at":{fresh}}}]}}"#
        ),
    )
    .unwrap();

    // The default retention (30 days) drops the 40-day-old decision at load.
    let handle = spawn_server(local_listener(), tls(), Some(state.clone())).unwrap();
    assert_eq!(handle.decision(1), None);
    assert_eq!(handle.decision(2).unwrap().claimant, "fresh");
    let on_disk = std::fs::read_to_string(&state).unwrap();
    assert!(!on_disk.contains("\"old\""), "{on_disk}");
    assert!(on_disk.contains("\"fresh\""), "{on_disk}");
    drop(handle);

    // The fresh one survives a restart, still deciding its pair.
    let handle = spawn_server(local_listener(), tls(), Some(state.clone())).unwrap();
    let c = client(&handle);
    assert!(!c.claim(2, Role::Primary, 9, "host-a").unwrap().granted);
    assert_eq!(handle.decision(2).unwrap().claimant, "fresh");
    drop(handle);

    // No retention keeps an old decision.
    std::fs::write(
        &state,
        format!(
            r#"{{"version":2,"decisions":[
            {{"pair_id":5,"winner":"primary","epoch":1,"claimant":"ancient","decided_at":{}}}]}}"#,
            now - 4000 * DAY
        ),
    )
    .unwrap();
    let config = WitnessConfig {
        retention: None,
        ..WitnessConfig::default()
    };
    let handle =
        spawn_server_with_config(local_listener(), tls(), Some(state.clone()), config).unwrap();
    assert_eq!(handle.decision(5).unwrap().claimant, "ancient");
    drop(handle);

    // A version 1 file (no times) still loads and is kept.
    std::fs::write(
        &state,
        r#"{"version":1,"decisions":[{"pair_id":6,"winner":"backup","epoch":1,"claimant":"v1"}]}"#,
    )
    .unwrap();
    let handle = spawn_server(local_listener(), tls(), Some(state.clone())).unwrap();
    assert_eq!(handle.decision(6).unwrap().claimant, "v1");
    drop(handle);
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- mutual TLS ----

#[test]
fn unauthenticated_claims_are_refused_and_the_witness_serves_on() {
    let handle = server();
    let addr = handle.local_addr().to_string();
    let pair = 42;

    // A plain TCP peer sending a perfectly valid claim: never parsed, never answered.
    let claim = format!(
        "{{\"claim\":{{\"pair_id\":{pair},\"role\":\"backup\",\"epoch\":1,\"claimant\":\"mallory\"}}}}\n"
    );
    let answer = raw_exchange(&handle, claim.as_bytes());
    assert!(!answer.contains("granted"), "{answer:?}");
    assert_eq!(handle.decision(pair), None);

    // The same through the witness client in plaintext: refused as well.
    let plain = WitnessClient::new(addr.clone(), TIMEOUT, Security::InsecurePlaintext);
    assert!(plain.claim(pair, Role::Backup, 1, "mallory").is_err());
    assert_eq!(handle.decision(pair), None);

    // A TLS client that trusts the witness but whose certificate comes from another CA.
    let impostor = WitnessClient::new(addr.clone(), TIMEOUT, pki().impostor.clone());
    let err = impostor
        .claim(pair, Role::Backup, 1, "mallory")
        .unwrap_err();
    assert_eq!(handle.decision(pair), None, "{err}");

    // The legitimate side still reaches the witness and wins the pair.
    let c = client(&handle);
    let outcome = c.claim(pair, Role::Primary, 7, "host-a").unwrap();
    assert_eq!(
        outcome,
        ClaimOutcome {
            granted: true,
            winner: Role::Primary,
            epoch: 7
        }
    );
    assert_eq!(handle.decision(pair).unwrap().claimant, "host-a");
    // And the impostor, trying again, learns nothing and changes nothing.
    assert!(impostor.claim(pair, Role::Backup, 2, "mallory").is_err());
    assert_eq!(handle.decision(pair).unwrap().winner, Role::Primary);
}

#[test]
fn a_client_refuses_a_witness_its_ca_did_not_vouch_for() {
    let handle = server();
    let port = handle.local_addr().port();
    let rogue = WitnessClient::new(format!("127.0.0.1:{port}"), TIMEOUT, pki().rogue.clone());
    match rogue.claim(1, Role::Primary, 1, "a") {
        Err(WitnessError::Tls { reason, .. }) => {
            assert!(reason.contains("does not chain to our CA"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(handle.decision(1), None);
    // The legitimate credentials work, by address or by a name the certificate carries.
    let by_name = WitnessClient::new(format!("localhost:{port}"), TIMEOUT, tls());
    assert!(by_name.claim(1, Role::Primary, 1, "a").unwrap().granted);
}

#[test]
fn a_client_refuses_a_witness_certificate_for_another_name() {
    // 127.0.0.2 reaches the same loopback listener, but the certificate does not name it.
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = spawn_server(listener, tls(), None).unwrap();
    let c = WitnessClient::new(format!("127.0.0.2:{port}"), TIMEOUT, tls());
    match c.claim(1, Role::Primary, 1, "a") {
        Err(WitnessError::Tls { reason, .. }) => {
            assert!(reason.contains("does not name"), "{reason}")
        }
        // Some sandboxes route only 127.0.0.1.
        Err(WitnessError::Connect { .. } | WitnessError::Timeout { .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(handle.decision(1), None);
}

#[test]
fn a_slow_handshaker_does_not_stall_other_claimants() {
    let handle = server_with(WitnessConfig {
        connection_timeout: Duration::from_secs(2),
        ..WitnessConfig::default()
    });
    // Connected, and silent: its handshake never starts.
    let mut silent = TcpStream::connect(handle.local_addr()).unwrap();
    silent.set_read_timeout(Some(TIMEOUT)).unwrap();
    let start = Instant::now();
    let c = client(&handle);
    assert!(c.claim(1, Role::Backup, 1, "b").unwrap().granted);
    // Served well before the silent peer's handshake times out.
    let served = start.elapsed();
    assert!(served < Duration::from_millis(1500), "{served:?}");
    // The silent peer is dropped at the connection timeout.
    let mut rest = Vec::new();
    let _ = silent.read_to_end(&mut rest);
    let dropped = start.elapsed();
    assert!(dropped >= Duration::from_millis(1500), "{dropped:?}");
    assert!(dropped < Duration::from_secs(4), "{dropped:?}");
}

// ---- bad input ----

#[test]
fn malformed_input_is_answered_and_state_kept() {
    let handle = server();
    let c = client(&handle);
    assert!(c.claim(1, Role::Primary, 1, "a").unwrap().granted);

    let huge_line = {
        let mut v = vec![b'x'; 64 * 1024];
        v.push(b'\n');
        v
    };
    let huge_unterminated = vec![b'{'; 64 * 1024];
    let huge_claimant = format!(
        "{{\"claim\":{{\"pair_id\":2,\"role\":\"primary\",\"epoch\":1,\"claimant\":\"{}\"}}}}\n",
        "a".repeat(MAX_LINE)
    );
    let cases: Vec<&[u8]> = vec![
        b"garbage\n",
        b"\n",
        b"\x00\xff\xfe\n",
        b"{\"claim\":\n",
        b"[1,2,3]\n",
        b"{\"claim\":{\"pair_id\":\"1\",\"role\":\"backup\",\"epoch\":1,\"claimant\":\"b\"}}\n",
        b"{\"claim\":{\"pair_id\":1,\"role\":\"backup\",\"epoch\":-1,\"claimant\":\"b\"}}\n",
        b"{\"claim\":{\"pair_id\":1,\"role\":\"witness\",\"epoch\":1,\"claimant\":\"b\"}}\n",
        b"{\"claim\":{\"pair_id\":1,\"role\":\"backup\",\"epoch\":1,\"claimant\":7}}\n",
        b"{\"claim\":{\"pair_id\":1,\"role\":\"backup\",\"epoch\":1,\"claimant\":\"b\",\"force\":true}}\n",
        b"{\"claim\":{\"pair_id\":1,\"role\":\"backup\",\"epoch\":1,\"claimant\":\"b\"},\"x\":1}\n",
        b"{\"reset\":{\"pair_id\":1}}\n",
        &huge_line,
        &huge_unterminated,
        huge_claimant.as_bytes(),
    ];
    for case in cases {
        let answer = tls_raw_exchange(&handle, case);
        let mut lines = answer.lines();
        let first = lines.next().unwrap_or_default();
        let value: serde_json::Value = serde_json::from_str(first)
            .unwrap_or_else(|e| panic!("{first:?} for {:?}: {e}", String::from_utf8_lossy(case)));
        assert!(
            value.get("error").and_then(|e| e.as_str()).is_some(),
            "{first} for {:?}",
            String::from_utf8_lossy(&case[..case.len().min(80)])
        );
        // The connection is closed after the error.
        assert_eq!(lines.next(), None, "{answer}");
    }

    // Still serving, decision unchanged, and nothing recorded for the rejected claims.
    assert!(!c.claim(1, Role::Backup, 2, "b").unwrap().granted);
    assert_eq!(handle.decision(1).unwrap().winner, Role::Primary);
    assert_eq!(c.status(2).unwrap(), None);
}

#[test]
fn one_connection_carries_several_requests() {
    // Plaintext: the last line is ended by a half-close, which a TLS session here cannot do.
    let handle = plain_server();
    let answer = raw_exchange(
        &handle,
        b"{\"claim\":{\"pair_id\":4,\"role\":\"primary\",\"epoch\":8,\"claimant\":\"a\"}}\r\n\
          {\"claim\":{\"pair_id\":4,\"role\":\"backup\",\"epoch\":9,\"claimant\":\"b\"}}\n\
          {\"status\":{\"pair_id\":4}}",
    );
    let lines: Vec<&str> = answer.lines().collect();
    assert_eq!(
        lines,
        [
            r#"{"granted":true,"winner":"primary","epoch":8}"#,
            r#"{"granted":false,"winner":"primary","epoch":8}"#,
            r#"{"pair_id":4,"decision":{"winner":"primary","epoch":8,"claimant":"a"}}"#,
        ]
    );
    // The same over TLS, each line terminated.
    let handle = server();
    let answer = tls_raw_exchange(
        &handle,
        b"{\"claim\":{\"pair_id\":4,\"role\":\"backup\",\"epoch\":8,\"claimant\":\"b\"}}\r\n\
          {\"status\":{\"pair_id\":4}}\n\
          garbage\n",
    );
    let lines: Vec<&str> = answer.lines().collect();
    assert_eq!(lines.len(), 3, "{answer}");
    assert_eq!(lines[0], r#"{"granted":true,"winner":"backup","epoch":8}"#);
    assert!(lines[2].starts_with(r#"{"error":"malformed request"#));
}

#[test]
fn idle_connections_are_closed() {
    let handle = server_with(WitnessConfig {
        connection_timeout: Duration::from_millis(200),
        ..WitnessConfig::default()
    });
    let mut stream = transport::dial(&handle.local_addr().to_string(), &tls(), TIMEOUT).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    // A partial line that never ends.
    stream.write_all(b"{\"status\":").unwrap();
    let start = Instant::now();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(client(&handle).status(1).unwrap().is_none());
}

// ---- limits ----

#[test]
fn connections_over_the_cap_are_refused_busy() {
    let config = WitnessConfig {
        max_connections: 2,
        ..WitnessConfig::default()
    };
    let handle =
        spawn_server_with_config(local_listener(), Security::InsecurePlaintext, None, config)
            .unwrap();
    let addr = handle.local_addr().to_string();
    let c = plain_client(&handle);
    let held: Vec<TcpStream> = (0..2).map(|_| held_plain_connection(&addr)).collect();
    match c.claim(1, Role::Primary, 1, "a") {
        Err(WitnessError::Server { message, .. }) => assert_eq!(message, "busy"),
        other => panic!("{other:?}"),
    }
    drop(held);
    // The slots come back once those connections end.
    assert!(claim_eventually(&c, 1, Role::Primary).granted);
}

#[test]
fn over_tls_connections_over_the_cap_are_closed() {
    let handle = server_with(WitnessConfig {
        max_connections: 2,
        ..WitnessConfig::default()
    });
    let c = client(&handle);
    let held: Vec<Stream> = (0..2).map(|_| held_tls_connection(&handle)).collect();
    // Closed before any handshake: an error (fenced), and nothing recorded.
    match c.claim(1, Role::Primary, 1, "a") {
        Err(WitnessError::Tls { .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(handle.decision(1), None);
    drop(held);
    assert!(claim_eventually(&c, 1, Role::Primary).granted);
}

#[test]
fn one_address_cannot_take_every_slot() {
    let config = WitnessConfig {
        max_connections: 4,
        max_connections_per_ip: 2,
        ..WitnessConfig::default()
    };
    // Dual stack when the host has IPv6: 127.0.0.1 and ::1 are then two sources.
    let (listener, dual_stack) = match TcpListener::bind("[::]:0") {
        Ok(l) => (l, true),
        Err(_) => (local_listener(), false),
    };
    let port = listener.local_addr().unwrap().port();
    let handle =
        spawn_server_with_config(listener, Security::InsecurePlaintext, None, config).unwrap();
    let v4 = format!("127.0.0.1:{port}");
    let held: Vec<TcpStream> = (0..2).map(|_| held_plain_connection(&v4)).collect();
    let c = WitnessClient::new(v4.clone(), TIMEOUT, Security::InsecurePlaintext);
    match c.claim(1, Role::Primary, 1, "a") {
        Err(WitnessError::Server { message, .. }) => assert_eq!(message, "busy"),
        other => panic!("{other:?}"),
    }
    assert_eq!(handle.decision(1), None);
    if dual_stack {
        // Another address still gets in, although the server as a whole has room for only 2
        // more connections.
        let v6 = WitnessClient::new(
            format!("[::1]:{port}"),
            TIMEOUT,
            Security::InsecurePlaintext,
        );
        match v6.claim(1, Role::Backup, 1, "b") {
            Ok(outcome) => assert!(outcome.granted),
            // No IPv6 loopback after all.
            Err(WitnessError::Connect { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    drop(held);
    // The address gets its slots back when its connections end.
    let outcome = claim_eventually(&c, 1, Role::Primary);
    assert_eq!(
        outcome.granted,
        handle.decision(1).unwrap().winner == Role::Primary
    );
}

// ---- a client facing a witness it cannot trust ----

#[test]
fn unreachable_witness_is_an_error_within_the_timeout() {
    // Nothing listens: refused at once.
    let addr = {
        let l = local_listener();
        l.local_addr().unwrap()
    };
    let c = WitnessClient::new(addr.to_string(), Duration::from_millis(500), tls());
    let start = Instant::now();
    assert!(matches!(
        c.claim(1, Role::Backup, 1, "b"),
        Err(WitnessError::Connect { .. } | WitnessError::Timeout { .. })
    ));
    assert!(start.elapsed() < Duration::from_secs(2));

    // Something accepts (the kernel's backlog) but never answers: a TLS client's handshake
    // and a plaintext client's read both give up within the claim's timeout.
    let silent = local_listener();
    let silent_addr = silent.local_addr().unwrap().to_string();
    for security in [tls(), Security::InsecurePlaintext] {
        let c = WitnessClient::new(silent_addr.clone(), Duration::from_millis(300), security);
        let start = Instant::now();
        match c.claim(1, Role::Backup, 1, "b") {
            Err(WitnessError::Timeout { .. } | WitnessError::Tls { .. }) => {}
            other => panic!("{other:?}"),
        }
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(250), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    }

    // An address that does not parse or resolve.
    let c = WitnessClient::new("not an address", Duration::from_millis(300), tls());
    assert!(c.claim(1, Role::Backup, 1, "b").is_err());
}

/// A fake plaintext witness answering every connection with `answer`.
fn fake_witness(answer: &'static str) -> (String, thread::JoinHandle<()>) {
    let listener = local_listener();
    let addr = listener.local_addr().unwrap().to_string();
    let thread = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        // Whatever arrives first (a request line, or a TLS client's hello), then the answer.
        let mut request = [0u8; 4096];
        let _ = stream.read(&mut request).unwrap();
        stream.write_all(answer.as_bytes()).unwrap();
    });
    (addr, thread)
}

/// Whether an error is the expected kind.
type ErrorCheck = fn(&WitnessError) -> bool;

#[test]
fn client_rejects_bad_answers() {
    let cases: [(&'static str, ErrorCheck); 5] = [
        (
            "{\"granted\":true,\"winner\":\"backup\",\"epoch\":1}\n",
            |e| matches!(e, WitnessError::Inconsistent { .. }),
        ),
        (
            "{\"granted\":false,\"winner\":\"primary\",\"epoch\":1}\n",
            |e| matches!(e, WitnessError::Inconsistent { .. }),
        ),
        (
            "{\"error\":\"disk full\"}\n",
            |e| matches!(e, WitnessError::Server { message, .. } if message == "disk full"),
        ),
        ("not json\n", |e| matches!(e, WitnessError::Decode { .. })),
        ("", |e| matches!(e, WitnessError::Closed { .. })),
    ];
    for (answer, expected) in cases {
        let (addr, thread) = fake_witness(answer);
        let err = WitnessClient::new(addr, TIMEOUT, Security::InsecurePlaintext)
            .claim(1, Role::Primary, 1, "a")
            .unwrap_err();
        assert!(expected(&err), "{answer:?}: {err:?}");
        thread.join().unwrap();
    }
}

#[test]
fn a_tls_client_refuses_a_plaintext_witness() {
    let (addr, thread) = fake_witness("{\"granted\":true,\"winner\":\"primary\",\"epoch\":1}\n");
    let err = WitnessClient::new(addr, TIMEOUT, tls())
        .claim(1, Role::Primary, 1, "a")
        .unwrap_err();
    assert!(matches!(err, WitnessError::Tls { .. }), "{err:?}");
    thread.join().unwrap();
}

#[test]
fn oversized_claimant_fails_before_sending() {
    let handle = server();
    let err = client(&handle)
        .claim(1, Role::Primary, 1, &"a".repeat(MAX_LINE))
        .unwrap_err();
    assert!(
        matches!(err, WitnessError::RequestTooLong { .. }),
        "{err:?}"
    );
    assert_eq!(handle.decision(1), None);
}

proptest! {
    #[test]
    fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..6000)) {
        let _ = decode_request(&bytes);
    }

    #[test]
    fn decoder_never_panics_on_near_requests(
        pair in any::<i128>(),
        role in "[a-z_\"]{0,10}",
        epoch in any::<f64>(),
        claimant in "\\PC{0,20}",
        cut in 0usize..120,
    ) {
        let line = format!(
            "{{\"claim\":{{\"pair_id\":{pair},\"role\":\"{role}\",\"epoch\":{epoch},\"claimant\":\"{claimant}\"}}}}"
        );
        let _ = decode_request(line.as_bytes());
        let _ = decode_request(&line.as_bytes()[..cut.min(line.len())]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn server_survives_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..10_000)) {
        // Random bytes in place of a TLS handshake.
        let handle = server();
        let c = client(&handle);
        prop_assert!(c.claim(1, Role::Backup, 3, "b").unwrap().granted);
        let _ = raw_exchange(&handle, &bytes);
        prop_assert_eq!(handle.decision(1).map(|d| d.winner), Some(Role::Backup));
        prop_assert!(!c.claim(1, Role::Primary, 4, "a").unwrap().granted);

        // Random bytes as request lines.
        let handle = plain_server();
        let c = plain_client(&handle);
        prop_assert!(c.claim(1, Role::Backup, 3, "b").unwrap().granted);
        let _ = raw_exchange(&handle, &bytes);
        prop_assert_eq!(handle.decision(1).map(|d| d.winner), Some(Role::Backup));
        prop_assert!(!c.claim(1, Role::Primary, 4, "a").unwrap().granted);
    }
}
