//! TAP network devices: the host end of a virtio-net device.
//!
//! A [`Tap`] is opened through `/dev/net/tun` in TAP mode with `IFF_NO_PI | IFF_VNET_HDR`: every
//! frame read or written is preceded by a 12-byte `virtio_net_hdr_v1`, the layout the guest uses
//! too. Offloads start switched off (`TUNSETOFFLOAD 0`): the kernel then only hands over
//! complete, checksummed frames of at most MTU size and the header carries nothing but zeros.
//! The virtio-net device turns on what the guest's driver accepts ([`Tap::set_offload`]): then
//! a frame may be a TCP segment of up to 64 KiB with its checksum left to do, as the header says.
//!
//! Semantics follow Cloud Hypervisor: `tap=NAME` attaches to the TAP called NAME or creates it
//! when there is none; without a name a new `vmtap%d` is created (the kernel picks the number).
//! Interface configuration (address, netmask, MTU, up) goes through `SIOC*` ioctls on an
//! `AF_INET` socket, which act on the network namespace of the calling thread, the one the TAP
//! was created in.
//!
//! A TAP can also come as a descriptor someone else opened (`--net fd=N`, or descriptors passed
//! with `vm.add-net`): [`Tap::from_fd`] checks with `TUNGETIFF` that it is a TAP opened with the
//! framing above, learns its name, and sets the same header size and offloads.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

/// Size of the virtio-net header that precedes every frame on the TAP (`virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;

/// The name template the kernel expands when no TAP name is given.
const DEFAULT_NAME_TEMPLATE: &str = "vmtap%d";

/// Path of the TUN/TAP clone device.
const TUN_DEVICE: &str = "/dev/net/tun";

/// Errors of TAP set-up; each names the TAP it concerns.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid TAP name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("cannot open {TUN_DEVICE} (is the tun module loaded?): {0}")]
    OpenTun(#[source] io::Error),
    #[error("TAP {0} does not exist")]
    NotFound(String),
    #[error("TAP {0} is busy: another process is attached to it")]
    Busy(String),
    #[error("TAP {0}: permission denied (creating or attaching a TAP needs CAP_NET_ADMIN or ownership of the TAP)")]
    PermissionDenied(String),
    #[error("{0} exists but is not a TAP device usable with IFF_VNET_HDR")]
    NotATap(String),
    #[error("cannot attach TAP {name}: {source}")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create a TAP device: {0}")]
    Create(#[source] io::Error),
    #[error("TAP {name}: cannot {what}: {source}")]
    Configure {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("TAP {name}: invalid IP address {addr}: {source}")]
    InvalidIp {
        name: String,
        addr: Ipv4Addr,
        #[source]
        source: io::Error,
    },
    #[error("TAP {name}: invalid netmask {mask}: {source}")]
    InvalidNetmask {
        name: String,
        mask: Ipv4Addr,
        #[source]
        source: io::Error,
    },
    #[error("TAP {name}: cannot set MTU {mtu}: {source}")]
    Mtu {
        name: String,
        mtu: u16,
        #[source]
        source: io::Error,
    },
    #[error("TAP {name}: cannot open a control socket: {source}")]
    Socket {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("the descriptor passed for {what} is not a TAP device: {reason}")]
    FdNotATap { what: String, reason: String },
    #[error(
        "the TAP {name} passed for {what} was opened without {missing}: open it with \
         IFF_TAP | IFF_NO_PI | IFF_VNET_HDR"
    )]
    FdFraming {
        what: String,
        name: String,
        missing: &'static str,
    },
    #[error("the TAP descriptor passed for {what}: cannot {action}: {source}")]
    FdSetup {
        what: String,
        action: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A TAP descriptor opened by someone else (inherited by the VMM, or passed over the API),
/// kept so that the device can be built from it again (a reboot rebuilds every device): each
/// build attaches a duplicate, as Cloud Hypervisor does, so dropping a device never closes the
/// descriptor it came from.
#[derive(Clone, Debug)]
pub struct PassedTap {
    fd: Arc<OwnedFd>,
    what: String,
}

impl PassedTap {
    /// `what` says where the descriptor came from, for errors (`--net fd=3`, `vm.add-net`).
    pub fn new(fd: OwnedFd, what: impl Into<String>) -> PassedTap {
        PassedTap {
            fd: Arc::new(fd),
            what: what.into(),
        }
    }

    pub fn what(&self) -> &str {
        &self.what
    }
}

/// Two handles are the same TAP source when they share the descriptor.
impl PartialEq for PassedTap {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.fd, &other.fd)
    }
}

