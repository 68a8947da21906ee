//! Messages between the API thread and the control loop. The API thread turns an HTTP request
//! into a [`VmmRequest`], sends it with a reply channel through an [`ApiSender`], and turns the
//! [`VmmResponse`] or [`VmmError`] back into HTTP. Only the control loop touches the VM.

use std::collections::BTreeMap;
use std::sync::mpsc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::progress::{Operation, ProgressBoard, ProgressReport};

/// What the API (or ch-remote through it) asks the VMM to do.
#[derive(Debug)]
pub enum VmmRequest {
    /// `GET vmm.ping`
    Ping,
    /// `PUT vmm.shutdown`: stop the VM if any and exit the VMM process.
    ShutdownVmm,
    /// `PUT vm.create`
    CreateVm(Box<VmConfig>),
    /// `PUT vm.boot`
    BootVm,
    /// `GET vm.info`
    VmInfo,
    /// `PUT vm.resize`
    Resize(VmResizeRequest),
    /// `GET vm.counters`
    Counters,
    /// `PUT vm.pause`
    PauseVm,
    /// `PUT vm.resume`
    ResumeVm,
    /// `PUT vm.shutdown`
    ShutdownVm,
    /// `PUT vm.reboot`
    RebootVm,
    /// `PUT vm.delete`
    DeleteVm,
    /// `PUT vm.power-button`
    PowerButton,
    /// `PUT vm.snapshot`: write the paused VM's complete state to `destination_url`.
    Snapshot(SnapshotRequest),
    /// `PUT vm.restore`: create this VMM's VM from a snapshot (no VM may exist yet).
    Restore(RestoreRequest),
    /// `PUT vm.send-migration`: live-migrate the running VM to a receiving VMM.
    SendMigration(SendMigrationRequest),
    /// `PUT vm.receive-migration`: wait for an incoming migration (no VM may exist yet).
    ReceiveMigration(ReceiveMigrationRequest),
    /// Protect the running VM with a hot backup (`vm.enable-ft`).
    EnableFt(EnableFtRequest),
    /// Become the hot backup of a primary that will connect (`vm.receive-ft`).
    ReceiveFt(ReceiveFtRequest),
    FtStatus,
    /// Stop protecting the VM; the backup drops its copy (`vm.disable-ft`).
    DisableFt,
    /// How far the running (or last) `enable-ft` sync or `send-migration` is (`vm.progress`,
    /// Tandem's extension). Answered by the API thread itself while the control loop is busy.
    Progress,
    /// `PUT vm.add-disk`, `vm.add-net`, `vm.add-pmem`, `vm.add-fs`, `vm.add-vsock`: hot-plug
    /// a device onto the running VM's PCI bus (ACPI PCI hot-plug). Answers
    /// [`VmmResponse::DeviceAdded`]; before boot the device is only added to the
    /// configuration (as Cloud Hypervisor does) and the answer is 204.
    AddDevice(Box<HotplugRequest>),
    /// `PUT vm.remove-device`: ask the guest to eject a device; it leaves the bus and the
    /// configuration once the guest has let go of it.
    RemoveDevice(RemoveDeviceRequest),
}

/// A device to hot-plug, with its Cloud Hypervisor configuration.
#[derive(Debug)]
pub enum HotplugRequest {
    Disk(crate::config::DiskConfig),
    /// `fds`: TAP descriptors passed with the request (`SCM_RIGHTS` on the API socket); the
    /// configuration's `fds` member is ignored in their favour when any were passed.
    Net {
        config: crate::config::NetConfig,
        fds: Vec<std::os::fd::OwnedFd>,
    },
    Pmem(crate::config::PmemConfig),
    Fs(crate::config::FsConfig),
    Vsock(crate::config::VsockConfig),
}

impl HotplugRequest {
    /// The endpoint's name, for errors.
    pub fn endpoint(&self) -> &'static str {
        match self {
            HotplugRequest::Disk(_) => "vm.add-disk",
            HotplugRequest::Net { .. } => "vm.add-net",
            HotplugRequest::Pmem(_) => "vm.add-pmem",
            HotplugRequest::Fs(_) => "vm.add-fs",
            HotplugRequest::Vsock(_) => "vm.add-vsock",
        }
    }
}

/// `vm.remove-device` body (Cloud Hypervisor's `VmRemoveDevice`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveDeviceRequest {
    pub id: String,
}

