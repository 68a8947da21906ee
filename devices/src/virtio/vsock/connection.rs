//! One vsock stream connection between a guest socket and a host Unix socket, and the host
//! clients that have not yet said which guest port they want (`CONNECT <port>\n`).
//!
//! Flow control (5.10.6.3): each side advertises its receive buffer (`buf_alloc`) and how many
//! bytes it has taken out of it so far (`fwd_cnt`); a sender keeps
//! `sent - peer_fwd_cnt <= peer_buf_alloc`. Towards the guest, data is read from the host
//! socket only when the guest has credit, straight into the packet being built, so nothing is
//! buffered on the host side beyond the socket itself. From the guest, data goes to the host
//! socket at once and what the socket does not take waits in `tx_buf`, which the credit we
//! advertise ([`BUF_ALLOC`]) bounds: a guest that sends beyond it is reset.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use event_manager::EventSet;

use super::packet::*;

/// The receive buffer we advertise per connection, and so the most guest bytes held for a host
/// socket that does not read (as Cloud Hypervisor's `CONN_TX_BUF_SIZE`).
pub const BUF_ALLOC: u32 = 64 << 10;

/// Once the guest's view of our free buffer drops below this, it is sent a credit update
/// (without waiting for it to ask).
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 2;

/// Longest `CONNECT <port>\n` line accepted, newline included.
pub const MAX_CONNECT_LINE: usize = 32;

/// (our port, the guest's port): what a packet's (dst_port, src_port) name.
pub type Key = (u32, u32);

/// Where a connection stands in its handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Host-initiated: REQUEST sent (or about to be), waiting for the guest's RESPONSE.
    LocalInit,
    Established,
}

/// What ends a connection when a deadline passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deadline {
    /// The guest did not answer our REQUEST.
    Request,
    /// The connection is shutting down but the host is not taking the last guest bytes (or the
    /// guest does not answer our SHUTDOWN with an RST).
    Shutdown,
}

/// How long the device waits for a peer before giving up on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// A host client has this long to send its whole `CONNECT <port>\n` line.
    pub connect_line: Duration,
    /// The guest has this long to answer a host-initiated REQUEST (Cloud Hypervisor's
    /// `CONN_REQUEST_TIMEOUT_MS`).
    pub request: Duration,
    /// Once both sides shut down, the host socket has this long to take the last guest bytes,
    /// and the guest this long to answer our SHUTDOWN with RST (`CONN_SHUTDOWN_TIMEOUT_MS`).
    pub shutdown: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect_line: Duration::from_secs(10),
            request: Duration::from_millis(2000),
            shutdown: Duration::from_millis(2000),
        }
    }
}

/// A packet a connection wants to send to the guest.
pub struct Outgoing {
    pub hdr: Header,
    /// Payload bytes, at the front of the caller's buffer.
    pub len: usize,
}

pub struct Connection {
    pub stream: UnixStream,
    pub local_port: u32,
    pub peer_port: u32,
    /// Host-initiated (its local port is one we allocated).
    pub host_initiated: bool,
    pub phase: Phase,
    /// Control packets owed to the guest.
    pending_request: bool,
    pending_response: bool,
    pending_credit_update: bool,
    pending_credit_request: bool,
    /// SHUTDOWN flags owed to the guest, and those already sent.
    pending_shutdown: u32,
    shutdown_sent: u32,
    /// An RST is owed to the guest; after it the connection is removed.
    pending_rst: bool,
    /// Done: remove it (the guest sent RST, or our RST left).
    pub closed: bool,
    /// Guest bytes the host socket has not taken yet (at most [`BUF_ALLOC`]).
    tx_buf: VecDeque<u8>,
    /// Guest bytes handed to the host socket, and that count as last told to the guest.
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    guest_shut_send: bool,
    guest_shut_recv: bool,
    /// SHUT_WR applied to the host socket (the guest will send nothing more).
    host_write_closed: bool,
    /// The host socket can take no more bytes (hang-up or a failed write).
    host_write_dead: bool,
    /// Host-to-guest credit: the guest's buffer, what it has consumed, what we sent.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    /// A CREDIT_REQUEST went out since the last credit the guest gave.
    credit_requested: bool,
    /// The host socket has bytes (or its end) to read.
    host_readable: bool,
    /// The host socket's read side reached its end.
    host_eof: bool,
    /// The host socket hung up (both directions closed); no longer polled.
    pub host_hup: bool,
    pub deadline: Option<(Instant, Deadline)>,
    /// The event set registered with the loop; None when not registered.
    pub interest: Option<EventSet>,
    /// Queued in the device's round-robin of connections with something for the guest.
    pub in_rx_order: bool,
    timeouts: Timeouts,
}

