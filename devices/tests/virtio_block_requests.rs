//! virtio-blk driven like a guest would: registers through the virtio-pci function's BAR,
//! requests in virtqueues in guest memory, the device event loop run by the test.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use devices::virtio::block::*;
use devices::virtio::core::{INTERRUPT_USED_BUFFER, STATUS_DEVICE_NEEDS_RESET};
use devices::virtio::VIRTIO_F_VERSION_1;

const BASE_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX;
const MEM_SIZE: usize = 8 << 20;

/// A fresh image file of `size` bytes filled with a pattern that depends on the offset.
fn image(name: &str, size: usize) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("blk-{}-{n}-{name}.img", std::process::id()));
    let data: Vec<u8> = (0..size).map(|i| (i / 512) as u8 ^ (i as u8)).collect();
    std::fs::write(&path, data).unwrap();
    path
}

fn block(cfg: BlockConfig) -> (Arc<Mutex<Block>>, Harness) {
    let dev = Arc::new(Mutex::new(Block::new(cfg).unwrap()));
    let h = Harness::new(dev.clone(), MEM_SIZE);
    (dev, h)
}

fn header(h: &mut Harness, type_: u32, sector: u64) -> u64 {
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&type_.to_le_bytes());
    hdr[8..16].copy_from_slice(&sector.to_le_bytes());
    h.buffer_with(&hdr)
}

/// Submits a request with the given data buffers; returns (status, used len).
fn request(h: &mut Harness, type_: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
    let hdr = header(h, type_, sector);
    let status = h.buffer_with(&[0xff]);
    let mut chain = vec![(hdr, 16, false)];
    chain.extend_from_slice(data);
    chain.push((status, 1, true));
    let head = h.driver.add_chain(0, &chain);
    let used = h.kick_and_wait(0, 1);
    assert_eq!(used.len(), 1, "no used entry");
    assert_eq!(used[0].0, u32::from(head));
    (h.read(status, 1)[0], used[0].1)
}

#[test]
fn write_then_read_back() {
    let path = image("rw", 64 * 1024);
    let (dev, mut h) = block(BlockConfig::new(&path));
    assert!(h.activate(BASE_FEATURES, &[128]));
    assert!(dev.lock().unwrap().is_activated());

    // Write 3 sectors at sector 5 from two buffers of 512 and 1024 bytes.
    let payload: Vec<u8> = (0..1536u32).map(|i| (i * 7 + 3) as u8).collect();
    let a = h.buffer_with(&payload[..512]);
    let b = h.buffer_with(&payload[512..]);
    let (status, len) = request(
        &mut h,
        VIRTIO_BLK_T_OUT,
        5,
        &[(a, 512, false), (b, 1024, false)],
    );
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 1));
    assert_eq!(h.driver.ack_interrupt() & INTERRUPT_USED_BUFFER, 1);
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[5 * 512..8 * 512], &payload[..]);

    // Read them back into three 512-byte buffers.
    let bufs: Vec<u64> = (0..3).map(|_| h.buffer(512)).collect();
    let data: Vec<_> = bufs.iter().map(|&a| (a, 512, true)).collect();
    let (status, len) = request(&mut h, VIRTIO_BLK_T_IN, 5, &data);
    assert_eq!((status, len), (VIRTIO_BLK_S_OK, 1536 + 1));
    let read: Vec<u8> = bufs.iter().flat_map(|&a| h.read(a, 512)).collect();
    assert_eq!(read, payload);

    // Data and status in one writable descriptor (status = its last byte).
    let hdr = header(&mut h, VIRTIO_BLK_T_IN, 0);
    let buf = h.buffer(513);
    h.driver.add_chain(0, &[(hdr, 16, false), (buf, 513, true)]);
    let used = h.kick_and_wait(0, 1);
    assert_eq!(used[0].1, 513);
    assert_eq!(h.read(buf, 513)[..512], on_disk[..512]);
    assert_eq!(h.read(buf + 512, 1)[0], VIRTIO_BLK_S_OK);

    let c = dev.lock().unwrap().counters();
    assert_eq!(c["write_ops"], 1);
    assert_eq!(c["write_bytes"], 1536);
    assert_eq!(c["read_ops"], 2);
    assert_eq!(c["read_bytes"], 1536 + 512);
}

