//! An etcd cluster for the FT fencing tests: Debian's `etcd` (etcd-server) inside a network
//! namespace, clients on mutual TLS with the test CA's credentials ([`crate::tls_dir`]), members
//! talking to each other over the namespace's loopback.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{skip_or_fail, tls_dir, Error, NetNs, Result, Vmm};

/// Where Debian's etcd-server puts the server.
const ETCD: &str = "/usr/bin/etcd";
/// Set to 1 where a missing etcd must fail the test rather than skip it.
const REQUIRE_ETCD_ENV: &str = "TANDEM_REQUIRE_ETCD";

/// `true` when etcd is installed; otherwise a loud SKIP (or a panic with
/// `TANDEM_REQUIRE_ETCD=1`).
pub fn etcd_or_skip(test: &str) -> bool {
    if Path::new(ETCD).is_file() {
        return true;
    }
    let why = format!("{ETCD} is missing (ci/setup installs etcd-server)");
    if std::env::var(REQUIRE_ETCD_ENV).as_deref() == Ok("1") {
        panic!("{test}: {why}, and {REQUIRE_ETCD_ENV}=1 forbids skipping");
    }
    skip_or_fail(test, &why);
    false
}

pub struct EtcdCluster {
    pub members: Vec<Vmm>,
    /// `HOST:PORT` of each member's client URL.
    pub endpoints: Vec<String>,
}

impl EtcdCluster {
    /// Starts `size` members in `ns`, clients on `address` (ports 2379, 2389, ...), and waits
    /// until each serves clients. `election_ms` short keeps a member's death cheap.
    pub fn start(ns: &NetNs, address: &str, dir: &Path, size: usize) -> Result<EtcdCluster> {
        let tls = tls_dir();
        let file = |name: &str| -> PathBuf { tls.join(name) };
        let peer_url = |i: usize| format!("http://127.0.0.1:{}", 2380 + 10 * i);
        let initial: Vec<String> = (0..size).map(|i| format!("m{i}={}", peer_url(i))).collect();
        let initial = initial.join(",");
        let mut members = Vec::new();
        let mut endpoints = Vec::new();
        for i in 0..size {
            let client = format!("https://{address}:{}", 2379 + 10 * i);
            let data = dir.join(format!("etcd-m{i}"));
            let args: Vec<String> = vec![
                format!("--name=m{i}"),
                format!("--data-dir={}", data.display()),
                format!("--listen-client-urls={client}"),
                format!("--advertise-client-urls={client}"),
                format!("--listen-peer-urls={}", peer_url(i)),
                format!("--initial-advertise-peer-urls={}", peer_url(i)),
                format!("--initial-cluster={initial}"),
                "--initial-cluster-state=new".into(),
                "--initial-cluster-token=tandem-test".into(),
                format!("--cert-file={}", file("server-cert.pem").display()),
                format!("--key-file={}", file("server-key.pem").display()),
                format!("--trusted-ca-file={}", file("ca-cert.pem").display()),
                "--client-cert-auth".into(),
                // etcd's shortest lease is 1.5 election timeouts.
                "--heartbeat-interval=100".into(),
                "--election-timeout=1000".into(),
            ];
            let member = Vmm::builder(&format!("etcd-m{i}"))
                .program(Path::new(ETCD))
                .wrapped_in(ns.exec_prefix())
                .args(args.iter().map(String::as_str))
                .spawn()?;
            members.push(member);
            endpoints.push(format!("{address}:{}", 2379 + 10 * i));
        }
        // etcd logs to stderr.
        let deadline = Instant::now() + Duration::from_secs(60);
        for member in &mut members {
            while !member.stderr().contains("ready to serve client requests") {
                if Instant::now() >= deadline || member.poll_exit().is_some() {
                    return Err(Error(member.diagnose("etcd did not start")));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(EtcdCluster { members, endpoints })
    }

    /// `etcd://HOST:PORT,...` for `--fencing`.
    pub fn spec(&self) -> String {
        format!("etcd://{}", self.endpoints.join(","))
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) every member: etcd unreachable without a reset.
    pub fn signal_all(&self, signal: i32) {
        for member in &self.members {
            // SAFETY: kill(2) of a child process this harness started and has not reaped.
            unsafe {
                libc::kill(member.pid() as i32, signal);
            }
        }
    }
}
