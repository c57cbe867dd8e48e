//! The committed corpus of the stream-reader fuzz target (fuzz/corpus/stream_reader), replayed
//! on every `cargo test`: each input read as a stream after its checksums are made right, as
//! the fuzz target reads it, with no panic (docs/reliability.md).
#![allow(clippy::unwrap_used)]

#[test]
fn the_stream_reader_fuzz_corpus_replays_without_a_panic() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/stream_reader");
    let (mut n, mut read) = (0, 0);
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let data = std::fs::read(e.unwrap().path()).unwrap();
        read += u64::from(ferry_stream::fuzzing::stream(&data) > 0);
        n += 1;
    }
    assert!(n >= 50, "only {n} inputs in {}", dir.display());
    assert!(read > 0, "no input of the corpus reads as a stream: it exercises only the header check");
}