#[test]
fn large_request_crosses_bounce_chunks() {
    let path = image("large", 2 << 20);
    let (_dev, mut h) = block(BlockConfig::new(&path));
    assert!(h.activate(BASE_FEATURES, &[128]));
    let payload: Vec<u8> = (0..(600 * 1024u32)).map(|i| (i % 251) as u8).collect();
    let src = h.buffer_with(&payload);
    let (status, _) = request(
        &mut h,
        VIRTIO_BLK_T_OUT,
        1,
        &[(src, payload.len() as u32, false)],
    );
    assert_eq!(status, VIRTIO_BLK_S_OK);
    let dst = h.buffer(payload.len());
    let (status, len) = request(
        &mut h,
        VIRTIO_BLK_T_IN,
        1,
        &[(dst, payload.len() as u32, true)],
    );
    assert_eq!((status, len as usize), (VIRTIO_BLK_S_OK, payload.len() + 1));
    assert!(h.read(dst, payload.len()) == payload);
}

#[test]
fn flush_and_get_id() {
    let path = image("id", 4096);
    let mut cfg = BlockConfig::new(&path);
    cfg.id = Some("tandem-disk-serial-0123456789".into());
    let (_dev, mut h) = block(cfg);
    assert!(h.activate(BASE_FEATURES, &[16]));

    assert_eq!(
        request(&mut h, VIRTIO_BLK_T_FLUSH, 0, &[]),
        (VIRTIO_BLK_S_OK, 1)
    );
    let id = h.buffer(20);
    assert_eq!(
        request(&mut h, VIRTIO_BLK_T_GET_ID, 0, &[(id, 20, true)]),
        (VIRTIO_BLK_S_OK, 21)
    );
    assert_eq!(h.read(id, 20), b"tandem-disk-serial-0");

    // The default id comes from the image's device and inode numbers.
    let path = image("id2", 4096);
    let (_dev, mut h) = block(BlockConfig::new(&path));
    assert!(h.activate(BASE_FEATURES, &[16]));
    let id = h.buffer(20);
    assert_eq!(
        request(&mut h, VIRTIO_BLK_T_GET_ID, 0, &[(id, 20, true)]).0,
        VIRTIO_BLK_S_OK
    );
    assert_ne!(h.read(id, 20), vec![0u8; 20]);
}

#[test]
fn bad_requests_fail_cleanly() {
    let path = image("bad", 8 * 512);
    let (dev, mut h) = block(BlockConfig::new(&path));
    assert!(h.activate(BASE_FEATURES, &[16]));
    let before = std::fs::read(&path).unwrap();
    let buf = h.buffer(2048);

    // Past the end, and straddling the end.
    assert_eq!(
        request(&mut h, VIRTIO_BLK_T_IN, 8, &[(buf, 512, true)]).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        request(&mut h, VIRTIO_BLK_T_OUT, 7, &[(buf, 1024, false)]).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        request(&mut h, VIRTIO_BLK_T_IN, u64::MAX, &[(buf, 512, true)]).0,
        VIRTIO_BLK_S_IOERR
    );
    // Not whole sectors.
    assert_eq!(
        request(&mut h, VIRTIO_BLK_T_IN, 0, &[(buf, 100, true)]).0,
        VIRTIO_BLK_S_IOERR
    );
    // Wrong directions: reading into a device-readable buffer, writing from a writable one.
    assert_eq!(
        request(&mut h, VIRTIO_BLK_T_IN, 0, &[(buf, 512, false)]).0,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        request(&mut h, VIRTIO_BLK_T_OUT, 0, &[(buf, 512, true)]).0,
        VIRTIO_BLK_S_IOERR
    );
    // Buffer outside guest memory.
    assert_eq!(
        request(
            &mut h,
            VIRTIO_BLK_T_IN,
            0,
            &[(MEM_SIZE as u64 - 256, 512, true)]
        )
        .0,
        VIRTIO_BLK_S_IOERR
    );
    // Unknown request type.
    assert_eq!(
        request(&mut h, 99, 0, &[(buf, 512, true)]),
        (VIRTIO_BLK_S_UNSUPP, 1)
    );
    // Header too short.
    let hdr = header(&mut h, VIRTIO_BLK_T_IN, 0);
    let status = h.buffer_with(&[0xff]);
    h.driver
        .add_chain(0, &[(hdr, 8, false), (buf, 512, true), (status, 1, true)]);
    assert_eq!(h.kick_and_wait(0, 1)[0].1, 1);
    assert_eq!(h.read(status, 1)[0], VIRTIO_BLK_S_IOERR);
    // No writable status byte: dropped with used length 0, nothing written.
    let hdr = header(&mut h, VIRTIO_BLK_T_OUT, 0);
    h.driver
        .add_chain(0, &[(hdr, 16, false), (buf, 512, false)]);
    assert_eq!(h.kick_and_wait(0, 1)[0].1, 0);
    // Status descriptor outside guest memory.
    let hdr = header(&mut h, VIRTIO_BLK_T_IN, 0);
    h.driver.add_chain(
        0,
        &[(hdr, 16, false), (buf, 512, true), (u64::MAX - 1, 1, true)],
    );
    assert_eq!(h.kick_and_wait(0, 1)[0].1, 0);

    assert_eq!(std::fs::read(&path).unwrap(), before);
    // The device still works.
    assert_eq!(
        request(&mut h, VIRTIO_BLK_T_IN, 0, &[(buf, 512, true)]).0,
        VIRTIO_BLK_S_OK
    );
    assert_eq!(dev.lock().unwrap().counters()["write_ops"], 0);
}

