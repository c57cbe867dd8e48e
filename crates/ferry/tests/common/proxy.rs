//! A UNIX-socket proxy between a migration source and destination that understands the stream's
//! record framing, to inject faults at exact protocol points.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::JoinHandle;

/// What to break.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Forward everything.
    None,
    /// Cut both connections when a record of this type starts (VM_STATE = 4: the final pass).
    CutAtRecord(u32),
    /// Forward only the first N bytes, then close.
    TruncateAfter(u64),
    /// Flip one byte at `offset` of the body of the first record from number `index` on that
    /// is long enough.
    FlipByte { index: u64, offset: usize },
    /// When a record of this type starts, wait `after_ms`, kill process `pid` (SIGKILL) and
    /// cut: a destination that stalls at that point of the stream, then dies.
    KillAtRecord { record: u32, pid: u32, after_ms: u64 },
    /// When a record of this type starts at record number `from_index` or later, stop reading
    /// (both ends stay connected: a destination that hung) for `hold_ms`, then cut.
    StallAtRecord { record: u32, from_index: u64, hold_ms: u64 },
    /// Forward the whole stream, but hold the destination's answer back for `hold_ms` (a
    /// destination that read everything and then hung).
    SwallowAnswer { hold_ms: u64 },
    /// Rewrite the section version of every state record of this type (VCPU_STATE, VM_STATE
    /// or DEVICE_STATE) to `version`, with its checksum made right again: a source that writes
    /// a section version the destination does not read.
    SetSectionVersion { record: u32, version: u32 },
    /// Forward the stream, but hold the source's COMMIT (the 8 bytes after END) back for
    /// `hold_ms`, then forward it (a slow or retransmitting link at the handover).
    DelayCommit { hold_ms: u64 },
    /// A replication stream: after `checkpoints` CHECKPOINT records went through, cut both
    /// connections in the middle of the next epoch's VM_STATE record (its header and half its
    /// body forwarded): an epoch that never completes.
    CutInEpoch { checkpoints: u64 },
    /// A post-copy: forward the stream, COMMIT and `after_bytes` of the post-copy page stream,
    /// then cut both connections (a link that fails while the guest already runs on the
    /// destination).
    CutInPostcopy { after_bytes: u64 },
}

pub struct Proxy {
    pub uri: String,
    /// When a StallAtRecord, SwallowAnswer or DelayCommit fault began holding data back.
    pub stalled_at: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    thread: Option<JoinHandle<()>>,
}

fn read_exact_or_eof(r: &mut impl Read, buf: &mut [u8]) -> bool {
    r.read_exact(buf).is_ok()
}

