//! Guest RAM: mappings with a dirty bitmap that records every write a device makes through
//! `vm-memory`, registered with KVM as memory slots whose dirty logging can be switched on per
//! slot for migration and fault tolerance.
//!
//! Three backings, chosen as Cloud Hypervisor chooses them from `--memory`:
//! - private (the default): `MAP_PRIVATE | MAP_ANONYMOUS`, nothing outside this process maps it;
//! - `shared=on`: one memfd per region mapped `MAP_SHARED`, so another process (a vhost-user
//!   backend such as virtiofsd) can map the same pages; [`shared_regions`] hands out the fds;
//! - `hugepages=on[,hugepage_size=]`: one hugetlb memfd per region, also `MAP_SHARED` (a private
//!   mapping of a hugetlb file would copy pages on write). The mapping reserves its huge pages
//!   when it is made (no `MAP_NORESERVE`), so a host that runs short fails the boot with a message
//!   instead of killing the VM with SIGBUS at its first touch of an unbacked page.
//!
//! Every reader and writer of guest memory (devices, KVM dirty logging, snapshot, migration, FT)
//! goes through the same `GuestMemoryMmap`, so none of them depends on the backing. KVM logs
//! dirty pages at 4 KiB granularity whatever the backing page size.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd};
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::config::MemoryConfig;
use crate::x86_64::layout;

/// Guest memory as every part of the VMM sees it (defined by `devices`, the lowest crate).
pub use devices::GuestMemoryMmap;

/// The huge page sizes x86_64 has.
pub const HUGEPAGE_SIZE_2M: u64 = 2 << 20;
pub const HUGEPAGE_SIZE_1G: u64 = 1 << 30;
/// Where the kernel reports its huge page pools (one directory per page size).
const HUGEPAGES_SYSFS: &str = "/sys/kernel/mm/hugepages";
/// The name guest RAM's memfds carry (visible in `/proc/PID/maps` as `/memfd:guest-ram`).
const MEMFD_NAME: &CStr = c"guest-ram";

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memory size {size} is smaller than the minimum of {min} bytes")]
    TooSmall { size: u64, min: u64 },
    #[error("memory size {size} bytes exceeds what this host can back ({host} bytes of RAM)")]
    TooBigForHost { size: u64, host: u64 },
    #[error("memory size {size} bytes exceeds the guest physical address space ({bits} bits)")]
    TooBigForAddressSpace { size: u64, bits: u32 },
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("KVM refused memory slot {slot} at {addr:#x} ({size} bytes): {source}")]
    SetRegion {
        slot: u32,
        addr: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
    #[error(
        "memory.hugepage_size: {page_size} is not a huge page size of x86_64 (2 MiB or 1 GiB)"
    )]
    HugepageSize { page_size: u64 },
    #[error("memory.size: {size} is not a multiple of the huge page size {page_size}")]
    HugepageMisaligned { size: u64, page_size: u64 },
    #[error("cannot read the host's default huge page size from /proc/meminfo: {0}")]
    DefaultHugepageSize(String),
    #[error(
        "hugepages=on: this host has no {} KiB huge pages ({} is missing: {source})",
        page_size >> 10,
        dir.display()
    )]
    NoHugepagePool {
        page_size: u64,
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "hugepages=on: {needed} huge pages of {} KiB are needed for {size} bytes of guest RAM \
         but only {free} are free ({}; reserve more through /proc/sys/vm/nr_hugepages or \
         {})",
        page_size >> 10,
        dir.join("free_hugepages").display(),
        dir.join("nr_hugepages").display()
    )]
    HugepagesExhausted {
        page_size: u64,
        size: u64,
        needed: u64,
        free: u64,
        dir: PathBuf,
    },
    #[error("cannot create a memfd of {size} bytes for guest RAM ({backing}): {source}")]
    Memfd {
        size: u64,
        backing: Backing,
        source: std::io::Error,
    },
    #[error("cannot map {size} bytes of {backing} guest RAM at {addr:#x}: {source}")]
    MapFile {
        addr: u64,
        size: u64,
        backing: Backing,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("cannot assemble guest memory: {0}")]
    Regions(String),
    #[error(
        "guest RAM at {addr:#x} is not shared memory (start the VM with --memory shared=on or \
         hugepages=on)"
    )]
    NotShared { addr: u64 },
}

