//! One KVM virtual machine: its memory, legacy devices and vCPUs, built from a [`VmConfig`].

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::acpi::{AcpiShutdownDevice, Ged, SHUTDOWN_PORT};
use devices::legacy::i8042::{I8042_PORT_BASE, I8042_PORT_LEN};
use devices::legacy::serial::SERIAL_IRQ;
use devices::legacy::{Serial, I8042, SERIAL_PORT_BASE, SERIAL_PORT_LEN};
use devices::IoBus;
use kvm_bindings::{kvm_pit_config, CpuId, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{ConsoleOutputMode, DiskConfig, FsConfig, PmemConfig, VmConfig, VsockConfig};
use crate::console::ConsoleHost;
use crate::device_manager::{
    DeviceManager, DeviceManagerError, DeviceStateError, DevicesState, VirtioHandle,
};
use crate::kvm_stats::VcpuCounter;
use crate::memory::{self, GuestMemoryMmap, MemoryError};
use crate::migration::memory::DirtyPages;
use crate::seccomp::{self, SeccompMode};
use crate::vcpu::{ExitHandlers, VcpuError, Vcpus};
use crate::x86_64::cpu_state::{self, KvmVmState, VcpuState};
use crate::x86_64::{acpi, boot, cpuid, layout, mptable, msr, regs};
use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::console::Console;
use devices::virtio::fs::{Fs, FsError};
use devices::virtio::net::{MacAddr, Net, NetConfig};
use devices::virtio::pmem::{PmemBacking, PmemError, PMEM_ALIGNMENT};
use devices::virtio::rng::Rng;
use devices::virtio::vhost_user::{VhostUserError, HANDSHAKE_TIMEOUT};
use devices::virtio::vsock::{Vsock, VsockError};

/// How long a pause may take before it is reported as stuck.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
const CPUID_ADDRESS_SIZES: u32 = 0x8000_0008;
/// Used when the host does not report its physical address width.
const DEFAULT_PHYS_BITS: u32 = 36;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM enabled, and may this user open it?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    KvmApiVersion(i32),
    #[error("this KVM lacks a required capability: {0:?}")]
    KvmCapability(Cap),
    #[error("cannot create the KVM VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("cannot set up the KVM VM ({what}): {source}")]
    SetupVm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("--cpus boot={requested} exceeds the {max} vCPUs this host's KVM allows")]
    TooManyVcpus { requested: u8, max: usize },
    #[error("--cpus: at least one vCPU is needed")]
    NoVcpus,
    #[error("--memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("{0}")]
    Boot(#[from] boot::BootError),
    #[error("--kernel is required to boot a VM")]
    NoKernel,
    #[error("{0}")]
    Cpuid(#[from] cpuid::CpuidError),
    #[error("{0}")]
    Msr(#[from] msr::MsrError),
    #[error("{0}")]
    Regs(#[from] regs::RegsError),
    #[error("{0}")]
    Mptable(#[from] mptable::MptableError),
    #[error("{0}")]
    Acpi(#[from] acpi::AcpiError),
    #[error("cannot press the power button: {0}")]
    PowerButton(std::io::Error),
    #[error("cannot set up vCPU {index} ({what}): {source}")]
    SetupVcpu {
        index: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot place a device on the I/O bus: {0}")]
    Bus(#[from] devices::IoBusError),
    #[error("{0}")]
    Vcpu(#[from] VcpuError),
    #[error("{0}")]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("{0}")]
    Device(String),
    #[error("cannot restore the VM: {0}")]
    Restore(String),
    #[error("{0}")]
    DeviceManager(#[from] DeviceManagerError),
    #[error("cannot capture the devices' state: {0}")]
    SaveDevices(#[source] DeviceStateError),
    #[error("{field} ({id}): {source}")]
    Pmem {
        field: &'static str,
        id: String,
        #[source]
        source: PmemError,
    },
    #[error("{field}: {source}")]
    Fs {
        field: &'static str,
        #[source]
        source: FsError,
    },
    #[error(
        "fs ({id}): a vhost-user backend must map guest memory, which needs \
         memory.shared=on (or memory.hugepages=on): {source}"
    )]
    FsMemory {
        id: String,
        #[source]
        source: MemoryError,
    },
    #[error("{field}: {source}")]
    Vsock {
        field: &'static str,
        #[source]
        source: VsockError,
    },
}

/// Event fds through which the guest ends a VM run; the control loop waits on them.
pub struct VmEvents {
    pub exit: EventFd,
    pub reset: EventFd,
    pub vcpu_failure: EventFd,
    /// The guest ejected a hot-plugged PCI device (its `_EJ0` ran).
    pub pci_eject: EventFd,
}

impl VmEvents {
    pub fn new() -> Result<Self, VmError> {
        let new = || EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd);
        Ok(Self {
            exit: new()?,
            reset: new()?,
            vcpu_failure: new()?,
            pci_eject: new()?,
        })
    }
}

/// Opens /dev/kvm and checks what the VMM relies on.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let version = kvm.get_api_version();
    if version != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(VmError::KvmApiVersion(version));
    }
    for cap in [
        Cap::Irqchip,
        Cap::UserMemory,
        Cap::Irqfd,
        Cap::ImmediateExit,
        Cap::Pit2,
        Cap::SetTssAddr,
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::KvmCapability(cap));
        }
    }
    Ok(kvm)
}

fn phys_bits(cpuid: &CpuId) -> u32 {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == CPUID_ADDRESS_SIZES)
        .map_or(DEFAULT_PHYS_BITS, |e| e.eax & 0xff)
}

/// A booted VM: KVM objects, guest memory, devices and running vCPUs.
pub struct Vm {
    // Field order matters: vCPU threads and then the device loop stop (Drop) before the memory
    // they use is unmapped. pmem regions belong to the device manager, which deletes each one's
    // KVM slot before its mapping goes.
    vcpus: Vcpus,
    device_manager: DeviceManager,
    ged: Arc<Mutex<Ged>>,
    vm_fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    /// With KVM's manual dirty-log re-arming on (FT's hot pages): the pages harvests reported
    /// that are not re-armed yet (writable, and reported by every harvest until re-armed).
    manual_rearm: Option<DirtyPages>,
    /// Of the last harvest, the pages the guest wrote itself (its KVM dirty log).
    guest_written: Option<DirtyPages>,
    /// Each vCPU's count of page faults KVM handled (empty: this kernel does not tell).
    page_fault_counters: Vec<VcpuCounter>,
}

/// Everything a restore needs besides guest memory and the VM configuration.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshotState {
    pub vcpus: Vec<VcpuState>,
    pub kvm: KvmVmState,
    pub devices: DevicesState,
    /// ACPI events (the power button) raised and not yet read by the guest.
    #[serde(default)]
    pub acpi_events: u32,
}

/// How a new VM gets its first contents.
pub enum Start<'a> {
    /// Load the configured kernel and enter it.
    Boot,
    /// Put a captured state back: `fill_memory` writes guest RAM, then vCPUs, in-kernel
    /// devices and device models get their state; the vCPUs run at once only with `resume`.
    Restore {
        state: &'a VmSnapshotState,
        memory: RestoredMemory<'a>,
        resume: bool,
    },
}

