//! TAP tests. Each one that touches the kernel runs in a thread that first moves into a fresh
//! network namespace, so no interface, address or frame ever reaches the host's network. They
//! need root (CAP_NET_ADMIN/CAP_SYS_ADMIN) and /dev/net/tun; without them they say loudly that
//! they did not run.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use devices::tap::{Tap, TapError};

mod common;
use common::in_netns;

#[test]
fn create_sets_address_netmask_mtu_and_up() {
    in_netns("create_sets_address_netmask_mtu_and_up", || {
        let tap = Tap::create().expect("create");
        assert!(tap.name().starts_with("vmtap"), "{}", tap.name());
        assert!(
            tap.name()["vmtap".len()..].parse::<u32>().is_ok(),
            "{}",
            tap.name()
        );
        tap.set_ip_addr(Ipv4Addr::new(10, 11, 12, 1)).expect("ip");
        tap.set_netmask(Ipv4Addr::new(255, 255, 255, 0))
            .expect("mask");
        tap.set_mtu(1400).expect("mtu");
        assert!(!tap.is_up().expect("flags"));
        tap.enable().expect("up");
        assert!(tap.is_up().expect("flags"));
        assert_eq!(tap.ip_addr().expect("ip"), Ipv4Addr::new(10, 11, 12, 1));
        assert_eq!(
            tap.netmask().expect("mask"),
            Ipv4Addr::new(255, 255, 255, 0)
        );
        assert_eq!(tap.mtu().expect("mtu"), 1400);
        assert!(tap.if_index().expect("index") > 1);

        // A second anonymous TAP gets its own number.
        let other = Tap::create().expect("create");
        assert_ne!(other.name(), tap.name());
    });
}

#[test]
fn named_tap_is_created_or_attached() {
    in_netns("named_tap_is_created_or_attached", || {
        // Does not exist yet: created (CH's "use or create").
        let tap = Tap::open_named("tnd0").expect("create by name");
        assert_eq!(tap.name(), "tnd0");
        let index = tap.if_index().expect("index");

        // Make it outlive this fd, as `ip tuntap add` does, then attach to the existing one.
        // SAFETY: TUNSETPERSIST takes an integer argument by value on the tun fd.
        let ret = unsafe {
            libc::ioctl(
                tap.as_raw_fd(),
                libc::TUNSETPERSIST as _,
                1 as libc::c_ulong,
            )
        };
        assert_eq!(ret, 0, "TUNSETPERSIST: {}", std::io::Error::last_os_error());
        drop(tap);

        let again = Tap::open_named("tnd0").expect("attach existing");
        assert_eq!(again.name(), "tnd0");
        assert_eq!(
            again.if_index().expect("index"),
            index,
            "not the same interface"
        );
        again.set_mtu(9000).expect("jumbo MTU");
        assert_eq!(again.mtu().expect("mtu"), 9000);
    });
}

