//! vCPU threads and their control: run, pause all, resume all, stop.
//!
//! A pause must be cheap and bounded (fault tolerance pauses every epoch) and must never lose
//! an exit. The kicker sets `immediate_exit` in the vCPU's `kvm_run` page before signalling the
//! thread, so a vCPU that is just about to enter `KVM_RUN` returns at once instead of missing
//! the signal; KVM completes any pending port or MMIO read before honouring `immediate_exit`,
//! so a parked vCPU holds no half-done exit.
//!
//! A vCPU's fd sits behind a lock that its thread holds while it runs the vCPU and, once it
//! has stopped for a pause, until it has read its own state or is resumed. Its state is read
//! only once the whole VM stands still ([`Vcpus::ask_capture`]): an interrupt another vCPU
//! or the device loop sends meanwhile lands in this vCPU's local APIC, and must be in the
//! state saved. The state ioctls (about ten per vCPU) then run on the vCPU's own, otherwise
//! idle, core while the pauser harvests dirty pages and saves the VM-wide state; taking the
//! fd's lock to save waits for them. A vCPU that stopped without holding its fd (it ended,
//! or is still parked from an earlier pause) is read by the saving thread itself.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::IoBus;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::seccomp::RoleFilter;
use crate::x86_64::cpu_state::{VcpuSaver, VcpuState};

/// How long the pauser spins before it sleeps waiting for vCPUs to park.
const PAUSE_SPIN: Duration = Duration::from_micros(200);

/// How long saving waits for a parked vCPU to read its own state before reading it itself
/// (the vCPU's thread has not had a core for that long: the host is busy).
const CAPTURE_WAIT: Duration = Duration::from_millis(1);

/// Signal used only to interrupt `KVM_RUN`; its handler does nothing.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(vmm_sys_util::errno::Error),
    #[error("cannot spawn the thread of vCPU {index}: {source}")]
    Spawn { index: u8, source: std::io::Error },
    #[error("vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
    #[error("cannot signal vCPU {index}: {source}")]
    Kick {
        index: u8,
        source: vmm_sys_util::errno::Error,
    },
    #[error("vCPUs must be paused to {0}")]
    NotPaused(&'static str),
    #[error(transparent)]
    State(#[from] crate::x86_64::cpu_state::StateError),
}

/// What ends a VM's run, reported by vCPU threads to the control loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExitReason {
    Failed { index: u8, message: String },
}

#[derive(Default)]
struct ParkState {
    /// vCPU threads still running their loop.
    live: usize,
    /// vCPU threads parked for a pause.
    parked: usize,
    /// When the latest pause was asked for.
    pause_asked: Option<Instant>,
    /// When a vCPU last left its park to run the guest again.
    last_unparked: Option<Instant>,
    /// Counts pauses, so a state captured in an earlier one is never taken for this one's.
    pause_number: u64,
    /// The pause in which the vCPUs are to read their state (the whole VM stands still).
    capture_asked: Option<u64>,
}

/// State shared by all vCPU threads of a VM and the thread that controls them.
pub struct VcpuShared {
    pause: AtomicBool,
    /// `live - parked`, mirrored outside the lock so the pauser can spin on it briefly.
    running: AtomicUsize,
    stop: AtomicBool,
    park: Mutex<ParkState>,
    changed: Condvar,
    failures: Mutex<Vec<VcpuExitReason>>,
    /// Written when a vCPU fails, so the control loop wakes up.
    failure_evt: EventFd,
}

impl VcpuShared {
    fn lock_park(&self) -> MutexGuard<'_, ParkState> {
        // With panic=abort no thread can die holding the lock; recover the guard anyway.
        self.park.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sync_running(&self, park: &ParkState) {
        self.running
            .store(park.live.saturating_sub(park.parked), Ordering::SeqCst);
    }

