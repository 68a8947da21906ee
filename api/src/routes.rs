//! Cloud Hypervisor's endpoints: which method and path become which [`VmmRequest`], and how
//! the control loop's answer becomes an HTTP response.

use std::os::fd::{AsRawFd, OwnedFd};

use serde::de::DeserializeOwned;
use vmm::config::{
    DiskConfig, FsConfig, NetConfig, PmemConfig, ValidationError, VmConfig, VsockConfig,
};
use vmm::control::{
    ApiSender, ErrorKind, HotplugRequest, RemoveDeviceRequest, SendError, VmmRequest, VmmResponse,
    VmmResult,
};

use crate::http::Response;

/// Prefix of every endpoint.
pub const API_PREFIX: &str = "/api/v1/";

/// Whatever answers requests: the real control loop through an [`ApiSender`], or a fake in
/// tests and benchmarks.
pub trait Backend: Send + Sync {
    fn call(&self, request: VmmRequest) -> Result<VmmResult, SendError>;
}

impl Backend for ApiSender {
    fn call(&self, request: VmmRequest) -> Result<VmmResult, SendError> {
        ApiSender::call(self, request)
    }
}

/// One endpoint the server implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    VmmPing,
    VmmShutdown,
    VmCreate,
    VmBoot,
    VmInfo,
    VmCounters,
    VmPause,
    VmResume,
    VmShutdown,
    VmReboot,
    VmDelete,
    VmPowerButton,
    VmSnapshot,
    VmRestore,
    VmSendMigration,
    VmReceiveMigration,
    VmEnableFt,
    VmReceiveFt,
    VmFtStatus,
    VmDisableFt,
    VmProgress,
    VmResize,
    VmAddDisk,
    VmAddNet,
    VmAddPmem,
    VmAddFs,
    VmAddVsock,
    VmRemoveDevice,
}

/// Every endpoint: name after `/api/v1/`, its method, and what it is.
pub const ENDPOINTS: &[(&str, &str, Endpoint)] = &[
    ("vmm.ping", "GET", Endpoint::VmmPing),
    ("vmm.shutdown", "PUT", Endpoint::VmmShutdown),
    ("vm.create", "PUT", Endpoint::VmCreate),
    ("vm.boot", "PUT", Endpoint::VmBoot),
    ("vm.info", "GET", Endpoint::VmInfo),
    ("vm.counters", "GET", Endpoint::VmCounters),
    ("vm.pause", "PUT", Endpoint::VmPause),
    ("vm.resume", "PUT", Endpoint::VmResume),
    ("vm.shutdown", "PUT", Endpoint::VmShutdown),
    ("vm.reboot", "PUT", Endpoint::VmReboot),
    ("vm.delete", "PUT", Endpoint::VmDelete),
    ("vm.power-button", "PUT", Endpoint::VmPowerButton),
    ("vm.snapshot", "PUT", Endpoint::VmSnapshot),
    ("vm.restore", "PUT", Endpoint::VmRestore),
    ("vm.send-migration", "PUT", Endpoint::VmSendMigration),
    ("vm.receive-migration", "PUT", Endpoint::VmReceiveMigration),
    // Tandem's fault-tolerance extension (not in Cloud Hypervisor).
    ("vm.enable-ft", "PUT", Endpoint::VmEnableFt),
    ("vm.receive-ft", "PUT", Endpoint::VmReceiveFt),
    ("vm.ft-status", "GET", Endpoint::VmFtStatus),
    ("vm.disable-ft", "PUT", Endpoint::VmDisableFt),
    // Tandem's extension: progress of the running enable-ft sync or send-migration.
    ("vm.progress", "GET", Endpoint::VmProgress),
    // Cloud Hypervisor's, listed last so the indices above stay put.
    ("vm.resize", "PUT", Endpoint::VmResize),
    // PCI hot-plug (Cloud Hypervisor's).
    ("vm.add-disk", "PUT", Endpoint::VmAddDisk),
    ("vm.add-net", "PUT", Endpoint::VmAddNet),
    ("vm.add-pmem", "PUT", Endpoint::VmAddPmem),
    ("vm.add-fs", "PUT", Endpoint::VmAddFs),
    ("vm.add-vsock", "PUT", Endpoint::VmAddVsock),
    ("vm.remove-device", "PUT", Endpoint::VmRemoveDevice),
];

/// The one endpoint that takes file descriptors with its request (`SCM_RIGHTS`): TAPs for
/// `vm.add-net`, as in Cloud Hypervisor.
pub const TAKES_FDS: Endpoint = Endpoint::VmAddNet;

/// TAP descriptors `vm.add-net` takes: one per queue pair, and Tandem's NICs have one pair.
const MAX_NET_FDS: usize = 1;

/// Cloud Hypervisor endpoints that exist there but not here yet: a 404 that says so is more
/// useful to someone switching over than a bare "no such endpoint".
const NOT_YET: &[&str] = &[
    "vmm.info",
    "vm.resize-zone",
    "vm.add-device",
    "vm.add-vdpa",
    "vm.add-user-device",
    "vm.coredump",
    "vm.nmi",
];

/// Handles one complete request that came without file descriptors.
pub fn handle(method: &str, path: &str, body: &[u8], backend: &dyn Backend) -> Response {
    handle_with_fds(method, path, body, Vec::new(), backend)
}

/// Handles one complete request and the descriptors passed with it. Only [`TAKES_FDS`]
/// accepts any; elsewhere they are a 400 (and closed, as they are dropped).
pub fn handle_with_fds(
    method: &str,
    path: &str,
    body: &[u8],
    fds: Vec<OwnedFd>,
    backend: &dyn Backend,
) -> Response {
    let name = path.strip_prefix(API_PREFIX).unwrap_or("");
    let Some(&(_, allowed, endpoint)) = ENDPOINTS.iter().find(|(n, _, _)| *n == name) else {
        if NOT_YET.contains(&name) {
            return Response::error_one(
                404,
                format!("{path} is a Cloud Hypervisor endpoint that is not implemented yet"),
            );
        }
        return Response::error_one(404, format!("no such endpoint: {path}"));
    };
    if method != allowed {
        let mut response = Response::error_one(
            405,
            format!("method {method} is not allowed on {path}; use {allowed}"),
        );
        response.allow = Some(allowed);
        return response;
    }
    if !fds.is_empty() && endpoint != TAKES_FDS {
        return Response::error_one(
            400,
            format!(
                "{name} takes no file descriptors ({} passed with the request)",
                fds.len()
            ),
        );
    }
    let request = match request_of(endpoint, body, fds) {
        Ok(request) => request,
        Err(response) => return response,
    };
    match backend.call(request) {
        Ok(result) => response_of(result),
        Err(e) => Response::error_one(500, e),
    }
}

