//! The one record loop every reader of a machine stream uses (the migration destination and
//! snapshot restore), and the writing of state sections.
//!
//! The loop owns what all streams share: MACHINE_CONFIG checked (one, a vCPU count Ferry runs,
//! the RAM layout Ferry uses for that size, the size the user asked for); the CPU model checked
//! against this host before anything is loaded (a version 1 stream, which has none, gets the
//! model this host gives a new guest, as Ferry did then); every state section handed to the
//! machine's [`StateBuilder`], which checks its version; END. The records that differ between
//! kinds of stream (page batches, snapshot metadata) go to a [`RecordSink`]; a record the kind
//! does not carry is refused by name.
//!
//! ```text
//!   header ─▶ MACHINE_CONFIG ─▶ CPU_MODEL (v2) ─▶ PAGE_BATCH… | SNAPSHOT_INFO, RAM_MAP…
//!            sink.machine_config  sink.cpu_model      sink
//!   ─▶ VM_STATE, VCPU_STATE…, DEVICE_STATE… ─▶ END ─▶ MachineState
//!        StateBuilder::add (version checked)
//! ```

use std::io::Read;

use ferry_stream::{
    CpuModel, DiskBlocks, DiskConfig, MachineConfig, PageBatch, RamMap, Record, SnapshotInfo, StreamFlags,
    StreamReader, StreamWriter,
};
use ferry_vmm::cpu::{CpuModelError, HostCpu, Reg};
use ferry_vmm::machine_state::{MachineState, MachineStateError, StateBuilder};
use ferry_vmm::persist::{Section, SectionKey};

/// Errors every stream reader shares.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading the stream failed")]
    Stream(#[from] ferry_stream::StreamError),
    #[error("the stream has no MACHINE_CONFIG record before its first {0}")]
    NoConfig(&'static str),
    #[error("the stream has a second MACHINE_CONFIG record; a stream describes one machine")]
    DuplicateConfig,
    #[error("the stream describes {0} vCPUs; Ferry supports 1 to {max}", max = ferry_vmm::vm::MAX_VCPUS)]
    VcpuCount(u32),
    #[error("the stream's RAM layout {0:?} is not the one Ferry uses for that size")]
    Layout(Vec<(u64, u64)>),
    #[error("the stream describes {stream} bytes of guest memory but this Ferry was started with {local}")]
    MemoryMismatch { stream: u64, local: u64 },
    #[error("the format version {0} stream has no CPU_MODEL record before its first {1}")]
    NoCpuModel(u32, &'static str),
    #[error("the stream has a second CPU_MODEL record")]
    DuplicateCpuModel,
    #[error("the guest cannot run on this host")]
    Cpu(#[from] CpuModelError),
    #[error("cannot open /dev/kvm to check the guest's CPU")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("the machine's state")]
    State(#[from] MachineStateError),
    #[error("record {0} is not valid in a {1}")]
    Unexpected(&'static str, &'static str),
    #[error(
        "the source sent a checkpointed stream (replication): only a standby takes one (ferry run --incoming URI \
         --standby)"
    )]
    CheckpointedToPlain,
    #[error("a standby takes only a checkpointed stream (ferry replicate), not a plain migration")]
    PlainToStandby,
    #[error("checkpoint {got} arrived where checkpoint {want} was due")]
    CheckpointSequence { want: u64, got: u64 },
    #[error("the checkpointed stream ended before its first checkpoint: there is no consistent state")]
    NoCheckpoint,
}

/// Which kind of stream is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Migration,
    Snapshot,
    /// A live-update handover (header flag HANDOVER; RAM by reference).
    Handover,
    /// Checkpointed replication to a standby (header flag CHECKPOINTED): epochs, each ended by
    /// a CHECKPOINT.
    Replication,
}

impl StreamKind {
    fn name(self) -> &'static str {
        match self {
            StreamKind::Migration => "migration stream",
            StreamKind::Snapshot => "snapshot file",
            StreamKind::Handover => "live-update handover",
            StreamKind::Replication => "replication stream",
        }
    }
}