/// The answer to a hot-plug (Cloud Hypervisor's `PciDeviceInfo`): the device's id and where
/// it sits, `0000:00:XX.0`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PciDeviceInfo {
    pub id: String,
    pub bdf: String,
}

/// `vm.snapshot` body (Cloud Hypervisor's `VmSnapshotConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// `file:///path/to/dir`
    pub destination_url: String,
}

/// `vm.resize` body (Cloud Hypervisor's `VmResize`): each member absent means "as it is".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmResizeRequest {
    #[serde(default)]
    pub desired_vcpus: Option<u32>,
    /// Guest RAM in bytes.
    #[serde(default)]
    pub desired_ram: Option<u64>,
    /// Balloon size in bytes (`desired_balloon_size` in some clients).
    #[serde(default, alias = "desired_balloon_size")]
    pub desired_balloon: Option<u64>,
}

/// `vm.restore` body (Cloud Hypervisor's `RestoreConfig`), also `--restore source_url=...`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// `file:///path/to/dir`
    pub source_url: String,
    #[serde(default)]
    pub prefault: bool,
    /// Resume the VM once restored (`--restore ...,resume=on`); the API leaves it paused.
    #[serde(default)]
    pub resume: bool,
}

/// `vm.send-migration` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMigrationRequest {
    /// `tcp:HOST:PORT` or `unix:/path`
    pub destination_url: String,
    /// Same-host migration with shared memory (not supported; must be false).
    #[serde(default)]
    pub local: bool,
    /// Target downtime: pre-copy iterates until the rest can be sent within this time.
    #[serde(default = "default_downtime_ms", alias = "downtime")]
    pub downtime_ms: u64,
    /// Mutual TLS credentials for this channel: a directory laid out like QEMU's x509
    /// credentials (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
    /// `client-key.pem`). Required over TCP unless `insecure_plaintext` says otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<std::path::PathBuf>,
    /// Plain TCP without authentication: anyone who reaches the port is trusted. Unsafe;
    /// only for a private, trusted network.
    #[serde(default, skip_serializing_if = "is_false")]
    pub insecure_plaintext: bool,
}

fn default_downtime_ms() -> u64 {
    300
}

/// `vm.receive-migration` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveMigrationRequest {
    /// `tcp:ADDR:PORT` (listen) or `unix:/path`
    pub receiver_url: String,
    /// This host's image for each disk of the arriving VM, in order (Tandem's extension: the
    /// source's paths are never opened here). Left out of the body when empty, so that the
    /// body stays Cloud Hypervisor's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk_paths: Vec<std::path::PathBuf>,
    /// This host's TAP for each network interface of the arriving VM, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taps: Vec<String>,
    /// Mutual TLS credentials for this channel: a directory laid out like QEMU's x509
    /// credentials (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
    /// `client-key.pem`). Required over TCP unless `insecure_plaintext` says otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<std::path::PathBuf>,
    /// Plain TCP without authentication: anyone who reaches the port is trusted. Unsafe;
    /// only for a private, trusted network.
    #[serde(default, skip_serializing_if = "is_false")]
    pub insecure_plaintext: bool,
}

/// VM lifecycle states, spelled as Cloud Hypervisor's `VmInfo.state`.
/// How the disks of a protected VM are kept consistent on the backup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FtDiskMode {
    /// Each host has its own image: the primary writes at once and ships each epoch's writes,
    /// the backup applies them when the epoch commits. No added write latency.
    #[default]
    Replicated,
    /// One image both hosts reach: the primary holds an epoch's writes until the backup has the
    /// epoch; the backup re-issues the writes of unreleased epochs at failover.
    Shared,
}

