//! The snapshot directory (`vm.snapshot` / `vm.restore` with `file:///abs/dir`):
//!
//! - `config.json`: the `VmConfig`, pretty JSON;
//! - `state.json`: a header naming the format, its version and checksums, with the VM state:
//!   `{"format": "tandem-snapshot", "version": 1, "checksum": "<crc32 of the state>",
//!     "config": {"file": "config.json", "checksum": "<crc32 of the file>"},
//!     "memory": {"file": "memory-ranges", "ranges": [{"gpa": .., "len": ..}],
//!                "checksum": "<crc32 of the file>"},
//!     "state": <S>}`;
//! - `memory-ranges`: guest RAM, the recorded ranges one after the other, raw.
//!
//! Checksums are CRC-32 (IEEE), written as 8 lowercase hex digits. The state checksum covers
//! the canonical bytes of the state: its compact JSON with object keys sorted (serde_json's
//! `Value` order), which a reader re-creates from the parsed file.
//!
//! Every file is written under a temporary name, synced and renamed; `state.json` is renamed
//! last (after the old one is removed), so a directory whose `state.json` checks out is a
//! complete snapshot, and a crash mid-write leaves one that fails to restore with an error.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::VmConfig;
use crate::memory::GuestMemoryMmap;

pub const SNAPSHOT_FORMAT: &str = "tandem-snapshot";
/// 2: the machine is Cloud Hypervisor's (virtio-pci devices, a virtio-rng by default), so
/// device states carry PCI configuration space and MSI-X; a version-1 (virtio-mmio) snapshot
/// cannot be restored into it.
pub const SNAPSHOT_VERSION: u32 = 2;
pub const CONFIG_FILE: &str = "config.json";
pub const STATE_FILE: &str = "state.json";
pub const MEMORY_FILE: &str = "memory-ranges";
const TMP_SUFFIX: &str = ".tmp";
/// Guest memory is copied to and from files in chunks of this size.
const IO_CHUNK: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("invalid snapshot URL {url:?}: {reason}")]
    Url { url: String, reason: &'static str },
    #[error("{}: {action}: {source}", file.display())]
    Io {
        file: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error("{}: invalid JSON: {source}", file.display())]
    Json {
        file: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot serialize the {what}: {source}")]
    Serialize {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("{}: not a {SNAPSHOT_FORMAT} file (format {found:?})", file.display())]
    Format { file: PathBuf, found: String },
    #[error(
        "{}: unsupported snapshot version {found} (this VMM reads version {SNAPSHOT_VERSION})",
        file.display()
    )]
    Version { file: PathBuf, found: u64 },
    #[error(
        "{}: network interface {net} was a TAP descriptor passed to the VMM that took the \
         snapshot (fds); descriptor numbers mean nothing in this process, and passing new ones \
         at restore (net_fds) is not supported",
        file.display()
    )]
    PassedTap { file: PathBuf, net: String },
    #[error("{}: checksum mismatch (expected {expected:08x}, got {actual:08x})", file.display())]
    Checksum {
        file: PathBuf,
        expected: u32,
        actual: u32,
    },
    #[error("{}: invalid checksum {found:?} (expected 8 hex digits)", file.display())]
    ChecksumSyntax { file: PathBuf, found: String },
    #[error("{}: the state does not fit this VMM's state layout: {source}", file.display())]
    StateShape {
        file: PathBuf,
        source: serde_json::Error,
    },
    #[error("{} is {actual} bytes, the snapshot records {expected}", file.display())]
    MemorySize {
        file: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error("{}: bad memory ranges: {reason}", file.display())]
    Ranges { file: PathBuf, reason: String },
    #[error("guest memory does not match the snapshot: {0}")]
    Layout(String),
    #[error("{}: copying guest memory at {gpa:#x}: {source}", file.display())]
    GuestMemory {
        file: PathBuf,
        gpa: u64,
        source: vm_memory::GuestMemoryError,
    },
}