    /// Failures reported since the last call.
    pub fn take_failures(&self) -> Vec<VcpuExitReason> {
        std::mem::take(&mut *self.failures.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn report_failure(&self, reason: VcpuExitReason) {
        log::error!("{reason:?}");
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(reason);
        if let Err(e) = self.failure_evt.write(1) {
            log::error!("cannot wake the control loop: {e}");
        }
    }
}

/// Where the vCPU loop sends the exits it does not handle in KVM.
pub struct ExitHandlers {
    pub pio: Arc<IoBus>,
    pub mmio: Arc<IoBus>,
    /// Written on a triple fault, which resets a PC.
    pub reset_evt: EventFd,
    /// Written on a KVM system-event shutdown.
    pub exit_evt: EventFd,
}

/// Address of `kvm_run.immediate_exit`, shared with the kicker.
#[derive(Clone, Copy)]
struct ImmediateExit(*mut u8);

// SAFETY: the pointer targets the vCPU's kvm_run mapping, which stays mapped as long as its
// `VcpuFd` lives: the handle holding the pointer also holds the fd; it is only written with
// volatile byte stores.
unsafe impl Send for ImmediateExit {}
// SAFETY: see above; concurrent volatile byte stores of 0/1 are benign.
unsafe impl Sync for ImmediateExit {}

impl ImmediateExit {
    fn set(&self, value: u8) {
        // SAFETY: the pointer is valid while the vCPU thread runs (see the Send impl).
        unsafe { std::ptr::write_volatile(self.0, value) };
    }
}

struct VcpuHandle {
    index: u8,
    /// Locked by the vCPU's thread while it runs the vCPU and captures its state; by the
    /// controlling thread to save the state of a parked vCPU. Keeps the `kvm_run` mapping
    /// `immediate_exit` points into.
    fd: Arc<Mutex<VcpuFd>>,
    capture: Arc<Mutex<Capture>>,
    thread: Option<JoinHandle<()>>,
    immediate_exit: ImmediateExit,
}

/// A vCPU's state as its own thread read it in a pause, and the saver that read it (kept, so
/// the CPUID and the list of readable MSRs are learnt once).
struct Capture {
    saver: VcpuSaver,
    /// The pause it was read in (`ParkState::pause_number`) and the state.
    taken: Option<(u64, VcpuState)>,
    /// The vCPU's thread is parked for a pause: asked, it reads the state.
    parked: bool,
    /// The pause it last read its state in (taken or not).
    read_in: Option<u64>,
}

/// The vCPU threads of one VM.
pub struct Vcpus {
    handles: Vec<VcpuHandle>,
    shared: Arc<VcpuShared>,
    msr_indices: Arc<Vec<u32>>,
    /// States saved from what a vCPU read itself in the pause (for tests and benches).
    captured_saves: AtomicUsize,
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl Vcpus {
    /// Starts one thread per vCPU fd, all running at once; each pins itself to its host CPUs
    /// (`host_cpus[index]`, empty or absent: anywhere) and installs `seccomp` first. With
    /// `start_paused` the vCPUs park before running any guest code (a restored VM that is not
    /// resumed yet).
    pub fn start(
        vcpu_fds: Vec<VcpuFd>,
        handlers: Arc<ExitHandlers>,
        failure_evt: EventFd,
        seccomp: Option<Arc<RoleFilter>>,
        msr_indices: Arc<Vec<u32>>,
        start_paused: bool,
        host_cpus: &[Vec<usize>],
    ) -> Result<Self, VcpuError> {
        register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::SignalHandler)?;
        let shared = Arc::new(VcpuShared {
            pause: AtomicBool::new(start_paused),
            running: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            park: Mutex::new(ParkState::default()),
            changed: Condvar::new(),
            failures: Mutex::new(Vec::new()),
            failure_evt,
        });
        let mut vcpus = Vcpus {
            handles: Vec::new(),
            shared: shared.clone(),
            msr_indices,
            captured_saves: AtomicUsize::new(0),
        };
        for (index, mut fd) in vcpu_fds.into_iter().enumerate() {
            let index = index as u8;
            let immediate_exit =
                ImmediateExit(std::ptr::addr_of_mut!(fd.get_kvm_run().immediate_exit));
            if start_paused {
                immediate_exit.set(1);
            }
            let shared = shared.clone();
            let handlers = handlers.clone();
            let seccomp = seccomp.clone();
            let pinned_to = host_cpus
                .get(usize::from(index))
                .cloned()
                .unwrap_or_default();
            let fd = Arc::new(Mutex::new(fd));
            let thread_fd = fd.clone();
            let capture = Arc::new(Mutex::new(Capture {
                saver: VcpuSaver::new(index),
                taken: None,
                parked: false,
                read_in: None,
            }));
            let thread_capture = capture.clone();
            let msr_indices = vcpus.msr_indices.clone();
            {
                let mut park = shared.lock_park();
                park.live += 1;
                shared.sync_running(&park);
            }
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    let ctx = VcpuContext {
                        index,
                        immediate_exit,
                        shared: &shared,
                        handlers: &handlers,
                        fd: &thread_fd,
                        capture: &thread_capture,
                        msr_indices: &msr_indices,
                    };
                    pin_current_thread(index, &pinned_to);
                    run_vcpu(&ctx, seccomp);
                })
                .map_err(|source| {
                    let mut park = vcpus.shared.lock_park();
                    park.live -= 1;
                    vcpus.shared.sync_running(&park);
                    VcpuError::Spawn { index, source }
                })?;
            vcpus.handles.push(VcpuHandle {
                index,
                fd,
                capture,
                thread: Some(thread),
                immediate_exit,
            });
        }
        Ok(vcpus)
    }