/// How guest RAM is backed (`--memory shared=,hugepages=,hugepage_size=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Anonymous private memory: the default.
    Private,
    /// A memfd per region, mapped `MAP_SHARED`.
    Shared,
    /// A hugetlb memfd per region with pages of `page_size` bytes, mapped `MAP_SHARED`.
    Hugepages { page_size: u64 },
}

impl std::fmt::Display for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Private => f.write_str("private"),
            Self::Shared => f.write_str("shared"),
            Self::Hugepages { page_size } => write!(f, "{} KiB hugepage", page_size >> 10),
        }
    }
}

impl Backing {
    /// The backing `memory` asks for. With `hugepages=on` and no `hugepage_size`, the host's
    /// default huge page size (as Cloud Hypervisor). The size must be a whole number of pages.
    pub fn from_config(memory: &MemoryConfig) -> Result<Self, MemoryError> {
        if !memory.hugepages {
            return Ok(if memory.shared {
                Self::Shared
            } else {
                Self::Private
            });
        }
        let page_size = match memory.hugepage_size {
            Some(size) => size,
            None => default_hugepage_size()?,
        };
        if page_size != HUGEPAGE_SIZE_2M && page_size != HUGEPAGE_SIZE_1G {
            return Err(MemoryError::HugepageSize { page_size });
        }
        // A mask: the page size is a power of two.
        if memory.size & (page_size - 1) != 0 {
            return Err(MemoryError::HugepageMisaligned {
                size: memory.size,
                page_size,
            });
        }
        Ok(Self::Hugepages { page_size })
    }

    /// Whether another process can map this memory (through [`shared_regions`]).
    pub fn is_shared(self) -> bool {
        self != Self::Private
    }

    /// Checks that the host can back `size` bytes this way now; only huge pages can run out
    /// before the mapping is made.
    pub fn check_host(self, size: u64) -> Result<(), MemoryError> {
        match self {
            Self::Hugepages { page_size } => {
                check_hugepages(Path::new(HUGEPAGES_SYSFS), page_size, size)
            }
            Self::Private | Self::Shared => Ok(()),
        }
    }

    fn memfd_flags(self) -> libc::c_uint {
        match self {
            Self::Private | Self::Shared => libc::MFD_CLOEXEC,
            // The page size goes into the flags as its log2 (memfd_create(2)).
            Self::Hugepages { page_size } => {
                libc::MFD_CLOEXEC
                    | libc::MFD_HUGETLB
                    | (page_size.trailing_zeros() << libc::MFD_HUGE_SHIFT)
            }
        }
    }

    fn mmap_flags(self) -> libc::c_int {
        match self {
            Self::Private => libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            // Shared memory grows on demand like private memory does.
            Self::Shared => libc::MAP_SHARED | libc::MAP_NORESERVE,
            // Reserve the huge pages at mmap: a shortfall is an error now, not a SIGBUS later.
            Self::Hugepages { .. } => libc::MAP_SHARED,
        }
    }
}

/// The host's default huge page size (`Hugepagesize:` in /proc/meminfo).
fn default_hugepage_size() -> Result<u64, MemoryError> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| MemoryError::DefaultHugepageSize(e.to_string()))?;
    parse_default_hugepage_size(&meminfo)
        .ok_or_else(|| MemoryError::DefaultHugepageSize("no Hugepagesize line".into()))
}

fn parse_default_hugepage_size(meminfo: &str) -> Option<u64> {
    let line = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("Hugepagesize:"))?;
    let kib = line.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
    kib.checked_mul(1024)
}