/// One range of guest physical memory stored in `memory-ranges`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRange {
    pub gpa: u64,
    pub len: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRef {
    file: String,
    checksum: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoryHeader {
    file: String,
    ranges: Vec<MemoryRange>,
    checksum: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    format: String,
    version: u32,
    checksum: String,
    config: FileRef,
    memory: MemoryHeader,
    state: serde_json::Value,
}

/// Parses a snapshot URL: `file:///absolute/dir` (as Cloud Hypervisor's `destination_url` /
/// `source_url`). Anything else is rejected with the reason.
pub fn parse_file_url(url: &str) -> Result<PathBuf, SnapshotError> {
    let err = |reason| SnapshotError::Url {
        url: url.to_string(),
        reason,
    };
    let rest = match url.split_once("://") {
        Some(("file", rest)) => rest,
        Some(_) => return Err(err("only file:// URLs are supported")),
        None => return Err(err("expected file:///absolute/path")),
    };
    if !rest.starts_with('/') {
        return Err(err(
            "a file URL needs an absolute path and no host (file:///absolute/path)",
        ));
    }
    if rest.contains(['?', '#']) {
        return Err(err("query and fragment are not supported"));
    }
    let path = rest.trim_end_matches('/');
    if path.is_empty() {
        return Err(err("the root directory cannot be a snapshot directory"));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(err("'..' is not allowed in the path"));
    }
    Ok(PathBuf::from(path))
}

fn checksum_hex(c: u32) -> String {
    format!("{c:08x}")
}

fn parse_checksum(file: &Path, s: &str) -> Result<u32, SnapshotError> {
    if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SnapshotError::ChecksumSyntax {
            file: file.to_path_buf(),
            found: s.to_string(),
        });
    }
    u32::from_str_radix(s, 16).map_err(|_| SnapshotError::ChecksumSyntax {
        file: file.to_path_buf(),
        found: s.to_string(),
    })
}

/// The canonical bytes of a state value: its compact JSON (object keys sorted, as
/// serde_json's `Value` keeps them).
fn canonical_state_bytes(value: &serde_json::Value) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(value)
}

fn io_err<'a>(
    file: &'a Path,
    action: &'static str,
) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        file: file.to_path_buf(),
        action,
        source,
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(TMP_SUFFIX);
    PathBuf::from(s)
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let tmp = tmp_path(path);
    let mut f = create_file(&tmp)?;
    f.write_all(bytes).map_err(io_err(&tmp, "cannot write"))?;
    f.sync_all().map_err(io_err(&tmp, "cannot sync"))?;
    fs::rename(&tmp, path).map_err(io_err(path, "cannot rename the temporary file"))
}

fn create_file(path: &Path) -> Result<File, SnapshotError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_err(path, "cannot create"))
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "cannot sync the directory"))
}

/// The ranges of `mem`, region by region.
pub fn memory_ranges(mem: &GuestMemoryMmap) -> Vec<MemoryRange> {
    mem.iter()
        .map(|r| MemoryRange {
            gpa: r.start_addr().0,
            len: r.len(),
        })
        .collect()
}

/// Copies `ranges` of `mem` into `out`, chunk by chunk through one reused buffer, and returns
/// the CRC-32 of everything written.
fn write_memory(
    mem: &GuestMemoryMmap,
    ranges: &[MemoryRange],
    out: &mut impl Write,
    file: &Path,
) -> Result<u32, SnapshotError> {
    let mut hasher = crc32fast::Hasher::new();
    let largest = ranges.iter().map(|r| r.len).max().unwrap_or(0);
    let mut buf = vec![0u8; IO_CHUNK.min(usize::try_from(largest).unwrap_or(IO_CHUNK))];
    for r in ranges {
        let mut off = 0u64;
        while off < r.len {
            let n = buf
                .len()
                .min(usize::try_from(r.len - off).unwrap_or(buf.len()));
            let gpa = r.gpa + off;
            mem.read_slice(&mut buf[..n], GuestAddress(gpa))
                .map_err(|source| SnapshotError::GuestMemory {
                    file: file.to_path_buf(),
                    gpa,
                    source,
                })?;
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(io_err(file, "cannot write"))?;
            off += n as u64;
        }
    }
    Ok(hasher.finalize())
}

