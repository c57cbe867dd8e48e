//! Restoring a snapshot: its metadata read through the one record loop, its chain of
//! incrementals followed and checked (ids, metadata checksums, machine), every page taken from
//! the newest file that has it (read and checked against its crc32c, or mapped copy-on-write),
//! and the machine built from its state.

use super::*;

/// The metadata of one snapshot file.
pub struct SnapshotMeta {
    pub path: PathBuf,
    pub config: MachineConfig,
    pub cpu: CpuModel,
    pub info: SnapshotInfo,
    pub maps: Vec<RamMap>,
    /// One per disk (DISK_MAP: `region` the disk, `gpa` its size in bytes, pages are blocks).
    pub disks: Vec<RamMap>,
    pub state: MachineState,
    /// Guest frames broken when the snapshot was taken (sorted).
    pub broken: Vec<u64>,
    /// crc32c of the metadata bytes (header to the end of END).
    pub meta_crc: u32,
}

/// A snapshot file's own records: its SNAPSHOT_INFO and RAM_MAPs.
#[derive(Default)]
struct SnapshotSink {
    info: Option<SnapshotInfo>,
    maps: Vec<RamMap>,
    disk_config: Option<ferry_stream::DiskConfig>,
    disks: Vec<RamMap>,
    broken: Vec<u64>,
}

impl RecordSink for SnapshotSink {
    type Error = LoadError;
    fn machine_config(&mut self, _: &MachineConfig) -> Result<(), LoadError> {
        Ok(())
    }
    fn cpu_model(&mut self, _: &CpuModel) -> Result<(), LoadError> {
        Ok(())
    }
    fn page_batch(&mut self, _: PageBatch<'_>) -> Result<(), LoadError> {
        Err(LoadError::Unexpected("PAGE_BATCH", "snapshot file"))
    }
    fn snapshot_info(&mut self, i: SnapshotInfo) -> Result<(), LoadError> {
        self.info = Some(i);
        Ok(())
    }
    fn ram_map(&mut self, m: RamMap) -> Result<(), LoadError> {
        self.maps.push(m);
        Ok(())
    }
    fn broken_pages(&mut self, gfns: Vec<u64>) -> Result<(), LoadError> {
        self.broken.extend(gfns);
        Ok(())
    }
    fn disk_config(&mut self, c: ferry_stream::DiskConfig) -> Result<(), LoadError> {
        self.disk_config = Some(c);
        Ok(())
    }
    fn disk_map(&mut self, m: RamMap) -> Result<(), LoadError> {
        self.disks.push(m);
        Ok(())
    }
    fn final_pass(&mut self) {}
    fn state_begins(&mut self) {}
}

/// Reads and checks a snapshot file's metadata (not its page data).
pub fn read_meta(path: &Path) -> Result<SnapshotMeta, SnapshotError> {
    read_meta_with(path, &LoadOptions::default())
}

fn read_meta_with(path: &Path, opts: &LoadOptions) -> Result<SnapshotMeta, SnapshotError> {
    let f = File::open(path).map_err(|source| SnapshotError::Read { path: path.to_path_buf(), source })?;
    let serr = |e: StreamError| SnapshotError::Stream { path: path.to_path_buf(), source: e };
    let incomplete = |what: &str| SnapshotError::Incomplete { path: path.to_path_buf(), what: what.into() };
    let mut r = StreamReader::new(BufReader::new(f)).map_err(serr)?;
    if !r.header().flags.contains(StreamFlags::SNAPSHOT) {
        return Err(SnapshotError::NotSnapshot { path: path.to_path_buf() });
    }
    let mut sink = SnapshotSink::default();
    let loaded = load_records(&mut r, StreamKind::Snapshot, opts, &mut sink).map_err(|source| match source {
        LoadError::Stream(e) => serr(e),
        source => SnapshotError::Load { path: path.to_path_buf(), source },
    })?;
    let meta_len = loaded.bytes;
    let config = loaded.config;
    let info = sink.info.take().ok_or_else(|| incomplete("no SNAPSHOT_INFO"))?;
    let maps = std::mem::take(&mut sink.maps);
    if maps.len() != config.regions.len()
        || maps.iter().zip(&config.regions).enumerate().any(|(i, (m, r))| {
            m.region as usize != i || m.gpa != r.0 || m.npages * PAGE != r.1 || m.data_offset < meta_len
        })
    {
        return Err(incomplete("its RAM_MAP records do not match MACHINE_CONFIG"));
    }
    let disks = std::mem::take(&mut sink.disks);
    let sectors = sink.disk_config.take().map(|c| c.sectors).unwrap_or_default();
    if disks.len() != sectors.len()
        || disks.iter().zip(&sectors).enumerate().any(|(i, (m, &s))| {
            m.region as usize != i || m.gpa != s * ferry_stream::DISK_SECTOR || m.data_offset < meta_len
        })
    {
        return Err(incomplete("its DISK_MAP records do not match its DISK_CONFIG"));
    }
    let mut f = File::open(path).map_err(|source| SnapshotError::Read { path: path.to_path_buf(), source })?;
    let mut meta = vec![0u8; meta_len as usize];
    f.read_exact(&mut meta).map_err(|source| SnapshotError::Read { path: path.to_path_buf(), source })?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if maps.iter().chain(&disks).any(|m| m.data_offset + m.npages * PAGE > len) {
        return Err(incomplete("the file is shorter than its page data areas (truncated?)"));
    }
    Ok(SnapshotMeta {
        path: path.to_path_buf(),
        config,
        cpu: loaded.cpu,
        info,
        maps,
        disks,
        state: loaded.state,
        broken: {
            let mut b = sink.broken;
            b.sort_unstable();
            b.dedup();
            b
        },
        meta_crc: crc32c::crc32c(&meta),
    })
}

