//! The entry point of the stream-reader fuzz target in `fuzz/` (cargo-fuzz, libFuzzer) and of
//! the test that replays its committed corpus on every `cargo test`. Not part of the API.
//!
//! Random bytes almost never carry a right crc32c, so a fuzzer fed to the reader as is would
//! spend its runs on the checksum check. [`stream`] first rewrites every record's checksum and
//! every v3 CHECKPOINT's epoch count and crc to match the bytes (the reader's checks of them are
//! tested on their own), so the runs reach the record decoders; then it reads the stream to its
//! end or first error, as `ferry stream inspect` does.

use crate::{pad_len, record_crc, rtype, HEADER_LEN};

/// Reads `data` as a stream (its checksums made right first). Returns the records read.
pub fn stream(data: &[u8]) -> u64 {
    let fixed = with_checksums_fixed(data);
    match crate::inspect(&fixed[..], &mut std::io::sink()) {
        Ok(s) => s.records,
        Err(_) => 0,
    }
}

/// `data` with each record's trailer checksum, and each CHECKPOINT's epoch (v3 layout), made to
/// match its bytes; what does not parse as records is left as it is.
pub fn with_checksums_fixed(data: &[u8]) -> Vec<u8> {
    let mut b = data.to_vec();
    let mut off = HEADER_LEN;
    let (mut epoch_records, mut epoch_crc) = (0u32, 0u32);
    while off + 8 <= b.len() {
        let t = u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]]);
        let len = u32::from_le_bytes([b[off + 4], b[off + 5], b[off + 6], b[off + 7]]);
        let body = off + 8;
        let trailer = body + len as usize + pad_len(len);
        if trailer + 8 > b.len() {
            break;
        }
        if t == rtype::CHECKPOINT && len >= 16 {
            b[body + 8..body + 12].copy_from_slice(&epoch_records.to_le_bytes());
            b[body + 12..body + 16].copy_from_slice(&epoch_crc.to_le_bytes());
        }
        let crc = record_crc(t, len, &[&b[body..body + len as usize]]);
        b[trailer..trailer + 4].copy_from_slice(&crc.to_le_bytes());
        if t == rtype::CHECKPOINT {
            (epoch_records, epoch_crc) = (0, 0);
        } else {
            epoch_records = epoch_records.wrapping_add(1);
            epoch_crc = crc32c::crc32c_append(epoch_crc, &crc.to_le_bytes());
        }
        off = trailer + 8;
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A written stream is unchanged by the fix-up (its checksums were right), and one with a
    /// record's checksum broken reads again once fixed.
    #[test]
    fn the_fix_up_keeps_right_streams_and_mends_broken_checksums() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut streams = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let good = std::fs::read(&p).unwrap();
            if !good.starts_with(&crate::MAGIC) || crate::inspect(&good[..], &mut std::io::sink()).is_err() {
                continue; // not a whole stream (the post-copy page stream has no header)
            }
            streams += 1;
            assert_eq!(with_checksums_fixed(&good), good, "{}", p.display());
            let mut bad = good.clone();
            let last = bad.len() - 8;
            bad[last] ^= 1;
            assert!(crate::inspect(&bad[..], &mut std::io::sink()).is_err(), "{}", p.display());
            assert!(stream(&bad) > 0, "{}", p.display());
        }
        assert!(streams >= 5, "only {streams} fixture streams");
    }
}
