//! The fencing witness over real TCP: decision rules, races, persistence across a restart, bad
//! input, limits, and a client facing an unreachable or lying witness.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use ft::witness::{
    decode_request, spawn_server, spawn_server_with_config, ClaimOutcome, Decision, Role,
    WitnessClient, WitnessConfig, WitnessError, WitnessHandle, MAX_LINE,
};
use proptest::prelude::*;

const TIMEOUT: Duration = Duration::from_secs(5);

fn server() -> WitnessHandle {
    spawn_server(TcpListener::bind("127.0.0.1:0").unwrap(), None).unwrap()
}

fn client(handle: &WitnessHandle) -> WitnessClient {
    WitnessClient::new(handle.local_addr().to_string(), TIMEOUT)
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ft-witness-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Sends raw bytes on a fresh connection, closes the sending side, and returns everything the
/// witness answers until it closes.
fn raw_exchange(handle: &WitnessHandle, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(handle.local_addr()).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.write_all(bytes).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

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
    let handle = server();
    let barrier = Arc::new(Barrier::new(16));
    let threads: Vec<_> = (0..16)
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

#[test]
fn decisions_survive_a_restart() {
    let dir = temp_dir("restart");
    let state = dir.join("witness.json");
    let handle = spawn_server(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        Some(state.clone()),
    )
    .unwrap();
    let c = client(&handle);
    assert!(c.claim(1, Role::Primary, 5, "host-a").unwrap().granted);
    assert!(c.claim(2, Role::Backup, 6, "host-b").unwrap().granted);
    handle.stop();
    assert!(state.exists());

    let handle = spawn_server(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        Some(state.clone()),
    )
    .unwrap();
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

    let handle = spawn_server(
        TcpListener::bind("127.0.0.1:0").unwrap(),
        Some(state.clone()),
    )
    .unwrap();
    assert_eq!(handle.decision(3).unwrap().winner, Role::Backup);
    assert_eq!(handle.decision(1).unwrap().claimant, "host-a");
    drop(handle);

    // A state file that cannot be read stops the witness from starting empty.
    std::fs::write(&state, b"{\"version\":1,\"decisions\":[").unwrap();
    let err = spawn_server(TcpListener::bind("127.0.0.1:0").unwrap(), Some(state))
        .err()
        .expect("a corrupt state file must be refused");
    assert!(err.to_string().contains("cannot parse"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

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
        let answer = raw_exchange(&handle, case);
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
    let handle = server();
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
}

#[test]
fn idle_connections_are_closed() {
    let config = WitnessConfig {
        connection_timeout: Duration::from_millis(200),
        ..WitnessConfig::default()
    };
    let handle =
        spawn_server_with_config(TcpListener::bind("127.0.0.1:0").unwrap(), None, config).unwrap();
    let mut stream = TcpStream::connect(handle.local_addr()).unwrap();
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

#[test]
fn connections_over_the_cap_are_refused_busy() {
    let config = WitnessConfig {
        max_connections: 2,
        ..WitnessConfig::default()
    };
    let handle =
        spawn_server_with_config(TcpListener::bind("127.0.0.1:0").unwrap(), None, config).unwrap();
    let c = client(&handle);
    let held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(handle.local_addr()).unwrap();
            // A full exchange proves the connection holds a slot.
            s.write_all(b"{\"status\":{\"pair_id\":1}}\n").unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            s
        })
        .collect();
    match c.claim(1, Role::Primary, 1, "a") {
        Err(WitnessError::Server { message, .. }) => assert_eq!(message, "busy"),
        other => panic!("{other:?}"),
    }
    drop(held);
    // The slots come back once those connections end.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match c.claim(1, Role::Primary, 1, "a") {
            Ok(outcome) => {
                assert!(outcome.granted);
                break;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn unreachable_witness_is_an_error_within_the_timeout() {
    // Nothing listens: refused at once.
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let c = WitnessClient::new(addr.to_string(), Duration::from_millis(500));
    let start = Instant::now();
    assert!(matches!(
        c.claim(1, Role::Backup, 1, "b"),
        Err(WitnessError::Connect { .. } | WitnessError::Timeout { .. })
    ));
    assert!(start.elapsed() < Duration::from_secs(2));

    // Something accepts (the kernel's backlog) but never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = WitnessClient::new(
        silent.local_addr().unwrap().to_string(),
        Duration::from_millis(300),
    );
    let start = Instant::now();
    match c.claim(1, Role::Backup, 1, "b") {
        Err(WitnessError::Timeout { .. }) => {}
        other => panic!("{other:?}"),
    }
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(250), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");

    // An address that does not parse or resolve.
    let c = WitnessClient::new("not an address", Duration::from_millis(300));
    assert!(c.claim(1, Role::Backup, 1, "b").is_err());
}

/// A fake witness answering every connection with `answer`.
fn fake_witness(answer: &'static str) -> (String, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let thread = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
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
        let err = WitnessClient::new(addr, TIMEOUT)
            .claim(1, Role::Primary, 1, "a")
            .unwrap_err();
        assert!(expected(&err), "{answer:?}: {err:?}");
        thread.join().unwrap();
    }
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
        let handle = server();
        let c = client(&handle);
        prop_assert!(c.claim(1, Role::Backup, 3, "b").unwrap().granted);
        let _ = raw_exchange(&handle, &bytes);
        prop_assert_eq!(handle.decision(1).map(|d| d.winner), Some(Role::Backup));
        prop_assert!(!c.claim(1, Role::Primary, 4, "a").unwrap().granted);
    }
}
