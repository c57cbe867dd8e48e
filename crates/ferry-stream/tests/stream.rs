//! The stream format: round trips, every rejection the spec promises, truncation at every byte,
//! and the golden fixture of each format version.
#![allow(clippy::unwrap_used)]

use ferry_stream::*;
use proptest::prelude::*;

fn page(seed: u8) -> Vec<u8> {
    (0..PAGE_SIZE).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// The golden stream: header, machine config, a batch with all four page types, vCPU, VM and
/// device state, a checkpoint, END.
fn golden_stream() -> Vec<u8> {
    golden_stream_of(1)
}

/// The golden stream of a format version (2 adds CPU_MODEL after the machine config).
fn golden_stream_of(version: u32) -> Vec<u8> {
    let h = StreamHeader {
        format_version: version,
        flags: StreamFlags::empty(),
        page_size: 4096,
        writer_version: (0, 1, 0),
    };
    let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
    w.machine_config(&MachineConfig { memory_bytes: 64 << 20, vcpus: 2, regions: vec![(0, 64 << 20)] }).unwrap();
    if version >= 2 {
        w.cpu_model(&CpuModel {
            tsc_khz: 2_100_000,
            xsave_size: 4096,
            cpuid: vec![
                CpuidEntry {
                    function: 0,
                    index: 0,
                    flags: 0,
                    eax: 0xd,
                    ebx: 0x756e_6547,
                    ecx: 0x6c65_746e,
                    edx: 0x4965_6e69,
                },
                CpuidEntry { function: 7, index: 0, flags: 1, eax: 0, ebx: 0x29, ecx: 0, edx: 0 },
            ],
        })
        .unwrap();
    }
    let (a, b) = (page(1), page(2));
    w.page_batch(
        &[
            (0x100, PageType::Normal),
            (0x101, PageType::Zero),
            (0x102, PageType::Broken),
            (0x103, PageType::Discarded),
            (0x104, PageType::Normal),
        ],
        &[&a, &b],
    )
    .unwrap();
    w.vcpu_state(1, 1, b"vcpu-one").unwrap();
    w.vm_state(1, b"vm").unwrap();
    w.device_state("serial", 0, 1, b"uart").unwrap();
    w.checkpoint(7).unwrap();
    w.end().unwrap();
    w.into_inner()
}

fn read_all(b: &[u8]) -> Result<Vec<String>, StreamError> {
    let mut r = StreamReader::new(b)?;
    let mut out = Vec::new();
    loop {
        let rec = r.next_record()?;
        let s = match rec {
            Record::MachineConfig(c) => format!("config {} {} {:?}", c.memory_bytes, c.vcpus, c.regions),
            Record::PageBatch(pb) => {
                let items: Vec<String> = pb
                    .iter()
                    .map(|(g, t, d)| {
                        format!(
                            "{g:#x}:{t:?}:{}",
                            d.map(|d| d[..4].iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","))
                                .unwrap_or_default()
                        )
                    })
                    .collect();
                format!("batch {}", items.join(" "))
            }
            Record::VcpuState { id, version, data } => {
                format!("vcpu {id} v{version} {}", String::from_utf8_lossy(data))
            }
            Record::VmState { version, data } => format!("vm v{version} {}", String::from_utf8_lossy(data)),
            Record::DeviceState { id, instance, version, data } => {
                format!("dev {id}#{instance} v{version} {}", String::from_utf8_lossy(data))
            }
            Record::Checkpoint(s) => format!("checkpoint {s}"),
            Record::SnapshotInfo(i) => format!(
                "snapshot {:?} id {:02x} parent {:02x} crc {:#x} t {} from {:?}",
                i.kind, i.id[0], i.parent_id[0], i.parent_meta_crc, i.created_unix_ms, i.parent_path
            ),
            Record::RamMap(m) => format!(
                "ram_map {} gpa {:#x} {} pages at {:#x} present {:x?} zero {:x?} crcs {:x?}",
                m.region, m.gpa, m.npages, m.data_offset, m.present, m.zero, m.crcs
            ),
            Record::CpuModel(m) => format!("cpu {} kHz xsave {} cpuid {:x?}", m.tsc_khz, m.xsave_size, m.cpuid),
            Record::BrokenPages(g) => format!("broken {g:x?}"),
            Record::Postcopy { session, runs } => format!("postcopy {session:#x} {runs:x?}"),
            Record::Channels { count, session } => format!("channels {count} {session:#x}"),
            Record::RamReference(r) => format!("ramref {r:?}"),
            Record::FinalPass => "final pass".to_string(),
            Record::DiskConfig(c) => format!("disks {:?}", c.sectors),
            Record::DiskBlocks(b) => format!(
                "blocks {} {:#x}+{:#x} {}",
                b.disk,
                b.offset,
                b.len,
                b.data.map(|d| format!("data {}", d[0])).unwrap_or_else(|| "zeros".into())
            ),
            Record::Heartbeat => "heartbeat".to_string(),
            Record::DiskMap(m) => format!("disk_map {} {} bytes {} blocks", m.region, m.gpa, m.npages),
            Record::SkippedOptional { rtype, len } => format!("skipped {rtype:#x} {len}"),
            Record::End => {
                out.push("end".into());
                return Ok(out);
            }
        };
        out.push(s);
    }
}

#[test]
fn golden_v1_fixture_is_what_this_version_writes_and_reads_back() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v1-basic.bin");
    let written = golden_stream();
    if std::env::var("FERRY_BLESS").is_ok() {
        std::fs::write(path, &written).unwrap();
    }
    let fixture = std::fs::read(path).unwrap();

    let decoded = read_all(&fixture).unwrap();

    assert_eq!(written, fixture, "the writer no longer produces the v1 fixture byte for byte");
    assert_eq!(
        decoded,
        vec![
            "config 67108864 2 [(0, 67108864)]".to_string(),
            "batch 0x100:Normal:1,32,63,94 0x101:Zero: 0x102:Broken: 0x103:Discarded: 0x104:Normal:2,33,64,95".into(),
            "vcpu 1 v1 vcpu-one".into(),
            "vm v1 vm".into(),
            "dev serial#0 v1 uart".into(),
            "checkpoint 7".into(),
            "end".into(),
        ]
    );
}

