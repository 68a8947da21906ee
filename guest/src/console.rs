//! Serial console (8250 at 0x3f8). Each line is formatted at CPL3 and sent
//! with a single `rep outsb` system call, under a spinlock so lines from
//! several CPUs never interleave.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::sys;

const COM1: u16 = 0x3f8;
const LINE_MAX: usize = 1400;

static LOCK: AtomicBool = AtomicBool::new(false);

pub fn init() {
    sys::outb(COM1 + 1, 0x00); // no UART interrupts
    sys::outb(COM1 + 3, 0x80); // DLAB
    sys::outb(COM1, 0x01); // 115200 baud
    sys::outb(COM1 + 1, 0x00);
    sys::outb(COM1 + 3, 0x03); // 8N1
    sys::outb(COM1 + 2, 0xc7); // FIFO on, cleared
    sys::outb(COM1 + 4, 0x03); // DTR RTS
}

struct Line {
    buf: [u8; LINE_MAX],
    len: usize,
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Keep one byte for the newline; overlong lines are cut, not lost.
        let room = LINE_MAX - 1 - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

pub fn print_line(args: fmt::Arguments) {
    let mut line = Line {
        buf: [0; LINE_MAX],
        len: 0,
    };
    let _ = line.write_fmt(args);
    line.buf[line.len] = b'\n';
    line.len += 1;
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    sys::outs(COM1, &line.buf[..line.len]);
    LOCK.store(false, Ordering::Release);
}

/// A panic may happen while this CPU holds the lock: wait a little for
/// another holder, then take the console regardless.
pub fn force_unlock_after_spin() {
    for _ in 0..10_000_000u32 {
        if !LOCK.load(Ordering::Relaxed) {
            return;
        }
        core::hint::spin_loop();
    }
    LOCK.store(false, Ordering::Release);
}

/// Prints bytes as text, replacing anything that is not printable ASCII.
pub struct Bytes<'a>(pub &'a [u8]);

impl fmt::Display for Bytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for &b in self.0 {
            let c = if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            };
            f.write_char(c)?;
        }
        Ok(())
    }
}

macro_rules! println {
    ($($t:tt)*) => {
        $crate::console::print_line(format_args!($($t)*))
    };
}
