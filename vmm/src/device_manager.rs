//! Creates the virtio devices of a VM, places them in the MMIO hole, wires their notifications
//! (KVM ioeventfds) and interrupts (KVM irqfds), announces them to the guest on its kernel
//! command line, and runs the one device event loop thread they all share.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use devices::virtio::mmio::{MmioTransport, MMIO_REGION_SIZE, REG_QUEUE_NOTIFY};
use devices::virtio::VirtioDevice;
use devices::{GuestMemoryMmap, IoBus};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::control::VmCounters;

/// First virtio-mmio window; devices follow at `MMIO_REGION_SIZE` strides.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// ISA IRQ lines free on our PC layout (the MP table routes 0-15 to the IOAPIC).
const VIRTIO_IRQS: [u32; 9] = [5, 6, 7, 9, 10, 11, 12, 14, 15];

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    #[error("too many virtio devices (at most {})", VIRTIO_IRQS.len())]
    TooManyDevices,
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot set up the transport of device {id}: {source}")]
    Transport {
        id: String,
        source: devices::virtio::mmio::MmioError,
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
}

/// Reads a device's counters for `vm.counters`.
type CounterReader = Box<dyn Fn() -> std::collections::BTreeMap<&'static str, u64> + Send>;

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

pub struct DeviceManager {
    mem: GuestMemoryMmap,
    next_slot: usize,
    /// Added to the kernel command line (`virtio_mmio.device=...`).
    cmdline_entries: Vec<String>,
    subscribers: Vec<Subscriber>,
    counters: Vec<(String, CounterReader)>,
    event_loop: Option<(JoinHandle<()>, EventFd)>,
}

impl DeviceManager {
    pub fn new(mem: GuestMemoryMmap) -> Self {
        Self {
            mem,
            next_slot: 0,
            cmdline_entries: Vec::new(),
            subscribers: Vec::new(),
            counters: Vec::new(),
            event_loop: None,
        }
    }

    /// Places `device` behind a virtio-mmio transport: MMIO window, irqfd, one ioeventfd per
    /// queue, and the device loop subscription.
    pub fn add_virtio_device(
        &mut self,
        vm_fd: &VmFd,
        mmio_bus: &mut IoBus,
        id: String,
        device: Arc<Mutex<dyn VirtioDevice>>,
        subscriber: Subscriber,
        counters: CounterReader,
    ) -> Result<(), DeviceManagerError> {
        let irq = *VIRTIO_IRQS
            .get(self.next_slot)
            .ok_or(DeviceManagerError::TooManyDevices)?;
        let base = VIRTIO_MMIO_BASE + self.next_slot as u64 * MMIO_REGION_SIZE;
        let kvm_err = |what, id: &str| {
            let id = id.to_string();
            move |source| DeviceManagerError::Kvm { what, id, source }
        };
        let irq_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)?;
        vm_fd
            .register_irqfd(&irq_evt, irq)
            .map_err(kvm_err("irqfd", &id))?;
        let transport =
            MmioTransport::new(device, self.mem.clone(), irq_evt).map_err(|source| {
                DeviceManagerError::Transport {
                    id: id.clone(),
                    source,
                }
            })?;
        for (queue, evt) in transport.queue_notify_evts().iter().enumerate() {
            vm_fd
                .register_ioevent(
                    evt.as_ref(),
                    &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY),
                    queue as u32,
                )
                .map_err(kvm_err("ioeventfd", &id))?;
        }
        mmio_bus
            .insert(Arc::new(Mutex::new(transport)), base, MMIO_REGION_SIZE)
            .map_err(|source| DeviceManagerError::Bus {
                id: id.clone(),
                source,
            })?;
        self.cmdline_entries
            .push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        self.subscribers.push(subscriber);
        self.counters.push((id, counters));
        self.next_slot += 1;
        Ok(())
    }

    /// Kernel command line fragment announcing the devices.
    pub fn cmdline(&self) -> String {
        self.cmdline_entries.join(" ")
    }

    /// Starts the device event loop thread with every device added so far.
    pub fn start(&mut self) -> Result<(), DeviceManagerError> {
        if self.subscribers.is_empty() {
            return Ok(());
        }
        let loop_err = |e: &dyn std::fmt::Display| DeviceManagerError::EventLoop(e.to_string());
        let mut manager: EventManager<Subscriber> =
            EventManager::new().map_err(|e| loop_err(&e))?;
        for subscriber in self.subscribers.drain(..) {
            manager.add_subscriber(subscriber);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stop_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)?;
        manager.add_subscriber(Arc::new(Mutex::new(LoopControl {
            stop_evt: stop_evt.try_clone().map_err(DeviceManagerError::EventFd)?,
            stop: stop.clone(),
        })));
        let thread = std::thread::Builder::new()
            .name("device-loop".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Err(e) = manager.run() {
                        log::error!("device event loop failed: {e}");
                        return;
                    }
                }
            })
            .map_err(|e| loop_err(&e))?;
        self.event_loop = Some((thread, stop_evt));
        Ok(())
    }

    pub fn counters(&self) -> VmCounters {
        self.counters
            .iter()
            .map(|(id, read)| {
                let values = read()
                    .into_iter()
                    .map(|(name, value)| (name.to_string(), value))
                    .collect();
                (id.clone(), values)
            })
            .collect()
    }

    /// Stops the device loop and waits for it.
    pub fn stop(&mut self) {
        if let Some((thread, stop_evt)) = self.event_loop.take() {
            if let Err(e) = stop_evt.write(1) {
                log::error!("cannot stop the device loop: {e}");
                return;
            }
            if thread.join().is_err() {
                log::error!("device loop thread panicked");
            }
        }
    }
}

impl Drop for DeviceManager {
    fn drop(&mut self) {
        self.stop();
    }
}