#[test]
fn readonly_offers_ro_and_refuses_writes() {
    let path = image("ro", 4096);
    let mut cfg = BlockConfig::new(&path);
    cfg.readonly = true;
    let (_dev, mut h) = block(cfg);
    let features = h.driver.device_features();
    assert_ne!(features & VIRTIO_BLK_F_RO, 0);
    assert!(h.activate(BASE_FEATURES | VIRTIO_BLK_F_RO, &[16]));
    let before = std::fs::read(&path).unwrap();
    let buf = h.buffer_with(&[0x5a; 512]);
    assert_eq!(
        request(&mut h, VIRTIO_BLK_T_OUT, 0, &[(buf, 512, false)]),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(
        request(&mut h, VIRTIO_BLK_T_IN, 1, &[(buf, 512, true)]).0,
        VIRTIO_BLK_S_OK
    );
    assert_eq!(h.read(buf, 512), before[512..1024]);
}

#[test]
fn device_writes_mark_the_dirty_bitmap() {
    let path = image("dirty", 64 * 1024);
    let (_dev, mut h) = block(BlockConfig::new(&path));
    assert!(h.activate(BASE_FEATURES, &[16]));
    let buf = h.alloc.take(4096, 4096);
    let untouched = h.alloc.take(4096, 4096);
    let hdr = header(&mut h, VIRTIO_BLK_T_IN, 0);
    let status = h.buffer(1);
    clear_dirty(h.mem());
    assert!(!is_dirty(h.mem(), buf));
    h.driver
        .add_chain(0, &[(hdr, 16, false), (buf, 4096, true), (status, 1, true)]);
    assert_eq!(h.kick_and_wait(0, 1)[0].1, 4097);
    // The test's own writes since the clear (none) cannot explain these bits.
    assert!(is_dirty(h.mem(), buf));
    assert!(is_dirty(h.mem(), buf + 4095));
    assert!(!is_dirty(h.mem(), untouched));
    // The used ring: clear, then only the device writes it.
    clear_dirty(h.mem());
    let used_ring = h.driver.queues[0].used;
    let hdr_page_req = (hdr, 16, false);
    h.driver
        .add_chain(0, &[hdr_page_req, (buf, 512, true), (status, 1, true)]);
    clear_dirty(h.mem());
    h.kick_and_wait(0, 1);
    assert!(is_dirty(h.mem(), used_ring));
    assert!(is_dirty(h.mem(), status));
    assert!(!is_dirty(h.mem(), untouched));
}

#[test]
fn reset_then_reactivate() {
    let path = image("reset", 64 * 1024);
    let (dev, mut h) = block(BlockConfig::new(&path));
    assert!(h.activate(BASE_FEATURES, &[16]));
    let buf = h.buffer(512);
    assert_eq!(
        request(&mut h, VIRTIO_BLK_T_IN, 0, &[(buf, 512, true)]).0,
        VIRTIO_BLK_S_OK
    );
    h.driver.reset();
    h.poll(10);
    assert!(!dev.lock().unwrap().is_activated());
    // A stray notify while reset must be harmless.
    h.driver.notify(0);
    h.poll(10);
    for round in 0..3u64 {
        assert!(h.activate(BASE_FEATURES, &[8]));
        let (status, len) = request(&mut h, VIRTIO_BLK_T_IN, round, &[(buf, 512, true)]);
        assert_eq!((status, len), (VIRTIO_BLK_S_OK, 513));
        h.driver.reset();
    }
    // Reset and re-activate without the event loop running in between.
    assert!(h.driver.init(BASE_FEATURES, &[8], QUEUE_BASE));
    h.driver.reset();
    assert!(h.driver.init(BASE_FEATURES, &[16], QUEUE_BASE));
    assert_eq!(
        request(&mut h, VIRTIO_BLK_T_IN, 3, &[(buf, 512, true)]).0,
        VIRTIO_BLK_S_OK
    );
}

#[test]
fn activation_with_wrong_queue_count_needs_reset() {
    let path = image("mq", 64 * 1024);
    let mut cfg = BlockConfig::new(&path);
    cfg.num_queues = 2;
    let (_dev, mut h) = block(cfg);
    assert_ne!(h.driver.device_features() & VIRTIO_BLK_F_MQ, 0);
    // Only one of two queues set up.
    assert!(!h.activate(BASE_FEATURES | VIRTIO_BLK_F_MQ, &[16]));
    assert_ne!(h.driver.status() & STATUS_DEVICE_NEEDS_RESET, 0);
    // Both queues: works, on either queue.
    assert!(h.activate(BASE_FEATURES | VIRTIO_BLK_F_MQ, &[16, 16]));
    let mut cfgspace = [0u8; 36];
    h.driver.read_config(0, &mut cfgspace);
    assert_eq!(u16::from_le_bytes([cfgspace[34], cfgspace[35]]), 2);
    let hdr = header(&mut h, VIRTIO_BLK_T_IN, 2);
    let buf = h.buffer(512);
    let status = h.buffer(1);
    h.driver
        .add_chain(1, &[(hdr, 16, false), (buf, 512, true), (status, 1, true)]);
    assert_eq!(h.kick_and_wait(1, 1)[0].1, 513);
    assert_eq!(h.read(status, 1)[0], VIRTIO_BLK_S_OK);
}

#[test]
fn config_space() {
    let path = image("cfg", 10 * 512 + 100);
    let (_dev, h) = block(BlockConfig::new(&path));
    let mut cfg = [0u8; 36];
    h.driver.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), 10);
    assert_eq!(u32::from_le_bytes(cfg[12..16].try_into().unwrap()), 126);
    assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), 512);
    let mut b = [0xffu8; 4];
    h.driver.read_config(200, &mut b);
    assert_eq!(b, [0; 4]);
    let f = h.driver.device_features();
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_ne!(f & VIRTIO_BLK_F_FLUSH, 0);
    assert_eq!(f & VIRTIO_BLK_F_RO, 0);
}

