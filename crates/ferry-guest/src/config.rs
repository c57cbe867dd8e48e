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

/// The workload's settings (see docs/guest.md).
#[derive(Clone, Copy)]
pub struct Config {
    pub mib: u64,
    /// MiB/s; 0 = as fast as it can; -1 = idle (no writes after the fill).
    pub rate: i64,
    pub pattern: Pattern,
    pub hb_us: u64,
    pub report_ms: u64,
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

impl Config {
    pub fn parse(cmdline: &str) -> Result<Config, ConfigError<'_>> {
        let mut c = Config { mib: 64, rate: 50, pattern: Pattern::Seq, hb_us: 1000, report_ms: 1000 };
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
                _ => return Err(ConfigError::Unknown(tok)),
            }
        }
        Ok(c)
    }
}
