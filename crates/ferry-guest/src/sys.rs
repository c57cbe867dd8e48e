//! System calls into the ring-0 kernel: `ud2` with the call number in rax (see boot.s).

use core::arch::asm;

/// Writes bytes to COM1 (one exit for the whole buffer).
pub fn write(bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    // SAFETY: the kernel's #UD handler reads `len` bytes at `ptr` (a valid slice), writes them to
    // the serial port, and returns past the ud2 with all registers but flags preserved.
    unsafe {
        asm!("ud2", in("rax") 1u64, in("rdi") bytes.as_ptr(), in("rsi") bytes.len(),
             options(nostack, readonly));
    }
}

/// Ends the guest: Ferry exits with `code`, QEMU with isa-debug-exit does too.
pub fn exit(code: u8) -> ! {
    // SAFETY: the exit call never returns (the kernel halts the CPU after the port write).
    unsafe {
        asm!("ud2", in("rax") 2u64, in("rdi") code as u64, options(nostack, noreturn));
    }
}

/// The time-stamp counter (native in ring 3 on this host).
#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc reads a counter; it has no memory effects.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack));
    }
    ((hi as u64) << 32) | lo as u64
}
