//! A hostile guest's virtio-blk queue: descriptor table, avail and used rings and buffers in its
//! memory, taken as the device thread takes them (ferry_vmm::fuzzing).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_vmm::fuzzing::virtio_blk_queue(data);
});
