//! A raw disk image file and its lock.
//!
//! The image is locked with an open-file-description lock (`F_OFD_SETLK`, whole file): exclusive
//! for a writable disk, shared for a read-only one, so two Ferry processes never write one image.
//! A migration destination opens the image without locking it; the lock passes at switch-over:
//! the source unlocks once none of its requests is still executing, the destination locks before
//! it executes any request (docs/virtio-blk.md).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Bytes per sector (virtio-blk's unit).
pub const SECTOR_SIZE: u64 = 512;

/// Errors of opening or locking a disk image.
#[derive(Debug, thiserror::Error)]
pub enum DiskImageError {
    #[error("cannot open disk image {path}{hint}")]
    Open {
        path: PathBuf,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {path} is not a regular file or block device")]
    NotAFile { path: PathBuf },
    #[error("disk image {path} is empty")]
    Empty { path: PathBuf },
    #[error("disk image {path} has {size} bytes, not a multiple of 512")]
    Unaligned { path: PathBuf, size: u64 },
    #[error("disk image {path} is in use by another process (it holds the image's lock)")]
    Locked { path: PathBuf },
    #[error("cannot lock disk image {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the user asked for with `--disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub readonly: bool,
    /// Threads executing this disk's requests.
    pub io_threads: u32,
    /// Added to every request (emulates a slow or remote disk; tests and benchmarks use it).
    pub latency_us: u64,
}

impl DiskSpec {
    /// Threads this disk may keep busy while the guest runs: its device thread and its I/O
    /// threads.
    pub fn busy_threads(&self) -> u32 {
        1 + self.io_threads
    }

    pub fn new(path: impl Into<PathBuf>) -> Self {
        DiskSpec { path: path.into(), readonly: false, io_threads: default_io_threads(), latency_us: 0 }
    }
}

/// I/O threads per disk by default: one per two host CPUs, 1 to 4. Measured on a 2-CPU host
/// (`cargo bench -p ferry --bench disk`), where the guest's vCPU takes a CPU of its own, one
/// thread moved 1.37x the IOPS of four on page-cache I/O; more threads pay off when requests
/// wait on slow storage (set io-threads= then).
pub fn default_io_threads() -> u32 {
    let cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    (cpus / 2).clamp(1, 4)
}

/// An open raw image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    spec: DiskSpec,
    sectors: u64,
    locked: Mutex<bool>,
}

impl DiskImage {
    /// Opens the image (read-write unless read-only) without locking it.
    pub fn open(spec: &DiskSpec) -> Result<Self, DiskImageError> {
        let path = &spec.path;
        let file = OpenOptions::new().read(true).write(!spec.readonly).open(path).map_err(|source| {
            let hint = match source.kind() {
                std::io::ErrorKind::PermissionDenied if !spec.readonly => " for writing (add readonly=on?)",
                _ => "",
            };
            DiskImageError::Open { path: path.clone(), hint, source }
        })?;
        Self::from_file(spec, file)
    }

    /// Takes over an image an earlier Ferry had open and locked (a live update: the descriptor
    /// was inherited, and the lock belongs to its open file description, so it was never let
    /// go). The lock is taken again on the same description, which keeps it.
    pub fn adopt(spec: &DiskSpec, file: File) -> Result<Self, DiskImageError> {
        let img = Self::from_file(spec, file)?;
        img.lock()?;
        Ok(img)
    }

    fn from_file(spec: &DiskSpec, file: File) -> Result<Self, DiskImageError> {
        let path = &spec.path;
        let meta = file.metadata().map_err(|source| DiskImageError::Open { path: path.clone(), hint: "", source })?;
        use std::os::unix::fs::FileTypeExt;
        let size = if meta.file_type().is_block_device() {
            // SAFETY: lseek on an open fd; no memory is touched.
            let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
            if end < 0 {
                return Err(DiskImageError::Open {
                    path: path.clone(),
                    hint: "",
                    source: std::io::Error::last_os_error(),
                });
            }
            end as u64
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(DiskImageError::NotAFile { path: path.clone() });
        };
        if size == 0 {
            return Err(DiskImageError::Empty { path: path.clone() });
        }
        if size % SECTOR_SIZE != 0 {
            return Err(DiskImageError::Unaligned { path: path.clone(), size });
        }
        Ok(DiskImage { file, spec: spec.clone(), sectors: size / SECTOR_SIZE, locked: Mutex::new(false) })
    }

