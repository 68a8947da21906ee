//! Helpers for the fault-tolerance tests: `ft-status` polling, the sequence-checking client of
//! the guest's `workload=ft` service, a witness process, and a small seeded random source.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{ch_remote, vmm_binary, NetNs, Vmm, CLIENT_NET};

/// The guest's address in the FT tests and its control service.
pub const GUEST_SERVICE: &str = "192.168.249.2:7000";
/// Where the witness of the FT tests listens (in the client namespace).
pub fn witness_addr() -> String {
    format!("{CLIENT_NET}:7200")
}

/// One round with the guest's echo service (`workload=net`, TCP 7): 2000 bytes out, the same
/// bytes back.
pub fn echo_round(stream: &mut TcpStream, round: u32) -> Result<(), String> {
    let data: Vec<u8> = (0..2000u32)
        .map(|i| (i.wrapping_mul(7).wrapping_add(round)) as u8)
        .collect();
    stream
        .write_all(&data)
        .map_err(|e| format!("round {round}: write: {e}"))?;
    let mut back = vec![0u8; data.len()];
    stream
        .read_exact(&mut back)
        .map_err(|e| format!("round {round}: read: {e}"))?;
    if back != data {
        return Err(format!("round {round}: echoed bytes differ"));
    }
    Ok(())
}

/// `receive-ft URL` with what the backup's own operator names: its image for each disk, its
/// TAP for each interface, and the witness (the primary's are never used by a backup).
pub fn receive_ft_args(
    url: &str,
    disks: &[&str],
    taps: &[&str],
    witness: Option<&str>,
) -> Vec<String> {
    let mut args = vec!["receive-ft".to_string(), url.to_string()];
    for disk in disks {
        args.extend(["--disk-path".to_string(), disk.to_string()]);
    }
    for tap in taps {
        args.extend(["--tap".to_string(), tap.to_string()]);
    }
    if let Some(witness) = witness {
        args.extend(["--witness".to_string(), witness.to_string()]);
    }
    args
}

pub fn ft_status(socket: &Path) -> serde_json::Value {
    let out = ch_remote(socket, &["ft-status"], None);
    if !out.status.success() {
        return serde_json::Value::Null;
    }
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Polls `ft-status` until `field` is one of `want`; returns that status or an error with the
/// last one seen.
pub fn wait_status(
    socket: &Path,
    field: &str,
    want: &[&str],
    timeout: Duration,
) -> Result<serde_json::Value, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = ft_status(socket);
        if want.iter().any(|w| status[field] == *w) {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            return Err(format!("ft-status {field} never became {want:?}: {status}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A connection to the guest's `workload=ft` control service that checks every `seq` reply:
/// each must be exactly one more than the previous one (a gap means an acknowledged request
/// was lost, a repeat means output from a rolled-back state reached the client).
pub struct SeqClient {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    pub last: u64,
}

impl SeqClient {
    pub fn connect(client: &NetNs) -> Result<Self, String> {
        Self::connect_to(client, GUEST_SERVICE)
    }

    /// Connects to the service at `addr` (`IP:PORT`).
    pub fn connect_to(client: &NetNs, addr: &str) -> Result<Self, String> {
        let addr: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
        let stream = client
            .run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(10)))
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("connect to the guest: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
        Ok(Self {
            writer: stream,
            reader,
            last: 0,
        })
    }

    /// Sends one command line and returns the reply line.
    pub fn command(&mut self, cmd: &str) -> Result<String, String> {
        self.writer
            .write_all(format!("{cmd}\n").as_bytes())
            .map_err(|e| format!("{cmd}: write: {e}"))?;
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| format!("{cmd}: read: {e}"))?;
        if n == 0 {
            return Err(format!("{cmd}: the guest closed the connection"));
        }
        Ok(line.trim_end().to_string())
    }

    /// One request; checks the sequence.
    pub fn req(&mut self) -> Result<u64, String> {
        let reply = self.command("req")?;
        let seq: u64 = reply
            .strip_prefix("seq ")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("bad reply to req: {reply:?}"))?;
        self.check_seq(seq)
    }

    /// One request the guest relays to the same service on `peer` (another VM); checks the
    /// peer's sequence as seen through this guest.
    pub fn relay(&mut self, peer: &str) -> Result<u64, String> {
        let reply = self.command(&format!("relay {peer}"))?;
        let seq: u64 = reply
            .strip_prefix(&format!("relay {peer} seq "))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("bad reply to relay: {reply:?}"))?;
        self.check_seq(seq)
    }

    fn check_seq(&mut self, seq: u64) -> Result<u64, String> {
        if self.last != 0 && seq != self.last + 1 {
            return Err(format!(
                "sequence broken: {} then {seq} (a {} )",
                self.last,
                if seq <= self.last {
                    "repeat: output from a rolled-back state"
                } else {
                    "gap: a request was lost"
                }
            ));
        }
        self.last = seq;
        Ok(seq)
    }
}