/// The epoch length when `vm.enable-ft` does not give one.
pub const DEFAULT_EPOCH_MS: u64 = 10;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnableFtRequest {
    /// The backup's replication address, `HOST:PORT` (or `tcp:HOST:PORT`).
    pub peer: String,
    #[serde(default = "default_epoch_ms")]
    pub epoch_ms: u64,
    #[serde(default)]
    pub disk_mode: FtDiskMode,
    /// Missed-heartbeat timeout on both sides; default: five epochs, at least 100 ms.
    #[serde(default)]
    pub heartbeat_timeout_ms: Option<u64>,
    /// The fencing witness `HOST:PORT` both hosts ask before taking over or going on alone.
    /// Without one a partitioned pair can run twice (the status says `fencing: none`).
    #[serde(default)]
    pub witness: Option<String>,
    /// Fencing on etcd instead of the witness: `etcd://HOST:PORT[,HOST:PORT...]`, reached
    /// with the credentials of `tls_dir`. The primary holds a lease-bound key per pair and
    /// releases output only while its lease is provably alive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing: Option<String>,
    /// LZ4-compress dirty pages on the wire (after the delta encoding). Off by default: LZ4
    /// pays only on a replication link slower than the sender can compress (about 1 GbE);
    /// on a faster link it costs the sender and the backup more CPU than it saves, and an
    /// epoch takes longer to send (`ci/bench-ft`: 1000 pages/epoch sent in 11 ms with LZ4,
    /// 7 ms without, the pause p50 4.9 -> 1.3 ms).
    #[serde(default)]
    pub compress: bool,
    /// Keep the pages the guest rewrites epoch after epoch writable and compare them at each
    /// checkpoint instead of taking a write fault per page per epoch (needs KVM's manual
    /// dirty-log re-arming; without it every page is write-protected as before).
    #[serde(default = "default_true")]
    pub hot_pages: bool,
    /// Share each checkpoint's staging work (the hot pages' compares, the copy of the dirty
    /// pages) with a helper thread on the paused vCPU's otherwise idle core; `false` does it
    /// on the control loop alone (a host whose cores are all busy with other work).
    #[serde(default = "default_true")]
    pub stage_helper: bool,
    /// Copy most of an epoch's dirty pages into the staging memory while the guest still runs
    /// (three quarters into the epoch, once the previous epoch has left staging), so that the
    /// pause copies only the pages written after that; `false` copies every page in the pause.
    #[serde(default = "default_true")]
    pub early_staging: bool,
    /// With early staging, send the pages it copied at once, while the guest still runs, so
    /// that the epoch's commit waits only for the pages written after them; `false` sends
    /// them with the rest in the pause. Members of an FT group always send in the pause.
    #[serde(default = "default_true")]
    pub early_send: bool,
    /// TCP at full speed: mirror the frames the guest receives to the backup as they arrive
    /// and let the guest's pure TCP ACKs leave once the backup holds the input they
    /// acknowledge, instead of at the end of their epoch (the backup delivers that input
    /// again after a failover).
    #[serde(default = "default_true")]
    pub early_acks: bool,
    /// Copy each epoch's still-held network output to the backup, which sends it again if it
    /// takes over from that epoch (the primary may have died holding it, while the restored
    /// guest counts it as sent). `false` saves those replication bytes; such output then
    /// comes back only with the guest's TCP retransmission.
    #[serde(default = "default_true")]
    pub resend_output: bool,
    /// Latency mode: end an epoch early (after at least a millisecond) once the guest has
    /// output waiting for it, as long as the last epoch took at most a quarter of an epoch to
    /// send; more, shorter checkpoints for less waiting output.
    #[serde(default)]
    pub latency_mode: bool,
    /// Threads that encode each epoch's pages (read the staging copy, diff, compress,
    /// checksum) while the sender thread writes; 0 encodes on the sender thread. Default:
    /// the host's cores less one per vCPU and one for the sender, at most 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encode_threads: Option<u32>,
    /// TCP connections to the backup (1 ..= 8, default 1). With more than one, each epoch's
    /// page frames travel on the others, each with a thread of its own that encodes and
    /// writes them (in place of `encode_threads`), as QEMU's multifd channels do: for a link
    /// whose one stream, or one core of TLS, is slower than the epochs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<u32>,
    /// Fate sharing: the Unix socket path that names a group of VMs on this host. Members
    /// checkpoint on common epochs, frames between them are not held, and if any member's
    /// primary fails they all fail over to the same epoch. The first member creates the group
    /// (its epoch length and heartbeat timeout are the group's).
    #[serde(default)]
    pub group: Option<String>,
    /// Mutual TLS credentials for this channel: a directory laid out like QEMU's x509
    /// credentials (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
    /// `client-key.pem`). Required over TCP unless `insecure_plaintext` says otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<std::path::PathBuf>,
    /// Plain TCP without authentication: anyone who reaches the port is trusted. Unsafe;
    /// only for a private, trusted network.
    #[serde(default, skip_serializing_if = "is_false")]
    pub insecure_plaintext: bool,
}

fn default_epoch_ms() -> u64 {
    DEFAULT_EPOCH_MS
}