#[test]
fn busy_and_non_tap_names_give_clear_errors() {
    in_netns("busy_and_non_tap_names_give_clear_errors", || {
        let _held = Tap::open_named("tnd1").expect("create");
        let err = Tap::open_named("tnd1").expect_err("second attach must fail");
        assert!(matches!(err, TapError::Busy(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            "TAP tnd1 is busy: another process is attached to it"
        );

        // The loopback exists in every namespace and is not a TAP.
        let err = Tap::open_named("lo").expect_err("lo is not a TAP");
        assert!(matches!(err, TapError::NotATap(_)), "{err:?}");
        assert!(err.to_string().starts_with("lo "), "{err}");
    });
}

#[test]
fn invalid_configuration_is_rejected() {
    in_netns("invalid_configuration_is_rejected", || {
        let tap = Tap::create().expect("create");
        let err = tap.set_mtu(10).expect_err("MTU below the Ethernet minimum");
        assert!(matches!(err, TapError::Mtu { mtu: 10, .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(tap.name()) && msg.contains("cannot set MTU 10"),
            "{msg}"
        );

        let err = tap
            .set_netmask(Ipv4Addr::new(255, 0, 255, 0))
            .expect_err("non-contiguous netmask");
        assert!(
            err.to_string().contains("invalid netmask 255.0.255.0"),
            "{err}"
        );
    });
}

#[test]
fn frames_are_readable_non_blocking_with_a_vnet_header() {
    in_netns(
        "frames_are_readable_non_blocking_with_a_vnet_header",
        || {
            let tap = Tap::create().expect("create");
            let mut buf = [0u8; 2048];
            let err = tap.read(&mut buf).expect_err("nothing queued");
            assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);

            // A frame written to the TAP (header + broadcast Ethernet frame) is accepted whole.
            let mut frame = vec![0u8; devices::tap::VNET_HDR_LEN];
            frame.extend_from_slice(&[0xff; 6]);
            frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
            frame.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
            frame.extend_from_slice(&[0u8; 46]);
            tap.enable().expect("up");
            assert_eq!(tap.write(&frame).expect("write"), frame.len());
        },
    );
}

#[test]
fn names_too_long_are_refused_before_any_syscall() {
    // Needs no privileges: the name is checked first.
    let err = Tap::open_named("averyverylongtapname").expect_err("too long");
    assert!(matches!(err, TapError::InvalidName { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("\"averyverylongtapname\"") && msg.contains("15 bytes"),
        "{msg}"
    );
    let err = Tap::open_named("bad/name").expect_err("slash");
    assert!(err.to_string().contains("invalid TAP name"), "{err}");
}

// ---- TAPs passed as descriptors (`--net fd=N`, `vm.add-net` with SCM_RIGHTS) ----------------

/// `/dev/net/tun` opened the way another program would (blocking), attached to `name` with
/// `flags` (`IFF_*`).
fn tun_fd(name: &str, flags: libc::c_int) -> std::os::fd::OwnedFd {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    // SAFETY: an all-zero ifreq is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq, which lives across the call.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut ifr) };
    assert_eq!(ret, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    file.into()
}

fn status_flags(fd: &impl AsRawFd) -> libc::c_int {
    // SAFETY: F_GETFL on an open descriptor.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) }
}

#[test]
fn a_passed_tap_descriptor_is_set_up_like_a_named_tap() {
    in_netns("a_passed_tap_descriptor_is_set_up_like_a_named_tap", || {
        let fd = tun_fd(
            "tndfd0",
            libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
        );
        assert_eq!(status_flags(&fd) & libc::O_NONBLOCK, 0);
        let tap = Tap::from_fd(fd, "net0").expect("a TAP");
        assert_eq!(tap.name(), "tndfd0");
        assert_ne!(status_flags(&tap) & libc::O_NONBLOCK, 0, "not non-blocking");
        let mut size: libc::c_int = 0;
        // SAFETY: TUNGETVNETHDRSZ writes one int into `size`.
        let ret = unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNGETVNETHDRSZ as _, &mut size) };
        assert_eq!(ret, 0);
        assert_eq!(size as usize, devices::tap::VNET_HDR_LEN);
        let mut buf = [0u8; 2048];
        let err = tap.read(&mut buf).expect_err("nothing queued");
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
        // Frames go through it as through a TAP opened by name.
        tap.enable().expect("up");
        let mut frame = vec![0u8; devices::tap::VNET_HDR_LEN];
        frame.extend_from_slice(&[0xff; 6]);
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        frame.extend_from_slice(&[0x88, 0xb5]);
        frame.extend_from_slice(&[0u8; 46]);
        assert_eq!(tap.write(&frame).expect("write"), frame.len());
    });
}

#[test]
fn a_net_device_is_built_again_from_the_same_passed_tap() {
    use devices::tap::PassedTap;
    use devices::virtio::net::{Net, NetConfig};
    in_netns(
        "a_net_device_is_built_again_from_the_same_passed_tap",
        || {
            let fd = tun_fd(
                "tndfd1",
                libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
            );
            let passed = PassedTap::new(fd, "net _net0 (fd 3)");
            let config = NetConfig {
                tap_fd: Some(passed.clone()),
                ..NetConfig::default()
            };
            // A reboot builds the device again: the first one's drop must not close the source.
            for _ in 0..2 {
                let net = Net::new(config.clone()).expect("virtio-net on the passed TAP");
                assert_eq!(net.tap_name(), "tndfd1");
                drop(net);
            }
        },
    );
}

#[test]
fn a_tun_descriptor_or_a_tap_without_the_vnet_header_is_refused() {
    in_netns(
        "a_tun_descriptor_or_a_tap_without_the_vnet_header_is_refused",
        || {
            let tun = tun_fd("tndtun0", libc::IFF_TUN | libc::IFF_NO_PI);
            let err = Tap::from_fd(tun, "net0").expect_err("TUN is not TAP");
            assert!(matches!(err, TapError::FdNotATap { .. }), "{err:?}");
            assert_eq!(
                err.to_string(),
                "the descriptor passed for net0 is not a TAP device: tndtun0 is a TUN (layer \
                 3) interface; a NIC needs a TAP (layer 2) one"
            );
            let plain = tun_fd("tndfd2", libc::IFF_TAP | libc::IFF_NO_PI);
            let err = Tap::from_fd(plain, "net1").expect_err("no vnet header");
            assert!(
                err.to_string()
                    .starts_with("the TAP tndfd2 passed for net1 was opened without IFF_VNET_HDR"),
                "{err}"
            );
        },
    );
}

#[test]
fn a_file_or_a_socket_passed_as_a_tap_is_refused() {
    // Needs no privileges: TUNGETIFF fails on anything but a tun descriptor.
    let path = std::env::temp_dir().join(format!("tandem-tap-fd-{}", std::process::id()));
    let file = std::fs::File::create(&path).expect("temp file");
    let _ = std::fs::remove_file(&path);
    let err = Tap::from_fd(file.into(), "--net fd=3").expect_err("a regular file");
    assert!(matches!(err, TapError::FdNotATap { .. }), "{err:?}");
    assert!(
        err.to_string().starts_with(
            "the descriptor passed for --net fd=3 is not a TAP device: a regular file"
        ),
        "{err}"
    );
    let (socket, _peer) = std::os::unix::net::UnixStream::pair().expect("socket pair");
    let err = Tap::from_fd(socket.into(), "vm.add-net").expect_err("a socket");
    assert!(
        err.to_string()
            .starts_with("the descriptor passed for vm.add-net is not a TAP device: a socket"),
        "{err}"
    );
    // /dev/net/tun itself, attached to no interface yet.
    if let Ok(tun) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        let err = Tap::from_fd(tun.into(), "net0").expect_err("unattached");
        assert!(
            err.to_string().contains("attached to no interface"),
            "{err}"
        );
    }
}
