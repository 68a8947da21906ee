//! virtio-net end to end: the VMM creates a TAP inside a network namespace made for the test;
//! Linux's own tools and TCP/IP stack in that namespace talk to the test guest's smoltcp
//! services through our virtio-pci transport and net device.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use integration::{kvm_serial_guard, report, require_kvm, require_netns, test_guest, NetNs, Vmm};

const GUEST_IP: &str = "192.168.249.2";
const TIMEOUT: Duration = Duration::from_secs(120);

fn net_vmm(name: &str, ns: &NetNs) -> Vmm {
    let guest = test_guest().expect("build the test guest");
    let mut vmm = Vmm::builder(name)
        .wrapped_in(ns.exec_prefix())
        .kernel(&guest)
        .cmdline(&format!("workload=net net.ip={GUEST_IP}/24"))
        .memory("512M")
        .serial_tty()
        .args([
            "--net",
            "ip=192.168.249.1,mask=255.255.255.0,mac=12:34:56:78:9a:bc",
        ])
        .spawn()
        .expect("start the VMM");
    let ready = vmm
        .wait_for("NET ready", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(ready.line.contains("12:34:56:78:9a:bc"), "{}", ready.line);
    vmm
}

fn addr(port: u16) -> SocketAddr {
    format!("{GUEST_IP}:{port}").parse().expect("address")
}

fn fnv(data: &[u8], mut h: u64) -> u64 {
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

#[test]
fn guest_answers_ping_tcp_and_udp_from_a_namespace() {
    require_kvm!();
    require_netns!();
    let _boot = kvm_serial_guard();
    let ns = NetNs::new("net").expect("create a namespace");
    let mut vmm = net_vmm("net_services", &ns);

    // Linux's ping.
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

    let summary = ns
        .run(|| -> Result<String, String> {
            // 64 MiB through the TCP echo service, checksummed both ways.
            const TOTAL: usize = 64 << 20;
            let stream = TcpStream::connect_timeout(&addr(7), Duration::from_secs(10))
                .map_err(|e| format!("connect echo: {e}"))?;
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .map_err(|e| e.to_string())?;
            let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
            let start = Instant::now();
            let sender = std::thread::spawn(move || -> Result<u64, String> {
                let mut chunk = vec![0u8; 64 << 10];
                let mut sum = 0xcbf2_9ce4_8422_2325;
                let mut sent = 0usize;
                let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
                while sent < TOTAL {
                    for b in chunk.iter_mut() {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        *b = x as u8;
                    }
                    writer.write_all(&chunk).map_err(|e| format!("send: {e}"))?;
                    sum = fnv(&chunk, sum);
                    sent += chunk.len();
                }
                writer
                    .shutdown(Shutdown::Write)
                    .map_err(|e| e.to_string())?;
                Ok(sum)
            });
            let mut reader = stream;
            let mut received = 0usize;
            let mut sum = 0xcbf2_9ce4_8422_2325;
            let mut buf = vec![0u8; 256 << 10];
            while received < TOTAL {
                let n = reader
                    .read(&mut buf)
                    .map_err(|e| format!("receive after {received}: {e}"))?;
                if n == 0 {
                    return Err(format!("echo closed after {received} bytes"));
                }
                sum = fnv(&buf[..n], sum);
                received += n;
            }
            let sent_sum = sender.join().map_err(|_| "sender panicked".to_string())??;
            if sent_sum != sum {
                return Err("echoed data differs from what was sent".into());
            }
            let secs = start.elapsed().as_secs_f64();
            let mut out = format!(
                "64 MiB echoed in {secs:.2} s ({:.1} MB/s each way)",
                TOTAL as f64 / secs / 1e6
            );

            // Many short connections in a row.
            let start = Instant::now();
            for i in 0..200u32 {
                let mut c = TcpStream::connect_timeout(&addr(7), Duration::from_secs(10))
                    .map_err(|e| format!("short connection {i}: {e}"))?;
                c.set_read_timeout(Some(Duration::from_secs(10)))
                    .map_err(|e| e.to_string())?;
                let msg = format!("hello {i}\n");
                c.write_all(msg.as_bytes()).map_err(|e| e.to_string())?;
                let mut back = vec![0u8; msg.len()];
                c.read_exact(&mut back)
                    .map_err(|e| format!("short connection {i}: {e}"))?;
                if back != msg.as_bytes() {
                    return Err(format!("short connection {i} echoed {back:?}"));
                }
            }
            out += &format!(
                "; 200 short connections in {:.2} s",
                start.elapsed().as_secs_f64()
            );

            // The counter service: sequence numbers in order, then close.
            let mut c = TcpStream::connect_timeout(&addr(9000), Duration::from_secs(10))
                .map_err(|e| format!("connect counter: {e}"))?;
            c.set_read_timeout(Some(Duration::from_secs(10)))
                .map_err(|e| e.to_string())?;
            let mut text = String::new();
            c.read_to_string(&mut text)
                .map_err(|e| format!("counter: {e}"))?;
            for (i, line) in text.lines().enumerate() {
                if line != format!("SEQ {}", i + 1) {
                    return Err(format!("counter line {i} is {line:?}"));
                }
            }
            if text.lines().count() == 0 {
                return Err("counter sent nothing".into());
            }

            // UDP echo.
            let udp = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
            udp.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?;
            for i in 0..20u32 {
                let msg = format!("datagram {i}");
                udp.send_to(msg.as_bytes(), addr(7))
                    .map_err(|e| e.to_string())?;
                let mut buf = [0u8; 64];
                let (n, _) = udp
                    .recv_from(&mut buf)
                    .map_err(|e| format!("udp {i}: {e}"))?;
                if &buf[..n] != msg.as_bytes() {
                    return Err(format!("udp {i} echoed {:?}", &buf[..n]));
                }
            }
            Ok(out)
        })
        .expect("run in the namespace");
    match summary {
        Ok(line) => report(&format!("net_services: {line}")),
        Err(e) => panic!("{e}\n{}", vmm.diagnose("network check failed")),
    }
    vmm.kill();
}