#[test]
fn image_lock_and_config_errors() {
    let path = image("lock", 4096);
    let first = Block::new(BlockConfig::new(&path)).unwrap();
    let err = Block::new(BlockConfig::new(&path)).err().unwrap();
    assert!(matches!(err, BlockError::Locked(_)));
    assert_eq!(
        err.to_string(),
        format!("disk image {} is locked by another process", path.display())
    );
    let mut ro = BlockConfig::new(&path);
    ro.readonly = true;
    assert!(matches!(
        Block::new(ro.clone()).err().unwrap(),
        BlockError::Locked(_)
    ));
    drop(first);
    // Readers share; a writer is then refused.
    let r1 = Block::new(ro.clone()).unwrap();
    let _r2 = Block::new(ro).unwrap();
    assert!(matches!(
        Block::new(BlockConfig::new(&path)).err().unwrap(),
        BlockError::Locked(_)
    ));
    drop(r1);

    let missing = path.with_extension("missing");
    let err = Block::new(BlockConfig::new(&missing)).err().unwrap();
    assert!(matches!(err, BlockError::NotFound(_)));
    assert!(err.to_string().contains(&missing.display().to_string()));

    let small = image("small", 511);
    let err = Block::new(BlockConfig::new(&small)).err().unwrap();
    assert!(matches!(err, BlockError::TooSmall { size: 511, .. }));

    for bad in [0u16, 3, 100, 65535] {
        let mut cfg = BlockConfig::new(image("q", 4096));
        cfg.queue_size = bad;
        assert!(matches!(
            Block::new(cfg).err().unwrap(),
            BlockError::QueueSize(q) if q == bad
        ));
    }
    let mut cfg = BlockConfig::new(image("nq", 4096));
    cfg.num_queues = 0;
    assert!(matches!(
        Block::new(cfg).err().unwrap(),
        BlockError::NumQueues(0)
    ));
}

