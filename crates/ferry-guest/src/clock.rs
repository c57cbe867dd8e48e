//! Time from the TSC, with its frequency taken from the kvmclock page the kernel registered.

use core::sync::atomic::{fence, Ordering};

use crate::sys::rdtsc;

extern "C" {
    static pvclock: [u8; 32];
}

/// TSC-based clock.
#[derive(Clone, Copy)]
pub struct Clock {
    /// TSC ticks per second.
    pub hz: u64,
    /// TSC at boot.
    pub t0: u64,
}

impl Clock {
    /// Reads `tsc_to_system_mul`/`tsc_shift` from kvmclock and derives the TSC frequency.
    pub fn from_kvmclock() -> Result<Clock, &'static str> {
        // updates; we read it with volatile loads and the version protocol.
        let base = core::ptr::addr_of!(pvclock) as *const u8;
        for _ in 0..1_000_000 {
            // SAFETY: offsets within the 32-byte pvclock_vcpu_time_info structure.
            let (v1, mul, shift, v2) = unsafe {
                let v1 = core::ptr::read_volatile(base as *const u32);
                fence(Ordering::Acquire);
                let mul = core::ptr::read_volatile(base.add(24) as *const u32);
                let shift = core::ptr::read_volatile(base.add(28) as *const i8);
                fence(Ordering::Acquire);
                let v2 = core::ptr::read_volatile(base as *const u32);
                (v1, mul, shift, v2)
            };
            if v1 == v2 && v1 & 1 == 0 && v1 != 0 && mul != 0 {
                // ns = ((ticks << shift) * mul) >> 32, so hz = 1e9 * 2^32 / (mul * 2^shift).
                let num: u128 = 1_000_000_000u128 << 32;
                let den: u128 = if shift >= 0 { (mul as u128) << shift } else { (mul as u128) >> (-shift) };
                if den == 0 {
                    return Err("kvmclock reports a zero multiplier");
                }
                let hz = (num / den) as u64;
                return Ok(Clock { hz, t0: rdtsc() });
            }
            core::hint::spin_loop();
        }
        Err("kvmclock page was never filled in (no KVM clock?)")
    }

    pub fn now(&self) -> u64 {
        rdtsc()
    }

    pub fn ms_to_cycles(&self, ms: u64) -> u64 {
        self.hz / 1000 * ms
    }

    pub fn us_to_cycles(&self, us: u64) -> u64 {
        ((self.hz as u128 * us as u128) / 1_000_000) as u64
    }

    pub fn cycles_to_us(&self, c: u64) -> u64 {
        ((c as u128 * 1_000_000) / self.hz as u128) as u64
    }

    /// Milliseconds since boot.
    pub fn ms_since_boot(&self) -> u64 {
        ((rdtsc().wrapping_sub(self.t0) as u128 * 1000) / self.hz as u128) as u64
    }
}
