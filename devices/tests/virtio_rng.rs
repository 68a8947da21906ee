//! virtio-rng end to end: an `Rng` behind a virtio-pci function, driven by the in-test
//! driver. A file of known bytes stands in for the entropy source so every byte can be checked.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use devices::virtio::rng::*;
use devices::virtio::VIRTIO_F_VERSION_1;

const MEM_SIZE: usize = 4 << 20;

fn source_file(len: usize) -> (PathBuf, Vec<u8>) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("rng-{}-{n}.bin", std::process::id()));
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 256) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

fn rng_from(path: &std::path::Path) -> Arc<Mutex<Rng>> {
    let file = std::fs::File::open(path).unwrap();
    Arc::new(Mutex::new(Rng::new("_rng", file).unwrap()))
}

fn started(rng: &Arc<Mutex<Rng>>) -> Harness {
    let mut h = Harness::new(rng.clone(), MEM_SIZE);
    assert_eq!(h.driver.device_features(), VIRTIO_F_VERSION_1);
    assert!(h.activate(VIRTIO_F_VERSION_1, &[16]));
    h
}

#[test]
fn bytes_arrive_and_chain_lengths_are_honoured() {
    let (path, data) = source_file(1 << 20);
    let rng = rng_from(&path);
    let mut h = started(&rng);
    let a = h.buffer(10);
    let b = h.buffer(20);
    let guard = h.buffer_with(&[0xee; 8]);
    h.driver.add_chain(0, &[(a, 10, true), (b, 20, true)]);
    let used = h.kick_and_wait(0, 1);
    assert_eq!(used, [(0, 30)]);
    assert_eq!(h.read(a, 10), data[..10]);
    assert_eq!(h.read(b, 20), data[10..30]);
    assert_eq!(
        h.read(guard, 8),
        [0xee; 8],
        "nothing beyond the chain is written"
    );

    // A chain larger than one request gets the cap.
    let big = h.buffer(MAX_REQUEST + 4096);
    h.driver
        .add_chain(0, &[(big, (MAX_REQUEST + 4096) as u32, true)]);
    let used = h.kick_and_wait(0, 1);
    assert_eq!(used[0].1 as usize, MAX_REQUEST);
    assert_eq!(h.read(big, MAX_REQUEST), data[30..30 + MAX_REQUEST]);
    assert_eq!(
        rng.lock().unwrap().counters()["bytes"],
        (30 + MAX_REQUEST) as u64
    );
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_read_only_chain_is_refused_cleanly() {
    let (path, data) = source_file(4096);
    let rng = rng_from(&path);
    let mut h = started(&rng);
    let ro = h.buffer_with(&[0x55; 16]);
    let out = h.buffer_with(&[0x66; 16]);
    let bad = h.driver.add_chain(0, &[(ro, 16, false)]);
    let mixed = h.driver.add_chain(0, &[(out, 8, true), (ro, 8, false)]);
    let outside = h.driver.add_chain(0, &[(MEM_SIZE as u64, 8, true)]);
    let good = h.driver.add_chain(0, &[(out, 16, true)]);
    let used = h.kick_and_wait(0, 4);
    assert_eq!(
        used,
        [
            (u32::from(bad), 0),
            (u32::from(mixed), 0),
            (u32::from(outside), 0),
            (u32::from(good), 16)
        ]
    );
    assert_eq!(h.read(ro, 16), [0x55; 16]);
    assert_eq!(
        h.read(out, 16),
        data[..16],
        "refused chains consumed no entropy"
    );
    assert_eq!(rng.lock().unwrap().counters()["errors"], 3);
    let _ = std::fs::remove_file(path);
}

#[test]
fn urandom_fills_buffers() {
    let file = std::fs::File::open("/dev/urandom").unwrap();
    let rng = Arc::new(Mutex::new(Rng::new("_rng", file).unwrap()));
    let mut h = started(&rng);
    let at = h.buffer(4096);
    h.driver.add_chain(0, &[(at, 4096, true)]);
    let used = h.kick_and_wait(0, 1);
    assert_eq!(used, [(0, 4096)]);
    let bytes = h.read(at, 4096);
    assert!(
        bytes.iter().filter(|&&b| b == 0).count() < 200,
        "not random"
    );
}

#[test]
fn state_round_trips() {
    let (path, _) = source_file(4096);
    let rng = rng_from(&path);
    let mut h = started(&rng);
    let at = h.buffer(64);
    h.driver.add_chain(0, &[(at, 64, true)]);
    h.kick_and_wait(0, 1);
    let state = rng.lock().unwrap().state();
    assert_eq!(state.acked_features, VIRTIO_F_VERSION_1);
    assert_eq!(state.counters.bytes, 64);
    let back: RngState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    assert_eq!(back, state);
    let fresh = rng_from(&path);
    fresh.lock().unwrap().restore(&back).unwrap();
    assert_eq!(fresh.lock().unwrap().state(), state);
    let mut wrong = state;
    wrong.avail_features = 0;
    assert!(fresh.lock().unwrap().restore(&wrong).is_err());
    let _ = std::fs::remove_file(path);
}
