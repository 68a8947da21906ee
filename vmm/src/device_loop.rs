//! The device event loop thread, parked and woken rather than joined and spawned again.
//!
//! A fault-tolerant VM stops its devices at every checkpoint (about a hundred times a
//! second). Spawning a thread for each resume took an `mmap` for its stack and a seccomp
//! install; on a host whose vCPU is in a write-fault storm that waited for the address-space
//! lock, up to several milliseconds of guest pause. The thread now lives as long as the loop:
//! a pause waits until it stands between events, a resume only wakes it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventManager, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

/// How often a pause looks whether the thread died instead of parking (a device panicked).
const PARK_CHECK: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum DeviceLoopError {
    #[error("the device loop thread cannot start: {0}")]
    Spawn(std::io::Error),
    #[error("cannot signal the device loop: {0}")]
    Signal(std::io::Error),
    #[error("the device loop thread is gone (a device panicked)")]
    Gone,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wanted {
    Run,
    Park,
    Exit,
}

struct LoopState {
    wanted: Wanted,
    /// The thread stands between events and holds no device.
    parked: bool,
}

struct Shared<S> {
    manager: Mutex<EventManager<S>>,
    state: Mutex<LoopState>,
    changed: Condvar,
    /// Set by the loop's own stop subscriber when `stop_evt` is written: `run` returns.
    stop: Arc<AtomicBool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One device loop thread running `EventManager::run` while not paused.
pub struct DeviceLoop<S> {
    shared: Arc<Shared<S>>,
    thread: Option<JoinHandle<()>>,
    /// Written to make `run` return (its subscriber sets `stop`).
    stop_evt: EventFd,
    running: bool,
    /// A pause was asked for ([`DeviceLoop::ask_pause`]) and not yet waited for.
    pause_asked: bool,
}

impl<S> DeviceLoop<S>
where
    S: MutEventSubscriber + Send + 'static,
    EventManager<S>: Send,
{
    /// Starts the thread, running `manager`. `stop_evt`, when written, must make a subscriber
    /// of `manager` set `stop`. `on_start` runs first on the new thread (its seccomp filter);
    /// when it returns false the thread never touches a device and pauses still succeed.
    pub fn start(
        manager: EventManager<S>,
        stop_evt: EventFd,
        stop: Arc<AtomicBool>,
        on_start: impl FnOnce() -> bool + Send + 'static,
    ) -> Result<Self, DeviceLoopError> {
        stop.store(false, Ordering::SeqCst);
        let shared = Arc::new(Shared {
            manager: Mutex::new(manager),
            state: Mutex::new(LoopState {
                wanted: Wanted::Run,
                parked: false,
            }),
            changed: Condvar::new(),
            stop,
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("device-loop".into())
            .spawn(move || {
                let filtered = on_start();
                run_thread(&thread_shared, filtered);
            })
            .map_err(DeviceLoopError::Spawn)?;
        Ok(Self {
            shared,
            thread: Some(thread),
            stop_evt,
            running: true,
            pause_asked: false,
        })
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Asks the loop to stop between events and returns at once; [`DeviceLoop::pause`] then
    /// waits for it. The caller stops the vCPUs in between, so both stand still sooner.
    pub fn ask_pause(&mut self) -> Result<(), DeviceLoopError> {
        if !self.running || self.pause_asked {
            return Ok(());
        }
        lock(&self.shared.state).wanted = Wanted::Park;
        self.stop_evt.write(1).map_err(DeviceLoopError::Signal)?;
        self.pause_asked = true;
        Ok(())
    }

    /// Stops the loop between events and waits until it stands still.
    pub fn pause(&mut self) -> Result<(), DeviceLoopError> {
        if !self.running {
            return Ok(());
        }
        self.ask_pause()?;
        self.wait_parked()?;
        self.running = false;
        self.pause_asked = false;
        Ok(())
    }

    /// Lets a paused loop run again (or one asked to pause go on); does not wait for the
    /// thread.
    pub fn resume(&mut self) {
        if self.running && !self.pause_asked {
            return;
        }
        self.pause_asked = false;
        self.shared.stop.store(false, Ordering::SeqCst);
        lock(&self.shared.state).wanted = Wanted::Run;
        // Outside the lock, for the reason `Vcpus::resume` gives.
        self.shared.changed.notify_all();
        self.running = true;
    }

    /// The loop's manager, to add or remove subscribers. Only while paused: a running loop
    /// holds it inside `run`.
    pub fn parked_manager(&self) -> Option<MutexGuard<'_, EventManager<S>>> {
        (!self.running).then(|| lock(&self.shared.manager))
    }

    fn wait_parked(&self) -> Result<(), DeviceLoopError> {
        let mut state = lock(&self.shared.state);
        while !state.parked {
            if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                return Err(DeviceLoopError::Gone);
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, PARK_CHECK)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Ends the thread and waits for it.
    pub fn stop(&mut self) {
        lock(&self.shared.state).wanted = Wanted::Exit;
        self.shared.changed.notify_all();
        if let Err(e) = self.stop_evt.write(1) {
            log::error!("cannot signal the device loop to end: {e}");
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the device loop panicked");
            }
        }
        self.running = false;
    }
}

impl<S> Drop for DeviceLoop<S> {
    fn drop(&mut self) {
        lock(&self.shared.state).wanted = Wanted::Exit;
        self.shared.changed.notify_all();
        let _ = self.stop_evt.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run_thread<S: MutEventSubscriber>(shared: &Shared<S>, filtered: bool) {
    loop {
        {
            let mut state = lock(&shared.state);
            // Unfiltered, the thread never runs devices: it only answers pauses.
            while state.wanted == Wanted::Park || (!filtered && state.wanted == Wanted::Run) {
                if !state.parked {
                    state.parked = true;
                    shared.changed.notify_all();
                }
                state = shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(|p| p.into_inner());
            }
            if state.wanted == Wanted::Exit {
                state.parked = true;
                shared.changed.notify_all();
                return;
            }
            state.parked = false;
        }
        let mut manager = lock(&shared.manager);
        loop {
            if shared.stop.load(Ordering::SeqCst) {
                // A stop nobody waits for (a pause answered while the thread was still
                // parked left its eventfd written): run on.
                if lock(&shared.state).wanted == Wanted::Run {
                    shared.stop.store(false, Ordering::SeqCst);
                    continue;
                }
                break;
            }
            if let Err(e) = manager.run() {
                log::error!("device event loop failed: {e}");
                // Parked until the next resume, as a stopped thread was before.
                let mut state = lock(&shared.state);
                if state.wanted == Wanted::Run {
                    state.wanted = Wanted::Park;
                }
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::{EventOps, Events, SubscriberOps};
    use std::time::Instant;
    use vmm_sys_util::epoll::EventSet;

    type Sub = Arc<Mutex<dyn MutEventSubscriber + Send>>;

    /// Counts the writes to its eventfd; panics on `boom`.
    struct Counter {
        evt: EventFd,
        seen: Arc<Mutex<u64>>,
        boom: Arc<AtomicBool>,
    }

    impl MutEventSubscriber for Counter {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let n = self.evt.read().unwrap_or(0);
            assert!(!self.boom.load(Ordering::SeqCst), "device bug");
            *self.seen.lock().unwrap() += n;
        }

        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
    }

    /// Sets `stop` when its eventfd is written, as the device manager's loop control does.
    struct Stopper {
        evt: EventFd,
        stop: Arc<AtomicBool>,
    }

    impl MutEventSubscriber for Stopper {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let _ = self.evt.read();
            self.stop.store(true, Ordering::SeqCst);
        }

        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
    }

    struct Rig {
        device_loop: DeviceLoop<Sub>,
        kick: EventFd,
        seen: Arc<Mutex<u64>>,
        boom: Arc<AtomicBool>,
        threads: Arc<Mutex<u32>>,
    }

    fn rig() -> Rig {
        let mut manager: EventManager<Sub> = EventManager::new().unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let seen = Arc::new(Mutex::new(0));
        let boom = Arc::new(AtomicBool::new(false));
        manager.add_subscriber(Arc::new(Mutex::new(Counter {
            evt: kick.try_clone().unwrap(),
            seen: seen.clone(),
            boom: boom.clone(),
        })));
        let stop = Arc::new(AtomicBool::new(false));
        let stop_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        manager.add_subscriber(Arc::new(Mutex::new(Stopper {
            evt: stop_evt.try_clone().unwrap(),
            stop: stop.clone(),
        })));
        let threads = Arc::new(Mutex::new(0));
        let started = threads.clone();
        let device_loop = DeviceLoop::start(manager, stop_evt, stop, move || {
            *started.lock().unwrap() += 1;
            true
        })
        .unwrap();
        Rig {
            device_loop,
            kick,
            seen,
            boom,
            threads,
        }
    }

    fn wait_seen(rig: &Rig, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while *rig.seen.lock().unwrap() != want {
            assert!(
                Instant::now() < deadline,
                "the loop never handled event {want}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_paused_loop_handles_nothing_until_resumed_on_the_same_thread() {
        let mut rig = rig();
        rig.kick.write(1).unwrap();
        wait_seen(&rig, 1);
        for round in 0..200u64 {
            rig.device_loop.pause().unwrap();
            rig.kick.write(1).unwrap();
            std::thread::sleep(Duration::from_micros(200));
            assert_eq!(*rig.seen.lock().unwrap(), round + 1, "handled while paused");
            assert!(rig.device_loop.parked_manager().is_some());
            rig.device_loop.resume();
            assert!(rig.device_loop.parked_manager().is_none());
            wait_seen(&rig, round + 2);
        }
        assert_eq!(*rig.threads.lock().unwrap(), 1, "a thread per resume");
        rig.device_loop.stop();
    }

    #[test]
    fn back_to_back_pauses_leave_no_stale_stop_behind() {
        let mut rig = rig();
        // Pause again before the thread woke from the resume: the second pause is answered
        // at once and leaves its stop eventfd written for the next run.
        for _ in 0..100 {
            rig.device_loop.pause().unwrap();
            rig.device_loop.resume();
            rig.device_loop.pause().unwrap();
            rig.device_loop.resume();
        }
        let before = *rig.seen.lock().unwrap();
        rig.kick.write(1).unwrap();
        wait_seen(&rig, before + 1);
        rig.kick.write(1).unwrap();
        wait_seen(&rig, before + 2);
        rig.device_loop.stop();
    }

    #[test]
    fn a_pause_asked_then_called_off_or_waited_for_leaves_the_loop_as_wanted() {
        let mut rig = rig();
        for round in 0..100u64 {
            // Called off (the vCPUs did not stop): the loop goes on handling events.
            rig.device_loop.ask_pause().unwrap();
            rig.device_loop.resume();
            assert!(rig.device_loop.parked_manager().is_none());
            rig.kick.write(1).unwrap();
            wait_seen(&rig, 2 * round + 1);
            // Asked, then waited for: parked, handling nothing until resumed.
            rig.device_loop.ask_pause().unwrap();
            rig.device_loop.pause().unwrap();
            rig.kick.write(1).unwrap();
            std::thread::sleep(Duration::from_micros(200));
            assert_eq!(
                *rig.seen.lock().unwrap(),
                2 * round + 1,
                "handled while paused"
            );
            rig.device_loop.resume();
            wait_seen(&rig, 2 * round + 2);
        }
        rig.device_loop.stop();
    }

    #[test]
    fn a_pause_after_a_device_panicked_says_so_instead_of_hanging() {
        let mut rig = rig();
        rig.boom.store(true, Ordering::SeqCst);
        rig.kick.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match rig.device_loop.pause() {
                Err(DeviceLoopError::Gone) => break,
                Ok(()) => rig.device_loop.resume(),
                Err(e) => panic!("{e}"),
            }
            assert!(
                Instant::now() < deadline,
                "pause never noticed the dead thread"
            );
        }
    }

    #[test]
    fn an_unfiltered_thread_runs_no_device_but_answers_pauses() {
        let mut manager: EventManager<Sub> = EventManager::new().unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let seen = Arc::new(Mutex::new(0));
        manager.add_subscriber(Arc::new(Mutex::new(Counter {
            evt: kick.try_clone().unwrap(),
            seen: seen.clone(),
            boom: Arc::new(AtomicBool::new(false)),
        })));
        let stop_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut device_loop = DeviceLoop::start(manager, stop_evt, stop, || false).unwrap();
        kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        device_loop.pause().unwrap();
        device_loop.resume();
        device_loop.pause().unwrap();
        assert_eq!(*seen.lock().unwrap(), 0);
        device_loop.stop();
    }
}
