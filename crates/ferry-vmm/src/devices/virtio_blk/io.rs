//! The request path of a virtio-blk device: the device thread pops requests from the avail
//! ring and completes them on the used ring; the I/O threads execute them against the image,
//! straight into guest memory. Everything here runs under the rules of the parent module: a
//! quiesced device pops nothing and completes nothing (finished requests are held).

use super::state::{Segment, MAX_IN_FLIGHT, MAX_SEGMENTS};
use super::*;
use crate::devices::disk_image::SECTOR_SIZE;

/// Parses a descriptor chain into a request; `Err(Some(status_gpa))` when it is malformed but
/// has a status byte to report the error in.
pub(super) fn parse_chain(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
) -> Result<Request, Option<u64>> {
    let head = chain.head_index();
    let descs: Vec<_> = chain.collect();
    let last = descs.last().ok_or(None)?;
    if !last.is_write_only() || last.len() < 1 {
        return Err(None);
    }
    let status_gpa = last.addr().0.checked_add(last.len() as u64 - 1).ok_or(None)?;
    let first = descs[0];
    if descs.len() < 2 || first.is_write_only() || first.len() < 16 {
        return Err(Some(status_gpa));
    }
    let kind: u32 = mem.read_obj(first.addr()).map_err(|_| Some(status_gpa))?;
    let hdr8 = first.addr().0.checked_add(8).ok_or(Some(status_gpa))?;
    let sector: u64 = mem.read_obj(GuestAddress(hdr8)).map_err(|_| Some(status_gpa))?;
    let data = &descs[1..descs.len() - 1];
    if data.len() > MAX_SEGMENTS {
        return Err(Some(status_gpa));
    }
    let segments: Vec<Segment> =
        data.iter().map(|d| Segment { gpa: d.addr().0, len: d.len(), writable: d.is_write_only() }).collect();
    let want_writable = kind == VIRTIO_BLK_T_IN || kind == VIRTIO_BLK_T_GET_ID;
    if (kind == VIRTIO_BLK_T_IN || kind == VIRTIO_BLK_T_OUT || kind == VIRTIO_BLK_T_GET_ID)
        && segments.iter().any(|s| s.writable != want_writable)
    {
        return Err(Some(status_gpa));
    }
    Ok(Request { head, kind, sector, status_gpa, segments })
}

/// A chain the driver made available, as the device takes it: a request whose every buffer and
/// status byte lies in guest memory on pages that are not broken, or `Err` with where to write
/// its error status (`None`: nowhere the device may write).
pub(super) fn take_chain(
    mem: &GuestMemoryMmap,
    poison: &crate::poison::PoisonSet,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
) -> Result<Request, Option<u64>> {
    parse_chain(mem, chain).and_then(|r| {
        // A buffer on a broken page fails the request with an I/O error, untouched.
        // Bounds first: a buffer outside guest memory is refused before its pages are looked up.
        if request_in_memory(mem, &r)
            && !r.segments.iter().any(|s| touches_broken(poison, s.gpa, s.len as u64))
            && !touches_broken(poison, r.status_gpa, 1)
        {
            Ok(r)
        } else {
            Err(Some(r.status_gpa)
                .filter(|&g| GuestMemoryBackend::check_range(mem, GuestAddress(g), 1) && !touches_broken(poison, g, 1)))
        }
    })
}

/// Writes the status byte, puts the head on the used ring and records both writes as dirty.
pub(super) fn complete_to_guest(inner: &Inner, st: &mut Shared, req: &Request, status: u8, used_len: u32) {
    // A status byte on a broken page is not written (the device never touches one).
    if !touches_broken(&inner.poison, req.status_gpa, 1) {
        let _ = inner.mem.write_obj(status, GuestAddress(req.status_gpa));
        inner.dirty.mark(req.status_gpa, 1);
    }
    let _ = st.queue.add_used(&inner.mem, req.head, used_len);
    mark_used_ring(inner, st);
}

/// Stops serving the queue until the driver resets the device (NEEDS_RESET, config interrupt).
fn needs_reset(inner: &Inner, st: &mut Shared, why: &str) {
    tracing::warn!("disk {}: {why}; device needs a reset", inner.index);
    st.broken = true;
    st.t.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
    st.t.interrupt_status |= VIRTIO_MMIO_INT_CONFIG;
    let _ = inner.irq.write(1);
}