    pub fn shared(&self) -> &Arc<VcpuShared> {
        &self.shared
    }

    fn kick_all(&self) -> Result<(), VcpuError> {
        for handle in &self.handles {
            let Some(thread) = &handle.thread else {
                continue;
            };
            handle.immediate_exit.set(1);
            // SAFETY: the pthread_t belongs to a thread we have not joined yet.
            let ret = unsafe {
                libc::pthread_kill(
                    std::os::unix::thread::JoinHandleExt::as_pthread_t(thread),
                    kick_signal(),
                )
            };
            // ESRCH: the thread has already left its loop; nothing to interrupt.
            if ret != 0 && ret != libc::ESRCH {
                return Err(VcpuError::Kick {
                    index: handle.index,
                    source: vmm_sys_util::errno::Error::new(ret),
                });
            }
        }
        Ok(())
    }

    /// Stops every vCPU at an instruction boundary and returns once all are parked.
    pub fn pause(&self, timeout: Duration) -> Result<(), VcpuError> {
        {
            let mut park = self.shared.lock_park();
            park.pause_asked = Some(Instant::now());
            park.pause_number += 1;
        }
        self.shared.pause.store(true, Ordering::SeqCst);
        self.kick_all()?;
        // A pause normally completes within tens of microseconds: spinning that long costs
        // less than sleeping on the condvar and being woken (FT pauses every epoch).
        let spin_until = Instant::now() + PAUSE_SPIN;
        // Yielding rather than busy-spinning leaves this core to a vCPU thread that must wake
        // to park (an idle vCPU halted in KVM needs a core to leave KVM_RUN).
        while self.shared.running.load(Ordering::SeqCst) > 0 && Instant::now() < spin_until {
            std::thread::yield_now();
        }
        let deadline = Instant::now() + timeout;
        let mut park = self.shared.lock_park();
        while park.parked < park.live {
            let now = Instant::now();
            if now >= deadline {
                return Err(VcpuError::PauseTimeout(timeout));
            }
            park = self
                .shared
                .changed
                .wait_timeout(park, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        Ok(())
    }

    /// Asks the paused vCPUs to read their own state: call once nothing else sends them
    /// interrupts (the device loop is parked too). [`Vcpus::save_state`] asks if not asked.
    pub fn ask_capture(&self) {
        {
            let mut park = self.shared.lock_park();
            if park.capture_asked == Some(park.pause_number) {
                return;
            }
            park.capture_asked = Some(park.pause_number);
        }
        self.shared.changed.notify_all();
    }

    /// The state of every vCPU, in index order; the vCPUs must be paused. What a vCPU read
    /// itself in this pause, once; otherwise read on this thread.
    pub fn save_state(&self) -> Result<Vec<VcpuState>, VcpuError> {
        self.read_states(true)
    }

    /// The state of every vCPU read on this thread, whatever they read themselves (to check
    /// one against the other, and to measure what their reading saves).
    pub fn save_state_here(&self) -> Result<Vec<VcpuState>, VcpuError> {
        self.read_states(false)
    }

    fn read_states(&self, take_captured: bool) -> Result<Vec<VcpuState>, VcpuError> {
        if !self.shared.pause.load(Ordering::SeqCst) {
            return Err(VcpuError::NotPaused("save their state"));
        }
        // A vCPU holding its fd waits for this before it lets go.
        self.ask_capture();
        let pause = self.shared.lock_park().pause_number;
        self.handles
            .iter()
            .map(|handle| {
                if take_captured {
                    if let Some(state) = self.captured(handle, pause) {
                        self.captured_saves.fetch_add(1, Ordering::Relaxed);
                        return Ok(state);
                    }
                }
                let fd = handle.fd.lock().unwrap_or_else(|p| p.into_inner());
                let mut capture = handle.capture.lock().unwrap_or_else(|p| p.into_inner());
                Ok(capture.saver.save(&fd, &self.msr_indices)?)
            })
            .collect()
    }

    /// What `handle`'s vCPU read in pause number `pause`, waiting for it while the vCPU is
    /// parked (then asked, it reads its state within tens of microseconds; spinning costs
    /// less than a wake-up). None when it is not parked, or too slow to get a core.
    fn captured(&self, handle: &VcpuHandle, pause: u64) -> Option<VcpuState> {
        let give_up = Instant::now() + CAPTURE_WAIT;
        loop {
            // The vCPU holds the lock while it reads (tens of microseconds): sleeping on it
            // would add a wake-up to the pause, so this only tries.
            let locked = match handle.capture.try_lock() {
                Ok(guard) => Some(guard),
                Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            };
            if let Some(mut capture) = locked {
                if matches!(capture.taken, Some((taken_in, _)) if taken_in == pause) {
                    return capture.taken.take().map(|(_, state)| state);
                }
                if !capture.parked || capture.read_in == Some(pause) {
                    return None;
                }
            }
            if Instant::now() >= give_up {
                return None;
            }
            std::thread::yield_now();
        }
    }

    /// How many vCPU states [`Vcpus::save_state`] took from what the vCPUs read themselves,
    /// rather than reading them itself.
    pub fn captured_saves(&self) -> usize {
        self.captured_saves.load(Ordering::Relaxed)
    }

    /// How long the guest stood still in the latest pause, as its vCPUs saw it: from the
    /// pause being asked for to the last vCPU leaving its park, and when it was asked for.
    /// None while a vCPU has not left its park since (or before any pause). What the thread
    /// that resumed them measures also counts the time it waits for a core after waking
    /// them, while the guest already runs.
    pub fn last_stop(&self) -> Option<(Instant, Duration)> {
        let park = self.shared.lock_park();
        let (asked, unparked) = (park.pause_asked?, park.last_unparked?);
        (park.parked == 0 && !self.shared.pause.load(Ordering::SeqCst) && unparked >= asked)
            .then(|| (asked, unparked - asked))
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        {
            let _park = self.shared.lock_park();
            self.shared.pause.store(false, Ordering::SeqCst);
        }
        // Woken outside the lock: a vCPU scheduled at once would otherwise find it still
        // held, and the resume would wait for the waker to run again.
        self.shared.changed.notify_all();
    }

    /// Ends every vCPU thread and waits for them.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _park = self.shared.lock_park();
            self.shared.changed.notify_all();
        }
        if let Err(e) = self.kick_all() {
            log::warn!("stopping vCPUs: {e}");
        }
        for handle in &mut self.handles {
            if let Some(thread) = handle.thread.take() {
                if thread.join().is_err() {
                    log::error!("vCPU {} thread panicked", handle.index);
                }
            }
        }
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a vCPU thread works with besides its fd.
struct VcpuContext<'a> {
    index: u8,
    immediate_exit: ImmediateExit,
    shared: &'a VcpuShared,
    handlers: &'a ExitHandlers,
    fd: &'a Mutex<VcpuFd>,
    capture: &'a Mutex<Capture>,
    msr_indices: &'a [u32],
}

/// Counts the vCPU as stopped (the pauser may go on) and waits until resumed. Holding its
/// fd from the stop on, it reads its state when asked to in this pause, then lets go of the
/// fd; one parked since an earlier pause takes the fd again to read it.
fn park(ctx: &VcpuContext, fd: MutexGuard<'_, VcpuFd>) {
    let shared = ctx.shared;
    let mut held = Some(fd);
    let spin_until = Instant::now() + PAUSE_SPIN;
    set_parked(ctx, true);
    let mut park = shared.lock_park();
    park.parked += 1;
    shared.sync_running(&park);
    shared.changed.notify_all();
    loop {
        if !shared.pause.load(Ordering::SeqCst) || shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let pause = park.pause_number;
        if park.capture_asked == Some(pause) && !read_in(ctx, pause) {
            drop(park);
            let fd = held
                .take()
                .unwrap_or_else(|| ctx.fd.lock().unwrap_or_else(|p| p.into_inner()));
            capture(ctx, &fd, pause);
            drop(fd);
            park = shared.lock_park();
            continue;
        }
        // The ask follows within tens of microseconds (once the device loop is parked too):
        // yielding that long on this otherwise idle core costs less than a wake-up.
        if park.capture_asked != Some(pause) && Instant::now() < spin_until {
            drop(park);
            std::thread::yield_now();
            park = shared.lock_park();
            continue;
        }
        park = shared.changed.wait(park).unwrap_or_else(|p| p.into_inner());
    }
    drop(park);
    set_parked(ctx, false);
    drop(held);
    let mut park = shared.lock_park();
    park.parked -= 1;
    park.last_unparked = Some(Instant::now());
    shared.sync_running(&park);
}

fn set_parked(ctx: &VcpuContext, parked: bool) {
    ctx.capture.lock().unwrap_or_else(|p| p.into_inner()).parked = parked;
}

fn read_in(ctx: &VcpuContext, pause: u64) -> bool {
    ctx.capture
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .read_in
        == Some(pause)
}

/// Reads the vCPU's state into its capture slot, tagged with the pause it belongs to.
fn capture(ctx: &VcpuContext, fd: &VcpuFd, pause: u64) {
    let mut capture = ctx.capture.lock().unwrap_or_else(|p| p.into_inner());
    let Capture {
        saver,
        taken,
        read_in,
        ..
    } = &mut *capture;
    *read_in = Some(pause);
    *taken = match saver.save(fd, ctx.msr_indices) {
        Ok(state) => Some((pause, state)),
        Err(e) => {
            // The saving thread reads it again and reports what fails.
            log::debug!("vCPU {}: state not captured in the pause: {e}", ctx.index);
            None
        }
    };
}

/// Pins the calling vCPU thread to `host_cpus` (`cpus.affinity`; empty: left as it is). The
/// configuration names CPUs this host has (`VmConfig::validate`, also for a restore or an
/// incoming migration or FT standby); should the kernel still refuse (a cpuset that excludes
/// them), the vCPU runs unpinned rather than not at all: a backup taking over must run.
fn pin_current_thread(index: u8, host_cpus: &[usize]) {
    if host_cpus.is_empty() {
        return;
    }
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in host_cpus {
        if cpu < libc::CPU_SETSIZE as usize {
            // SAFETY: `cpu` is below CPU_SETSIZE, the set's capacity.
            unsafe { libc::CPU_SET(cpu, &mut set) };
        }
    }
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the size given.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        log::info!("vCPU {index}: pinned to host CPUs {host_cpus:?}");
    } else {
        log::warn!(
            "vCPU {index}: cannot pin to host CPUs {host_cpus:?} ({}); it runs unpinned",
            std::io::Error::last_os_error()
        );
    }
}

