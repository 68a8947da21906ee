//! Creates the virtio devices of a VM as virtio-pci functions on bus 0 (in Cloud Hypervisor's
//! order and numbering: 00:01.0 onwards), gives each its BAR in the 32-bit window, its MSI-X
//! vectors (each an irqfd on a GSI of its own) and an INTx line while free lines last, maps the
//! PCI configuration mechanisms and BAR windows onto the VM's buses, and runs the one device
//! event loop thread they all share.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use devices::acpi::Ged;
use devices::gate::{
    DiskOutputGate, DiskWriteLog, EpochControl, EpochDiskGate, EpochNetGate, GateMode, GroupPeers,
    InputLog, InputRecorder, NetOutputGate, RecordingDiskGate,
};
use devices::legacy::serial::SerialDeviceState;
use devices::legacy::Serial;
use devices::pci::hotplug::{PciHotplugController, PciHotplugState};
use devices::pci::msix::MsixVector;
use devices::pci::{PciBarWindow, PciBus, PciConfigIo, PciEcam};
use devices::virtio::block::Block;
use devices::virtio::console::Console;
use devices::virtio::fs::Fs;
use devices::virtio::net::Net;
use devices::virtio::pci::{self as virtio_pci, IntxLine, PciResources, VirtioPciDevice};
use devices::virtio::pmem::{Pmem, PmemBacking, PmemError, PMEM_ALIGNMENT};
use devices::virtio::rng::Rng;
use devices::virtio::vsock::Vsock;
use devices::virtio::VirtioDevice;
use devices::{DeviceState, GuestMemoryMmap, IoBus, VirtioState};
use event_manager::{
    EventManager, EventOps, Events, MutEventSubscriber, SubscriberId, SubscriberOps,
};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::GuestAddress;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::control::{
    pci_bdf, DeviceNode, DeviceResource, DeviceTree, PciBarType, VmCounters, VIRTIO_PCI_NODE_PREFIX,
};
use crate::device_loop::{DeviceLoop, DeviceLoopError};
use crate::kvm_routing::{KvmRouting, IOAPIC_PINS};
use crate::x86_64::layout;

/// IOAPIC lines for PCI INTx on our PC layout (4 is COM1, 5 the ACPI GED): device number N
/// (1..=8) has entry N-1. Functions past these have MSI-X only, which every virtio-pci driver
/// uses anyway.
const PCI_INTX_LINES: [u32; 8] = [6, 7, 9, 10, 11, 12, 14, 15];

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The highest device number on bus 0 (0 is the host bridge).
const MAX_DEVICE_NUMBER: u8 = 31;

/// KVM memory slots of pmem regions start here, clear of guest RAM's (one slot per region).
const PMEM_SLOT_BASE: u32 = 256;

#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    #[error("too many PCI devices (bus 0 holds 31 besides the host bridge)")]
    TooManyDevices,
    #[error("no room left in the 32-bit PCI window for device {0}")]
    NoBarSpace(String),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot set up the transport of device {id}: {source}")]
    Transport {
        id: String,
        source: devices::virtio::pci::PciTransportError,
    },
    #[error("cannot place device {id} on the PCI bus: {source}")]
    Pci {
        id: String,
        source: devices::pci::PciBusError,
    },
    #[error("cannot register KVM {what} for device {id}: {source}")]
    Kvm {
        what: &'static str,
        id: String,
        source: kvm_ioctls::Error,
    },
    #[error("cannot place device {id} on the MMIO bus: {source}")]
    Bus {
        id: String,
        source: devices::IoBusError,
    },
    #[error("cannot start the device event loop: {0}")]
    EventLoop(String),
    #[error("pci_device_id {number} of device {id}: {why}")]
    Placement { id: String, number: u8, why: String },
    #[error("no device {0}")]
    NoSuchDevice(String),
    #[error("a device with id {0} exists already")]
    DuplicateId(String),
    #[error("device {id} cannot be removed: {why}")]
    NotRemovable { id: String, why: &'static str },
    #[error("this VM has no PCI hot-plug controller")]
    NoHotplug,
    #[error("cannot tell the guest about the PCI change: {0}")]
    Notify(std::io::Error),
    #[error(
        "pmem {id}: no room for its {size} bytes in the guest physical address space \
             (from {start:#x} to {limit:#x}, above the 64-bit PCI window, besides the other \
             pmem regions)"
    )]
    PmemNoRoom {
        id: String,
        size: u64,
        start: u64,
        limit: u64,
    },
    #[error("pmem {id}: KVM refused its memory slot {slot} at {addr:#x} ({size} bytes): {source}")]
    PmemSlot {
        id: String,
        slot: u32,
        addr: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{0}")]
    Pmem(#[from] PmemError),
}

/// A virtio device model, kept typed so its state can be captured and restored.
#[derive(Clone)]
pub enum VirtioHandle {
    Block(Arc<Mutex<Block>>),
    Net(Arc<Mutex<Net>>),
    Console(Arc<Mutex<Console>>),
    Rng(Arc<Mutex<Rng>>),
    Pmem(Arc<Mutex<Pmem>>),
    Vsock(Arc<Mutex<Vsock>>),
    Fs(Arc<Mutex<Fs>>),
}

impl VirtioHandle {
    fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        match self {
            VirtioHandle::Block(d) => d.clone(),
            VirtioHandle::Net(d) => d.clone(),
            VirtioHandle::Console(d) => d.clone(),
            VirtioHandle::Rng(d) => d.clone(),
            VirtioHandle::Pmem(d) => d.clone(),
            VirtioHandle::Vsock(d) => d.clone(),
            VirtioHandle::Fs(d) => d.clone(),
        }
    }

    fn subscriber(&self) -> Subscriber {
        match self {
            VirtioHandle::Block(d) => d.clone(),
            VirtioHandle::Net(d) => d.clone(),
            VirtioHandle::Console(d) => d.clone(),
            VirtioHandle::Rng(d) => d.clone(),
            VirtioHandle::Pmem(d) => d.clone(),
            VirtioHandle::Vsock(d) => d.clone(),
            VirtioHandle::Fs(d) => d.clone(),
        }
    }

    fn counters(&self) -> std::collections::BTreeMap<&'static str, u64> {
        match self {
            VirtioHandle::Block(d) => lock(d).counters(),
            VirtioHandle::Net(d) => lock(d).counters(),
            VirtioHandle::Console(d) => lock(d).counters(),
            VirtioHandle::Rng(d) => lock(d).counters(),
            VirtioHandle::Pmem(d) => lock(d).counters(),
            VirtioHandle::Vsock(d) => lock(d).counters(),
            VirtioHandle::Fs(d) => lock(d).counters(),
        }
    }
}

/// Device locks are only contended between the device loop, vCPU threads and the control
/// loop; with panic=abort a poisoned lock cannot be observed, so recover the guard.
fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct VirtioEntry {
    id: String,
    transport: Arc<Mutex<VirtioPciDevice>>,
    handle: VirtioHandle,
    /// PCI device number on bus 0 (function 0).
    number: u8,
    bar_address: u64,
    /// Copies of the irqfds registered for it, with their GSIs: a hot-unplug unregisters them.
    irqfds: Vec<(EventFd, u32)>,
    /// Its subscriptions in the device loop (known once they are added to the loop).
    subscriptions: Vec<SubscriberId>,
}

/// The state of every device model of a VM, in creation order (the order the configuration
/// gives, so the same configuration places each device at the same address).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesState {
    pub serial: Option<SerialDeviceState>,
    pub virtio: Vec<NamedDeviceState>,
    /// The guest's changes to `discard_writes` pmem regions (snapshots only: migration and
    /// fault tolerance refuse such a VM). May be absent from a snapshot file (none). Always
    /// written: the state also travels in a binary format that has no absent fields.
    #[serde(default)]
    pub pmem_pages: Vec<PmemPages>,
    /// Hot-plug events the guest has not taken yet (may be absent from a file: none).
    #[serde(default)]
    pub pci_hotplug: PciHotplugState,
}