fn is_false(value: &bool) -> bool {
    !*value
}

fn default_true() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveFtRequest {
    /// Where to wait for the primary: `tcp:HOST:PORT`.
    pub receiver_url: String,
    /// Replicated disk mode: this host's copy of each disk, in the order of the VM's `disks`
    /// (each must start identical to the primary's image). Ignored in shared mode.
    #[serde(default)]
    pub disk_paths: Vec<std::path::PathBuf>,
    /// This host's TAP for each network interface of the VM, in order (existing TAPs: the
    /// peer's TAP names are never used here).
    #[serde(default)]
    pub taps: Vec<String>,
    /// Overrides the witness address the primary announces (when this host reaches it under
    /// another address).
    #[serde(default)]
    pub witness: Option<String>,
    /// Fencing on etcd (`etcd://HOST:PORT[,...]`, as this host reaches it); required when the
    /// primary fences on etcd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing: Option<String>,
    /// The backups of one FT group name the same Unix socket path on their host, so that they
    /// agree on the epoch they all resume from.
    #[serde(default)]
    pub group: Option<String>,
    /// Mutual TLS credentials for this channel: a directory laid out like QEMU's x509
    /// credentials (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
    /// `client-key.pem`). Required over TCP unless `insecure_plaintext` says otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<std::path::PathBuf>,
    /// Plain TCP without authentication: anyone who reaches the port is trusted. Unsafe;
    /// only for a private, trusted network.
    #[serde(default, skip_serializing_if = "is_false")]
    pub insecure_plaintext: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FtRole {
    #[default]
    None,
    Primary,
    Backup,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FtHealth {
    /// Not protected and not protecting anything.
    #[default]
    Off,
    /// Primary: initial synchronisation running.
    Syncing,
    /// Primary with a live backup acknowledging epochs; backup receiving them.
    Protected,
    /// Backup: listening for a primary.
    WaitingForPrimary,
    /// Primary running unprotected after losing its backup (a new one can be attached).
    Degraded,
    /// This host lost the witness's vote: its copy is stopped and must not run.
    Fenced,
    /// Backup that took over: the VM runs here now, unprotected.
    TookOver,
    /// Backup that stopped receiving without taking over (see `last_error`).
    Failed,
}

/// `GET vm.ft-status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FtStatus {
    pub role: FtRole,
    pub health: FtHealth,
    pub peer: Option<String>,
    pub disk_mode: Option<FtDiskMode>,
    pub epoch_ms: u64,
    pub heartbeat_timeout_ms: u64,
    /// `witness HOST:PORT` or `none`.
    pub fencing: String,
    /// Primary: the epoch now running; backup: the last epoch received completely.
    pub epoch: u64,
    pub last_committed_epoch: u64,
    /// Epochs checkpointed but not yet acknowledged by the backup.
    pub lag_epochs: u64,
    pub bytes: u64,
    pub dirty_pages: u64,
    /// Primary: how long the guest stood still per checkpoint (the pause asked for to its last
    /// vCPU running again): the latest, and p50/p99/max of the recent epochs.
    pub pause_us_last: u64,
    pub pause_us_p50: u64,
    pub pause_us_p99: u64,
    pub pause_us_max: u64,
    /// Primary: how long the sender took per epoch (pages, disk writes, state), p50/p99 of
    /// the recent epochs.
    #[serde(default)]
    pub send_us_p50: u64,
    #[serde(default)]
    pub send_us_p99: u64,
    /// Primary: output commit delay, from an epoch's checkpoint to the backup's Ack that
    /// released its held output, p50/p99 of the recent epochs.
    #[serde(default)]
    pub commit_us_p50: u64,
    #[serde(default)]
    pub commit_us_p99: u64,
    /// Primary: how long an input frame waited, from its delivery to the guest to the backup
    /// acknowledging it (what an early ACK of it waited), p50/p99 of the recent frames.
    #[serde(default)]
    pub input_mirror_us_p50: u64,
    #[serde(default)]
    pub input_mirror_us_p99: u64,
    /// Epochs cut short because their dirty set would take too long to send, or held (the
    /// guest paused) until the previous epoch was sent.
    pub epochs_cut_early: u64,
    /// Primary in latency mode: epochs ended early because output waited.
    #[serde(default)]
    pub epochs_cut_for_output: u64,
    /// Primary: threads encoding epochs beside the sender (0: the sender encodes).
    #[serde(default)]
    pub encode_threads: u64,
    /// TCP connections between primary and backup (1 unless `streams` asked for more).
    #[serde(default)]
    pub streams: u64,
    /// Primary: dirty pages copied into the staging memory while the guest ran (early
    /// staging), not in a pause, since protection started.
    #[serde(default)]
    pub pages_staged_early: u64,
    /// Primary: of those, pages sent to the backup while the guest ran (early sending).
    #[serde(default)]
    pub pages_sent_early: u64,
    /// Primary: pages staged early that the early sending left to the pause, because they
    /// were written again before the last pause (sent early they would go twice).
    #[serde(default)]
    pub pages_held_for_pause: u64,
    /// Primary: pages now kept writable (hot pages) and compared at each checkpoint.
    #[serde(default)]
    pub hot_pages: u64,
    /// Primary: changes those compares found, each a write fault the guest did not take.
    #[serde(default)]
    pub hot_page_hits: u64,
    /// Primary: page faults KVM handled for the guest's vCPUs since protection started; with
    /// dirty logging on, nearly all are first writes to write-protected pages, what dirty
    /// tracking costs the guest (hot pages save some). None: this kernel does not count them.
    #[serde(default)]
    pub kvm_page_faults: Option<u64>,
    pub held_packets: u64,
    pub released_packets: u64,
    /// Primary: frames the NICs delivered to the guest that were mirrored to the backup.
    #[serde(default)]
    pub input_frames_mirrored: u64,
    /// Primary: dirty pages sent as mirrored input frames laid over the backup's copy (a
    /// receive buffer's page, whose bytes the backup already holds as input).
    #[serde(default)]
    pub pages_from_input: u64,
    /// Primary: the guest's pure TCP ACKs released before their epoch committed (the
    /// backup held every input frame they acknowledge).
    #[serde(default)]
    pub acks_released_early: u64,
    /// Backup after a takeover: input frames delivered again to the restored guest.
    #[serde(default)]
    pub input_frames_replayed: u64,
    /// Primary: frames the NICs still held when their epoch ended, copied to the backup.
    #[serde(default)]
    pub output_frames_mirrored: u64,
    /// Backup after a takeover: held frames of the resumed epochs it sent on the NICs again
    /// (the primary may have died before releasing them).
    #[serde(default)]
    pub output_frames_resent: u64,
    pub held_disk_writes: u64,
    pub failovers: u64,
    pub last_failover_ms: Option<u64>,
    pub last_error: Option<String>,
    /// The FT group's socket path, for a member of one.
    pub group: Option<String>,
    /// Group members now protected (this one included).
    pub group_members: u64,
    /// Primary: the group epoch now running; backup: the newest group epoch held completely
    /// (after a failover: the one every member resumed from).
    pub group_epoch: u64,
    /// Health `syncing`: how far the initial synchronisation is (else null).
    #[serde(default)]
    pub sync: Option<ProgressReport>,
}

impl FtStatus {
    /// The numeric part of the status, as `vm.counters` reports it under `ft`.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        let mut c = BTreeMap::new();
        let mut put = |name: &str, value: u64| {
            c.insert(name.to_string(), value);
        };
        put("epoch", self.epoch);
        put("last_committed_epoch", self.last_committed_epoch);
        put("lag_epochs", self.lag_epochs);
        put("bytes", self.bytes);
        put("dirty_pages", self.dirty_pages);
        put("pause_us_last", self.pause_us_last);
        put("pause_us_p50", self.pause_us_p50);
        put("pause_us_p99", self.pause_us_p99);
        put("pause_us_max", self.pause_us_max);
        put("send_us_p50", self.send_us_p50);
        put("send_us_p99", self.send_us_p99);
        put("commit_us_p50", self.commit_us_p50);
        put("commit_us_p99", self.commit_us_p99);
        put("epochs_cut_early", self.epochs_cut_early);
        put("epochs_cut_for_output", self.epochs_cut_for_output);
        put("pages_staged_early", self.pages_staged_early);
        put("pages_sent_early", self.pages_sent_early);
        put("pages_held_for_pause", self.pages_held_for_pause);
        put("hot_pages", self.hot_pages);
        put("hot_page_hits", self.hot_page_hits);
        if let Some(faults) = self.kvm_page_faults {
            put("kvm_page_faults", faults);
        }
        put("held_packets", self.held_packets);
        put("released_packets", self.released_packets);
        put("input_frames_mirrored", self.input_frames_mirrored);
        put("input_mirror_us_p50", self.input_mirror_us_p50);
        put("input_mirror_us_p99", self.input_mirror_us_p99);
        put("pages_from_input", self.pages_from_input);
        put("acks_released_early", self.acks_released_early);
        put("input_frames_replayed", self.input_frames_replayed);
        put("output_frames_mirrored", self.output_frames_mirrored);
        put("output_frames_resent", self.output_frames_resent);
        put("held_disk_writes", self.held_disk_writes);
        put("failovers", self.failovers);
        if let Some(ms) = self.last_failover_ms {
            put("last_failover_ms", ms);
        }
        put("protected", u64::from(self.health == FtHealth::Protected));
        if self.group.is_some() {
            put("group_members", self.group_members);
            put("group_epoch", self.group_epoch);
        }
        c
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Created,
    Running,
    Shutdown,
    Paused,
    BreakPoint,
}

/// The Cloud Hypervisor release whose API and command line Tandem follows. Tools that key
/// behaviour to Cloud Hypervisor's version (libvirt parses `cloud-hypervisor --version`,
/// API clients read `vmm.ping`'s `version`) get this one; Tandem's own version follows it.
pub const CLOUD_HYPERVISOR_VERSION: &str = "53.0.0";

/// Tandem's own version.
pub const TANDEM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// `v<Cloud Hypervisor version> (tandem <version>)`: what `--version` prints after the
/// program name, and `vmm.ping`'s `build_version`.
pub fn build_version() -> String {
    format!("v{CLOUD_HYPERVISOR_VERSION} (tandem {TANDEM_VERSION})")
}

/// `GET vmm.ping` body (Cloud Hypervisor's `VmmPingResponse`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmPingResponse {
    pub build_version: String,
    pub version: String,
    pub pid: i64,
    pub features: Vec<String>,
}

