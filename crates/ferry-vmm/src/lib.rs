//! The machine: a KVM virtual machine with memfd-backed guest RAM, vCPU threads, the devices a
//! guest needs (COM1, the shutdown port), PVH boot, and the state sections that let a running
//! machine be saved and rebuilt elsewhere.
//!
//! This crate owns everything that touches KVM. It never decides *when* to move a guest (that is
//! `ferry-migrate`), and it never writes guest memory behind the dirty log's back.

pub mod boot;
pub mod cpu;
pub mod devices;
pub mod dirty_log;
pub mod dirty_rate;
pub mod dirty_ring;
#[doc(hidden)]
pub mod fuzzing;
pub mod kvm_ext;
pub mod machine_state;
pub mod memory;
pub mod persist;
pub mod poison;
pub mod seccomp;
pub mod state_codec;
pub mod testing;
pub mod uffd;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
pub mod vm_state;

pub use memory::GuestRam;
pub use vm::{ExitReason, Vm, VmConfig};
