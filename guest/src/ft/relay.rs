//! `relay A.B.C.D[:PORT]` of the FT service (see ft.rs): this guest sends
//! `req` to another guest's control port over an outgoing TCP connection of
//! its own and answers its client with what came back.
//!
//! Up to RELAY_SOCKETS peers at a time, one connection each (client side,
//! local port from 49152..=65535, starting at a random one and counting up),
//! kept open between relays. A relay to a peer whose connection is gone
//! (closed by the peer, reset, timed out, never made) opens a new one; a
//! reused connection found dead during a relay is reopened once within the
//! same relay. One `req` is in flight per connection: a relay to a peer whose
//! connection serves another client's relay waits for it, and so does a relay
//! to a new peer while every connection is busy; otherwise a new peer takes
//! over the least recently used idle connection.
//!
//! Nothing blocks: a relay is a state of the control connection that asked
//! (`Pending`), advanced by `Relays::step` once per pass of the main loop;
//! that connection's further lines wait until the relay's reply is queued, so
//! replies stay in command order. The whole relay (waiting for a connection,
//! ARP, connecting, the peer's answer) has TIMEOUT_NS; a connection that timed
//! out or sent a bad answer is ended (`end`: a late answer must not be taken for
//! the next relay's), one with a peer's `bad ...` answer is kept.

use core::fmt::{self, Write};

use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{IpAddress, IpEndpoint, Ipv4Address};

use super::{Conn, Reply, LINE_MAX};
use crate::workloads::{parse_ipv4, parse_u64};
use crate::{blk, clock, net};

pub const RELAY_SOCKETS: usize = 4;
/// Answers are one short line; `req\n` is all that is sent.
const RELAY_RX: usize = 4096;
const RELAY_TX: usize = 1024;
pub const DEFAULT_PORT: u16 = 7000;
pub const TIMEOUT_NS: u64 = 2_000_000_000;
const EPHEMERAL_FIRST: u16 = 49152;

/// Where a relay goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    ip: [u8; 4],
    port: u16,
}

impl Peer {
    fn endpoint(self) -> IpEndpoint {
        let [a, b, c, d] = self.ip;
        IpEndpoint::new(IpAddress::Ipv4(Ipv4Address::new(a, b, c, d)), self.port)
    }
}

