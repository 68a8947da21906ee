//! The test guest's `workload=ft` (the service the fault-tolerance tests and benchmarks run
//! against), without FT: booted with a disk and a TAP inside a network namespace, driven by
//! Linux's TCP stack from that namespace. Checks the request sequence numbers, the guest's own
//! memory and disk self-check, the sink's byte count, ping, the sector records in the image
//! file, and that `poweroff` ends the VMM with exit code 0. A second test boots two such guests
//! on one bridge and has the first relay requests to the second (`relay A.B.C.D`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use integration::{
    kvm_serial_guard, marker_fields, report, require_kvm, require_netns, test_guest, Found, NetNs,
    TempDir, Vmm,
};

const GUEST_IP: &str = "192.168.249.2";
const TIMEOUT: Duration = Duration::from_secs(120);
const SECTOR: usize = 512;
/// Records live in sectors 0..2048 (guest/src/ft.rs).
const SLOTS: u64 = 2048;
const MAGIC: u64 = u64::from_le_bytes(*b"TANDEMFT");

fn addr(port: u16) -> SocketAddr {
    addr_of(GUEST_IP, port)
}

fn addr_of(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().expect("address")
}

/// A line-protocol client of the control port (7000).
struct Control {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Control {
    fn connect() -> Result<Control, String> {
        Control::connect_to(GUEST_IP)
    }

    fn connect_to(ip: &str) -> Result<Control, String> {
        let s = TcpStream::connect_timeout(&addr_of(ip, 7000), Duration::from_secs(10))
            .map_err(|e| format!("connect {ip}:7000: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let writer = s.try_clone().map_err(|e| e.to_string())?;
        Ok(Control {
            reader: BufReader::new(s),
            writer,
        })
    }

    fn send(&mut self, text: &str) -> Result<(), String> {
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| format!("send {text:?}: {e}"))
    }

    fn line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("connection closed".into()),
            Ok(_) if line.ends_with('\n') => Ok(line.trim_end_matches('\n').to_string()),
            Ok(_) => Err(format!("unterminated line {line:?}")),
            Err(e) => Err(format!("read: {e}")),
        }
    }

    fn ask(&mut self, cmd: &str) -> Result<String, String> {
        self.send(&format!("{cmd}\n"))?;
        self.line().map_err(|e| format!("{cmd}: {e}"))
    }

    /// After the guest closed: nothing more than end of file.
    fn expect_eof(&mut self) -> Result<(), String> {
        let mut rest = String::new();
        self.reader
            .read_to_string(&mut rest)
            .map_err(|e| format!("read to end: {e}"))?;
        if rest.is_empty() {
            Ok(())
        } else {
            Err(format!("unexpected data before end of file: {rest:?}"))
        }
    }
}

fn expect_seq(reply: &str, want: u64) -> Result<(), String> {
    if reply == format!("seq {want}") {
        Ok(())
    } else {
        Err(format!("expected `seq {want}`, got {reply:?}"))
    }
}

/// `work <w> dirtied <d> seq <n> uptime_ms <ms> ...` -> (w, d, n, ms). The guest only ever
/// appends fields (now `relays <r> relay_errors <e>`), so later ones are not looked at here.
fn parse_stats(line: &str) -> Result<(u64, u64, u64, u64), String> {
    let f: Vec<&str> = line.split(' ').collect();
    let num = |i: usize| -> Result<u64, String> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("bad stats line {line:?}"))
    };
    if f.len() < 8 || f[0] != "work" || f[2] != "dirtied" || f[4] != "seq" || f[6] != "uptime_ms" {
        return Err(format!("bad stats line {line:?}"));
    }
    Ok((num(1)?, num(3)?, num(5)?, num(7)?))
}