/// Checks that the pool of `page_size` huge pages under `root` can give `size` bytes: free
/// pages not promised to mappings already made, plus surplus pages the kernel may still
/// allocate when overcommit is allowed.
fn check_hugepages(root: &Path, page_size: u64, size: u64) -> Result<(), MemoryError> {
    let dir = root.join(format!("hugepages-{}kB", page_size >> 10));
    let read = |name: &str| -> Result<u64, std::io::Error> {
        let text = std::fs::read_to_string(dir.join(name))?;
        text.trim()
            .parse::<u64>()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    };
    let pool = (|| {
        Ok::<_, std::io::Error>((
            read("free_hugepages")?,
            read("resv_hugepages")?,
            read("nr_overcommit_hugepages").unwrap_or(0),
            read("surplus_hugepages").unwrap_or(0),
        ))
    })();
    let (free, reserved, overcommit, surplus) =
        pool.map_err(|source| MemoryError::NoHugepagePool {
            page_size,
            dir: dir.clone(),
            source,
        })?;
    let free = free.saturating_sub(reserved) + overcommit.saturating_sub(surplus);
    let needed = size.div_ceil(page_size);
    if free < needed {
        return Err(MemoryError::HugepagesExhausted {
            page_size,
            size,
            needed,
            free,
            dir,
        });
    }
    Ok(())
}

fn host_ram_bytes() -> u64 {
    // SAFETY: sysinfo only writes into the zeroed struct we pass.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable sysinfo struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return u64::MAX;
    }
    info.totalram.saturating_mul(u64::from(info.mem_unit))
}

/// Checks `size` before anything is mapped, so that an impossible request fails with a message
/// instead of a half-built VM. Guest RAM is not overcommitted beyond the host's RAM: a VM that
/// the host cannot back would die later, mid-run, which is worse for a VM with a hot backup.
pub fn validate_size(size: u64, phys_bits: u32) -> Result<(), MemoryError> {
    if size < layout::MIN_MEMORY_SIZE {
        return Err(MemoryError::TooSmall {
            size,
            min: layout::MIN_MEMORY_SIZE,
        });
    }
    let top = layout::ram_ranges(size)
        .last()
        .map_or(0, |(start, len)| start.0 + len);
    if phys_bits < 64 && top > (1u64 << phys_bits) {
        return Err(MemoryError::TooBigForAddressSpace {
            size,
            bits: phys_bits,
        });
    }
    let host = host_ram_bytes();
    if size > host {
        return Err(MemoryError::TooBigForHost { size, host });
    }
    Ok(())
}

