//! Device state capture and restore, driven like the VMM does it: the guest queues work, the
//! device event loop is stopped before serving it, state is captured and serialized, the source
//! devices go away, fresh devices are built from the same configuration, restored, and only then
//! does the event loop run. The queued work must complete as if nothing had happened.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use devices::gate::NetOutputGate;
use devices::virtio::block::*;
use devices::virtio::core::INTERRUPT_USED_BUFFER;
use devices::virtio::net::{Net, NetConfig, NetState};
use devices::virtio::VIRTIO_F_VERSION_1;
use devices::{DeviceState, GuestMemoryMmap, VirtioState};
use event_manager::SubscriberOps;
use vm_memory::{Bytes, GuestAddress};

const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX;
const MEM_SIZE: usize = 8 << 20;
const WAIT: Duration = Duration::from_secs(5);

fn image(name: &str, size: usize) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("state-{}-{n}-{name}.img", std::process::id()));
    let data: Vec<u8> = (0..size).map(|i| (i / 512) as u8 ^ (i as u8)).collect();
    std::fs::write(&path, data).unwrap();
    path
}

fn block(path: &Path) -> Arc<Mutex<Block>> {
    Arc::new(Mutex::new(Block::new(BlockConfig::new(path)).unwrap()))
}

/// Makes a request chain available (header, data buffers, status byte); returns (head, status
/// address).
fn post_request(h: &mut Harness, type_: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u16, u64) {
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&type_.to_le_bytes());
    hdr[8..16].copy_from_slice(&sector.to_le_bytes());
    let hdr = h.buffer_with(&hdr);
    let status = h.buffer_with(&[0xff]);
    let mut chain = vec![(hdr, 16, false)];
    chain.extend_from_slice(data);
    chain.push((status, 1, true));
    (h.driver.add_chain(0, &chain), status)
}

fn used_idx(mem: &GuestMemoryMmap, q: &DriverQueue) -> u16 {
    mem.read_obj(GuestAddress(q.used + 2)).unwrap()
}

#[test]
fn block_state_round_trips_through_json() {
    let path = image("rt", 64 * 1024);
    let dev = block(&path);
    let mut h = Harness::new(dev.clone(), MEM_SIZE);
    assert!(h.activate(FEATURES, &[128]));
    let buf = h.buffer(512);
    let (_, _) = post_request(&mut h, VIRTIO_BLK_T_IN, 1, &[(buf, 512, true)]);
    assert_eq!(h.kick_and_wait(0, 1).len(), 1);

    let state = dev.lock().unwrap().state();
    assert_eq!(state.capacity, 128);
    assert_eq!(state.acked_features, FEATURES);
    assert_eq!(state.queue_sizes, vec![128]);
    assert_eq!(state.counters.read_ops, 1);
    let json = serde_json::to_string(&state).unwrap();
    let back: BlockState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);

    // Another image of the same size (the first one is locked by the source).
    let other = block(&image("rt2", 64 * 1024));
    other.lock().unwrap().restore(&back).unwrap();
    assert_eq!(other.lock().unwrap().state(), state);
    assert_eq!(other.lock().unwrap().acked_features(), FEATURES);
}

#[test]
fn block_restore_names_what_differs() {
    let state = block(&image("small", 64 * 1024)).lock().unwrap().state();

    let big_path = image("big", 128 * 1024);
    let big = block(&big_path);
    let err = big.lock().unwrap().restore(&state).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "disk image {} has 256 sectors but the snapshot expects 128",
            big_path.display()
        )
    );

    let mut cfg = BlockConfig::new(image("mq", 64 * 1024));
    cfg.num_queues = 2;
    let mq = Block::new(cfg).unwrap().restore(&state).unwrap_err();
    assert!(mq.to_string().contains("[128, 128]"), "{mq}");

    let mut cfg = BlockConfig::new(image("ro", 64 * 1024));
    cfg.readonly = true;
    let ro = Block::new(cfg).unwrap().restore(&state).unwrap_err();
    assert!(ro.to_string().contains("offers features"), "{ro}");

    let json = serde_json::to_string(&state)
        .unwrap()
        .replacen('{', "{\"extra\":0,", 1);
    assert!(serde_json::from_str::<BlockState>(&json).is_err());
}