impl Connection {
    fn new(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        phase: Phase,
        timeouts: Timeouts,
    ) -> Connection {
        Connection {
            stream,
            local_port,
            peer_port,
            host_initiated: phase == Phase::LocalInit,
            phase,
            pending_request: phase == Phase::LocalInit,
            pending_response: phase == Phase::Established,
            pending_credit_update: false,
            pending_credit_request: false,
            pending_shutdown: 0,
            shutdown_sent: 0,
            pending_rst: false,
            closed: false,
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            guest_shut_send: false,
            guest_shut_recv: false,
            host_write_closed: false,
            host_write_dead: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            credit_requested: false,
            host_readable: false,
            host_eof: false,
            host_hup: false,
            deadline: None,
            interest: None,
            in_rx_order: false,
            timeouts,
        }
    }

    /// A host client asked for guest port `peer_port`: a REQUEST goes to the guest.
    pub fn host_initiated(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        timeouts: Timeouts,
    ) -> Connection {
        Connection::new(stream, local_port, peer_port, Phase::LocalInit, timeouts)
    }

    /// The guest's REQUEST `req` reached a host listener: a RESPONSE goes back.
    pub fn guest_initiated(stream: UnixStream, req: &Header, timeouts: Timeouts) -> Connection {
        let mut c = Connection::new(
            stream,
            req.dst_port,
            req.src_port,
            Phase::Established,
            timeouts,
        );
        c.peer_buf_alloc = req.buf_alloc;
        c.peer_fwd_cnt = Wrapping(req.fwd_cnt);
        c
    }

    pub fn key(&self) -> Key {
        (self.local_port, self.peer_port)
    }

    pub fn tx_buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// Bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        // A fwd_cnt ahead of what was sent (a confused guest) gives no credit, not a wrap.
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The connection is about to be reset (or gone): nothing else flows.
    fn dying(&self) -> bool {
        self.pending_rst || self.closed
    }

    /// Host bytes may go to the guest (handshake done, neither side closed that direction).
    fn host_to_guest_open(&self) -> bool {
        self.phase == Phase::Established && !self.dying() && !self.host_eof && !self.guest_shut_recv
    }

    /// Whether the connection has a packet for the guest now.
    pub fn has_rx_work(&self) -> bool {
        if self.closed {
            return false;
        }
        self.pending_rst
            || self.pending_request
            || self.pending_response
            || self.pending_shutdown != 0
            || self.pending_credit_request
            || self.pending_credit_update
            || (self.host_to_guest_open()
                && self.host_readable
                && (self.peer_credit() > 0 || !self.credit_requested))
    }