pub(super) fn mark_used_ring(inner: &Inner, st: &Shared) {
    let size = st.queue.size() as u64;
    inner.dirty.mark(st.queue.used_ring(), 6 + 8 * size);
}

pub(super) fn notify_guest(inner: &Inner, st: &mut Shared) {
    if st.queue.needs_notification(&inner.mem).unwrap_or(true) {
        st.t.interrupt_status |= VIRTIO_MMIO_INT_VRING;
        let _ = inner.irq.write(1);
    }
    // With EVENT_IDX, needs_notification reads used_event; without, nothing was written.
}

pub(super) fn device_thread(inner: &Inner, jobs: Sender<Job>, done: Receiver<Done>) {
    let fds = [inner.notify.as_raw_fd(), inner.done_evt.as_raw_fd(), inner.ctl.as_raw_fd()];
    loop {
        let waiting_lock = matches!(inner.st.lock().map(|s| s.mode), Ok(Mode::AwaitLock(_)));
        let mut pfd: Vec<libc::pollfd> =
            fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
        let timeout = if waiting_lock { 1 } else { 1000 };
        // SAFETY: poll on three valid eventfds owned by `inner`, with a correctly sized array.
        unsafe { libc::poll(pfd.as_mut_ptr(), pfd.len() as libc::nfds_t, timeout) };
        for e in [&inner.notify, &inner.done_evt, &inner.ctl] {
            let _ = e.read();
        }
        pfd.clear();
        if inner.quit.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut st) = inner.st.lock() else { return };
        if let Mode::AwaitLock(since) = st.mode {
            if !st.quiesced {
                match inner.image.lock() {
                    Ok(()) => st.mode = Mode::Running,
                    Err(e) => {
                        // Waiting is never unsafe; executing without the lock would be.
                        if since.elapsed() > LOCK_WAIT {
                            tracing::warn!("disk {}: {e}; still waiting for the source to release it", inner.index);
                            st.mode = Mode::AwaitLock(Instant::now());
                        }
                        continue;
                    }
                }
            }
        }
        let mut notify = false;
        while let Ok(d) = done.try_recv() {
            st.executing = st.executing.saturating_sub(1);
            if d.epoch != st.epoch {
                continue;
            }
            if st.replay_running == Some(d.seq) {
                st.replay_running = None;
            }
            if st.quiesced {
                let mut write = false;
                if let Some(f) = st.in_flight.get_mut(&d.seq) {
                    f.held = Some((d.status, d.used_len));
                    write = f.req.kind == VIRTIO_BLK_T_OUT;
                }
                st.stats.completed_after_quiesce += 1;
                st.stats.writes_completed_after_quiesce += write as u64;
                continue;
            }
            if let Some(f) = st.in_flight.remove(&d.seq) {
                complete_to_guest(inner, &mut st, &f.req, d.status, d.used_len);
                notify = true;
            }
        }
        if st.mode == Mode::Running && !st.quiesced {
            // Replay first, one request at a time, in the source's order.
            while st.replay_running.is_none() {
                let Some(seq) = st.replay.pop_front() else { break };
                let epoch = st.epoch;
                if let Some(f) = st.in_flight.get(&seq) {
                    let req = f.req.clone();
                    st.replay_running = Some(seq);
                    st.executing += 1;
                    let _ = jobs.send(Job { seq, epoch, req });
                }
            }
            if st.replay.is_empty() && st.replay_running.is_none() {
                notify |= pop_requests(inner, &mut st, &jobs);
            }
        }
        if notify {
            notify_guest(inner, &mut st);
        }
    }
}