fn run_vcpu(ctx: &VcpuContext, seccomp: Option<Arc<RoleFilter>>) {
    let (index, shared) = (ctx.index, ctx.shared);
    let result = match seccomp.as_deref().map(RoleFilter::install) {
        Some(Err(e)) => Err(format!(
            "vCPU {index}: cannot install its seccomp filter: {e}"
        )),
        _ => vcpu_loop(ctx),
    };
    {
        let mut park = shared.lock_park();
        park.live -= 1;
        shared.sync_running(&park);
        shared.changed.notify_all();
    }
    if let Err(message) = result {
        shared.report_failure(VcpuExitReason::Failed { index, message });
    }
}

fn vcpu_loop(ctx: &VcpuContext) -> Result<(), String> {
    let shared = ctx.shared;
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut locked = ctx.fd.lock().unwrap_or_else(|p| p.into_inner());
        let ran = run_once(ctx, &mut locked)?;
        match ran {
            Ran::Exited => drop(locked),
            Ran::Paused => park(ctx, locked),
            Ran::Ended => {
                drop(locked);
                park_until_stopped(shared);
                return Ok(());
            }
        }
    }
}

/// How one `KVM_RUN` ended, for the loop around it.
enum Ran {
    Exited,
    Paused,
    /// The guest ended the VM (this vCPU waited until stopped).
    Ended,
}