/// The snapshot and its ancestors, newest first, each checked against its child.
pub fn chain(path: &Path) -> Result<Vec<SnapshotMeta>, SnapshotError> {
    chain_with(path, &LoadOptions::default())
}

fn chain_with(path: &Path, opts: &LoadOptions) -> Result<Vec<SnapshotMeta>, SnapshotError> {
    let mut v = vec![read_meta_with(path, opts)?];
    loop {
        let child = v.last().ok_or_else(|| SnapshotError::ChainTooLong(path.to_path_buf()))?;
        if child.info.kind == SnapshotKind::Full {
            return Ok(v);
        }
        if v.len() >= MAX_CHAIN {
            return Err(SnapshotError::ChainTooLong(path.to_path_buf()));
        }
        let stored = PathBuf::from(&child.info.parent_path);
        let p =
            if stored.is_relative() { child.path.parent().map(|d| d.join(&stored)).unwrap_or(stored) } else { stored };
        if let Err(source) = std::fs::metadata(&p) {
            return Err(SnapshotError::MissingParent { parent: p, child: child.path.clone(), source });
        }
        let parent = read_meta_with(&p, opts)?;
        let wrong = |what: String| SnapshotError::WrongParent { parent: p.clone(), child: child.path.clone(), what };
        if parent.info.id != child.info.parent_id {
            return Err(wrong(format!(
                "its id is {}, the child names {}",
                hex(&parent.info.id),
                hex(&child.info.parent_id)
            )));
        }
        if parent.meta_crc != child.info.parent_meta_crc {
            return Err(wrong(format!(
                "its metadata checksum is {:#010x}, the child recorded {:#010x}",
                parent.meta_crc, child.info.parent_meta_crc
            )));
        }
        if parent.config != child.config {
            return Err(wrong("it describes another machine".into()));
        }
        if parent.disks.iter().map(|d| d.gpa).ne(child.disks.iter().map(|d| d.gpa)) {
            return Err(wrong("its disks differ in number or size".into()));
        }
        v.push(parent);
    }
}

/// How a restore puts page data into guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreMode {
    /// Read every page into the memfd and check its crc32c.
    Read,
    /// Map the full snapshot's data areas copy-on-write (pages load on first touch, without a
    /// checksum check); pages of newer incrementals are read over them.
    Mmap,
}

/// How a restore went.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreStats {
    pub chain_len: usize,
    /// Pages left to the copy-on-write mapping of the full snapshot (mmap mode).
    pub mapped_pages: u64,
    pub data_pages: u64,
    pub zero_pages: u64,
    pub bytes_read: u64,
    /// Pages the snapshot recorded broken, broken again here.
    pub broken_pages: u64,
    /// Disk blocks written from the chain with data, and as zeros.
    pub disk_data_blocks: u64,
    pub disk_zero_blocks: u64,
    pub total: Duration,
}