impl Eq for PassedTap {}

/// An open TAP device (non-blocking) whose frames carry a 12-byte virtio-net header.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Checks a name the way the kernel's `dev_valid_name` does, so the user gets a precise
/// message instead of a bare EINVAL.
fn validate_name(name: &str) -> Result<(), TapError> {
    let bad = |reason| {
        Err(TapError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() >= libc::IFNAMSIZ {
        return bad("longer than 15 bytes (IFNAMSIZ - 1)");
    }
    if name == "." || name == ".." {
        return bad("reserved name");
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        return bad("contains '/', ':', NUL or whitespace");
    }
    Ok(())
}

/// An `ifreq` with the interface name filled in (the name is validated to fit, NUL included).
fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is a plain C struct (name array + union of integers, sockaddrs and a
    // pointer) for which all-zero bytes are a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    ifr
}

/// The interface name the kernel wrote back into an `ifreq`.
fn name_from_ifreq(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn sockaddr_from_ipv4(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain C structs; the kernel interprets
    // the bytes according to sa_family, exactly as C code casting between them does.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ipv4_from_sockaddr(sa: &libc::sockaddr) -> Ipv4Addr {
    // SAFETY: same layout argument as in `sockaddr_from_ipv4`; the kernel filled an AF_INET
    // address for SIOCGIFADDR/SIOCGIFNETMASK.
    let sin = unsafe { std::mem::transmute::<libc::sockaddr, libc::sockaddr_in>(*sa) };
    Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes())
}

impl Tap {
    /// Attaches to the TAP called `name`, creating it when it does not exist
    /// (Cloud Hypervisor's `tap=NAME`).
    pub fn open_named(name: &str) -> Result<Tap, TapError> {
        validate_name(name)?;
        Self::open(name).map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => TapError::Busy(name.to_string()),
            Some(libc::EPERM) | Some(libc::EACCES) => TapError::PermissionDenied(name.to_string()),
            Some(libc::EINVAL) => TapError::NotATap(name.to_string()),
            Some(libc::ENODEV) | Some(libc::ENXIO) => TapError::NotFound(name.to_string()),
            // Opening /dev/net/tun itself failed: a host problem, not the TAP's.
            _ if is_open_error(&e) => TapError::OpenTun(strip_open_marker(e)),
            _ => TapError::Attach {
                name: name.to_string(),
                source: e,
            },
        })
    }

    /// Creates a new TAP named `vmtap<N>`, the kernel choosing N.
    pub fn create() -> Result<Tap, TapError> {
        Self::open(DEFAULT_NAME_TEMPLATE).map_err(|e| {
            if is_open_error(&e) {
                TapError::OpenTun(strip_open_marker(e))
            } else {
                TapError::Create(e)
            }
        })
    }

    /// Opens `/dev/net/tun` and binds it to `name` (possibly a `%d` template), then fixes the
    /// framing: 12-byte vnet header, no offloads.
    fn open(name: &str) -> io::Result<Tap> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(TUN_DEVICE)
            .map_err(mark_open_error)?;

        let mut ifr = ifreq_for(name);
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `ifr` is a valid, exclusively
        // borrowed ifreq that lives across the call, and `file` is an open tun fd.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut ifr) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        let tap = Tap {
            file,
            name: name_from_ifreq(&ifr),
        };
        tap.set_framing()?;
        Ok(tap)
    }

    /// The 12-byte vnet header and no offloads (see the module documentation).
    fn set_framing(&self) -> io::Result<()> {
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points at a live
        // local; the fd is an attached tun fd.
        let ret =
            unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ as _, &hdr_len) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        self.set_offload(0)
    }

    /// Sets the offloads the kernel may use for frames it hands to this TAP's reader
    /// (`TUN_F_*` bits: partial checksums, TCP segments up to 64 KiB). Only what the guest's
    /// driver accepted may be turned on: the header of each such frame says what is left to do.
    pub fn set_offload(&self, tun_flags: libc::c_uint) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long of TUN_F_* bits);
        // no memory is passed, and the fd is an attached tun fd.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD as _,
                tun_flags as libc::c_ulong,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Takes over a TAP descriptor opened by someone else (`what` names where it came from,
    /// for errors). It must be attached to a TAP (not TUN) interface with `IFF_NO_PI` and
    /// `IFF_VNET_HDR`, the framing every frame here assumes (the first is not checkable, the
    /// rest is checked); it is made non-blocking and gets
    /// the same header size and offloads as a TAP opened by name. The interface itself (address,
    /// up) is its owner's business, and it may live in another network namespace.
    pub fn from_fd(fd: OwnedFd, what: &str) -> Result<Tap, TapError> {
        let not_a_tap = |reason: String| TapError::FdNotATap {
            what: what.to_string(),
            reason,
        };
        // SAFETY: an all-zero ifreq is valid (see `ifreq_for`).
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes one `struct ifreq` into `ifr`, which is valid and
        // exclusively borrowed for the call; on any other kind of file the call fails
        // (ENOTTY, EBADFD for a tun descriptor not attached to an interface) and writes nothing.
        let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF as _, &mut ifr) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            return Err(not_a_tap(match e.raw_os_error() {
                Some(libc::ENOTTY) | Some(libc::EINVAL) => {
                    format!("{} (TUNGETIFF: {e})", describe_fd(fd.as_fd()))
                }
                Some(libc::EBADFD) => "a tun descriptor attached to no interface".to_string(),
                _ => format!("TUNGETIFF: {e}"),
            }));
        }
        // SAFETY: TUNGETIFF filled the flags member of the union.
        let flags = i32::from(unsafe { ifr.ifr_ifru.ifru_flags });
        let name = name_from_ifreq(&ifr);
        if flags & libc::IFF_TAP == 0 {
            return Err(not_a_tap(format!(
                "{name} is a TUN (layer 3) interface; a NIC needs a TAP (layer 2) one"
            )));
        }
        let framing = |missing| TapError::FdFraming {
            what: what.to_string(),
            name: name.clone(),
            missing,
        };
        // IFF_NO_PI cannot be checked: TUNGETIFF reports IFF_NOFILTER on the same bit
        // (0x1000) whenever no filter is attached. It is a documented requirement, as with
        // Cloud Hypervisor.
        if flags & libc::IFF_VNET_HDR == 0 {
            return Err(framing("IFF_VNET_HDR"));
        }
        let setup = |action, source| TapError::FdSetup {
            what: what.to_string(),
            action,
            source,
        };
        // SAFETY: F_GETFL on an open descriptor; no memory involved.
        let status = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if status < 0 {
            return Err(setup("read its flags", io::Error::last_os_error()));
        }
        // The device loop must never block on it (the sender's copy shares the flag, as with
        // Cloud Hypervisor).
        // SAFETY: F_SETFL with an int argument on an open descriptor; no memory involved.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, status | libc::O_NONBLOCK) } < 0 {
            return Err(setup("make it non-blocking", io::Error::last_os_error()));
        }
        let tap = Tap {
            file: File::from(fd),
            name,
        };
        tap.set_framing()
            .map_err(|e| setup("set the vnet header size and offloads", e))?;
        Ok(tap)
    }

    /// A TAP on a duplicate of `passed` (the original stays open for the next build).
    pub fn from_passed(passed: &PassedTap) -> Result<Tap, TapError> {
        let fd = passed.fd.try_clone().map_err(|source| TapError::FdSetup {
            what: passed.what.clone(),
            action: "duplicate it",
            source,
        })?;
        Tap::from_fd(fd, &passed.what)
    }

    /// The interface name (as the kernel knows it, e.g. `vmtap0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (vnet header included); `WouldBlock` when none is queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (vnet header included) in a single call.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }

    /// Writes one frame gathered from several buffers (one `writev`, so one frame).
    pub fn write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&self.file).write_vectored(bufs)
    }

    /// A second handle on the same TAP queue (a `dup` of the fd), e.g. for the output gate.
    pub fn try_clone(&self) -> io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }

    /// Runs one `SIOC*` ioctl on an `ifreq` for this interface through an AF_INET socket.
    fn if_ioctl(&self, request: libc::c_ulong, ifr: &mut libc::ifreq) -> Result<(), io::Error> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the SIOC{G,S}IF* requests used here read or write exactly one `struct ifreq`,
        // which `ifr` is (valid and exclusively borrowed for the call).
        let ret = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, ifr as *mut libc::ifreq) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sets the interface's IPv4 address.
    pub fn set_ip_addr(&self, addr: Ipv4Addr) -> Result<(), TapError> {
        let mut ifr = ifreq_for(&self.name);
        ifr.ifr_ifru.ifru_addr = sockaddr_from_ipv4(addr);
        self.if_ioctl(libc::SIOCSIFADDR, &mut ifr)
            .map_err(|source| TapError::InvalidIp {
                name: self.name.clone(),
                addr,
                source,
            })
    }

    /// Sets the interface's IPv4 netmask (after the address: setting an address resets it).
    pub fn set_netmask(&self, mask: Ipv4Addr) -> Result<(), TapError> {
        let mut ifr = ifreq_for(&self.name);
        ifr.ifr_ifru.ifru_netmask = sockaddr_from_ipv4(mask);
        self.if_ioctl(libc::SIOCSIFNETMASK, &mut ifr)
            .map_err(|source| TapError::InvalidNetmask {
                name: self.name.clone(),
                mask,
                source,
            })
    }

    /// Sets the interface MTU.
    pub fn set_mtu(&self, mtu: u16) -> Result<(), TapError> {
        let mut ifr = ifreq_for(&self.name);
        ifr.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
        self.if_ioctl(libc::SIOCSIFMTU, &mut ifr)
            .map_err(|source| TapError::Mtu {
                name: self.name.clone(),
                mtu,
                source,
            })
    }

    /// Brings the interface up (`IFF_UP | IFF_RUNNING`), keeping its other flags.
    pub fn enable(&self) -> Result<(), TapError> {
        let configure = |source| TapError::Configure {
            name: self.name.clone(),
            what: "bring the interface up",
            source,
        };
        let mut ifr = ifreq_for(&self.name);
        self.if_ioctl(libc::SIOCGIFFLAGS, &mut ifr)
            .map_err(configure)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { ifr.ifr_ifru.ifru_flags };
        ifr.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        self.if_ioctl(libc::SIOCSIFFLAGS, &mut ifr)
            .map_err(configure)
    }

    fn query(&self, request: libc::c_ulong, what: &'static str) -> Result<libc::ifreq, TapError> {
        let mut ifr = ifreq_for(&self.name);
        self.if_ioctl(request, &mut ifr)
            .map_err(|source| TapError::Configure {
                name: self.name.clone(),
                what,
                source,
            })?;
        Ok(ifr)
    }

    /// The interface's IPv4 address (error `EADDRNOTAVAIL` inside when it has none).
    pub fn ip_addr(&self) -> Result<Ipv4Addr, TapError> {
        let ifr = self.query(libc::SIOCGIFADDR, "read the IP address")?;
        // SAFETY: SIOCGIFADDR filled the addr member of the union.
        Ok(ipv4_from_sockaddr(unsafe { &ifr.ifr_ifru.ifru_addr }))
    }

    /// The interface's IPv4 netmask.
    pub fn netmask(&self) -> Result<Ipv4Addr, TapError> {
        let ifr = self.query(libc::SIOCGIFNETMASK, "read the netmask")?;
        // SAFETY: SIOCGIFNETMASK filled the netmask member of the union.
        Ok(ipv4_from_sockaddr(unsafe { &ifr.ifr_ifru.ifru_netmask }))
    }

    /// The interface MTU.
    pub fn mtu(&self) -> Result<u16, TapError> {
        let ifr = self.query(libc::SIOCGIFMTU, "read the MTU")?;
        // SAFETY: SIOCGIFMTU filled the mtu member of the union.
        let mtu = unsafe { ifr.ifr_ifru.ifru_mtu };
        Ok(u16::try_from(mtu).unwrap_or(u16::MAX))
    }

    /// Whether the interface is administratively up.
    pub fn is_up(&self) -> Result<bool, TapError> {
        let ifr = self.query(libc::SIOCGIFFLAGS, "read the interface flags")?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { ifr.ifr_ifru.ifru_flags };
        Ok(flags & libc::IFF_UP as libc::c_short != 0)
    }

    /// The interface's Ethernet address (the host side's MAC, not the guest's).
    pub fn hw_addr(&self) -> Result<[u8; 6], TapError> {
        let ifr = self.query(libc::SIOCGIFHWADDR, "read the hardware address")?;
        // SAFETY: SIOCGIFHWADDR filled the hwaddr member of the union.
        let sa = unsafe { ifr.ifr_ifru.ifru_hwaddr };
        let mut mac = [0u8; 6];
        for (dst, src) in mac.iter_mut().zip(sa.sa_data.iter()) {
            *dst = *src as u8;
        }
        Ok(mac)
    }

    /// The interface index (for `AF_PACKET` sockets and netlink).
    pub fn if_index(&self) -> Result<u32, TapError> {
        let ifr = self.query(libc::SIOCGIFINDEX, "read the interface index")?;
        // SAFETY: SIOCGIFINDEX filled the ifindex member of the union.
        let index = unsafe { ifr.ifr_ifru.ifru_ifindex };
        Ok(u32::try_from(index).unwrap_or(0))
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// What kind of file `fd` is, for the error about a descriptor that is not a TAP.
fn describe_fd(fd: std::os::fd::BorrowedFd<'_>) -> &'static str {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat only writes into `st`, which we own; `fd` is open (borrowed).
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return "a descriptor of unknown kind";
    }
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => "a regular file",
        libc::S_IFDIR => "a directory",
        libc::S_IFSOCK => "a socket",
        libc::S_IFIFO => "a pipe",
        libc::S_IFCHR => "a character device other than a TAP",
        libc::S_IFBLK => "a block device",
        _ => "not a TAP",
    }
}