    /// The events to watch on the host socket; None: do not watch it at all (after a hang-up,
    /// which epoll would otherwise report on every wait).
    pub fn wanted_interest(&self) -> Option<EventSet> {
        if self.host_hup || self.closed {
            return None;
        }
        let mut set = EventSet::empty();
        if self.host_to_guest_open() && !self.host_readable {
            set |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() && !self.host_write_dead {
            set |= EventSet::OUT;
        }
        Some(set)
    }

    /// Resets the connection: an RST goes to the guest, the host socket is closed after it.
    pub fn kill(&mut self) {
        if self.closed {
            return;
        }
        self.pending_rst = true;
        self.pending_request = false;
        self.pending_response = false;
        self.pending_shutdown = 0;
        self.pending_credit_request = false;
        self.pending_credit_update = false;
        self.tx_buf = VecDeque::new();
        self.deadline = None;
    }

    /// Takes the credit fields of any guest packet.
    fn take_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// Handles a packet from the guest for this connection (`payload`: exactly `hdr.len`
    /// bytes). Returns a reason when the packet broke the protocol; the connection is then
    /// reset.
    pub fn on_guest_packet(&mut self, hdr: &Header, payload: &[u8]) -> Option<String> {
        if self.dying() {
            return None;
        }
        self.take_credit(hdr);
        let violation = match hdr.op {
            VSOCK_OP_RESPONSE if self.phase == Phase::LocalInit => {
                self.phase = Phase::Established;
                self.deadline = None;
                // Hybrid vsock: the host client learns its connection is up and its port.
                let reply = format!("OK {}\n", self.local_port);
                match send_nosignal(&self.stream, reply.as_bytes()) {
                    Ok(n) if n == reply.len() => None,
                    Ok(n) => Some(format!("the host client took {n} bytes of the OK line")),
                    Err(e) => Some(format!("cannot send the OK line to the host client: {e}")),
                }
            }
            VSOCK_OP_RW if self.phase == Phase::Established && !self.guest_shut_send => {
                self.forward(payload)
            }
            VSOCK_OP_SHUTDOWN if self.phase == Phase::Established => {
                self.guest_shut_recv |= hdr.flags & VSOCK_SHUTDOWN_F_RECEIVE != 0;
                self.guest_shut_send |= hdr.flags & VSOCK_SHUTDOWN_F_SEND != 0;
                self.after_progress();
                None
            }
            VSOCK_OP_CREDIT_UPDATE => None,
            VSOCK_OP_CREDIT_REQUEST if self.phase == Phase::Established => {
                self.pending_credit_update = true;
                None
            }
            VSOCK_OP_REQUEST => Some("a REQUEST for a connection that exists".into()),
            VSOCK_OP_RESPONSE => Some("a RESPONSE to no request".into()),
            VSOCK_OP_RW if self.guest_shut_send => {
                Some("data after the guest shut its send side".into())
            }
            VSOCK_OP_RW | VSOCK_OP_SHUTDOWN | VSOCK_OP_CREDIT_REQUEST => {
                Some(format!("op {} before the handshake completed", hdr.op))
            }
            op => Some(format!("unknown op {op}")),
        };
        if violation.is_some() {
            self.kill();
        }
        violation
    }

    /// Hands guest data to the host socket; what it does not take now is buffered.
    fn forward(&mut self, data: &[u8]) -> Option<String> {
        if data.is_empty() {
            return None;
        }
        if self.host_write_dead {
            return Some("the host side closed and takes no data".into());
        }
        if self.tx_buf.len() + data.len() > BUF_ALLOC as usize {
            return Some(format!(
                "the guest sent {} bytes with {} already buffered, beyond the {BUF_ALLOC}-byte credit",
                data.len(),
                self.tx_buf.len()
            ));
        }
        let mut written = 0;
        if self.tx_buf.is_empty() {
            match send_nosignal(&self.stream, data) {
                Ok(n) => written = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    self.host_write_dead = true;
                    return Some(format!("cannot write to the host socket: {e}"));
                }
            }
        }
        self.fwd_cnt += Wrapping(written as u32);
        self.tx_buf.extend(&data[written..]);
        self.after_progress();
        None
    }