/// Rebuilds a machine from a snapshot (following its chain) and starts it (paused if asked).
/// `disks` are the images (opened, locked) the snapshot's disks are written into: as many as it
/// has, of the same sizes.
#[allow(clippy::too_many_arguments)]
pub fn restore(
    path: &Path,
    memory: Option<u64>,
    disks: Vec<DiskImage>,
    serial_out: SerialSink,
    dirty_tracking: DirtyTracking,
    paused: bool,
    mode: RestoreMode,
    load: &LoadOptions,
) -> Result<(Vm, RestoreStats), SnapshotError> {
    let t0 = Instant::now();
    let chain = chain_with(path, load)?;
    let top = &chain[0];
    if let Some(m) = memory {
        if m != top.config.memory_bytes {
            return Err(SnapshotError::Mismatch(
                path.to_path_buf(),
                format!("it holds {} bytes of RAM, --memory asks for {m}", top.config.memory_bytes),
            ));
        }
    }
    let c = &top.config;
    if c.vcpus == 0 || c.vcpus > ferry_vmm::vm::MAX_VCPUS || ferry_vmm::memory::layout(c.memory_bytes) != c.regions {
        return Err(SnapshotError::Mismatch(path.to_path_buf(), "unsupported vCPU count or RAM layout".into()));
    }
    if disks.len() != top.disks.len() {
        return Err(SnapshotError::Mismatch(
            path.to_path_buf(),
            format!(
                "it holds {} disk(s) and {} --disk image(s) were given: give one image per disk, of the same size, to \
                 write it into",
                top.disks.len(),
                disks.len()
            ),
        ));
    }
    for (i, (img, m)) in disks.iter().zip(&top.disks).enumerate() {
        if img.bytes() != m.gpa || img.readonly() {
            return Err(SnapshotError::Mismatch(
                img.path().to_path_buf(),
                format!(
                    "disk {i} of the snapshot has {} bytes; this image has {}{}",
                    m.gpa,
                    img.bytes(),
                    if img.readonly() { " and is read-only" } else { "" }
                ),
            ));
        }
    }
    let mut ram = GuestRam::new(c.memory_bytes)?;
    let mut stats = RestoreStats { chain_len: chain.len(), ..Default::default() };
    let files = chain
        .iter()
        .map(|m| File::open(&m.path).map_err(|source| SnapshotError::Read { path: m.path.clone(), source }))
        .collect::<Result<Vec<_>, _>>()?;
    for (di, img) in disks.iter().enumerate() {
        restore_disk(di, img, &chain, &files, &mut stats)?;
    }
    let base = chain.len() - 1;
    let mapped = mode == RestoreMode::Mmap;
    if mapped {
        for ri in 0..ram.regions().len() {
            ram.map_file_private(ri, &files[base], chain[base].maps[ri].data_offset)?;
        }
    }
    let ram = ram;
    for (ri, region) in ram.regions().iter().enumerate() {
        // Where each page comes from: the newest snapshot that has it.
        let npages = region.size / PAGE;
        let mut next_crc: Vec<usize> = vec![0; chain.len()];
        let mut run: Option<(usize, u64, u64)> = None; // (file, first page, count)
        let mut pending_crcs: Vec<u32> = Vec::new();
        for page in 0..npages {
            // Broken when the newest snapshot was taken: no data anywhere; broken here too.
            if top.broken.binary_search(&(region.gpa / PAGE + page)).is_ok() {
                for (k, m) in chain.iter().enumerate() {
                    if m.maps[ri].is_present(page) {
                        next_crc[k] += 1;
                    }
                }
                stats.broken_pages += 1;
                continue;
            }
            let mut src = None;
            for (k, m) in chain.iter().enumerate() {
                let map = &m.maps[ri];
                if map.is_present(page) {
                    src = Some(Some(k));
                    break;
                }
                if map.is_zero(page) {
                    src = Some(None);
                    break;
                }
            }
            // Every present page of every file consumes its checksum in page order.
            for (k, m) in chain.iter().enumerate() {
                if m.maps[ri].is_present(page) && src != Some(Some(k)) {
                    next_crc[k] += 1;
                }
            }
            match src {
                Some(Some(k)) if mapped && k == base => {
                    // Already there through the mapping.
                    next_crc[k] += 1;
                    stats.data_pages += 1;
                    stats.mapped_pages += 1;
                }
                Some(None) if mapped && chain[base].maps[ri].is_present(page) => {
                    // Zero now, but the mapped full snapshot has data there.
                    let host = ram.host_ptr(region.gpa + page * PAGE, PAGE)?;
                    // SAFETY: one page of guest RAM no vCPU runs on yet (host_ptr checked it).
                    unsafe { std::ptr::write_bytes(host, 0, PAGE_SIZE) };
                    stats.zero_pages += 1;
                }
                Some(Some(k)) => {
                    let crc = chain[k].maps[ri].crcs.get(next_crc[k]).copied().unwrap_or(0);
                    next_crc[k] += 1;
                    stats.data_pages += 1;
                    run = match run {
                        Some((f, s, n)) if f == k && s + n == page && n < MAX_RUN_PAGES => {
                            pending_crcs.push(crc);
                            Some((f, s, n + 1))
                        }
                        other => {
                            if let Some(r) = other {
                                read_run(&ram, ri, &chain, &files, r, &pending_crcs, &mut stats)?;
                            }
                            pending_crcs.clear();
                            pending_crcs.push(crc);
                            Some((k, page, 1))
                        }
                    };
                }
                Some(None) => stats.zero_pages += 1,
                None => {
                    return Err(SnapshotError::Incomplete {
                        path: chain[chain.len() - 1].path.clone(),
                        what: format!("page {page} of region {ri} is in no snapshot of the chain"),
                    })
                }
            }
        }
        if let Some(r) = run {
            read_run(&ram, ri, &chain, &files, r, &pending_crcs, &mut stats)?;
        }
    }
    // The pages broken on the machine saved are broken here too, for real: the guest gets its
    // machine check when it touches one, and reads no stale data (docs/poison.md).
    for &gfn in &top.broken {
        if ram.poison().mark(gfn, ferry_vmm::poison::PoisonCause::Stream) {
            ram.poison_host_page(gfn * PAGE, None)?;
        }
    }
    let machine = create_machine(ram, dirty_tracking)?;
    let fds = (0..c.vcpus).map(|id| create_vcpu(&machine, id, c.vcpus, &top.cpu)).collect::<Result<Vec<_>, _>>()?;
    // The disks re-execute the requests that were in flight when the snapshot was taken.
    let vm = Vm::restore(machine, fds, top.cpu.clone(), &top.state, serial_out, disks, StartMode::Running, paused)
        .map_err(SnapshotError::Restore)?;
    stats.total = t0.elapsed();
    Ok((vm, stats))
}