/// `A.B.C.D`, with `:PORT` when that is not 7000.
impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let [a, b, c, d] = self.ip;
        write!(f, "{}.{}.{}.{}", a, b, c, d)?;
        if self.port != DEFAULT_PORT {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// A control connection's relay.
pub enum Pending {
    None,
    /// Asked for; waits for a connection until the deadline (ns).
    Queued(Peer, u64),
    /// Handed to a connection (the slot knows its owner).
    InFlight,
    /// The reply, to be sent before anything else on the connection.
    Done(Reply),
}

/// What a relay came to.
enum Outcome {
    Seq(u64),
    Error(&'static str),
    /// The peer answered something else than `seq <n>` (e.g. `bad disk
    /// write: ...`).
    PeerSaid([u8; LINE_MAX], usize),
}

struct Slot {
    h: SocketHandle,
    /// The peer of the socket's connection (current or last).
    peer: Option<Peer>,
    /// The control connection whose relay this slot serves.
    owner: Option<usize>,
    deadline: u64,
    /// `req` is queued on the connection.
    sent: bool,
    /// The connection was opened for the current relay.
    fresh: bool,
    /// The connection was seen ESTABLISHED during the current relay.
    established: bool,
    line: [u8; LINE_MAX],
    len: usize,
    last_used: u64,
}

pub struct Relays {
    slots: [Slot; RELAY_SOCKETS],
    next_port: u16,
    ip: u32,
    mask: u32,
    gw: bool,
    /// Relays answered `relay <peer> seq <n>` / `relay error ...` (those
    /// refused at once included).
    pub ok: u64,
    pub errors: u64,
}

impl Relays {
    pub fn new(sockets: &mut SocketSet, cfg: &net::Net) -> Relays {
        let slots = core::array::from_fn(|_| Slot {
            h: sockets.add(net::tcp_socket(RELAY_RX, RELAY_TX)),
            peer: None,
            owner: None,
            deadline: 0,
            sent: false,
            fresh: false,
            established: false,
            line: [0; LINE_MAX],
            len: 0,
            last_used: 0,
        });
        let span = u64::from(u16::MAX - EPHEMERAL_FIRST) + 1;
        Relays {
            slots,
            next_port: EPHEMERAL_FIRST + (blk::mix(clock::rdtsc()) % span) as u16,
            ip: u32::from_be_bytes(cfg.ip),
            mask: u32::MAX
                .checked_shl(32 - u32::from(cfg.prefix))
                .unwrap_or(0),
            gw: cfg.gw.is_some(),
            ok: 0,
            errors: 0,
        }
    }

    /// The peer `A.B.C.D[:PORT]` names, or why it cannot be relayed to.
    pub fn parse(&self, arg: &[u8]) -> Result<Peer, &'static str> {
        if arg.is_empty() {
            return Err("missing address");
        }
        let (ip, port) = match arg.iter().position(|&b| b == b':') {
            Some(i) => (&arg[..i], parse_u64(&arg[i + 1..])),
            None => (arg, Some(u64::from(DEFAULT_PORT))),
        };
        let ip = parse_ipv4(ip).ok_or("bad address")?;
        let port = port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|&p| p != 0)
            .ok_or("bad port")?;
        let a = u32::from_be_bytes(ip);
        let local = a & self.mask == self.ip & self.mask;
        let unicast = !matches!(ip[0], 0 | 127 | 224..=255)
            && !(local
                && self.mask < u32::MAX - 1
                && (a | self.mask == u32::MAX || a & !self.mask == 0));
        if !unicast {
            return Err("bad address");
        }
        if a == self.ip {
            return Err("own address");
        }
        if !local && !self.gw {
            return Err("no route");
        }
        Ok(Peer { ip, port })
    }

    /// Drops the relay of control connection `conn` (its client is gone): the
    /// connection is aborted, as its answer would come too late.
    pub fn cancel(&mut self, conn: usize, sockets: &mut SocketSet) {
        for slot in self.slots.iter_mut() {
            if slot.owner == Some(conn) {
                end(sockets.get_mut::<tcp::Socket>(slot.h), slot.established);
                slot.owner = None;
            }
        }
    }

    /// One pass: hands queued relays to connections, advances every relay,
    /// and stores the finished ones' replies in their control connections.
    pub fn step(
        &mut self,
        now: u64,
        iface: &mut Interface,
        sockets: &mut SocketSet,
        conns: &mut [Conn],
    ) {
        for (i, c) in conns.iter_mut().enumerate() {
            let Pending::Queued(peer, deadline) = c.relay else {
                continue;
            };
            if now >= deadline {
                let why = Outcome::Error("timeout waiting for a free connection");
                c.relay = Pending::Done(self.reply(peer, why));
                continue;
            }
            if let Some(k) = self.pick(peer, sockets) {
                let slot = &mut self.slots[k];
                slot.owner = Some(i);
                slot.deadline = deadline;
                slot.sent = false;
                slot.fresh = false;
                slot.established = false;
                slot.len = 0;
                slot.last_used = now;
                c.relay = Pending::InFlight;
            }
        }
        for k in 0..RELAY_SOCKETS {
            let Some(i) = self.slots[k].owner else {
                // Idle: nothing is expected; a connection the peer closed is
                // closed too (it is reopened on the next relay).
                let s = sockets.get_mut::<tcp::Socket>(self.slots[k].h);
                if s.can_recv() {
                    let _ = s.recv(|b| (b.len(), ()));
                }
                if s.state() == tcp::State::CloseWait {
                    s.close();
                }
                continue;
            };
            let Some(peer) = self.slots[k].peer else {
                continue;
            };
            if let Some(outcome) = self.drive(k, peer, now, iface, sockets) {
                let slot = &mut self.slots[k];
                slot.owner = None;
                slot.last_used = now;
                conns[i].relay = Pending::Done(self.reply(peer, outcome));
            }
        }
    }

    fn reply(&mut self, peer: Peer, outcome: Outcome) -> Reply {
        let mut out = Reply::new();
        let _ = match outcome {
            Outcome::Seq(n) => {
                self.ok += 1;
                write!(out, "relay {} seq {}", peer, n)
            }
            Outcome::Error(why) => {
                self.errors += 1;
                write!(out, "relay error {}", why)
            }
            Outcome::PeerSaid(line, len) => {
                self.errors += 1;
                let text = core::str::from_utf8(&line[..len]).unwrap_or("<not UTF-8>");
                write!(out, "relay error peer said {}", text)
            }
        };
        out
    }

    /// The slot for a relay to `peer`: its own connection if it is idle (None
    /// while it is busy), else an unused or closed one, else the least
    /// recently used idle one (None while all are busy).
    fn pick(&mut self, peer: Peer, sockets: &SocketSet) -> Option<usize> {
        if let Some(k) = self.slots.iter().position(|s| s.peer == Some(peer)) {
            return self.slots[k].owner.is_none().then_some(k);
        }
        let unused = (0..RELAY_SOCKETS).find(|&k| {
            let s = &self.slots[k];
            s.owner.is_none() && (s.peer.is_none() || !sockets.get::<tcp::Socket>(s.h).is_open())
        });
        let k = unused.or_else(|| {
            (0..RELAY_SOCKETS)
                .filter(|&k| self.slots[k].owner.is_none())
                .min_by_key(|&k| self.slots[k].last_used)
        })?;
        self.slots[k].peer = Some(peer);
        Some(k)
    }

    /// A local port no other relay connection uses.
    fn ephemeral(&mut self, sockets: &SocketSet, k: usize) -> u16 {
        loop {
            let p = self.next_port;
            self.next_port = if p == u16::MAX {
                EPHEMERAL_FIRST
            } else {
                p + 1
            };
            let taken = self.slots.iter().enumerate().any(|(j, o)| {
                j != k
                    && sockets
                        .get::<tcp::Socket>(o.h)
                        .local_endpoint()
                        .is_some_and(|e| e.port == p)
            });
            if !taken {
                return p;
            }
        }
    }

    /// Advances slot `k`'s relay; its outcome once there is one.
    fn drive(
        &mut self,
        k: usize,
        peer: Peer,
        now: u64,
        iface: &mut Interface,
        sockets: &mut SocketSet,
    ) -> Option<Outcome> {
        let slot = &mut self.slots[k];
        let s = sockets.get_mut::<tcp::Socket>(slot.h);
        while s.can_recv() && slot.len < LINE_MAX {
            match s.recv_slice(&mut slot.line[slot.len..]) {
                Ok(n) if n > 0 => slot.len += n,
                _ => break,
            }
        }
        if !slot.sent {
            // Nothing asked yet: not an answer.
            slot.len = 0;
        }
        if let Some(nl) = slot.line[..slot.len].iter().position(|&b| b == b'\n') {
            let mut end = nl;
            while end > 0 && matches!(slot.line[end - 1], b'\r' | b' ' | b'\t') {
                end -= 1;
            }
            let line = &slot.line[..end];
            let outcome = match line.strip_prefix(b"seq ").and_then(parse_u64) {
                Some(n) => Outcome::Seq(n),
                None => {
                    let mut copy = [0u8; LINE_MAX];
                    copy[..end].copy_from_slice(line);
                    Outcome::PeerSaid(copy, end)
                }
            };
            slot.line.copy_within(nl + 1..slot.len, 0);
            slot.len -= nl + 1;
            return Some(outcome);
        }
        if slot.len == LINE_MAX {
            s.abort();
            return Some(Outcome::Error("answer too long"));
        }
        if now >= slot.deadline {
            end(s, slot.established);
            return Some(Outcome::Error(if slot.established {
                "timeout waiting for the answer"
            } else {
                "timeout connecting"
            }));
        }
        let state = s.state();
        let usable = matches!(
            state,
            tcp::State::SynSent | tcp::State::SynReceived | tcp::State::Established
        ) && s.remote_endpoint() == Some(peer.endpoint());
        if usable {
            if state == tcp::State::Established {
                slot.established = true;
                if !slot.sent && s.send_slice(b"req\n") == Ok(4) {
                    slot.sent = true;
                }
            }
            return None;
        }
        if slot.fresh {
            end(s, slot.established);
            return Some(Outcome::Error(if slot.established {
                "connection closed"
            } else {
                "connection refused"
            }));
        }
        if s.is_open() {
            // Another peer's, or closing: its RST leaves in this pass's
            // egress, the new connection is opened in the next pass.
            s.abort();
            return None;
        }
        let port = self.ephemeral(sockets, k);
        let slot = &mut self.slots[k];
        let s = sockets.get_mut::<tcp::Socket>(slot.h);
        if s.connect(iface.context(), peer.endpoint(), port).is_err() {
            return Some(Outcome::Error("cannot connect"));
        }
        slot.fresh = true;
        slot.established = false;
        slot.sent = false;
        slot.len = 0;
        None
    }
}

/// Ends a relay connection: one that was established is aborted (the RST
/// tells the peer to free its socket); one that never was is dropped without
/// a word, as an RST for a peer that never answered ARP would have the
/// interface ask for it every second, and its ARP rate limit is global.
fn end(s: &mut tcp::Socket, established: bool) {
    s.abort();
    if !established {
        // listen() resets the socket (connection tuple included), close()
        // takes it from LISTEN back to CLOSED before it is ever polled.
        let _ = s.listen(EPHEMERAL_FIRST);
        s.close();
    }
}