/// A feature bit to pretend this host lacks (`ferry run --debug-mask-cpuid`, tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidMask {
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u32,
}

impl std::str::FromStr for CpuidMask {
    type Err = String;
    /// `LEAF[.SUBLEAF].REG.BIT`, e.g. `0x7.0.ebx.5` (AVX2) or `1.ecx.28` (AVX).
    fn from_str(s: &str) -> Result<Self, String> {
        let num = |t: &str| -> Result<u32, String> {
            let r = match t.strip_prefix("0x") {
                Some(h) => u32::from_str_radix(h, 16),
                None => t.parse(),
            };
            r.map_err(|_| format!("'{t}' in '{s}' is not a number"))
        };
        let parts: Vec<&str> = s.split('.').collect();
        let (leaf, subleaf, reg, bit) = match parts.as_slice() {
            [l, r, b] => (num(l)?, 0, *r, num(b)?),
            [l, sl, r, b] => (num(l)?, num(sl)?, *r, num(b)?),
            _ => return Err(format!("'{s}' is not LEAF[.SUBLEAF].REG.BIT")),
        };
        let reg = Reg::parse(reg).ok_or_else(|| format!("'{reg}' in '{s}' is not eax, ebx, ecx or edx"))?;
        if bit > 31 {
            return Err(format!("bit {bit} in '{s}' is not 0 to 31"));
        }
        Ok(CpuidMask { leaf, subleaf, reg, bit })
    }
}

/// What the loop is told about the stream it reads.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Guest RAM size the user asked for (`--memory`), if any.
    pub memory: Option<u64>,
    /// Features to pretend this host lacks.
    pub cpuid_masks: Vec<CpuidMask>,
}

/// The records that differ between kinds of stream. Every method has to be written: a sink
/// refuses what its kind does not carry with [`LoadError::Unexpected`].
pub trait RecordSink {
    type Error: From<LoadError>;
    /// MACHINE_CONFIG, already checked.
    fn machine_config(&mut self, c: &MachineConfig) -> Result<(), Self::Error>;
    /// The guest's CPU model, already checked against this host; it comes before anything the
    /// model matters to (vCPUs can be created now).
    fn cpu_model(&mut self, m: &CpuModel) -> Result<(), Self::Error>;
    fn page_batch(&mut self, b: PageBatch<'_>) -> Result<(), Self::Error>;
    fn snapshot_info(&mut self, i: SnapshotInfo) -> Result<(), Self::Error>;
    fn ram_map(&mut self, m: RamMap) -> Result<(), Self::Error>;
    /// RAM_REFERENCE (handovers): a region handed over in place.
    fn ram_reference(&mut self, r: ferry_stream::RamReference) -> Result<(), Self::Error> {
        let _ = r;
        Err(LoadError::Unexpected("RAM_REFERENCE", "stream that is not a live-update handover").into())
    }
    /// DISK_CONFIG: the disks whose blocks the stream carries.
    fn disk_config(&mut self, c: DiskConfig) -> Result<(), Self::Error> {
        let _ = c;
        Err(LoadError::Unexpected("DISK_CONFIG", "stream read without disks").into())
    }
    /// DISK_BLOCKS: an extent of a disk (after DISK_CONFIG).
    fn disk_blocks(&mut self, b: DiskBlocks<'_>) -> Result<(), Self::Error> {
        let _ = b;
        Err(LoadError::Unexpected("DISK_BLOCKS", "stream read without disks").into())
    }
    /// DISK_MAP (snapshot files): where a disk's blocks are.
    fn disk_map(&mut self, m: RamMap) -> Result<(), Self::Error> {
        let _ = m;
        Err(LoadError::Unexpected("DISK_MAP", "stream that is not a snapshot file").into())
    }
    /// CHECKPOINT (replication streams): the epoch before it arrived whole and checked out;
    /// `state` is the machine's state at it. Nothing of the epoch may take effect before this.
    fn checkpoint(&mut self, seq: u64, state: &MachineState) -> Result<(), Self::Error> {
        let _ = (seq, state);
        Err(LoadError::Unexpected("CHECKPOINT", "stream that is not checkpointed").into())
    }
    /// BROKEN_PAGES (snapshot files): frames broken on the machine saved.
    fn broken_pages(&mut self, gfns: Vec<u64>) -> Result<(), Self::Error>;
    /// CHANNELS: page data also comes on `count - 1` more connections (migration streams).
    fn channels(&mut self, _count: u32, _session: u64) -> Result<(), Self::Error> {
        Err(LoadError::Unexpected("CHANNELS", "this stream").into())
    }
    /// Post-copy: these frames' data comes after the switch-over (live migration only).
    fn postcopy(&mut self, _session: u64, _runs: Vec<(u64, u64)>) -> Result<(), Self::Error> {
        Err(LoadError::Unexpected("POSTCOPY", "this stream").into())
    }
    /// The source paused its guest (the optional FINAL_PASS record).
    fn final_pass(&mut self);
    /// The first state section arrived (the final pass has begun).
    fn state_begins(&mut self);
}

/// What a complete stream described.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub format_version: u32,
    pub config: MachineConfig,
    /// The guest's CPU model (a version 1 stream: this host's model for a new guest).
    pub cpu: CpuModel,
    pub state: MachineState,
    /// Stream bytes read, header to END.
    pub bytes: u64,
}