/// The pages of one `discard_writes` pmem region that differ from its file: the region maps
/// the file privately, so these exist only in the VMM's memory and a snapshot must carry them.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PmemPages {
    /// The device's id.
    pub id: String,
    /// Offsets in the region of each page, ascending.
    pub offsets: Vec<u64>,
    /// The pages' contents, in `offsets` order, LZ4-compressed (size-prepended) and
    /// hex-encoded.
    pub data: String,
}

/// Most bytes of changed `discard_writes` pmem pages a snapshot carries: they travel inside the
/// state file, whose reader accepts 64 MiB (hex doubles the compressed size).
pub const MAX_PMEM_SNAPSHOT_BYTES: usize = 16 << 20;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedDeviceState {
    pub id: String,
    pub state: DeviceState,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    #[error("the state has {state} virtio devices but the configuration {config}")]
    DeviceCount { state: usize, config: usize },
    #[error("device {config_id} of the configuration meets state {state_id}: {what}")]
    Mismatch {
        config_id: String,
        state_id: String,
        what: &'static str,
    },
    #[error("the state has a serial port but the configuration has none, or the reverse")]
    Serial,
    #[error("pmem {id}: {why}")]
    PmemPages { id: String, why: String },
    #[error("device {id} cannot be captured: {why}")]
    NotCapturable { id: String, why: &'static str },
    #[error("{0}")]
    Device(#[from] devices::RestoreError),
    #[error("cannot signal the guest's pending PCI ejects: {0}")]
    Hotplug(std::io::Error),
    #[error("pmem {id}: cannot place the region where the snapshot has it: {why}")]
    PmemPlacement { id: String, why: String },
}

/// A pmem region registered with KVM as a memory slot of its own. It holds the mapping and
/// deletes the slot when dropped, before its reference to the mapping goes: KVM never keeps a
/// slot over memory this process has unmapped (and might map again for something else).
struct PmemSlot {
    vm_fd: Arc<VmFd>,
    region: kvm_userspace_memory_region,
    backing: Arc<PmemBacking>,
    /// Whether KVM has the slot now (a restore takes it out while it moves the region).
    registered: bool,
}

impl PmemSlot {
    fn new(vm_fd: Arc<VmFd>, slot: u32, start: u64, backing: Arc<PmemBacking>) -> Self {
        let region = kvm_userspace_memory_region {
            slot,
            // No dirty logging: pmem regions are not guest RAM and no dirty log reads them
            // (live migration syncs a writable file on shared storage and refuses
            // discard_writes; fault tolerance refuses pmem), at boot as after a hot-plug.
            flags: 0,
            guest_phys_addr: start,
            memory_size: backing.len(),
            userspace_addr: backing.host_addr(),
        };
        Self {
            vm_fd,
            region,
            backing,
            registered: false,
        }
    }

    fn start(&self) -> u64 {
        self.region.guest_phys_addr
    }

    fn end(&self) -> u64 {
        self.region.guest_phys_addr + self.region.memory_size
    }

    fn register(&mut self) -> Result<(), kvm_ioctls::Error> {
        // SAFETY: the region is `backing`'s mapping, which this guard holds for as long as the
        // slot exists: `unregister` (also run by Drop) deletes the slot first.
        unsafe { self.vm_fd.set_user_memory_region(self.region) }?;
        self.registered = true;
        Ok(())
    }

    fn unregister(&mut self) -> Result<(), kvm_ioctls::Error> {
        if !self.registered {
            return Ok(());
        }
        let region = kvm_userspace_memory_region {
            memory_size: 0,
            ..self.region
        };
        // SAFETY: a zero size deletes the slot; KVM maps nothing through it afterwards.
        unsafe { self.vm_fd.set_user_memory_region(region) }?;
        self.registered = false;
        Ok(())
    }
}

impl Drop for PmemSlot {
    fn drop(&mut self) {
        if let Err(e) = self.unregister() {
            log::error!(
                "cannot delete pmem memory slot {} ({}): {e}; its mapping stays for the \
                 process's life",
                self.region.slot,
                self.backing.path().display()
            );
            // KVM may still reach the mapping: never let its addresses be reused.
            std::mem::forget(self.backing.clone());
        }
    }
}

/// Stops the device loop when its eventfd is written.
struct LoopControl {
    stop_evt: EventFd,
    stop: Arc<AtomicBool>,
}

impl MutEventSubscriber for LoopControl {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.stop_evt.read();
        self.stop.store(true, Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.stop_evt, EventSet::IN)) {
            log::error!("device loop: cannot watch its stop eventfd: {e}");
        }
    }
}

/// The output gates fault tolerance drives, one set per device, installed on first use and
/// kept (in pass-through mode) when protection ends, so that protecting the VM again reuses
/// them; a device plugged in between gets its own then.
#[derive(Clone, Debug, Default)]
pub struct FtGates {
    /// One per NIC: holds TX frames per epoch.
    pub nets: Vec<EpochControl>,
    /// One per disk: holds writes per epoch (shared-disk mode; pass-through otherwise).
    pub disks: Vec<EpochControl>,
    /// One per disk, in configuration order: the writes of each epoch, for the backup.
    pub disk_logs: Vec<DiskWriteLog>,
    /// The NICs' MAC addresses, in configuration order.
    pub macs: Vec<[u8; 6]>,
    /// Shared by every NIC gate: frames to these MACs (the rest of an FT group) are not held.
    pub group_peers: GroupPeers,
    /// The frames every NIC delivered to the guest, numbered (NIC index = position in
    /// `nets`): mirrored to the backup so that the guest's pure TCP ACKs may leave early.
    /// Stopped until protection starts it.
    pub input_log: Option<Arc<InputLog>>,
}

impl FtGates {
    /// Every holding gate, NICs first.
    pub fn all(&self) -> impl Iterator<Item = &EpochControl> {
        self.nets.iter().chain(&self.disks)
    }
}

/// Input frames delivered but not yet taken by the FT sender, at most (beyond, a NIC drops
/// what arrives, as a congested link would).
const INPUT_LOG_MAX_PENDING: usize = 16 << 20;

/// Stands in for a gate while it is being wrapped (never used for output).
struct Detached;

impl NetOutputGate for Detached {
    fn transmit(&mut self, _frame: &[u8]) -> std::io::Result<()> {
        Err(std::io::Error::other("output gate detached"))
    }
}

impl DiskOutputGate for Detached {
    fn write_at(&mut self, _offset: u64, _data: &[u8]) -> std::io::Result<()> {
        Err(std::io::Error::other("output gate detached"))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Err(std::io::Error::other("output gate detached"))
    }
}

/// The FT gates around one device's output, kept while the device exists.
#[derive(Clone)]
enum DeviceGates {
    Net {
        control: EpochControl,
        mac: [u8; 6],
    },
    Disk {
        control: EpochControl,
        log: DiskWriteLog,
    },
}

impl DeviceGates {
    fn control(&self) -> &EpochControl {
        match self {
            DeviceGates::Net { control, .. } | DeviceGates::Disk { control, .. } => control,
        }
    }
}

/// Wraps `entry`'s output in FT gates: a NIC's frames held per epoch, a disk's writes held
/// (shared-disk mode) and recorded for the backup. None for devices with no output to hold.
fn wrap_ft_gates(
    entry: &VirtioEntry,
    epoch: u64,
    peers: &GroupPeers,
    input_log: &Arc<InputLog>,
) -> Option<DeviceGates> {
    match &entry.handle {
        VirtioHandle::Net(net) => {
            let mut net = lock(net);
            let inner = net.replace_output_gate(Box::new(Detached));
            let (gate, control) = EpochNetGate::new(inner, epoch);
            let gate = gate
                .with_group_peers(peers.clone())
                .with_input_log(input_log.clone());
            net.replace_output_gate(Box::new(gate));
            Some(DeviceGates::Net {
                control,
                mac: net.mac().bytes(),
            })
        }
        VirtioHandle::Block(block) => {
            let mut block = lock(block);
            let inner = block.set_output_gate(Box::new(Detached));
            let (held, control) = EpochDiskGate::new(inner, epoch);
            let (recorder, log) = RecordingDiskGate::new(Box::new(held));
            block.set_output_gate(Box::new(recorder));
            Some(DeviceGates::Disk { control, log })
        }
        // Console output and entropy are not held (as with the serial port). Enabling fault
        // tolerance refuses a VM with pmem, vsock or virtio-fs (see `migration::ft_refusal`),
        // so none needs a gate here.
        VirtioHandle::Console(_)
        | VirtioHandle::Rng(_)
        | VirtioHandle::Pmem(_)
        | VirtioHandle::Vsock(_)
        | VirtioHandle::Fs(_) => None,
    }
}

