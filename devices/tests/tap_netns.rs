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