#[test]
fn golden_v2_fixture_is_what_this_version_writes_and_reads_back() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v2-basic.bin");
    let written = golden_stream_of(2);
    if std::env::var("FERRY_BLESS").is_ok() {
        std::fs::write(path, &written).unwrap();
    }
    let fixture = std::fs::read(path).unwrap();

    let decoded = read_all(&fixture).unwrap();

    assert_eq!(written, fixture, "the writer no longer produces the v2 fixture byte for byte");
    assert_eq!(decoded[1], "cpu 2100000 kHz xsave 4096 cpuid [CpuidEntry { function: 0, index: 0, flags: 0, eax: d, ebx: 756e6547, ecx: 6c65746e, edx: 49656e69 }, CpuidEntry { function: 7, index: 0, flags: 1, eax: 0, ebx: 29, ecx: 0, edx: 0 }]");
    assert_eq!(decoded.len(), 8);
}

/// The version 3 golden stream: a checkpointed stream (replication) with two epochs, disk
/// records, a heartbeat between the epochs, END.
fn golden_v3_checkpointed() -> Vec<u8> {
    let h = StreamHeader {
        format_version: 3,
        flags: StreamFlags::CHECKPOINTED,
        page_size: 4096,
        writer_version: (0, 1, 0),
    };
    let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
    w.machine_config(&MachineConfig { memory_bytes: 64 << 20, vcpus: 1, regions: vec![(0, 64 << 20)] }).unwrap();
    w.cpu_model(&CpuModel {
        tsc_khz: 2_100_000,
        xsave_size: 4096,
        cpuid: vec![CpuidEntry { function: 1, index: 0, flags: 0, eax: 0x800f12, ebx: 0, ecx: 0, edx: 0 }],
    })
    .unwrap();
    w.disk_config(&DiskConfig { sectors: vec![2048] }).unwrap();
    w.page_batch(&[(0x10, PageType::Normal), (0x11, PageType::Zero)], &[&page(3)]).unwrap();
    w.disk_blocks(0, 0, 512, Some(&[9u8; 512])).unwrap();
    w.disk_blocks(0, 4096, 8192, None).unwrap();
    w.vm_state(1, b"vm").unwrap();
    w.vcpu_state(0, 2, b"vcpu").unwrap();
    w.device_state("serial", 0, 1, b"uart").unwrap();
    w.checkpoint(0).unwrap();
    w.heartbeat().unwrap();
    w.page_batch(&[(0x10, PageType::Normal)], &[&page(4)]).unwrap();
    w.vm_state(1, b"vm").unwrap();
    w.checkpoint(1).unwrap();
    w.end().unwrap();
    w.into_inner()
}

#[test]
fn golden_v3_checkpointed_fixture_is_what_this_version_writes_and_reads_back() {
    assert_eq!(FORMAT_VERSION, 3, "a new format version needs its own golden fixture");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v3-checkpointed.bin");
    let written = golden_v3_checkpointed();
    if std::env::var("FERRY_BLESS").is_ok() {
        std::fs::write(path, &written).unwrap();
    }
    let fixture = std::fs::read(path).unwrap();

    let decoded = read_all(&fixture).unwrap();

    assert_eq!(written, fixture, "the writer no longer produces the v3 fixture byte for byte");
    assert_eq!(
        decoded[2..],
        [
            "disks [2048]",
            "batch 0x10:Normal:3,34,65,96 0x11:Zero:",
            "blocks 0 0x0+0x200 data 9",
            "blocks 0 0x1000+0x2000 zeros",
            "vm v1 vm",
            "vcpu 0 v2 vcpu",
            "dev serial#0 v1 uart",
            "checkpoint 0",
            "heartbeat",
            "batch 0x10:Normal:4,35,66,97",
            "vm v1 vm",
            "checkpoint 1",
            "end",
        ]
    );
}

