//! Shared-disk fault tolerance: the real virtio-blk device behind the real epoch-holding disk
//! gate, stacked as the VMM stacks them. Writes are held until their epoch commits, yet the guest
//! must read back what it wrote (even after a FLUSH) before that commit.

mod common;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use devices::gate::{DiskOutputGate, EpochControl, EpochDiskGate, RecordingDiskGate};
use devices::virtio::block::*;
use devices::virtio::VIRTIO_F_VERSION_1;

const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX;
const MEM_SIZE: usize = 8 << 20;
const SECTOR: usize = SECTOR_SIZE as usize;

/// A fresh image of `size` bytes whose content depends on the offset.
fn image(name: &str, size: usize) -> (PathBuf, Vec<u8>) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("blk-shared-{}-{n}-{name}.img", std::process::id()));
    let data: Vec<u8> = (0..size).map(|i| (i / SECTOR) as u8 ^ (i as u8)).collect();
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

/// Stands in for a moment while the device's own gate is taken out to be wrapped.
struct Detached;

impl DiskOutputGate for Detached {
    fn write_at(&mut self, _: u64, _: &[u8]) -> io::Result<()> {
        Err(io::Error::other("detached"))
    }
    fn flush(&mut self) -> io::Result<()> {
        Err(io::Error::other("detached"))
    }
}

/// A device whose writes are held per epoch from epoch 1 on: its own gate wrapped in the
/// holding gate, wrapped in the recorder, as protection in shared-disk mode installs them.
/// `None` when O_DIRECT was asked for and the filesystem lacks it.
fn protected_block(path: &Path, direct: bool) -> Option<(Harness, EpochControl)> {
    let mut cfg = BlockConfig::new(path);
    cfg.direct = direct;
    let mut dev = match Block::new(cfg) {
        Ok(d) => d,
        Err(BlockError::DirectUnsupported(_)) => return None,
        Err(e) => panic!("{e}"),
    };
    let inner = dev.set_output_gate(Box::new(Detached));
    let (held, ctl) = EpochDiskGate::new(inner, 1);
    let (recorder, _log) = RecordingDiskGate::new(Box::new(held));
    dev.set_output_gate(Box::new(recorder));
    let mut h = Harness::new(Arc::new(Mutex::new(dev)), MEM_SIZE);
    assert!(h.activate(FEATURES, &[64]));
    Some((h, ctl))
}

/// Submits one request; returns its status byte.
fn request(h: &mut Harness, type_: u32, sector: u64, data: &[(u64, u32, bool)]) -> u8 {
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&type_.to_le_bytes());
    hdr[8..16].copy_from_slice(&sector.to_le_bytes());
    let hdr = h.buffer_with(&hdr);
    let status = h.buffer_with(&[0xff]);
    let mut chain = vec![(hdr, 16, false)];
    chain.extend_from_slice(data);
    chain.push((status, 1, true));
    let head = h.driver.add_chain(0, &chain);
    let used = h.kick_and_wait(0, 1);
    assert_eq!(used.len(), 1, "no used entry");
    assert_eq!(used[0].0, u32::from(head));
    h.read(status, 1)[0]
}

fn write(h: &mut Harness, sector: u64, data: &[u8]) {
    let buf = h.buffer_with(data);
    let status = request(
        h,
        VIRTIO_BLK_T_OUT,
        sector,
        &[(buf, data.len() as u32, false)],
    );
    assert_eq!(status, VIRTIO_BLK_S_OK, "write at sector {sector}");
}

fn flush(h: &mut Harness) {
    assert_eq!(request(h, VIRTIO_BLK_T_FLUSH, 0, &[]), VIRTIO_BLK_S_OK);
}

fn read(h: &mut Harness, sector: u64, len: usize) -> Vec<u8> {
    let buf = h.buffer(len);
    let status = request(h, VIRTIO_BLK_T_IN, sector, &[(buf, len as u32, true)]);
    assert_eq!(status, VIRTIO_BLK_S_OK, "read at sector {sector}");
    h.read(buf, len)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i * 7) as u8) | 1)
        .collect()
}

/// `image` with `data` placed at `sector`.
fn patched(mut image: Vec<u8>, sector: u64, data: &[u8]) -> Vec<u8> {
    let at = sector as usize * SECTOR;
    image[at..at + data.len()].copy_from_slice(data);
    image
}

/// Compares byte buffers, reporting the first difference rather than dumping both.
#[track_caller]
fn same(got: &[u8], want: &[u8], what: &str) {
    let first = got.iter().zip(want).position(|(a, b)| a != b);
    assert!(
        got.len() == want.len() && first.is_none(),
        "{what}: got {} bytes, want {}, first difference at byte {first:?}",
        got.len(),
        want.len()
    );
}