pub struct DeviceManager {
    mem: GuestMemoryMmap,
    /// Shared by every NIC's FT gate, for the VM's life (set with the first gates).
    ft_group_peers: Option<GroupPeers>,
    /// Shared by every NIC for the VM's life (set with the first gates; see
    /// [`FtGates::input_log`]).
    ft_input_log: Option<Arc<InputLog>>,
    /// The FT gates around each device's output, by device id (see `ft_gates`).
    ft_device_gates: BTreeMap<String, DeviceGates>,
    pci: Arc<Mutex<PciBus>>,
    routing: Arc<KvmRouting>,
    /// The next free GSI for an MSI-X vector.
    next_gsi: u32,
    /// Subscriptions not in the loop yet, each with the index of the device entry it
    /// belongs to (None: not a device's).
    subscribers: Vec<(Option<usize>, Subscriber)>,
    virtio: Vec<VirtioEntry>,
    serial: Option<Arc<Mutex<Serial>>>,
    /// The device event loop, once started (paused for a state capture or a change).
    device_loop: Option<DeviceLoop<Subscriber>>,
    stop_flag: Arc<AtomicBool>,
    /// Device numbers the configuration fixes (`pci_device_id`), by device id.
    placement: BTreeMap<String, u8>,
    /// The ACPI PCI hot-plug controller and the GED that announces its changes.
    hotplug: Option<Arc<Mutex<PciHotplugController>>>,
    ged: Option<Arc<Mutex<Ged>>>,
    /// Set once the loop first starts: devices added later are hot-plugged (MSI-X only; the
    /// guest's `_PRT` was written at boot).
    started: bool,
    vm_fd: Arc<VmFd>,
    /// Guest physical addresses pmem regions may use: [start, end), above the 64-bit PCI
    /// window (so clear of RAM, the PCI holes and every BAR).
    pmem_area: (u64, u64),
    /// The pmem regions' KVM slots, by device id.
    pmem_slots: BTreeMap<String, PmemSlot>,
}

impl DeviceManager {
    pub fn new(mem: GuestMemoryMmap, vm_fd: Arc<VmFd>) -> Self {
        Self {
            mem,
            ft_group_peers: None,
            ft_input_log: None,
            ft_device_gates: BTreeMap::new(),
            pci: Arc::new(Mutex::new(PciBus::new())),
            routing: Arc::new(KvmRouting::new(vm_fd.clone())),
            next_gsi: IOAPIC_PINS,
            subscribers: Vec::new(),
            virtio: Vec::new(),
            serial: None,
            device_loop: None,
            stop_flag: Arc::new(AtomicBool::new(false)),
            placement: BTreeMap::new(),
            hotplug: None,
            ged: None,
            started: false,
            vm_fd,
            pmem_area: (0, 0),
            pmem_slots: BTreeMap::new(),
        }
    }

    /// Where pmem regions go: guest physical addresses [start, end).
    pub fn set_pmem_area(&mut self, area: (u64, u64)) {
        self.pmem_area = area;
    }

    /// The lowest address of the pmem area where `size` bytes fit between the regions placed.
    fn free_pmem_address(&self, size: u64) -> Option<u64> {
        let taken: Vec<(u64, u64)> = self
            .pmem_slots
            .values()
            .map(|s| (s.start(), s.end()))
            .collect();
        first_fit(self.pmem_area, taken, size)
    }

    /// Maps `backing` into the guest as a KVM slot of its own at a free address of the pmem
    /// area, and returns the virtio-pmem device that tells the guest where.
    fn map_pmem(
        &mut self,
        id: &str,
        backing: Arc<PmemBacking>,
    ) -> Result<VirtioHandle, DeviceManagerError> {
        if self.pmem_slots.contains_key(id) || self.has_device(id) {
            return Err(DeviceManagerError::DuplicateId(id.to_string()));
        }
        let size = backing.len();
        let start = self
            .free_pmem_address(size)
            .ok_or_else(|| DeviceManagerError::PmemNoRoom {
                id: id.to_string(),
                size,
                start: self.pmem_area.0,
                limit: self.pmem_area.1,
            })?;
        let used: std::collections::BTreeSet<u32> =
            self.pmem_slots.values().map(|s| s.region.slot).collect();
        let slot = (PMEM_SLOT_BASE..)
            .find(|n| !used.contains(n))
            .unwrap_or(PMEM_SLOT_BASE);
        let device = Pmem::new(id, GuestAddress(start), backing.clone())?;
        let mut guard = PmemSlot::new(self.vm_fd.clone(), slot, start, backing.clone());
        guard
            .register()
            .map_err(|source| DeviceManagerError::PmemSlot {
                id: id.to_string(),
                slot,
                addr: start,
                size,
                source,
            })?;
        log::info!(
            "{id}: pmem {} ({size} bytes{}) at guest address {start:#x}, KVM slot {slot}",
            backing.path().display(),
            if backing.discard_writes() {
                ", discard_writes"
            } else {
                ""
            }
        );
        self.pmem_slots.insert(id.to_string(), guard);
        Ok(VirtioHandle::Pmem(Arc::new(Mutex::new(device))))
    }

    /// A virtio-pmem device over `backing`, its region mapped into the guest (at boot).
    pub fn add_pmem(
        &mut self,
        vm_fd: &VmFd,
        id: String,
        backing: Arc<PmemBacking>,
    ) -> Result<(), DeviceManagerError> {
        let handle = self.map_pmem(&id, backing)?;
        self.add_virtio_device(vm_fd, id.clone(), handle)
            .inspect_err(|_| self.unmap_pmem_unless_placed(&id))
    }

    /// [`DeviceManager::add_pmem`] into the running VM (see
    /// [`DeviceManager::hotplug_virtio_device`]); returns the device number.
    pub fn hotplug_pmem(
        &mut self,
        vm_fd: &VmFd,
        id: String,
        backing: Arc<PmemBacking>,
    ) -> Result<u8, DeviceManagerError> {
        if self.hotplug.is_none() {
            return Err(DeviceManagerError::NoHotplug);
        }
        let handle = self.map_pmem(&id, backing)?;
        self.hotplug_virtio_device(vm_fd, id.clone(), handle)
            .inspect_err(|_| self.unmap_pmem_unless_placed(&id))
    }

    /// Takes the KVM slot of pmem `id` away again after its device could not be placed.
    fn unmap_pmem_unless_placed(&mut self, id: &str) {
        if !self.has_device(id) {
            self.pmem_slots.remove(id);
        }
    }