/// The loop's progress through the stream's prefix.
struct Prefix {
    version: u32,
    config: Option<MachineConfig>,
    cpu: Option<CpuModel>,
    builder: Option<StateBuilder>,
}

impl Prefix {
    /// Before a record of `what` that needs the machine config and the CPU model: a version 1
    /// stream's model is taken now (this host's, as Ferry gave a new guest then).
    fn ready<S: RecordSink>(&mut self, what: &'static str, sink: &mut S) -> Result<(), S::Error> {
        if self.config.is_none() {
            return Err(LoadError::NoConfig(what).into());
        }
        if self.cpu.is_none() {
            if self.version >= 2 {
                return Err(LoadError::NoCpuModel(self.version, what).into());
            }
            let kvm = kvm_ioctls::Kvm::new().map_err(LoadError::Kvm)?;
            let model = ferry_vmm::cpu::new_guest_model(&kvm).map_err(LoadError::Cpu)?;
            sink.cpu_model(&model)?;
            self.cpu = Some(model);
        }
        Ok(())
    }
}

impl Prefix {
    /// Before a record `what` that only streams of kind `valid` carry (and that needs the
    /// machine config and the CPU model).
    fn only_in<S: RecordSink>(
        &mut self,
        kind: StreamKind,
        valid: StreamKind,
        what: &'static str,
        sink: &mut S,
    ) -> Result<(), S::Error> {
        if kind != valid {
            return Err(LoadError::Unexpected(what, kind.name()).into());
        }
        self.ready(what, sink)
    }
}