/// The source: a write served (its interrupt not acknowledged), then a read of the written
/// sector made available and notified but NOT served, then capture. The destination: fresh
/// device and transport on the same image and memory, restore, event loop, and the read must
/// complete with the written data. `init_before_restore` picks whether the device joins its
/// event loop before or after the restore (the VMM may do either).
fn pending_block_request_survives(init_before_restore: bool) {
    let path = image("pending", 64 * 1024);
    let dev = block(&path);
    let mut h = Harness::new(dev.clone(), MEM_SIZE);
    assert!(h.activate(FEATURES, &[128]));

    let payload: Vec<u8> = (0..512u32).map(|i| (i * 13 + 1) as u8).collect();
    let src = h.buffer_with(&payload);
    let (_, wstatus) = post_request(&mut h, VIRTIO_BLK_T_OUT, 3, &[(src, 512, false)]);
    assert_eq!(h.kick_and_wait(0, 1).len(), 1);
    assert_eq!(h.read(wstatus, 1), [VIRTIO_BLK_S_OK]);

    let dst = h.buffer(512);
    let (head, rstatus) = post_request(&mut h, VIRTIO_BLK_T_IN, 3, &[(dst, 512, true)]);
    h.driver.notify(0);
    // The loop is stopped here: no poll.

    let captured = VirtioState {
        transport: h.driver.dev.lock().unwrap().state(),
        device: dev.lock().unwrap().state(),
    };
    let t = &captured.transport.virtio;
    assert!(t.activated);
    assert_eq!(t.interrupt_status, INTERRUPT_USED_BUFFER);
    assert_eq!((t.queues[0].next_avail, t.queues[0].next_used), (1, 1));
    let json = serde_json::to_string(&DeviceState::Block(captured)).unwrap();

    // The source goes away (it holds the image's lock); the guest's memory stays.
    let mem = h.driver.mem.clone();
    let queues = std::mem::take(&mut h.driver.queues);
    drop(h);
    drop(dev);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(rstatus)).unwrap(), 0xff);

    let DeviceState::Block(saved) = serde_json::from_str(&json).unwrap() else {
        panic!("not a block state: {json}");
    };
    let dev = block(&path);
    let mut h = if init_before_restore {
        Harness::with_memory(dev.clone(), mem.clone())
    } else {
        let f = pci_function(dev.clone(), &mem);
        Harness {
            em: DeviceEventManager::new().unwrap(),
            driver: Driver::new(f.dev, mem.clone(), f.intx),
            vectors: f.vectors,
            alloc: Alloc::new(BUFFER_BASE, MEM_SIZE as u64),
        }
    };
    h.driver.queues = queues;
    dev.lock().unwrap().restore(&saved.device).unwrap();
    h.driver
        .dev
        .lock()
        .unwrap()
        .restore(&saved.transport)
        .unwrap();
    assert_eq!(h.driver.dev.lock().unwrap().state(), saved.transport);
    assert_eq!(dev.lock().unwrap().state(), saved.device);
    // The unacknowledged interrupt is raised again.
    assert_eq!(h.driver.irq.read().unwrap(), 1);
    // Nothing is served before the loop runs.
    assert_eq!(h.read(rstatus, 1), [0xff]);
    if !init_before_restore {
        h.em.add_subscriber(dev.clone());
    }

    // No new notification: the device must find the pending request by itself.
    let Harness { em, driver, .. } = &mut h;
    let used = driver.wait_used(0, 1, WAIT, || {
        em.run_with_timeout(50).unwrap();
    });
    assert_eq!(used, vec![(u32::from(head), 513)]);
    assert_eq!(h.read(rstatus, 1), [VIRTIO_BLK_S_OK]);
    assert_eq!(h.read(dst, 512), payload);
    assert_eq!(used_idx(&mem, &h.driver.queues[0]), 2);
    let after = h.driver.dev.lock().unwrap().state().virtio;
    assert_eq!(
        (after.queues[0].next_avail, after.queues[0].next_used),
        (2, 2)
    );
    assert_eq!(h.driver.ack_interrupt() & INTERRUPT_USED_BUFFER, 1);

    // And the device keeps working with new requests.
    let again = h.buffer(512);
    let (head2, st2) = post_request(&mut h, VIRTIO_BLK_T_IN, 3, &[(again, 512, true)]);
    assert_eq!(h.kick_and_wait(0, 1), vec![(u32::from(head2), 513)]);
    assert_eq!(h.read(st2, 1), [VIRTIO_BLK_S_OK]);
    assert_eq!(h.read(again, 512), payload);
}

#[test]
fn pending_block_request_completes_after_restore() {
    pending_block_request_survives(false);
}