#[test]
fn direct_io_round_trip() {
    let path = image("direct", 64 * 1024);
    let mut cfg = BlockConfig::new(&path);
    cfg.direct = true;
    let dev = match Block::new(cfg) {
        Ok(d) => d,
        Err(BlockError::DirectUnsupported(_)) => {
            eprintln!("SKIPPED direct_io_round_trip: O_DIRECT unsupported on the test filesystem");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let dev = Arc::new(Mutex::new(dev));
    let mut h = Harness::new(dev, MEM_SIZE);
    assert!(h.activate(BASE_FEATURES, &[16]));
    // Unaligned guest buffers and odd splits still work through the bounce buffer.
    let payload: Vec<u8> = (0..2048u32).map(|i| (i * 13) as u8).collect();
    let a = h.buffer_with(&payload[..300]);
    let b = h.buffer_with(&payload[300..]);
    let (status, _) = request(
        &mut h,
        VIRTIO_BLK_T_OUT,
        3,
        &[(a, 300, false), (b, 1748, false)],
    );
    assert_eq!(status, VIRTIO_BLK_S_OK);
    let dst = h.buffer(2048);
    assert_eq!(
        request(&mut h, VIRTIO_BLK_T_IN, 3, &[(dst, 2048, true)]).0,
        VIRTIO_BLK_S_OK
    );
    assert_eq!(h.read(dst, 2048), payload);
    assert_eq!(
        request(&mut h, VIRTIO_BLK_T_FLUSH, 0, &[]).0,
        VIRTIO_BLK_S_OK
    );
}

/// With MSI-X enabled each queue's used buffers raise that queue's vector (the VMM gives one
/// per queue, plus one for configuration changes), not INTx, and the ISR stays clear; with
/// MSI-X disabled again they come back on INTx with the ISR's used-buffer bit.
#[test]
fn interrupts_follow_msix_vectors() {
    let path = image("msix", 64 * 1024);
    let mut cfg = BlockConfig::new(&path);
    cfg.num_queues = 2;
    let (_dev, mut h) = block(cfg);
    assert_eq!(h.vectors.len(), 3);
    h.driver.enable_msix();
    assert!(h.activate(BASE_FEATURES | VIRTIO_BLK_F_MQ, &[16, 16]));
    let fired = |h: &Harness| -> Vec<bool> { h.vectors.iter().map(|v| v.read().is_ok()).collect() };
    for queue in [1usize, 0] {
        let hdr = header(&mut h, VIRTIO_BLK_T_IN, 1);
        let buf = h.buffer(512);
        let status = h.buffer(1);
        h.driver.add_chain(
            queue,
            &[(hdr, 16, false), (buf, 512, true), (status, 1, true)],
        );
        assert_eq!(h.kick_and_wait(queue, 1).len(), 1);
        let mut want = vec![false; 3];
        want[queue + 1] = true;
        assert_eq!(fired(&h), want, "queue {queue}");
        assert!(h.driver.irq.read().is_err(), "no INTx with MSI-X");
        assert_eq!(h.driver.read_isr(), 0);
    }

    h.driver.reset();
    h.driver.disable_msix();
    assert!(h.activate(BASE_FEATURES | VIRTIO_BLK_F_MQ, &[16, 16]));
    let buf = h.buffer(512);
    assert_eq!(
        request(&mut h, VIRTIO_BLK_T_IN, 1, &[(buf, 512, true)]).0,
        VIRTIO_BLK_S_OK
    );
    assert_eq!(fired(&h), vec![false; 3]);
    assert_eq!(h.driver.ack_interrupt(), INTERRUPT_USED_BUFFER);
}

/// A driver that polls sets VRING_AVAIL_F_NO_INTERRUPT (no EVENT_IDX is offered): its requests
/// complete without an interrupt; clearing the flag brings interrupts back (2.7.7).
#[test]
fn no_interrupt_flag_is_honoured() {
    let path = image("no-interrupt", 64 * 1024);
    let (_dev, mut h) = block(BlockConfig::new(&path));
    h.driver.enable_msix();
    assert!(h.activate(BASE_FEATURES, &[16]));
    let fired = |h: &Harness| h.vectors.iter().any(|v| v.read().is_ok());
    h.driver.queues[0].set_avail_flags(&h.driver.mem, 1);
    let buf = h.buffer(512);
    assert_eq!(
        request(&mut h, VIRTIO_BLK_T_IN, 1, &[(buf, 512, true)]).0,
        VIRTIO_BLK_S_OK
    );
    assert!(!fired(&h), "an interrupt the driver did not want");
    h.driver.queues[0].set_avail_flags(&h.driver.mem, 0);
    assert_eq!(
        request(&mut h, VIRTIO_BLK_T_IN, 1, &[(buf, 512, true)]).0,
        VIRTIO_BLK_S_OK
    );
    assert!(fired(&h));
}