/// The control loop's request for `endpoint`, its body parsed (a 400 response if it is bad).
fn request_of(endpoint: Endpoint, body: &[u8], fds: Vec<OwnedFd>) -> Result<VmmRequest, Response> {
    let device = |request| VmmRequest::AddDevice(Box::new(request));
    Ok(match endpoint {
        Endpoint::VmmPing => VmmRequest::Ping,
        Endpoint::VmmShutdown => VmmRequest::ShutdownVmm,
        Endpoint::VmCreate => VmmRequest::CreateVm(Box::new(parse_vm_config(body)?)),
        Endpoint::VmBoot => VmmRequest::BootVm,
        Endpoint::VmInfo => VmmRequest::VmInfo,
        Endpoint::VmCounters => VmmRequest::Counters,
        Endpoint::VmPause => VmmRequest::PauseVm,
        Endpoint::VmResume => VmmRequest::ResumeVm,
        Endpoint::VmShutdown => VmmRequest::ShutdownVm,
        Endpoint::VmReboot => VmmRequest::RebootVm,
        Endpoint::VmDelete => VmmRequest::DeleteVm,
        Endpoint::VmPowerButton => VmmRequest::PowerButton,
        // The migration calls block until the migration is over (minutes, for a big guest), and
        // `vm.enable-ft` until the initial synchronisation with the backup is done: the
        // connection thread waits for the control loop's answer with no timeout, and the
        // socket timeouts only bound reading the request and writing the answer.
        Endpoint::VmSnapshot => {
            VmmRequest::Snapshot(parse_body(body, "vm.snapshot", "VmSnapshotConfig")?)
        }
        Endpoint::VmRestore => {
            VmmRequest::Restore(parse_body(body, "vm.restore", "RestoreConfig")?)
        }
        Endpoint::VmSendMigration => {
            VmmRequest::SendMigration(parse_body(body, "vm.send-migration", "SendMigrationData")?)
        }
        Endpoint::VmReceiveMigration => VmmRequest::ReceiveMigration(parse_body(
            body,
            "vm.receive-migration",
            "ReceiveMigrationData",
        )?),
        // Only the JSON shape is checked here; the control loop judges the values (peer and
        // witness addresses, epoch length, disk paths) and answers 400 for bad ones.
        Endpoint::VmEnableFt => {
            VmmRequest::EnableFt(parse_body(body, "vm.enable-ft", "EnableFtData")?)
        }
        Endpoint::VmReceiveFt => {
            VmmRequest::ReceiveFt(parse_body(body, "vm.receive-ft", "ReceiveFtData")?)
        }
        Endpoint::VmFtStatus => VmmRequest::FtStatus,
        Endpoint::VmDisableFt => VmmRequest::DisableFt,
        Endpoint::VmProgress => VmmRequest::Progress,
        // Only the shape is checked here; the control loop compares the sizes with the VM's.
        Endpoint::VmResize => VmmRequest::Resize(parse_body(body, "vm.resize", "VmResize")?),
        // Each device is checked as `vm.create` checks it (the same refusals); what depends on
        // the VM (ids in use, room on the bus, shared memory for virtio-fs) is the control
        // loop's to judge.
        Endpoint::VmAddDisk => device(HotplugRequest::Disk(parse_device(
            body,
            "vm.add-disk",
            "DiskConfig",
            DiskConfig::validate,
        )?)),
        Endpoint::VmAddNet => device(parse_net(body, fds)?),
        Endpoint::VmAddPmem => device(HotplugRequest::Pmem(parse_device(
            body,
            "vm.add-pmem",
            "PmemConfig",
            PmemConfig::validate,
        )?)),
        Endpoint::VmAddFs => device(HotplugRequest::Fs(parse_device(
            body,
            "vm.add-fs",
            "FsConfig",
            FsConfig::validate,
        )?)),
        Endpoint::VmAddVsock => device(HotplugRequest::Vsock(parse_device(
            body,
            "vm.add-vsock",
            "VsockConfig",
            VsockConfig::validate,
        )?)),
        Endpoint::VmRemoveDevice => {
            let request: RemoveDeviceRequest =
                parse_body(body, "vm.remove-device", "VmRemoveDevice")?;
            if request.id.is_empty() {
                return Err(Response::error_one(
                    400,
                    "VmRemoveDevice.id must not be empty",
                ));
            }
            VmmRequest::RemoveDevice(request)
        }
    })
}

/// The `vm.create` body: JSON errors (syntax, types, unknown fields) and `validate()` errors
/// are both 400, with serde's or the validator's message naming the field.
fn parse_vm_config(body: &[u8]) -> Result<VmConfig, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Response::error_one(
            400,
            "vm.create needs a VmConfig JSON request body",
        ));
    }
    let mut config: VmConfig = serde_json::from_slice(body)
        .map_err(|e| Response::error_one(400, format!("invalid VmConfig JSON: {e}")))?;
    // Descriptor numbers in a body name whatever the VMM has open under them (or, in a
    // `vm.info` fed back, another process's descriptors). As in Cloud Hypervisor they are
    // dropped with a warning; TAP descriptors come with `vm.add-net` (SCM_RIGHTS) or
    // `--net fd=`.
    for net in config.net.iter_mut().flatten() {
        if net.fds.take().is_some_and(|fds| !fds.is_empty()) {
            log::warn!("vm.create: ignoring the net fds in the request body");
        }
    }
    config
        .validate()
        .map_err(|e| Response::error_one(400, format!("invalid VM configuration: {e}")))?;
    Ok(config)
}

/// A device's configuration (`schema` in Cloud Hypervisor's API spec): bad JSON as
/// [`parse_body`], and the device kind's own validation (the checks `vm.create` makes of such
/// a device), both 400.
fn parse_device<T: DeserializeOwned>(
    body: &[u8],
    endpoint: &str,
    schema: &str,
    validate: fn(&T) -> Result<(), ValidationError>,
) -> Result<T, Response> {
    let config: T = parse_body(body, endpoint, schema)?;
    validate(&config).map_err(|e| invalid_device(schema, e))?;
    Ok(config)
}

fn invalid_device(schema: &str, e: ValidationError) -> Response {
    Response::error_one(400, format!("invalid {schema}: {e}"))
}

/// `vm.add-net`: the NetConfig and the TAP descriptors passed with it. As in Cloud
/// Hypervisor, passed descriptors replace whatever numbers the body's `fds` holds (those are
/// the client's and mean nothing here); the configuration then records the numbers of the
/// received descriptors, which `fds` of the request keeps open. Numbers in the body without
/// descriptors are refused: the VMM never uses a number a client chose.
fn parse_net(body: &[u8], fds: Vec<OwnedFd>) -> Result<HotplugRequest, Response> {
    let mut config: NetConfig = parse_body(body, "vm.add-net", "NetConfig")?;
    if fds.len() > MAX_NET_FDS {
        return Err(Response::error_one(
            400,
            format!(
                "vm.add-net: {} file descriptors were passed; a NIC takes one TAP descriptor \
                 per queue pair, and this VMM supports one queue pair (at most {MAX_NET_FDS} \
                 descriptor)",
                fds.len()
            ),
        ));
    }
    if fds.is_empty() {
        if config.passed_fds().is_some() {
            return Err(Response::error_one(
                400,
                "invalid NetConfig: net.fds: descriptor numbers in the body are the client's; \
                 pass the TAP descriptors with the request (SCM_RIGHTS), as \
                 `ch-remote add-net fd=[...]` does",
            ));
        }
    } else {
        if config.passed_fds().is_some() {
            log::debug!("vm.add-net: the body's fds are replaced by the descriptors passed");
        }
        config.fds = Some(fds.iter().map(AsRawFd::as_raw_fd).collect());
    }
    config
        .validate()
        .map_err(|e| invalid_device("NetConfig", e))?;
    Ok(HotplugRequest::Net { config, fds })
}