    /// Moves pmem regions to where `state` (a snapshot or a migration) has them: this VM was
    /// built from the configuration, which lays regions out in order, but the source's guest
    /// may have had them elsewhere (a region hot-plugged after another was unplugged). Before
    /// any vCPU runs.
    pub fn place_pmem_as_saved(&mut self, state: &DevicesState) -> Result<(), DeviceStateError> {
        let mut moves = Vec::new();
        for saved in &state.virtio {
            let DeviceState::Pmem(s) = &saved.state else {
                continue;
            };
            // A device the configuration lacks is the restore's to refuse.
            if let Some(slot) = self.pmem_slots.get(&saved.id) {
                if slot.start() != s.device.start {
                    moves.push((saved.id.clone(), s.device.start));
                }
            }
        }
        if moves.is_empty() {
            return Ok(());
        }
        let err = |id: &str, why: String| DeviceStateError::PmemPlacement {
            id: id.to_string(),
            why,
        };
        // The layout after the moves: inside the area, aligned, no two regions overlapping.
        let mut layout: Vec<(u64, u64, &str)> = self
            .pmem_slots
            .iter()
            .map(|(id, slot)| {
                let start = moves
                    .iter()
                    .find(|(moved, _)| moved == id)
                    .map_or(slot.start(), |(_, at)| *at);
                (
                    start,
                    start.saturating_add(slot.region.memory_size),
                    id.as_str(),
                )
            })
            .collect();
        layout.sort_unstable();
        for (start, end, id) in &layout {
            if !start.is_multiple_of(PMEM_ALIGNMENT)
                || *start < self.pmem_area.0
                || *end > self.pmem_area.1
            {
                return Err(err(
                    id,
                    format!(
                        "{start:#x}..{end:#x} is not an aligned range of this VM's pmem area \
                         {:#x}..{:#x}",
                        self.pmem_area.0, self.pmem_area.1
                    ),
                ));
            }
        }
        if let Some(pair) = layout.windows(2).find(|w| w[0].1 > w[1].0) {
            return Err(err(
                pair[1].2,
                format!("its region would overlap that of {}", pair[0].2),
            ));
        }
        // All moving slots out first, so that two regions may trade places.
        for (id, _) in &moves {
            if let Some(slot) = self.pmem_slots.get_mut(id) {
                slot.unregister()
                    .map_err(|e| err(id, format!("KVM: delete its slot: {e}")))?;
            }
        }
        for (id, start) in &moves {
            let entry = self.virtio.iter().find(|e| &e.id == id);
            if let Some(VirtioHandle::Pmem(pmem)) = entry.map(|e| &e.handle) {
                lock(pmem)
                    .relocate(GuestAddress(*start))
                    .map_err(|e| err(id, e.to_string()))?;
            }
            if let Some(slot) = self.pmem_slots.get_mut(id) {
                slot.region.guest_phys_addr = *start;
                slot.register()
                    .map_err(|e| err(id, format!("KVM: slot at {start:#x}: {e}")))?;
                log::info!("{id}: pmem region moved to {start:#x}, where the snapshot has it");
            }
        }
        Ok(())
    }

    /// Fixes device numbers by id (the configuration's `pci_device_id`s); the other devices
    /// take the lowest numbers none of these claims, in order.
    pub fn set_placement(&mut self, placement: BTreeMap<String, u8>) {
        self.placement = placement;
    }

    /// Maps the PCI hot-plug controller (its eject register writes `eject_evt`) and keeps the
    /// GED whose PCI event tells the guest to look at it.
    pub fn attach_hotplug(
        &mut self,
        mmio: &mut IoBus,
        ged: Arc<Mutex<Ged>>,
        eject_evt: EventFd,
    ) -> Result<(), devices::IoBusError> {
        let controller = Arc::new(Mutex::new(PciHotplugController::new(eject_evt)));
        mmio.insert(
            controller.clone(),
            layout::PCI_HOTPLUG_START,
            layout::PCI_HOTPLUG_SIZE,
        )?;
        self.hotplug = Some(controller);
        self.ged = Some(ged);
        Ok(())
    }

    /// The device number each device sits at, by id.
    pub fn placement(&self) -> BTreeMap<String, u8> {
        self.virtio
            .iter()
            .map(|entry| (entry.id.clone(), entry.number))
            .collect()
    }

    /// Whether a device with this id exists.
    pub fn has_device(&self, id: &str) -> bool {
        self.virtio.iter().any(|entry| entry.id == id)
    }

    /// Where the next device without a fixed number goes: the lowest free number that no
    /// configured device claims.
    fn free_number(&self, pci: &PciBus) -> Option<u8> {
        let claimed: std::collections::BTreeSet<u8> = self.placement.values().copied().collect();
        (1..=MAX_DEVICE_NUMBER).find(|n| !pci.is_occupied(*n) && !claimed.contains(n))
    }

    /// Hot-plugs `handle` into the running VM: placed like a boot device (MSI-X only), its
    /// queues join the device loop, and the guest is told through ACPI. Returns its number.
    pub fn hotplug_virtio_device(
        &mut self,
        vm_fd: &VmFd,
        id: String,
        handle: VirtioHandle,
    ) -> Result<u8, DeviceManagerError> {
        let (hotplug, ged) = match (&self.hotplug, &self.ged) {
            (Some(h), Some(g)) => (h.clone(), g.clone()),
            _ => return Err(DeviceManagerError::NoHotplug),
        };
        if self.has_device(&id) {
            return Err(DeviceManagerError::DuplicateId(id));
        }
        self.add_virtio_device(vm_fd, id, handle)?;
        let number = self.virtio.last().map(|e| e.number).unwrap_or_default();
        if let Err(e) = self.join_loop() {
            // Take it off the bus again: a device without its queue handling would hang the
            // guest's driver.
            if let Some(entry) = self.virtio.pop() {
                self.forget(vm_fd, entry);
            }
            return Err(e);
        }
        lock(&hotplug).announce_added(number);
        lock(&ged)
            .notify_pci_changed()
            .map_err(DeviceManagerError::Notify)?;
        Ok(number)
    }

    /// Subscriptions added since the loop started join it (paused around the change).
    fn join_loop(&mut self) -> Result<(), DeviceManagerError> {
        if !self.started {
            return Ok(());
        }
        let Some(running) = self.device_loop.as_ref().map(|l| l.is_running()) else {
            // The VM booted without devices: this one starts the loop.
            return self.start();
        };
        self.pause_loop()?;
        let result = match self.device_loop.as_ref().and_then(|l| l.parked_manager()) {
            Some(mut manager) => {
                for (owner, subscriber) in self.subscribers.drain(..) {
                    let sid = manager.add_subscriber(subscriber);
                    if let Some(entry) = owner.and_then(|i| self.virtio.get_mut(i)) {
                        entry.subscriptions.push(sid);
                    }
                }
                Ok(())
            }
            None => Err(DeviceManagerError::EventLoop(
                "the device loop is not running".into(),
            )),
        };
        if running {
            self.resume_loop()?;
        }
        result
    }

    /// Asks the guest to eject device `id` (it leaves once the guest ejects it; see
    /// [`DeviceManager::complete_ejects`]). Returns its number.
    pub fn request_unplug(&self, id: &str) -> Result<u8, DeviceManagerError> {
        let entry = self
            .virtio
            .iter()
            .find(|entry| entry.id == id)
            .ok_or_else(|| DeviceManagerError::NoSuchDevice(id.to_string()))?;
        if matches!(
            entry.handle,
            VirtioHandle::Console(_) | VirtioHandle::Rng(_)
        ) {
            return Err(DeviceManagerError::NotRemovable {
                id: id.to_string(),
                why: "the console and the entropy device stay for the VM's life",
            });
        }
        let (hotplug, ged) = match (&self.hotplug, &self.ged) {
            (Some(h), Some(g)) => (h, g),
            _ => return Err(DeviceManagerError::NoHotplug),
        };
        lock(hotplug).request_eject(entry.number);
        lock(ged)
            .notify_pci_changed()
            .map_err(DeviceManagerError::Notify)?;
        Ok(entry.number)
    }

    /// Takes the devices the guest ejected off the bus, out of the loop and out of KVM.
    /// Returns their ids.
    pub fn complete_ejects(&mut self, vm_fd: &VmFd) -> Vec<String> {
        let ejected = match &self.hotplug {
            Some(h) => lock(h).take_ejected(),
            None => 0,
        };
        let mut removed = Vec::new();
        for number in 1..=MAX_DEVICE_NUMBER {
            if ejected & (1 << number) == 0 {
                continue;
            }
            let Some(index) = self.virtio.iter().position(|e| e.number == number) else {
                log::warn!("PCI hot-plug: the guest ejected empty slot {number}");
                continue;
            };
            if matches!(
                self.virtio[index].handle,
                VirtioHandle::Console(_) | VirtioHandle::Rng(_)
            ) {
                log::warn!("PCI hot-plug: the guest ejected slot {number}, which stays");
                continue;
            }
            let entry = self.virtio.remove(index);
            removed.push(entry.id.clone());
            self.forget(vm_fd, entry);
        }
        removed
    }