/// Pops every available request and submits it. Returns whether anything was completed to the
/// guest at once (malformed requests).
pub(super) fn pop_requests(inner: &Inner, st: &mut Shared, jobs: &Sender<Job>) -> bool {
    if st.t.status & VIRTIO_CONFIG_S_DRIVER_OK == 0 || st.broken || !st.queue.is_valid(&inner.mem) {
        return false;
    }
    // A ring on a broken page is never read or written: the device stops, as for a broken ring.
    let size = st.queue.size() as u64;
    if touches_broken(&inner.poison, st.queue.desc_table(), 16 * size)
        || touches_broken(&inner.poison, st.queue.avail_ring(), 6 + 2 * size)
        || touches_broken(&inner.poison, st.queue.used_ring(), 6 + 8 * size)
    {
        needs_reset(inner, st, "a page of its virtqueue is broken");
        return false;
    }
    let mut completed = false;
    loop {
        let _ = st.queue.disable_notification(&inner.mem);
        let mut popped = 0usize;
        while st.in_flight.len() < MAX_IN_FLIGHT {
            let Some(chain) = st.queue.pop_descriptor_chain(&inner.mem) else { break };
            popped += 1;
            let head = chain.head_index();
            if head >= st.queue.size() {
                // No used element can name it: the driver broke the ring.
                let why =
                    format!("the driver's avail ring names descriptor {head}, beyond its queue of {}", st.queue.size());
                // Errors already put in the used ring go to the dirty log first.
                mark_used_ring(inner, st);
                needs_reset(inner, st, &why);
                return completed;
            }
            match take_chain(&inner.mem, &inner.poison, chain) {
                Ok(req) => {
                    let seq = st.next_seq;
                    st.next_seq += 1;
                    st.stats.requests += 1;
                    st.executing += 1;
                    let epoch = st.epoch;
                    st.in_flight.insert(seq, InFlight { req: req.clone(), held: None });
                    let _ = jobs.send(Job { seq, epoch, req });
                }
                Err(status) => {
                    if let Some(gpa) = status {
                        let _ = inner.mem.write_obj(VIRTIO_BLK_S_IOERR as u8, GuestAddress(gpa));
                        inner.dirty.mark(gpa, 1);
                    }
                    let _ = st.queue.add_used(&inner.mem, head, 0);
                    completed = true;
                }
            }
        }
        let more = st.queue.enable_notification(&inner.mem).unwrap_or(false);
        mark_used_ring(inner, st);
        if st.in_flight.len() >= MAX_IN_FLIGHT {
            // A full queue's worth is in flight: the rest waits for completions.
            return completed;
        }
        let ahead = st
            .queue
            .avail_idx(&inner.mem, std::sync::atomic::Ordering::Acquire)
            .map(|idx| (idx - std::num::Wrapping(st.queue.next_avail())).0)
            .unwrap_or(0);
        if more && popped == 0 && ahead > st.queue.size() {
            // The avail index is more than a queue ahead of what the device took: nothing can
            // be popped and it will not change. The driver broke the ring; stop serving it
            // until a reset.
            needs_reset(inner, st, "the driver's avail ring is invalid");
            return completed;
        }
        if !more {
            return completed;
        }
    }
}

pub(super) fn io_thread(inner: &Inner, worker: u32, jobs: &Mutex<Receiver<Job>>, done: &Sender<Done>) {
    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ ((worker as u64 + 1) << 32) ^ std::process::id() as u64;
    loop {
        let job = match jobs.lock() {
            Ok(rx) => match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
            Err(_) => return,
        };
        if !inner.latency.is_zero() {
            // Uniform in [latency/2, 3*latency/2): a real slow disk does not finish requests in
            // lockstep either.
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let l = inner.latency.as_micros() as u64;
            std::thread::sleep(Duration::from_micros(l / 2 + rng % l.max(1)));
        }
        let (status, used_len) = execute(inner, &job.req);
        if done.send(Done { seq: job.seq, epoch: job.epoch, status, used_len }).is_err() {
            return;
        }
        let _ = inner.done_evt.write(1);
    }
}