/// A JSON request body of type `T` (named `schema` as in Cloud Hypervisor's API spec): a
/// missing body, bad JSON, wrong types and unknown fields are 400, with serde's message naming
/// the field. What the values mean (URLs, paths) is for the control loop to judge.
fn parse_body<T: DeserializeOwned>(
    body: &[u8],
    endpoint: &str,
    schema: &str,
) -> Result<T, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        let article = if schema.starts_with(['A', 'E', 'I', 'O', 'U']) {
            "an"
        } else {
            "a"
        };
        return Err(Response::error_one(
            400,
            format!("{endpoint} needs {article} {schema} JSON request body"),
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| Response::error_one(400, format!("invalid {schema} JSON: {e}")))
}

fn response_of(result: VmmResult) -> Response {
    let json = |value: Result<Vec<u8>, serde_json::Error>| match value {
        Ok(body) => Response::json(200, body),
        Err(e) => Response::error_one(500, format!("cannot serialize the response: {e}")),
    };
    match result {
        Ok(VmmResponse::Empty) => Response::no_content(),
        Ok(VmmResponse::Ping(ping)) => json(serde_json::to_vec(&ping)),
        Ok(VmmResponse::VmInfo(info)) => json(serde_json::to_vec(&info)),
        Ok(VmmResponse::Counters(counters)) => json(serde_json::to_vec(&counters)),
        Ok(VmmResponse::FtStatus(status)) => json(serde_json::to_vec(&status)),
        Ok(VmmResponse::Progress(report)) => json(serde_json::to_vec(&report)),
        Ok(VmmResponse::DeviceAdded(info)) => json(serde_json::to_vec(&info)),
        Err(e) => {
            let status = match e.kind() {
                ErrorKind::BadRequest => 400,
                ErrorKind::NotFound => 404,
                ErrorKind::WrongState => 405,
                ErrorKind::Internal => 500,
            };
            Response::error_one(status, e)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vmm::control::{
        FtDiskMode, FtHealth, FtRole, FtStatus, PciDeviceInfo, VmState, VmmError, VmmPingResponse,
    };

    use super::*;

    /// Records the requests and answers like a VMM with no VM.
    #[derive(Default)]
    struct Fake {
        seen: Mutex<Vec<String>>,
    }

    impl Backend for Fake {
        fn call(&self, request: VmmRequest) -> Result<VmmResult, SendError> {
            self.seen.lock().unwrap().push(format!("{request:?}"));
            Ok(match request {
                VmmRequest::Ping => Ok(VmmResponse::Ping(VmmPingResponse {
                    build_version: "b".into(),
                    version: "v".into(),
                    pid: 1,
                    features: vec![],
                })),
                VmmRequest::Counters => Ok(VmmResponse::Counters(Default::default())),
                VmmRequest::CreateVm(_) | VmmRequest::ShutdownVmm => Ok(VmmResponse::Empty),
                VmmRequest::PauseVm => Err(VmmError::InvalidState {
                    action: "pause",
                    state: VmState::Created,
                }),
                VmmRequest::BootVm => Err(VmmError::Failed {
                    action: "boot",
                    message: "no kernel".into(),
                }),
                VmmRequest::FtStatus => Ok(VmmResponse::FtStatus(Box::default())),
                _ => Err(VmmError::VmNotCreated),
            })
        }
    }

    struct Gone;
    impl Backend for Gone {
        fn call(&self, _: VmmRequest) -> Result<VmmResult, SendError> {
            Err(SendError::ControlLoopGone)
        }
    }

    fn body(r: &Response) -> serde_json::Value {
        serde_json::from_slice(r.body.as_ref().unwrap()).unwrap()
    }

    fn kernel_config() -> String {
        r#"{"payload": {"kernel": "/k"}, "console": {"mode": "Off"}}"#.to_string()
    }

    #[test]
    fn vm_create_drops_descriptor_numbers_from_the_body() {
        // Cloud Hypervisor ignores them (a `vm.info` fed back carries another process's
        // numbers); with them kept, `tap` + `fds` or a queue mismatch would even be refused.
        let fake = Fake::default();
        let body = r#"{"payload": {"kernel": "/k"}, "net": [{"tap": "t0", "fds": [7, 8]}]}"#;
        let r = handle("PUT", "/api/v1/vm.create", body.as_bytes(), &fake);
        assert_eq!(r.status, 204, "{:?}", r.body);
        let seen = fake.seen.lock().unwrap();
        assert!(seen[0].starts_with("CreateVm("), "{}", seen[0]);
        assert!(seen[0].contains("fds: None"), "{}", seen[0]);
    }

    #[test]
    fn every_endpoint_reaches_the_backend_with_its_request() {
        let fake = Fake::default();
        for (name, method, _) in ENDPOINTS {
            let body = valid_body(name);
            handle(method, &format!("/api/v1/{name}"), body.as_bytes(), &fake);
        }
        let seen = fake.seen.lock().unwrap();
        assert_eq!(seen.len(), ENDPOINTS.len());
        assert!(seen[2].starts_with("CreateVm("), "{}", seen[2]);
        assert_eq!(seen[11], "PowerButton");
        assert_eq!(
            seen[12..16],
            [
                r#"Snapshot(SnapshotRequest { destination_url: "file:///tmp/snap" })"#,
                r#"Restore(RestoreRequest { source_url: "file:///tmp/snap", prefault: true, resume: false })"#,
                r#"SendMigration(SendMigrationRequest { destination_url: "tcp:10.0.0.2:6000", local: false, downtime_ms: 100, tls_dir: None, insecure_plaintext: false })"#,
                r#"ReceiveMigration(ReceiveMigrationRequest { receiver_url: "unix:/tmp/mig.sock", disk_paths: [], taps: [], tls_dir: None, insecure_plaintext: false })"#,
            ]
        );
        assert!(
            seen.iter().any(|r| r
                == "Resize(VmResizeRequest { desired_vcpus: Some(2), desired_ram: None, desired_balloon: None })"),
            "{seen:?}"
        );
        assert_eq!(
            seen[16..20],
            [
                r#"EnableFt(EnableFtRequest { peer: "10.0.0.2:7000", epoch_ms: 20, disk_mode: Shared, heartbeat_timeout_ms: Some(200), witness: Some("10.0.0.3:7100"), fencing: None, compress: false, hot_pages: true, stage_helper: true, early_staging: true, early_send: true, early_acks: true, resend_output: true, latency_mode: false, encode_threads: None, streams: None, group: Some("/run/web.sock"), tls_dir: None, insecure_plaintext: false })"#,
                r#"ReceiveFt(ReceiveFtRequest { receiver_url: "tcp:0.0.0.0:7000", disk_paths: ["/var/b/disk0.img", "/var/b/disk1.img"], taps: [], witness: Some("10.0.0.3:7100"), fencing: None, group: None, tls_dir: None, insecure_plaintext: false })"#,
                "FtStatus",
                "DisableFt",
            ]
        );
    }

    /// A body each endpoint accepts (empty for those that take none).
    fn valid_body(name: &str) -> String {
        match name {
            "vm.create" => kernel_config(),
            "vm.resize" => r#"{"desired_vcpus": 2}"#.into(),
            "vm.snapshot" => r#"{"destination_url": "file:///tmp/snap"}"#.into(),
            "vm.restore" => r#"{"source_url": "file:///tmp/snap", "prefault": true}"#.into(),
            "vm.send-migration" => {
                r#"{"destination_url": "tcp:10.0.0.2:6000", "downtime_ms": 100}"#.into()
            }
            "vm.receive-migration" => r#"{"receiver_url": "unix:/tmp/mig.sock"}"#.into(),
            "vm.enable-ft" => r#"{"peer": "10.0.0.2:7000", "epoch_ms": 20, "disk_mode": "shared",
                "heartbeat_timeout_ms": 200, "witness": "10.0.0.3:7100", "compress": false,
                "group": "/run/web.sock"}"#
                .into(),
            "vm.receive-ft" => r#"{"receiver_url": "tcp:0.0.0.0:7000",
                "disk_paths": ["/var/b/disk0.img", "/var/b/disk1.img"],
                "witness": "10.0.0.3:7100"}"#
                .into(),
            "vm.add-disk" => r#"{"path": "/img/a.raw", "readonly": true}"#.into(),
            "vm.add-net" => r#"{"tap": "tap0", "mac": "12:34:56:78:9a:bc"}"#.into(),
            "vm.add-pmem" => r#"{"file": "/img/p", "size": 4194304}"#.into(),
            "vm.add-fs" => r#"{"tag": "myfs", "socket": "/run/fs.sock"}"#.into(),
            "vm.add-vsock" => r#"{"cid": 3, "socket": "/run/v.sock"}"#.into(),
            "vm.remove-device" => r#"{"id": "_disk0"}"#.into(),
            _ => String::new(),
        }
    }

    /// Keeps every request it gets and answers a hot-plug as a running VM would.
    #[derive(Default)]
    struct Keeps(Mutex<Vec<VmmRequest>>);

    impl Backend for Keeps {
        fn call(&self, request: VmmRequest) -> Result<VmmResult, SendError> {
            let answer = match &request {
                VmmRequest::AddDevice(_) => Ok(VmmResponse::DeviceAdded(PciDeviceInfo {
                    id: "_disk1".into(),
                    bdf: "0000:00:05.0".into(),
                })),
                _ => Ok(VmmResponse::Empty),
            };
            self.0.lock().unwrap().push(request);
            Ok(answer)
        }
    }

    /// A descriptor of this process (the read end of a pipe) to pass with a request.
    fn some_fd() -> OwnedFd {
        let (read, _write) = std::io::pipe().unwrap();
        read.into()
    }

    #[test]
    fn hotplug_answers_pci_device_info() {
        let keeps = Keeps::default();
        let r = handle(
            "PUT",
            "/api/v1/vm.add-disk",
            br#"{"path": "/img/b.raw", "id": "_disk1"}"#,
            &keeps,
        );
        assert_eq!(r.status, 200);
        assert_eq!(
            body(&r),
            serde_json::json!({"id": "_disk1", "bdf": "0000:00:05.0"})
        );
        let r = handle(
            "PUT",
            "/api/v1/vm.remove-device",
            br#"{"id": "_disk1"}"#,
            &keeps,
        );
        assert_eq!((r.status, r.body), (204, None));
        let seen = keeps.0.lock().unwrap();
        match &seen[0] {
            VmmRequest::AddDevice(device) => match device.as_ref() {
                HotplugRequest::Disk(disk) => {
                    assert_eq!(
                        disk.path.as_deref(),
                        Some(std::path::Path::new("/img/b.raw"))
                    );
                    assert_eq!(disk.id.as_deref(), Some("_disk1"));
                    // Cloud Hypervisor's defaults fill the rest.
                    assert_eq!((disk.num_queues, disk.queue_size), (1, 128));
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(&seen[1], VmmRequest::RemoveDevice(RemoveDeviceRequest { id }) if id == "_disk1")
        );
    }

    #[test]
    fn hotplug_bodies_each_reach_the_control_loop_as_their_device() {
        let keeps = Keeps::default();
        for name in [
            "vm.add-disk",
            "vm.add-net",
            "vm.add-pmem",
            "vm.add-fs",
            "vm.add-vsock",
        ] {
            let r = handle(
                "PUT",
                &format!("/api/v1/{name}"),
                valid_body(name).as_bytes(),
                &keeps,
            );
            assert_eq!(r.status, 200, "{name}: {:?}", r.body);
        }
        let seen = keeps.0.lock().unwrap();
        let endpoints: Vec<&str> = seen
            .iter()
            .map(|request| match request {
                VmmRequest::AddDevice(device) => device.endpoint(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            endpoints,
            [
                "vm.add-disk",
                "vm.add-net",
                "vm.add-pmem",
                "vm.add-fs",
                "vm.add-vsock"
            ]
        );
        match &seen[1] {
            VmmRequest::AddDevice(device) => match device.as_ref() {
                HotplugRequest::Net { config, fds } => {
                    assert_eq!(config.tap.as_deref(), Some("tap0"));
                    assert!(fds.is_empty() && config.fds.is_none());
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hotplug_rejects_bad_bodies_with_400_naming_the_schema_and_field() {
        let fake = Fake::default();
        let cases = [
            (
                "vm.add-disk",
                "",
                "vm.add-disk needs a DiskConfig JSON request body",
            ),
            ("vm.add-disk", "{", "invalid DiskConfig JSON"),
            (
                "vm.add-disk",
                r#"{"path": "/a", "bogus": 1}"#,
                "unknown field `bogus`",
            ),
            ("vm.add-disk", r#"{"path": 5}"#, "invalid type: integer `5`"),
            // The refusals vm.create makes of the same device.
            (
                "vm.add-disk",
                "{}",
                "invalid DiskConfig: disks.path: a disk image path is required",
            ),
            (
                "vm.add-disk",
                r#"{"path": "/a", "num_queues": 2}"#,
                "invalid DiskConfig: disks.num_queues: more than one queue is not supported yet",
            ),
            (
                "vm.add-disk",
                r#"{"path": "/a", "vhost_user": true}"#,
                "disks.vhost_user",
            ),
            (
                "vm.add-disk",
                r#"{"path": "/a", "iommu": true}"#,
                "disks.iommu",
            ),
            (
                "vm.add-net",
                "",
                "vm.add-net needs a NetConfig JSON request body",
            ),
            ("vm.add-net", r#"{"tap": 1}"#, "invalid NetConfig JSON"),
            (
                "vm.add-net",
                r#"{"mac": "12:34"}"#,
                "invalid NetConfig: net.mac",
            ),
            ("vm.add-net", r#"{"num_queues": 4}"#, "net.num_queues"),
            ("vm.add-net", r#"{"vhost_user": true}"#, "net.vhost_user"),
            (
                "vm.add-net",
                r#"{"fds": [3]}"#,
                "pass the TAP descriptors with the request",
            ),
            ("vm.add-pmem", "{}", "missing field `file`"),
            (
                "vm.add-pmem",
                r#"{"file": "/p", "size": 3145728}"#,
                "invalid PmemConfig: pmem.size",
            ),
            ("vm.add-fs", r#"{"socket": "/s"}"#, "missing field `tag`"),
            (
                "vm.add-fs",
                r#"{"tag": "", "socket": "/s"}"#,
                "invalid FsConfig: fs.tag",
            ),
            (
                "vm.add-fs",
                r#"{"tag": "t", "socket": "/s", "queue_size": 3}"#,
                "fs.queue_size",
            ),
            (
                "vm.add-vsock",
                r#"{"cid": 2, "socket": "/v"}"#,
                "invalid VsockConfig: vsock.cid",
            ),
            ("vm.add-vsock", r#"{"cid": 3}"#, "missing field `socket`"),
            (
                "vm.remove-device",
                "",
                "vm.remove-device needs a VmRemoveDevice JSON request body",
            ),
            (
                "vm.remove-device",
                "{}",
                "invalid VmRemoveDevice JSON: missing field `id`",
            ),
            (
                "vm.remove-device",
                r#"{"id": 3}"#,
                "invalid type: integer `3`",
            ),
            (
                "vm.remove-device",
                r#"{"id": "a", "x": 1}"#,
                "unknown field `x`",
            ),
            (
                "vm.remove-device",
                r#"{"id": ""}"#,
                "VmRemoveDevice.id must not be empty",
            ),
        ];
        for (name, json, expected) in cases {
            let r = handle("PUT", &format!("/api/v1/{name}"), json.as_bytes(), &fake);
            assert_eq!(r.status, 400, "{name} {json}");
            let message = body(&r)[0].as_str().unwrap().to_string();
            assert!(message.contains(expected), "{name} {json}: {message}");
        }
        assert!(fake.seen.lock().unwrap().is_empty());
        for name in ["vm.add-disk", "vm.add-net", "vm.remove-device"] {
            let r = handle("GET", &format!("/api/v1/{name}"), b"", &fake);
            assert_eq!((r.status, r.allow), (405, Some("PUT")), "{name}");
        }
        // No VM: well-formed requests get the control loop's 404.
        let r = handle("PUT", "/api/v1/vm.add-disk", br#"{"path": "/a"}"#, &fake);
        assert_eq!(r.status, 404);
        assert_eq!(body(&r), serde_json::json!(["no VM has been created"]));
    }

    #[test]
    fn descriptors_are_taken_by_add_net_only() {
        let keeps = Keeps::default();
        // Every other endpoint refuses them, before looking at the body.
        for (name, method, _) in ENDPOINTS.iter().filter(|e| e.2 != TAKES_FDS) {
            let r = handle_with_fds(
                method,
                &format!("/api/v1/{name}"),
                valid_body(name).as_bytes(),
                vec![some_fd()],
                &keeps,
            );
            assert_eq!(r.status, 400, "{name}");
            assert_eq!(
                body(&r),
                serde_json::json!([format!(
                    "{name} takes no file descriptors (1 passed with the request)"
                )])
            );
        }
        assert!(keeps.0.lock().unwrap().is_empty());

        // One TAP per queue pair, and we have one pair.
        let r = handle_with_fds(
            "PUT",
            "/api/v1/vm.add-net",
            b"{}",
            vec![some_fd(), some_fd()],
            &keeps,
        );
        assert_eq!(r.status, 400);
        let message = body(&r)[0].as_str().unwrap().to_string();
        assert!(
            message.starts_with("vm.add-net: 2 file descriptors were passed"),
            "{message}"
        );
        assert!(keeps.0.lock().unwrap().is_empty());

        // One descriptor: it replaces the body's numbers, which are the client's.
        let fd = some_fd();
        let raw = fd.as_raw_fd();
        let r = handle_with_fds(
            "PUT",
            "/api/v1/vm.add-net",
            br#"{"fds": [42], "mac": "12:34:56:78:9a:bc", "id": "net7"}"#,
            vec![fd],
            &keeps,
        );
        assert_eq!(r.status, 200, "{:?}", r.body);
        let seen = keeps.0.lock().unwrap();
        match &seen[0] {
            VmmRequest::AddDevice(device) => match device.as_ref() {
                HotplugRequest::Net { config, fds } => {
                    assert_eq!(fds.len(), 1);
                    assert_eq!(fds[0].as_raw_fd(), raw);
                    assert_eq!(config.fds, Some(vec![raw]));
                    assert_eq!(config.id.as_deref(), Some("net7"));
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        drop(seen);

        // A passed TAP is not also a named one.
        let r = handle_with_fds(
            "PUT",
            "/api/v1/vm.add-net",
            br#"{"tap": "tap0"}"#,
            vec![some_fd()],
            &keeps,
        );
        assert_eq!(r.status, 400);
        assert!(body(&r)[0].as_str().unwrap().contains("not both"));
    }

    #[test]
    fn migration_bodies_take_defaults_and_aliases() {
        let fake = Fake::default();
        let put = |name: &str, json: &str| {
            handle("PUT", &format!("/api/v1/{name}"), json.as_bytes(), &fake).status
        };
        assert_eq!(put("vm.restore", r#"{"source_url": "file:///s"}"#), 404);
        assert_eq!(
            put(
                "vm.restore",
                r#"{"source_url": "file:///s", "prefault": false, "resume": true}"#
            ),
            404
        );
        assert_eq!(
            put("vm.send-migration", r#"{"destination_url": "tcp:h:1"}"#),
            404
        );
        assert_eq!(
            put(
                "vm.send-migration",
                r#"{"destination_url": "unix:/m", "local": true, "downtime": 50}"#
            ),
            404
        );
        let seen = fake.seen.lock().unwrap();
        assert_eq!(
            *seen,
            [
                r#"Restore(RestoreRequest { source_url: "file:///s", prefault: false, resume: false })"#,
                r#"Restore(RestoreRequest { source_url: "file:///s", prefault: false, resume: true })"#,
                r#"SendMigration(SendMigrationRequest { destination_url: "tcp:h:1", local: false, downtime_ms: 300, tls_dir: None, insecure_plaintext: false })"#,
                r#"SendMigration(SendMigrationRequest { destination_url: "unix:/m", local: true, downtime_ms: 50, tls_dir: None, insecure_plaintext: false })"#,
            ]
        );
    }

    #[test]
    fn migration_endpoints_reject_bad_bodies_with_400_naming_the_problem() {
        let fake = Fake::default();
        let cases = [
            (
                "vm.snapshot",
                "",
                "vm.snapshot needs a VmSnapshotConfig JSON request body",
            ),
            ("vm.snapshot", "{", "invalid VmSnapshotConfig JSON"),
            ("vm.snapshot", "{}", "missing field `destination_url`"),
            (
                "vm.snapshot",
                r#"{"destination_url": "file:///s", "x": 1}"#,
                "unknown field `x`",
            ),
            ("vm.snapshot", r#"{"destination_url": 5}"#, "invalid type"),
            (
                "vm.restore",
                " ",
                "vm.restore needs a RestoreConfig JSON request body",
            ),
            ("vm.restore", "{}", "missing field `source_url`"),
            (
                "vm.restore",
                r#"{"source_url": "file:///s", "prefault": "on"}"#,
                "invalid type: string \"on\", expected a boolean",
            ),
            (
                "vm.restore",
                r#"{"source_url": "file:///s", "net_fds": []}"#,
                "unknown field `net_fds`",
            ),
            (
                "vm.enable-ft",
                r#"{"peer": "b:7000", "resend_output": "no"}"#,
                "invalid type: string \"no\", expected a boolean",
            ),
            ("vm.send-migration", "", "needs a SendMigrationData"),
            ("vm.send-migration", "[]", "invalid SendMigrationData JSON"),
            (
                "vm.send-migration",
                r#"{"destination_url": "tcp:h:1", "downtime_ms": -1}"#,
                "invalid value: integer `-1`",
            ),
            (
                "vm.send-migration",
                r#"{"destination_url": "tcp:h:1", "migration_timeout": 1}"#,
                "unknown field `migration_timeout`",
            ),
            ("vm.receive-migration", "", "needs a ReceiveMigrationData"),
            ("vm.receive-migration", "{}", "missing field `receiver_url`"),
            (
                "vm.receive-migration",
                r#"{"receiver_url": "tcp:0.0.0.0:1", "url": "x"}"#,
                "unknown field `url`",
            ),
        ];
        for (name, json, expected) in cases {
            let r = handle("PUT", &format!("/api/v1/{name}"), json.as_bytes(), &fake);
            assert_eq!(r.status, 400, "{name} {json}");
            let message = body(&r)[0].as_str().unwrap().to_string();
            assert!(message.contains(expected), "{name} {json}: {message}");
        }
        assert!(fake.seen.lock().unwrap().is_empty());
        for name in [
            "vm.snapshot",
            "vm.restore",
            "vm.send-migration",
            "vm.receive-migration",
        ] {
            let r = handle("GET", &format!("/api/v1/{name}"), b"", &fake);
            assert_eq!((r.status, r.allow), (405, Some("PUT")), "{name}");
        }
    }

    #[test]
    fn migration_errors_of_the_control_loop_keep_their_status() {
        struct Refuses(fn() -> VmmError);
        impl Backend for Refuses {
            fn call(&self, _: VmmRequest) -> Result<VmmResult, SendError> {
                Ok(Err((self.0)()))
            }
        }
        let cases: [(fn() -> VmmError, u16); 4] = [
            (|| VmmError::InvalidConfig("bad URL".into()), 400),
            (|| VmmError::VmNotCreated, 404),
            (
                || VmmError::InvalidState {
                    action: "snapshot",
                    state: VmState::Running,
                },
                405,
            ),
            (
                || VmmError::Failed {
                    action: "send migration",
                    message: "connection refused".into(),
                },
                500,
            ),
        ];
        for (error, status) in cases {
            for (name, method, _) in &ENDPOINTS[12..] {
                let r = handle(
                    method,
                    &format!("/api/v1/{name}"),
                    valid_body(name).as_bytes(),
                    &Refuses(error),
                );
                assert_eq!(r.status, status, "{name}");
                assert_eq!(body(&r), serde_json::json!([error().to_string()]));
            }
        }
        let r = handle(
            "PUT",
            "/api/v1/vm.snapshot",
            valid_body("vm.snapshot").as_bytes(),
            &Fake::default(),
        );
        assert_eq!(r.status, 404);
    }

    #[test]
    fn ft_bodies_take_defaults() {
        let fake = Fake::default();
        let put = |name: &str, json: &str| {
            handle("PUT", &format!("/api/v1/{name}"), json.as_bytes(), &fake).status
        };
        assert_eq!(put("vm.enable-ft", r#"{"peer": "b:7000"}"#), 404);
        assert_eq!(
            put(
                "vm.enable-ft",
                r#"{"peer": "tcp:b:7000", "disk_mode": "replicated", "heartbeat_timeout_ms": null,
                    "witness": null, "compress": true}"#
            ),
            404
        );
        assert_eq!(
            put("vm.receive-ft", r#"{"receiver_url": "tcp:[::]:7000"}"#),
            404
        );
        assert_eq!(
            put(
                "vm.receive-ft",
                r#"{"receiver_url": "tcp:0.0.0.0:7000", "disk_paths": [], "witness": null}"#
            ),
            404
        );
        let seen = fake.seen.lock().unwrap();
        assert_eq!(
            *seen,
            [
                r#"EnableFt(EnableFtRequest { peer: "b:7000", epoch_ms: 10, disk_mode: Replicated, heartbeat_timeout_ms: None, witness: None, fencing: None, compress: false, hot_pages: true, stage_helper: true, early_staging: true, early_send: true, early_acks: true, resend_output: true, latency_mode: false, encode_threads: None, streams: None, group: None, tls_dir: None, insecure_plaintext: false })"#,
                r#"EnableFt(EnableFtRequest { peer: "tcp:b:7000", epoch_ms: 10, disk_mode: Replicated, heartbeat_timeout_ms: None, witness: None, fencing: None, compress: true, hot_pages: true, stage_helper: true, early_staging: true, early_send: true, early_acks: true, resend_output: true, latency_mode: false, encode_threads: None, streams: None, group: None, tls_dir: None, insecure_plaintext: false })"#,
                r#"ReceiveFt(ReceiveFtRequest { receiver_url: "tcp:[::]:7000", disk_paths: [], taps: [], witness: None, fencing: None, group: None, tls_dir: None, insecure_plaintext: false })"#,
                r#"ReceiveFt(ReceiveFtRequest { receiver_url: "tcp:0.0.0.0:7000", disk_paths: [], taps: [], witness: None, fencing: None, group: None, tls_dir: None, insecure_plaintext: false })"#,
            ]
        );
    }

    #[test]
    fn ft_endpoints_reject_bad_bodies_and_methods() {
        let fake = Fake::default();
        let cases = [
            (
                "vm.enable-ft",
                "",
                "vm.enable-ft needs an EnableFtData JSON request body",
            ),
            ("vm.enable-ft", "{", "invalid EnableFtData JSON"),
            ("vm.enable-ft", "{}", "missing field `peer`"),
            ("vm.enable-ft", r#"{"peer": 7000}"#, "invalid type: integer"),
            (
                "vm.enable-ft",
                r#"{"peer": "b:1", "epoch_ms": -1}"#,
                "invalid value: integer `-1`",
            ),
            (
                "vm.enable-ft",
                r#"{"peer": "b:1", "epoch_ms": 1.5}"#,
                "invalid type: floating point",
            ),
            (
                "vm.enable-ft",
                r#"{"peer": "b:1", "disk_mode": "mirrored"}"#,
                "unknown variant `mirrored`, expected `replicated` or `shared`",
            ),
            (
                "vm.enable-ft",
                r#"{"peer": "b:1", "disk_mode": "Shared"}"#,
                "unknown variant `Shared`",
            ),
            (
                "vm.enable-ft",
                r#"{"peer": "b:1", "disk_mode": null}"#,
                // serde_json's words for null where an enum belongs.
                "invalid EnableFtData JSON: expected value",
            ),
            (
                "vm.enable-ft",
                r#"{"peer": "b:1", "compress": "yes"}"#,
                "invalid type: string \"yes\", expected a boolean",
            ),
            (
                "vm.enable-ft",
                r#"{"peer": "b:1", "early_staging": 1}"#,
                "invalid type: integer `1`, expected a boolean",
            ),
            (
                "vm.enable-ft",
                r#"{"peer": "b:1", "early_send": "no"}"#,
                "invalid type: string \"no\", expected a boolean",
            ),
            (
                "vm.enable-ft",
                r#"{"peer": "b:1", "epoch": 5}"#,
                "unknown field `epoch`",
            ),
            (
                "vm.receive-ft",
                " ",
                "vm.receive-ft needs a ReceiveFtData JSON request body",
            ),
            ("vm.receive-ft", "[]", "invalid ReceiveFtData JSON"),
            ("vm.receive-ft", "{}", "missing field `receiver_url`"),
            (
                "vm.receive-ft",
                r#"{"receiver_url": "tcp:0.0.0.0:1", "disk_paths": "/a"}"#,
                "invalid type: string \"/a\", expected a sequence",
            ),
            (
                "vm.receive-ft",
                r#"{"receiver_url": "tcp:0.0.0.0:1", "disk_path": ["/a"]}"#,
                "unknown field `disk_path`",
            ),
            (
                "vm.receive-ft",
                r#"{"receiver_url": "tcp:0.0.0.0:1", "witness": 5}"#,
                "invalid type: integer `5`",
            ),
        ];
        for (name, json, expected) in cases {
            let r = handle("PUT", &format!("/api/v1/{name}"), json.as_bytes(), &fake);
            assert_eq!(r.status, 400, "{name} {json}");
            let message = body(&r)[0].as_str().unwrap().to_string();
            assert!(message.contains(expected), "{name} {json}: {message}");
        }
        assert!(fake.seen.lock().unwrap().is_empty());
        for (method, name, allowed) in [
            ("GET", "vm.enable-ft", "PUT"),
            ("POST", "vm.receive-ft", "PUT"),
            ("PUT", "vm.ft-status", "GET"),
            ("DELETE", "vm.ft-status", "GET"),
            ("GET", "vm.disable-ft", "PUT"),
        ] {
            let r = handle(method, &format!("/api/v1/{name}"), b"", &fake);
            assert_eq!((r.status, r.allow), (405, Some(allowed)), "{method} {name}");
            let message = body(&r)[0].as_str().unwrap().to_string();
            assert_eq!(
                message,
                format!("method {method} is not allowed on /api/v1/{name}; use {allowed}")
            );
        }
        assert!(fake.seen.lock().unwrap().is_empty());
    }

    #[test]
    fn ft_status_is_json_with_every_field() {
        let fake = Fake::default();
        let r = handle("GET", "/api/v1/vm.ft-status", b"", &fake);
        assert_eq!(r.status, 200);
        // Every field is always present; the `Option`s are null (as api-spec documents).
        assert_eq!(
            body(&r),
            serde_json::json!({
                "role": "none", "health": "off", "peer": null, "disk_mode": null,
                "epoch_ms": 0, "heartbeat_timeout_ms": 0, "fencing": "", "epoch": 0,
                "last_committed_epoch": 0, "lag_epochs": 0, "bytes": 0, "dirty_pages": 0,
                "pause_us_last": 0, "pause_us_p50": 0, "pause_us_p99": 0, "pause_us_max": 0,
                "send_us_p50": 0, "send_us_p99": 0, "commit_us_p50": 0, "commit_us_p99": 0,
                "input_mirror_us_p50": 0, "input_mirror_us_p99": 0,
                "epochs_cut_early": 0, "epochs_cut_for_output": 0, "encode_threads": 0,
                "streams": 0, "pages_staged_early": 0, "pages_sent_early": 0, "pages_held_for_pause": 0, "hot_pages": 0, "hot_page_hits": 0, "kvm_page_faults": null, "held_packets": 0,
                "released_packets": 0, "input_frames_mirrored": 0, "pages_from_input": 0,
                "acks_released_early": 0, "input_frames_replayed": 0,
                "output_frames_mirrored": 0, "output_frames_resent": 0,
                "held_disk_writes": 0, "failovers": 0,
                "last_failover_ms": null,
                "last_error": null, "group": null, "group_members": 0, "group_epoch": 0,
                "sync": null,
            })
        );

        struct Protected;
        impl Backend for Protected {
            fn call(&self, request: VmmRequest) -> Result<VmmResult, SendError> {
                assert!(matches!(request, VmmRequest::FtStatus));
                Ok(Ok(VmmResponse::FtStatus(Box::new(FtStatus {
                    role: FtRole::Backup,
                    health: FtHealth::WaitingForPrimary,
                    peer: Some("10.0.0.1:7000".into()),
                    disk_mode: Some(FtDiskMode::Shared),
                    epoch_ms: 10,
                    heartbeat_timeout_ms: 50,
                    fencing: "witness 10.0.0.3:7100".into(),
                    last_failover_ms: Some(12),
                    last_error: Some("primary went silent".into()),
                    ..FtStatus::default()
                }))))
            }
        }
        let r = handle("GET", "/api/v1/vm.ft-status", b"", &Protected);
        assert_eq!(r.status, 200);
        let v = body(&r);
        assert_eq!(v["role"], "backup");
        assert_eq!(v["health"], "waiting_for_primary");
        assert_eq!(v["peer"], "10.0.0.1:7000");
        assert_eq!(v["disk_mode"], "shared");
        assert_eq!(v["fencing"], "witness 10.0.0.3:7100");
        assert_eq!(v["last_failover_ms"], 12);
        assert_eq!(v["last_error"], "primary went silent");
    }

    #[test]
    fn ft_errors_of_the_control_loop_keep_their_status() {
        let (enable, receive, status, disable) = (
            "vm.enable-ft",
            "vm.receive-ft",
            "vm.ft-status",
            "vm.disable-ft",
        );
        // The errors the FT engine answers with, and the status each must become.
        let cases: [(&str, VmmError, u16); 6] = [
            (
                enable,
                VmmError::InvalidConfig("peer \"b\" is not HOST:PORT".into()),
                400,
            ),
            (enable, VmmError::VmNotCreated, 404),
            (
                enable,
                VmmError::InvalidState {
                    action: "enable fault tolerance for",
                    state: VmState::Paused,
                },
                405,
            ),
            (
                receive,
                VmmError::Failed {
                    action: "fault tolerance",
                    message: "not built into this VMM".into(),
                },
                500,
            ),
            (
                status,
                VmmError::Failed {
                    action: "fault tolerance",
                    message: "gone".into(),
                },
                500,
            ),
            (disable, VmmError::VmNotCreated, 404),
        ];
        struct Refuses(Mutex<Option<VmmError>>);
        impl Backend for Refuses {
            fn call(&self, _: VmmRequest) -> Result<VmmResult, SendError> {
                Ok(Err(self.0.lock().unwrap().take().unwrap()))
            }
        }
        for (name, error, expected) in cases {
            let message = error.to_string();
            let (_, method, _) = ENDPOINTS.iter().find(|e| e.0 == name).unwrap();
            let r = handle(
                method,
                &format!("/api/v1/{name}"),
                valid_body(name).as_bytes(),
                &Refuses(Mutex::new(Some(error))),
            );
            assert_eq!(r.status, expected, "{name}");
            assert_eq!(body(&r), serde_json::json!([message]));
        }
    }

    #[test]
    fn resize_bodies_as_cloud_hypervisor() {
        let fake = Fake::default();
        let put = |json: &str| handle("PUT", "/api/v1/vm.resize", json.as_bytes(), &fake);
        // The Fake has no VM: a well-formed body reaches it and gets its 404.
        for json in [
            r#"{"desired_vcpus": 2}"#,
            r#"{"desired_ram": 1073741824, "desired_balloon": 0}"#,
            r#"{"desired_balloon_size": 0}"#,
            "{}",
        ] {
            assert_eq!(put(json).status, 404, "{json}");
        }
        for (json, expected) in [
            ("", "vm.resize needs a VmResize JSON request body"),
            (r#"{"desired_vcpus": -1}"#, "invalid VmResize JSON"),
            (r#"{"desired_cpus": 2}"#, "unknown field `desired_cpus`"),
            (r#"{"desired_ram": "1G"}"#, "invalid type: string"),
        ] {
            let r = put(json);
            assert_eq!(r.status, 400, "{json}");
            let message = body(&r)[0].as_str().unwrap().to_string();
            assert!(message.contains(expected), "{json}: {message}");
        }
        let r = handle("GET", "/api/v1/vm.resize", b"", &fake);
        assert_eq!((r.status, r.allow), (405, Some("PUT")));
        assert_eq!(fake.seen.lock().unwrap().len(), 4);
    }

    #[test]
    fn statuses_and_bodies() {
        let fake = Fake::default();
        let r = handle("GET", "/api/v1/vmm.ping", b"", &fake);
        assert_eq!(r.status, 200);
        assert_eq!(body(&r)["version"], "v");
        let r = handle("GET", "/api/v1/vm.counters", b"", &fake);
        assert_eq!((r.status, body(&r)), (200, serde_json::json!({})));
        let r = handle("PUT", "/api/v1/vmm.shutdown", b"", &fake);
        assert_eq!((r.status, r.body), (204, None));
        let r = handle("PUT", "/api/v1/vm.pause", b"", &fake);
        assert_eq!(r.status, 405);
        assert_eq!(
            body(&r),
            serde_json::json!(["cannot pause a VM in state Created"])
        );
        let r = handle("GET", "/api/v1/vm.info", b"", &fake);
        assert_eq!(r.status, 404);
        assert_eq!(body(&r), serde_json::json!(["no VM has been created"]));
        let r = handle("PUT", "/api/v1/vm.boot", b"", &fake);
        assert_eq!(r.status, 500);
        let r = handle("GET", "/api/v1/vmm.ping", b"", &Gone);
        assert_eq!(r.status, 500);
        assert_eq!(
            body(&r),
            serde_json::json!(["the VMM control loop has stopped"])
        );
    }

    #[test]
    fn wrong_method_and_unknown_paths() {
        let fake = Fake::default();
        let r = handle("PUT", "/api/v1/vmm.ping", b"", &fake);
        assert_eq!((r.status, r.allow), (405, Some("GET")));
        let r = handle("POST", "/api/v1/vm.boot", b"", &fake);
        assert_eq!((r.status, r.allow), (405, Some("PUT")));
        for path in [
            "/",
            "/api/v1/",
            "/api/v1/vm.nope",
            "/api/v2/vmm.ping",
            "/vmm.ping",
        ] {
            assert_eq!(handle("GET", path, b"", &fake).status, 404, "{path}");
        }
        let r = handle("PUT", "/api/v1/vm.coredump", b"{}", &fake);
        assert_eq!(r.status, 404);
        assert!(body(&r)[0].as_str().unwrap().contains("not implemented"));
        assert!(fake.seen.lock().unwrap().is_empty());
    }

    #[test]
    fn create_rejects_bad_bodies_with_400_naming_the_problem() {
        let fake = Fake::default();
        let cases = [
            ("", "needs a VmConfig"),
            ("{", "invalid VmConfig JSON"),
            ("\"x\"", "invalid VmConfig JSON"),
            (r#"{"bogus": 1}"#, "unknown field `bogus`"),
            (
                r#"{"cpus": {"boot_vcpus": "x", "max_vcpus": 1}}"#,
                "invalid type",
            ),
            (
                r#"{"memory": {"size": 1024}, "payload": {"kernel": "/k"}}"#,
                "memory.size",
            ),
            (
                r#"{"cpus": {"boot_vcpus": 1, "max_vcpus": 1, "affinity": [{"vcpu": 0, "host_cpus": "0"}]}}"#,
                "invalid type: string \"0\", expected a sequence",
            ),
            (
                r#"{"cpus": {"boot_vcpus": 1, "max_vcpus": 1, "affinity": [{"vcpu": 3, "host_cpus": [0]}]}, "payload": {"kernel": "/k"}}"#,
                "cpus.affinity: vCPU 3 is not below max_vcpus (1)",
            ),
            ("{}", "payload.kernel"),
        ];
        for (json, expected) in cases {
            let r = handle("PUT", "/api/v1/vm.create", json.as_bytes(), &fake);
            assert_eq!(r.status, 400, "{json}");
            let message = body(&r)[0].as_str().unwrap().to_string();
            assert!(message.contains(expected), "{json}: {message}");
        }
        assert!(fake.seen.lock().unwrap().is_empty());
        let r = handle(
            "PUT",
            "/api/v1/vm.create",
            kernel_config().as_bytes(),
            &fake,
        );
        assert_eq!(r.status, 204);
    }
}