impl VmmPingResponse {
    /// This VMM's answer: Cloud Hypervisor's version shape (`version` without a `v`), our
    /// own version in `build_version`.
    pub fn current(features: Vec<String>) -> Self {
        Self {
            build_version: build_version(),
            version: CLOUD_HYPERVISOR_VERSION.to_string(),
            pid: i64::from(std::process::id()),
            features,
        }
    }
}

/// `GET vm.info` body (Cloud Hypervisor's `VmInfo`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmInfoResponse {
    pub config: VmConfig,
    pub state: VmState,
    /// Bytes of guest RAM.
    pub memory_actual_size: u64,
    /// The VM's devices once it has been booted (absent before, as in Cloud Hypervisor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_tree: Option<DeviceTree>,
}

/// `vm.info`'s `device_tree`: device id -> node.
pub type DeviceTree = BTreeMap<String, DeviceNode>;

/// One node of the device tree, in Cloud Hypervisor's shape: a virtio device (`_disk0`) is
/// the child of its PCI transport (`_virtio-pci-_disk0`), which holds the BDF and the BAR.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceNode {
    pub id: String,
    pub resources: Vec<DeviceResource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub children: Vec<String>,
    /// `segment:bus:device.function`, e.g. `0000:00:01.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_bdf: Option<String>,
}

