//! Snapshot directory: round trip through real guest memory, and every kind of damage is
//! refused with a one-line error before anything is written into the target VM's memory.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::config::{MemoryConfig, VmConfig};
use vmm::memory::GuestMemoryMmap;
use vmm::migration::snapshot::{CONFIG_FILE, MEMORY_FILE, SNAPSHOT_VERSION, STATE_FILE};
use vmm::migration::{read_snapshot, write_snapshot, DirtyPages, SnapshotError, PAGE_SIZE};

const MEM_SIZE: u64 = 64 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct DummyState {
    vcpus: Vec<DummyVcpu>,
    clock: u64,
    name: String,
    ratio: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct DummyVcpu {
    rip: u64,
    regs: Vec<u64>,
    msrs: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OtherState {
    #[allow(dead_code)]
    something_else: u32,
}

fn state() -> DummyState {
    DummyState {
        vcpus: (0..2)
            .map(|i| DummyVcpu {
                rip: 0xffff_ffff_8100_0000 + i,
                regs: (0..16).map(|r| r * 0x1111 + i).collect(),
                msrs: [
                    ("0xc0000080".to_string(), 0xd01),
                    ("0x10".to_string(), u64::MAX),
                ]
                .into_iter()
                .collect(),
            })
            .collect(),
        clock: 123_456_789,
        name: "vm \"one\"\n".to_string(),
        ratio: 0.1 + 0.2,
    }
}

fn config() -> VmConfig {
    VmConfig {
        memory: MemoryConfig::with_size(MEM_SIZE),
        ..VmConfig::default()
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "tandem-migration-snapshot-{}-{name}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&p);
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn source_memory() -> GuestMemoryMmap {
    let mem = vmm::memory::create(MEM_SIZE).unwrap();
    // A few scattered non-zero pages and a larger patterned area; the rest stays zero.
    for page in [0u64, 1, 7, 4095, (MEM_SIZE / PAGE_SIZE as u64) - 1] {
        let gpa = GuestAddress(page * PAGE_SIZE as u64);
        mem.write_slice(&page.to_le_bytes().repeat(PAGE_SIZE / 8), gpa)
            .unwrap();
    }
    let pattern: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i * 7 + 3) as u8).collect();
    mem.write_slice(&pattern, GuestAddress(8 << 20)).unwrap();
    mem
}

fn assert_same(a: &GuestMemoryMmap, b: &GuestMemoryMmap) {
    let mut x = vec![0u8; 1 << 20];
    let mut y = vec![0u8; 1 << 20];
    for r in a.iter() {
        let mut off = 0;
        while off < r.len() {
            let gpa = GuestAddress(r.start_addr().0 + off);
            a.read_slice(&mut x, gpa).unwrap();
            b.read_slice(&mut y, gpa).unwrap();
            assert!(x == y, "memory differs in the MiB at {:#x}", gpa.0);
            off += x.len() as u64;
        }
    }
}

/// Target memory never written: all zero and no dirty bit.
fn assert_untouched(mem: &GuestMemoryMmap) {
    assert!(
        DirtyPages::from_bitmaps(&[], mem, true).unwrap().is_empty(),
        "the target memory's dirty bitmap has bits set"
    );
    let mut buf = vec![0u8; 1 << 20];
    for r in mem.iter() {
        let mut off = 0;
        while off < r.len() {
            mem.read_slice(&mut buf, GuestAddress(r.start_addr().0 + off))
                .unwrap();
            assert!(buf.iter().all(|b| *b == 0), "the target memory was written");
            off += buf.len() as u64;
        }
    }
}

/// What a restore does: read (all checks), then load into the VM's memory.
fn restore(dir: &Path, target: &GuestMemoryMmap) -> Result<DummyState, SnapshotError> {
    let (cfg, st, image) = read_snapshot::<DummyState>(dir)?;
    assert_eq!(cfg, config());
    image.load_into(target)?;
    Ok(st)
}

fn snapshot(name: &str) -> (TempDir, GuestMemoryMmap) {
    let dir = TempDir::new(name);
    let mem = source_memory();
    write_snapshot(&dir.0, &config(), &state(), &mem).unwrap();
    (dir, mem)
}

fn expect_error(dir: &Path, needles: &[&str]) -> String {
    let target = vmm::memory::create(MEM_SIZE).unwrap();
    let e = restore(dir, &target).unwrap_err().to_string();
    for n in needles {
        assert!(e.contains(n), "error {e:?} lacks {n:?}");
    }
    assert!(!e.contains('\n'), "error is not one line: {e:?}");
    assert_untouched(&target);
    e
}

#[test]
fn round_trip() {
    let (dir, mem) = snapshot("round-trip");
    let mut names: Vec<String> = fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, [CONFIG_FILE, MEMORY_FILE, STATE_FILE]);
    assert_eq!(
        fs::metadata(dir.0.join(MEMORY_FILE)).unwrap().len(),
        MEM_SIZE
    );
    let header: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.0.join(STATE_FILE)).unwrap()).unwrap();
    assert_eq!(header["format"], "tandem-snapshot");
    assert_eq!(header["version"], SNAPSHOT_VERSION);
    assert_eq!(header["memory"]["file"], "memory-ranges");
    assert_eq!(header["memory"]["ranges"][0]["gpa"], 0);
    assert_eq!(header["memory"]["ranges"][0]["len"], MEM_SIZE);
    assert_eq!(header["checksum"].as_str().unwrap().len(), 8);
    assert_eq!(header["state"]["clock"], 123_456_789);

    let target = vmm::memory::create(MEM_SIZE).unwrap();
    let st = restore(&dir.0, &target).unwrap();
    assert_eq!(st, state());
    assert_same(&mem, &target);
    // The load went through vm-memory: the target's dirty bitmap saw it.
    assert_eq!(
        DirtyPages::from_bitmaps(&[], &target, true).unwrap(),
        DirtyPages::all(&target).unwrap()
    );
}