    /// Writes buffered guest bytes to the host socket (it reported room).
    pub fn flush(&mut self) -> Option<String> {
        while !self.tx_buf.is_empty() && !self.dying() {
            let (front, _) = self.tx_buf.as_slices();
            match send_nosignal(&self.stream, front) {
                Ok(0) => break,
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.host_write_dead = true;
                    self.kill();
                    return Some(format!("cannot write to the host socket: {e}"));
                }
            }
        }
        self.after_progress();
        None
    }

    /// Handles readiness of the host socket.
    pub fn on_host_event(&mut self, set: EventSet) -> Option<String> {
        if self.dying() {
            return None;
        }
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            // Both directions are closed: what is left to read still is (up to its end).
            self.host_hup = true;
            self.host_write_dead = true;
            self.host_readable = true;
            if !self.tx_buf.is_empty() {
                self.kill();
                return Some("the host side hung up with guest bytes unsent".into());
            }
        }
        if set.contains(EventSet::IN) {
            self.host_readable = true;
        }
        if set.contains(EventSet::OUT) {
            return self.flush();
        }
        self.after_progress();
        None
    }

    /// After bytes moved or a side closed: owed credit updates, a SHUT_WR for the host, and
    /// the end of the connection once nothing can flow any more.
    fn after_progress(&mut self) {
        if self.dying() {
            return;
        }
        let unseen = (self.fwd_cnt - self.last_fwd_cnt_sent).0;
        let guest_view_free = BUF_ALLOC
            .saturating_sub(self.tx_buf.len() as u32)
            .saturating_sub(unseen);
        if unseen > 0 && guest_view_free < CREDIT_UPDATE_THRESHOLD && !self.guest_shut_send {
            self.pending_credit_update = true;
        }
        if self.guest_shut_send && self.tx_buf.is_empty() && !self.host_write_closed {
            // The host reads its end of input once the last guest byte is out.
            // SAFETY: shutdown(2) on a socket this connection owns; no memory is involved.
            unsafe { libc::shutdown(self.stream.as_raw_fd(), libc::SHUT_WR) };
            self.host_write_closed = true;
        }
        let guest_to_host_done = self.guest_shut_send || self.host_write_dead;
        let host_to_guest_done = self.guest_shut_recv
            || (self.host_eof && self.shutdown_sent & VSOCK_SHUTDOWN_F_SEND != 0);
        if guest_to_host_done && host_to_guest_done {
            if self.tx_buf.is_empty() || self.host_write_dead {
                self.kill();
            } else if self.deadline.is_none() {
                self.deadline = Some((Instant::now() + self.timeouts.shutdown, Deadline::Shutdown));
            }
        }
    }

    /// The host socket reached its end: the guest is told (and, after a hang-up, that nothing
    /// more is taken either).
    fn host_ended(&mut self) {
        self.host_eof = true;
        self.host_readable = false;
        let mut flags = VSOCK_SHUTDOWN_F_SEND;
        if self.host_write_dead {
            flags |= VSOCK_SHUTDOWN_F_RECEIVE;
        }
        self.pending_shutdown |= flags & !self.shutdown_sent;
    }

    fn header(&self, cid: u64, op: u16) -> Header {
        Header {
            src_cid: VSOCK_HOST_CID,
            dst_cid: cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: VSOCK_TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The next packet for the guest, its payload (at most `room` bytes) read into `buf`.
    /// None when there is nothing to send after all (the host socket had no data).
    pub fn next_packet(
        &mut self,
        cid: u64,
        room: usize,
        buf: &mut [u8],
    ) -> Result<Option<Outgoing>, String> {
        let out = self.build_packet(cid, room, buf);
        if let Ok(Some(p)) = &out {
            // Every packet carries our credit.
            self.last_fwd_cnt_sent = Wrapping(p.hdr.fwd_cnt);
            self.pending_credit_update = false;
            if p.hdr.op == VSOCK_OP_RST {
                self.closed = true;
            }
        }
        if !self.dying() {
            self.after_progress();
        }
        out
    }

    fn build_packet(
        &mut self,
        cid: u64,
        room: usize,
        buf: &mut [u8],
    ) -> Result<Option<Outgoing>, String> {
        if self.closed {
            return Ok(None);
        }
        if self.pending_rst {
            self.pending_rst = false;
            return Ok(Some(self.outgoing(cid, VSOCK_OP_RST)));
        }
        if self.pending_request {
            self.pending_request = false;
            self.deadline = Some((Instant::now() + self.timeouts.request, Deadline::Request));
            return Ok(Some(self.outgoing(cid, VSOCK_OP_REQUEST)));
        }
        if self.pending_response {
            self.pending_response = false;
            return Ok(Some(self.outgoing(cid, VSOCK_OP_RESPONSE)));
        }
        if self.host_to_guest_open() && self.host_readable {
            let credit = self.peer_credit() as usize;
            if credit == 0 {
                if !self.credit_requested {
                    match peek_one(&self.stream) {
                        Ok(true) => {
                            self.credit_requested = true;
                            self.pending_credit_request = true;
                        }
                        Ok(false) => self.host_ended(),
                        Err(e) if would_block(&e) => self.host_readable = false,
                        Err(e) => {
                            self.kill();
                            return Err(format!("cannot read the host socket: {e}"));
                        }
                    }
                }
            } else {
                let want = room.min(credit).min(MAX_PKT_LEN).min(buf.len());
                match (&self.stream).read(&mut buf[..want]) {
                    Ok(0) if want > 0 => self.host_ended(),
                    Ok(n) => {
                        self.rx_cnt += Wrapping(n as u32);
                        let mut p = self.outgoing(cid, VSOCK_OP_RW);
                        p.hdr.len = n as u32;
                        p.len = n;
                        return Ok(Some(p));
                    }
                    Err(e) if would_block(&e) => self.host_readable = false,
                    Err(e) => {
                        // The RST goes out with the next receive buffer.
                        self.kill();
                        return Err(format!("cannot read the host socket: {e}"));
                    }
                }
            }
        }
        if self.pending_shutdown != 0 {
            let mut p = self.outgoing(cid, VSOCK_OP_SHUTDOWN);
            p.hdr.flags = self.pending_shutdown;
            self.shutdown_sent |= self.pending_shutdown;
            self.pending_shutdown = 0;
            return Ok(Some(p));
        }
        if self.pending_credit_request {
            self.pending_credit_request = false;
            return Ok(Some(self.outgoing(cid, VSOCK_OP_CREDIT_REQUEST)));
        }
        if self.pending_credit_update {
            return Ok(Some(self.outgoing(cid, VSOCK_OP_CREDIT_UPDATE)));
        }
        Ok(None)
    }

    fn outgoing(&self, cid: u64, op: u16) -> Outgoing {
        Outgoing {
            hdr: self.header(cid, op),
            len: 0,
        }
    }
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// send(2) with MSG_NOSIGNAL: a host peer that went away is an error, not a SIGPIPE.
pub fn send_nosignal(stream: &UnixStream, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is a valid buffer of `data.len()` bytes for the duration of the call, and
    // the fd belongs to `stream`.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Peeks up to `buf.len()` bytes without taking them off the socket.
pub fn peek(stream: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Whether the socket has a byte to read (false: it is at its end).
fn peek_one(stream: &UnixStream) -> io::Result<bool> {
    let mut b = [0u8; 1];
    peek(stream, &mut b).map(|n| n == 1)
}

/// A host client of the listening socket that has not sent its `CONNECT <port>\n` yet.
pub struct PendingClient {
    pub stream: UnixStream,
    line: Vec<u8>,
    pub deadline: Instant,
    /// Registered with the current event loop.
    pub registered: bool,
}

/// What reading a pending client's line gave.
#[derive(Debug, PartialEq, Eq)]
pub enum LineRead {
    /// No full line yet.
    More,
    Port(u32),
    /// Close the client, for this reason.
    Refuse(String),
}

impl PendingClient {
    pub fn new(stream: UnixStream, deadline: Instant) -> PendingClient {
        PendingClient {
            stream,
            line: Vec::with_capacity(MAX_CONNECT_LINE),
            deadline,
            registered: false,
        }
    }

    /// Takes what the client sent of its line, never past the newline: bytes after it belong
    /// to the connection.
    pub fn read_line(&mut self) -> LineRead {
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let room = MAX_CONNECT_LINE - self.line.len();
        let n = match peek(&self.stream, &mut buf[..room]) {
            Ok(0) => {
                return LineRead::Refuse("the client closed before a full CONNECT line".into())
            }
            Ok(n) => n,
            Err(e) if would_block(&e) => return LineRead::More,
            Err(e) => return LineRead::Refuse(format!("cannot read from the client: {e}")),
        };
        let take = buf[..n]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(n, |i| i + 1);
        let got = match (&self.stream).read(&mut buf[..take]) {
            Ok(got) => got,
            Err(e) if would_block(&e) => return LineRead::More,
            Err(e) => return LineRead::Refuse(format!("cannot read from the client: {e}")),
        };
        self.line.extend_from_slice(&buf[..got]);
        if self.line.last() == Some(&b'\n') {
            return match parse_connect_line(&self.line) {
                Ok(port) => LineRead::Port(port),
                Err(e) => LineRead::Refuse(e),
            };
        }
        if self.line.len() >= MAX_CONNECT_LINE {
            return LineRead::Refuse(format!(
                "no newline in the first {MAX_CONNECT_LINE} bytes ({:?})",
                String::from_utf8_lossy(&self.line)
            ));
        }
        LineRead::More
    }
}

/// Parses `CONNECT <port>\n` (the keyword in any case, as Cloud Hypervisor accepts).
pub fn parse_connect_line(line: &[u8]) -> Result<u32, String> {
    const PREFIX: &[u8] = b"connect ";
    let shown = || format!("{:?}", String::from_utf8_lossy(line));
    let body = line.strip_suffix(b"\n").unwrap_or(line);
    if body.len() < PREFIX.len() || !body[..PREFIX.len()].eq_ignore_ascii_case(PREFIX) {
        return Err(format!("not a CONNECT line: {}", shown()));
    }
    std::str::from_utf8(&body[PREFIX.len()..])
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .ok_or_else(|| format!("bad port in CONNECT line {}", shown()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_parse() {
        assert_eq!(parse_connect_line(b"CONNECT 1024\n"), Ok(1024));
        assert_eq!(parse_connect_line(b"connect 7\n"), Ok(7));
        assert_eq!(parse_connect_line(b"Connect  42 \r\n"), Ok(42));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295\n"), Ok(u32::MAX));
        for bad in [
            &b"CONNECT\n"[..],
            b"CONNECT \n",
            b"CONNECT -1\n",
            b"CONNECT 4294967296\n",
            b"CONNEXT 5\n",
            b"\n",
            b"CONNECT 12ab\n",
            b"CONNECT \xff\n",
        ] {
            let err = parse_connect_line(bad).unwrap_err();
            assert!(err.contains("CONNECT") || err.contains("port"), "{err}");
        }
    }
}
