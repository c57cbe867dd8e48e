//! The committed corpora of the state-section and virtio-blk queue fuzz targets
//! (fuzz/corpus/state_sections, fuzz/corpus/virtio_blk_queue), replayed on every `cargo test`
//! through the same entry points the fuzz targets call (ferry_vmm::fuzzing), with their checks:
//! a decoded section survives a re-encode; a request taken lies in guest memory, off broken pages
//! (docs/reliability.md).
#![allow(clippy::unwrap_used)]

fn corpus(name: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(name);
    let v: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(v.len() >= 20, "only {} inputs in {}", v.len(), dir.display());
    v
}

#[test]
fn the_state_section_fuzz_corpus_replays_without_a_panic() {
    for data in corpus("state_sections") {
        ferry_vmm::fuzzing::state_section(&data);
    }
}

#[test]
fn the_virtio_blk_queue_fuzz_corpus_replays_without_a_panic() {
    let (mut taken, mut refused) = (0, 0);
    for data in corpus("virtio_blk_queue") {
        let (t, r) = ferry_vmm::fuzzing::virtio_blk_queue(&data);
        taken += t;
        refused += r;
    }
    // The corpus holds well-formed requests and malformed ones: both paths are replayed.
    assert!(taken > 0 && refused > 0, "requests taken {taken}, refused {refused}");
}