/// Writes disk `di` of the chain into `img`: each block from the newest snapshot that has it
/// (read and checked against its crc32c), zero blocks as holes.
fn restore_disk(
    di: usize,
    img: &DiskImage,
    chain: &[SnapshotMeta],
    files: &[File],
    stats: &mut RestoreStats,
) -> Result<(), SnapshotError> {
    let size = img.bytes();
    let blocks = size.div_ceil(PAGE);
    let werr = |source| SnapshotError::DiskWrite { disk: di, path: img.path().display().to_string(), source };
    let mut next_crc: Vec<usize> = vec![0; chain.len()];
    let mut zero_run: Option<(u64, u64)> = None;
    let mut buf = vec![0u8; PAGE_SIZE];
    for b in 0..blocks {
        let src = chain.iter().enumerate().find_map(|(k, m)| {
            let map = &m.disks[di];
            if map.is_present(b) {
                Some(Some(k))
            } else if map.is_zero(b) {
                Some(None)
            } else {
                None
            }
        });
        let off = b * PAGE;
        let len = (size - off).min(PAGE);
        match src {
            Some(Some(k)) => {
                if let Some((o, l)) = zero_run.take() {
                    img.zero_range(o, l).map_err(werr)?;
                }
                let f = &chain[k];
                files[k]
                    .read_exact_at(&mut buf, f.disks[di].data_offset + off)
                    .map_err(|source| SnapshotError::Read { path: f.path.clone(), source })?;
                let stored = f.disks[di].crcs.get(next_crc[k]).copied().unwrap_or(0);
                let computed = crc32c::crc32c(&buf);
                if computed != stored {
                    return Err(SnapshotError::PageChecksum {
                        path: f.path.clone(),
                        region: di as u32,
                        page: b,
                        stored,
                        computed,
                    });
                }
                img.write_at(off, &buf[..len as usize]).map_err(werr)?;
                stats.disk_data_blocks += 1;
            }
            Some(None) => {
                zero_run = match zero_run {
                    Some((o, l)) if o + l == off => Some((o, l + len)),
                    other => {
                        if let Some((o, l)) = other {
                            img.zero_range(o, l).map_err(werr)?;
                        }
                        Some((off, len))
                    }
                };
                stats.disk_zero_blocks += 1;
            }
            None => {
                return Err(SnapshotError::Incomplete {
                    path: chain[chain.len() - 1].path.clone(),
                    what: format!("block {b} of disk {di} is in no snapshot of the chain"),
                })
            }
        }
        // Every present block of every file consumes its checksum in block order.
        for (k, m) in chain.iter().enumerate() {
            if m.disks[di].is_present(b) {
                next_crc[k] += 1;
            }
        }
    }
    if let Some((o, l)) = zero_run {
        img.zero_range(o, l).map_err(werr)?;
    }
    Ok(())
}