/// A client issuing requests back to back in a thread, checking every reply.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub seq: Arc<AtomicU64>,
    error: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<SeqClient>>,
}

impl Load {
    pub fn start(client: SeqClient) -> Self {
        Self::start_with(client, SeqClient::req)
    }

    /// Like [`Load::start`] with another sequence-checked request (e.g. a relay).
    pub fn start_with(
        mut client: SeqClient,
        mut request: impl FnMut(&mut SeqClient) -> Result<u64, String> + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seq = Arc::new(AtomicU64::new(client.last));
        let error = Arc::new(Mutex::new(None));
        let (s, q, e) = (stop.clone(), seq.clone(), error.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match request(&mut client) {
                    Ok(n) => q.store(n, Ordering::SeqCst),
                    Err(err) => {
                        *e.lock().unwrap_or_else(|p| p.into_inner()) = Some(err);
                        break;
                    }
                }
            }
            client
        });
        Self {
            stop,
            seq,
            error,
            thread: Some(thread),
        }
    }

    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until the sequence passes its current value by `more` (the guest answers).
    pub fn wait_progress(&self, more: u64, timeout: Duration) -> Result<u64, String> {
        let target = self.seq.load(Ordering::SeqCst) + more;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.error() {
                return Err(e);
            }
            let now = self.seq.load(Ordering::SeqCst);
            if now >= target {
                return Ok(now);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no progress: seq stuck at {now}, waiting for {target}"
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn stop(mut self) -> Result<SeqClient, String> {
        self.stop.store(true, Ordering::SeqCst);
        let client = self
            .thread
            .take()
            .ok_or("load already stopped")?
            .join()
            .map_err(|_| "load thread panicked".to_string())?;
        match self.error() {
            Some(e) => Err(e),
            None => Ok(client),
        }
    }
}

/// Starts `tandem-witness` inside `ns` on [`witness_addr`].
pub fn start_witness(ns: &NetNs) -> Vmm {
    let bin = vmm_binary()
        .expect("VMM binary")
        .with_file_name("tandem-witness");
    let addr = witness_addr();
    let mut witness = Vmm::builder("witness")
        .program(&bin)
        .wrapped_in(ns.exec_prefix())
        .args([
            "--listen",
            addr.as_str(),
            "-v",
            "--no-state-file",
            "--tls-dir",
        ])
        .args([crate::tls_dir().to_string_lossy()])
        .spawn()
        .expect("start the witness");
    witness
        .wait_for("listening on", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("witness: {e}"));
    witness
}

/// xorshift64*: a reproducible random source for the fault schedules.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `TANDEM_FT_SEED` when set, else from the clock; the seed is printed so a
    /// failing schedule can be replayed.
    pub fn from_env() -> Self {
        let seed = std::env::var("TANDEM_FT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("fault schedule seed: TANDEM_FT_SEED={seed}");
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// The FT events (source `vm`, name `ft-...`) on an event monitor: name and properties.
pub fn ft_events(path: &Path) -> Vec<(String, serde_json::Value)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    serde_json::Deserializer::from_str(&text)
        .into_iter::<serde_json::Value>()
        .map_while(Result::ok)
        .filter(|e| e["source"] == "vm")
        .filter_map(|e| {
            let name = e["event"].as_str()?.to_string();
            name.starts_with("ft-")
                .then(|| (name, e["properties"].clone()))
        })
        .collect()
}

/// Waits for `event` on the monitor at `path` (events are written by the monitor's own
/// thread, a moment after they happen); returns the FT events then.
pub fn wait_for_event(
    path: &Path,
    event: &str,
    timeout: Duration,
) -> Vec<(String, serde_json::Value)> {
    let deadline = Instant::now() + timeout;
    loop {
        let events = ft_events(path);
        if events.iter().any(|(e, _)| e == event) {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "no {event} event; FT events so far: {events:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
