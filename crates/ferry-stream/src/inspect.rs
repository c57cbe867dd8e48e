//! `ferry stream inspect`: print a stream record by record.

use std::io::{Read, Write};

use crate::{PageType, Record, StreamError, StreamReader};

/// Totals of an inspected stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InspectSummary {
    pub records: u64,
    pub bytes: u64,
    pub normal: u64,
    pub zero: u64,
    pub broken: u64,
    pub discarded: u64,
    pub checkpoints: u64,
    pub ended: bool,
}

fn out_err(e: std::io::Error) -> StreamError {
    StreamError::Write(e)
}

/// Prints the header and one line per record to `out`. Stops at END or at the first error
/// (after printing what was read before it).
pub fn inspect<R: Read, W: Write>(r: R, out: &mut W) -> Result<InspectSummary, StreamError> {
    let mut rd = StreamReader::new(r)?;
    let h = *rd.header();
    writeln!(
        out,
        "header: format v{} flags {:#x}{} page_size {} written by Ferry {}.{}.{}",
        h.format_version,
        h.flags.0,
        if h.flags.contains(crate::StreamFlags::CHECKPOINTED) {
            " (checkpointed)"
        } else if h.flags.contains(crate::StreamFlags::SNAPSHOT) {
            " (snapshot file)"
        } else {
            ""
        },
        h.page_size,
        h.writer_version.0,
        h.writer_version.1,
        h.writer_version.2
    )
    .map_err(out_err)?;
    let mut s = InspectSummary::default();
    loop {
        let offset = rd.bytes_read();
        let index = rd.record_index();
        let rec = rd.next_record()?;
        s.records += 1;
        let line = match rec {
            Record::MachineConfig(c) => {
                format!("MACHINE_CONFIG memory {} bytes, {} vCPUs, regions {:x?}", c.memory_bytes, c.vcpus, c.regions)
            }
            Record::PageBatch(b) => {
                let mut n = [0u64; 4];
                for &(_, t) in b.entries() {
                    n[t.to_u8() as usize] += 1;
                }
                s.normal += n[0];
                s.zero += n[1];
                s.broken += n[2];
                s.discarded += n[3];
                let first = b.entries().first().map(|e| e.0).unwrap_or(0);
                let last = b.entries().last().map(|e| e.0).unwrap_or(0);
                let zstd = match b.compressed_bytes() {
                    Some(z) => format!(", data as a zstd frame of {z} bytes"),
                    None => String::new(),
                };
                format!(
                    "PAGE_BATCH {} pages (normal {}, zero {}, broken {}, discarded {}) frames {first:#x}..{last:#x}{zstd}",
                    b.len(),
                    n[PageType::Normal.to_u8() as usize],
                    n[PageType::Zero.to_u8() as usize],
                    n[PageType::Broken.to_u8() as usize],
                    n[PageType::Discarded.to_u8() as usize]
                )
            }
            Record::VcpuState { id, version, data } => format!("VCPU_STATE vCPU {id} v{version}, {} bytes", data.len()),
            Record::VmState { version, data } => format!("VM_STATE v{version}, {} bytes", data.len()),
            Record::DeviceState { id, instance, version, data } => {
                format!("DEVICE_STATE {id}#{instance} v{version}, {} bytes", data.len())
            }
            Record::Checkpoint(seq) => {
                s.checkpoints += 1;
                format!("CHECKPOINT {seq}")
            }
            Record::SnapshotInfo(i) => {
                let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
                match i.kind {
                    crate::SnapshotKind::Full => format!("SNAPSHOT_INFO full, id {}", hex(&i.id)),
                    crate::SnapshotKind::Incremental => format!(
                        "SNAPSHOT_INFO incremental, id {}, parent {} (metadata crc {:#010x}) at {:?}",
                        hex(&i.id),
                        hex(&i.parent_id),
                        i.parent_meta_crc,
                        i.parent_path
                    ),
                }
            }
            Record::RamMap(m) => {
                let zero: u64 = m.zero.iter().map(|w| w.count_ones() as u64).sum();
                let present = m.present_count();
                s.normal += present;
                s.zero += zero;
                format!(
                    "RAM_MAP region {} gpa {:#x}, {} pages: {} with data at file offset {:#x}, {} zero, {} from the parent",
                    m.region,
                    m.gpa,
                    m.npages,
                    present,
                    m.data_offset,
                    zero,
                    m.npages - present - zero
                )
            }
            Record::CpuModel(m) => format!(
                "CPU_MODEL {} CPUID entries, TSC {} kHz, XSAVE {} bytes",
                m.cpuid.len(),
                m.tsc_khz,
                m.xsave_size
            ),
            Record::RamReference(r) => format!(
                "RAM_REFERENCE region {} gpa {:#x}, {} bytes in fd {} at offset {:#x}",
                r.region, r.gpa, r.size, r.fd, r.offset
            ),
            Record::Channels { count, session } => {
                format!("CHANNELS {count} connections of session {session:#018x} carry page data")
            }
            Record::Postcopy { runs, .. } => format!(
                "POSTCOPY {} runs, {} frames after the switch-over",
                runs.len(),
                runs.iter().fold(0u64, |a, r| a.saturating_add(r.1))
            ),
            Record::BrokenPages(g) => {
                s.broken += g.len() as u64;
                format!("BROKEN_PAGES {} frames {:#x?}", g.len(), &g[..g.len().min(8)])
            }
            Record::DiskConfig(c) => format!("DISK_CONFIG {} disks, sectors {:?}", c.sectors.len(), c.sectors),
            Record::DiskBlocks(b) => format!(
                "DISK_BLOCKS disk {} bytes {:#x}..{:#x} {}",
                b.disk,
                b.offset,
                b.offset + b.len,
                if b.data.is_some() { "data" } else { "zeros" }
            ),
            Record::Heartbeat => "HEARTBEAT".to_string(),
            Record::DiskMap(m) => {
                let zero: u64 = m.zero.iter().map(|w| w.count_ones() as u64).sum();
                format!(
                    "DISK_MAP disk {}, {} bytes, {} blocks: {} with data at file offset {:#x}, {} zero, {} from the parent",
                    m.region,
                    m.gpa,
                    m.npages,
                    m.present_count(),
                    m.data_offset,
                    zero,
                    m.npages - m.present_count() - zero
                )
            }
            Record::FinalPass => "FINAL_PASS (the source paused its guest; the final pass follows)".to_string(),
            Record::SkippedOptional { rtype: t, len } => format!("optional record {t:#x} ({len} bytes), skipped"),
            Record::End => {
                s.ended = true;
                "END".to_string()
            }
        };
        writeln!(out, "#{index:<6} @{offset:<12} {line}").map_err(out_err)?;
        if s.ended {
            break;
        }
    }
    s.bytes = rd.bytes_read();
    writeln!(
        out,
        "total: {} records, {} bytes; pages: {} normal, {} zero, {} broken, {} discarded; {} checkpoints",
        s.records, s.bytes, s.normal, s.zero, s.broken, s.discarded, s.checkpoints
    )
    .map_err(out_err)?;
    Ok(s)
}