    /// Opens and locks the image (a machine that boots with it).
    pub fn open_locked(spec: &DiskSpec) -> Result<Self, DiskImageError> {
        let img = Self::open(spec)?;
        img.lock()?;
        Ok(img)
    }

    pub fn path(&self) -> &Path {
        &self.spec.path
    }

    pub fn spec(&self) -> &DiskSpec {
        &self.spec
    }

    pub fn readonly(&self) -> bool {
        self.spec.readonly
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    fn ofd(&self, l_type: i32) -> std::io::Result<()> {
        let fl = libc::flock {
            l_type: l_type as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        // SAFETY: F_OFD_SETLK reads a valid `struct flock` we own; the fd is open.
        let r = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Takes the lock (shared when read-only), failing at once if another process holds it.
    pub fn lock(&self) -> Result<(), DiskImageError> {
        let mut held = self.locked.lock().unwrap_or_else(|p| p.into_inner());
        if *held {
            return Ok(());
        }
        let t = if self.spec.readonly { libc::F_RDLCK } else { libc::F_WRLCK };
        match self.ofd(t) {
            Ok(()) => {
                *held = true;
                Ok(())
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
                Err(DiskImageError::Locked { path: self.spec.path.clone() })
            }
            Err(source) => Err(DiskImageError::Lock { path: self.spec.path.clone(), source }),
        }
    }

    /// Whether another open file description holds a lock that conflicts with a write lock on
    /// this image (`F_OFD_GETLK`): a destination sees its source's lock this way, which proves
    /// the two see each other's locks (the same host, or a file system with coherent locks).
    pub fn locked_elsewhere(&self) -> bool {
        let mut fl = libc::flock {
            l_type: libc::F_WRLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        // SAFETY: F_OFD_GETLK reads and writes a valid `struct flock` we own; the fd is open.
        let r = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        r == 0 && fl.l_type != libc::F_UNLCK as libc::c_short
    }

    /// Releases the lock (no-op when not held).
    pub fn unlock(&self) {
        let mut held = self.locked.lock().unwrap_or_else(|p| p.into_inner());
        if *held {
            let _ = self.ofd(libc::F_UNLCK);
            *held = false;
        }
    }

    pub fn is_locked(&self) -> bool {
        *self.locked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.sectors * SECTOR_SIZE
    }

    /// Reads `buf.len()` bytes at `offset` (storage migration, replication).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(buf, offset)
    }

    /// Writes `data` at `offset` (a destination filling its own image).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.write_all_at(data, offset)
    }

    /// Makes `len` bytes at `offset` read as zeros: a hole punched where the file system can,
    /// zeros written where it cannot (a block device, say).
    pub fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        if crate::memory::punch_hole(&self.file, offset, len).is_ok() {
            return Ok(());
        }
        let zeros = vec![0u8; (len.min(1 << 20)) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_at(offset + done, &zeros[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    /// Byte ranges that may hold data (`SEEK_DATA`/`SEEK_HOLE`); everything else reads as
    /// zeros. A file system without hole reporting gives the whole image.
    pub fn data_ranges(&self) -> Vec<(u64, u64)> {
        let fd = self.file.as_raw_fd();
        let size = self.bytes();
        let mut out = Vec::new();
        let mut pos = 0u64;
        while pos < size {
            // SAFETY: lseek on an open fd; no memory is touched.
            let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                    break; // no data after pos
                }
                return vec![(0, size)];
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            if hole < 0 {
                return vec![(0, size)];
            }
            let (d, h) = (data as u64, (hole as u64).min(size));
            if h <= d {
                break;
            }
            out.push((d, h));
            pos = h;
        }
        out
    }
}

/// Parses `--disk`: a bare path, or `path=P[,readonly=on|off][,io-threads=N][,latency-us=N]`.
pub fn parse_disk_spec(s: &str) -> Result<DiskSpec, String> {
    if !s.starts_with("path=") {
        if s.is_empty() {
            return Err("empty --disk".into());
        }
        return Ok(DiskSpec::new(s));
    }
    let mut spec = DiskSpec::new("");
    for kv in s.split(',') {
        let (k, v) = kv.split_once('=').ok_or_else(|| format!("--disk: '{kv}' is not key=value"))?;
        match k {
            "path" if !v.is_empty() => spec.path = PathBuf::from(v),
            "readonly" | "ro" => {
                spec.readonly = match v {
                    "on" | "true" | "1" => true,
                    "off" | "false" | "0" => false,
                    _ => return Err(format!("--disk readonly: '{v}' is not on or off")),
                }
            }
            "io-threads" => {
                spec.io_threads = match v.parse::<u32>() {
                    Ok(n @ 1..=64) => n,
                    _ => return Err(format!("--disk io-threads: '{v}' is not 1 to 64")),
                }
            }
            "latency-us" => {
                spec.latency_us = match v.parse::<u64>() {
                    Ok(n @ 0..=10_000_000) => n,
                    _ => return Err(format!("--disk latency-us: '{v}' is not 0 to 10000000")),
                }
            }
            _ => return Err(format!("--disk: unknown key '{k}' (path, readonly, io-threads, latency-us)")),
        }
    }
    if spec.path.as_os_str().is_empty() {
        return Err("--disk: path= is missing".into());
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(bytes: u64) -> (tempdir::Dir, PathBuf) {
        let d = tempdir::Dir::new();
        let p = d.0.join("disk.img");
        let f = File::create(&p).unwrap();
        f.set_len(bytes).unwrap();
        (d, p)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let p = std::env::temp_dir().join(format!("ferry-disk-test-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn a_second_writer_is_refused_while_the_first_holds_the_lock() {
        let (_d, p) = image(1 << 20);
        let a = DiskImage::open_locked(&DiskSpec::new(&p)).unwrap();

        let b = DiskImage::open_locked(&DiskSpec::new(&p));

        assert!(matches!(b, Err(DiskImageError::Locked { .. })), "{b:?}");
        a.unlock();
        DiskImage::open_locked(&DiskSpec::new(&p)).unwrap();
    }

    #[test]
    fn readers_share_but_exclude_a_writer() {
        let (_d, p) = image(1 << 20);
        let ro = DiskSpec { readonly: true, ..DiskSpec::new(&p) };
        let _r1 = DiskImage::open_locked(&ro).unwrap();
        let _r2 = DiskImage::open_locked(&ro).unwrap();

        let w = DiskImage::open_locked(&DiskSpec::new(&p));

        assert!(matches!(w, Err(DiskImageError::Locked { .. })), "{w:?}");
    }

    #[test]
    fn missing_empty_and_unaligned_images_are_named() {
        let (d, p) = image(1000);
        let missing = DiskImage::open(&DiskSpec::new(d.0.join("nope.img"))).unwrap_err().to_string();
        let unaligned = DiskImage::open(&DiskSpec::new(&p)).unwrap_err().to_string();
        let (_d2, empty) = image(0);
        let empty = DiskImage::open(&DiskSpec::new(&empty)).unwrap_err().to_string();

        assert!(missing.contains("nope.img"), "{missing}");
        assert!(unaligned.contains("not a multiple of 512"), "{unaligned}");
        assert!(empty.contains("is empty"), "{empty}");
    }

    #[test]
    fn data_ranges_skip_holes_and_zero_range_reads_back_zeros() {
        let (_d, p) = image(1 << 20);
        let img = DiskImage::open(&DiskSpec::new(&p)).unwrap();
        assert!(img.data_ranges().is_empty(), "a fresh sparse image has data: {:?}", img.data_ranges());
        img.write_at(256 << 10, &[7u8; 4096]).unwrap();
        let r = img.data_ranges();
        assert!(r.iter().any(|&(a, b)| a <= 256 << 10 && b >= (256 << 10) + 4096), "{r:?}");
        assert!(r.iter().all(|&(a, b)| a < b && b <= 1 << 20));
        img.zero_range(256 << 10, 4096).unwrap();
        let mut buf = [1u8; 4096];
        img.read_at(256 << 10, &mut buf).unwrap();
        assert_eq!(buf, [0u8; 4096]);
    }

    #[test]
    fn disk_specs_parse_and_bad_keys_are_named() {
        let s = parse_disk_spec("path=/x.img,readonly=on,io-threads=2,latency-us=500").unwrap();
        assert!((1..=4).contains(&default_io_threads()));
        assert_eq!(s, DiskSpec { path: "/x.img".into(), readonly: true, io_threads: 2, latency_us: 500 });
        assert_eq!(parse_disk_spec("/y.img").unwrap(), DiskSpec::new("/y.img"));
        assert!(parse_disk_spec("path=/x,bogus=1").unwrap_err().contains("unknown key 'bogus'"));
        assert!(parse_disk_spec("path=/x,readonly=maybe").unwrap_err().contains("readonly"));
    }
}
