//! Shared-disk fault tolerance end to end: the guest reads back its own writes at once, while
//! the primary holds those writes until their epoch commits.
//!
//! A protected pair (primary on host A, backup on host B, one shared image) runs the test
//! guest's `workload=ft`. A client in a third namespace has it run many `rw` rounds (write
//! records naming the round to a few sectors, read them straight back), pipelined in batches
//! so that rounds overwrite sectors that earlier rounds wrote and that are still held. Every
//! round must read what it wrote. Then, once nothing is held any more, the image must hold
//! the newest record of every sector the rounds wrote.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use integration::ft::{ft_status, wait_status};
use integration::{
    api_vmm, ch_remote, guest_vm_args, kvm_serial_guard, marker_fields, report, require_kvm,
    require_netns, test_guest, two_hosts, NetNs, TempDir, Vmm, HOST_B,
};

const TIMEOUT: Duration = Duration::from_secs(90);
const GUEST_MAC: &str = "12:34:56:78:9a:bc";
const GUEST_SERVICE: &str = "192.168.249.2:7000";
const FT_PORT: u16 = 7100;
/// Rounds in all, and rounds sent at once (answered in one go, mostly within one epoch).
const ROUNDS: u64 = 600;
const BATCH: u64 = 6;

/// The guest's `rw` region (see `guest/src/ft.rs`): sectors RW_BASE..RW_BASE + RW_SPAN.
const RW_BASE: u64 = 2048;
const RW_SPAN: u64 = 256;
const SECTOR: usize = 512;
const MAGIC: u64 = u64::from_le_bytes(*b"TANDEMFT");

/// Sectors written by round `k`: 1 to 24, varying so that rounds overlap in different ways.
fn sectors_of(k: u64) -> u64 {
    1 + (k * 7) % 24
}

/// The first sector round `k` of `n` sectors writes (the guest's formula).
fn lba_of(k: u64, n: u64) -> u64 {
    RW_BASE + (k * 5) % (RW_SPAN + 1 - n)
}

/// A control connection to the guest's service, from the client namespace.
struct Control {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Control {
    fn connect(client: &NetNs) -> Result<Self, String> {
        let addr: std::net::SocketAddr = GUEST_SERVICE.parse().map_err(|e| format!("{e}"))?;
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
        })
    }

    /// Sends all `cmds` at once, then reads one reply line per command.
    fn pipeline(&mut self, cmds: &[String]) -> Result<Vec<String>, String> {
        let text: String = cmds.iter().map(|c| format!("{c}\n")).collect();
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| format!("send: {e}"))?;
        let mut replies = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .map_err(|e| format!("{cmd}: read: {e}"))?;
            if n == 0 {
                return Err(format!("{cmd}: the guest closed the connection"));
            }
            replies.push(line.trim_end().to_string());
        }
        Ok(replies)
    }
}

/// Every sector of the `rw` region holds the record of the last round that wrote it (or is
/// still zero when none did).
fn verify_region(image: &[u8], rounds: u64, run: u64) -> Result<(), String> {
    let mut owner = vec![0u64; RW_SPAN as usize];
    for k in 1..=rounds {
        let n = sectors_of(k);
        let at = (lba_of(k, n) - RW_BASE) as usize;
        owner[at..at + n as usize].fill(k);
    }
    for (i, &k) in owner.iter().enumerate() {
        let lba = RW_BASE as usize + i;
        let bytes = image
            .get(lba * SECTOR..(lba + 1) * SECTOR)
            .ok_or_else(|| format!("image too short for sector {lba}"))?;
        let word = |j: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[j * 8..j * 8 + 8]);
            u64::from_le_bytes(w)
        };
        if k == 0 {
            if bytes.iter().any(|&b| b != 0) {
                return Err(format!("sector {lba}: written, but no round wrote it"));
            }
            continue;
        }
        let got = (word(0), word(1), word(2), word(4));
        if got != (MAGIC, lba as u64, k, run) {
            return Err(format!(
                "sector {lba}: want round {k}'s record, got magic {:#x} lba {} round {} run {:#x}",
                got.0, got.1, got.2, got.3
            ));
        }
    }
    Ok(())
}

