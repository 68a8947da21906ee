//! Property tests: whatever descriptor chains a guest puts in the queue (addresses outside
//! memory, huge lengths, NEXT loops, wrong directions, indirect tables), the block device
//! neither panics nor writes guest memory outside the chain's device-writable buffers and the
//! used ring, answers every chain with one used entry, and reports a valid status.

mod common;

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use common::*;
use devices::virtio::block::*;
use devices::virtio::VIRTIO_F_VERSION_1;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: u64 = 2 << 20;
const QSIZE: u16 = 16;
const SECTORS: u64 = 128;
/// Where request headers live.
const HDR_ADDR: u64 = 0x18_0000;
/// Where the single indirect table lives (any INDIRECT descriptor points here).
const INDIRECT_ADDR: u64 = 0x18_1000;
const INDIRECT_ENTRIES: u16 = 8;
/// Data buffers are drawn from here.
const DATA_ADDR: u64 = 0x19_0000;
const DATA_LEN: u64 = 0x4_0000;
const STATUS_ADDR: u64 = 0x1f_0000;

fn image(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("blk-fuzz-{}-{name}.img", std::process::id()));
    std::fs::write(&path, vec![0x11u8; (SECTORS * 512) as usize]).unwrap();
    path
}

fn harness(path: &PathBuf) -> Harness {
    let dev = Block::new(BlockConfig {
        queue_size: QSIZE,
        ..BlockConfig::new(path)
    })
    .unwrap();
    let mut h = Harness::new(Arc::new(Mutex::new(dev)), MEM_SIZE as usize);
    assert!(h.activate(VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH, &[QSIZE]));
    h
}

#[derive(Clone, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn addr_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => (0..DATA_LEN).prop_map(|o| DATA_ADDR + o),
        2 => Just(HDR_ADDR),
        1 => Just(STATUS_ADDR),
        1 => (0..4096u64).prop_map(|o| MEM_SIZE - o),
        1 => any::<u64>(),
        1 => (0..0x1000u64).prop_map(|o| u64::MAX - o),
    ]
}

fn len_strategy() -> impl Strategy<Value = u32> {
    prop_oneof![
        2 => Just(16u32),
        2 => Just(1u32),
        3 => (0..16u32).prop_map(|n| n * 512),
        1 => Just(0u32),
        1 => 0..5000u32,
        1 => any::<u32>(),
        1 => Just(u32::MAX),
    ]
}

fn desc_strategy(max_next: u16) -> impl Strategy<Value = Desc> {
    (
        addr_strategy(),
        len_strategy(),
        0u16..8,
        0..max_next + 2,
        0u8..8,
    )
        .prop_map(|(addr, len, flags, next, indirect_len)| {
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                // An indirect descriptor only ever points at the test's indirect table, so the
                // set of buffers the guest "gave" the device is known to the test.
                Desc {
                    addr: INDIRECT_ADDR,
                    len: 16 * u32::from(indirect_len) + u32::from(len % 16 == 1),
                    flags,
                    next,
                }
            } else {
                Desc {
                    addr,
                    len,
                    flags,
                    next,
                }
            }
        })
}

fn header_strategy() -> impl Strategy<Value = (u32, u64)> {
    (
        prop_oneof![
            3 => Just(VIRTIO_BLK_T_IN),
            3 => Just(VIRTIO_BLK_T_OUT),
            1 => Just(VIRTIO_BLK_T_FLUSH),
            1 => Just(VIRTIO_BLK_T_GET_ID),
            1 => any::<u32>(),
        ],
        prop_oneof![4 => 0..SECTORS + 4, 1 => any::<u64>()],
    )
}

fn write_header(h: &Harness, (type_, sector): (u32, u64)) {
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&type_.to_le_bytes());
    hdr[8..16].copy_from_slice(&sector.to_le_bytes());
    h.mem().write_slice(&hdr, GuestAddress(HDR_ADDR)).unwrap();
}

fn snapshot(h: &Harness) -> Vec<u8> {
    h.read(0, MEM_SIZE as usize)
}

