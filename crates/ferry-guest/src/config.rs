//! The PVH start info and the workload's command line.

use core::fmt;

const HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;

/// What the guest needs from `hvm_start_info`.
pub struct StartInfo {
    pub cmdline: &'static str,
    /// Usable RAM regions (E820 type 1), at most 16.
    pub ram: [(u64, u64); 16],
    pub ram_count: usize,
}

#[derive(Debug)]
pub enum StartInfoError {
    Magic(u32),
    Cmdline,
}

impl fmt::Display for StartInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartInfoError::Magic(m) => write!(f, "magic {m:#x}, want {HVM_START_MAGIC:#x}"),
            StartInfoError::Cmdline => write!(f, "command line is not UTF-8"),
        }
    }
}

impl StartInfo {
    /// # Safety
    /// `addr` must point to a valid `hvm_start_info` whose command line and memory map are
    /// readable (identity mapped).
    pub unsafe fn read(addr: u64) -> Result<StartInfo, StartInfoError> {
        let p = addr as *const u8;
        // SAFETY: fields of hvm_start_info (version >= 1) at their spec offsets.
        let (magic, version, cmdline_paddr, memmap_paddr, memmap_entries) = unsafe {
            (
                (p as *const u32).read_volatile(),
                (p.add(4) as *const u32).read_volatile(),
                (p.add(24) as *const u64).read_volatile(),
                (p.add(40) as *const u64).read_volatile(),
                (p.add(48) as *const u32).read_volatile(),
            )
        };
        if magic != HVM_START_MAGIC {
            return Err(StartInfoError::Magic(magic));
        }
        let cmdline = if cmdline_paddr == 0 {
            ""
        } else {
            let c = cmdline_paddr as *const u8;
            let mut n = 0;
            // SAFETY: the command line is NUL-terminated; we stop at 4 KiB.
            while n < 4096 && unsafe { c.add(n).read_volatile() } != 0 {
                n += 1;
            }
            // SAFETY: n bytes were just read from this address.
            let bytes = unsafe { core::slice::from_raw_parts(c, n) };
            core::str::from_utf8(bytes).map_err(|_| StartInfoError::Cmdline)?
        };
        let mut ram = [(0u64, 0u64); 16];
        let mut ram_count = 0;
        if version >= 1 && memmap_paddr != 0 {
            for i in 0..memmap_entries.min(128) as usize {
                let e = (memmap_paddr as usize + i * 24) as *const u8;
                // SAFETY: hvm_memmap_table_entry {addr u64, size u64, type u32, reserved u32}.
                let (a, s, t) = unsafe {
                    (
                        (e as *const u64).read_volatile(),
                        (e.add(8) as *const u64).read_volatile(),
                        (e.add(16) as *const u32).read_volatile(),
                    )
                };
                if t == E820_RAM && ram_count < ram.len() {
                    ram[ram_count] = (a, s);
                    ram_count += 1;
                }
            }
        }
        Ok(StartInfo { cmdline, ram, ram_count })
    }
}

/// Which pages the workload writes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    Seq,
    Random,
    Hot,
}

impl Pattern {
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Seq => "seq",
            Pattern::Random => "random",
            Pattern::Hot => "hot",
        }
    }
}

/// A `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` token of the command line.
#[derive(Clone, Copy)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// Most `virtio_mmio.device=` tokens recorded (further ones are accepted and ignored).
pub const MAX_MMIO: usize = 8;

/// The workload's settings (see docs/guest.md).
#[derive(Clone, Copy)]
pub struct Config {
    pub mib: u64,
    /// MiB/s; 0 = as fast as it can; -1 = idle (no writes after the fill).
    pub rate: i64,
    pub pattern: Pattern,
    pub hb_us: u64,
    pub report_ms: u64,
    /// Run the disk workload (lane 0).
    pub disk: bool,
    /// Disk requests in flight (1..=32).
    pub disk_qd: u32,
    /// MiB/s of disk writes; 0 = as fast as it can.
    pub disk_rate: u64,
    /// Size of the disk region used, in MiB (1..=1024, clipped to the capacity).
    pub disk_mib: u64,
    /// The hostile driver (lane 0 attacks the virtio-blk device; `hostile`).
    pub hostile: bool,
    /// Random bits per 8-byte word of page data (8..=64; the rest are zero): 64 does not
    /// compress, fewer compress like ordinary memory (`--compress` measurements).
    pub word_bits: u32,
    pub mmio: [MmioDevice; MAX_MMIO],
    pub mmio_count: usize,
}

pub enum ConfigError<'a> {
    Unknown(&'a str),
    Value(&'a str, &'a str),
}

impl fmt::Display for ConfigError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Unknown(a) => write!(f, "unknown argument '{a}'"),
            ConfigError::Value(k, v) => write!(f, "bad value '{v}' for {k}"),
        }
    }
}

fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 18 {
        return None;
    }
    let mut v = 0u64;
    for b in s.bytes() {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (b - b'0') as u64;
    }
    Some(v)
}

fn parse_hex(s: &str) -> Option<u64> {
    let h = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"))?;
    if h.is_empty() || h.len() > 16 {
        return None;
    }
    let mut v = 0u64;
    for b in h.bytes() {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return None,
        };
        v = (v << 4) | d as u64;
    }
    Some(v)
}

/// `<size>@<base>:<irq>[:<id>]` as Linux takes it: size in bytes, decimal with an optional K, M
/// or G suffix (or hex with 0x); base hex with 0x (or decimal); irq and id decimal.
pub fn parse_mmio_device(v: &str) -> Option<MmioDevice> {
    let num = |s: &str| if s.starts_with("0x") || s.starts_with("0X") { parse_hex(s) } else { parse_u64(s) };
    let (size, rest) = v.split_once('@')?;
    let (mult, digits) = match size.as_bytes().last()? {
        b'k' | b'K' => (1u64 << 10, &size[..size.len() - 1]),
        b'm' | b'M' => (1 << 20, &size[..size.len() - 1]),
        b'g' | b'G' => (1 << 30, &size[..size.len() - 1]),
        _ => (1, size),
    };
    let size = num(digits)?.checked_mul(mult).filter(|&s| s > 0)?;
    let mut parts = rest.split(':');
    let base = num(parts.next()?)?;
    let irq = parse_u64(parts.next()?).filter(|&i| i <= u32::MAX as u64)? as u32;
    if let Some(id) = parts.next() {
        parse_u64(id)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(MmioDevice { base, size, irq })
}

impl Config {
    /// The settings of an empty command line.
    pub fn defaults() -> Config {
        Config {
            mib: 64,
            rate: 50,
            pattern: Pattern::Seq,
            hb_us: 1000,
            report_ms: 1000,
            disk: false,
            disk_qd: 8,
            disk_rate: 0,
            disk_mib: 64,
            hostile: false,
            word_bits: 64,
            mmio: [MmioDevice { base: 0, size: 0, irq: 0 }; MAX_MMIO],
            mmio_count: 0,
        }
    }

    pub fn parse(cmdline: &str) -> Result<Config, ConfigError<'_>> {
        let mut c = Config::defaults();
        for tok in cmdline.split_ascii_whitespace() {
            let (k, v) = match tok.split_once('=') {
                Some(kv) => kv,
                None => return Err(ConfigError::Unknown(tok)),
            };
            let bad = || ConfigError::Value(k, v);
            match k {
                "mib" => c.mib = parse_u64(v).filter(|&m| m >= 1).ok_or_else(bad)?,
                "rate" => c.rate = if v == "-1" { -1 } else { parse_u64(v).ok_or_else(bad)? as i64 },
                "pattern" => {
                    c.pattern = match v {
                        "seq" => Pattern::Seq,
                        "random" => Pattern::Random,
                        "hot" => Pattern::Hot,
                        _ => return Err(bad()),
                    }
                }
                "hb_us" => c.hb_us = parse_u64(v).filter(|&x| x >= 100).ok_or_else(bad)?,
                "report_ms" => c.report_ms = parse_u64(v).filter(|&x| x >= 10).ok_or_else(bad)?,
                "disk" => {
                    c.disk = match v {
                        "0" => false,
                        "1" => true,
                        _ => return Err(bad()),
                    }
                }
                "hostile" => {
                    c.hostile = match v {
                        "0" => false,
                        "1" => true,
                        _ => return Err(bad()),
                    }
                }
                "disk_qd" => c.disk_qd = parse_u64(v).filter(|&x| (1..=32).contains(&x)).ok_or_else(bad)? as u32,
                "disk_rate" => c.disk_rate = parse_u64(v).ok_or_else(bad)?,
                "word_bits" => c.word_bits = parse_u64(v).filter(|&x| (8..=64).contains(&x)).ok_or_else(bad)? as u32,
                "disk_mib" => c.disk_mib = parse_u64(v).filter(|&x| (1..=1024).contains(&x)).ok_or_else(bad)?,
                "virtio_mmio.device" => {
                    let d = parse_mmio_device(v).ok_or_else(bad)?;
                    if c.mmio_count < MAX_MMIO {
                        c.mmio[c.mmio_count] = d;
                        c.mmio_count += 1;
                    }
                }
                _ => return Err(ConfigError::Unknown(tok)),
            }
        }
        if c.hostile && c.disk {
            // Both would drive the one queue.
            return Err(ConfigError::Value("hostile", "1 (with disk=1: choose one)"));
        }
        Ok(c)
    }
}