/// A resource a device node holds, spelled as Cloud Hypervisor serializes its `Resource`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceResource {
    PciBar {
        index: usize,
        base: u64,
        size: u64,
        type_: PciBarType,
        prefetchable: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PciBarType {
    Io,
    Mmio32,
    Mmio64,
}

/// The prefix of a virtio device's PCI transport node, as in Cloud Hypervisor.
pub const VIRTIO_PCI_NODE_PREFIX: &str = "_virtio-pci";

/// `00:NN.0` on segment 0 for PCI device number `device`.
pub fn pci_bdf(device: u8) -> String {
    format!("0000:00:{device:02x}.0")
}

/// `GET vm.counters` body: device id -> counter name -> value.
pub type VmCounters = BTreeMap<String, BTreeMap<String, u64>>;

/// A successful answer from the control loop.
#[derive(Debug, PartialEq)]
pub enum VmmResponse {
    /// 204 No Content.
    Empty,
    Ping(VmmPingResponse),
    VmInfo(Box<VmInfoResponse>),
    Counters(VmCounters),
    FtStatus(Box<FtStatus>),
    Progress(Box<ProgressReport>),
    /// 200 with a `PciDeviceInfo` body.
    DeviceAdded(PciDeviceInfo),
}

/// How an error maps onto HTTP (the API layer picks the status code from this).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400: the request itself is wrong.
    BadRequest,
    /// 404: there is no VM (not created yet, or deleted).
    NotFound,
    /// 405: the action is not allowed in the VM's current state.
    WrongState,
    /// 500: the action was allowed but failed.
    Internal,
}