/// Where a restored VM's memory comes from.
pub enum RestoredMemory<'a> {
    /// Guest memory already filled (a migration receives it before the VM exists).
    Filled(GuestMemoryMmap),
    /// Fresh memory that this function fills (a snapshot's memory file).
    Fill(&'a dyn Fn(&GuestMemoryMmap) -> Result<(), String>),
}

impl Vm {
    /// Builds the VM described by `config`, loads its kernel and starts its vCPUs.
    /// `serial_out` receives the guest's COM1 output (None: no serial port).
    pub fn boot(
        kvm: &Kvm,
        config: &VmConfig,
        serial_out: Option<Box<dyn Write + Send>>,
        events: &VmEvents,
        seccomp: SeccompMode,
    ) -> Result<Self, VmError> {
        Self::create(kvm, config, serial_out, events, seccomp, Start::Boot)
    }

    /// Builds the VM described by `config` and starts it as `start` says.
    pub fn create(
        kvm: &Kvm,
        config: &VmConfig,
        serial_out: Option<Box<dyn Write + Send>>,
        events: &VmEvents,
        seccomp: SeccompMode,
        start: Start,
    ) -> Result<Self, VmError> {
        match start {
            Start::Boot => {
                Self::prepare(kvm, config, serial_out, events, seccomp, Default::default())?.boot()
            }
            Start::Restore {
                state,
                memory: RestoredMemory::Filled(memory),
                resume,
            } => Self::prepare(
                kvm,
                config,
                serial_out,
                events,
                seccomp,
                PrepareOptions {
                    memory: Some(memory),
                    ..Default::default()
                },
            )?
            .restore(state, resume),
            Start::Restore {
                state,
                memory: RestoredMemory::Fill(fill),
                resume,
            } => {
                let prepared =
                    Self::prepare(kvm, config, serial_out, events, seccomp, Default::default())?;
                fill(prepared.memory()).map_err(VmError::Restore)?;
                prepared.restore(state, resume)
            }
        }
    }