#[test]
fn overwriting_a_snapshot_replaces_it() {
    let (dir, _) = snapshot("overwrite");
    let mem = vmm::memory::create(MEM_SIZE).unwrap();
    mem.write_slice(b"second", GuestAddress(0x5000)).unwrap();
    let mut st = state();
    st.clock = 1;
    write_snapshot(&dir.0, &config(), &st, &mem).unwrap();
    let target = vmm::memory::create(MEM_SIZE).unwrap();
    assert_eq!(restore(&dir.0, &target).unwrap(), st);
    assert_same(&mem, &target);
    assert!(fs::read_dir(&dir.0).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".tmp")));
}

#[test]
fn truncated_memory_file() {
    let (dir, _) = snapshot("truncated");
    let f = fs::OpenOptions::new()
        .write(true)
        .open(dir.0.join(MEMORY_FILE))
        .unwrap();
    f.set_len(1000).unwrap();
    let e = expect_error(
        &dir.0,
        &["memory-ranges is 1000 bytes, the snapshot records 67108864"],
    );
    println!("{e}");
}

#[test]
fn flipped_byte_in_memory() {
    let (dir, _) = snapshot("flipped");
    let path = dir.0.join(MEMORY_FILE);
    let mut bytes = fs::read(&path).unwrap();
    bytes[30 << 20] ^= 0x40;
    fs::write(&path, bytes).unwrap();
    let e = expect_error(&dir.0, &["memory-ranges: checksum mismatch (expected "]);
    println!("{e}");
}

#[test]
fn edited_state() {
    let (dir, _) = snapshot("edited-state");
    let path = dir.0.join(STATE_FILE);
    let text = fs::read_to_string(&path).unwrap();
    let edited = text.replace("123456789", "123456780");
    assert_ne!(text, edited);
    fs::write(&path, edited).unwrap();
    let e = expect_error(&dir.0, &["state.json: checksum mismatch (expected "]);
    println!("{e}");
}

#[test]
fn reformatted_state_still_restores() {
    // The checksum covers the state's canonical bytes, not the file's layout.
    let (dir, mem) = snapshot("reformatted");
    let path = dir.0.join(STATE_FILE);
    let v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let target = vmm::memory::create(MEM_SIZE).unwrap();
    assert_eq!(restore(&dir.0, &target).unwrap(), state());
    assert_same(&mem, &target);
}

#[test]
fn edited_config() {
    let (dir, _) = snapshot("edited-config");
    let path = dir.0.join(CONFIG_FILE);
    let text = fs::read_to_string(&path).unwrap();
    fs::write(
        &path,
        text.replace("\"boot_vcpus\": 1", "\"boot_vcpus\": 2"),
    )
    .unwrap();
    expect_error(&dir.0, &["config.json: checksum mismatch"]);
}

#[test]
fn wrong_version_and_format() {
    let (dir, _) = snapshot("version");
    let path = dir.0.join(STATE_FILE);
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, text.replacen("\"version\": 2", "\"version\": 7", 1)).unwrap();
    let e = expect_error(
        &dir.0,
        &[
            "unsupported snapshot version 7 (this VMM reads version 2)",
            "state.json",
        ],
    );
    println!("{e}");
    fs::write(&path, text.replacen("tandem-snapshot", "other-thing", 1)).unwrap();
    expect_error(&dir.0, &["state.json: not a tandem-snapshot file"]);
    fs::write(&path, "{ not json").unwrap();
    expect_error(&dir.0, &["state.json: invalid JSON"]);
}

#[test]
fn missing_files() {
    for file in [STATE_FILE, CONFIG_FILE, MEMORY_FILE] {
        let (dir, _) = snapshot(&format!("missing-{file}"));
        fs::remove_file(dir.0.join(file)).unwrap();
        let e = expect_error(&dir.0, &[file, "cannot open"]);
        println!("{e}");
    }
}