/// Every byte that changed lies in one of `allowed` (start, len) ranges.
fn check_writes(before: &[u8], after: &[u8], allowed: &[(u64, u64)]) -> Result<(), TestCaseError> {
    // Compare page by page first: byte-wise comparison of all memory is slow in debug builds.
    for (page, (a, b)) in before.chunks(4096).zip(after.chunks(4096)).enumerate() {
        if a == b {
            continue;
        }
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            if x == y {
                continue;
            }
            let addr = (page * 4096 + i) as u128;
            let ok = allowed
                .iter()
                .any(|&(s, l)| addr >= u128::from(s) && addr < u128::from(s) + u128::from(l));
            prop_assert!(ok, "byte at {addr:#x} changed outside the writable buffers");
        }
    }
    Ok(())
}

fn used_ring_range(h: &Harness) -> (u64, u64) {
    (h.driver.queues[0].used, 4 + 8 * u64::from(QSIZE) + 2)
}

fn run_one(h: &mut Harness) -> Result<(u32, u32), TestCaseError> {
    let used = h.kick_and_wait(0, 1);
    prop_assert_eq!(used.len(), 1, "exactly one used entry per chain");
    Ok(used[0])
}

#[test]
fn random_descriptor_tables_never_escape_the_chain() {
    let path = image("tables");
    let cell = RefCell::new(harness(&path));
    let strategy = (
        proptest::collection::vec(desc_strategy(QSIZE), QSIZE as usize),
        proptest::collection::vec(desc_strategy(INDIRECT_ENTRIES), INDIRECT_ENTRIES as usize),
        0..QSIZE,
        header_strategy(),
    );
    let mut runner = TestRunner::new(Config {
        cases: 1000,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |(table, indirect, head, hdr)| {
        let mut guard = cell.borrow_mut();
        let h = &mut *guard;
        // No nested indirect tables: the spec forbids them and the queue rejects them.
        let indirect: Vec<Desc> = indirect
            .into_iter()
            .map(|d| Desc {
                flags: d.flags & !VIRTQ_DESC_F_INDIRECT,
                ..d
            })
            .collect();
        let mem = h.mem().clone();
        write_header(h, hdr);
        for (i, d) in table.iter().enumerate() {
            h.driver.queues[0].write_desc(&mem, i as u16, d.addr, d.len, d.flags, d.next);
        }
        for (i, d) in indirect.iter().enumerate() {
            let at = INDIRECT_ADDR + 16 * i as u64;
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&d.len.to_le_bytes());
            raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
            raw[14..16].copy_from_slice(&d.next.to_le_bytes());
            mem.write_slice(&raw, GuestAddress(at)).unwrap();
        }
        h.driver.queues[0].make_available(&mem, head);
        let before = snapshot(h);
        let (id, _len) = run_one(h)?;
        prop_assert_eq!(id, u32::from(head));
        let mut allowed: Vec<(u64, u64)> = table
            .iter()
            .chain(indirect.iter())
            .filter(|d| d.flags & VIRTQ_DESC_F_WRITE != 0 && d.flags & VIRTQ_DESC_F_INDIRECT == 0)
            .map(|d| (d.addr, u64::from(d.len)))
            .collect();
        allowed.push(used_ring_range(h));
        check_writes(&before, &snapshot(h), &allowed)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let h = &mut *cell.borrow_mut();
    // Still serving well-formed requests afterwards.
    write_header(h, (VIRTIO_BLK_T_IN, 0));
    h.mem()
        .write_obj(0xffu8, GuestAddress(STATUS_ADDR))
        .unwrap();
    h.driver.add_chain(
        0,
        &[
            (HDR_ADDR, 16, false),
            (DATA_ADDR, 512, true),
            (STATUS_ADDR, 1, true),
        ],
    );
    assert_eq!(h.kick_and_wait(0, 1)[0].1, 513);
    assert_eq!(h.read(STATUS_ADDR, 1)[0], VIRTIO_BLK_S_OK);
}

#[test]
fn request_shaped_chains_get_a_valid_status() {
    let path = image("requests");
    let cell = RefCell::new(harness(&path));
    let data = (addr_strategy(), len_strategy(), any::<bool>());
    let status = (
        prop_oneof![4 => Just(STATUS_ADDR), 1 => addr_strategy()],
        prop_oneof![4 => Just(1u32), 1 => Just(0u32), 1 => 1..600u32],
        prop_oneof![5 => Just(true), 1 => Just(false)],
    );
    // How many chains ended with each status (0..=2) or were dropped (3): the generator must
    // reach every outcome, or the property says little.
    let outcomes = RefCell::new([0u32; 4]);
    let strategy = (
        header_strategy(),
        prop_oneof![4 => Just(16u32), 1 => 0..40u32],
        proptest::collection::vec(data, 0..4),
        status,
    );
    let mut runner = TestRunner::new(Config {
        cases: 1000,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(
        &strategy,
        |(hdr, hdr_len, data, (s_addr, s_len, s_write))| {
            let mut guard = cell.borrow_mut();
            let h = &mut *guard;
            write_header(h, hdr);
            h.mem()
                .write_obj(0xeeu8, GuestAddress(STATUS_ADDR))
                .unwrap();
            let mut chain = vec![(HDR_ADDR, hdr_len, false)];
            chain.extend(data.iter().copied());
            chain.push((s_addr, s_len, s_write));
            h.driver.add_chain(0, &chain);
            let before = snapshot(h);
            let (_, used_len) = run_one(h)?;

            let mut allowed: Vec<(u64, u64)> = chain
                .iter()
                .filter(|c| c.2)
                .map(|c| (c.0, u64::from(c.1)))
                .collect();
            allowed.push(used_ring_range(h));
            check_writes(&before, &snapshot(h), &allowed)?;

            let status_at = s_addr
                .checked_add(u64::from(s_len))
                .and_then(|e| e.checked_sub(1));
            // Chains over 4 GiB in total are illegal (2.7.5.2) and dropped like other broken ones.
            let chain_len: u64 = chain.iter().map(|c| u64::from(c.1)).sum();
            let status_ok = s_write
                && s_len >= 1
                && status_at.is_some_and(|a| a < MEM_SIZE)
                && chain_len <= u64::from(u32::MAX);
            if !status_ok {
                outcomes.borrow_mut()[3] += 1;
                prop_assert_eq!(used_len, 0);
                return Ok(());
            }
            let writable: u64 = chain.iter().filter(|c| c.2).map(|c| u64::from(c.1)).sum();
            prop_assert!(used_len >= 1 && u64::from(used_len) <= writable);
            let status = h.read(status_at.unwrap_or(0), 1)[0];
            prop_assert!(
                [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP].contains(&status),
                "status {status}"
            );
            outcomes.borrow_mut()[usize::from(status)] += 1;
            // A request shaped exactly like a valid read of in-range sectors must succeed.
            let (type_, sector) = hdr;
            let in_mem =
                |a: u64, l: u32| a.checked_add(u64::from(l)).is_some_and(|e| e <= MEM_SIZE);
            if type_ == VIRTIO_BLK_T_IN
                && hdr_len == 16
                && s_len == 1
                && !data.is_empty()
                && data
                    .iter()
                    .all(|d| d.2 && d.1 % 512 == 0 && in_mem(d.0, d.1))
            {
                let total: u64 = data.iter().map(|d| u64::from(d.1)).sum();
                if sector
                    .checked_add(total / 512)
                    .is_some_and(|e| e <= SECTORS)
                {
                    prop_assert_eq!(status, VIRTIO_BLK_S_OK);
                    prop_assert_eq!(u64::from(used_len), total + 1);
                }
            }
            Ok(())
        },
    );
    if let Err(e) = result {
        panic!("{e}");
    }
    let outcomes = outcomes.into_inner();
    eprintln!("outcomes (OK, IOERR, UNSUPP, dropped): {outcomes:?}");
    assert!(outcomes.iter().all(|&n| n > 0), "outcomes {outcomes:?}");
}
