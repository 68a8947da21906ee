//! API round-trip latency: `vmm.ping` and `vm.info` through the real server (socket, parser,
//! router, channel to a control loop and back) with a fake control loop thread that answers at
//! once, for 1 and 16 concurrent clients, both on keep-alive connections and with a new
//! connection per request (what `ch-remote` does). Prints p50/p99 per row.
//!
//! `cargo bench -p api --bench api_latency` (set `API_BENCH_REQUESTS` to change the number of
//! requests per client; default 2000).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use vmm::config::VmConfig;
use vmm::control::{
    ApiMessage, ApiSender, VmInfoResponse, VmState, VmmPingResponse, VmmRequest, VmmResponse,
};
use vmm_sys_util::eventfd::EventFd;

fn fake_control_loop() -> ApiSender {
    let (tx, rx) = mpsc::channel::<ApiMessage>();
    let wake = Arc::new(EventFd::new(0).expect("eventfd"));
    thread::spawn(move || {
        for message in rx {
            let answer = match message.request {
                VmmRequest::Ping => VmmResponse::Ping(VmmPingResponse {
                    build_version: "bench".into(),
                    version: "0".into(),
                    pid: 1,
                    features: vec![],
                }),
                _ => VmmResponse::VmInfo(Box::new(VmInfoResponse {
                    config: VmConfig::default(),
                    state: VmState::Running,
                    memory_actual_size: 512 << 20,
                    device_tree: None,
                })),
            };
            let _ = message.reply.send(Ok(answer));
        }
    });
    ApiSender::new(tx, wake)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn run(
    socket: &Path,
    endpoint: &'static str,
    clients: usize,
    requests: usize,
    keep_alive: bool,
) -> Vec<Duration> {
    let barrier = Arc::new(Barrier::new(clients));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let socket = socket.to_path_buf();
            let barrier = barrier.clone();
            thread::spawn(move || {
                let mut samples = Vec::with_capacity(requests);
                let mut stream = keep_alive.then(|| UnixStream::connect(&socket).expect("connect"));
                barrier.wait();
                for _ in 0..requests {
                    let start = Instant::now();
                    let response = match stream.as_mut() {
                        Some(s) => api::client::request_on(s, "GET", endpoint, None, false),
                        None => api::client::request(&socket, "GET", endpoint, None),
                    }
                    .expect("request");
                    samples.push(start.elapsed());
                    assert_eq!(response.status, 200);
                }
                samples
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|t| t.join().expect("client thread"))
        .collect()
}

fn main() {
    let requests: usize = std::env::var("API_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let dir: PathBuf =
        std::env::temp_dir().join(format!("tandem-api-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let socket = dir.join("api.sock");
    let listener = api::bind(&socket).expect("bind");
    api::start_server(listener, fake_control_loop()).expect("server");

    println!("API round trip over a Unix socket, fake control loop answering at once");
    println!("{requests} requests per client\n");
    println!("| endpoint | clients | connection | requests | p50 (us) | p99 (us) | max (us) |");
    println!("| --- | ---: | --- | ---: | ---: | ---: | ---: |");
    for keep_alive in [true, false] {
        for endpoint in ["vmm.ping", "vm.info"] {
            for clients in [1, 16] {
                // Warm-up, not measured.
                run(&socket, endpoint, clients, 50, keep_alive);
                let mut samples = run(&socket, endpoint, clients, requests, keep_alive);
                samples.sort();
                let us = |d: Duration| d.as_secs_f64() * 1e6;
                println!(
                    "| {endpoint} | {clients} | {} | {} | {:.0} | {:.0} | {:.0} |",
                    if keep_alive {
                        "keep-alive"
                    } else {
                        "new per request"
                    },
                    samples.len(),
                    us(percentile(&samples, 0.50)),
                    us(percentile(&samples, 0.99)),
                    us(samples[samples.len() - 1]),
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