/// Reads `n` pages of chain file `k` into guest memory and checks their checksums.
fn read_run(
    ram: &GuestRam,
    ri: usize,
    chain: &[SnapshotMeta],
    files: &[File],
    (k, first, n): (usize, u64, u64),
    crcs: &[u32],
    stats: &mut RestoreStats,
) -> Result<(), SnapshotError> {
    let region = ram.regions()[ri];
    let m = &chain[k].maps[ri];
    let host = ram.host_ptr(region.gpa + first * PAGE, n * PAGE)?;
    // SAFETY: `n` pages of guest RAM of a machine no vCPU runs on yet (host_ptr checked it).
    let buf = unsafe { std::slice::from_raw_parts_mut(host, (n * PAGE) as usize) };
    files[k]
        .read_exact_at(buf, m.data_offset + first * PAGE)
        .map_err(|source| SnapshotError::Read { path: chain[k].path.clone(), source })?;
    stats.bytes_read += n * PAGE;
    for (i, page) in buf.chunks(PAGE_SIZE).enumerate() {
        let computed = crc32c::crc32c(page);
        if computed != crcs[i] {
            return Err(SnapshotError::PageChecksum {
                path: chain[k].path.clone(),
                region: ri as u32,
                page: first + i as u64,
                stored: crcs[i],
                computed,
            });
        }
    }
    Ok(())
}

/// What [`verify_data`] checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifiedData {
    pub ram_pages: u64,
    pub disk_blocks: u64,
}

/// Reads every data page and disk block stored in the snapshot file `m` and checks each against
/// its crc32c (what a `--restore-mode read` restore checks; an mmap restore does not): the
/// first corrupt one is the error, named by region and page (or disk and block).
pub fn verify_data(m: &SnapshotMeta) -> Result<VerifiedData, SnapshotError> {
    let f = File::open(&m.path).map_err(|source| SnapshotError::Read { path: m.path.clone(), source })?;
    let mut v = VerifiedData::default();
    // Runs of present pages are read up to 256 pages (1 MiB) at a time.
    const RUN: u64 = 256;
    let mut buf = vec![0u8; (RUN * PAGE) as usize];
    let maps = m.maps.iter().map(|x| (false, x)).chain(m.disks.iter().map(|x| (true, x)));
    for (is_disk, map) in maps {
        let mut crcs = map.crcs.iter();
        let mut p = 0;
        while p < map.npages {
            if !map.is_present(p) {
                p += 1;
                continue;
            }
            let mut n = 1;
            while n < RUN && p + n < map.npages && map.is_present(p + n) {
                n += 1;
            }
            let b = &mut buf[..(n * PAGE) as usize];
            f.read_exact_at(b, map.data_offset + p * PAGE)
                .map_err(|source| SnapshotError::Read { path: m.path.clone(), source })?;
            for (i, page) in b.chunks(PAGE_SIZE).enumerate() {
                let at = p + i as u64;
                let stored = crcs.next().copied().ok_or_else(|| SnapshotError::Incomplete {
                    path: m.path.clone(),
                    what: format!("no checksum for present page {at} of map {}", map.region),
                })?;
                let computed = crc32c::crc32c(page);
                if computed != stored {
                    let path = m.path.clone();
                    return Err(if is_disk {
                        SnapshotError::BlockChecksum { path, disk: map.region, block: at, stored, computed }
                    } else {
                        SnapshotError::PageChecksum { path, region: map.region, page: at, stored, computed }
                    });
                }
            }
            if is_disk {
                v.disk_blocks += n;
            } else {
                v.ram_pages += n;
            }
            p += n;
        }
    }
    Ok(v)
}
