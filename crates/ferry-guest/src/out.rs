//! Line output on COM1: each line is formatted into a buffer and written with one system call,
//! under a ring-3 spin lock so lines from different lanes never interleave.

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::sys;

static LOCK: AtomicBool = AtomicBool::new(false);

/// 1024-byte aligned so a line never crosses a page boundary (KVM's string I/O emulation works
/// page by page; on this host it exits to the VMM once per byte anyway).
#[repr(C, align(1024))]
struct LineBuf {
    buf: [u8; 1024],
    len: usize,
}

impl Write for LineBuf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let room = self.buf.len() - 1 - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Prints one line (a newline is appended; over-long lines are cut).
pub fn line(args: core::fmt::Arguments<'_>) {
    let mut b = LineBuf { buf: [0; 1024], len: 0 };
    let _ = b.write_fmt(args);
    b.buf[b.len] = b'\n';
    b.len += 1;
    while LOCK.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        core::hint::spin_loop();
    }
    sys::write(&b.buf[..b.len]);
    LOCK.store(false, Ordering::Release);
}

/// Writes `bytes` as they are (the caller ends them with a newline), under the same lock as
/// [`line`]: the hostile driver's serial flood.
pub fn raw(bytes: &[u8]) {
    while LOCK.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        core::hint::spin_loop();
    }
    sys::write(bytes);
    LOCK.store(false, Ordering::Release);
}