/// The value of the `stats` field `name` (`... name <value> ...`).
fn stats_field(line: &str, name: &str) -> Result<u64, String> {
    let f: Vec<&str> = line.split(' ').collect();
    f.iter()
        .position(|&w| w == name)
        .and_then(|i| f.get(i + 1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no `{name}` in stats line {line:?}"))
}

/// Sends `bytes` to the sink (7001), half-closes and returns its reply.
fn sink(bytes: usize) -> Result<(String, f64), String> {
    let mut s = TcpStream::connect_timeout(&addr(7001), Duration::from_secs(10))
        .map_err(|e| format!("connect 7001: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let chunk = vec![0xa5u8; 64 << 10];
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        let n = chunk.len().min(bytes - sent);
        s.write_all(&chunk[..n])
            .map_err(|e| format!("sink send after {sent}: {e}"))?;
        sent += n;
    }
    s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .map_err(|e| format!("sink reply: {e}"))?;
    Ok((reply, bytes as f64 / start.elapsed().as_secs_f64() / 1e6))
}

fn fnv_words(w: &[u64; 64]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, &x) in w.iter().enumerate() {
        if i != 3 {
            h = (h ^ x).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The image holds the record of every request of the last 2048: sector `s % 2048` names
/// sequence number `s`, this boot's run id, and its checksum matches.
fn verify_records(image: &[u8], seq: u64, run: u64) {
    for s in seq.saturating_sub(SLOTS - 1).max(1)..=seq {
        let lba = (s % SLOTS) as usize;
        let bytes = &image[lba * SECTOR..(lba + 1) * SECTOR];
        let w: [u64; 64] = std::array::from_fn(|i| {
            u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
        });
        assert_eq!(w[0], MAGIC, "sector {lba}: magic");
        assert_eq!(w[1], lba as u64, "sector {lba}: sector number");
        assert_eq!(w[2], s, "sector {lba}: sequence number");
        assert_eq!(w[3], fnv_words(&w), "sector {lba}: checksum");
        assert_eq!(w[4], run, "sector {lba}: run id");
    }
}

/// The client side, run inside the namespace. Returns the last sequence number and a summary.
fn exercise() -> Result<(u64, String), String> {
    let mut c = Control::connect()?;
    for n in 1..=5 {
        expect_seq(&c.ask("req")?, n)?;
    }
    let check = c.ask("check")?;
    if check != "ok seq=5 pages=2048 disk=1" {
        return Err(format!("check after 5 requests: {check:?}"));
    }
    let (work0, _, seq, _) = parse_stats(&c.ask("stats")?)?;
    if seq != 5 {
        return Err(format!("stats says seq {seq}"));
    }
    let bad = c.ask("frobnicate")?;
    if bad != "bad unknown command" {
        return Err(format!("unknown command answered {bad:?}"));
    }
    c.send("quit\n")?;
    c.expect_eof()?;

    // A second connection: 2100 pipelined requests (the records wrap around the 2048
    // sectors), answered in order with no gap and no repeat; `\r\n` endings work too.
    let mut c = Control::connect()?;
    const PIPELINED: u64 = 2100;
    let start = Instant::now();
    c.send(&"req\r\n".repeat(PIPELINED as usize))?;
    for n in 6..6 + PIPELINED {
        expect_seq(&c.line()?, n)?;
    }
    let per_req = start.elapsed() / PIPELINED as u32;
    let last = 5 + PIPELINED;
    let check = c.ask("check")?;
    if check != format!("ok seq={last} pages=2048 disk=1") {
        return Err(format!("check after {last} requests: {check:?}"));
    }

    // The sink counts and hashes exactly what was sent (20 MB of 0xa5).
    const SINK_BYTES: usize = 20_000_000;
    let (got, mbps) = sink(SINK_BYTES)?;
    let mut fnv = 0xcbf2_9ce4_8422_2325u64;
    for _ in 0..SINK_BYTES {
        fnv = (fnv ^ 0xa5).wrapping_mul(0x0000_0100_0000_01b3);
    }
    if got != format!("got {SINK_BYTES} fnv {fnv:016x}\n") {
        return Err(format!("sink replied {got:?}"));
    }

    // Time went on, the compute loop ran and the region was being rewritten.
    let (work1, dirtied, seq, uptime_ms) = parse_stats(&c.ask("stats")?)?;
    if seq != last || work1 <= work0 || dirtied == 0 || uptime_ms == 0 {
        return Err(format!(
            "stats: work {work0} -> {work1}, dirtied {dirtied}, seq {seq}, uptime_ms {uptime_ms}"
        ));
    }
    let check = c.ask("check")?;
    if check != format!("ok seq={last} pages=2048 disk=1") {
        return Err(format!("final check: {check:?}"));
    }
    let bye = c.ask("poweroff")?;
    if bye != "bye" {
        return Err(format!("poweroff answered {bye:?}"));
    }
    c.expect_eof()?;
    let summary = format!(
        "{last} requests, pipelined {per_req:?} per request; sink {mbps:.0} MB/s; \
         work {:.0} M/s, dirtied {dirtied} pages in {uptime_ms} ms",
        work1 as f64 / uptime_ms as f64 / 1e3
    );
    Ok((last, summary))
}

#[test]
fn ft_workload_serves_requests_checks_itself_and_powers_off() {
    require_kvm!();
    require_netns!();
    let _boot = kvm_serial_guard();
    let dir = TempDir::new("ft_workload").expect("temp dir");
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create image");
    let ns = NetNs::new("ftw").expect("create a namespace");
    let guest = test_guest().expect("build the test guest");
    let disk = format!("path={},id=disk0", image.display());
    let mut vmm = Vmm::builder("ft_workload")
        .wrapped_in(ns.exec_prefix())
        .kernel(&guest)
        .cmdline(&format!(
            "workload=ft net.ip={GUEST_IP}/24 ft.dirty_rate=2000 ft.dirty_mib=8"
        ))
        .memory("512M")
        .serial_tty()
        .args(["--disk", disk.as_str()])
        .args(["--net", "ip=192.168.249.1,mask=255.255.255.0"])
        .spawn()
        .expect("start the VMM");
    let ready = vmm
        .wait_for("ft: ready", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let fields = marker_fields(&ready.line);
    assert_eq!(fields["ip"], GUEST_IP, "{}", ready.line);
    assert_eq!(fields["disk"], "1", "{}", ready.line);
    assert_eq!(fields["pages"], "2048", "{}", ready.line);
    assert_eq!(fields["dirty_rate"], "2000", "{}", ready.line);
    let run = u64::from_str_radix(&fields["run"], 16).expect("run id in hex");

    let ping = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "ping",
            "-c",
            "3",
            "-W",
            "5",
            GUEST_IP,
        ])
        .output()
        .expect("run ping");
    assert!(
        ping.status.success(),
        "ping failed: {}\n{}",
        String::from_utf8_lossy(&ping.stdout),
        vmm.diagnose("ping")
    );

    let (last, summary) = match ns.run(exercise).expect("run in the namespace") {
        Ok(x) => x,
        Err(e) => panic!("{e}\n{}", vmm.diagnose("ft workload check failed")),
    };
    let status = vmm
        .wait_exit(Duration::from_secs(60))
        .expect("the VMM exits after poweroff");
    assert_eq!(status.code(), Some(0), "{}", vmm.diagnose("VMM exit code"));
    let console = vmm.console();
    assert!(
        console.contains(&format!("ft: poweroff seq={last} ")),
        "{}",
        vmm.diagnose("poweroff marker")
    );
    let data = std::fs::read(&image).expect("read the image");
    verify_records(&data, last, run);
    report(&format!("ft_workload: {summary}"));
}

// ---------------------------------------------------------------------------------------------
// Two guests: `relay`
// ---------------------------------------------------------------------------------------------

/// The relaying guest and its peer, each on its own TAP of one bridge with the client.
const RELAY_A: &str = "192.168.249.21";
const RELAY_B: &str = "192.168.249.22";
/// On the subnet, but nobody has it.
const NOBODY: &str = "192.168.249.23";

fn expect_relay(reply: &str, want: u64) -> Result<(), String> {
    if reply == format!("relay {RELAY_B} seq {want}") {
        Ok(())
    } else {
        Err(format!(
            "expected `relay {RELAY_B} seq {want}`, got {reply:?}"
        ))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The client side of the relay test, run inside the namespace; returns a summary.
fn exercise_relay() -> Result<String, String> {
    let mut a = Control::connect_to(RELAY_A)?;
    let mut b = Control::connect_to(RELAY_B)?;
    let relay_b = format!("relay {RELAY_B}");

    // The first relay opens A's connection to B (ARP included), the others reuse it; B's
    // sequence goes on by one each time.
    const RELAYS: u64 = 20;
    let mut rtts = Vec::new();
    for n in 1..=RELAYS {
        let start = Instant::now();
        let reply = a.ask(&relay_b)?;
        rtts.push(start.elapsed());
        expect_relay(&reply, n)?;
    }
    let first = rtts[0];
    let mut reused = rtts[1..].to_vec();
    reused.sort();
    // A direct request to B takes the next number, and B's own clients are not disturbed.
    let start = Instant::now();
    expect_seq(&b.ask("req")?, RELAYS + 1)?;
    let direct = start.elapsed();
    expect_relay(&a.ask(&relay_b)?, RELAYS + 2)?;
    // A's own sequence is its own.
    expect_seq(&a.ask("req")?, 1)?;

    // Replies keep the order of the commands, also when pipelined behind a relay.
    a.send(&format!("{relay_b}\nreq\n{relay_b}:7000\nstats\n"))?;
    expect_relay(&a.line()?, RELAYS + 3)?;
    expect_seq(&a.line()?, 2)?;
    expect_relay(&a.line()?, RELAYS + 4)?;
    let stats = a.line()?;
    parse_stats(&stats)?;
    // B's numbers so far: RELAYS + 4, one of them taken by the direct request.
    if stats_field(&stats, "relays")? != RELAYS + 3 || stats_field(&stats, "relay_errors")? != 0 {
        return Err(format!("stats after {} relays: {stats:?}", RELAYS + 3));
    }

    // Two clients of A relaying to B at once: both answered, with the next two numbers.
    let mut a2 = Control::connect_to(RELAY_A)?;
    a.send(&format!("{relay_b}\n"))?;
    a2.send(&format!("{relay_b}\n"))?;
    let mut got = [a.line()?, a2.line()?];
    got.sort();
    let want = [RELAYS + 5, RELAYS + 6].map(|n| format!("relay {RELAY_B} seq {n}"));
    if got != want {
        return Err(format!(
            "concurrent relays answered {got:?}, expected {want:?}"
        ));
    }
    a2.send("quit\n")?;
    a2.expect_eof()?;
    let mut next = RELAYS + 7;

    // Refused at once: not an address, A itself; refused by B: no listener on 7002.
    for (cmd, want) in [
        ("relay".to_string(), "relay error missing address"),
        ("relay 192.168.249".to_string(), "relay error bad address"),
        (format!("relay {RELAY_B}:0"), "relay error bad port"),
        (
            "relay 192.168.249.255".to_string(),
            "relay error bad address",
        ),
        (format!("relay {RELAY_A}"), "relay error own address"),
        ("relay 10.1.2.3".to_string(), "relay error no route"),
        (
            format!("relay {RELAY_B}:7002"),
            "relay error connection refused",
        ),
    ] {
        let reply = a.ask(&cmd)?;
        if reply != want {
            return Err(format!("{cmd:?} answered {reply:?}, expected {want:?}"));
        }
    }
    let mut errors = 7;

    // Nobody at the address: an error within a few seconds, and the service goes on meanwhile
    // (another client of A is answered while the relay waits).
    let mut a3 = Control::connect_to(RELAY_A)?;
    let start = Instant::now();
    a.send(&format!("relay {NOBODY}\n"))?;
    let meanwhile = a3.ask("req")?;
    let meanwhile_after = start.elapsed();
    expect_seq(&meanwhile, 3)?;
    let reply = a.line()?;
    let nobody = start.elapsed();
    errors += 1;
    if !reply.starts_with("relay error ") {
        return Err(format!("relay to {NOBODY} answered {reply:?}"));
    }
    if nobody > Duration::from_secs(5) {
        return Err(format!("relay to {NOBODY} took {nobody:?}"));
    }
    if meanwhile_after >= nobody {
        return Err(format!(
            "a request on another connection took {meanwhile_after:?}, the pending relay {nobody:?}"
        ));
    }
    a3.send("quit\n")?;
    a3.expect_eof()?;
    expect_seq(&a.ask("req")?, 4)?;
    expect_relay(&a.ask(&relay_b)?, next)?;
    next += 1;
    expect_seq(&b.ask("req")?, next)?;

    let stats = a.ask("stats")?;
    let relays = stats_field(&stats, "relays")?;
    let relay_errors = stats_field(&stats, "relay_errors")?;
    // B's numbers 1..=next, two of them taken by direct requests.
    if relays != next - 2 || relay_errors != errors {
        return Err(format!(
            "stats: {stats:?}, expected relays {} relay_errors {errors}",
            next - 2
        ));
    }
    let check = a.ask("check")?;
    if !check.starts_with("ok seq=4 ") {
        return Err(format!("check on A: {check:?}"));
    }
    for (c, who) in [(&mut a, "A"), (&mut b, "B")] {
        let bye = c.ask("poweroff")?;
        if bye != "bye" {
            return Err(format!("poweroff of {who} answered {bye:?}"));
        }
        c.expect_eof()?;
    }
    Ok(format!(
        "relay round trip (client -> A -> B -> A -> client): first (connect + ARP) {:.2} ms, \
         then min {:.2} / median {:.2} / max {:.2} ms over {} relays; direct req to B {:.2} ms; \
         relay to nobody: {reply:?} after {:.0} ms",
        ms(first),
        ms(reused[0]),
        ms(reused[reused.len() / 2]),
        ms(reused[reused.len() - 1]),
        reused.len(),
        ms(direct),
        ms(nobody),
    ))
}

fn relay_guest(ns: &NetNs, name: &str, ip: &str, tap: &str, mac: &str) -> (Vmm, Found) {
    let guest = test_guest().expect("build the test guest");
    let net = format!("tap={tap},mac={mac}");
    let mut vmm = Vmm::builder(name)
        .wrapped_in(ns.exec_prefix())
        .kernel(&guest)
        .cmdline(&format!(
            "workload=ft net.ip={ip}/24 ft.dirty_rate=1000 ft.dirty_mib=4"
        ))
        .memory("256M")
        .serial_tty()
        .args(["--net", net.as_str()])
        .spawn()
        .expect("start the VMM");
    let ready = vmm
        .wait_for("ft: ready", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    (vmm, ready)
}

#[test]
fn ft_workload_relays_requests_to_another_guest() {
    require_kvm!();
    require_netns!();
    let _boot = kvm_serial_guard();
    let ns = NetNs::new("ftr").expect("create a namespace");
    let must = |r: integration::Result<()>| r.expect("network setup");
    must(ns.ip(&["link", "add", "br0", "type", "bridge"]));
    must(ns.ip(&["addr", "add", "192.168.249.1/24", "dev", "br0"]));
    must(ns.ip(&["link", "set", "br0", "up"]));
    // Short names, not prefixes of `ip` keywords.
    for tap in ["tvm1", "tvm2"] {
        must(ns.ip(&["tuntap", "add", tap, "mode", "tap", "vnet_hdr"]));
        must(ns.ip(&["link", "set", tap, "master", "br0", "up"]));
    }
    let (mut a, ready_a) = relay_guest(&ns, "ft_relay_a", RELAY_A, "tvm1", "12:34:56:78:9a:21");
    let (mut b, ready_b) = relay_guest(&ns, "ft_relay_b", RELAY_B, "tvm2", "12:34:56:78:9a:22");
    assert_eq!(
        marker_fields(&ready_a.line)["ip"],
        RELAY_A,
        "{}",
        ready_a.line
    );
    assert_eq!(
        marker_fields(&ready_b.line)["ip"],
        RELAY_B,
        "{}",
        ready_b.line
    );

    let summary = match ns.run(exercise_relay).expect("run in the namespace") {
        Ok(x) => x,
        Err(e) => panic!(
            "{e}\n{}\n{}",
            a.diagnose("relaying guest (A)"),
            b.diagnose("peer guest (B)")
        ),
    };
    for (vmm, who) in [(&mut a, "A"), (&mut b, "B")] {
        let status = vmm
            .wait_exit(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{who} exits after poweroff: {e}"));
        assert_eq!(status.code(), Some(0), "{}", vmm.diagnose(who));
    }
    report(&format!("ft_workload relay: {summary}"));
}
