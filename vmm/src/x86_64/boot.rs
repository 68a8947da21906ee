//! Loading a kernel (64-bit ELF, with or without a PVH note, or bzImage), its initramfs and
//! command line into guest memory, and writing the boot information block the entry protocol
//! expects (PVH `hvm_start_info` or the Linux zero page).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::{self, BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{
    self, MemoryKind, CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_RAM_START, MEM_32BIT_GAP_START,
    PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, ZERO_PAGE_START,
};
use super::regs::EntryMode;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const BZIMAGE_HEADER_MAGIC: u32 = 0x5372_6448; // "HdrS"
const BZIMAGE_HEADER_OFFSET: u64 = 0x202;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Offset of the 64-bit entry (`startup_64`) in a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Linux's default limit for the initramfs address when the header does not say.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read kernel {path}: {source}")]
    ReadKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {0} is not a regular file")]
    KernelNotAFile(PathBuf),
    #[error("kernel {0} is neither a 64-bit ELF nor a bzImage")]
    UnknownKernelFormat(PathBuf),
    #[error("kernel {path} needs guest memory up to {needed:#x} but the VM has {available:#x} bytes; give it more --memory")]
    KernelTooBig {
        path: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("cannot load kernel {path}: {source}")]
    LoadKernel {
        path: PathBuf,
        source: loader::Error,
    },
    #[error("cannot open initramfs {path}: {source}")]
    OpenInitramfs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory below {limit:#x} after the kernel; give it more --memory")]
    InitramfsTooBig {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("cannot load initramfs {path}: {source}")]
    LoadInitramfs {
        path: PathBuf,
        source: vm_memory::GuestMemoryError,
    },
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line: {0}")]
    LoadCmdline(loader::Error),
    #[error("too many memory map entries for the boot information ({0})")]
    TooManyMemoryMapEntries(usize),
    #[error("cannot write the boot information block: {0}")]
    BootConfigurator(linux_loader::configurator::Error),
}

/// What the loader put where, enough to start the boot CPU.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub entry: EntryMode,
    /// Address of the boot information block (`hvm_start_info` or zero page).
    pub boot_info: GuestAddress,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KernelFormat {
    Elf,
    BzImage,
}

fn detect_format(file: &mut File, path: &Path) -> Result<KernelFormat, BootError> {
    let read_err = |source| BootError::ReadKernel {
        path: path.to_path_buf(),
        source,
    };
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    if file.read_exact(&mut magic).is_ok() && &magic == ELF_MAGIC {
        return Ok(KernelFormat::Elf);
    }
    file.seek(SeekFrom::Start(BZIMAGE_HEADER_OFFSET))
        .map_err(read_err)?;
    if file.read_exact(&mut magic).is_ok() && u32::from_le_bytes(magic) == BZIMAGE_HEADER_MAGIC {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::UnknownKernelFormat(path.to_path_buf()))
}

/// The highest guest address an ELF's loadable segments reach, read from its program headers
/// so that a too-small VM is reported as such rather than as a loader read error.
fn elf_load_end(file: &mut File) -> std::io::Result<u64> {
    let mut ehdr = [0u8; 64];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut ehdr)?;
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |b: &[u8], o: usize| {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(v)
    };
    let phoff = u64_at(&ehdr, 0x20);
    let phentsize = u64::from(u16_at(&ehdr, 0x36));
    let phnum = u64::from(u16_at(&ehdr, 0x38));
    let mut end = 0u64;
    for i in 0..phnum {
        let mut phdr = [0u8; 56];
        file.seek(SeekFrom::Start(
            phoff.saturating_add(i.saturating_mul(phentsize)),
        ))?;
        file.read_exact(&mut phdr)?;
        const PT_LOAD: u32 = 1;
        if u32::from_le_bytes([phdr[0], phdr[1], phdr[2], phdr[3]]) == PT_LOAD {
            end = end.max(u64_at(&phdr, 0x18).saturating_add(u64_at(&phdr, 0x28)));
        }
    }
    Ok(end)
}

