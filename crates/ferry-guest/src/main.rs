//! Ferry's built-in guest.
//!
//! A bare-metal x86-64 PVH program. The ring-0 kernel (`boot.s`) sets up the machine, starts the
//! application processors and drops every CPU into ring 3, where this crate's code runs natively:
//! each CPU runs one *lane* of the workload, which fills its share of the working set, then
//! dirties pages at the configured rate while continuously verifying the pages it is not writing.
//! With `disk=1`, lane 0 also drives a virtio-blk device (`virtio`, polled, no interrupts) with a
//! verifying disk workload (`disk`).
//! The line formats printed on COM1 are specified in `docs/guest.md`; tests and benchmarks read
//! them.
#![no_std]
#![no_main]

mod clock;
mod config;
mod disk;
mod hostile;
mod mem;
mod out;
mod sys;
mod virtio;
mod workload;

use core::arch::global_asm;
use core::sync::atomic::{AtomicU32, Ordering};

global_asm!(include_str!("boot.s"), options(att_syntax));

/// Most CPUs the kernel brings up (matches `MAX_CPUS` in boot.s).
pub const MAX_CPUS: usize = 8;

/// Application processors that reached ring 3.
static APS_ONLINE: AtomicU32 = AtomicU32::new(0);

/// Entry from ring 0 on every CPU: `cpu` is the CPU's index, `start_info` the PVH start info
/// (only meaningful on CPU 0).
#[no_mangle]
pub extern "C" fn user_main(cpu: u64, start_info: u64) -> ! {
    if cpu == 0 {
        bsp_main(start_info)
    } else {
        APS_ONLINE.fetch_add(1, Ordering::AcqRel);
        workload::ap_main(cpu as usize)
    }
}

/// Entry from the ring-0 #MC handler: the workload on CPU `cpu` touched broken page `gpa`
/// (from MCi_ADDR; 0 if no bank held it). What the lane was doing is abandoned.
#[no_mangle]
pub extern "C" fn user_mce(cpu: u64, gpa: u64) -> ! {
    workload::machine_check(cpu as usize, gpa)
}

fn bsp_main(start_info: u64) -> ! {
    let clock = match clock::Clock::from_kvmclock() {
        Ok(c) => c,
        Err(e) => fatal(format_args!("GUEST-ERROR no usable clock: {e}")),
    };
    // SAFETY: start_info is the PVH start info address handed over by the loader, identity
    // mapped and readable from ring 3 (boot.s maps the low 4 GiB user-accessible).
    let info = match unsafe { config::StartInfo::read(start_info) } {
        Ok(i) => i,
        Err(e) => fatal(format_args!("GUEST-ERROR bad PVH start info: {e}")),
    };
    let cfg = match config::Config::parse(info.cmdline) {
        Ok(c) => c,
        Err(e) => fatal(format_args!("GUEST-ERROR {e}")),
    };
    // Give the application processors time to come up (they run emulated ring-0 code first).
    let deadline = clock.now() + clock.ms_to_cycles(100);
    while clock.now() < deadline {
        core::hint::spin_loop();
    }
    let lanes = 1 + (APS_ONLINE.load(Ordering::Acquire) as usize).min(MAX_CPUS - 1);
    workload::bsp_main(cfg, &info, clock, lanes)
}

/// Prints the message and ends the guest with exit code 2.
pub fn fatal(args: core::fmt::Arguments<'_>) -> ! {
    out::line(args);
    sys::exit(2)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    out::line(format_args!("GUEST-PANIC {info}"));
    sys::exit(4)
}