    /// Undoes what [`DeviceManager::add_virtio_device`] registered for `entry`.
    fn forget(&mut self, vm_fd: &VmFd, entry: VirtioEntry) {
        lock(&self.pci).remove(entry.number);
        if !entry.subscriptions.is_empty() {
            let running = self.device_loop.as_ref().is_some_and(|l| l.is_running());
            if let Err(e) = self.pause_loop() {
                log::error!("{}: cannot pause the device loop: {e}", entry.id);
            }
            if let Some(mut manager) = self.device_loop.as_ref().and_then(|l| l.parked_manager()) {
                for sid in &entry.subscriptions {
                    if let Err(e) = manager.remove_subscriber(*sid) {
                        log::warn!("{}: leaving the device loop: {e:?}", entry.id);
                    }
                }
            }
            if running {
                if let Err(e) = self.resume_loop() {
                    log::error!("{}: cannot resume the device loop: {e}", entry.id);
                }
            }
        }
        for (irq, gsi) in &entry.irqfds {
            if let Err(e) = vm_fd.unregister_irqfd(irq, *gsi) {
                log::warn!("{}: unregistering the irqfd of GSI {gsi}: {e}", entry.id);
            }
        }
        // A pmem region leaves KVM (its slot deleted) before its mapping can go with the
        // device below.
        if let Some(slot) = self.pmem_slots.remove(&entry.id) {
            let (number, start) = (slot.region.slot, slot.start());
            drop(slot);
            log::info!(
                "{}: pmem memory slot {number} at {start:#x} deleted",
                entry.id
            );
        }
        // The device model and its host resources (image, TAP, sockets) go with the last
        // reference, which the entry held.
        log::info!("{}: removed from 00:{:02x}.0", entry.id, entry.number);
    }

    /// Maps the PCI machine onto the VM's buses: configuration ports 0xcf8-0xcff, ECAM, and
    /// the 32- and 64-bit BAR windows.
    pub fn attach_pci(
        &self,
        pio: &mut IoBus,
        mmio: &mut IoBus,
        mmio64: (u64, u64),
    ) -> Result<(), devices::IoBusError> {
        pio.insert(
            Arc::new(Mutex::new(PciConfigIo::new(self.pci.clone()))),
            layout::PCI_CONFIG_IO_START,
            layout::PCI_CONFIG_IO_SIZE,
        )?;
        mmio.insert(
            Arc::new(Mutex::new(PciEcam::new(self.pci.clone()))),
            layout::PCI_ECAM_START,
            layout::PCI_ECAM_SIZE,
        )?;
        mmio.insert(
            Arc::new(Mutex::new(PciBarWindow::new(
                self.pci.clone(),
                layout::PCI_MMIO32_START,
            ))),
            layout::PCI_MMIO32_START,
            layout::PCI_MMIO32_SIZE,
        )?;
        if mmio64.1 > 0 {
            mmio.insert(
                Arc::new(Mutex::new(PciBarWindow::new(self.pci.clone(), mmio64.0))),
                mmio64.0,
                mmio64.1,
            )?;
        }
        Ok(())
    }

    /// (PCI device number, GSI) of every slot with an INTx line, occupied or not (a device
    /// hot-plugged there later uses it): the ACPI `_PRT`.
    pub fn pci_intx(&self) -> Vec<(u8, u32)> {
        (1u8..).zip(PCI_INTX_LINES).collect()
    }

