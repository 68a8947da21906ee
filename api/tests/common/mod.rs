//! A fake control loop for the server tests: a thread that answers `ApiMessage`s from the
//! channel like a VMM whose VM lifecycle is a small state machine.

#![allow(dead_code)]

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;

use vmm::config::VmConfig;
use vmm::control::{
    ApiMessage, ApiSender, FtHealth, FtRole, FtStatus, VmInfoResponse, VmState, VmmError,
    VmmPingResponse, VmmRequest, VmmResponse, VmmResult,
};
use vmm_sys_util::eventfd::EventFd;

pub struct FakeVmm {
    config: Option<VmConfig>,
    state: VmState,
    ft: FtStatus,
}

impl FakeVmm {
    fn answer(&mut self, request: VmmRequest) -> VmmResult {
        let state = self.state;
        let wrong = |action: &'static str| Err(VmmError::InvalidState { action, state });
        match request {
            VmmRequest::Ping => Ok(VmmResponse::Ping(VmmPingResponse {
                build_version: "test".into(),
                version: "0.0.0".into(),
                pid: std::process::id() as i64,
                features: vec![],
            })),
            VmmRequest::ShutdownVmm => Ok(VmmResponse::Empty),
            VmmRequest::CreateVm(config) => {
                if self.config.is_some() {
                    return Err(VmmError::VmAlreadyCreated);
                }
                self.config = Some(*config);
                self.state = VmState::Created;
                Ok(VmmResponse::Empty)
            }
            VmmRequest::Restore(_) | VmmRequest::ReceiveMigration(_) => {
                if self.config.is_some() {
                    return Err(VmmError::VmAlreadyCreated);
                }
                self.config = Some(VmConfig::default());
                self.state = if matches!(request, VmmRequest::Restore(_)) {
                    VmState::Paused
                } else {
                    VmState::Running
                };
                Ok(VmmResponse::Empty)
            }
            VmmRequest::FtStatus => Ok(VmmResponse::FtStatus(Box::new(self.ft.clone()))),
            VmmRequest::ReceiveFt(request) => {
                if self.config.is_some() || self.ft.role != FtRole::None {
                    return Err(VmmError::VmAlreadyCreated);
                }
                self.ft = FtStatus {
                    role: FtRole::Backup,
                    health: FtHealth::WaitingForPrimary,
                    fencing: request
                        .witness
                        .map_or("none".into(), |w| format!("witness {w}")),
                    ..FtStatus::default()
                };
                Ok(VmmResponse::Empty)
            }
            _ if self.config.is_none() => Err(VmmError::VmNotCreated),
            VmmRequest::EnableFt(request) if state == VmState::Running => {
                if request.epoch_ms == 0 || request.epoch_ms > 1000 {
                    return Err(VmmError::InvalidConfig(format!(
                        "epoch_ms {} is not from 1 to 1000",
                        request.epoch_ms
                    )));
                }
                self.ft = FtStatus {
                    role: FtRole::Primary,
                    health: FtHealth::Protected,
                    peer: Some(request.peer),
                    disk_mode: Some(request.disk_mode),
                    epoch_ms: request.epoch_ms,
                    ..FtStatus::default()
                };
                Ok(VmmResponse::Empty)
            }
            VmmRequest::EnableFt(_) => wrong("enable fault tolerance for"),
            VmmRequest::DisableFt => {
                self.ft = FtStatus::default();
                Ok(VmmResponse::Empty)
            }
            VmmRequest::Snapshot(_) if state == VmState::Paused => Ok(VmmResponse::Empty),
            VmmRequest::Snapshot(_) => wrong("snapshot"),
            VmmRequest::SendMigration(_) if state == VmState::Running => {
                self.config = None;
                Ok(VmmResponse::Empty)
            }
            VmmRequest::SendMigration(_) => wrong("migrate"),
            VmmRequest::VmInfo => Ok(VmmResponse::VmInfo(Box::new(VmInfoResponse {
                config: self.config.clone().unwrap_or_default(),
                state,
                memory_actual_size: 512 << 20,
                device_tree: None,
            }))),
            VmmRequest::Progress => Err(VmmError::NotFound("no transfer has run".into())),
            // A running VM keeps its size; before boot the size is the configuration's.
            VmmRequest::Resize(request) => {
                let Some(config) = self.config.as_mut() else {
                    return Err(VmmError::VmNotCreated);
                };
                let vcpus = u32::from(config.cpus.boot_vcpus);
                match request.desired_vcpus {
                    Some(desired) if desired != vcpus && state == VmState::Created => {
                        config.cpus.boot_vcpus = u8::try_from(desired).unwrap_or(u8::MAX);
                        Ok(VmmResponse::Empty)
                    }
                    Some(desired) if desired != vcpus => Err(VmmError::Failed {
                        action: "resize",
                        message: format!(
                            "desired_vcpus={desired}: hot-plugging vCPUs is not supported yet"
                        ),
                    }),
                    _ => Ok(VmmResponse::Empty),
                }
            }
            VmmRequest::Counters => Ok(VmmResponse::Counters(Default::default())),
            // Hot-plug: a VM takes every device on slot 5; the NIC's id tells how many TAP
            // descriptors came with it and whether the configuration names them.
            VmmRequest::AddDevice(_) | VmmRequest::RemoveDevice(_) if self.config.is_none() => {
                Err(VmmError::VmNotCreated)
            }
            VmmRequest::AddDevice(device) => {
                let id = match *device {
                    vmm::control::HotplugRequest::Net { config, fds } => {
                        use std::os::fd::AsRawFd;
                        let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
                        let named = config.fds.as_deref() == Some(raw.as_slice());
                        format!(
                            "net-{}-fds-{}",
                            fds.len(),
                            if named { "named" } else { "unnamed" }
                        )
                    }
                    other => other.endpoint().to_string(),
                };
                Ok(VmmResponse::DeviceAdded(vmm::control::PciDeviceInfo {
                    id,
                    bdf: "0000:00:05.0".into(),
                }))
            }
            VmmRequest::RemoveDevice(request) => Err(VmmError::NotFound(format!(
                "no device with id {}",
                request.id
            ))),
            VmmRequest::BootVm if state == VmState::Created => {
                self.state = VmState::Running;
                Ok(VmmResponse::Empty)
            }
            VmmRequest::BootVm => wrong("boot"),
            VmmRequest::PauseVm if state == VmState::Running => {
                self.state = VmState::Paused;
                Ok(VmmResponse::Empty)
            }
            VmmRequest::PauseVm => wrong("pause"),
            VmmRequest::ResumeVm if state == VmState::Paused => {
                self.state = VmState::Running;
                Ok(VmmResponse::Empty)
            }
            VmmRequest::ResumeVm => wrong("resume"),
            VmmRequest::ShutdownVm | VmmRequest::RebootVm | VmmRequest::PowerButton
                if matches!(state, VmState::Running | VmState::Paused) =>
            {
                Ok(VmmResponse::Empty)
            }
            VmmRequest::ShutdownVm => wrong("shut down"),
            VmmRequest::RebootVm => wrong("reboot"),
            VmmRequest::PowerButton => wrong("press the power button of"),
            VmmRequest::DeleteVm => {
                self.config = None;
                Ok(VmmResponse::Empty)
            }
        }
    }
}