/// Seed 004's fourth case: a checkpointed stream from another format version is refused at its
/// header, naming both versions, before any record is read.
#[test]
fn a_checkpointed_stream_of_another_version_is_refused_at_the_header() {
    let mut b = golden_v3_checkpointed();
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    let e = StreamReader::new(&b[..]).err().unwrap();
    assert!(matches!(e, StreamError::CheckpointedVersion { found: 2, ours: 3 }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("version 2") && msg.contains("version 3"), "{msg}");
    // The same stream without the flag is a plain version 2 stream: read.
    let plain = golden_stream_of(2);
    assert!(read_all(&plain).is_ok());
}

/// An epoch that lost a record (or gained one) fails at its CHECKPOINT: the receiver never takes
/// it for a consistent state.
#[test]
fn a_checkpoint_whose_epoch_lost_a_record_is_refused() {
    let h = StreamHeader::new(StreamFlags::CHECKPOINTED);
    // Two streams that differ only in one record of the second epoch; splice the first's
    // CHECKPOINT after the second's shorter epoch.
    let mut full = StreamWriter::new(Vec::new(), &h).unwrap();
    full.vm_state(1, b"a").unwrap();
    full.checkpoint(0).unwrap();
    let cut = full.bytes_written() as usize;
    full.vm_state(1, b"b").unwrap();
    let dropped_at = full.bytes_written() as usize;
    full.vm_state(1, b"c").unwrap();
    full.checkpoint(1).unwrap();
    let bytes = full.into_inner();
    let mut spliced = bytes[..dropped_at].to_vec();
    // Drop the record "c": the checkpoint after it says 2 records.
    let ckpt_len = 8 + 16 + 8;
    spliced.extend_from_slice(&bytes[bytes.len() - ckpt_len..]);
    let mut r = StreamReader::new(&spliced[..]).unwrap();
    assert!(matches!(r.next_record().unwrap(), Record::VmState { .. }));
    assert!(matches!(r.next_record().unwrap(), Record::Checkpoint(0)));
    assert!(matches!(r.next_record().unwrap(), Record::VmState { .. }));
    match r.next_record() {
        Err(StreamError::EpochMismatch { seq: 1, want_records: 2, got_records: 1, .. }) => {}
        other => panic!("expected an epoch mismatch, got {other:?}"),
    }
    assert!(cut < dropped_at);
}

#[test]
fn disk_records_refuse_partial_sectors_and_lengths_that_do_not_match() {
    let h = StreamHeader::new(StreamFlags::empty());
    let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
    assert!(w.disk_blocks(0, 100, 512, None).is_err());
    assert!(w.disk_blocks(0, 0, 512, Some(&[0; 100])).is_err());
    assert!(w.disk_config(&DiskConfig { sectors: vec![] }).is_err());
    // A body that claims more data than it has.
    w.raw_record(
        ferry_stream::rtype::DISK_BLOCKS,
        &[&0u32.to_le_bytes()[..], &0u32.to_le_bytes(), &0u64.to_le_bytes(), &4096u64.to_le_bytes(), &[1; 512]]
            .concat(),
    )
    .unwrap();
    w.end().unwrap();
    let e = read_all(&w.into_inner()).unwrap_err();
    assert!(e.to_string().contains("data extent of 4096 bytes"), "{e}");
}

#[test]
fn truncation_at_every_byte_is_an_error_never_a_panic_or_an_end() {
    let s = golden_stream();
    for n in 0..s.len() {
        assert!(read_all(&s[..n]).is_err(), "prefix of {n} bytes read as complete");
    }
}

#[test]
fn truncation_at_a_record_boundary_says_end_is_missing() {
    let s = golden_stream();
    let cut = s.len() - 16; // END is 16 bytes
    let e = read_all(&s[..cut]).unwrap_err();
    assert!(matches!(e, StreamError::MissingEnd { .. }), "{e}");
}

#[test]
fn bad_magic_is_refused() {
    let mut s = golden_stream();
    s[0] = b'X';
    assert!(matches!(read_all(&s), Err(StreamError::BadMagic(_))));
}

#[test]
fn newer_format_version_is_refused_naming_both_versions() {
    let mut s = golden_stream();
    s[8] = 9;
    let e = read_all(&s).unwrap_err().to_string();
    assert!(e.contains("version 9") && e.contains("1 to 3"), "{e}");
}

#[test]
fn unknown_header_flag_is_refused() {
    let mut s = golden_stream();
    s[12] = 0x80;
    assert!(matches!(read_all(&s), Err(StreamError::UnknownFlags(0x80))));
}

#[test]
fn nonzero_reserved_header_bytes_are_refused() {
    let mut s = golden_stream();
    s[21] = 1;
    assert!(matches!(read_all(&s), Err(StreamError::Reserved { what: "header", .. })));
}

fn stream_with(f: impl FnOnce(&mut StreamWriter<Vec<u8>>)) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new(), &StreamHeader::new(StreamFlags::empty())).unwrap();
    f(&mut w);
    w.end().unwrap();
    w.into_inner()
}

#[test]
fn unknown_mandatory_record_is_refused_naming_its_type() {
    let s = stream_with(|w| w.raw_record(0x42, b"??").unwrap());
    let e = read_all(&s).unwrap_err().to_string();
    assert!(e.contains("unknown mandatory record type 0x42"), "{e}");
}

#[test]
fn unknown_optional_record_is_skipped_and_the_next_one_is_read() {
    let s = stream_with(|w| {
        w.raw_record(OPTIONAL | 0x42, b"future").unwrap();
        w.checkpoint(3).unwrap();
    });
    assert_eq!(read_all(&s).unwrap(), vec!["skipped 0x80000042 6", "checkpoint 3", "end"]);
}

#[test]
fn flipped_byte_in_page_data_fails_the_checksum() {
    let s0 = stream_with(|w| w.page_batch(&[(5, PageType::Normal)], &[&page(3)]).unwrap());
    let mut s = s0.clone();
    let data_at = 32 + 8 + 8 + 8 + 100; // header, record head, batch head, one entry, into the data
    s[data_at] ^= 1;
    let e = read_all(&s).unwrap_err();
    assert!(matches!(e, StreamError::Checksum { index: 0, name: "PAGE_BATCH", .. }), "{e}");
}

