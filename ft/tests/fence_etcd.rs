//! ft::etcd_fence against real etcd processes on loopback (single node, a 3-node cluster, TLS).
//! Skipped with a loud line when `etcd` is not installed, unless TANDEM_REQUIRE_ETCD=1.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ft::etcd_fence::{EtcdFenceError, EtcdFencing, LeaseHold};

const TTL: Duration = Duration::from_secs(1);

/// The etcd binary, or None (after a loud SKIP line) when it is absent and not required.
fn etcd_or_skip(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("etcd"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var("TANDEM_REQUIRE_ETCD").as_deref() == Ok("1") {
            panic!("{test}: etcd not installed but TANDEM_REQUIRE_ETCD=1 (ci/setup installs etcd-server)");
        }
        eprintln!("SKIP: {test}: etcd not installed (ci/setup installs etcd-server)");
    }
    found
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!(
            "tandem-fence-etcd-{}-{tag}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Server TLS files for etcd.
struct ServerTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// One etcd member, killed on drop.
struct Etcd {
    child: Option<Child>,
    client_port: u16,
    log: PathBuf,
}

impl Etcd {
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// From the member's own metrics (plain http only).
    fn is_leader(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.client_port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.lines().any(|l| l.trim() == "etcd_server_is_leader 1")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `n` members as one cluster; returns once every member answers.
fn start_cluster(bin: &Path, dir: &Path, n: usize, tls: Option<&ServerTls>) -> Vec<Etcd> {
    std::fs::create_dir_all(dir).unwrap();
    let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
    let initial: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
        .collect();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let token = format!("t{}-{}", std::process::id(), ports[0].0);
    let mut members = Vec::new();
    for (i, (client, peer)) in ports.iter().enumerate() {
        let data = dir.join(format!("m{i}.etcd"));
        let log = dir.join(format!("m{i}.log"));
        let client_url = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--name=m{i}"))
            .arg(format!("--data-dir={}", data.display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster={}", initial.join(",")))
            .arg("--initial-cluster-state=new")
            .arg(format!("--initial-cluster-token={token}"))
            // Short election timeout: etcd's minimum lease TTL (1.5 elections) drops to 1 s.
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(t) = tls {
            cmd.arg(format!("--cert-file={}", t.cert.display()))
                .arg(format!("--key-file={}", t.key.display()))
                .arg(format!("--trusted-ca-file={}", t.ca.display()))
                .arg("--client-cert-auth");
        }
        members.push(Etcd {
            child: Some(cmd.spawn().expect("spawn etcd")),
            client_port: *client,
            log,
        });
    }
    // Ready when each member's client port accepts and the cluster has a leader.
    let start = Instant::now();
    for m in &members {
        while TcpStream::connect(("127.0.0.1", m.client_port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "etcd did not come up; log:\n{}",
                std::fs::read_to_string(&m.log).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
    members
}

fn fencing(members: &[&Etcd], tls_dir: Option<&Path>) -> EtcdFencing {
    let spec = format!(
        "etcd://{}",
        members
            .iter()
            .map(|m| m.endpoint())
            .collect::<Vec<_>>()
            .join(",")
    );
    EtcdFencing::parse(&spec, tls_dir).unwrap().with_ttl(TTL)
}

fn wait_reachable(f: &EtcdFencing) {
    let start = Instant::now();
    loop {
        match f.check_reachable(Duration::from_millis(500)) {
            Ok(()) => return,
            Err(e) if start.elapsed() > Duration::from_secs(15) => panic!("etcd not ready: {e}"),
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Polls `hold.is_alive()` until false; the instant it turned false.
fn wait_dead(hold: &LeaseHold, limit: Duration) -> Instant {
    let start = Instant::now();
    while hold.is_alive() {
        assert!(start.elapsed() < limit, "hold still alive after {limit:?}");
        thread::sleep(Duration::from_millis(2));
    }
    Instant::now()
}

#[test]
fn single_node_hold_deny_failover() {
    let Some(bin) = etcd_or_skip("single_node_hold_deny_failover") else {
        return;
    };
    let dir = TempDir::new("single");
    let members = start_cluster(&bin, &dir.0, 1, None);
    let primary = fencing(&[&members[0]], None);
    let backup = fencing(&[&members[0]], None);
    wait_reachable(&primary);
    let pair = 0x5eed_0001;

    let hold = primary.hold_as_primary(pair, "primary-a").unwrap();
    assert!(hold.is_alive());
    assert_eq!(hold.key(), "/tandem/ft/000000005eed0001");
    hold.confirm(Duration::from_secs(1)).unwrap();
    // Renewals keep it alive well past one TTL.
    thread::sleep(TTL * 2);
    assert!(hold.is_alive(), "keepalive did not renew the lease");

    // Denied while the primary renews.
    let t = Instant::now();
    let err = backup
        .claim_as_backup(pair, "backup-b", Duration::from_millis(1500))
        .unwrap_err();
    assert!(matches!(err, EtcdFenceError::StillHeld { .. }), "{err}");
    assert!(err.to_string().contains("primary"), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "denial took {:?}",
        t.elapsed()
    );
    assert!(hold.is_alive());

    // The primary stops renewing (as if it died): the backup wins after about TTL, and only
    // after the primary's own deadline passed.
    let last_deadline = hold.valid_until().unwrap();
    let stopped = Instant::now();
    hold.stop_renewing();
    let claimer = thread::spawn(move || {
        let r = backup.claim_as_backup(pair, "backup-b", TTL + Duration::from_secs(4));
        (r, Instant::now(), backup)
    });
    let dead_at = wait_dead(&hold, TTL * 3);
    let (won, won_at, backup) = claimer.join().unwrap();
    let won = won.unwrap();
    assert!(dead_at < won_at, "primary alive until after the backup won");
    assert!(
        last_deadline < won_at,
        "backup won before the primary's deadline"
    );
    assert!(won.is_alive());
    assert!(!hold.is_alive(), "a lost hold revived");
    assert!(hold.confirm(Duration::from_secs(1)).is_err());
    println!(
        "etcd fencing failover (TTL {TTL:?}): primary stopped renewing -> backup won in {:.2?} \
         (primary's is_alive false after {:.2?})",
        won_at - stopped,
        dead_at - stopped
    );

    // Idempotent: the backup's own earlier claim is granted again, and the superseded hold
    // stops counting itself alive.
    let again = backup
        .claim_as_backup(pair, "backup-b", Duration::from_secs(2))
        .unwrap();
    assert!(again.is_alive());
    again.confirm(Duration::from_secs(1)).unwrap();
    wait_dead(&won, TTL * 2);

    // Another contender loses; the old primary gets a clear error.
    let other = fencing(&[&members[0]], None);
    let err = other
        .claim_as_backup(pair, "backup-c", Duration::from_millis(800))
        .unwrap_err();
    assert!(
        matches!(err, EtcdFenceError::StillHeld { ref claimant, .. } if claimant == "backup-b"),
        "{err}"
    );
    let err = primary.hold_as_primary(pair, "primary-a").unwrap_err();
    assert!(matches!(err, EtcdFenceError::HeldByOther { .. }), "{err}");
    assert!(err.to_string().contains("held by the backup"), "{err}");
    println!("old primary refused: {err}");

    // A clean release frees the pair at once.
    again.release().unwrap();
    let t = Instant::now();
    let fresh = other
        .claim_as_backup(pair, "backup-c", Duration::from_secs(1))
        .unwrap();
    assert!(t.elapsed() < TTL, "release did not free the key");
    drop(fresh);

    // A primary re-holding its own key (a restart) is accepted; other pairs are independent.
    let h1 = primary.hold_as_primary(pair + 1, "primary-a").unwrap();
    let h2 = primary.hold_as_primary(pair + 1, "primary-a").unwrap();
    assert!(h2.is_alive());
    wait_dead(&h1, TTL * 2);
    h2.release().unwrap();
}

/// Samples every hold handed to it (with its claimant) until told to stop: the instants at
/// which holds of more than one claimant were alive at once (the fencing's safety property is
/// that there are none; one claimant renewing onto a fresh lease briefly has two).
struct AliveWatch {
    holds: std::sync::mpsc::Sender<(String, Arc<LeaseHold>)>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: thread::JoinHandle<Vec<String>>,
}

impl AliveWatch {
    fn start() -> Self {
        let (holds, rx) = std::sync::mpsc::channel::<(String, Arc<LeaseHold>)>();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = thread::spawn(move || {
            let mut watched = Vec::new();
            let mut overlaps = Vec::new();
            while !stopped.load(Ordering::SeqCst) {
                watched.extend(rx.try_iter());
                let mut alive: Vec<&String> = watched
                    .iter()
                    .filter(|(_, h)| h.is_alive())
                    .map(|(claimant, _)| claimant)
                    .collect();
                alive.sort();
                alive.dedup();
                if alive.len() > 1 {
                    overlaps.push(format!("{alive:?}"));
                }
                thread::sleep(Duration::from_millis(1));
            }
            overlaps
        });
        AliveWatch {
            holds,
            stop,
            thread,
        }
    }

    fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

#[test]
fn three_nodes_one_winner_per_round() {
    let Some(bin) = etcd_or_skip("three_nodes_one_winner_per_round") else {
        return;
    };
    let dir = TempDir::new("cluster");
    let mut members = start_cluster(&bin, &dir.0, 3, None);
    let all: Vec<&Etcd> = members.iter().collect();
    let primary = fencing(&all, None);
    wait_reachable(&primary);
    let contenders: Vec<Arc<EtcdFencing>> = (0..3).map(|_| Arc::new(fencing(&all, None))).collect();
    drop(all);

    for round in 0..3u64 {
        let pair = 0xc1u64 << 32 | round;
        let hold = Arc::new(primary.hold_as_primary(pair, "primary").unwrap());
        hold.confirm(Duration::from_secs(2)).unwrap();
        let watch = AliveWatch::start();
        watch.holds.send(("primary".into(), hold.clone())).unwrap();
        hold.stop_renewing();
        if round == 0 {
            // Kill the leader while the lease runs out: the cluster fails over too.
            let leader = members.iter().position(|m| m.is_leader()).unwrap_or(0);
            members[leader].kill();
        }
        // A backup pair and the primary coming back all race for the key.
        let start = Instant::now();
        let handles: Vec<_> = contenders
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let f = f.clone();
                let watched = watch.holds.clone();
                let claimant = if i == 0 {
                    "primary".to_string()
                } else {
                    format!("backup-{i}")
                };
                thread::spawn(move || {
                    let r = if i == 0 {
                        // Before, around and after the lease runs out.
                        thread::sleep(TTL * [2, 1, 4][round as usize] / 2);
                        f.hold_as_primary(pair, &claimant)
                    } else {
                        f.claim_as_backup(pair, &claimant, TTL + Duration::from_secs(4))
                    };
                    let r = r.map(Arc::new);
                    if let Ok(h) = &r {
                        let _ = watched.send((claimant, h.clone()));
                    }
                    (r, Instant::now())
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let describe = || {
            results
                .iter()
                .map(|(r, t)| {
                    r.as_ref()
                        .map(|h| format!("{} after {:.2?}", h.key(), *t - start))
                        .map_err(|e| e.to_string())
                })
                .collect::<Vec<_>>()
        };
        // Everyone who won, newest last. Several may win one after another (a winner's fresh
        // lease can run out while the cluster elects a leader); never two at once.
        let mut winners: Vec<&(Result<Arc<LeaseHold>, EtcdFenceError>, Instant)> =
            results.iter().filter(|(r, _)| r.is_ok()).collect();
        winners.sort_by_key(|(_, t)| *t);
        let Some(((Ok(winner), won_at), earlier)) = winners.split_last() else {
            panic!("round {round}: nobody won: {:?}", describe());
        };
        winner.confirm(Duration::from_secs(2)).unwrap();
        assert!(!hold.is_alive(), "round {round}: old primary still alive");
        for (old, _) in earlier {
            let old = old.as_ref().unwrap();
            assert!(
                !old.is_alive() && old.confirm(Duration::from_secs(1)).is_err(),
                "round {round}: an earlier winner still holds the pair: {:?}",
                describe()
            );
        }
        let overlaps = watch.finish();
        assert!(
            overlaps.is_empty(),
            "round {round}: two live holds at once ({} samples, first: {}): {:?}",
            overlaps.len(),
            overlaps[0],
            describe()
        );
        for (r, _) in &results {
            if let Err(e) = r {
                assert!(
                    matches!(
                        e,
                        EtcdFenceError::StillHeld { .. } | EtcdFenceError::HeldByOther { .. }
                    ),
                    "round {round}: loser error {e}"
                );
            }
        }
        println!(
            "round {round}: {:?} won after {:.2?} ({} earlier winner(s) whose lease ran out first)",
            winner.role(),
            *won_at - start,
            earlier.len()
        );
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`<name>-ca-cert.pem`, `<name>-ca-key.pem`) in `dir`.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={name} test CA"),
            "-keyout",
            &format!("{name}-ca-key.pem"),
            "-out",
            &format!("{name}-ca-cert.pem"),
        ],
    );
}

/// A leaf `<name>-cert.pem` / `<name>-key.pem` signed by CA `ca`.
fn make_leaf(dir: &Path, ca: &str, name: &str, ext: &str) {
    let ext_file = format!("{name}.ext");
    std::fs::write(
        dir.join(&ext_file),
        format!("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n{ext}\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}-ca-cert.pem"),
            "-CAkey",
            &format!("{ca}-ca-key.pem"),
            "-set_serial",
            "0x1234",
            "-days",
            "1",
            "-extfile",
            &ext_file,
            "-out",
            &format!("{name}-cert.pem"),
        ],
    );
}

/// A QEMU-style x509 dir for the client.
fn client_dir(root: &Path, name: &str, ca: &str, cert: &str) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(
        root.join(format!("{ca}-ca-cert.pem")),
        d.join("ca-cert.pem"),
    )
    .unwrap();
    std::fs::copy(
        root.join(format!("{cert}-cert.pem")),
        d.join("client-cert.pem"),
    )
    .unwrap();
    std::fs::copy(
        root.join(format!("{cert}-key.pem")),
        d.join("client-key.pem"),
    )
    .unwrap();
    d
}

#[test]
fn tls_client_certificates() {
    let Some(bin) = etcd_or_skip("tls_client_certificates") else {
        return;
    };
    let dir = TempDir::new("tls");
    let root = &dir.0;
    make_ca(root, "good");
    make_ca(root, "evil");
    make_leaf(
        root,
        "good",
        "server",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth",
    );
    make_leaf(root, "good", "client", "extendedKeyUsage=clientAuth");
    make_leaf(root, "evil", "intruder", "extendedKeyUsage=clientAuth");
    let server_tls = ServerTls {
        ca: root.join("good-ca-cert.pem"),
        cert: root.join("server-cert.pem"),
        key: root.join("server-key.pem"),
    };
    let members = start_cluster(&bin, &root.join("data"), 1, Some(&server_tls));

    let good = client_dir(root, "good-client", "good", "client");
    let f = fencing(&[&members[0]], Some(&good));
    assert!(f.uses_tls());
    wait_reachable(&f);
    let hold = f.hold_as_primary(7, "tls-primary").unwrap();
    hold.confirm(Duration::from_secs(1)).unwrap();

    // A client certificate from another CA: the server refuses the handshake.
    let intruder = client_dir(root, "intruder", "good", "intruder");
    let f = fencing(&[&members[0]], Some(&intruder));
    let err = f.check_reachable(Duration::from_secs(2)).unwrap_err();
    println!("foreign client certificate: {err}");
    assert!(err.to_string().contains("client-cert.pem"), "{err}");
    let err = f
        .claim_as_backup(7, "intruder", Duration::from_secs(2))
        .unwrap_err();
    assert!(!matches!(err, EtcdFenceError::StillHeld { .. }), "{err}");

    // Trusting another CA: our side refuses the server.
    let distrust = client_dir(root, "distrust", "evil", "client");
    let f = fencing(&[&members[0]], Some(&distrust));
    let err = f.check_reachable(Duration::from_secs(2)).unwrap_err();
    println!("server from an untrusted CA: {err}");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");

    // Plain http against the TLS server fails too.
    let f = fencing(&[&members[0]], None);
    assert!(f.check_reachable(Duration::from_secs(2)).is_err());

    // A missing file is named.
    std::fs::remove_file(good.join("client-key.pem")).unwrap();
    let err =
        EtcdFencing::parse(&format!("etcd://{}", members[0].endpoint()), Some(&good)).unwrap_err();
    assert!(matches!(err, EtcdFenceError::TlsFile { .. }), "{err}");
    assert!(err.to_string().contains("client-key.pem"), "{err}");

    hold.release().unwrap();
}

#[test]
fn unreachable_endpoints_fail_fast() {
    // Needs no etcd: nothing listens on these ports.
    let ports = [free_port(), free_port()];
    let spec = format!("etcd://127.0.0.1:{},127.0.0.1:{}", ports[0], ports[1]);
    let f = EtcdFencing::parse(&spec, None).unwrap().with_ttl(TTL);

    let t = Instant::now();
    let err = f.check_reachable(Duration::from_secs(1)).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    let text = err.to_string();
    assert!(text.contains(&format!("127.0.0.1:{}", ports[1])), "{text}");
    assert!(text.contains("unreachable"), "{text}");
    println!("unreachable: {text}");

    let t = Instant::now();
    let err = f.hold_as_primary(1, "p").unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    println!("unreachable hold: {err}");

    let t = Instant::now();
    let err = f
        .claim_as_backup(1, "b", Duration::from_secs(1))
        .unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t.elapsed()
    );
    println!("unreachable claim: {err}");

    for bad in [
        "http://127.0.0.1:2379",
        "etcd://",
        "etcd://host",
        "127.0.0.1:2379",
    ] {
        let err = EtcdFencing::parse(bad, None).unwrap_err();
        assert!(err.to_string().contains("etcd://HOST:PORT"), "{bad}: {err}");
    }
}