#[test]
fn pending_block_request_completes_after_restore_into_a_running_loop() {
    pending_block_request_survives(true);
}

/// Records transmitted frames instead of sending them.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

impl NetOutputGate for Recorder {
    fn transmit(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.0.lock().unwrap().push(frame.to_vec());
        Ok(())
    }
}

#[test]
fn pending_net_tx_is_sent_after_restore() {
    in_netns("pending_net_tx_is_sent_after_restore", || {
        // No MAC configured: each device picks a random one, and the restored one must keep
        // the MAC the guest saw.
        let cfg = NetConfig {
            tap: Some("tdmstate0".into()),
            ..NetConfig::default()
        };
        let net = Arc::new(Mutex::new(Net::new(cfg.clone()).unwrap()));
        let rec = Recorder::default();
        net.lock()
            .unwrap()
            .replace_output_gate(Box::new(rec.clone()));
        let mut h = Harness::new(net.clone(), MEM_SIZE);
        let features = h.driver.device_features();
        assert!(h.activate(features, &[256, 256]));

        // One frame sent normally, then one queued but not served, and an RX buffer posted.
        let frame: Vec<u8> = (0..60u8).collect();
        let mut tx = vec![0u8; 12];
        tx.extend_from_slice(&frame);
        let a = h.buffer_with(&tx);
        h.driver.add_chain(1, &[(a, tx.len() as u32, false)]);
        assert_eq!(h.kick_and_wait(1, 1).len(), 1);
        let mut second = tx.clone();
        second[12] = 0xee;
        let b = h.buffer_with(&second);
        let head = h.driver.add_chain(1, &[(b, second.len() as u32, false)]);
        h.driver.notify(1);
        let rx = h.buffer(2048);
        h.driver.add_chain(0, &[(rx, 2048, true)]);

        let state = VirtioState {
            transport: h.driver.dev.lock().unwrap().state(),
            device: net.lock().unwrap().state(),
        };
        assert_eq!(state.device.counters.tx_frames, 1);
        assert_eq!(
            (
                state.transport.virtio.queues[1].next_avail,
                state.transport.virtio.queues[1].next_used
            ),
            (1, 1)
        );
        assert_eq!(state.transport.virtio.queues[0].next_avail, 0);
        let json = serde_json::to_string(&state).unwrap();
        let saved: VirtioState<NetState> = serde_json::from_str(&json).unwrap();
        assert_eq!(saved, state);
        assert!(
            json.contains(&format!("\"{}\"", state.device.mac)),
            "{json}"
        );

        let mem = h.driver.mem.clone();
        let queues = std::mem::take(&mut h.driver.queues);
        drop(h);
        drop(net);
        assert_eq!(rec.0.lock().unwrap().len(), 1);

        let net = Arc::new(Mutex::new(Net::new(cfg).unwrap()));
        let rec2 = Recorder::default();
        net.lock()
            .unwrap()
            .replace_output_gate(Box::new(rec2.clone()));
        net.lock().unwrap().restore(&saved.device).unwrap();
        assert_eq!(net.lock().unwrap().mac(), saved.device.mac);
        let (dev, irq) = transport(net.clone(), &mem);
        dev.lock().unwrap().restore(&saved.transport).unwrap();
        assert_eq!(dev.lock().unwrap().state(), saved.transport);
        assert_eq!(net.lock().unwrap().state(), saved.device);
        assert_eq!(irq.read().unwrap(), 1);
        let mut driver = Driver::new(dev, mem.clone(), irq);
        let mut mac = [0u8; 6];
        driver.read_config(0, &mut mac);
        assert_eq!(mac, saved.device.mac.bytes());

        let mut em = DeviceEventManager::new().unwrap();
        em.add_subscriber(net.clone());
        driver.queues = queues;
        let used = driver.wait_used(1, 1, WAIT, || {
            em.run_with_timeout(50).unwrap();
        });
        assert_eq!(used, vec![(u32::from(head), 0)]);
        assert_eq!(*rec2.0.lock().unwrap(), vec![second[12..].to_vec()]);
        assert_eq!(used_idx(&mem, &driver.queues[1]), 2);
        assert_eq!(net.lock().unwrap().counters()["tx_frames"], 2);
        // The RX buffer is still available (no frame came), not lost.
        let t = driver.dev.lock().unwrap().state().virtio;
        assert_eq!(t.queues[0].next_avail, 0);
    });
}
