//! A virtio-pci function on the VMM's buses (the configuration ports and a BAR window, mapped
//! as the VMM maps them), and random BAR and configuration-space traffic from a hostile guest:
//! whatever it does, the VMM keeps running and a proper driver can still bring the device up
//! afterwards.

mod common;

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use common::*;
use devices::pci::config::{BAR0, CLASS_CODE, COMMAND, COMMAND_MEMORY_SPACE};
use devices::pci::{PciBarWindow, PciBus, PciConfigIo, PciDevice};
use devices::virtio::block::*;
use devices::virtio::pci::BAR_SIZE;
use devices::virtio::VIRTIO_F_VERSION_1;
use devices::IoBus;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const CONFIG_ADDRESS_PORT: u64 = 0xcf8;
const CONFIG_DATA_PORT: u64 = 0xcfc;
/// virtio-blk: 0x1040 + 2, vendor 0x1af4.
const BLOCK_ID: u32 = 0x1042_1af4;

fn image(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("pci-fn-{}-{name}.img", std::process::id()));
    std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
    path
}

fn block(name: &str) -> Arc<Mutex<Block>> {
    Arc::new(Mutex::new(
        Block::new(BlockConfig::new(image(name))).unwrap(),
    ))
}

#[test]
fn function_on_the_vmm_buses() {
    let mem = guest_memory(2 << 20);
    let f = pci_function(block("bus"), &mem);
    let caps = VirtioCaps::find(&mut *f.dev.lock().unwrap());
    let pci = Arc::new(Mutex::new(PciBus::new()));
    pci.lock().unwrap().insert(1, f.dev.clone()).unwrap();
    let mut pio = IoBus::new();
    pio.insert(
        Arc::new(Mutex::new(PciConfigIo::new(pci.clone()))),
        CONFIG_ADDRESS_PORT,
        8,
    )
    .unwrap();
    let window = BAR_ADDRESS;
    let mut mmio = IoBus::new();
    mmio.insert(
        Arc::new(Mutex::new(PciBarWindow::new(pci.clone(), window))),
        window,
        0x1000_0000,
    )
    .unwrap();
    // Device 1's configuration space through ports 0xcf8/0xcfc.
    let select = |register: usize| {
        let address = 0x8000_0000u32 | 1 << 11 | register as u32;
        assert!(pio.write(CONFIG_ADDRESS_PORT, &address.to_le_bytes()));
    };
    let config32 = |register: usize| {
        select(register);
        let mut b = [0u8; 4];
        assert!(pio.read(CONFIG_DATA_PORT, &mut b));
        u32::from_le_bytes(b)
    };
    assert_eq!(config32(0), BLOCK_ID);
    assert_eq!(config32(CLASS_CODE - 1) >> 8, 0x01_8000);
    // BAR 0: 64-bit memory at the VMM's address.
    assert_eq!(config32(BAR0) & 0x6, 0x4);
    assert_eq!(u64::from(config32(BAR0) & !0xf), BAR_ADDRESS & 0xffff_ffff);
    assert_eq!(u64::from(config32(BAR0 + 4)), BAR_ADDRESS >> 32);

    let bar_read = |offset: u64, data: &mut [u8]| {
        assert!(mmio.read(BAR_ADDRESS + offset, data));
    };
    // Nothing decodes, and no notification is registered, until memory space is enabled.
    let mut num_queues = [0u8; 2];
    bar_read(caps.common + common_cfg::NUM_QUEUES, &mut num_queues);
    assert_eq!(num_queues, [0xff; 2]);
    assert!(f.kvm.ioevents.lock().unwrap().is_empty());
    select(COMMAND);
    assert!(pio.write(CONFIG_DATA_PORT, &COMMAND_MEMORY_SPACE.to_le_bytes()));

    // One notification ioeventfd, at queue 0's notify address.
    assert_eq!(
        *f.kvm.ioevents.lock().unwrap(),
        vec![(true, BAR_ADDRESS + caps.notify)]
    );
    bar_read(caps.common + common_cfg::NUM_QUEUES, &mut num_queues);
    assert_eq!(u16::from_le_bytes(num_queues), 1);
    // Capacity through the device configuration: 128 sectors.
    let mut cap = [0u8; 8];
    bar_read(caps.device, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 128);
}

#[test]
fn random_guest_traffic_never_breaks_the_vmm() {
    let cell = RefCell::new(Harness::new(block("fuzz"), 4 << 20));
    let caps = cell.borrow().driver.caps;
    // Accesses cluster on the structures the capabilities announce; values on meaningful ones.
    let offset = prop_oneof![
        4 => (0..common_cfg::LEN).prop_map(move |o| caps.common + o),
        1 => Just(caps.isr),
        1 => (0u64..0x40).prop_map(move |o| caps.device + o),
        1 => (0u64..4).prop_map(move |q| caps.notify + q * u64::from(caps.notify_multiplier)),
        1 => 0u64..BAR_SIZE + 0x10,
    ];
    let value = prop_oneof![
        2 => 0u64..16,
        1 => Just(0x80u64),
        1 => Just(0xffffu64),
        1 => Just(MSI_ADDRESS),
        1 => (0u64..0x40).prop_map(|p| QUEUE_BASE + p * 0x1000),
        1 => any::<u64>(),
    ];
    let width = prop_oneof![
        4 => Just(4usize),
        4 => Just(2usize),
        2 => Just(1usize),
        1 => Just(8usize),
        1 => Just(3usize),
    ];
    // 0-3: BAR write, 4-7: BAR read, 8: configuration write, 9: configuration read.
    let op = (0u8..10, offset, 0usize..0x100, width, value);
    let strategy = proptest::collection::vec(op, 1..64);
    let mut runner = TestRunner::new(Config {
        cases: 300,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |ops| {
        let mut guard = cell.borrow_mut();
        let h = &mut *guard;
        for (kind, offset, register, width, value) in ops {
            let mut bytes = value.to_le_bytes();
            let bytes = &mut bytes[..width];
            match kind {
                0..=3 => h.driver.write_bar(offset, bytes),
                4..=7 => h.driver.read_bar(offset, bytes),
                8 => h.driver.dev.lock().unwrap().write_config(register, bytes),
                _ => h.driver.dev.lock().unwrap().read_config(register, bytes),
            }
            h.poll(0);
        }
        let mut id = [0u8; 4];
        h.driver.dev.lock().unwrap().read_config(0, &mut id);
        prop_assert_eq!(u32::from_le_bytes(id), BLOCK_ID);
        prop_assert_eq!(h.driver.common_read(common_cfg::NUM_QUEUES), 1);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // A well-behaved driver still gets a working device.
    let h = &mut *cell.borrow_mut();
    assert!(h.activate(VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH, &[16]));
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    let hdr = h.buffer_with(&hdr);
    let buf = h.buffer(512);
    let status = h.buffer_with(&[0xff]);
    h.driver
        .add_chain(0, &[(hdr, 16, false), (buf, 512, true), (status, 1, true)]);
    assert_eq!(h.kick_and_wait(0, 1)[0].1, 513);
    assert_eq!(h.read(status, 1)[0], VIRTIO_BLK_S_OK);
}