/// The highest guest address a bzImage's protected-mode kernel needs while it unpacks itself.
fn bzimage_load_end(file: &mut File) -> std::io::Result<u64> {
    let mut hdr = [0u8; 0x270];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut hdr)?;
    let u32_at = |o: usize| u32::from_le_bytes([hdr[o], hdr[o + 1], hdr[o + 2], hdr[o + 3]]);
    let pref_address = u32_at(0x258) as u64 | (u64::from(u32_at(0x25c)) << 32);
    let init_size = u64::from(u32_at(0x260));
    Ok(pref_address.max(HIGH_RAM_START.0).saturating_add(init_size))
}

/// Loads the kernel, initramfs and command line, writes the MP-independent boot information,
/// and says how to enter the kernel. `rsdp` is the address of the ACPI tables' root pointer,
/// handed to the kernel in the boot information (None: the guest finds no ACPI tables there).
pub fn load_kernel<M: GuestMemoryBackend>(
    mem: &M,
    mem_size: u64,
    kernel_path: &Path,
    initramfs_path: Option<&Path>,
    cmdline: &str,
    rsdp: Option<GuestAddress>,
) -> Result<LoadedKernel, BootError> {
    let mut kernel = File::open(kernel_path).map_err(|source| BootError::OpenKernel {
        path: kernel_path.to_path_buf(),
        source,
    })?;
    let is_file = kernel
        .metadata()
        .map_err(|source| BootError::ReadKernel {
            path: kernel_path.to_path_buf(),
            source,
        })?
        .is_file();
    if !is_file {
        return Err(BootError::KernelNotAFile(kernel_path.to_path_buf()));
    }
    let format = detect_format(&mut kernel, kernel_path)?;
    let needed = match format {
        KernelFormat::Elf => elf_load_end(&mut kernel),
        KernelFormat::BzImage => bzimage_load_end(&mut kernel),
    }
    .map_err(|source| BootError::ReadKernel {
        path: kernel_path.to_path_buf(),
        source,
    })?;
    let low_ram_end = mem_size.min(MEM_32BIT_GAP_START);
    if needed > low_ram_end {
        return Err(BootError::KernelTooBig {
            path: kernel_path.to_path_buf(),
            needed,
            available: mem_size,
        });
    }

    let load_err = |source| BootError::LoadKernel {
        path: kernel_path.to_path_buf(),
        source,
    };
    let result = match format {
        KernelFormat::Elf => Elf::load(mem, None, &mut kernel, Some(HIGH_RAM_START)),
        KernelFormat::BzImage => BzImage::load(mem, None, &mut kernel, Some(HIGH_RAM_START)),
    }
    .map_err(load_err)?;

    let mut cmd = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    cmd.insert_str(cmdline).map_err(BootError::Cmdline)?;
    loader::load_cmdline(mem, CMDLINE_START, &cmd).map_err(BootError::LoadCmdline)?;
    let cmdline_len = cmdline.len() as u32 + 1;

    let initrd_limit = result
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX)
        .min(low_ram_end - 1);
    let initramfs = initramfs_path
        .map(|p| load_initramfs(mem, p, result.kernel_end, initrd_limit))
        .transpose()?;

    let memory_map = layout::memory_map(mem_size);
    let pvh_entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) if format == KernelFormat::Elf => Some(addr),
        _ => None,
    };
    if let Some(entry) = pvh_entry {
        write_pvh_info(mem, &memory_map, initramfs, rsdp)?;
        return Ok(LoadedKernel {
            entry: EntryMode::Pvh { entry },
            boot_info: PVH_INFO_START,
        });
    }

    let entry = match format {
        KernelFormat::Elf => result.kernel_load,
        KernelFormat::BzImage => result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
    };
    write_zero_page(
        mem,
        result.setup_header,
        &memory_map,
        cmdline_len,
        initramfs,
        rsdp,
    )?;
    Ok(LoadedKernel {
        entry: EntryMode::Linux64 { entry },
        boot_info: ZERO_PAGE_START,
    })
}

