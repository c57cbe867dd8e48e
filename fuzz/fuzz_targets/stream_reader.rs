//! A migration stream or snapshot file from a hostile peer: header, records, page batches,
//! state sections as bytes (checksums made right first: ferry_stream::fuzzing).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_stream::fuzzing::stream(data);
});