#[test]
fn unknown_page_type_is_refused() {
    let mut s = stream_with(|w| w.page_batch(&[(5, PageType::Zero)], &[]).unwrap());
    // Patch the entry's type nibble to 9 and fix up the checksum.
    let rec = 32;
    s[rec + 8 + 8 + 7] = 0x90;
    let len = u32::from_le_bytes(s[rec + 4..rec + 8].try_into().unwrap());
    let crc = {
        let mut c = crc32c::crc32c(&s[rec..rec + 4]);
        c = crc32c::crc32c_append(c, &s[rec + 4..rec + 8]);
        crc32c::crc32c_append(c, &s[rec + 8..rec + 8 + len as usize])
    };
    let crc_at = rec + 8 + len as usize;
    s[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
    let e = read_all(&s).unwrap_err();
    assert!(matches!(e, StreamError::UnknownPageType { ptype: 9, gfn: 5, .. }), "{e}");
}

#[test]
fn declared_length_over_the_maximum_is_refused_before_reading() {
    let mut s = StreamHeader::new(StreamFlags::empty()).encode_for_tests();
    s.extend_from_slice(&2u32.to_le_bytes());
    s.extend_from_slice(&(MAX_RECORD_BODY + 1).to_le_bytes());
    let e = read_all(&s).unwrap_err();
    assert!(matches!(e, StreamError::TooLong { .. }), "{e}");
}

#[test]
fn writer_refuses_a_batch_whose_data_does_not_match_its_normal_pages() {
    let mut w = StreamWriter::new(Vec::new(), &StreamHeader::new(StreamFlags::empty())).unwrap();
    let e = w.page_batch(&[(1, PageType::Normal), (2, PageType::Normal)], &[&page(0)]).unwrap_err();
    assert!(matches!(e, StreamError::Invalid(_)));
}

#[test]
fn inspect_prints_every_record_and_a_total() {
    let mut out = Vec::new();
    let s = inspect(golden_stream().as_slice(), &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(s.records, 7);
    assert_eq!((s.normal, s.zero, s.broken, s.discarded), (2, 1, 1, 1));
    assert!(
        text.contains("PAGE_BATCH 5 pages") && text.contains("DEVICE_STATE serial#0") && text.contains("END"),
        "{text}"
    );
}

fn arb_type() -> impl Strategy<Value = PageType> {
    prop_oneof![Just(PageType::Normal), Just(PageType::Zero), Just(PageType::Broken), Just(PageType::Discarded)]
}

proptest! {
    #[test]
    fn page_batches_round_trip(entries in proptest::collection::vec(((0u64..1 << 52), arb_type()), 1..64), seed in any::<u8>()) {
        let datas: Vec<Vec<u8>> = entries.iter().filter(|e| e.1 == PageType::Normal).enumerate().map(|(i, _)| page(seed.wrapping_add(i as u8))).collect();
        let refs: Vec<&[u8]> = datas.iter().map(|d| d.as_slice()).collect();
        let s = stream_with(|w| w.page_batch(&entries, &refs).unwrap());
        let mut r = StreamReader::new(s.as_slice()).unwrap();
        let rec = r.next_record().unwrap();
        let Record::PageBatch(b) = rec else { panic!("not a batch") };
        let got: Vec<(u64, PageType, Option<Vec<u8>>)> = b.iter().map(|(g, t, d)| (g, t, d.map(|d| d.to_vec()))).collect();
        let mut di = datas.iter();
        let want: Vec<(u64, PageType, Option<Vec<u8>>)> = entries.iter().map(|&(g, t)| (g, t, if t == PageType::Normal { di.next().cloned() } else { None })).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_reader(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut s = golden_stream()[..32].to_vec();
        s.extend_from_slice(&bytes);
        let _ = read_all(&s);
    }
}

fn sample_map() -> RamMap {
    RamMap {
        region: 0,
        gpa: 0,
        npages: 70,
        data_offset: 0x20_0000,
        present: vec![0b1011, 0b1],
        zero: vec![0b0100, 0b10],
        crcs: vec![0x11, 0x22, 0x33, 0x44],
    }
}

/// The golden snapshot-file metadata: an incremental snapshot with one RAM_MAP.
fn golden_snapshot_meta() -> Vec<u8> {
    let h =
        StreamHeader { format_version: 1, flags: StreamFlags::SNAPSHOT, page_size: 4096, writer_version: (0, 1, 0) };
    let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
    w.machine_config(&MachineConfig { memory_bytes: 70 * 4096, vcpus: 1, regions: vec![(0, 70 * 4096)] }).unwrap();
    w.snapshot_info(&SnapshotInfo {
        id: [0xaa; 16],
        parent_id: [0xbb; 16],
        parent_meta_crc: 0x1234_5678,
        kind: SnapshotKind::Incremental,
        created_unix_ms: 1_700_000_000_000,
        parent_path: "base.snap".into(),
    })
    .unwrap();
    w.ram_map(&sample_map()).unwrap();
    w.vm_state(1, b"vm").unwrap();
    w.vcpu_state(0, 1, b"vcpu-zero").unwrap();
    w.device_state("serial", 0, 1, b"uart").unwrap();
    w.end().unwrap();
    w.into_inner()
}

#[test]
fn golden_v1_snapshot_fixture_is_what_this_version_writes_and_reads_back() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v1-snapshot-meta.bin");
    let written = golden_snapshot_meta();
    if std::env::var("FERRY_BLESS").is_ok() {
        std::fs::write(path, &written).unwrap();
    }
    let fixture = std::fs::read(path).unwrap();

    let decoded = read_all(&fixture).unwrap();

    assert_eq!(written, fixture, "the writer no longer produces the v1 snapshot fixture byte for byte");
    assert_eq!(decoded[1], "snapshot Incremental id aa parent bb crc 0x12345678 t 1700000000000 from \"base.snap\"");
    assert_eq!(decoded[2], "ram_map 0 gpa 0x0 70 pages at 0x200000 present [b, 1] zero [4, 2] crcs [11, 22, 33, 44]");
    assert_eq!(decoded.last().unwrap(), "end");
}

/// Version 3 snapshot metadata: a disk (DISK_CONFIG and its DISK_MAP: 3 blocks of a disk of
/// 10 KiB, the last one short).
fn golden_v3_snapshot_meta() -> Vec<u8> {
    let h =
        StreamHeader { format_version: 3, flags: StreamFlags::SNAPSHOT, page_size: 4096, writer_version: (0, 1, 0) };
    let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
    w.machine_config(&MachineConfig { memory_bytes: 70 * 4096, vcpus: 1, regions: vec![(0, 70 * 4096)] }).unwrap();
    w.snapshot_info(&SnapshotInfo {
        id: [0xcc; 16],
        parent_id: [0; 16],
        parent_meta_crc: 0,
        kind: SnapshotKind::Full,
        created_unix_ms: 1_800_000_000_000,
        parent_path: String::new(),
    })
    .unwrap();
    w.ram_map(&sample_map()).unwrap();
    w.disk_config(&DiskConfig { sectors: vec![20] }).unwrap();
    w.disk_map(&RamMap {
        region: 0,
        gpa: 10240,
        npages: 3,
        data_offset: 0x400000,
        present: vec![0b101],
        zero: vec![0b010],
        crcs: vec![0xaa, 0xbb],
    })
    .unwrap();
    w.vm_state(1, b"vm").unwrap();
    w.end().unwrap();
    w.into_inner()
}

#[test]
fn golden_v3_snapshot_fixture_with_a_disk_is_what_this_version_writes_and_reads_back() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v3-snapshot-meta.bin");
    let written = golden_v3_snapshot_meta();
    if std::env::var("FERRY_BLESS").is_ok() {
        std::fs::write(path, &written).unwrap();
    }
    let fixture = std::fs::read(path).unwrap();

    let decoded = read_all(&fixture).unwrap();

    assert_eq!(written, fixture, "the writer no longer produces the v3 snapshot fixture byte for byte");
    assert_eq!(decoded[3], "disks [20]");
    assert_eq!(decoded[4], "disk_map 0 10240 bytes 3 blocks");
    // A disk map whose block count does not fit its size is refused.
    let mut w = StreamWriter::new(Vec::new(), &StreamHeader::new(StreamFlags::SNAPSHOT)).unwrap();
    w.disk_map(&RamMap {
        region: 0,
        gpa: 10240,
        npages: 2,
        data_offset: 0,
        present: vec![0],
        zero: vec![0b11],
        crcs: vec![],
    })
    .unwrap();
    w.end().unwrap();
    assert!(read_all(&w.into_inner()).unwrap_err().to_string().contains("2 blocks for a disk of 10240 bytes"));
}

#[test]
fn snapshot_records_outside_a_snapshot_file_are_refused() {
    let h = StreamHeader::new(StreamFlags::empty());
    let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
    w.ram_map(&sample_map()).unwrap();
    w.end().unwrap();

    let e = read_all(&w.into_inner()).unwrap_err();

    assert!(e.to_string().contains("only snapshot files"), "{e}");
}

#[test]
fn ram_map_with_overlapping_bitmaps_or_wrong_checksum_count_is_refused() {
    let h = StreamHeader::new(StreamFlags::SNAPSHOT);
    for bad in [
        RamMap { zero: vec![0b1000, 0], ..sample_map() }, // page 3 both present and zero
        RamMap { zero: vec![0, 1 << 40], ..sample_map() }, // page 104 beyond 70 pages
    ] {
        let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
        w.ram_map(&bad).unwrap();
        w.end().unwrap();

        let e = read_all(&w.into_inner()).unwrap_err();

        assert!(e.to_string().contains("RAM_MAP"), "{e}");
    }
    let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
    assert!(w.ram_map(&RamMap { crcs: vec![1], ..sample_map() }).is_err(), "writer must refuse a short checksum list");
}

#[test]
fn every_truncation_of_snapshot_metadata_is_an_error() {
    let s = golden_snapshot_meta();
    for n in 0..s.len() {
        assert!(read_all(&s[..n]).is_err(), "prefix of {n} bytes read as complete");
    }
}

#[test]
fn final_pass_marker_is_optional_and_read_back() {
    let s = stream_with(|w| w.final_pass().unwrap());
    let mut r = StreamReader::new(s.as_slice()).unwrap();
    assert!(matches!(r.next_record().unwrap(), Record::FinalPass));
    // Its type has the optional bit: a reader that does not know it skips it.
    assert_ne!(ferry_stream::rtype::FINAL_PASS & ferry_stream::OPTIONAL, 0);
    assert_eq!(ferry_stream::rtype::name(ferry_stream::rtype::FINAL_PASS), "FINAL_PASS");
}

#[test]
fn a_ram_reference_is_refused_outside_a_handover_stream_and_read_inside_one() {
    let r = RamReference { region: 0, fd: 7, gpa: 0, size: 64 << 20, offset: 0 };
    let stream = |flags: StreamFlags| {
        let h = StreamHeader { format_version: 2, flags, page_size: 4096, writer_version: (0, 1, 0) };
        let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
        w.ram_reference(&r).unwrap();
        w.end().unwrap();
        w.into_inner()
    };

    let e = read_all(&stream(StreamFlags::empty())).unwrap_err().to_string();
    let ok = read_all(&stream(StreamFlags::HANDOVER)).unwrap();

    assert!(e.contains("only valid in a local live-update handover"), "{e}");
    assert_eq!(ok[0], format!("ramref {r:?}"));
}

/// A migration stream that switches to post-copy, then the post-copy page stream that follows
/// it on the connection.
fn golden_v3_postcopy() -> (Vec<u8>, Vec<u8>) {
    let h = |flags| StreamHeader { format_version: 3, flags, page_size: 4096, writer_version: (0, 1, 0) };
    let mut w = StreamWriter::new(Vec::new(), &h(StreamFlags::empty())).unwrap();
    w.machine_config(&MachineConfig { memory_bytes: 64 << 20, vcpus: 1, regions: vec![(0, 64 << 20)] }).unwrap();
    w.cpu_model(&CpuModel { tsc_khz: 2_100_000, xsave_size: 4096, cpuid: vec![] }).unwrap();
    w.page_batch(&[(0x10, PageType::Normal), (0x11, PageType::Zero)], &[&page(3)]).unwrap();
    w.postcopy(0x5e55_1011, &[(0x10, 2)]).unwrap();
    w.final_pass().unwrap();
    w.page_batch(&[(0x20, PageType::Broken)], &[]).unwrap();
    w.postcopy(0x5e55_1011, &[(0x100, 1)]).unwrap();
    w.vm_state(1, b"vm").unwrap();
    w.vcpu_state(0, 2, b"vcpu").unwrap();
    w.end().unwrap();
    let migration = w.into_inner();
    let mut w = StreamWriter::new(Vec::new(), &h(StreamFlags::POSTCOPY)).unwrap();
    w.page_batch(&[(0x100, PageType::Normal)], &[&page(5)]).unwrap();
    w.page_batch(&[(0x10, PageType::Normal), (0x11, PageType::Zero)], &[&page(6)]).unwrap();
    w.end().unwrap();
    (migration, w.into_inner())
}

#[test]
fn golden_v3_postcopy_fixtures_are_what_this_version_writes_and_reads_back() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let (migration, pages) = golden_v3_postcopy();
    let paths = [format!("{dir}/v3-postcopy.bin"), format!("{dir}/v3-postcopy-pages.bin")];
    if std::env::var("FERRY_BLESS").is_ok() {
        std::fs::write(&paths[0], &migration).unwrap();
        std::fs::write(&paths[1], &pages).unwrap();
    }
    let fixtures = [std::fs::read(&paths[0]).unwrap(), std::fs::read(&paths[1]).unwrap()];

    assert_eq!(migration, fixtures[0], "the writer no longer produces the v3 post-copy fixture byte for byte");
    assert_eq!(pages, fixtures[1], "the writer no longer produces the v3 page-stream fixture byte for byte");
    assert_eq!(
        read_all(&fixtures[0]).unwrap()[2..],
        [
            "batch 0x10:Normal:3,34,65,96 0x11:Zero:",
            "postcopy 0x5e551011 [(10, 2)]",
            "final pass",
            "batch 0x20:Broken:",
            "postcopy 0x5e551011 [(100, 1)]",
            "vm v1 vm",
            "vcpu 0 v2 vcpu",
            "end",
        ]
    );
    assert_eq!(
        read_all(&fixtures[1]).unwrap(),
        ["batch 0x100:Normal:5,36,67,98", "batch 0x10:Normal:6,37,68,99 0x11:Zero:", "end"]
    );
}