/// Errors of opening `/dev/net/tun` are told apart from TUNSETIFF errors by wrapping them;
/// the wrapper is removed again before the error reaches the user.
#[derive(Debug)]
struct OpenTunError(io::Error);

impl std::fmt::Display for OpenTunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for OpenTunError {}

fn mark_open_error(e: io::Error) -> io::Error {
    io::Error::new(e.kind(), OpenTunError(e))
}

fn is_open_error(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<OpenTunError>())
}

fn strip_open_marker(e: io::Error) -> io::Error {
    match e.into_inner() {
        Some(inner) => match inner.downcast::<OpenTunError>() {
            Ok(open) => open.0,
            Err(other) => io::Error::other(other),
        },
        None => io::Error::other("unknown error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated_like_the_kernel_does() {
        assert!(validate_name("tap0").is_ok());
        assert!(validate_name("vmtap%d").is_ok());
        assert!(validate_name("123456789012345").is_ok());
        for bad in ["", "1234567890123456", ".", "..", "a/b", "a:b", "a b"] {
            let err = validate_name(bad).unwrap_err();
            assert!(
                matches!(err, TapError::InvalidName { .. }),
                "{bad:?} -> {err}"
            );
        }
        let msg = validate_name("waytoolongtapname").unwrap_err().to_string();
        assert!(
            msg.contains("waytoolongtapname") && msg.contains("15"),
            "{msg}"
        );
    }

    #[test]
    fn ifreq_round_trips_the_name() {
        let ifr = ifreq_for("tap7");
        assert_eq!(name_from_ifreq(&ifr), "tap7");
    }

    #[test]
    fn ipv4_sockaddr_round_trip() {
        let addr = Ipv4Addr::new(192, 168, 249, 1);
        assert_eq!(ipv4_from_sockaddr(&sockaddr_from_ipv4(addr)), addr);
    }

    #[test]
    fn open_errors_are_told_apart() {
        let e = mark_open_error(io::Error::from_raw_os_error(libc::ENOENT));
        assert!(is_open_error(&e));
        assert_eq!(strip_open_marker(e).raw_os_error(), Some(libc::ENOENT));
        assert!(!is_open_error(&io::Error::from_raw_os_error(libc::EBUSY)));
    }
}