/// Writes a complete snapshot of a paused VM into `dir` (created if missing). An existing
/// snapshot there is replaced; until the new `state.json` is in place, the directory holds no
/// snapshot that would restore.
pub fn write_snapshot<S: Serialize>(
    dir: &Path,
    config: &VmConfig,
    state: &S,
    mem: &GuestMemoryMmap,
) -> Result<(), SnapshotError> {
    // Serialize first: a state that cannot be serialized must not remove an old snapshot.
    let ser_err = |source| SnapshotError::Serialize {
        what: "VM state",
        source,
    };
    // The value stored is the state after one print-parse round, i.e. exactly what a reader
    // parses back from the file, so both sides checksum the same canonical bytes.
    let printed = serde_json::to_vec(state).map_err(ser_err)?;
    let state_value: serde_json::Value = serde_json::from_slice(&printed).map_err(ser_err)?;
    let state_crc = crc32fast::hash(&canonical_state_bytes(&state_value).map_err(ser_err)?);
    let mut config_json =
        serde_json::to_vec_pretty(config).map_err(|source| SnapshotError::Serialize {
            what: "VM config",
            source,
        })?;
    config_json.push(b'\n');

    fs::create_dir_all(dir).map_err(io_err(dir, "cannot create the snapshot directory"))?;
    let state_path = dir.join(STATE_FILE);
    match fs::remove_file(&state_path) {
        Ok(()) => sync_dir(dir)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&state_path, "cannot remove the old file")(e)),
    }

    let mem_path = dir.join(MEMORY_FILE);
    let mem_tmp = tmp_path(&mem_path);
    let ranges = memory_ranges(mem);
    let mut f = create_file(&mem_tmp)?;
    let mem_crc = write_memory(mem, &ranges, &mut f, &mem_tmp)?;
    f.sync_all().map_err(io_err(&mem_tmp, "cannot sync"))?;
    drop(f);
    fs::rename(&mem_tmp, &mem_path)
        .map_err(io_err(&mem_path, "cannot rename the temporary file"))?;

    write_file_atomic(&dir.join(CONFIG_FILE), &config_json)?;

    let header = StateFile {
        format: SNAPSHOT_FORMAT.to_string(),
        version: SNAPSHOT_VERSION,
        checksum: checksum_hex(state_crc),
        config: FileRef {
            file: CONFIG_FILE.to_string(),
            checksum: checksum_hex(crc32fast::hash(&config_json)),
        },
        memory: MemoryHeader {
            file: MEMORY_FILE.to_string(),
            ranges,
            checksum: checksum_hex(mem_crc),
        },
        state: state_value,
    };
    let mut state_json =
        serde_json::to_vec_pretty(&header).map_err(|source| SnapshotError::Serialize {
            what: "snapshot header",
            source,
        })?;
    state_json.push(b'\n');
    // The commit point: only now does the directory hold a snapshot that restores.
    write_file_atomic(&state_path, &state_json)?;
    sync_dir(dir)
}

/// The guest memory of a snapshot, checked (size, checksum, ranges) but not yet loaded.
#[derive(Debug)]
pub struct MemoryImage {
    path: PathBuf,
    ranges: Vec<MemoryRange>,
    checksum: u32,
}

impl MemoryImage {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn ranges(&self) -> &[MemoryRange] {
        &self.ranges
    }

    /// Total bytes the ranges record (the expected size of the memory file).
    pub fn size(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }

    fn open_checked(&self) -> Result<File, SnapshotError> {
        let f = File::open(&self.path).map_err(io_err(&self.path, "cannot open"))?;
        let actual = f
            .metadata()
            .map_err(io_err(&self.path, "cannot stat"))?
            .len();
        if actual != self.size() {
            return Err(SnapshotError::MemorySize {
                file: self.path.clone(),
                actual,
                expected: self.size(),
            });
        }
        Ok(f)
    }

    /// Checks the file's size and checksum against the header (reads the whole file).
    pub fn verify(&self) -> Result<(), SnapshotError> {
        let mut f = self.open_checked()?;
        let mut hasher = crc32fast::Hasher::new();
        let mut buf = vec![0u8; IO_CHUNK];
        let mut total = 0u64;
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(&self.path, "cannot read")(e)),
            };
            hasher.update(&buf[..n]);
            total += n as u64;
        }
        if total != self.size() {
            return Err(SnapshotError::MemorySize {
                file: self.path.clone(),
                actual: total,
                expected: self.size(),
            });
        }
        let actual = hasher.finalize();
        if actual != self.checksum {
            return Err(SnapshotError::Checksum {
                file: self.path.clone(),
                expected: self.checksum,
                actual,
            });
        }
        Ok(())
    }

    /// Checks that `mem` has exactly the recorded ranges, region for region.
    pub fn check_layout(&self, mem: &GuestMemoryMmap) -> Result<(), SnapshotError> {
        let have = memory_ranges(mem);
        if have != self.ranges {
            return Err(SnapshotError::Layout(format!(
                "the snapshot records {}, the VM has {}",
                describe_ranges(&self.ranges),
                describe_ranges(&have)
            )));
        }
        Ok(())
    }

    /// Copies the image into `mem` (through `vm-memory`, which marks the pages dirty), after
    /// checking the layout and the file size. Call [`MemoryImage::verify`] first (as
    /// [`read_snapshot`] does) for the checksum.
    pub fn load_into(&self, mem: &GuestMemoryMmap) -> Result<(), SnapshotError> {
        self.check_layout(mem)?;
        let mut f = self.open_checked()?;
        for r in &self.ranges {
            let mut off = 0u64;
            while off < r.len {
                let n = IO_CHUNK.min(usize::try_from(r.len - off).unwrap_or(IO_CHUNK));
                let gpa = r.gpa + off;
                mem.read_exact_volatile_from(GuestAddress(gpa), &mut f, n)
                    .map_err(|source| SnapshotError::GuestMemory {
                        file: self.path.clone(),
                        gpa,
                        source,
                    })?;
                off += n as u64;
            }
        }
        Ok(())
    }
}