#[test]
fn postcopy_is_refused_outside_a_v3_migration_stream_and_a_page_stream_carries_only_pages() {
    let with = |version: u32, flags: StreamFlags, f: &dyn Fn(&mut StreamWriter<Vec<u8>>)| {
        let h = StreamHeader { format_version: version, flags, page_size: 4096, writer_version: (0, 1, 0) };
        let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
        f(&mut w);
        w.end().unwrap();
        read_all(&w.into_inner()).map_err(|e| e.to_string())
    };
    let pc = |w: &mut StreamWriter<Vec<u8>>| w.postcopy(1, &[(0, 1)]).unwrap();

    assert!(with(3, StreamFlags::empty(), &pc).is_ok());
    for (v, f) in [(2, StreamFlags::empty()), (3, StreamFlags::SNAPSHOT), (3, StreamFlags::CHECKPOINTED)] {
        let e = with(v, f, &pc).unwrap_err();
        assert!(e.contains("POSTCOPY"), "{e}");
    }
    let e = with(3, StreamFlags::POSTCOPY, &|w| w.vm_state(1, b"vm").unwrap()).unwrap_err();
    assert!(e.contains("only PAGE_BATCH and END"), "{e}");
    // A run that wraps around the frame space.
    let e = with(3, StreamFlags::empty(), &|w| w.postcopy(1, &[(u64::MAX, 2)]).unwrap()).unwrap_err();
    assert!(e.contains("run of 2 frames"), "{e}");
    // The writer refuses an empty run.
    let mut w = StreamWriter::new(Vec::new(), &StreamHeader::new(StreamFlags::empty())).unwrap();
    assert!(w.postcopy(1, &[(5, 0)]).is_err());
}