/// A running fake: the sender for the server, and how many requests it answered.
pub struct Fake {
    pub sender: ApiSender,
    pub answered: Arc<AtomicUsize>,
}

pub fn fake_control_loop() -> Fake {
    let (tx, rx) = mpsc::channel::<ApiMessage>();
    let wake = Arc::new(EventFd::new(0).unwrap());
    let answered = Arc::new(AtomicUsize::new(0));
    let count = answered.clone();
    thread::spawn(move || {
        let mut vmm = FakeVmm {
            config: None,
            state: VmState::Created,
            ft: FtStatus::default(),
        };
        for message in rx {
            let answer = vmm.answer(message.request);
            count.fetch_add(1, Ordering::SeqCst);
            let _ = message.reply.send(answer);
        }
    });
    Fake {
        sender: ApiSender::new(tx, wake),
        answered,
    }
}

/// A fresh socket path in a per-test directory.
pub fn socket_path(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tandem-api-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}.sock"))
}

/// Binds a socket and starts the server with a fake control loop.
pub fn start(name: &str) -> (PathBuf, Fake) {
    let path = socket_path(name);
    let listener: UnixListener = api::bind(&path).unwrap();
    let fake = fake_control_loop();
    api::start_server(listener, fake.sender.clone()).unwrap();
    (path, fake)
}

pub fn kernel_config() -> String {
    r#"{"payload": {"kernel": "/k", "cmdline": "x"}, "console": {"mode": "Off"}}"#.to_string()
}
