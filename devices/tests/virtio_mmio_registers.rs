//! The virtio-mmio transport on the VMM's bus, and random register traffic from a hostile
//! guest: whatever it writes, the VMM keeps running and a proper driver can still bring the
//! device up afterwards.

mod common;

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use common::*;
use devices::virtio::block::*;
use devices::virtio::mmio::*;
use devices::virtio::{VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK};
use devices::IoBus;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn image(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("mmio-{}-{name}.img", std::process::id()));
    std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
    path
}

#[test]
fn transport_on_the_bus() {
    let dev = Arc::new(Mutex::new(
        Block::new(BlockConfig::new(image("bus"))).unwrap(),
    ));
    let mem = guest_memory(2 << 20);
    let (transport, _irq) = transport(dev, &mem);
    let base = 0xd000_0000u64;
    let mut bus = IoBus::new();
    bus.insert(transport.clone(), base, MMIO_REGION_SIZE)
        .unwrap();
    let read32 = |off: u64| {
        let mut b = [0u8; 4];
        assert!(bus.read(base + off, &mut b));
        u32::from_le_bytes(b)
    };
    assert_eq!(read32(REG_MAGIC_VALUE), MMIO_MAGIC_VALUE);
    assert_eq!(read32(REG_VERSION), 2);
    assert_eq!(read32(REG_DEVICE_ID), VIRTIO_ID_BLOCK);
    // Capacity through the config window: 128 sectors.
    let mut cap = [0u8; 8];
    assert!(bus.read(base + REG_CONFIG, &mut cap));
    assert_eq!(u64::from_le_bytes(cap), 128);
    // One notify eventfd per queue, for the VMM's ioeventfds at base + 0x50.
    assert_eq!(transport.lock().unwrap().queue_notify_evts().len(), 1);
    assert_eq!(REG_QUEUE_NOTIFY, 0x50);
}

#[test]
fn random_register_traffic_never_breaks_the_vmm() {
    let dev = Arc::new(Mutex::new(
        Block::new(BlockConfig::new(image("fuzz"))).unwrap(),
    ));
    let cell = RefCell::new(Harness::new(dev, 4 << 20));
    // Offsets cluster on real registers; values on meaningful ones.
    let offset = prop_oneof![
        4 => (0u64..0x40).prop_map(|r| r * 4),
        1 => 0u64..0x1000,
    ];
    let value = prop_oneof![
        2 => 0u32..16,
        1 => Just(0x80u32),
        1 => Just(1u32 << 15),
        1 => (0u32..0x40).prop_map(|p| QUEUE_BASE as u32 + p * 0x1000),
        1 => any::<u32>(),
    ];
    let width =
        prop_oneof![8 => Just(4usize), 1 => Just(1usize), 1 => Just(2usize), 1 => Just(8usize)];
    let op = (any::<bool>(), offset, width, value);
    let strategy = proptest::collection::vec(op, 1..64);
    let mut runner = TestRunner::new(Config {
        cases: 300,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |ops| {
        let mut guard = cell.borrow_mut();
        let h = &mut *guard;
        for (is_write, offset, width, value) in ops {
            let mut bytes = [0u8; 8];
            bytes[..4].copy_from_slice(&value.to_le_bytes());
            let mut bus = h.driver.bus.lock().unwrap();
            if is_write {
                devices::BusDevice::write(&mut *bus, offset, &bytes[..width]);
            } else {
                devices::BusDevice::read(&mut *bus, offset, &mut bytes[..width]);
            }
            drop(bus);
            h.poll(0);
        }
        prop_assert_eq!(h.driver.read32(REG_MAGIC_VALUE), MMIO_MAGIC_VALUE);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // A well-behaved driver still gets a working device.
    let h = &mut *cell.borrow_mut();
    assert!(h.activate(VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH, &[16]));
    let hdr = h.buffer_with(&[
        VIRTIO_BLK_T_IN as u8,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ]);
    let buf = h.buffer(512);
    let status = h.buffer_with(&[0xff]);
    h.driver
        .add_chain(0, &[(hdr, 16, false), (buf, 512, true), (status, 1, true)]);
    assert_eq!(h.kick_and_wait(0, 1)[0].1, 513);
    assert_eq!(h.read(status, 1)[0], VIRTIO_BLK_S_OK);
}
