//! The entry points of the fuzz targets in `fuzz/` (cargo-fuzz, libFuzzer) and of the tests that
//! replay their committed corpora on every `cargo test`: each takes arbitrary bytes, the way a
//! hostile peer or guest would send them, and must neither panic, hang, nor allocate without
//! bound. Not part of Ferry's API.

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::devices::serial::SerialSection;
use crate::devices::virtio_blk::state::{BlockState, MAX_SEGMENTS};
use crate::persist::{decode_section, SectionKey, SectionState};
use crate::poison::PoisonSet;
use crate::vcpu_state::VcpuState;
use crate::vm_state::VmState;

/// A state section as a stream brings it: byte 0 picks the section kind (vCPU, VM, virtio-blk,
/// serial), bytes 1..5 its version (LE), the rest its body. A body that decodes must encode at
/// this Ferry's version and decode again to the same encoding (nothing read is lost or made up).
pub fn state_section(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else { return };
    let Some((version, body)) = rest.split_first_chunk::<4>() else { return };
    let version = u32::from_le_bytes(*version);
    match kind % 4 {
        0 => round_trip::<VcpuState>(SectionKey::Vcpu(0), version, body),
        1 => round_trip::<VmState>(SectionKey::Vm, version, body),
        2 => round_trip::<BlockState>(SectionKey::Device { id: "virtio-blk".into(), instance: 0 }, version, body),
        _ => round_trip::<SerialSection>(SectionKey::Device { id: "serial".into(), instance: 0 }, version, body),
    }
}

fn round_trip<S: SectionState>(key: SectionKey, version: u32, body: &[u8]) {
    let Ok(s) = decode_section::<S>(&key, version, body) else { return };
    let once = s.encode();
    let again = match decode_section::<S>(&key, S::VERSION, &once) {
        Ok(a) => a.encode(),
        Err(e) => panic!("{key}: a section this Ferry encoded does not decode: {e}"),
    };
    assert!(once == again, "{key}: encode, decode, encode changed the section");
}

/// Bytes of guest memory the virtio-blk target works in.
const MEM: usize = 64 << 10;

/// A virtio-blk queue a hostile guest set up: bytes 0..2 the queue size (modulo 32), 2..14 the descriptor
/// table, avail ring and used ring addresses (u32 LE each), 14..22 a broken page's frame (or
/// none if it is past guest memory), the rest guest memory from address 0. The device takes
/// every chain the driver made available as its device thread does (parse, bounds, broken
/// pages), writes the error status of the malformed ones and puts every head on the used ring.
/// Every request taken must lie in guest memory, off the broken page, within the segment
/// bound. Returns the chains taken as requests and as errors.
pub fn virtio_blk_queue(data: &[u8]) -> (usize, usize) {
    let Some((head, image)) = data.split_first_chunk::<22>() else { return (0, 0) };
    // One guest memory per thread, all of it rewritten each run (mapping it anew each time
    // would be most of a run's cost).
    thread_local! {
        static MEMORY: Option<GuestMemoryMmap> = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).ok();
    }
    MEMORY.with(|m| match m {
        Some(mem) => queue_in(mem, head, image),
        None => (0, 0),
    })
}

fn queue_in(mem: &GuestMemoryMmap, head: &[u8; 22], image: &[u8]) -> (usize, usize) {
    let u32_at = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    let n = image.len().min(MEM);
    let Ok(host) = mem.get_host_address(GuestAddress(0)) else { return (0, 0) };
    // SAFETY: `host` is the start of the one MEM-byte region of `mem`, which this thread alone
    // uses and nothing else references now; the first `n` bytes get the image, the rest zeros
    // (vm-memory's volatile copy of 64 KiB was most of a run's cost).
    unsafe {
        std::ptr::copy_nonoverlapping(image.as_ptr(), host, n);
        std::ptr::write_bytes(host.add(n), 0, MEM - n);
    }
    let poison = PoisonSet::new();
    let broken = u64::from_le_bytes([head[14], head[15], head[16], head[17], head[18], head[19], head[20], head[21]]);
    if broken < (MEM / 4096) as u64 {
        poison.mark(broken, crate::poison::PoisonCause::Stream);
    }
    let Ok(mut q) = Queue::new(crate::devices::virtio_blk::QUEUE_MAX_SIZE) else { return (0, 0) };
    // Sizes up to 16 (a power of two, or the queue is invalid): the chain walks grow with the
    // square of the size, and larger queues add runtime, not paths.
    q.set_size(u16::from_le_bytes([head[0], head[1]]) % 32);
    q.set_desc_table_address(Some(u32_at(2)), Some(0));
    q.set_avail_ring_address(Some(u32_at(6)), Some(0));
    q.set_used_ring_address(Some(u32_at(10)), Some(0));
    q.set_ready(true);
    if !q.is_valid(mem) {
        return (0, 0);
    }
    let (taken, refused) = crate::devices::virtio_blk::take_available(mem, &poison, &mut q);
    let clean = |gpa: u64, len: u64| {
        GuestMemoryBackend::check_range(mem, GuestAddress(gpa), len as usize)
            && (gpa / 4096..=(gpa + len.max(1) - 1) / 4096).all(|g| g != broken)
    };
    for r in &taken {
        assert!(clean(r.status_gpa, 1), "a request's status byte at {:#x} is outside memory or broken", r.status_gpa);
        assert!(r.segments.len() <= MAX_SEGMENTS, "a request of {} segments", r.segments.len());
        for s in &r.segments {
            assert!(
                clean(s.gpa, u64::from(s.len)),
                "a buffer at {:#x}+{:#x} is outside memory or broken",
                s.gpa,
                s.len
            );
        }
    }
    (taken.len(), refused)
}