    /// Places `device` on the PCI bus as a virtio-pci function: the next device number, its
    /// BAR in the 32-bit window (in device order, so the same configuration gives the same
    /// addresses on every host), one irqfd per MSI-X vector, an INTx line while free ones
    /// last, and the device loop subscription.
    pub fn add_virtio_device(
        &mut self,
        vm_fd: &VmFd,
        id: String,
        handle: VirtioHandle,
    ) -> Result<(), DeviceManagerError> {
        let kvm_err = |what, id: &str| {
            let id = id.to_string();
            move |source| DeviceManagerError::Kvm { what, id, source }
        };
        let number = match self.placement.get(&id) {
            Some(&number) => {
                let pci = lock(&self.pci);
                if number == 0 || number > MAX_DEVICE_NUMBER || pci.is_occupied(number) {
                    return Err(DeviceManagerError::Placement {
                        id,
                        number,
                        why: "it is taken or not a device number of bus 0 (1..=31)".into(),
                    });
                }
                number
            }
            None => self
                .free_number(&lock(&self.pci))
                .ok_or(DeviceManagerError::TooManyDevices)?,
        };
        let bar_address = layout::PCI_MMIO32_START + u64::from(number - 1) * virtio_pci::BAR_SIZE;
        if bar_address + virtio_pci::BAR_SIZE > layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE {
            return Err(DeviceManagerError::NoBarSpace(id));
        }
        let queues = lock(&handle.device()).queue_max_sizes().len();
        let mut vectors = Vec::new();
        let mut irqfds = Vec::new();
        for _ in 0..virtio_pci::vector_count(queues) {
            let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)?;
            vm_fd
                .register_irqfd(&irq, self.next_gsi)
                .map_err(kvm_err("MSI-X irqfd", &id))?;
            irqfds.push((
                irq.try_clone().map_err(DeviceManagerError::EventFd)?,
                self.next_gsi,
            ));
            vectors.push(MsixVector {
                gsi: self.next_gsi,
                irq,
            });
            self.next_gsi += 1;
        }
        // The line follows the device number, not the order devices came in, so a VM rebuilt
        // from a pinned configuration (after a hot-plug) wires every function as before.
        let line_of_slot = PCI_INTX_LINES.get(usize::from(number) - 1);
        let intx = match line_of_slot {
            Some(&line) => {
                let new_evt =
                    || EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceManagerError::EventFd);
                let (irq, resample) = (new_evt()?, new_evt()?);
                vm_fd
                    .register_irqfd_with_resample(&irq, &resample, line)
                    .map_err(kvm_err("INTx irqfd", &id))?;
                irqfds.push((irq.try_clone().map_err(DeviceManagerError::EventFd)?, line));
                Some(IntxLine {
                    irq,
                    resample,
                    line: line as u8,
                })
            }
            None => None,
        };
        let mut transport = VirtioPciDevice::new(
            handle.device(),
            self.mem.clone(),
            PciResources {
                bar_address,
                intx,
                vectors,
                router: self.routing.clone(),
                ioevents: self.routing.clone(),
            },
        )
        .map_err(|source| DeviceManagerError::Transport {
            id: id.clone(),
            source,
        })?;
        let owner = Some(self.virtio.len());
        if let Some(resampler) = transport.take_intx_resampler() {
            self.subscribers
                .push((owner, Arc::new(Mutex::new(resampler))));
        }
        let transport = Arc::new(Mutex::new(transport));
        lock(&self.pci)
            .insert(number, transport.clone())
            .map_err(|source| DeviceManagerError::Pci {
                id: id.clone(),
                source,
            })?;
        log::debug!("{id}: virtio-pci at 00:{number:02x}.0, BAR0 {bar_address:#x}");
        self.subscribers.push((owner, handle.subscriber()));
        self.virtio.push(VirtioEntry {
            id,
            transport,
            handle,
            number,
            bar_address,
            irqfds,
            subscriptions: Vec::new(),
        });
        Ok(())
    }

    /// Starts the device event loop thread with every device added so far.
    pub fn start(&mut self) -> Result<(), DeviceManagerError> {
        self.started = true;
        if self.subscribers.is_empty() {
            return Ok(());
        }
        let loop_err = |e: &dyn std::fmt::Display| DeviceManagerError::EventLoop(e.to_string());
        let mut manager: EventManager<Subscriber> =
            EventManager::new().map_err(|e| loop_err(&e))?;
        for (owner, subscriber) in self.subscribers.drain(..) {
            let sid = manager.add_subscriber(subscriber);
            if let Some(entry) = owner.and_then(|i| self.virtio.get_mut(i)) {
                entry.subscriptions.push(sid);
            }
        }
        let stop_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)?;
        manager.add_subscriber(Arc::new(Mutex::new(LoopControl {
            stop_evt: stop_evt.try_clone().map_err(DeviceManagerError::EventFd)?,
            stop: self.stop_flag.clone(),
        })));
        self.spawn_loop(manager, stop_evt)
    }

    fn spawn_loop(
        &mut self,
        manager: EventManager<Subscriber>,
        stop_evt: EventFd,
    ) -> Result<(), DeviceManagerError> {
        // The device loop parses guest-controlled queues: it runs filtered or not at all (the
        // VM then makes no device progress, and the log says why).
        let started = DeviceLoop::start(manager, stop_evt, self.stop_flag.clone(), || {
            crate::seccomp::apply_or_log(crate::seccomp::ThreadRole::DeviceLoop)
        })
        .map_err(|e| DeviceManagerError::EventLoop(e.to_string()))?;
        self.device_loop = Some(started);
        Ok(())
    }

    /// Asks the device loop to stop without waiting ([`DeviceManager::pause_loop`] waits).
    pub fn ask_pause_loop(&mut self) -> Result<(), DeviceManagerError> {
        self.on_loop(DeviceLoop::ask_pause)
    }

    /// Stops the device loop at a point where no device code runs (between events), keeping
    /// its devices and registrations for [`DeviceManager::resume_loop`].
    pub fn pause_loop(&mut self) -> Result<(), DeviceManagerError> {
        self.on_loop(DeviceLoop::pause)
    }

    /// `step` on the device loop, if there is one.
    fn on_loop(
        &mut self,
        step: fn(&mut DeviceLoop<Subscriber>) -> Result<(), DeviceLoopError>,
    ) -> Result<(), DeviceManagerError> {
        match &mut self.device_loop {
            Some(device_loop) => {
                step(device_loop).map_err(|e| DeviceManagerError::EventLoop(e.to_string()))
            }
            None => Ok(()),
        }
    }

    /// Restarts a loop stopped by [`DeviceManager::pause_loop`].
    pub fn resume_loop(&mut self) -> Result<(), DeviceManagerError> {
        if let Some(device_loop) = &mut self.device_loop {
            device_loop.resume();
        }
        Ok(())
    }

    /// `vm.info`'s device tree: each virtio device under its PCI transport node, which holds
    /// the BDF and BAR 0, as Cloud Hypervisor lays it out.
    pub fn device_tree(&self) -> DeviceTree {
        let mut tree = DeviceTree::new();
        for entry in &self.virtio {
            let transport_id = format!("{VIRTIO_PCI_NODE_PREFIX}-{}", entry.id);
            tree.insert(
                entry.id.clone(),
                DeviceNode {
                    id: entry.id.clone(),
                    resources: Vec::new(),
                    parent: Some(transport_id.clone()),
                    children: Vec::new(),
                    pci_bdf: None,
                },
            );
            tree.insert(
                transport_id.clone(),
                DeviceNode {
                    id: transport_id,
                    resources: vec![DeviceResource::PciBar {
                        index: 0,
                        base: entry.bar_address,
                        size: virtio_pci::BAR_SIZE,
                        type_: PciBarType::Mmio32,
                        prefetchable: false,
                    }],
                    parent: None,
                    children: vec![entry.id.clone()],
                    pci_bdf: Some(pci_bdf(entry.number)),
                },
            );
        }
        tree
    }

    pub fn counters(&self) -> VmCounters {
        self.virtio
            .iter()
            .map(|entry| {
                let values = entry
                    .handle
                    .counters()
                    .into_iter()
                    .map(|(name, value)| (name.to_string(), value))
                    .collect();
                (entry.id.clone(), values)
            })
            .collect()
    }

    /// Makes every NIC announce the guest's MAC on its TAP (after a migration or failover the
    /// network must learn the guest's new place before the guest happens to send).
    pub fn announce_nets(&self) {
        for entry in &self.virtio {
            if let VirtioHandle::Net(net) = &entry.handle {
                if let Err(e) = lock(net).announce() {
                    log::warn!("{}: cannot announce the guest's MAC: {e}", entry.id);
                }
            }
        }
    }

    /// Sends `frames` (NIC index in configuration order, Ethernet frame) out of the NICs, as
    /// if the guest had transmitted them: output a failed primary may have died holding.
    pub fn resend_output(&self, frames: Vec<(u32, Vec<u8>)>) {
        let nets = self.nets();
        let mut failed = 0usize;
        for (nic, frame) in &frames {
            match nets.get(*nic as usize) {
                Some(net) => {
                    if lock(net).transmit_again(frame).is_err() {
                        failed += 1;
                    }
                }
                None => log::warn!("an output frame for NIC {nic}, the VM has {}", nets.len()),
            }
        }
        if failed > 0 {
            // Lost like any frame a TAP refuses: the guest's protocols send it again.
            log::warn!(
                "{failed} of {} held output frames could not be sent again",
                frames.len()
            );
        }
    }

    fn nets(&self) -> Vec<&Arc<Mutex<Net>>> {
        self.virtio
            .iter()
            .filter_map(|entry| match &entry.handle {
                VirtioHandle::Net(net) => Some(net),
                _ => None,
            })
            .collect()
    }

    /// Delivers `frames` (NIC index in configuration order, Ethernet frame) to the guest
    /// before anything new from the NICs' TAPs: input the primary's guest received after the
    /// epoch this VM resumed from.
    pub fn replay_input(&self, frames: Vec<(u32, Vec<u8>)>) {
        let nets = self.nets();
        let mut per_nic: Vec<Vec<Vec<u8>>> = vec![Vec::new(); nets.len()];
        for (nic, frame) in frames {
            match per_nic.get_mut(nic as usize) {
                Some(queue) => queue.push(frame),
                None => log::warn!("an input frame for NIC {nic}, the VM has {}", nets.len()),
            }
        }
        for (net, frames) in nets.into_iter().zip(per_nic) {
            if !frames.is_empty() {
                lock(net).queue_replay(frames);
            }
        }
    }

    /// The fault-tolerance output gates, in device order (a kind's devices in configuration
    /// order: the i-th disk of `config.disks` owns `disk_logs[i]`). A device gets its gates,
    /// wrapped around its own, the first time a call finds it (the device loop must be
    /// stopped) and keeps them; an unplugged device's are left out. So protecting the VM
    /// again after `disable-ft` and a hot-plug or unplug mirrors the devices it has then.
    /// New gates start in pass-through mode at `epoch`.
    pub fn ft_gates(&mut self, epoch: u64) -> Result<FtGates, String> {
        let group_peers = self
            .ft_group_peers
            .get_or_insert_with(GroupPeers::default)
            .clone();
        let input_log = self
            .ft_input_log
            .get_or_insert_with(|| {
                let log = InputLog::new(epoch, INPUT_LOG_MAX_PENDING);
                log.stop();
                log
            })
            .clone();
        let virtio = &self.virtio;
        self.ft_device_gates
            .retain(|id, _| virtio.iter().any(|entry| entry.id == *id));
        let mut gates = FtGates {
            group_peers: group_peers.clone(),
            input_log: Some(input_log.clone()),
            ..FtGates::default()
        };
        for entry in &self.virtio {
            if let VirtioHandle::Net(net) = &entry.handle {
                // Numbered as the backup numbers its NICs: in configuration order.
                let nic = gates.nets.len() as u32;
                lock(net)
                    .set_input_recorder(Some(Box::new(InputRecorder::new(input_log.clone(), nic))));
            }
            let device = match self.ft_device_gates.get(&entry.id) {
                Some(device) => device.clone(),
                None => {
                    let Some(device) = wrap_ft_gates(entry, epoch, &group_peers, &input_log) else {
                        continue;
                    };
                    device
                        .control()
                        .set_mode(GateMode::PassThrough)
                        .map_err(|e| e.to_string())?;
                    self.ft_device_gates
                        .insert(entry.id.clone(), device.clone());
                    device
                }
            };
            match device {
                DeviceGates::Net { control, mac } => {
                    gates.nets.push(control);
                    gates.macs.push(mac);
                }
                DeviceGates::Disk { control, log } => {
                    gates.disks.push(control);
                    gates.disk_logs.push(log);
                }
            }
        }
        Ok(gates)
    }

    /// Releases every disk image lock (migration hand-off to the destination).
    pub fn release_disk_locks(&self) -> Result<(), String> {
        for entry in &self.virtio {
            if let VirtioHandle::Block(block) = &entry.handle {
                lock(block).release_lock().map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// Takes the disk image locks back after a failed hand-off.
    pub fn reacquire_disk_locks(&self) -> Result<(), String> {
        for entry in &self.virtio {
            if let VirtioHandle::Block(block) = &entry.handle {
                lock(block).reacquire_lock().map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// The serial port, whose state is captured with the rest.
    pub fn set_serial(&mut self, serial: Option<Arc<Mutex<Serial>>>) {
        self.serial = serial;
    }

    /// Every device's state; the vCPUs must be paused and the loop stopped. Writable pmem
    /// files are synced (a snapshot or a migration's destination reads them), and the guest's
    /// changes to `discard_writes` regions are captured.
    pub fn save_state(&self) -> Result<DevicesState, DeviceStateError> {
        let mut pmem_pages = Vec::new();
        for entry in &self.virtio {
            if let VirtioHandle::Pmem(pmem) = &entry.handle {
                let backing = lock(pmem).backing().clone();
                if let Some(pages) = save_pmem_pages(&entry.id, &backing)? {
                    pmem_pages.push(pages);
                }
            }
        }
        if let Some(entry) = self
            .virtio
            .iter()
            .find(|entry| matches!(entry.handle, VirtioHandle::Fs(_)))
        {
            return Err(DeviceStateError::NotCapturable {
                id: entry.id.clone(),
                why: "a vhost-user backend serves its queues and keeps its own state",
            });
        }
        Ok(DevicesState {
            serial: self.serial.as_ref().map(|s| lock(s).state()),
            virtio: self
                .virtio
                .iter()
                .filter_map(|entry| {
                    let transport = lock(&entry.transport).state();
                    let state = match &entry.handle {
                        VirtioHandle::Block(d) => DeviceState::Block(VirtioState {
                            transport,
                            device: lock(d).state(),
                        }),
                        VirtioHandle::Net(d) => DeviceState::Net(VirtioState {
                            transport,
                            device: lock(d).state(),
                        }),
                        VirtioHandle::Console(d) => DeviceState::Console(VirtioState {
                            transport,
                            device: lock(d).state(),
                        }),
                        VirtioHandle::Rng(d) => DeviceState::Rng(VirtioState {
                            transport,
                            device: lock(d).state(),
                        }),
                        VirtioHandle::Pmem(d) => DeviceState::Pmem(VirtioState {
                            transport,
                            device: lock(d).state(),
                        }),
                        VirtioHandle::Vsock(d) => DeviceState::Vsock(VirtioState {
                            transport,
                            device: lock(d).state(),
                        }),
                        // Refused above.
                        VirtioHandle::Fs(_) => return None,
                    };
                    Some(NamedDeviceState {
                        id: entry.id.clone(),
                        state,
                    })
                })
                .collect(),
            pmem_pages,
            pci_hotplug: self
                .hotplug
                .as_ref()
                .map(|h| lock(h).state())
                .unwrap_or_default(),
        })
    }

    /// Puts saved device states back, before the loop starts and before any vCPU runs.
    pub fn restore(
        &self,
        state: &DevicesState,
        serial: Option<&Arc<Mutex<Serial>>>,
    ) -> Result<(), DeviceStateError> {
        match (&state.serial, serial) {
            (Some(saved), Some(serial)) => lock(serial).restore(saved)?,
            (None, None) => {}
            // A snapshot taken with --serial off restored with a console (or the reverse)
            // changes nothing the guest relies on beyond the port itself; refuse it clearly.
            _ => return Err(DeviceStateError::Serial),
        }
        if state.virtio.len() != self.virtio.len() {
            return Err(DeviceStateError::DeviceCount {
                state: state.virtio.len(),
                config: self.virtio.len(),
            });
        }
        // By id, not by position: a device hot-plugged after boot was created last on its
        // source but sits in its kind's list in the configuration this VM was built from.
        for saved in &state.virtio {
            let entry = self
                .virtio
                .iter()
                .find(|entry| entry.id == saved.id)
                .ok_or_else(|| DeviceStateError::Mismatch {
                    config_id: String::new(),
                    state_id: saved.id.clone(),
                    what: "the configuration has no device with this id",
                })?;
            let mismatch = |what| DeviceStateError::Mismatch {
                config_id: entry.id.clone(),
                state_id: saved.id.clone(),
                what,
            };
            match (&entry.handle, &saved.state) {
                (VirtioHandle::Block(d), DeviceState::Block(s)) => {
                    lock(d).restore(&s.device)?;
                    lock(&entry.transport).restore(&s.transport)?;
                }
                (VirtioHandle::Net(d), DeviceState::Net(s)) => {
                    lock(d).restore(&s.device)?;
                    lock(&entry.transport).restore(&s.transport)?;
                }
                (VirtioHandle::Console(d), DeviceState::Console(s)) => {
                    lock(d).restore(&s.device)?;
                    lock(&entry.transport).restore(&s.transport)?;
                }
                (VirtioHandle::Rng(d), DeviceState::Rng(s)) => {
                    lock(d).restore(&s.device)?;
                    lock(&entry.transport).restore(&s.transport)?;
                }
                (VirtioHandle::Pmem(d), DeviceState::Pmem(s)) => {
                    lock(d).restore(&s.device)?;
                    lock(&entry.transport).restore(&s.transport)?;
                }
                (VirtioHandle::Vsock(d), DeviceState::Vsock(s)) => {
                    lock(d).restore(&s.device)?;
                    lock(&entry.transport).restore(&s.transport)?;
                }
                _ => return Err(mismatch("the device kinds differ")),
            }
        }
        for pages in &state.pmem_pages {
            let backing = self
                .virtio
                .iter()
                .find_map(|entry| match &entry.handle {
                    VirtioHandle::Pmem(pmem) if entry.id == pages.id => {
                        Some(lock(pmem).backing().clone())
                    }
                    _ => None,
                })
                .ok_or_else(|| DeviceStateError::PmemPages {
                    id: pages.id.clone(),
                    why: "the state has changed pages for it but the configuration has no such \
                          pmem device"
                        .into(),
                })?;
            restore_pmem_pages(pages, &backing)?;
        }
        if let Some(hotplug) = &self.hotplug {
            lock(hotplug)
                .restore(state.pci_hotplug)
                .map_err(DeviceStateError::Hotplug)?;
        }
        // Configuration spaces are back: put the notification ioeventfds where BARs decode.
        lock(&self.pci).refresh_decode();
        Ok(())
    }

    /// Stops the device loop and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut device_loop) = self.device_loop.take() {
            device_loop.stop();
        }
    }
}

impl Drop for DeviceManager {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The lowest 2 MiB-aligned address of `area` ([start, end)) where `size` bytes fit between the
/// `taken` ranges ([start, end) each). Regions placed one by one from an empty area are laid
/// out one after the other, as they always were at boot; a hot-plug reuses the first gap an
/// unplug left that is big enough.
fn first_fit(area: (u64, u64), mut taken: Vec<(u64, u64)>, size: u64) -> Option<u64> {
    taken.sort_unstable();
    let mut at = area.0.checked_next_multiple_of(PMEM_ALIGNMENT)?;
    for (start, end) in taken {
        if at.checked_add(size)? <= start {
            break;
        }
        at = at.max(end.checked_next_multiple_of(PMEM_ALIGNMENT)?);
    }
    at.checked_add(size)
        .filter(|&end| end <= area.1)
        .map(|_| at)
}

/// Page size of the pmem pages a snapshot carries (the host's: x86-64).
const PMEM_PAGE: usize = 4096;

/// Syncs a writable pmem file; for a `discard_writes` region, reads the pages the guest changed
/// (None when it changed none, as a read-only root file system leaves it).
fn save_pmem_pages(id: &str, backing: &PmemBacking) -> Result<Option<PmemPages>, DeviceStateError> {
    let err = |why: String| DeviceStateError::PmemPages {
        id: id.to_string(),
        why,
    };
    backing.sync().map_err(|e| err(e.to_string()))?;
    let offsets = backing.private_pages().map_err(|e| err(e.to_string()))?;
    if offsets.is_empty() {
        return Ok(None);
    }
    let bytes = offsets.len().saturating_mul(PMEM_PAGE);
    if bytes > MAX_PMEM_SNAPSHOT_BYTES {
        return Err(err(format!(
            "the guest changed {} MiB of its discard_writes region; a snapshot carries at most \
             {} MiB of such changes",
            bytes >> 20,
            MAX_PMEM_SNAPSHOT_BYTES >> 20
        )));
    }
    let mut raw = vec![0u8; bytes];
    for (offset, page) in offsets.iter().zip(raw.chunks_exact_mut(PMEM_PAGE)) {
        backing
            .read_at(*offset, page)
            .map_err(|e| err(e.to_string()))?;
    }
    Ok(Some(PmemPages {
        id: id.to_string(),
        offsets,
        data: hex_encode(&lz4_flex::compress_prepend_size(&raw)),
    }))
}

/// Writes a snapshot's changed pages back into the region's private mapping (before any vCPU
/// runs). Everything is checked before the first page is written.
fn restore_pmem_pages(pages: &PmemPages, backing: &PmemBacking) -> Result<(), DeviceStateError> {
    let err = |why: String| DeviceStateError::PmemPages {
        id: pages.id.clone(),
        why,
    };
    if !backing.discard_writes() {
        return Err(err(
            "the snapshot has changed pages of a discard_writes region but the device is \
             configured without discard_writes"
                .into(),
        ));
    }
    let valid_offsets = pages.offsets.windows(2).all(|w| w[0] < w[1])
        && pages.offsets.iter().all(|&o| {
            o.is_multiple_of(PMEM_PAGE as u64)
                && o.checked_add(PMEM_PAGE as u64)
                    .is_some_and(|end| end <= backing.len())
        });
    if !valid_offsets {
        return Err(err(
            "the snapshot's page offsets are not ascending page-aligned offsets inside the region"
                .into(),
        ));
    }
    let want = pages.offsets.len().saturating_mul(PMEM_PAGE);
    if want > MAX_PMEM_SNAPSHOT_BYTES {
        return Err(err(format!(
            "the snapshot lists {} MiB of changed pages, more than a snapshot carries",
            want >> 20
        )));
    }
    let compressed = hex_decode(&pages.data)
        .ok_or_else(|| err("the snapshot's page data is not hexadecimal".into()))?;
    // The decoder allocates what the size prefix says: check it first.
    let declared = compressed
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    if declared != Some(want) {
        return Err(err(format!(
            "the snapshot's page data holds {declared:?} bytes, not the {want} of its {} pages",
            pages.offsets.len()
        )));
    }
    let raw = lz4_flex::decompress_size_prepended(&compressed)
        .map_err(|e| err(format!("the snapshot's page data is corrupt: {e}")))?;
    if raw.len() != want {
        return Err(err(format!(
            "the snapshot's page data decompresses to {} bytes, not {want}",
            raw.len()
        )));
    }
    for (offset, page) in pages.offsets.iter().zip(raw.chunks_exact(PMEM_PAGE)) {
        backing
            .write_at(*offset, page)
            .map_err(|e| err(e.to_string()))?;
    }
    Ok(())
}

fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| char::from(c).to_digit(16).map(|d| d as u8);
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    bytes
        .chunks_exact(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pmem_regions_go_first_fit_in_the_area_never_overlapping() {
        const M2: u64 = 2 << 20;
        let area = (100 * M2, 110 * M2);
        // In order from an empty area: one after the other (the boot layout).
        assert_eq!(first_fit(area, vec![], 2 * M2), Some(100 * M2));
        let two = vec![(100 * M2, 102 * M2), (102 * M2, 103 * M2)];
        assert_eq!(first_fit(area, two.clone(), M2), Some(103 * M2));
        // A gap an unplug left is reused when big enough, passed over when not.
        let gap = vec![
            (102 * M2, 103 * M2),
            (100 * M2, 101 * M2),
            (104 * M2, 105 * M2),
        ];
        assert_eq!(first_fit(area, gap.clone(), M2), Some(101 * M2));
        assert_eq!(first_fit(area, gap.clone(), 2 * M2), Some(105 * M2));
        // Nothing past the end of the area; nothing that wraps.
        assert_eq!(first_fit(area, gap.clone(), 5 * M2), Some(105 * M2));
        assert_eq!(first_fit(area, gap, 6 * M2), None);
        assert_eq!(first_fit((u64::MAX - M2, u64::MAX), vec![], 2 * M2), None);
        // Whatever the request, the answer never overlaps what is taken.
        for size in (1..=10).map(|n| n * M2) {
            if let Some(at) = first_fit(area, two.clone(), size) {
                assert!(
                    two.iter().all(|&(s, e)| at + size <= s || at >= e),
                    "{size}"
                );
                assert!(at.is_multiple_of(M2) && at + size <= area.1);
            }
        }
    }

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let data: Vec<u8> = (0..=255).collect();
        assert_eq!(hex_decode(&hex_encode(&data)), Some(data));
        assert_eq!(hex_decode("abc"), None);
        assert_eq!(hex_decode("zz"), None);
    }

    #[test]
    fn discard_writes_pages_survive_a_save_and_restore() {
        let dir = std::env::temp_dir().join(format!("pmem-pages-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("img");
        std::fs::write(&file, vec![0x11u8; 2 << 20]).unwrap();
        let saved = PmemBacking::open(&file, None, true).unwrap();
        assert!(save_pmem_pages("p", &saved).unwrap().is_none());
        saved.write_at(8192, b"changed by the guest").unwrap();
        let pages = save_pmem_pages("p", &saved)
            .unwrap()
            .expect("one changed page");
        assert_eq!(pages.offsets, vec![8192]);

        let restored = PmemBacking::open(&file, None, true).unwrap();
        restore_pmem_pages(&pages, &restored).unwrap();
        let mut buf = [0u8; 20];
        restored.read_at(8192, &mut buf).unwrap();
        assert_eq!(&buf, b"changed by the guest");
        // The file itself is untouched.
        assert!(std::fs::read(&file).unwrap().iter().all(|&b| b == 0x11));

        let writable = PmemBacking::open(&file, None, false).unwrap();
        let e = restore_pmem_pages(&pages, &writable).unwrap_err();
        assert!(e.to_string().contains("without discard_writes"), "{e}");
        let mut bad = PmemPages {
            id: "p".into(),
            offsets: vec![2 << 20],
            data: pages.data.clone(),
        };
        let e = restore_pmem_pages(&bad, &restored).unwrap_err();
        assert!(e.to_string().contains("inside the region"), "{e}");
        bad.offsets = vec![0, 4096];
        let e = restore_pmem_pages(&bad, &restored).unwrap_err();
        assert!(e.to_string().contains("not the 8192"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