impl Proxy {
    pub fn start(listen: PathBuf, target: PathBuf, fault: Fault) -> Proxy {
        let l = UnixListener::bind(&listen).expect("bind proxy");
        let uri = format!("unix:{}", listen.display());
        let stalled_at = std::sync::Arc::new(std::sync::Mutex::new(None));
        let stalled = stalled_at.clone();
        let mark = move || *stalled.lock().unwrap() = Some(std::time::Instant::now());
        let thread = std::thread::spawn(move || {
            let Ok((mut src, _)) = l.accept() else { return };
            let Ok(mut dst) = UnixStream::connect(&target) else { return };
            // Return path: raw copy.
            {
                let mut s2 = src.try_clone().unwrap();
                let mut d2 = dst.try_clone().unwrap();
                let mark = mark.clone();
                std::thread::spawn(move || {
                    if let Fault::SwallowAnswer { hold_ms } = fault {
                        let mut first = [0u8; 1];
                        if d2.read_exact(&mut first).is_ok() {
                            mark();
                            std::thread::sleep(std::time::Duration::from_millis(hold_ms));
                        }
                        let _ = s2.shutdown(Shutdown::Both);
                        return;
                    }
                    let _ = std::io::copy(&mut d2, &mut s2);
                    let _ = s2.shutdown(Shutdown::Write);
                });
            }
            let mut sent = 0u64;
            let fwd = |dst: &mut UnixStream, b: &[u8], sent: &mut u64| -> bool {
                if let Fault::TruncateAfter(n) = fault {
                    if *sent + b.len() as u64 >= n {
                        let k = (n - *sent) as usize;
                        let _ = dst.write_all(&b[..k]);
                        return false;
                    }
                }
                *sent += b.len() as u64;
                dst.write_all(b).is_ok()
            };
            // The source's HELLO (32 bytes, answered on the return path), then the stream's
            // 32-byte header.
            let mut header = [0u8; 32];
            let mut ok = read_exact_or_eof(&mut src, &mut header) && fwd(&mut dst, &header, &mut sent);
            if ok && &header[..8] == b"FERRYHLO" {
                ok = read_exact_or_eof(&mut src, &mut header) && fwd(&mut dst, &header, &mut sent);
            }
            if !ok {
                let _ = dst.shutdown(Shutdown::Both);
                let _ = src.shutdown(Shutdown::Both);
                return;
            }
            let mut index = 0u64;
            let mut flipped = false;
            let mut checkpoints = 0u64;
            loop {
                let mut head = [0u8; 8];
                if !read_exact_or_eof(&mut src, &mut head) {
                    break;
                }
                let t = u32::from_le_bytes(head[..4].try_into().unwrap());
                let len = u32::from_le_bytes(head[4..].try_into().unwrap()) as usize;
                if let Fault::CutAtRecord(ct) = fault {
                    if t == ct {
                        break;
                    }
                }
                if let Fault::KillAtRecord { record, pid, after_ms } = fault {
                    if t == record {
                        std::thread::sleep(std::time::Duration::from_millis(after_ms));
                        // SAFETY: (test) SIGKILL to a child process of the test, by pid.
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                        break;
                    }
                }
                if let Fault::StallAtRecord { record, from_index, hold_ms } = fault {
                    if t == record && index >= from_index {
                        mark();
                        std::thread::sleep(std::time::Duration::from_millis(hold_ms));
                        break;
                    }
                }
                let total = len + (8 - len % 8) % 8 + 8;
                let mut rest = vec![0u8; total];
                if !read_exact_or_eof(&mut src, &mut rest) {
                    break;
                }
                if let Fault::CutInEpoch { checkpoints: n } = fault {
                    checkpoints += (t == 6) as u64;
                    if t == 4 && checkpoints >= n {
                        mark();
                        let _ = dst.write_all(&head);
                        let _ = dst.write_all(&rest[..len / 2]);
                        let _ = dst.shutdown(Shutdown::Both);
                        let _ = src.shutdown(Shutdown::Both);
                        return;
                    }
                }
                if let Fault::FlipByte { index: i, offset } = fault {
                    if !flipped && index >= i && offset < len {
                        rest[offset] ^= 0x40;
                        flipped = true;
                    }
                }
                if let Fault::SetSectionVersion { record, version } = fault {
                    let at = match record {
                        3 => Some(4),  // VCPU_STATE: vcpu_id, version
                        4 => Some(0),  // VM_STATE: version, reserved
                        5 => Some(20), // DEVICE_STATE: id[16], instance, version
                        _ => None,
                    };
                    if let Some(at) = at.filter(|_| t == record) {
                        rest[at..at + 4].copy_from_slice(&version.to_le_bytes());
                        let crc = crc32c::crc32c_append(crc32c::crc32c(&head), &rest[..len]);
                        let end = rest.len() - 8;
                        rest[end..end + 4].copy_from_slice(&crc.to_le_bytes());
                    }
                }
                if !fwd(&mut dst, &head, &mut sent) || !fwd(&mut dst, &rest, &mut sent) {
                    break;
                }
                index += 1;
                if t == 7 {
                    // END: the rest (COMMIT) is raw.
                    if let Fault::DelayCommit { hold_ms } = fault {
                        let mut commit = [0u8; 8];
                        if read_exact_or_eof(&mut src, &mut commit) {
                            mark();
                            std::thread::sleep(std::time::Duration::from_millis(hold_ms));
                            let _ = dst.write_all(&commit);
                        }
                    }
                    if let Fault::CutInPostcopy { after_bytes } = fault {
                        let _ = std::io::copy(&mut (&mut src).take(8 + after_bytes), &mut dst);
                        mark();
                        let _ = dst.shutdown(Shutdown::Both);
                        let _ = src.shutdown(Shutdown::Both);
                        return;
                    }
                    let _ = std::io::copy(&mut src, &mut dst);
                    let _ = dst.shutdown(Shutdown::Write);
                    return;
                }
            }
            // Stop both directions of the stream, but leave the return path open: the
            // destination's NACK must still reach the source (a full shutdown here raced with it,
            // and the source then saw only "broken pipe").
            let _ = dst.shutdown(Shutdown::Write);
            let _ = src.shutdown(Shutdown::Read);
        });
        Proxy { uri, stalled_at, thread: Some(thread) }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// What [`ConnProxy`] does to one connection.
#[derive(Debug, Clone, Copy)]
pub enum ConnFault {
    /// Cut it, both ways, after this many bytes from the source.
    Cut(u64),
    /// Flip one bit of the source's byte at this offset.
    Flip(u64),
}

/// A raw proxy for every connection made to it (a migration's main connection and its page
/// channels), each forwarded both ways to `target`; connection number `fault.0` (0: the first
/// accepted) gets `fault.1`.
pub struct ConnProxy {
    pub uri: String,
    /// Whether the fault happened.
    pub cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ConnProxy {
    pub fn start(listen: PathBuf, target: PathBuf, fault: Option<(usize, ConnFault)>) -> ConnProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        let l = UnixListener::bind(&listen).expect("bind proxy");
        let uri = format!("unix:{}", listen.display());
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        std::thread::spawn(move || {
            for (n, src) in l.incoming().enumerate() {
                let Ok(mut src) = src else { return };
                let Ok(mut dst) = UnixStream::connect(&target) else { return };
                let (mut s2, mut d2) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut d2, &mut s2);
                    let _ = s2.shutdown(Shutdown::Write);
                });
                let f = fault.filter(|&(i, _)| i == n).map(|(_, f)| f);
                let flag = flag.clone();
                std::thread::spawn(move || match f {
                    Some(ConnFault::Cut(b)) => {
                        let _ = std::io::copy(&mut (&mut src).take(b), &mut dst);
                        flag.store(true, Ordering::SeqCst);
                        let _ = dst.shutdown(Shutdown::Both);
                        let _ = src.shutdown(Shutdown::Both);
                    }
                    Some(ConnFault::Flip(at)) => {
                        let mut head = vec![0u8; at as usize + 1];
                        if src.read_exact(&mut head).is_ok() {
                            head[at as usize] ^= 0x10;
                            flag.store(true, Ordering::SeqCst);
                            let _ = dst.write_all(&head);
                            let _ = std::io::copy(&mut src, &mut dst);
                        }
                        let _ = dst.shutdown(Shutdown::Write);
                    }
                    None => {
                        let _ = std::io::copy(&mut src, &mut dst);
                        let _ = dst.shutdown(Shutdown::Write);
                    }
                });
            }
        });
        ConnProxy { uri, cut: done }
    }
}
