//! A VM configuration that arrives from a peer (an FT primary, a migration source) names
//! resources of the peer's host: image paths, TAP names, console files. The receiving side
//! never opens, creates or truncates what a peer names; its own operator names them
//! (`receive-ft` / `receive-migration` arguments), and the peer's configuration only says
//! what the VM needs (how many disks and NICs, its MACs, memory, vCPUs).

use std::path::PathBuf;

use super::{ConsoleOutputMode, RngConfig, VmConfig};

/// What this host's operator gives for a VM arriving from a peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostResources {
    /// One image per disk of the VM, in order.
    pub disk_paths: Vec<PathBuf>,
    /// One existing TAP per network interface of the VM, in order.
    pub taps: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LocalizeError {
    #[error(
        "the VM has {vm} disk(s) and this host named {named} image(s): give one per disk, in \
         order (a peer's image paths are never opened here)"
    )]
    DiskCount { vm: usize, named: usize },
    #[error(
        "the VM has {vm} network interface(s) and this host named {named} TAP(s): give one per \
         interface, in order (a peer's TAP names are never used here)"
    )]
    TapCount { vm: usize, named: usize },
    #[error("network interface {0} is a vhost-user device, whose socket this host does not take from its peer")]
    VhostUser(usize),
}

impl VmConfig {
    /// The peer's configuration with this host's resources in place of the peer's: image
    /// paths and TAP names from `local`, no host-side TAP addresses (the operator's TAPs are
    /// set up already), console or serial files and sockets replaced by `null` (output to a
    /// path a peer chose could truncate any file here; a `pty` console gets a new pty here),
    /// and the entropy source is this host's default (a peer's path could name any file).
    pub fn localize(mut self, local: &HostResources) -> Result<VmConfig, LocalizeError> {
        let disks = self.disks.as_deref().map_or(0, <[_]>::len);
        if disks != local.disk_paths.len() {
            return Err(LocalizeError::DiskCount {
                vm: disks,
                named: local.disk_paths.len(),
            });
        }
        for (disk, path) in self.disks.iter_mut().flatten().zip(&local.disk_paths) {
            disk.path = Some(path.clone());
        }
        let nets = self.net.as_deref().map_or(0, <[_]>::len);
        if nets != local.taps.len() {
            return Err(LocalizeError::TapCount {
                vm: nets,
                named: local.taps.len(),
            });
        }
        for (index, (net, tap)) in self.net.iter_mut().flatten().zip(&local.taps).enumerate() {
            if net.vhost_user || net.vhost_socket.is_some() {
                return Err(LocalizeError::VhostUser(index));
            }
            net.tap = Some(tap.clone());
            net.ip = None;
            net.mask = None;
            // `fds` are descriptor numbers of the peer's VMM process (inherited with
            // `--net fd=N` or passed with `vm.add-net`): here they name nothing, or some
            // unrelated file of this process. The rule: a descriptor is used only by the
            // process it was given to; everywhere else the NIC is the operator's named TAP.
            net.fds = None;
        }
        for console in [&mut self.serial, &mut self.console] {
            if matches!(
                console.mode,
                ConsoleOutputMode::File | ConsoleOutputMode::Socket
            ) || console.file.is_some()
                || console.socket.is_some()
            {
                log::warn!(
                    "the peer's {:?} console output is not opened here; it goes to null",
                    console.mode
                );
                console.mode = ConsoleOutputMode::Null;
                console.file = None;
                console.socket = None;
            }
        }
        let default_rng = RngConfig::default();
        if self.rng.src != default_rng.src {
            log::warn!(
                "the peer's entropy source {} is not opened here; {} is used",
                self.rng.src.display(),
                default_rng.src.display()
            );
        }
        // Only the source is a file of the peer's host; where the device sits (a pinned
        // `pci_device_id`) is what the guest saw and must stay.
        self.rng = RngConfig {
            src: default_rng.src,
            ..self.rng
        };
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer_config() -> VmConfig {
        serde_json::from_value(serde_json::json!({
            "memory": {"size": 33554432},
            "serial": {"mode": "File", "file": "/etc/passwd"},
            "console": {"mode": "Socket", "socket": "/run/other.sock"},
            "rng": {"src": "/etc/shadow"},
            "disks": [{"path": "/etc/shadow"}, {"path": "/var/lib/other-vm.img"}],
            "net": [{"tap": "other-vm-tap", "ip": "10.9.9.1", "mask": "255.255.255.0",
                     "mac": "12:34:56:78:9a:bc"},
                    {"fds": [7], "mac": "12:34:56:78:9a:bd"}],
        }))
        .unwrap()
    }

    #[test]
    fn nothing_the_peer_names_survives() {
        let local = HostResources {
            disk_paths: vec!["/srv/a.img".into(), "/srv/b.img".into()],
            taps: vec!["tap-b".into(), "tap-c".into()],
        };
        let config = peer_config().localize(&local).unwrap();
        let disks: Vec<_> = config
            .disks
            .iter()
            .flatten()
            .map(|d| d.path.clone())
            .collect();
        assert_eq!(
            disks,
            [Some("/srv/a.img".into()), Some("/srv/b.img".into())]
        );
        let net = &config.net.as_ref().unwrap()[0];
        assert_eq!(net.tap.as_deref(), Some("tap-b"));
        assert_eq!((net.ip, net.mask), (None, None));
        // The peer's descriptor number is dropped: the NIC is this host's named TAP.
        let passed = &config.net.as_ref().unwrap()[1];
        assert_eq!(
            (passed.tap.as_deref(), passed.fds.as_ref()),
            (Some("tap-c"), None)
        );
        passed.validate().unwrap();
        assert_eq!(
            net.mac.as_deref(),
            Some("12:34:56:78:9a:bc"),
            "the guest's MAC stays"
        );
        assert_eq!(config.serial.mode, ConsoleOutputMode::Null);
        assert_eq!(config.serial.file, None);
        assert_eq!(config.console.mode, ConsoleOutputMode::Null);
        assert_eq!(config.console.socket, None);
        assert_eq!(config.rng, RngConfig::default());
    }

    #[test]
    fn pinned_places_stay() {
        let mut peer = peer_config();
        peer.rng.pci_device_id = Some(4);
        if let Some(disks) = peer.disks.as_mut() {
            disks[1].pci_device_id = Some(5);
        }
        let local = HostResources {
            disk_paths: vec!["/a".into(), "/b".into()],
            taps: vec!["t".into(), "u".into()],
        };
        let config = peer.localize(&local).unwrap();
        assert_eq!(config.rng.pci_device_id, Some(4));
        assert_eq!(config.rng.src, RngConfig::default().src);
        assert_eq!(config.disks.unwrap()[1].pci_device_id, Some(5));
    }

    #[test]
    fn a_pty_console_stays_a_pty_of_this_host() {
        let mut peer = peer_config();
        peer.console = crate::config::ConsoleConfig::with_mode(ConsoleOutputMode::Pty);
        let local = HostResources {
            disk_paths: vec!["/a".into(), "/b".into()],
            taps: vec!["t".into(), "u".into()],
        };
        let config = peer.localize(&local).unwrap();
        assert_eq!(config.console.mode, ConsoleOutputMode::Pty);
        assert_eq!(config.console.file, None);
    }

    #[test]
    fn counts_must_match() {
        let err = peer_config()
            .localize(&HostResources::default())
            .unwrap_err();
        assert_eq!(err, LocalizeError::DiskCount { vm: 2, named: 0 });
        let local = HostResources {
            disk_paths: vec!["/a".into(), "/b".into()],
            taps: Vec::new(),
        };
        let err = peer_config().localize(&local).unwrap_err();
        assert_eq!(err, LocalizeError::TapCount { vm: 2, named: 0 });
    }
}
