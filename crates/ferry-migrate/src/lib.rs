//! Moving a machine: the pre-copy engine (source), the incoming side (destination), the
//! transports they talk over and the small return-path protocol.
//!
//! ```text
//!  source                                   destination (ferry run --incoming URI)
//!  connect ───────────────────────────────▶ accept
//!  HELLO (format versions, features) ─────▶
//!                         ◀──────────────────── HELLO | NACK (no common format)
//!  stream: header, MACHINE_CONFIG, CPU_MODEL ─▶ check the CPU before anything is loaded
//!          PAGE_BATCH… (iteration 1..n, guest running)
//!  pause vCPUs
//!          PAGE_BATCH… (final pass), VM_STATE,
//!          VCPU_STATE×n, DEVICE_STATE…, END ──▶ load pages, rebuild the machine
//!                         ◀──────────────────── ACK (load timings) | NACK (error)
//!  COMMIT ────────────────────────────────▶ resume vCPUs
//!  exit (guest moved)
//! ```
//!
//! With post-copy (`postcopy.rs`) the final pass sends a POSTCOPY record (the pages still dirty)
//! instead of those pages; after COMMIT the source serves them in a page stream on the same
//! connection, the ones the destination's vCPUs wait for first.
//!
//! Until the source has sent COMMIT it owns the guest: any failure before that point resumes the
//! source with its dirty bits intact, and the destination discards what it received.

pub mod channels;
pub mod copy_priority;
pub mod destination;
pub mod dirty_limit;
pub mod handover;
pub mod postcopy;
pub mod protocol;
pub mod records;
pub mod replicate;
pub mod snapshot;
pub mod source;
pub mod standby;
pub mod storage;
pub mod throttle;
pub mod tls;
pub mod transport;
