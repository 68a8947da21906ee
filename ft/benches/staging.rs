//! The pause's staging work (hot pages' compares, then the copy of each changed page into the
//! staging memory) done by the control loop alone and shared with the `ft-stage` helper,
//! side by side in one run.
//!
//! No guest and no KVM: a 256 MiB memory whose epochs look like the FT benchmark's 1000
//! pages/10 ms cell on the 2-core test host (about 1800 kept pages reported, of which about
//! 550 changed, plus a case without kept pages: 600 pages copied). Each epoch rewrites the
//! changed pages' first bytes and then writes 64 MiB elsewhere (not timed), so the pages
//! come to the pause out of the caches, as in a VM whose guest runs on another core; then
//! it stages the epoch (timed). The cases take turns within each run (the order rotating), so
//! they see the same machine.
//!
//! Run: `cargo bench -p ft --bench staging [-- --runs N --epochs N]` (`ci/bench-ft` runs it
//! unless `--no-pipeline`).

use std::time::Instant;

use ft::primary::staging::StagingCopier;
use vm_memory::{Bytes, GuestAddress};
use vmm::migration::memory::{DirtyPages, PAGE_SIZE};

#[path = "../../vmm/benches/support/mod.rs"]
mod support;

const MEMORY: u64 = 256 << 20;
/// The dirty region's first page (pages of the epochs are spread over 32 MiB from there).
const REGION: u64 = 1 << 14;

struct Args {
    runs: usize,
    epochs: u64,
}

fn args() -> Args {
    let flags = support::Flags::parse(&["--runs", "--epochs"]);
    Args {
        runs: flags.count("--runs", 1, 3) as usize,
        epochs: flags.count("--epochs", 60, 150),
    }
}

fn page(p: u64) -> GuestAddress {
    GuestAddress(p * PAGE_SIZE as u64)
}

/// An epoch shape: `kept` pages reported every epoch (compared), `changed` of them rewritten,
/// and `copied` other pages rewritten (copied without a compare).
#[derive(Clone, Copy)]
struct Shape {
    name: &'static str,
    kept: u64,
    changed: u64,
    copied: u64,
}

const SHAPES: [Shape; 2] = [
    Shape {
        name: "1800 kept, 550 changed",
        kept: 1800,
        changed: 550,
        copied: 0,
    },
    Shape {
        name: "600 copied, none kept",
        kept: 0,
        changed: 0,
        copied: 600,
    },
];

/// Median microseconds per epoch staged with or without the helper.
fn measure(shape: Shape, helped: bool, epochs: u64) -> f64 {
    let guest = vmm::memory::create(MEMORY).expect("memory");
    let staging = vmm::memory::create(MEMORY).expect("memory");
    let mut copier = if helped {
        StagingCopier::start(&guest, &staging, || true)
    } else {
        StagingCopier::alone()
    };
    // Kept pages every 4th page of the region, copied ones in between (8192 pages = 32 MiB).
    let kept: Vec<GuestAddress> = (0..shape.kept).map(|i| page(REGION + 4 * i)).collect();
    let fill = vec![0x5au8; PAGE_SIZE];
    for &gpa in &kept {
        guest.write_slice(&fill, gpa).expect("fill");
        staging.write_slice(&fill, gpa).expect("fill");
    }
    let mut evict = vec![0u8; 64 << 20];
    let mut times = Vec::new();
    for epoch in 0..epochs {
        let mut reported = kept.clone();
        // A different window of the kept pages changes each epoch.
        for i in 0..shape.changed {
            let k = (epoch * shape.changed + i) % shape.kept.max(1);
            guest
                .write_slice(&epoch.to_le_bytes(), kept[k as usize])
                .expect("rewrite");
        }
        for i in 0..shape.copied {
            let gpa = page(REGION + 1 + ((epoch * shape.copied + i) * 4) % 8192);
            guest
                .write_slice(&epoch.to_le_bytes(), gpa)
                .expect("rewrite");
            reported.push(gpa);
        }
        let (set, _) = DirtyPages::from_pages(&guest, reported).expect("dirty set");
        evict.fill(epoch as u8);
        std::hint::black_box(&evict);
        let started = Instant::now();
        let staged = copier.stage(&guest, &staging, &set, &kept).expect("stage");
        times.push(started.elapsed().as_secs_f64() * 1e6);
        assert_eq!(
            staged.unchanged.len() as u64,
            shape.kept - shape.changed.min(shape.kept)
        );
    }
    support::median(times)
}

fn main() {
    let args = args();
    println!(
        "FT pause staging: {} epochs per case, {} run(s), median µs per epoch staged; {}; nothing else running",
        args.epochs,
        args.runs,
        support::machine()
    );
    println!();
    println!(
        "{:<24} | {:>14} | {:>14} | {:>15}",
        "epoch", "alone µs", "helper µs", "helper / alone"
    );
    println!("{}", "-".repeat(76));
    for shape in SHAPES {
        let (mut alone, mut helped) = (Vec::new(), Vec::new());
        for run in 0..args.runs {
            if run % 2 == 0 {
                alone.push(measure(shape, false, args.epochs));
                helped.push(measure(shape, true, args.epochs));
            } else {
                helped.push(measure(shape, true, args.epochs));
                alone.push(measure(shape, false, args.epochs));
            }
        }
        let (a, h) = (support::median(alone), support::median(helped));
        println!(
            "{:<24} | {:>14.1} | {:>14.1} | {:>15.3}",
            shape.name,
            a,
            h,
            h / a
        );
    }
}