/// Places the initramfs page-aligned as high as allowed, as bootloaders do, so the kernel can
/// grow upwards without overwriting it.
fn load_initramfs<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let open_err = |source| BootError::OpenInitramfs {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    let too_big = || BootError::InitramfsTooBig {
        path: path.to_path_buf(),
        size,
        limit,
    };
    let start = (limit + 1)
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|&a| a >= kernel_end && size > 0)
        .ok_or_else(too_big)?;
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, size as usize)
        .map_err(|source| BootError::LoadInitramfs {
            path: path.to_path_buf(),
            source,
        })?;
    Ok((GuestAddress(start), size))
}

fn write_pvh_info<M: GuestMemoryBackend>(
    mem: &M,
    memory_map: &[layout::MemoryMapEntry],
    initramfs: Option<(GuestAddress, u64)>,
    rsdp: Option<GuestAddress>,
) -> Result<(), BootError> {
    if memory_map.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::TooManyMemoryMapEntries(memory_map.len()));
    }
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START.raw_value(),
        memmap_paddr: PVH_MEMMAP_START.raw_value(),
        memmap_entries: memory_map.len() as u32,
        rsdp_paddr: rsdp.map_or(0, |a| a.raw_value()),
        ..Default::default()
    };
    let entries: Vec<hvm_memmap_table_entry> = memory_map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    // The initramfs is passed as the first (only) module, as PVH Linux expects.
    let modules =
        initramfs.map(
            |(addr, size)| linux_loader::loader::elf::start_info::hvm_modlist_entry {
                paddr: addr.raw_value(),
                size,
                ..Default::default()
            },
        );
    const MODLIST_START: GuestAddress = GuestAddress(0x6040);
    if modules.is_some() {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = MODLIST_START.raw_value();
    }
    let mut params = BootParams::new(&start_info, PVH_INFO_START);
    params.set_sections(&entries, PVH_MEMMAP_START);
    if let Some(module) = modules {
        params.set_modules(&[module], MODLIST_START);
    }
    PvhBootConfigurator::write_bootparams::<M>(&params, mem).map_err(BootError::BootConfigurator)
}

fn write_zero_page<M: GuestMemoryBackend>(
    mem: &M,
    setup: Option<setup_header>,
    memory_map: &[layout::MemoryMapEntry],
    cmdline_len: u32,
    initramfs: Option<(GuestAddress, u64)>,
    rsdp: Option<GuestAddress>,
) -> Result<(), BootError> {
    let mut params = boot_params {
        hdr: setup.unwrap_or_default(),
        acpi_rsdp_addr: rsdp.map_or(0, |a| a.raw_value()),
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = BZIMAGE_HEADER_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START.raw_value() as u32;
    params.hdr.cmdline_size = cmdline_len;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    if let Some((addr, size)) = initramfs {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if memory_map.len() > params.e820_table.len() {
        return Err(BootError::TooManyMemoryMapEntries(memory_map.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(memory_map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: match e.kind {
                MemoryKind::Ram => 1,
                MemoryKind::Reserved => 2,
            },
        };
    }
    params.e820_entries = memory_map.len() as u8;
    let params = BootParams::new(&params, ZERO_PAGE_START);
    LinuxBootConfigurator::write_bootparams::<M>(&params, mem).map_err(BootError::BootConfigurator)
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestMemory = vm_memory::GuestMemoryMmap<()>;

    fn memory() -> TestMemory {
        TestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn pvh_start_info_carries_the_rsdp() {
        let mem = memory();
        let map = layout::memory_map(64 << 20);
        write_pvh_info(&mem, &map, None, Some(GuestAddress(0xe_0000))).unwrap();
        let info: hvm_start_info = mem.read_obj(PVH_INFO_START).unwrap();
        assert_eq!({ info.rsdp_paddr }, 0xe_0000);
        write_pvh_info(&mem, &map, None, None).unwrap();
        let info: hvm_start_info = mem.read_obj(PVH_INFO_START).unwrap();
        assert_eq!({ info.rsdp_paddr }, 0);
    }

    #[test]
    fn zero_page_carries_the_rsdp() {
        let mem = memory();
        let map = layout::memory_map(64 << 20);
        write_zero_page(&mem, None, &map, 1, None, Some(GuestAddress(0xe_0000))).unwrap();
        let params: boot_params = mem.read_obj(ZERO_PAGE_START).unwrap();
        assert_eq!({ params.acpi_rsdp_addr }, 0xe_0000);
    }
}
