//! userfaultfd, for filling guest memory without the kernel zeroing every page first:
//! `UFFDIO_COPY` allocates a page and copies into it in one step, where a plain write to a
//! fresh memfd page makes the kernel clear it and then we copy over it. The crate `userfaultfd`
//! needs bindgen (libclang) at build time; a handful of ioctls do not justify that, so they are
//! here. Post-copy uses the same descriptor with a handler: [`Uffd::read_faults`] reports the
//! pages vCPUs (and Ferry's own threads) wait for, and a copy or [`Uffd::wake`] releases them.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

const UFFD_API: u64 = 0xAA;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
/// `_IOWR(0xAA, 0x08, struct uffdio_poison)` (Linux 6.6).
const UFFDIO_POISON: libc::c_ulong = 0xc020_aa08;
/// `_IOR(0xAA, 0x02, struct uffdio_range)`.
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// `uffd_msg.event` of a page fault.
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// Size of `struct uffd_msg`.
const UFFD_MSG_LEN: usize = 32;
/// `UFFD_FEATURE_POISON`: UFFDIO_POISON is allowed.
const UFFD_FEATURE_POISON: u64 = 1 << 14;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioPoison {
    range: UffdioRange,
    mode: u64,
    updated: i64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// Errors of userfaultfd.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("userfaultfd is not available")]
    Open(#[source] std::io::Error),
    #[error("userfaultfd {what} failed")]
    Ioctl {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Result of a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyOutcome {
    /// The page was missing and now holds the data.
    Copied,
    /// The page already exists: write it the ordinary way.
    Exists,
}

/// A userfaultfd with missing-page ranges registered. While a range is registered, nothing may
/// fault on a missing page in it (no handler runs): only [`Uffd::copy`] fills it.
pub struct Uffd {
    fd: File,
    ranges: Vec<(u64, u64)>,
    /// UFFD_FEATURE_POISON was granted.
    poison: bool,
}

impl Uffd {
    pub fn new() -> Result<Self, UffdError> {
        // SAFETY: the userfaultfd syscall takes flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(UffdError::Open(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { File::from_raw_fd(fd as i32) };
        // Ask for UFFDIO_POISON where the kernel has it. A kernel without it refuses the
        // handshake, which leaves the fd unusable: then start again with a new one, without.
        let mut api = UffdioApi { api: UFFD_API, features: UFFD_FEATURE_POISON, ioctls: 0 };
        // SAFETY: UFFDIO_API with a valid uffdio_api struct that outlives the call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) };
        if r == 0 {
            return Ok(Uffd { fd, ranges: Vec::new(), poison: true });
        }
        Self::without_poison()
    }

    fn without_poison() -> Result<Self, UffdError> {
        // SAFETY: the userfaultfd syscall takes flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(UffdError::Open(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { File::from_raw_fd(fd as i32) };
        let mut api = UffdioApi { api: UFFD_API, features: 0, ioctls: 0 };
        // SAFETY: UFFDIO_API with a valid uffdio_api struct that outlives the call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) };
        if r < 0 {
            return Err(UffdError::Ioctl { what: "API handshake", source: std::io::Error::last_os_error() });
        }
        Ok(Uffd { fd, ranges: Vec::new(), poison: false })
    }

    /// A second handle on the same userfaultfd for another thread's [`Uffd::copy`] calls: it
    /// registers nothing of its own (its `unregister_all` does nothing).
    pub fn try_clone_for_copy(&self) -> Result<Self, UffdError> {
        let fd = self.fd.try_clone().map_err(|source| UffdError::Ioctl { what: "dup", source })?;
        Ok(Uffd { fd, ranges: Vec::new(), poison: self.poison })
    }

    /// Whether [`Uffd::poison`] is available.
    pub fn can_poison(&self) -> bool {
        self.poison
    }

    /// Installs a poison marker at the page `addr` of a registered range (the page must not be
    /// mapped: zap it first). Any later access through this mapping (a vCPU's included) raises
    /// a memory failure, as if the page had an uncorrectable error. Returns false if a page was
    /// mapped there (EEXIST): zap and try again.
    pub fn poison(&self, addr: u64) -> Result<bool, UffdError> {
        let mut p = UffdioPoison { range: UffdioRange { start: addr, len: 4096 }, mode: 0, updated: 0 };
        // SAFETY: UFFDIO_POISON with a valid struct naming one page of a registered range; the
        // kernel only changes this process's page table there.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_POISON, &mut p) };
        if r == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EEXIST) | Some(libc::EAGAIN) => Ok(false),
            _ => Err(UffdError::Ioctl { what: "poison", source: e }),
        }
    }

    /// Registers `[start, start+len)` (page aligned, mapped) for missing-page handling.
    pub fn register(&mut self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut reg =
            UffdioRegister { range: UffdioRange { start, len }, mode: UFFDIO_REGISTER_MODE_MISSING, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER with a valid struct describing a mapped range of ours.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) };
        if r < 0 {
            return Err(UffdError::Ioctl { what: "register", source: std::io::Error::last_os_error() });
        }
        self.ranges.push((start, len));
        Ok(())
    }

    /// Copies one page (or a run of missing pages) to `dst`.
    ///
    /// # Safety
    /// `src` must point to `len` readable bytes and `[dst, dst+len)` must lie in a registered
    /// range of guest memory that nothing else accesses concurrently.
    pub unsafe fn copy(&self, dst: u64, src: *const u8, len: u64) -> Result<CopyOutcome, UffdError> {
        let (mut dst, mut src, mut len) = (dst, src as u64, len);
        // EAGAIN means the copy stopped early (e.g. the address space changed under it):
        // continue after what was copied.
        for _ in 0..1000 {
            let mut c = UffdioCopy { dst, src, len, mode: 0, copy: 0 };
            // SAFETY: per this function's contract; the struct outlives the call.
            let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c) };
            if r == 0 {
                return Ok(CopyOutcome::Copied);
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EEXIST) => return Ok(CopyOutcome::Exists),
                Some(libc::EAGAIN) => {
                    let done = c.copy.max(0) as u64;
                    dst += done;
                    src += done;
                    len -= done.min(len);
                    if len == 0 {
                        return Ok(CopyOutcome::Copied);
                    }
                }
                _ => return Err(UffdError::Ioctl { what: "copy", source: e }),
            }
        }
        Err(UffdError::Ioctl { what: "copy", source: std::io::Error::from_raw_os_error(libc::EAGAIN) })
    }

    /// Waits up to `timeout` for page faults in the registered ranges and appends the
    /// page-aligned host address of each to `out` (a page can come more than once: several
    /// threads waiting on it). The waiting threads stay blocked until the page is filled
    /// ([`Uffd::copy`]) or woken ([`Uffd::wake`]).
    pub fn read_faults(&self, out: &mut Vec<u64>, timeout: std::time::Duration) -> Result<(), UffdError> {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll on one valid pollfd that outlives the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                return Ok(());
            }
            return Err(UffdError::Ioctl { what: "poll", source: e });
        }
        if r == 0 {
            return Ok(());
        }
        let mut buf = [0u8; UFFD_MSG_LEN * 64];
        loop {
            // SAFETY: read into a buffer we own, of its length; the fd is non-blocking.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(()),
                    _ => Err(UffdError::Ioctl { what: "read", source: e }),
                };
            }
            let n = n as usize;
            for m in buf[..n].chunks_exact(UFFD_MSG_LEN) {
                if m[0] == UFFD_EVENT_PAGEFAULT {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(&m[16..24]);
                    out.push(u64::from_ne_bytes(a) & !0xfff);
                }
            }
            if n < buf.len() {
                return Ok(());
            }
        }
    }

    /// Wakes the threads waiting on `[addr, addr+len)` (a page that was filled by someone
    /// else's copy, which found it existing).
    pub fn wake(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let mut range = UffdioRange { start: addr, len };
        // SAFETY: UFFDIO_WAKE with a range of a registered area; it only wakes waiters.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut range) };
        if r < 0 {
            return Err(UffdError::Ioctl { what: "wake", source: std::io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Unregisters every range (faults are ordinary again).
    pub fn unregister_all(&mut self) -> Result<(), UffdError> {
        for (start, len) in self.ranges.drain(..) {
            let mut range = UffdioRange { start, len };
            // SAFETY: UFFDIO_UNREGISTER with a range registered earlier.
            let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &mut range) };
            if r < 0 {
                return Err(UffdError::Ioctl { what: "unregister", source: std::io::Error::last_os_error() });
            }
        }
        Ok(())
    }
}