#[test]
fn state_of_another_shape() {
    let (dir, _) = snapshot("shape");
    let e = read_snapshot::<OtherState>(&dir.0).unwrap_err().to_string();
    assert!(
        e.contains("state.json: the state does not fit this VMM's state layout"),
        "{e}"
    );
}

#[test]
fn ranges_must_match_the_config() {
    let (dir, _) = snapshot("ranges");
    // A config edited consistently with its checksum still has to match the memory ranges.
    let cfg_path = dir.0.join(CONFIG_FILE);
    let mut cfg = config();
    cfg.memory.size = 2 * MEM_SIZE;
    let mut json = serde_json::to_vec_pretty(&cfg).unwrap();
    json.push(b'\n');
    fs::write(&cfg_path, &json).unwrap();
    let state_path = dir.0.join(STATE_FILE);
    let mut header: serde_json::Value =
        serde_json::from_slice(&fs::read(&state_path).unwrap()).unwrap();
    header["config"]["checksum"] = format!("{:08x}", crc32(&json)).into();
    fs::write(&state_path, serde_json::to_vec_pretty(&header).unwrap()).unwrap();
    let target = vmm::memory::create(MEM_SIZE).unwrap();
    let e = read_snapshot::<DummyState>(&dir.0).unwrap_err().to_string();
    assert!(e.contains("state.json: bad memory ranges"), "{e}");
    assert!(e.contains("memory.size is 134217728"), "{e}");
    assert_untouched(&target);
}

#[test]
fn memory_of_another_layout_is_not_touched() {
    let (dir, _) = snapshot("layout");
    let (_, _, image) = read_snapshot::<DummyState>(&dir.0).unwrap();
    let other = vmm::memory::create(2 * MEM_SIZE).unwrap();
    let e = image.load_into(&other).unwrap_err().to_string();
    assert!(
        e.contains("guest memory does not match the snapshot"),
        "{e}"
    );
    assert_untouched(&other);
}

#[test]
fn interrupted_write_is_not_a_snapshot() {
    // A crash before the final rename leaves no state.json: the directory does not restore.
    let (dir, _) = snapshot("interrupted");
    fs::rename(dir.0.join(STATE_FILE), dir.0.join("state.json.tmp")).unwrap();
    expect_error(&dir.0, &["state.json", "cannot open"]);
}

fn crc32(bytes: &[u8]) -> u32 {
    // Bitwise CRC-32 (IEEE), independent of the implementation under test.
    let mut crc = !0u32;
    for b in bytes {
        crc ^= u32::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Prints snapshot write / verify+load rates for 1 GiB of non-zero memory:
/// `cargo test --release -p vmm --test migration_snapshot throughput -- --ignored --nocapture`.
#[test]
#[ignore]
fn throughput_1gib() {
    const SIZE: u64 = 1 << 30;
    let dir = TempDir::new("throughput");
    let mem = vmm::memory::create(SIZE).unwrap();
    let chunk: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 31 + 7) as u8).collect();
    let mut off = 0;
    while off < SIZE {
        mem.write_slice(&chunk, GuestAddress(off)).unwrap();
        off += chunk.len() as u64;
    }
    let cfg = VmConfig {
        memory: MemoryConfig::with_size(SIZE),
        ..VmConfig::default()
    };
    let t = std::time::Instant::now();
    write_snapshot(&dir.0, &cfg, &state(), &mem).unwrap();
    let write = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let (_, _, image) = read_snapshot::<DummyState>(&dir.0).unwrap();
    let verify = t.elapsed().as_secs_f64();
    let target = vmm::memory::create(SIZE).unwrap();
    let t = std::time::Instant::now();
    image.load_into(&target).unwrap();
    let load = t.elapsed().as_secs_f64();
    let mb = SIZE as f64 / 1e6;
    println!(
        "1 GiB snapshot: write (incl. fsync) {:.0} MB/s, read+verify {:.0} MB/s, load into fresh memory {:.0} MB/s",
        mb / write,
        mb / verify,
        mb / load
    );
}

/// A NIC that was a passed TAP descriptor cannot be restored: the number belonged to the
/// process that took the snapshot.
#[test]
fn a_nic_given_by_descriptor_is_refused_at_restore() {
    let dir = TempDir::new("passed_tap");
    let mem = vmm::memory::create(MEM_SIZE).unwrap();
    let cfg = VmConfig {
        net: Some(vec![vmm::config::NetConfig {
            fds: Some(vec![7]),
            id: Some("net0".into()),
            ..Default::default()
        }]),
        ..config()
    };
    write_snapshot(&dir.0, &cfg, &state(), &mem).unwrap();
    let e = read_snapshot::<DummyState>(&dir.0).unwrap_err().to_string();
    assert!(e.contains("network interface net0"), "{e}");
    assert!(e.contains("net_fds"), "{e}");
}