fn ok(out: std::process::Output, what: &str, nodes: &[&Vmm]) {
    assert!(
        out.status.success(),
        "{what}: {}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout),
        nodes
            .iter()
            .map(|n| n.diagnose(what))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn guest_reads_its_own_held_writes_under_shared_disk_ft() {
    require_kvm!();
    require_netns!();
    let _boot = kvm_serial_guard();
    let hosts = two_hosts("sdr");
    let dir = TempDir::new("ft_shared_disk_reads").expect("temp dir");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 8 << 20]).expect("image");
    let kernel = test_guest().expect("guest").display().to_string();
    let disk = format!("path={}", image.display());
    let net = format!("tap=tapvm,mac={GUEST_MAC}");
    let (sock_a, sock_b) = (dir.join("a.sock"), dir.join("b.sock"));
    let args = guest_vm_args(
        &kernel,
        "workload=ft net.ip=192.168.249.2/24 ft.dirty_mib=4",
        "size=64M",
        &net,
        &["-v", "--disk", &disk],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut primary = api_vmm(TIMEOUT, "sdr_primary", &hosts.a, &sock_a, &args);
    let ready = primary
        .wait_for("ft: ready", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let fields = marker_fields(&ready.line);
    assert_eq!(fields["disk"], "1", "{}", ready.line);
    let run = u64::from_str_radix(&fields["run"], 16).expect("run id in hex");

    let backup = api_vmm(TIMEOUT, "sdr_backup", &hosts.b, &sock_b, &["-v"]);
    let url = format!("tcp:{HOST_B}:{FT_PORT}");
    // The backup's operator names the shared image as this host reaches it, and its TAP.
    let image_path = image.display().to_string();
    let out = ch_remote(
        &sock_b,
        &[
            "receive-ft",
            &url,
            "--disk-path",
            &image_path,
            "--tap",
            "tapvm",
        ],
        None,
    );
    ok(out, "receive-ft", &[&backup]);
    let peer = format!("{HOST_B}:{FT_PORT}");
    let enable = [
        "enable-ft",
        "--peer",
        peer.as_str(),
        "--disk-mode",
        "shared",
        "--heartbeat-timeout-ms",
        "2000",
    ];
    let out = ch_remote(&sock_a, &enable, None);
    ok(out, "enable-ft", &[&primary, &backup]);
    let status = wait_status(&sock_a, "health", &["protected"], TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", primary.diagnose("protection")));
    assert_eq!(status["disk_mode"], "shared", "{status}");
    // Every thread of both sides of a protected pair runs under its seccomp filter.
    integration::assert_every_thread_filtered(primary.pid(), "protected primary");
    integration::assert_every_thread_filtered(backup.pid(), "backup");
    let epoch0 = status["last_committed_epoch"].as_u64().unwrap_or(0);

    let mut control = Control::connect(&hosts.client).unwrap_or_else(|e| panic!("{e}"));
    // Malformed rounds are refused and use up no round number.
    let bad: Vec<String> = ["rw", "rw 0", "rw 999", "rwx 1"]
        .iter()
        .map(|c| c.to_string())
        .collect();
    let replies = control.pipeline(&bad).unwrap_or_else(|e| panic!("{e}"));
    let want = [
        "bad rw count",
        "bad rw count",
        "bad rw count",
        "bad unknown command",
    ];
    assert_eq!(replies, want, "{bad:?}");

    let started = Instant::now();
    let mut k = 0;
    while k < ROUNDS {
        let cmds: Vec<String> = (k + 1..=k + BATCH)
            .map(|r| format!("rw {}", sectors_of(r)))
            .collect();
        let replies = control
            .pipeline(&cmds)
            .unwrap_or_else(|e| panic!("{e}\n{}", primary.diagnose("rw rounds")));
        for reply in replies {
            k += 1;
            let n = sectors_of(k);
            let want = format!("rw {k} ok lba={} sectors={n}", lba_of(k, n));
            assert_eq!(
                reply, want,
                "round {k}: the guest did not read back what it had just written"
            );
        }
    }
    let elapsed = started.elapsed();
    let check = control
        .pipeline(&["check".to_string()])
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(check[0].starts_with("ok "), "check: {check:?}");

    // The replies left only as their epochs committed; the rounds must have spanned many.
    let status = ft_status(&sock_a);
    assert_eq!(status["health"], "protected", "{status}");
    let epochs = status["last_committed_epoch"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(epoch0);
    assert!(epochs >= ROUNDS / BATCH, "{epochs} epochs: {status}");

    // Once nothing is held, the image has every round's data, newest on top.
    let deadline = Instant::now() + TIMEOUT;
    while ft_status(&sock_a)["held_disk_writes"] != 0 {
        assert!(Instant::now() < deadline, "disk writes stay held");
        std::thread::sleep(Duration::from_millis(20));
    }
    let data = std::fs::read(&image).expect("read the image");
    verify_region(&data, ROUNDS, run).unwrap_or_else(|e| panic!("{e}"));
    report(&format!(
        "ft_shared_disk_reads: {ROUNDS} read-your-writes rounds in batches of {BATCH} over \
         {epochs} epochs in {elapsed:?}, every read saw the held writes"
    ));
}