fn describe_ranges(ranges: &[MemoryRange]) -> String {
    let parts: Vec<String> = ranges
        .iter()
        .map(|r| format!("{:#x}+{:#x}", r.gpa, r.len))
        .collect();
    format!("[{}]", parts.join(", "))
}

/// Ranges must be page aligned, non-empty, sorted, non-overlapping, and be the RAM layout of
/// the configured memory size.
fn check_ranges(
    file: &Path,
    ranges: &[MemoryRange],
    memory_size: u64,
) -> Result<(), SnapshotError> {
    let bad = |reason: String| SnapshotError::Ranges {
        file: file.to_path_buf(),
        reason,
    };
    let page = super::PAGE_SIZE as u64;
    let mut end = 0u64;
    let mut total = 0u64;
    for (i, r) in ranges.iter().enumerate() {
        if r.len == 0 || r.gpa % page != 0 || r.len % page != 0 {
            return Err(bad(format!(
                "range {i} ({:#x}+{:#x}) is empty or not page aligned",
                r.gpa, r.len
            )));
        }
        if i > 0 && r.gpa < end {
            return Err(bad(format!(
                "range {i} ({:#x}) overlaps or is out of order",
                r.gpa
            )));
        }
        end = r
            .gpa
            .checked_add(r.len)
            .ok_or_else(|| bad(format!("range {i} wraps around the address space")))?;
        total = total
            .checked_add(r.len)
            .ok_or_else(|| bad("total size overflows".to_string()))?;
    }
    if total != memory_size {
        return Err(bad(format!(
            "they hold {total} bytes, the configuration's memory.size is {memory_size}"
        )));
    }
    let expected: Vec<MemoryRange> = crate::x86_64::layout::ram_ranges(memory_size)
        .into_iter()
        .map(|(gpa, len)| MemoryRange { gpa: gpa.0, len })
        .collect();
    if ranges != expected.as_slice() {
        return Err(bad(format!(
            "{} is not the RAM layout of memory.size {memory_size} ({})",
            describe_ranges(ranges),
            describe_ranges(&expected)
        )));
    }
    Ok(())
}

fn read_small_file(path: &Path) -> Result<Vec<u8>, SnapshotError> {
    /// `config.json` and `state.json` are small; refuse a file that is not.
    const MAX: u64 = 64 << 20;
    let f = File::open(path).map_err(io_err(path, "cannot open"))?;
    let mut bytes = Vec::new();
    f.take(MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(path, "cannot read"))?;
    if bytes.len() as u64 > MAX {
        return Err(SnapshotError::Io {
            file: path.to_path_buf(),
            action: "file too large",
            source: io::Error::from(io::ErrorKind::InvalidData),
        });
    }
    Ok(bytes)
}