/// A page that compresses well: a line of text, over and over, with the page's number in it.
fn text_page(n: u32) -> Vec<u8> {
    format!("page {n:08}: the quick brown fox jumps over the lazy dog; ").bytes().cycle().take(PAGE_SIZE).collect()
}

/// A page that does not compress (xorshift bytes).
fn noise_page(seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..PAGE_SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A v3 migration stream written with `compress_pages`: a batch of text pages and a zero page
/// (goes as PAGE_BATCH_ZSTD), a batch of noise (does not shrink: plain PAGE_BATCH), a batch
/// without data pages (plain), state, END. The pages, to check what a reader gets.
fn golden_v3_zstd() -> (Vec<u8>, Vec<(u64, Vec<u8>)>) {
    let h = StreamHeader { format_version: 3, flags: StreamFlags::empty(), page_size: 4096, writer_version: (0, 2, 0) };
    let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
    w.compress_pages(1).unwrap();
    w.machine_config(&MachineConfig { memory_bytes: 64 << 20, vcpus: 1, regions: vec![(0, 64 << 20)] }).unwrap();
    w.cpu_model(&CpuModel { tsc_khz: 2_100_000, xsave_size: 4096, cpuid: vec![] }).unwrap();
    let text: Vec<Vec<u8>> = (0..8).map(text_page).collect();
    let mut entries: Vec<(u64, PageType)> = (0..8).map(|i| (0x100 + i, PageType::Normal)).collect();
    entries.insert(3, (0x1ff, PageType::Zero));
    w.page_batch(&entries, &text.iter().map(|p| p.as_slice()).collect::<Vec<_>>()).unwrap();
    let noise = [noise_page(1), noise_page(2)];
    w.page_batch(&[(0x200, PageType::Normal), (0x201, PageType::Normal)], &[&noise[0], &noise[1]]).unwrap();
    w.page_batch(&[(0x300, PageType::Zero), (0x301, PageType::Broken)], &[]).unwrap();
    w.vm_state(1, b"vm").unwrap();
    w.vcpu_state(0, 2, b"vcpu").unwrap();
    w.end().unwrap();
    let mut pages: Vec<(u64, Vec<u8>)> = text.into_iter().enumerate().map(|(i, p)| (0x100 + i as u64, p)).collect();
    pages.extend([(0x200, noise[0].clone()), (0x201, noise[1].clone())]);
    (w.into_inner(), pages)
}

/// Every data page of a stream with the record type it came in, in order.
fn pages_of(b: &[u8]) -> Result<Vec<(u64, Vec<u8>, bool)>, StreamError> {
    let mut r = StreamReader::new(b)?;
    let mut out = Vec::new();
    loop {
        match r.next_record()? {
            Record::PageBatch(pb) => {
                let z = pb.compressed_bytes().is_some();
                out.extend(pb.iter().filter_map(|(g, _, d)| d.map(|d| (g, d.to_vec(), z))));
            }
            Record::End => return Ok(out),
            _ => {}
        }
    }
}

#[test]
fn golden_v3_zstd_fixture_reads_back_page_for_page() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v3-zstd.bin");
    let (written, pages) = golden_v3_zstd();
    if std::env::var("FERRY_BLESS").is_ok() {
        std::fs::write(path, &written).unwrap();
    }
    let fixture = std::fs::read(path).unwrap();
    // The fixture is the compatibility promise: it must keep reading, page for page. What this
    // version writes must read the same (its bytes may differ with another libzstd).
    for (what, b) in [("the fixture", &fixture), ("this version's stream", &written)] {
        let got = pages_of(b).unwrap();
        let want: Vec<(u64, Vec<u8>, bool)> = pages.iter().map(|(g, p)| (*g, p.clone(), *g < 0x200)).collect();
        assert!(got == want, "{what}: pages differ (or came in the wrong record type)");
        let records = read_all(b).unwrap();
        assert!(records[3].starts_with("batch 0x200:Normal:"), "{what}: {}", records[3]);
        assert_eq!(
            [&records[2..3], &records[4..]].concat(),
            [
                "batch 0x100:Normal:112,97,103,101 0x101:Normal:112,97,103,101 0x102:Normal:112,97,103,101 \
                 0x1ff:Zero: 0x103:Normal:112,97,103,101 0x104:Normal:112,97,103,101 \
                 0x105:Normal:112,97,103,101 0x106:Normal:112,97,103,101 0x107:Normal:112,97,103,101",
                "batch 0x300:Zero: 0x301:Broken:",
                "vm v1 vm",
                "vcpu 0 v2 vcpu",
                "end",
            ],
            "{what}"
        );
    }
    // Eight text pages shrink far: the compressed stream is well under the pages it carries.
    assert!(fixture.len() < 4 * PAGE_SIZE, "{} bytes for 8 text and 2 noise pages", fixture.len());
    let mut out = Vec::new();
    inspect(fixture.as_slice(), &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("data as a zstd frame of"), "{out}");
}