/// Reads records until END, checking what every stream shares and handing the rest to `sink`.
pub fn load_records<R: Read, S: RecordSink>(
    r: &mut StreamReader<R>,
    kind: StreamKind,
    opts: &LoadOptions,
    sink: &mut S,
) -> Result<Loaded, S::Error> {
    let mut p = Prefix { version: r.header().format_version, config: None, cpu: None, builder: None };
    // RAM by reference is only ever accepted in a local handover, never from a migration peer
    // or a file; and a handover is nothing else.
    if (kind == StreamKind::Handover) != r.header().flags.contains(StreamFlags::HANDOVER) {
        let what = if kind == StreamKind::Handover { "stream without the HANDOVER flag" } else { "handover stream" };
        return Err(LoadError::Unexpected(what, kind.name()).into());
    }
    let checkpointed = r.header().flags.contains(StreamFlags::CHECKPOINTED);
    if checkpointed && kind != StreamKind::Replication {
        return Err(if kind == StreamKind::Migration {
            LoadError::CheckpointedToPlain
        } else {
            LoadError::Unexpected("checkpointed stream", kind.name())
        }
        .into());
    }
    if kind == StreamKind::Replication && !checkpointed {
        return Err(LoadError::PlainToStandby.into());
    }
    // Replication: the state of the last checkpoint, and the sequence due next.
    let mut last_state: Option<MachineState> = None;
    let mut next_seq = 0u64;
    let mut state_started = false;
    loop {
        match r.next_record().map_err(LoadError::Stream)? {
            Record::MachineConfig(c) => {
                if p.config.is_some() {
                    return Err(LoadError::DuplicateConfig.into());
                }
                if let Some(m) = opts.memory.filter(|&m| m != c.memory_bytes) {
                    return Err(LoadError::MemoryMismatch { stream: c.memory_bytes, local: m }.into());
                }
                if c.vcpus == 0 || c.vcpus > ferry_vmm::vm::MAX_VCPUS {
                    return Err(LoadError::VcpuCount(c.vcpus).into());
                }
                if ferry_vmm::memory::layout(c.memory_bytes) != c.regions {
                    return Err(LoadError::Layout(c.regions.clone()).into());
                }
                sink.machine_config(&c)?;
                p.builder = Some(StateBuilder::new(c.vcpus));
                p.config = Some(c);
            }
            Record::CpuModel(m) => {
                let c = p.config.as_ref().ok_or(LoadError::NoConfig("CPU_MODEL"))?;
                if p.cpu.is_some() {
                    return Err(LoadError::DuplicateCpuModel.into());
                }
                // A handover stays on this host, in the same KVM: nothing to check.
                if kind != StreamKind::Handover {
                    let kvm = kvm_ioctls::Kvm::new().map_err(LoadError::Kvm)?;
                    let mut host = HostCpu::probe(&kvm, c.vcpus).map_err(LoadError::Cpu)?;
                    for k in &opts.cpuid_masks {
                        host.mask_feature(k.leaf, k.subleaf, k.reg, k.bit);
                    }
                    host.check(&m).map_err(LoadError::Cpu)?;
                }
                sink.cpu_model(&m)?;
                p.cpu = Some(m);
            }
            Record::PageBatch(b) => {
                let valid = match kind {
                    StreamKind::Handover | StreamKind::Replication => kind,
                    _ => StreamKind::Migration,
                };
                p.only_in(kind, valid, "PAGE_BATCH", sink)?;
                sink.page_batch(b)?;
            }
            Record::DiskConfig(c) => {
                p.ready("DISK_CONFIG", sink)?;
                sink.disk_config(c)?;
            }
            Record::DiskBlocks(b) => {
                p.ready("DISK_BLOCKS", sink)?;
                sink.disk_blocks(b)?;
            }
            Record::RamReference(m) => {
                if kind != StreamKind::Handover {
                    return Err(LoadError::Unexpected("RAM_REFERENCE", kind.name()).into());
                }
                if p.config.is_none() {
                    return Err(LoadError::NoConfig("RAM_REFERENCE").into());
                }
                sink.ram_reference(m)?;
            }
            Record::SnapshotInfo(i) => {
                p.only_in(kind, StreamKind::Snapshot, "SNAPSHOT_INFO", sink)?;
                sink.snapshot_info(i)?;
            }
            Record::RamMap(m) => {
                p.only_in(kind, StreamKind::Snapshot, "RAM_MAP", sink)?;
                sink.ram_map(m)?;
            }
            Record::DiskMap(m) => {
                p.only_in(kind, StreamKind::Snapshot, "DISK_MAP", sink)?;
                sink.disk_map(m)?;
            }
            Record::Channels { count, session } => {
                p.only_in(kind, StreamKind::Migration, "CHANNELS", sink)?;
                sink.channels(count, session)?;
            }
            Record::Postcopy { session, runs } => {
                p.only_in(kind, StreamKind::Migration, "POSTCOPY", sink)?;
                sink.postcopy(session, runs)?;
            }
            Record::BrokenPages(g) => {
                p.only_in(kind, StreamKind::Snapshot, "BROKEN_PAGES", sink)?;
                sink.broken_pages(g)?;
            }
            rec @ (Record::VmState { .. } | Record::VcpuState { .. } | Record::DeviceState { .. }) => {
                let (key, version, data) = match rec {
                    Record::VmState { version, data } => (SectionKey::Vm, version, data),
                    Record::VcpuState { id, version, data } => (SectionKey::Vcpu(id), version, data),
                    Record::DeviceState { id, instance, version, data } => {
                        (SectionKey::Device { id, instance }, version, data)
                    }
                    _ => return Err(LoadError::Unexpected("record", kind.name()).into()),
                };
                p.ready("state section", sink)?;
                if !state_started {
                    state_started = true;
                    sink.state_begins();
                }
                let b = p.builder.as_mut().ok_or(LoadError::NoConfig("state section"))?;
                b.add(key, version, data).map_err(LoadError::State)?;
            }
            Record::FinalPass => sink.final_pass(),
            Record::Checkpoint(seq) => {
                if kind != StreamKind::Replication {
                    return Err(LoadError::Unexpected("CHECKPOINT", kind.name()).into());
                }
                if seq != next_seq {
                    return Err(LoadError::CheckpointSequence { want: next_seq, got: seq }.into());
                }
                p.ready("CHECKPOINT", sink)?;
                let vcpus = p.config.as_ref().map_or(0, |c| c.vcpus);
                let builder = p.builder.replace(StateBuilder::new(vcpus)).ok_or(LoadError::NoConfig("CHECKPOINT"))?;
                let state = builder.finish().map_err(LoadError::State)?;
                sink.checkpoint(seq, &state)?;
                last_state = Some(state);
                next_seq += 1;
            }
            Record::Heartbeat | Record::SkippedOptional { .. } => {}
            Record::End => break,
        }
    }
    p.ready("END", sink)?;
    if kind == StreamKind::Replication {
        // The primary ended replication: the last checkpoint is the machine (anything after it
        // is an epoch that never completed).
        let (Some(config), Some(cpu), Some(state)) = (p.config, p.cpu, last_state) else {
            return Err(LoadError::NoCheckpoint.into());
        };
        return Ok(Loaded { format_version: p.version, config, cpu, state, bytes: r.bytes_read() });
    }
    let (Some(config), Some(cpu), Some(builder)) = (p.config, p.cpu, p.builder) else {
        return Err(LoadError::NoConfig("END").into());
    };
    let state = builder.finish().map_err(LoadError::State)?;
    Ok(Loaded { format_version: p.version, config, cpu, state, bytes: r.bytes_read() })
}

/// Writes the machine's state sections.
pub fn write_sections<W: std::io::Write>(
    w: &mut StreamWriter<W>,
    sections: &[Section],
) -> Result<(), ferry_stream::StreamError> {
    for s in sections {
        match &s.key {
            SectionKey::Vm => w.vm_state(s.version, &s.body)?,
            SectionKey::Vcpu(id) => w.vcpu_state(*id, s.version, &s.body)?,
            SectionKey::Device { id, instance } => w.device_state(id, *instance, s.version, &s.body)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuid_masks_parse_with_and_without_a_subleaf() {
        assert_eq!(
            "0x7.0.ebx.5".parse::<CpuidMask>().unwrap(),
            CpuidMask { leaf: 7, subleaf: 0, reg: Reg::Ebx, bit: 5 }
        );
        assert_eq!("1.ECX.28".parse::<CpuidMask>().unwrap(), CpuidMask { leaf: 1, subleaf: 0, reg: Reg::Ecx, bit: 28 });
        assert!("1.exx.3".parse::<CpuidMask>().unwrap_err().contains("not eax"));
        assert!("1.ecx.32".parse::<CpuidMask>().unwrap_err().contains("0 to 31"));
        assert!("7".parse::<CpuidMask>().is_err());
    }
}