    /// Creates everything of the VM that does not depend on its contents: the KVM VM with its
    /// irqchip and PIT, guest memory registered with KVM (`memory`, or fresh), the devices and
    /// the vCPU fds. Nothing runs yet.
    pub fn prepare(
        kvm: &Kvm,
        config: &VmConfig,
        serial_out: Option<Box<dyn Write + Send>>,
        events: &VmEvents,
        seccomp: SeccompMode,
        options: PrepareOptions,
    ) -> Result<PreparedVm, VmError> {
        let memory = options.memory;
        let cpu_count = config.cpus.boot_vcpus;
        if cpu_count == 0 {
            return Err(VmError::NoVcpus);
        }
        let max_vcpus = kvm.get_max_vcpus().min(254);
        if usize::from(cpu_count) > max_vcpus {
            return Err(VmError::TooManyVcpus {
                requested: cpu_count,
                max: max_vcpus,
            });
        }
        let payload = config.payload.as_ref().ok_or(VmError::NoKernel)?;
        let base_cpuid = cpuid::supported(kvm)?;
        let mem_size = config.memory.size;
        memory::validate_size(mem_size, phys_bits(&base_cpuid))?;
        // Shared or hugepage RAM, as configured; a migration, restore or standby VM gets the
        // same kind as its source because it is built from the source's configuration.
        let backing = memory::Backing::from_config(&config.memory)?;

        let vm_fd = Arc::new(kvm.create_vm().map_err(VmError::CreateVm)?);
        let setup = |what, r: Result<(), kvm_ioctls::Error>| {
            r.map_err(|source| VmError::SetupVm { what, source })
        };
        setup(
            "TSS address",
            vm_fd.set_tss_address(layout::KVM_TSS_ADDRESS),
        )?;
        setup(
            "identity map address",
            vm_fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS),
        )?;
        setup("in-kernel irqchip", vm_fd.create_irq_chip())?;
        setup(
            "in-kernel PIT",
            vm_fd.create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            }),
        )?;

        let memory = match memory {
            Some(memory) => {
                let size: u64 = vm_memory::GuestMemoryBackend::iter(&memory)
                    .map(vm_memory::GuestMemoryRegion::len)
                    .sum();
                if size != mem_size {
                    return Err(VmError::Restore(format!(
                        "received {size} bytes of memory but the configuration has {mem_size}"
                    )));
                }
                memory
            }
            None => memory::create_backed(mem_size, backing)?,
        };
        // As Cloud Hypervisor: `thp=on` (its default) for anonymous private RAM only (hugetlb
        // pages are huge already; shared memory follows its file's policy).
        if config.memory.thp && backing == memory::Backing::Private {
            memory::advise_huge_pages(&memory);
        }
        memory::register(&vm_fd, &memory, false)?;

        let mut mmio = IoBus::new();
        let ged = add_ged(&vm_fd, &mut mmio)?;
        let mut device_manager = DeviceManager::new(memory.clone(), vm_fd.clone());
        device_manager.set_placement(config.pci_placement());
        device_manager.attach_hotplug(
            &mut mmio,
            ged.clone(),
            events.pci_eject.try_clone().map_err(VmError::EventFd)?,
        )?;
        // Cloud Hypervisor's order: the virtio console, disks, NICs, then the entropy device.
        add_console(
            &vm_fd,
            &mut device_manager,
            config,
            options.console.as_deref(),
        )?;
        add_disks(
            &vm_fd,
            &mut device_manager,
            config,
            options.defer_disk_locks,
        )?;
        add_nets(&vm_fd, &mut device_manager, config)?;
        add_rng(&vm_fd, &mut device_manager, config)?;
        add_fs(&vm_fd, &mut device_manager, config, &memory)?;
        // Then, as Cloud Hypervisor: (virtio-fs above,) pmem, vsock. pmem regions go above the 64-bit PCI window.
        let mmio64 = layout::pci_mmio64_window(mem_size, phys_bits(&base_cpuid) as u8);
        // Hot-plugged regions go there too (first fit), so the device manager keeps the area.
        device_manager.set_pmem_area((
            (mmio64.0 + mmio64.1).next_multiple_of(PMEM_ALIGNMENT),
            1u64 << phys_bits(&base_cpuid).min(52),
        ));
        add_pmem(&vm_fd, &mut device_manager, config)?;
        add_vsock(&vm_fd, &mut device_manager, config)?;
        // Devices are found on the PCI bus and through ACPI: the command line is the user's.
        let cmdline = payload.cmdline.clone().unwrap_or_default();

        let mut pio = IoBus::new();
        device_manager.attach_pci(&mut pio, &mut mmio, mmio64)?;
        let serial = match serial_out {
            Some(out) => {
                let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
                setup("serial irqfd", vm_fd.register_irqfd(&irq, SERIAL_IRQ))?;
                let serial = Arc::new(Mutex::new(Serial::new(irq, out)));
                pio.insert(serial.clone(), SERIAL_PORT_BASE, SERIAL_PORT_LEN)?;
                Some(serial)
            }
            None => None,
        };
        let clone_evt = |e: &EventFd| e.try_clone().map_err(VmError::EventFd);
        pio.insert(
            Arc::new(Mutex::new(I8042::new(clone_evt(&events.reset)?))),
            I8042_PORT_BASE,
            I8042_PORT_LEN,
        )?;
        pio.insert(
            Arc::new(Mutex::new(AcpiShutdownDevice::new(
                clone_evt(&events.exit)?,
                clone_evt(&events.reset)?,
            ))),
            SHUTDOWN_PORT,
            1,
        )?;
        let vcpu_fds = (0..cpu_count)
            .map(|index| {
                vm_fd
                    .create_vcpu(u64::from(index))
                    .map_err(|source| VmError::SetupVcpu {
                        index,
                        what: "create",
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let handlers = Arc::new(ExitHandlers {
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            reset_evt: clone_evt(&events.reset)?,
            exit_evt: clone_evt(&events.exit)?,
        });
        let acpi_pci_intx = device_manager.pci_intx();
        Ok(PreparedVm {
            config: config.clone(),
            vm_fd,
            memory,
            device_manager,
            serial,
            vcpu_fds,
            base_cpuid,
            msr_indices: msr::supported_indices(kvm)?,
            cmdline,
            handlers,
            failure_evt: clone_evt(&events.vcpu_failure)?,
            seccomp,
            disk_locks_deferred: options.defer_disk_locks,
            ged,
            acpi_pci_intx,
        })
    }

    /// Stops the guest: all vCPUs at an instruction boundary and the device loop between
    /// events, so neither guest nor device code changes memory or state until [`Vm::resume`].
    pub fn pause(&mut self) -> Result<(), VmError> {
        // The device loop parks while the vCPUs leave KVM_RUN, not after them (FT pauses
        // every epoch). Neither state is read before both stand still.
        self.device_manager.ask_pause_loop()?;
        if let Err(e) = self.vcpus.pause(PAUSE_TIMEOUT) {
            if let Err(again) = self.device_manager.resume_loop() {
                log::error!("the device loop did not go on after a failed pause: {again}");
            }
            return Err(e.into());
        }
        if let Err(e) = self.device_manager.pause_loop() {
            self.vcpus.resume();
            return Err(e.into());
        }
        // Nothing sends the vCPUs interrupts any more: they read their state on their own
        // cores while this thread goes on (a checkpoint harvests dirty pages next).
        self.vcpus.ask_capture();
        Ok(())
    }

    /// See [`crate::vcpu::Vcpus::last_stop`].
    pub fn last_stop(&self) -> Option<(Instant, Duration)> {
        self.vcpus.last_stop()
    }

    pub fn resume(&mut self) -> Result<(), VmError> {
        self.device_manager.resume_loop()?;
        self.vcpus.resume();
        Ok(())
    }

    pub fn device_manager(&self) -> &DeviceManager {
        &self.device_manager
    }

    /// What a hot-plug needs at once: the device manager, the VM's KVM handle and memory.
    pub(crate) fn hotplug_parts(&mut self) -> (&mut DeviceManager, &VmFd, &GuestMemoryMmap) {
        (&mut self.device_manager, &self.vm_fd, &self.memory)
    }

    pub fn device_manager_mut(&mut self) -> &mut DeviceManager {
        &mut self.device_manager
    }

    /// Captures the complete state of a paused VM ([`Vm::pause`]): vCPUs, in-kernel devices
    /// and device models. Guest memory is not included.
    pub fn save_state(&mut self) -> Result<VmSnapshotState, VmError> {
        // The vCPUs last: each reads its own state once asked in `pause`, meanwhile this
        // thread saves the rest.
        let kvm = cpu_state::save_vm(&self.vm_fd).map_err(|e| VmError::Restore(e.to_string()))?;
        let devices = self
            .device_manager
            .save_state()
            .map_err(VmError::SaveDevices)?;
        let acpi_events = lock_ged(&self.ged).pending();
        Ok(VmSnapshotState {
            vcpus: self.vcpus.save_state()?,
            kvm,
            devices,
            acpi_events,
        })
    }

    pub fn vcpus(&self) -> &Vcpus {
        &self.vcpus
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// Switches KVM dirty-page logging on or off for all of guest RAM.
    pub fn set_dirty_logging(&self, enabled: bool) -> Result<(), MemoryError> {
        memory::register(&self.vm_fd, &self.memory, enabled)
    }

    /// FT's hot pages: switches KVM's manual dirty-log re-arming on (false: this KVM cannot)
    /// or off. Off, every page left writable is re-armed first, so no later write goes
    /// unlogged; the pages harvested then are dropped (whoever logs next starts from a full
    /// pass, as a migration or a new protection does).
    pub fn set_manual_rearm(&mut self, on: bool) -> Result<bool, VmError> {
        let kvm_err = |what, e: std::io::Error| VmError::SetupVm {
            what,
            source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
        };
        if on {
            if self.manual_rearm.is_some() {
                return Ok(true);
            }
            if !crate::dirty_log::manual_rearm_supported(&self.vm_fd) {
                return Ok(false);
            }
            let empty =
                DirtyPages::empty(&self.memory).map_err(|e| VmError::Restore(e.to_string()))?;
            crate::dirty_log::set_manual_rearm(&self.vm_fd, true)
                .map_err(|e| kvm_err("enable manual dirty-log re-arming", e))?;
            self.manual_rearm = Some(empty);
            return Ok(true);
        }
        let Some(mut reported) = self.manual_rearm.take() else {
            return Ok(false);
        };
        // What the guest wrote since the last harvest, kept pages included.
        let kvm = self.take_dirty_log()?;
        let latest = DirtyPages::from_bitmaps(&kvm, &self.memory, false)
            .map_err(|e| VmError::Restore(e.to_string()))?;
        reported.union_with(&latest);
        clear_dirty_log(&self.vm_fd, &reported).map_err(|e| kvm_err("re-arm the dirty log", e))?;
        crate::dirty_log::set_manual_rearm(&self.vm_fd, false)
            .map_err(|e| kvm_err("disable manual dirty-log re-arming", e))?;
        Ok(false)
    }

    /// With manual re-arming: re-arms every page reported since it was last re-armed, except
    /// `keep` (those stay writable and in every harvest).
    pub fn rearm_dirty_log(&mut self, keep: &DirtyPages) -> Result<(), VmError> {
        let Some(reported) = self.manual_rearm.as_mut() else {
            return Ok(());
        };
        let mut rearm = reported.clone();
        rearm.subtract(keep);
        // On an error nothing is forgotten: re-arming a page twice is harmless.
        clear_dirty_log(&self.vm_fd, &rearm).map_err(|e| VmError::SetupVm {
            what: "re-arm the dirty log",
            source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
        reported.subtract(&rearm);
        Ok(())
    }

    /// Records the pages a harvest reported (while manual re-arming is on, they wait to be
    /// re-armed) and, of those, the ones the guest wrote itself (None: not computed).
    pub fn note_reported(&mut self, pages: &DirtyPages, guest_written: Option<DirtyPages>) {
        if let Some(reported) = self.manual_rearm.as_mut() {
            reported.union_with(pages);
        }
        self.guest_written = guest_written;
    }

    /// Whether KVM's manual dirty-log re-arming (FT's hot pages) is on.
    pub fn manual_rearm_on(&self) -> bool {
        self.manual_rearm.is_some()
    }

    /// Of the last harvest, the pages the guest wrote itself (not devices).
    pub fn guest_written(&self) -> Option<&DirtyPages> {
        self.guest_written.as_ref()
    }

    /// Page faults KVM handled for this VM's vCPUs since they were created (with dirty logging
    /// on, mostly first writes to write-protected pages). None: this kernel does not count
    /// them per vCPU, or a count could not be read.
    pub fn kvm_page_faults(&self) -> Option<u64> {
        if self.page_fault_counters.is_empty() {
            return None;
        }
        let mut total = 0u64;
        for counter in &self.page_fault_counters {
            match counter.read() {
                Ok(n) => total = total.saturating_add(n),
                Err(e) => {
                    log::debug!("reading a vCPU's page-fault count: {e}");
                    return None;
                }
            }
        }
        Some(total)
    }

    /// Pages the guest wrote since the last call (dirty logging must be on), as one bitmap per
    /// memory slot, 64 pages per word.
    pub fn take_dirty_log(&self) -> Result<Vec<Vec<u64>>, VmError> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        self.memory
            .iter()
            .enumerate()
            .map(|(slot, region)| {
                self.vm_fd
                    .get_dirty_log(slot as u32, region.len() as usize)
                    .map_err(|source| VmError::SetupVm {
                        what: "get dirty log",
                        source,
                    })
            })
            .collect()
    }

    /// Per-device counters, keyed by device id (Cloud Hypervisor's `vm.counters`).
    pub fn counters(&self) -> crate::control::VmCounters {
        self.device_manager.counters()
    }

    /// `vm.info`'s device tree (PCI devices and their BDFs).
    pub fn device_tree(&self) -> crate::control::DeviceTree {
        self.device_manager.device_tree()
    }

    /// Presses the ACPI power button: the generic event device interrupts the guest, whose
    /// ACPI code sees a power-button event; a guest that handles it powers itself off.
    pub fn power_button(&self) -> Result<(), VmError> {
        // A poisoned lock still holds a usable device: its state is one word.
        lock_ged(&self.ged)
            .notify_power_button()
            .map_err(VmError::PowerButton)
    }

    /// Stops the vCPUs; the VM is done after this.
    pub fn shutdown(&mut self) {
        self.vcpus.stop();
        self.device_manager.stop();
    }
}

/// Re-arms the pages of `pages` (one KVM memory slot per region of the layout).
fn clear_dirty_log(vm_fd: &VmFd, pages: &DirtyPages) -> std::io::Result<()> {
    for (slot, (count, bitmap)) in pages.slot_bitmaps().enumerate() {
        if bitmap.iter().any(|w| *w != 0) {
            crate::dirty_log::clear_dirty_log(vm_fd, slot as u32, count, bitmap)?;
        }
    }
    Ok(())
}

/// A VM whose KVM objects, memory slots, devices and vCPU fds exist, but whose vCPUs have
/// neither state nor threads yet. A migration destination prepares it as soon as the
/// configuration arrives, so only the state restore is left for the downtime window.
pub struct PreparedVm {
    config: VmConfig,
    // Dropped in this order if the VM never starts: devices before memory.
    device_manager: DeviceManager,
    vcpu_fds: Vec<VcpuFd>,
    vm_fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    serial: Option<Arc<Mutex<Serial>>>,
    base_cpuid: CpuId,
    msr_indices: Vec<u32>,
    cmdline: String,
    handlers: Arc<ExitHandlers>,
    failure_evt: EventFd,
    seccomp: SeccompMode,
    disk_locks_deferred: bool,
    ged: Arc<Mutex<Ged>>,
    /// Legacy PCI interrupts the ACPI tables route (`_PRT`): (device number on bus 0, GSI its
    /// INTA# is wired to), one per device that has an INTx line.
    acpi_pci_intx: Vec<(u8, u32)>,
}

/// What [`Vm::prepare`] starts from.
#[derive(Default)]
pub struct PrepareOptions {
    /// Guest memory that already exists (else fresh memory is created).
    pub memory: Option<GuestMemoryMmap>,
    /// Open disk images without their locks; [`PreparedVm::restore`] takes them (a migration
    /// destination prepares while the source still holds them).
    pub defer_disk_locks: bool,
    /// The host ends of the virtio console, kept by the caller across reboots; None opens
    /// them from the configuration for this VM alone.
    pub console: Option<Arc<ConsoleHost>>,
}

impl PreparedVm {
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// Loads the configured kernel and starts the vCPUs at its entry.
    pub fn boot(self) -> Result<Vm, VmError> {
        let payload = self.config.payload.as_ref().ok_or(VmError::NoKernel)?;
        let kernel = payload.kernel.as_deref().ok_or(VmError::NoKernel)?;
        let mem_size = self.config.memory.size;
        let cpu_count = self.config.cpus.boot_vcpus;
        mptable::setup(&self.memory, cpu_count)?;
        let rsdp = acpi::create_acpi_tables(
            &self.memory,
            &acpi::AcpiMachine {
                cpus: cpu_count,
                mem_size,
                phys_bits: phys_bits(&self.base_cpuid) as u8,
                pci_intx: self.acpi_pci_intx.clone(),
                serial: self.serial.is_some(),
            },
        )?;
        let loaded = boot::load_kernel(
            &self.memory,
            mem_size,
            kernel,
            payload.initramfs.as_deref(),
            &self.cmdline,
            Some(rsdp),
        )?;
        let boot_msrs = msr::boot_msrs(&self.msr_indices)?;
        for (index, fd) in self.vcpu_fds.iter().enumerate() {
            setup_vcpu(
                fd,
                &self.memory,
                index as u8,
                cpu_count,
                &self.base_cpuid,
                &boot_msrs,
                &loaded,
            )?;
        }
        log::info!(
            "VM booting: {cpu_count} vCPU(s), {} MiB, kernel {} ({:?})",
            mem_size >> 20,
            kernel.display(),
            loaded.entry
        );
        self.start(false)
    }

    /// Puts captured state back (guest memory must hold its contents already) and starts
    /// the vCPUs, parked unless `resume`.
    pub fn restore(mut self, state: &VmSnapshotState, resume: bool) -> Result<Vm, VmError> {
        let restore_err = |e: &dyn std::fmt::Display| VmError::Restore(e.to_string());
        if state.vcpus.len() != self.vcpu_fds.len() {
            return Err(VmError::Restore(format!(
                "the state has {} vCPUs but the configuration {}",
                state.vcpus.len(),
                self.vcpu_fds.len()
            )));
        }
        if self.disk_locks_deferred {
            self.device_manager
                .reacquire_disk_locks()
                .map_err(|e| restore_err(&e))?;
        }
        cpu_state::restore_vm(&self.vm_fd, &state.kvm).map_err(|e| restore_err(&e))?;
        for (index, (fd, vcpu)) in self.vcpu_fds.iter().zip(&state.vcpus).enumerate() {
            cpu_state::restore_vcpu(fd, index as u8, vcpu).map_err(|e| restore_err(&e))?;
        }
        // pmem regions where the source's guest had them, before the devices' own checks.
        self.device_manager
            .place_pmem_as_saved(&state.devices)
            .map_err(|e| restore_err(&e))?;
        self.device_manager
            .restore(&state.devices, self.serial.as_ref())
            .map_err(|e| restore_err(&e))?;
        lock_ged(&self.ged)
            .restore(state.acpi_events)
            .map_err(VmError::PowerButton)?;
        log::info!(
            "VM restored: {} vCPU(s), {} MiB, {}",
            self.vcpu_fds.len(),
            self.config.memory.size >> 20,
            if resume { "running" } else { "paused" }
        );
        self.start(!resume)
    }

    fn start(mut self, start_paused: bool) -> Result<Vm, VmError> {
        self.device_manager.set_serial(self.serial.clone());
        self.device_manager.start()?;
        let host_cpus: Vec<Vec<usize>> = (0..self.vcpu_fds.len() as u32)
            .map(|index| self.config.cpus.host_cpus_of(index))
            .collect();
        let page_fault_counters = self
            .vcpu_fds
            .iter()
            .map(VcpuCounter::page_faults)
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default();
        let vcpus = Vcpus::start(
            self.vcpu_fds,
            self.handlers,
            self.failure_evt,
            seccomp::vcpu_filter(self.seccomp)?,
            Arc::new(self.msr_indices),
            start_paused,
            &host_cpus,
        )?;
        Ok(Vm {
            vcpus,
            device_manager: self.device_manager,
            ged: self.ged,
            vm_fd: self.vm_fd,
            memory: self.memory,
            manual_rearm: None,
            guest_written: None,
            page_fault_counters,
        })
    }
}

/// The ACPI generic event device on the MMIO bus, its interrupt an irqfd on the GED line.
fn add_ged(vm_fd: &VmFd, mmio: &mut IoBus) -> Result<Arc<Mutex<Ged>>, VmError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
    vm_fd
        .register_irqfd(&irq, layout::GED_IRQ)
        .map_err(|source| VmError::SetupVm {
            what: "GED irqfd",
            source,
        })?;
    let ged = Arc::new(Mutex::new(Ged::new(irq)));
    mmio.insert(ged.clone(), layout::GED_START, layout::GED_SIZE)?;
    Ok(ged)
}

fn add_disks(
    vm_fd: &VmFd,
    device_manager: &mut DeviceManager,
    config: &VmConfig,
    defer_lock: bool,
) -> Result<(), VmError> {
    for (index, disk) in config.disks.iter().flatten().enumerate() {
        let id = disk.id.clone().unwrap_or_else(|| format!("_disk{index}"));
        let block = new_disk(disk, &id, defer_lock)?;
        device_manager.add_virtio_device(vm_fd, id, block)?;
    }
    Ok(())
}

/// The virtio-blk model of `disk` (at boot and for `vm.add-disk`).
pub(crate) fn new_disk(
    disk: &DiskConfig,
    id: &str,
    defer_lock: bool,
) -> Result<VirtioHandle, VmError> {
    let block = Block::new(BlockConfig {
        path: disk.path.clone().unwrap_or_default(),
        readonly: disk.readonly,
        direct: disk.direct,
        id: disk.serial.clone().or_else(|| disk.id.clone()),
        num_queues: disk.num_queues,
        queue_size: disk.queue_size,
        defer_lock,
    })
    .map_err(|e| VmError::Device(format!("--disk {id}: {e}")))?;
    Ok(VirtioHandle::Block(Arc::new(Mutex::new(block))))
}

fn add_nets(
    vm_fd: &VmFd,
    device_manager: &mut DeviceManager,
    config: &VmConfig,
) -> Result<(), VmError> {
    for (index, net_config) in config.net.iter().flatten().enumerate() {
        let id = net_config
            .id
            .clone()
            .unwrap_or_else(|| format!("_net{index}"));
        let net = new_net(net_config, &id)?;
        device_manager.add_virtio_device(vm_fd, id, net)?;
    }
    Ok(())
}

/// The virtio-net model of `net_config` (at boot and for `vm.add-net`).
pub(crate) fn new_net(
    net_config: &crate::config::NetConfig,
    id: &str,
) -> Result<VirtioHandle, VmError> {
    let mac = match &net_config.mac {
        Some(mac) => Some(
            mac.parse::<MacAddr>()
                .map_err(|e| VmError::Device(format!("--net {id}: {e}")))?,
        ),
        None => None,
    };
    let (ip, mask) = net_config.host_address();
    let tap_fd = match net_config.passed_fds().and_then(|fds| fds.first()) {
        Some(&fd) => Some(passed_tap(id, fd)?),
        None => None,
    };
    let net = Net::new(NetConfig {
        tap: net_config.tap.clone(),
        tap_fd,
        ip,
        mask,
        mac,
        mtu: net_config.mtu,
        queue_size: net_config.queue_size,
        id: Some(id.to_string()),
        offload_csum: net_config.offload_csum,
        offload_tso: net_config.offload_tso,
    })
    .map_err(|e| VmError::Device(format!("--net {id}: {e}")))?;
    log::info!("{id}: TAP {}", net.tap_name());
    Ok(VirtioHandle::Net(Arc::new(Mutex::new(net))))
}

/// The TAP of a NIC given by descriptor (`fds`, one per queue pair; validation allows one).
/// The number is this process's: inherited (`--net fd=N`, checked open at start-up and never
/// closed) or passed with `vm.add-net` (held open by the control loop while the NIC exists).
/// The device gets a duplicate, so a rebuild (reboot) finds the original still open.
fn passed_tap(id: &str, fd: i32) -> Result<devices::tap::PassedTap, VmError> {
    let what = format!("net {id} (fd {fd})");
    // SAFETY: the descriptor is open for the duration of the borrow (see above); it is only
    // duplicated here, never closed or taken over.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let owned = borrowed
        .try_clone_to_owned()
        .map_err(|e| VmError::Device(format!("{what}: cannot duplicate the descriptor: {e}")))?;
    Ok(devices::tap::PassedTap::new(owned, what))
}

/// Cloud Hypervisor's id of the virtio console.
pub const CONSOLE_DEVICE_ID: &str = "__console";
/// Cloud Hypervisor's id of the entropy device.
pub const RNG_DEVICE_ID: &str = "_rng";

/// The virtio console on `host`'s ends (or ends opened from the configuration).
fn add_console(
    vm_fd: &VmFd,
    device_manager: &mut DeviceManager,
    config: &VmConfig,
    host: Option<&ConsoleHost>,
) -> Result<(), VmError> {
    if config.console.mode == ConsoleOutputMode::Off {
        return Ok(());
    }
    let opened;
    let host = match host {
        Some(host) => host,
        None => {
            opened = ConsoleHost::open(&config.console)
                .map_err(|e| VmError::Device(format!("--console: {e}")))?;
            match &opened {
                Some(host) => host,
                None => return Ok(()),
            }
        }
    };
    let backend = host
        .backend()
        .map_err(|e| VmError::Device(format!("--console: {e}")))?;
    let (cols, rows) = host.size();
    let console = Console::new(CONSOLE_DEVICE_ID, backend, cols, rows)
        .map_err(|e| VmError::Device(format!("--console: {e}")))?;
    device_manager.add_virtio_device(
        vm_fd,
        CONSOLE_DEVICE_ID.to_string(),
        VirtioHandle::Console(Arc::new(Mutex::new(console))),
    )?;
    Ok(())
}

/// The entropy device, reading `rng.src`.
fn add_rng(
    vm_fd: &VmFd,
    device_manager: &mut DeviceManager,
    config: &VmConfig,
) -> Result<(), VmError> {
    let src = &config.rng.src;
    let source = std::fs::File::open(src).map_err(|e| {
        VmError::Device(format!(
            "--rng: cannot open entropy source {}: {e}",
            src.display()
        ))
    })?;
    let rng =
        Rng::new(RNG_DEVICE_ID, source).map_err(|e| VmError::Device(format!("--rng: {e}")))?;
    device_manager.add_virtio_device(
        vm_fd,
        RNG_DEVICE_ID.to_string(),
        VirtioHandle::Rng(Arc::new(Mutex::new(rng))),
    )?;
    Ok(())
}

/// The virtio-pmem devices, each region a KVM memory slot of its own, laid out one after the
/// other in the device manager's pmem area.
fn add_pmem(
    vm_fd: &VmFd,
    device_manager: &mut DeviceManager,
    config: &VmConfig,
) -> Result<(), VmError> {
    for (index, pmem) in config.pmem.iter().flatten().enumerate() {
        let id = pmem.id.clone().unwrap_or_else(|| format!("_pmem{index}"));
        let backing = open_pmem(pmem, &id)?;
        device_manager.add_pmem(vm_fd, id, backing)?;
    }
    Ok(())
}

/// Opens and maps the file of `pmem` (at boot and for `vm.add-pmem`): a file smaller than
/// `size`, or a size that is not whole 2 MiB pages, is refused here, before the VM changes.
pub(crate) fn open_pmem(pmem: &PmemConfig, id: &str) -> Result<Arc<PmemBacking>, VmError> {
    PmemBacking::open(&pmem.file, pmem.size, pmem.discard_writes)
        .map(Arc::new)
        .map_err(|source| VmError::Pmem {
            field: match source {
                PmemError::SizeNotAligned { .. }
                | PmemError::Empty { .. }
                | PmemError::FileTooSmall { .. }
                | PmemError::TooLarge { .. }
                | PmemError::SetLen { .. } => "pmem.size",
                _ => "pmem.file",
            },
            id: id.to_string(),
            source,
        })
}

/// The virtio-fs devices, each connected to (and negotiated with) its vhost-user backend now,
/// so that a backend that is missing, dead or mute fails the boot with its socket named.
fn add_fs(
    vm_fd: &VmFd,
    device_manager: &mut DeviceManager,
    config: &VmConfig,
    memory: &GuestMemoryMmap,
) -> Result<(), VmError> {
    for (index, fs) in config.fs.iter().flatten().enumerate() {
        let id = fs.id.clone().unwrap_or_else(|| format!("_fs{index}"));
        let device = new_fs(fs, &id, memory)?;
        device_manager.add_virtio_device(vm_fd, id, device)?;
    }
    Ok(())
}

/// The virtio-fs model of `fs` (at boot and for `vm.add-fs`), connected to its backend: every
/// answer of the handshake is bounded ([`HANDSHAKE_TIMEOUT`], the connection's watchdog), so a
/// backend that never answers is an error, not a hung control loop.
pub(crate) fn new_fs(
    fs: &FsConfig,
    id: &str,
    memory: &GuestMemoryMmap,
) -> Result<VirtioHandle, VmError> {
    // Validation already asks for shared memory; this names the memory actually made.
    memory::shared_regions(memory).map_err(|source| VmError::FsMemory {
        id: id.to_string(),
        source,
    })?;
    let device = Fs::new(
        id.to_string(),
        &fs.tag,
        fs.num_queues,
        fs.queue_size,
        &fs.socket,
        HANDSHAKE_TIMEOUT,
        Arc::new(|| crate::seccomp::apply_or_log(crate::seccomp::ThreadRole::VhostUserWatchdog)),
    )
    .map_err(|source| VmError::Fs {
        field: match &source {
            FsError::Tag { .. } => "fs.tag",
            FsError::NoRequestQueue { .. } => "fs.num_queues",
            FsError::Backend {
                source: VhostUserError::QueueCount { .. },
                ..
            } => "fs.num_queues",
            _ => "fs.socket",
        },
        source,
    })?;
    log::info!(
        "{id}: virtio-fs tag {} served by the vhost-user backend at {}",
        fs.tag,
        fs.socket.display()
    );
    Ok(VirtioHandle::Fs(Arc::new(Mutex::new(device))))
}

/// The virtio-vsock device with Cloud Hypervisor's hybrid (Unix socket) backend.
fn add_vsock(
    vm_fd: &VmFd,
    device_manager: &mut DeviceManager,
    config: &VmConfig,
) -> Result<(), VmError> {
    let Some(vsock) = &config.vsock else {
        return Ok(());
    };
    let id = vsock
        .id
        .clone()
        .unwrap_or_else(|| crate::config::placement::VSOCK_ID.to_string());
    let device = new_vsock(vsock, &id)?;
    device_manager.add_virtio_device(vm_fd, id, device)?;
    Ok(())
}

/// The virtio-vsock model of `vsock` (at boot and for `vm.add-vsock`). It listens on its Unix
/// socket from here on (the path must not exist); the device loop watches the listener once
/// the driver is up, and the device closes it and removes the socket file when it goes.
pub(crate) fn new_vsock(vsock: &VsockConfig, id: &str) -> Result<VirtioHandle, VmError> {
    let device =
        Vsock::new(id, u64::from(vsock.cid), &vsock.socket).map_err(|source| VmError::Vsock {
            field: match source {
                VsockError::InvalidCid { .. } => "vsock.cid",
                VsockError::Bind { .. } => "vsock.socket",
                _ => "vsock",
            },
            source,
        })?;
    log::info!(
        "{id}: vsock guest CID {}, host socket {}",
        vsock.cid,
        vsock.socket.display()
    );
    Ok(VirtioHandle::Vsock(Arc::new(Mutex::new(device))))
}

fn setup_vcpu(
    fd: &VcpuFd,
    memory: &GuestMemoryMmap,
    index: u8,
    cpu_count: u8,
    base_cpuid: &CpuId,
    boot_msrs: &kvm_bindings::Msrs,
    loaded: &boot::LoadedKernel,
) -> Result<(), VmError> {
    let err = |what| {
        move |source| VmError::SetupVcpu {
            index,
            what,
            source,
        }
    };
    fd.set_cpuid2(&cpuid::for_vcpu(base_cpuid, index, cpu_count))
        .map_err(err("CPUID"))?;
    let written = fd.set_msrs(boot_msrs).map_err(err("MSRs"))?;
    if written != boot_msrs.as_fam_struct_ref().nmsrs as usize {
        log::warn!("vCPU {index}: KVM accepted only {written} boot MSRs");
    }
    fd.set_fpu(&regs::boot_fpu()).map_err(err("FPU"))?;
    set_lint(fd).map_err(err("LAPIC"))?;
    // Other vCPUs wait for the guest's INIT/SIPI; KVM starts them in the right mode.
    if index == 0 {
        let sregs = fd.get_sregs().map_err(err("get sregs"))?;
        let sregs = regs::boot_sregs(memory, loaded.entry, sregs)?;
        fd.set_sregs(&sregs).map_err(err("sregs"))?;
        fd.set_regs(&regs::boot_regs(loaded.entry, loaded.boot_info))
            .map_err(err("regs"))?;
    }
    Ok(())
}

/// Wires LINT0 to ExtINT (the PIC) and LINT1 to NMI, as PC firmware leaves them.
fn set_lint(fd: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const DELIVERY_EXTINT: u32 = 0x7;
    const DELIVERY_NMI: u32 = 0x4;
    let mut lapic = fd.get_lapic()?;
    for (offset, mode) in [(APIC_LVT0, DELIVERY_EXTINT), (APIC_LVT1, DELIVERY_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
        let value = u32::from_le_bytes(bytes);
        let value = (value & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as std::os::raw::c_char;
        }
    }
    fd.set_lapic(&lapic)
}

/// The GED's state is one word: a poisoned lock still holds a usable device.
fn lock_ged(ged: &Mutex<Ged>) -> std::sync::MutexGuard<'_, Ged> {
    ged.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
