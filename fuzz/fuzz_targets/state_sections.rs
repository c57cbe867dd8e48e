//! A state section (vCPU, VM, virtio-blk, serial) as a stream brings it: decoded, and if it
//! decodes, re-encoded and decoded again to the same bytes (ferry_vmm::fuzzing).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_vmm::fuzzing::state_section(data);
});