/// Reads and checks a snapshot: formats, version, checksums of every file (the memory file is
/// read through once), the memory ranges against the configuration. Nothing touches a VM; load
/// the memory with [`MemoryImage::load_into`] once the VM exists.
pub fn read_snapshot<S: DeserializeOwned>(
    dir: &Path,
) -> Result<(VmConfig, S, MemoryImage), SnapshotError> {
    let state_path = dir.join(STATE_FILE);
    let bytes = read_small_file(&state_path)?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|source| SnapshotError::Json {
            file: state_path.clone(),
            source,
        })?;
    let format = value.get("format").and_then(|v| v.as_str());
    if format != Some(SNAPSHOT_FORMAT) {
        return Err(SnapshotError::Format {
            file: state_path,
            found: format.map_or_else(|| "missing".to_string(), str::to_string),
        });
    }
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(SNAPSHOT_VERSION) => {}
        Some(found) => {
            return Err(SnapshotError::Version {
                file: state_path,
                found,
            })
        }
        None => {
            return Err(SnapshotError::Format {
                file: state_path,
                found: "version missing".to_string(),
            })
        }
    }
    let header: StateFile =
        serde_json::from_value(value).map_err(|source| SnapshotError::Json {
            file: state_path.clone(),
            source,
        })?;
    let expected = parse_checksum(&state_path, &header.checksum)?;
    let canonical = canonical_state_bytes(&header.state).map_err(|source| SnapshotError::Json {
        file: state_path.clone(),
        source,
    })?;
    let actual = crc32fast::hash(&canonical);
    if actual != expected {
        return Err(SnapshotError::Checksum {
            file: state_path,
            expected,
            actual,
        });
    }
    if header.config.file != CONFIG_FILE || header.memory.file != MEMORY_FILE {
        return Err(SnapshotError::Format {
            file: state_path,
            found: format!(
                "files {:?} and {:?} instead of {CONFIG_FILE:?} and {MEMORY_FILE:?}",
                header.config.file, header.memory.file
            ),
        });
    }
    let config_crc = parse_checksum(&state_path, &header.config.checksum)?;
    let mem_crc = parse_checksum(&state_path, &header.memory.checksum)?;

    let config_path = dir.join(CONFIG_FILE);
    let config_bytes = read_small_file(&config_path)?;
    let actual = crc32fast::hash(&config_bytes);
    if actual != config_crc {
        return Err(SnapshotError::Checksum {
            file: config_path,
            expected: config_crc,
            actual,
        });
    }
    let config: VmConfig =
        serde_json::from_slice(&config_bytes).map_err(|source| SnapshotError::Json {
            file: config_path.clone(),
            source,
        })?;
    // A descriptor belongs to the process it was given to (see `VmConfig::localize`): a
    // restore never reuses the number, and a NIC without its TAP is refused rather than
    // silently attached to a new one.
    if let Some((index, net)) = config
        .net
        .iter()
        .flatten()
        .enumerate()
        .find(|(_, net)| net.passed_fds().is_some())
    {
        return Err(SnapshotError::PassedTap {
            file: config_path,
            net: net.id.clone().unwrap_or_else(|| format!("_net{index}")),
        });
    }
    let state: S =
        serde_json::from_value(header.state).map_err(|source| SnapshotError::StateShape {
            file: state_path.clone(),
            source,
        })?;
    check_ranges(&state_path, &header.memory.ranges, config.memory.size)?;
    let image = MemoryImage {
        path: dir.join(MEMORY_FILE),
        ranges: header.memory.ranges,
        checksum: mem_crc,
    };
    image.verify()?;
    Ok((config, state, image))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_urls() {
        assert_eq!(
            parse_file_url("file:///var/snap").unwrap(),
            PathBuf::from("/var/snap")
        );
        assert_eq!(
            parse_file_url("file:///var/snap/").unwrap(),
            PathBuf::from("/var/snap")
        );
        for bad in [
            "/var/snap",
            "file://var/snap",
            "file://host/var/snap",
            "tcp://1.2.3.4:5",
            "file:///",
            "file://",
            "file:///a/../b",
            "file:///a?x=1",
        ] {
            let e = parse_file_url(bad).unwrap_err();
            assert!(e.to_string().contains("invalid snapshot URL"), "{bad}: {e}");
        }
    }

    #[test]
    fn checksum_syntax() {
        let p = Path::new("state.json");
        assert_eq!(parse_checksum(p, "0000abcd").unwrap(), 0xabcd);
        assert!(parse_checksum(p, "abcd").is_err());
        assert!(parse_checksum(p, "+000abcd").is_err());
        assert!(parse_checksum(p, "0000abcg").is_err());
    }

    #[test]
    fn ranges_are_checked_against_the_layout() {
        let p = Path::new("state.json");
        let size = 512u64 << 20;
        let ok = [MemoryRange { gpa: 0, len: size }];
        check_ranges(p, &ok, size).unwrap();
        let e = check_ranges(p, &ok, size * 2).unwrap_err().to_string();
        assert!(e.contains("memory.size"), "{e}");
        let unaligned = [MemoryRange {
            gpa: 0,
            len: size - 1,
        }];
        assert!(check_ranges(p, &unaligned, size - 1).is_err());
        let shifted = [MemoryRange {
            gpa: 0x1000,
            len: size,
        }];
        assert!(check_ranges(p, &shifted, size).is_err());
    }
}