/// Asks the kernel to back `mem` with transparent huge pages where it can (Cloud
/// Hypervisor's `thp=on`, its default): fewer TLB misses for the guest and for the VMM's
/// copies of it (an FT checkpoint copies every dirty page). Advice only: a kernel that
/// declines leaves 4 KiB pages, which is not an error.
pub fn advise_huge_pages(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        // SAFETY: the range is exactly one mapping this process made and keeps for the
        // region's life; MADV_HUGEPAGE changes how it is backed, never its contents.
        let ret = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if ret != 0 {
            log::debug!(
                "transparent huge pages for guest RAM at {:#x}: {}",
                region.start_addr().0,
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Private anonymous guest RAM of `size` bytes (also what the FT primary stages epochs in).
pub fn create(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    create_backed(size, Backing::Private)
}

/// Guest RAM of `size` bytes in the RAM layout, backed as `backing` says.
pub fn create_backed(size: u64, backing: Backing) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<_> = layout::ram_ranges(size)
        .into_iter()
        .map(|(start, len)| (start, len as usize))
        .collect();
    if backing == Backing::Private {
        return GuestMemoryMmap::from_ranges(&ranges)
            .map_err(|source| MemoryError::Map { size, source });
    }
    backing.check_host(size)?;
    let regions = ranges
        .iter()
        .map(|&(start, len)| file_region(start, len, backing))
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Regions(e.to_string()))
}

/// One region of guest RAM in a memfd of its own, mapped shared.
fn file_region(
    start: GuestAddress,
    len: usize,
    backing: Backing,
) -> Result<GuestRegionMmap<AtomicBitmap>, MemoryError> {
    let size = len as u64;
    let memfd_error = |source| MemoryError::Memfd {
        size,
        backing,
        source,
    };
    // SAFETY: the name is a NUL-terminated string; the call only reads it.
    let fd = unsafe { libc::memfd_create(MEMFD_NAME.as_ptr(), backing.memfd_flags()) };
    if fd < 0 {
        return Err(memfd_error(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    // Sizing a hugetlb file takes no pages yet; the mapping below reserves them.
    file.set_len(size).map_err(memfd_error)?;
    let mut builder = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
        .with_file_offset(FileOffset::new(file, 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(backing.mmap_flags());
    if let Backing::Hugepages { .. } = backing {
        builder = builder.with_hugetlbfs(true);
    }
    let map_error = |source| MemoryError::MapFile {
        addr: start.0,
        size,
        backing,
        source,
    };
    let mapping = builder.build().map_err(map_error)?;
    GuestRegionMmap::new(mapping, start)
        .ok_or_else(|| MemoryError::Regions(format!("region at {:#x} overflows", start.0)))
}

/// How `mem` is backed, read back from its mappings.
pub fn backing_of(mem: &GuestMemoryMmap) -> Backing {
    let Some(region) = mem.iter().next() else {
        return Backing::Private;
    };
    if region.flags() & libc::MAP_SHARED == 0 || region.file_offset().is_none() {
        return Backing::Private;
    }
    if region.is_hugetlbfs() == Some(true) {
        // The page size is not recorded on the mapping; the memfd's block size is it.
        let page_size = region
            .file_offset()
            .and_then(|f| f.file().metadata().ok())
            .map_or(0, |m| std::os::unix::fs::MetadataExt::blksize(&m));
        return Backing::Hugepages { page_size };
    }
    Backing::Shared
}

/// One region of shared guest RAM as another process maps it (what vhost-user's
/// `SET_MEM_TABLE` sends): the memfd, the offset of the region in it, and where the region
/// sits in guest-physical and in this process's address space.
#[derive(Debug)]
pub struct SharedRegion<'a> {
    pub guest_phys_addr: u64,
    pub size: u64,
    pub userspace_addr: u64,
    pub fd: BorrowedFd<'a>,
    pub fd_offset: u64,
}

/// The memfd behind every region of `mem`, for handing guest RAM to a vhost-user backend.
/// Refused for private memory: a backend could not see the guest's writes.
pub fn shared_regions(mem: &GuestMemoryMmap) -> Result<Vec<SharedRegion<'_>>, MemoryError> {
    mem.iter()
        .map(|region| {
            let guest_phys_addr = region.start_addr().0;
            let file = region
                .file_offset()
                .filter(|_| region.flags() & libc::MAP_SHARED != 0)
                .ok_or(MemoryError::NotShared {
                    addr: guest_phys_addr,
                })?;
            Ok(SharedRegion {
                guest_phys_addr,
                size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                fd: file.file().as_fd(),
                fd_offset: file.start(),
            })
        })
        .collect()
}

/// Registers (or re-registers) every region with KVM as slot = region index.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap, log_dirty: bool) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the mapping behind `region` lives as long as `mem`, which the VM owns and
        // drops only after the VM fd is closed.
        unsafe { vm.set_user_memory_region(kvm_region) }.map_err(|source| {
            MemoryError::SetRegion {
                slot,
                addr: kvm_region.guest_phys_addr,
                size: kvm_region.memory_size,
                source,
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked_before_mapping() {
        assert!(matches!(
            validate_size(1 << 20, 46),
            Err(MemoryError::TooSmall { .. })
        ));
        assert!(matches!(
            validate_size(64 << 40, 46),
            Err(MemoryError::TooBigForAddressSpace { .. })
        ));
        assert!(matches!(
            validate_size(16 << 40, 46),
            Err(MemoryError::TooBigForHost { .. })
        ));
        validate_size(64 << 20, 46).expect("64 MiB fits");
    }

    fn memory(size: u64, shared: bool, hugepages: bool, page: Option<u64>) -> MemoryConfig {
        MemoryConfig {
            shared,
            hugepages,
            hugepage_size: page,
            ..MemoryConfig::with_size(size)
        }
    }

    #[test]
    fn the_backing_follows_the_configuration() {
        let from = |m: MemoryConfig| Backing::from_config(&m);
        assert_eq!(
            from(memory(256 << 20, false, false, None)).unwrap(),
            Backing::Private
        );
        assert_eq!(
            from(memory(256 << 20, true, false, None)).unwrap(),
            Backing::Shared
        );
        // Huge pages are always shared, with or without shared=on.
        for shared in [false, true] {
            assert_eq!(
                from(memory(256 << 20, shared, true, Some(2 << 20))).unwrap(),
                Backing::Hugepages { page_size: 2 << 20 }
            );
        }
        assert_eq!(
            from(memory(2 << 30, false, true, Some(1 << 30))).unwrap(),
            Backing::Hugepages { page_size: 1 << 30 }
        );
        assert!(Backing::Shared.is_shared() && !Backing::Private.is_shared());
    }

    #[test]
    fn odd_hugepage_sizes_and_misaligned_memory_are_refused() {
        let err = Backing::from_config(&memory(256 << 20, false, true, Some(4 << 20))).unwrap_err();
        assert!(matches!(err, MemoryError::HugepageSize { page_size } if page_size == 4 << 20));
        assert!(
            err.to_string().starts_with("memory.hugepage_size: 4194304"),
            "{err}"
        );
        let err = Backing::from_config(&memory(3 << 20, false, true, Some(2 << 20))).unwrap_err();
        assert!(matches!(err, MemoryError::HugepageMisaligned { .. }));
        assert!(err.to_string().starts_with("memory.size: 3145728"), "{err}");
        let err =
            Backing::from_config(&memory(1536 << 20, false, true, Some(1 << 30))).unwrap_err();
        assert!(
            matches!(err, MemoryError::HugepageMisaligned { .. }),
            "{err}"
        );
    }

    #[test]
    fn the_default_hugepage_size_comes_from_meminfo() {
        let meminfo = "HugePages_Surp:        0\nHugepagesize:       2048 kB\nHugetlb: 0 kB\n";
        assert_eq!(parse_default_hugepage_size(meminfo), Some(2 << 20));
        assert_eq!(parse_default_hugepage_size("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_default_hugepage_size("Hugepagesize: lots\n"), None);
    }

    fn fake_pool(dir: &Path, free: u64, resv: u64, overcommit: u64) {
        let pool = dir.join("hugepages-2048kB");
        std::fs::create_dir_all(&pool).unwrap();
        for (name, value) in [
            ("free_hugepages", free),
            ("resv_hugepages", resv),
            ("nr_overcommit_hugepages", overcommit),
            ("surplus_hugepages", 0),
            ("nr_hugepages", free),
        ] {
            std::fs::write(pool.join(name), format!("{value}\n")).unwrap();
        }
    }

    #[test]
    fn a_short_hugepage_pool_is_named_with_needed_and_free_pages() {
        let root = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let root = root.as_path();
        fake_pool(root, 0, 0, 0);
        let err = check_hugepages(root, 2 << 20, 256 << 20).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(
                err,
                MemoryError::HugepagesExhausted {
                    needed: 128,
                    free: 0,
                    ..
                }
            ),
            "{text}"
        );
        assert!(text.contains("128 huge pages of 2048 KiB"), "{text}");
        assert!(text.contains("hugepages-2048kB/free_hugepages"), "{text}");
        assert!(!text.contains('\n'), "{text}");
        // Pages promised to earlier mappings are not free.
        fake_pool(root, 128, 1, 0);
        assert!(check_hugepages(root, 2 << 20, 256 << 20).is_err());
        fake_pool(root, 128, 0, 0);
        check_hugepages(root, 2 << 20, 256 << 20).unwrap();
        // Overcommit lets the kernel allocate surplus pages on demand.
        fake_pool(root, 0, 0, 128);
        check_hugepages(root, 2 << 20, 256 << 20).unwrap();
        // No pool of that size at all.
        let err = check_hugepages(root, 1 << 30, 1 << 30).unwrap_err();
        assert!(matches!(err, MemoryError::NoHugepagePool { .. }), "{err}");
        assert!(
            err.to_string().contains("no 1048576 KiB huge pages"),
            "{err}"
        );
    }

    /// `thp=on`: the kernel is asked for huge pages for guest RAM (its smaps entry says the
    /// mapping is eligible) wherever transparent huge pages are not off altogether.
    #[test]
    fn guest_ram_is_advised_to_use_transparent_huge_pages() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if thp.is_empty() || thp.contains("[never]") {
            eprintln!("SKIP: transparent huge pages are off on this host");
            return;
        }
        let mem = create(64 << 20).unwrap();
        let eligible = |mem: &GuestMemoryMmap| {
            let start = mem.iter().next().unwrap().as_ptr() as usize;
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            let mut inside = false;
            for line in smaps.lines() {
                if let Some((range, _)) = line.split_once(' ') {
                    if let Some((a, b)) = range.split_once('-') {
                        if let (Ok(a), Ok(b)) =
                            (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                        {
                            inside = (a..b).contains(&start);
                            continue;
                        }
                    }
                }
                if inside {
                    if let Some(v) = line.strip_prefix("THPeligible:") {
                        return v.trim() == "1";
                    }
                }
            }
            false
        };
        if thp.contains("[madvise]") {
            assert!(!eligible(&mem), "eligible before the advice");
        }
        advise_huge_pages(&mem);
        assert!(eligible(&mem), "not eligible after the advice");
    }

    #[test]
    fn private_memory_has_no_file_to_share() {
        let mem = create_backed(64 << 20, Backing::Private).unwrap();
        assert_eq!(backing_of(&mem), Backing::Private);
        let err = shared_regions(&mem).unwrap_err();
        assert!(err.to_string().contains("shared=on"), "{err}");
    }

    #[test]
    fn shared_memory_is_seen_through_its_memfd_by_another_mapping() {
        use vm_memory::Bytes;
        let size = 64u64 << 20;
        let mem = create_backed(size, Backing::Shared).unwrap();
        assert_eq!(backing_of(&mem), Backing::Shared);
        // Device writes still mark pages dirty.
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x20_0000))
            .unwrap();
        let bitmap = mem.iter().next().unwrap().bitmap();
        assert!(vm_memory::bitmap::Bitmap::dirty_at(&bitmap, 0x20_0000));

        let regions = shared_regions(&mem).unwrap();
        assert_eq!(regions.len(), 1);
        let region = &regions[0];
        assert_eq!((region.guest_phys_addr, region.size), (0, size));
        // What another process mapping the fd sees (here: a second mapping of it).
        // SAFETY: a fresh shared mapping of the memfd, unmapped below; no Rust reference
        // outlives it.
        let other = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&region.fd),
                region.fd_offset as libc::off_t,
            )
        };
        assert_ne!(other, libc::MAP_FAILED);
        // SAFETY: `other` maps `size` bytes; the offsets read and written are inside it.
        unsafe {
            let word = other.cast::<u8>().add(0x20_0000).cast::<u32>();
            assert_eq!(word.read_volatile(), 0xdead_beef);
            word.add(1).write_volatile(0x1234_5678);
        }
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x20_0004)).unwrap(),
            0x1234_5678
        );
        // SAFETY: unmaps exactly the mapping made above.
        assert_eq!(unsafe { libc::munmap(other, size as usize) }, 0);
    }

    #[test]
    fn big_shared_memory_gets_a_memfd_per_region() {
        // Above the 32-bit gap: two regions, each in its own memfd. MAP_NORESERVE: nothing
        // is allocated until touched.
        let size = (4u64 << 30) + (64 << 20);
        if validate_size(size, 46).is_err() {
            eprintln!("SKIP: this host has less than {size} bytes of RAM");
            return;
        }
        let mem = create_backed(size, Backing::Shared).unwrap();
        let regions = shared_regions(&mem).unwrap();
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[1].guest_phys_addr, layout::RAM_64BIT_START.0);
        assert_eq!(regions.iter().map(|r| r.size).sum::<u64>(), size);
    }

    /// Runs only where 2 MiB huge pages are free (the integration tests reserve them).
    #[test]
    fn hugepage_memory_is_hugetlb_when_the_host_has_pages() {
        let backing = Backing::Hugepages { page_size: 2 << 20 };
        let size = 32u64 << 20;
        if let Err(e) = backing.check_host(size) {
            eprintln!("SKIP hugepage_memory_is_hugetlb_when_the_host_has_pages: {e}");
            return;
        }
        let mem = create_backed(size, backing).unwrap();
        assert_eq!(backing_of(&mem), backing);
        use vm_memory::Bytes;
        mem.write_obj(7u64, GuestAddress(size - 8)).unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(size - 8)).unwrap(), 7);
        assert_eq!(shared_regions(&mem).unwrap().len(), 1);
    }
}