/// Why the control loop refused or failed a request. Messages are one line.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("no VM has been created")]
    VmNotCreated,
    #[error("a VM has already been created")]
    VmAlreadyCreated,
    #[error("cannot {action} a VM in state {state:?}")]
    InvalidState {
        action: &'static str,
        state: VmState,
    },
    #[error("invalid VM configuration: {0}")]
    InvalidConfig(String),
    #[error("{action} failed: {message}")]
    Failed {
        action: &'static str,
        message: String,
    },
    /// Something asked about does not exist (404), other than the VM itself.
    #[error("{0}")]
    NotFound(String),
    /// This copy of the VM lost a fencing decision: its backup runs the VM now.
    #[error(
        "this copy of the VM was fenced ({0}); its backup runs the VM, and booting it here would run a second copy on the same disks (vm.delete it, then create it anew to start over)"
    )]
    Fenced(String),
}

impl VmmError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            VmmError::VmNotCreated | VmmError::NotFound(_) => ErrorKind::NotFound,
            VmmError::VmAlreadyCreated | VmmError::InvalidConfig(_) => ErrorKind::BadRequest,
            VmmError::InvalidState { .. } | VmmError::Fenced(_) => ErrorKind::WrongState,
            VmmError::Failed { .. } => ErrorKind::Internal,
        }
    }
}

pub type VmmResult = Result<VmmResponse, VmmError>;

/// One request in flight: what to do and where to send the answer.
pub struct ApiMessage {
    pub request: VmmRequest,
    pub reply: mpsc::Sender<VmmResult>,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("the VMM control loop has stopped")]
    ControlLoopGone,
    #[error("cannot wake the VMM control loop: {0}")]
    Wake(std::io::Error),
}

/// The API thread's handle on the control loop: a channel plus an eventfd that wakes the
/// loop's epoll (a channel alone cannot be waited on with epoll).
#[derive(Clone)]
pub struct ApiSender {
    sender: mpsc::Sender<ApiMessage>,
    wake: std::sync::Arc<EventFd>,
    progress: Option<std::sync::Arc<ProgressBoard>>,
}

/// `vm.progress` from `board`: the running or last transfer, else 404.
pub fn progress_response(board: &ProgressBoard) -> VmmResult {
    match board.current() {
        Some(progress) => Ok(VmmResponse::Progress(Box::new(progress.report()))),
        None => Err(VmmError::NotFound(
            "no enable-ft or send-migration has run on this VMM".into(),
        )),
    }
}

impl ApiSender {
    pub fn new(sender: mpsc::Sender<ApiMessage>, wake: std::sync::Arc<EventFd>) -> Self {
        Self {
            sender,
            wake,
            progress: None,
        }
    }

    /// Answers `vm.progress`, and `vm.ft-status` during an initial sync, from `board` on the
    /// calling thread: the control loop is busy with the transfer then.
    pub fn with_progress(mut self, board: std::sync::Arc<ProgressBoard>) -> Self {
        self.progress = Some(board);
        self
    }

    /// Sends `request` and waits for the control loop's answer.
    pub fn call(&self, request: VmmRequest) -> Result<VmmResult, SendError> {
        if let Some(board) = &self.progress {
            match request {
                VmmRequest::Progress => return Ok(progress_response(board)),
                VmmRequest::FtStatus => {
                    if let Some(sync) = board.running(Operation::EnableFt) {
                        return Ok(Ok(VmmResponse::FtStatus(Box::new(FtStatus {
                            role: FtRole::Primary,
                            health: FtHealth::Syncing,
                            sync: Some(sync.report()),
                            ..FtStatus::default()
                        }))));
                    }
                }
                _ => {}
            }
        }
        let (reply, answer) = mpsc::channel();
        self.sender
            .send(ApiMessage { request, reply })
            .map_err(|_| SendError::ControlLoopGone)?;
        self.wake.write(1).map_err(SendError::Wake)?;
        answer.recv().map_err(|_| SendError::ControlLoopGone)
    }
}