/// A PAGE_BATCH_ZSTD body: count, reserved, entries, then `frame`.
fn zstd_body(entries: &[(u64, PageType)], frame: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for &(g, t) in entries {
        b.extend_from_slice(&(g | (t.to_u8() as u64) << 60).to_le_bytes());
    }
    b.extend_from_slice(frame);
    b
}

#[test]
fn a_compressed_batch_that_does_not_decompress_to_its_pages_is_refused() {
    let one = [(0x10, PageType::Normal)];
    let two = [(0x10, PageType::Normal), (0x11, PageType::Normal)];
    let p = text_page(1);
    let frame = zstd::bulk::compress(&p, 1).unwrap();
    let frame2 = zstd::bulk::compress(&[p.clone(), p.clone()].concat(), 1).unwrap();
    let short = zstd::bulk::compress(&p[..4000], 1).unwrap();
    let refused = |body: Vec<u8>, flags: StreamFlags, version: u32| {
        let h = StreamHeader { format_version: version, flags, page_size: 4096, writer_version: (0, 2, 0) };
        let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
        w.raw_record(rtype::PAGE_BATCH_ZSTD, &body).unwrap();
        w.end().unwrap();
        read_all(&w.into_inner()).unwrap_err().to_string()
    };
    let plain = StreamFlags::empty();
    // The well-formed one reads, as a check that the cases below fail for their own reason.
    let mut w = StreamWriter::new(Vec::new(), &StreamHeader::new(plain)).unwrap();
    w.raw_record(rtype::PAGE_BATCH_ZSTD, &zstd_body(&one, &frame)).unwrap();
    w.end().unwrap();
    assert_eq!(pages_of(&w.into_inner()).unwrap(), [(0x10, p.clone(), true)]);

    for (body, want) in [
        (zstd_body(&two, &frame), "holds 4096 bytes"),
        (zstd_body(&one, &frame2), "does not decompress"),
        (zstd_body(&one, &short), "holds 4000 bytes"),
        (zstd_body(&one, &frame[..frame.len() - 3]), "does not decompress"),
        (zstd_body(&one, &[frame.as_slice(), b"garbage!"].concat()), "does not decompress"),
        (zstd_body(&one, &[]), "both must be present"),
        (zstd_body(&[(0x10, PageType::Zero)], &frame), "both must be present"),
    ] {
        let e = refused(body, plain, 3);
        assert!(e.contains("PAGE_BATCH_ZSTD") && e.contains(want), "want {want:?}: {e}");
    }
    let ok = zstd_body(&one, &frame);
    assert!(refused(ok.clone(), plain, 2).contains("needs format version 3"));
    for f in [StreamFlags::SNAPSHOT, StreamFlags::HANDOVER, StreamFlags::POSTCOPY] {
        let e = refused(ok.clone(), f, 3);
        assert!(e.contains("PAGE_BATCH_ZSTD") || e.contains("only PAGE_BATCH"), "{f:?}: {e}");
    }
}

#[test]
fn a_writer_compresses_only_when_asked_and_only_in_a_version_3_stream() {
    let text: Vec<Vec<u8>> = (0..4).map(text_page).collect();
    let refs: Vec<&[u8]> = text.iter().map(|p| p.as_slice()).collect();
    let entries: Vec<(u64, PageType)> = (0..4).map(|i| (i, PageType::Normal)).collect();
    let plain = stream_with(|w| w.page_batch(&entries, &refs).unwrap());
    let mut bytes = PageBytes::default();
    let packed = stream_with(|w| {
        w.compress_pages(3).unwrap();
        w.page_batch(&entries, &refs).unwrap();
        bytes = w.page_bytes();
    });
    assert!(pages_of(&plain).unwrap().iter().all(|p| !p.2));
    assert_eq!(
        pages_of(&packed).unwrap(),
        pages_of(&plain).unwrap().into_iter().map(|(g, d, _)| (g, d, true)).collect::<Vec<_>>()
    );
    assert_eq!(bytes.raw, 4 * PAGE_SIZE as u64);
    assert!(bytes.wire < bytes.raw / 8, "{bytes:?}");
    let h = StreamHeader { format_version: 2, flags: StreamFlags::empty(), page_size: 4096, writer_version: (0, 2, 0) };
    let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
    assert!(w.compress_pages(1).is_err());
}