fn run_once(ctx: &VcpuContext, fd: &mut VcpuFd) -> Result<Ran, String> {
    let (index, shared, handlers) = (ctx.index, ctx.shared, ctx.handlers);
    match fd.run() {
        Ok(exit) => match exit {
            VcpuExit::IoOut(port, data) => {
                handlers.pio.write(u64::from(port), data);
            }
            VcpuExit::IoIn(port, data) => {
                handlers.pio.read(u64::from(port), data);
            }
            VcpuExit::MmioRead(addr, data) => {
                handlers.mmio.read(addr, data);
            }
            VcpuExit::MmioWrite(addr, data) => {
                handlers.mmio.write(addr, data);
            }
            // With the in-kernel irqchip HLT stays in KVM; an exit here is spurious.
            VcpuExit::Hlt | VcpuExit::Intr => {}
            VcpuExit::Shutdown => {
                log::info!("vCPU {index}: triple fault, resetting the VM");
                signal(&handlers.reset_evt, "reset");
                return Ok(Ran::Ended);
            }
            VcpuExit::SystemEvent(kind, _) => {
                let evt = match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => &handlers.reset_evt,
                    _ => &handlers.exit_evt,
                };
                signal(evt, "system event");
                return Ok(Ran::Ended);
            }
            VcpuExit::FailEntry(reason, cpu) => {
                return Err(format!(
                    "vCPU {index}: KVM entry failed (hardware reason {reason:#x}, cpu {cpu})"
                ));
            }
            VcpuExit::InternalError => {
                let regs = fd.get_regs().map(|r| r.rip).unwrap_or_default();
                return Err(format!(
                    "vCPU {index}: KVM internal error (emulation failure?) at rip {regs:#x}"
                ));
            }
            other => {
                return Err(format!("vCPU {index}: unexpected exit {other:?}"));
            }
        },
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            ctx.immediate_exit.set(0);
            if shared.pause.load(Ordering::SeqCst) {
                return Ok(Ran::Paused);
            }
        }
        Err(e) => return Err(format!("vCPU {index}: KVM_RUN failed: {e}")),
    }
    Ok(Ran::Exited)
}

fn signal(evt: &EventFd, what: &str) {
    if let Err(e) = evt.write(1) {
        log::error!("cannot signal {what}: {e}");
    }
}

/// After the guest ended the VM, a vCPU waits for the control loop to stop it instead of
/// running the guest on.
fn park_until_stopped(shared: &VcpuShared) {
    let mut park = shared.lock_park();
    while !shared.stop.load(Ordering::SeqCst) {
        park.parked += 1;
        shared.sync_running(&park);
        shared.changed.notify_all();
        park = shared.changed.wait(park).unwrap_or_else(|p| p.into_inner());
        park.parked -= 1;
        shared.sync_running(&park);
    }
}