/// Executes one request. Returns (status, bytes written into guest buffers incl. the status).
pub(super) fn execute(inner: &Inner, req: &Request) -> (u8, u32) {
    let ok = VIRTIO_BLK_S_OK as u8;
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    let img = &inner.image;
    let fd = img.file().as_raw_fd();
    let len = req.data_len();
    let in_range = len.is_multiple_of(SECTOR_SIZE)
        && req.sector.checked_add(len / SECTOR_SIZE).is_some_and(|end| end <= img.sectors());
    let count = |st: &mut BlockStats, read: u64, written: u64| {
        st.bytes_read += read;
        st.bytes_written += written;
    };
    match req.kind {
        VIRTIO_BLK_T_IN => {
            if !in_range {
                return (ioerr, 1);
            }
            let mut off = req.sector * SECTOR_SIZE;
            for s in &req.segments {
                let ok = io_segment(inner, fd, s, off, false);
                // Marked even when it failed part way: some bytes may have landed.
                inner.dirty.mark(s.gpa, s.len as u64);
                if !ok {
                    return (ioerr, 1);
                }
                off += s.len as u64;
            }
            if let Ok(mut st) = inner.st.lock() {
                count(&mut st.stats, len, 0);
            }
            (ok, len as u32 + 1)
        }
        VIRTIO_BLK_T_OUT => {
            if img.readonly() {
                if inner.refused_logged.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(
                        "disk {} ({}) is read-only: refused a write of {} bytes at sector {} (the guest gets an I/O error; later refusals are counted, not logged)",
                        inner.index,
                        img.path().display(),
                        len,
                        req.sector
                    );
                }
                if let Ok(mut st) = inner.st.lock() {
                    st.stats.refused_writes += 1;
                }
                return (ioerr, 1);
            }
            if !in_range {
                return (ioerr, 1);
            }
            let mut off = req.sector * SECTOR_SIZE;
            for s in &req.segments {
                let ok = io_segment(inner, fd, s, off, true);
                // Marked once on the image, and when it failed part way (some bytes may have
                // landed): a consumer that read the block meanwhile sees it dirty again.
                inner.blocks.mark(off, s.len as u64);
                if !ok {
                    return (ioerr, 1);
                }
                off += s.len as u64;
            }
            if let Ok(mut st) = inner.st.lock() {
                count(&mut st.stats, 0, len);
            }
            (ok, 1)
        }
        VIRTIO_BLK_T_FLUSH => {
            if !img.readonly() {
                // SAFETY: fdatasync on the image's open fd.
                if unsafe { libc::fdatasync(fd) } != 0 {
                    return (ioerr, 1);
                }
            }
            if let Ok(mut st) = inner.st.lock() {
                st.stats.flushes += 1;
            }
            (ok, 1)
        }
        VIRTIO_BLK_T_GET_ID => {
            let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
            let s = format!("ferry-disk{}", inner.index);
            id[..s.len()].copy_from_slice(s.as_bytes());
            let Some(seg) = req.segments.first() else { return (ioerr, 1) };
            let n = (seg.len as usize).min(id.len());
            if inner.mem.write_slice(&id[..n], GuestAddress(seg.gpa)).is_err() {
                return (ioerr, 1);
            }
            inner.dirty.mark(seg.gpa, n as u64);
            (ok, n as u32 + 1)
        }
        _ => (VIRTIO_BLK_S_UNSUPP as u8, 1),
    }
}

/// One segment with pread/pwrite straight between the image and guest memory.
pub(super) fn io_segment(inner: &Inner, fd: i32, s: &Segment, off: u64, write: bool) -> bool {
    let Ok(slice) = GuestMemoryBackend::get_slice(&inner.mem, GuestAddress(s.gpa), s.len as usize) else {
        return false;
    };
    let guard = slice.ptr_guard_mut();
    let base = guard.as_ptr();
    let mut done = 0usize;
    while done < s.len as usize {
        // SAFETY: `base` points to `s.len` bytes of mapped guest memory (get_slice checked the
        // range lies in one region, which stays mapped while the machine lives); the kernel reads
        // or writes at most the remaining bytes.
        let r = unsafe {
            let p = base.add(done);
            let n = s.len as usize - done;
            let o = (off + done as u64) as libc::off_t;
            if write {
                libc::pwrite(fd, p as *const libc::c_void, n, o)
            } else {
                libc::pread(fd, p as *mut libc::c_void, n, o)
            }
        };
        if r < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            if let Ok(mut st) = inner.st.lock() {
                st.stats.io_errors += 1;
            }
            return false;
        }
        if r == 0 {
            return false;
        }
        done += r as usize;
    }
    true
}