/// The version 3 golden streams of a migration over three page channels: the main stream (its
/// CHANNELS record, channel 0's pages, state, END) and channel 1's stream (header flag CHANNEL,
/// its shard's pages, a BROKEN entry of the final re-check, END).
fn golden_v3_channels() -> (Vec<u8>, Vec<u8>) {
    let h = |flags| StreamHeader { format_version: 3, flags, page_size: 4096, writer_version: (0, 2, 0) };
    let mut w = StreamWriter::new(Vec::new(), &h(StreamFlags::empty())).unwrap();
    w.machine_config(&MachineConfig { memory_bytes: 64 << 20, vcpus: 1, regions: vec![(0, 64 << 20)] }).unwrap();
    w.channels(3, 0x1122_3344_5566_7788).unwrap();
    // Frames 0x000-0x1ff are shard 0 (channel 0), 0x200-0x3ff shard 1 (channel 1).
    w.page_batch(&[(0x10, PageType::Normal), (0x11, PageType::Zero)], &[&page(1)]).unwrap();
    w.vm_state(1, b"vm").unwrap();
    w.end().unwrap();
    let mut c = StreamWriter::new(Vec::new(), &h(StreamFlags::CHANNEL)).unwrap();
    c.page_batch(&[(0x200, PageType::Normal), (0x3ff, PageType::Zero)], &[&page(2)]).unwrap();
    c.page_batch(&[(0x201, PageType::Broken)], &[]).unwrap();
    c.end().unwrap();
    (w.into_inner(), c.into_inner())
}

#[test]
fn golden_v3_channel_fixtures_are_what_this_version_writes_and_read_back() {
    let main_path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v3-channels-main.bin");
    let chan_path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v3-channel.bin");
    let (main, chan) = golden_v3_channels();
    if std::env::var("FERRY_BLESS").is_ok() {
        std::fs::write(main_path, &main).unwrap();
        std::fs::write(chan_path, &chan).unwrap();
    }
    let (main_fixture, chan_fixture) = (std::fs::read(main_path).unwrap(), std::fs::read(chan_path).unwrap());
    assert_eq!(main, main_fixture, "the writer no longer produces the v3 main-channel fixture byte for byte");
    assert_eq!(chan, chan_fixture, "the writer no longer produces the v3 page-channel fixture byte for byte");
    assert_eq!(
        read_all(&main_fixture).unwrap(),
        [
            "config 67108864 1 [(0, 67108864)]",
            "channels 3 0x1122334455667788",
            "batch 0x10:Normal:1,32,63,94 0x11:Zero:",
            "vm v1 vm",
            "end",
        ]
    );
    assert_eq!(
        read_all(&chan_fixture).unwrap(),
        ["batch 0x200:Normal:2,33,64,95 0x3ff:Zero:", "batch 0x201:Broken:", "end"]
    );
    assert_eq!([channel_of(0x10, 3), channel_of(0x200, 3), channel_of(0x3ff, 3), channel_of(0x600, 3)], [0, 1, 1, 0]);
    let mut out = Vec::new();
    inspect(main_fixture.as_slice(), &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("CHANNELS 3 connections of session 0x1122334455667788"), "{out}");
}

#[test]
fn a_channels_record_or_a_channel_stream_out_of_place_is_refused() {
    let body = |count: u32, reserved: u32| {
        let mut b = Vec::new();
        b.extend_from_slice(&count.to_le_bytes());
        b.extend_from_slice(&reserved.to_le_bytes());
        b.extend_from_slice(&7u64.to_le_bytes());
        b
    };
    let refused = |rtype: u32, body: Vec<u8>, flags: StreamFlags, version: u32| {
        let h = StreamHeader { format_version: version, flags, page_size: 4096, writer_version: (0, 2, 0) };
        let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
        w.raw_record(rtype, &body).unwrap();
        w.end().unwrap();
        read_all(&w.into_inner()).map(|r| r.join("; ")).map_err(|e| e.to_string())
    };
    let plain = StreamFlags::empty();
    assert_eq!(refused(rtype::CHANNELS, body(2, 0), plain, 3).unwrap(), "channels 2 0x7; end");
    for (b, flags, version, want) in [
        (body(1, 0), plain, 3, "1 channels (2 to 16 allowed)"),
        (body(17, 0), plain, 3, "17 channels (2 to 16 allowed)"),
        (body(2, 1), plain, 3, "CHANNELS header"),
        (body(2, 0)[..12].to_vec(), plain, 3, "body of 12 bytes"),
        (body(2, 0), plain, 2, "needs format version 3"),
        (body(2, 0), StreamFlags::SNAPSHOT, 3, "only a live migration stream"),
        (body(2, 0), StreamFlags::CHECKPOINTED, 3, "only a live migration stream"),
        (body(2, 0), StreamFlags::CHANNEL, 3, "only page batches and END"),
    ] {
        let e = refused(rtype::CHANNELS, b, flags, version).unwrap_err();
        assert!(e.contains(want), "want {want:?}: {e}");
    }
    // A page channel carries page batches and END, nothing else.
    let e = refused(rtype::VM_STATE, vec![1, 0, 0, 0, 0, 0, 0, 0], StreamFlags::CHANNEL, 3).unwrap_err();
    assert!(e.contains("only page batches and END"), "{e}");
    // The writer refuses a count the reader would.
    let mut w = StreamWriter::new(Vec::new(), &StreamHeader::new(plain)).unwrap();
    assert!(w.channels(1, 0).is_err() && w.channels(MAX_CHANNELS + 1, 0).is_err());
}