/// The guest reads `want.len()` bytes at `sector` and must get `want`.
#[track_caller]
fn reads(h: &mut Harness, sector: u64, want: &[u8], what: &str) {
    let got = read(h, sector, want.len());
    same(
        &got,
        want,
        &format!("guest read at sector {sector}: {what}"),
    );
}

/// The image file holds exactly `want`.
#[track_caller]
fn image_is(path: &Path, want: &[u8], what: &str) {
    let got = std::fs::read(path).unwrap();
    same(&got, want, &format!("image: {what}"));
}

/// Bytes of `data` from sector `from` up to sector `to`.
fn sectors(data: &[u8], from: usize, to: usize) -> &[u8] {
    &data[from * SECTOR..to * SECTOR]
}

fn reads_see_held_writes(direct: bool) {
    let (path, original) = image(if direct { "direct" } else { "rw" }, 64 * 1024);
    let Some((mut h, ctl)) = protected_block(&path, direct) else {
        eprintln!("SKIPPED reads_see_held_writes (direct): O_DIRECT unsupported here");
        return;
    };

    // Write, FLUSH: the write completed for the guest but is held, not on the image.
    let new = pattern(1, 4 * SECTOR);
    write(&mut h, 4, &new);
    flush(&mut h);
    image_is(&path, &original, "held, not written yet");
    reads(&mut h, 4, &new, "its own write before commit");

    // Commit: now the image has it, and reads still agree.
    ctl.begin_epoch(2).unwrap();
    ctl.commit(1).unwrap();
    let expect = patched(original, 4, &new);
    image_is(&path, &expect, "written at commit");
    reads(&mut h, 4, &new, "after commit");
    reads(&mut h, 0, &expect, "whole disk after commit");
}

#[test]
fn reads_see_held_writes_before_commit() {
    reads_see_held_writes(false);
}

#[test]
fn reads_see_held_writes_with_direct_io() {
    reads_see_held_writes(true);
}

#[test]
fn partial_overlaps_mix_image_and_held_data() {
    let (path, original) = image("partial", 1 << 20);
    let (mut h, ctl) = protected_block(&path, false).unwrap();
    let a = pattern(2, 2 * SECTOR);
    write(&mut h, 10, &a);
    // A held write across the device's 256 KiB bounce-chunk boundary (sector 512).
    let b = pattern(3, 4 * SECTOR);
    write(&mut h, 510, &b);
    let expect = patched(patched(original.clone(), 10, &a), 510, &b);

    // Reads that cover a held write only in part, on either side, or contain it.
    reads(&mut h, 8, sectors(&expect, 8, 16), "contains a held write");
    reads(
        &mut h,
        11,
        sectors(&expect, 11, 15),
        "starts inside a held write",
    );
    reads(
        &mut h,
        6,
        sectors(&expect, 6, 11),
        "ends inside a held write",
    );
    // One request spanning several chunks, with held data in two of them.
    reads(&mut h, 0, sectors(&expect, 0, 600), "across bounce chunks");
    image_is(&path, &original, "held, not written yet");

    ctl.begin_epoch(2).unwrap();
    ctl.commit(1).unwrap();
    image_is(&path, &expect, "written at commit");
    reads(&mut h, 0, sectors(&expect, 0, 600), "after commit");
}

#[test]
fn overlapping_writes_from_two_epochs_newest_wins() {
    let (path, original) = image("epochs", 64 * 1024);
    let (mut h, ctl) = protected_block(&path, false).unwrap();

    // Epoch 1 writes sectors 20..24 (twice: the later write wins within the epoch too).
    write(&mut h, 20, &pattern(4, 4 * SECTOR));
    let a = pattern(5, 4 * SECTOR);
    write(&mut h, 20, &a);
    flush(&mut h);
    // Epoch 2 overwrites 22..26, half of it over epoch 1's write.
    ctl.begin_epoch(2).unwrap();
    let b = pattern(6, 4 * SECTOR);
    write(&mut h, 22, &b);
    flush(&mut h);

    let after_1 = patched(original.clone(), 20, &a);
    let after_2 = patched(after_1.clone(), 22, &b);
    reads(&mut h, 18, sectors(&after_2, 18, 28), "two epochs held");
    image_is(&path, &original, "both epochs held");

    // Epoch 1 commits: its data is on the image, epoch 2's still held and still on top.
    ctl.begin_epoch(3).unwrap();
    ctl.commit(1).unwrap();
    image_is(&path, &after_1, "epoch 1 written");
    reads(&mut h, 18, sectors(&after_2, 18, 28), "epoch 2 still held");

    ctl.commit(2).unwrap();
    image_is(&path, &after_2, "both epochs written");
    reads(&mut h, 0, &after_2, "whole disk after both commits");
}
