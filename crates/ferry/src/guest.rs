//! The built-in guest: its ELF (built by build.rs from `crates/ferry-guest`) and the rules of its
//! command line, checked before boot so a typo fails at once with a clear error.

use anyhow::{bail, Result};

/// The built-in guest's ELF image (PVH-bootable, also under `qemu-system-x86_64 -kernel`).
pub static GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry-guest.elf"));

/// Default command line of the built-in guest.
pub const DEFAULT_CMDLINE: &str = "mib=64 rate=50 pattern=seq hb_us=1000 report_ms=1000";

/// RAM the guest needs besides its working set: its image (stacks, the disk workload's buffers
/// and 1 MiB block generation table; the working set starts at 6 MiB) and the page generation table.
const GUEST_OVERHEAD_MIB: u64 = 8;

/// The arguments, for error messages.
const ARGS: &str =
    "mib=, rate=, pattern=, hb_us=, report_ms=, disk=, disk_qd=, disk_rate=, disk_mib=, hostile=, word_bits=, virtio_mmio.device=";

/// Checks a `virtio_mmio.device=` value as the guest (and Linux) takes it:
/// `<size>@<base>:<irq>[:<id>]`, size decimal with an optional K/M/G suffix (or 0x hex), base hex
/// with 0x (or decimal), irq and id decimal.
fn valid_mmio_device(v: &str) -> bool {
    fn num(s: &str) -> Option<u64> {
        match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            Some(h) if !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()) => u64::from_str_radix(h, 16).ok(),
            Some(_) => None,
            None if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s.parse().ok(),
            None => None,
        }
    }
    let Some((size, rest)) = v.split_once('@') else { return false };
    let (digits, mult) = match size.as_bytes().last() {
        Some(b'k' | b'K') => (&size[..size.len() - 1], 1u64 << 10),
        Some(b'm' | b'M') => (&size[..size.len() - 1], 1 << 20),
        Some(b'g' | b'G') => (&size[..size.len() - 1], 1 << 30),
        _ => (size, 1),
    };
    if num(digits).and_then(|n| n.checked_mul(mult)).is_none_or(|n| n == 0) {
        return false;
    }
    let parts: Vec<&str> = rest.split(':').collect();
    let dec = |s: &str| !s.is_empty() && s.len() <= 18 && s.bytes().all(|b| b.is_ascii_digit());
    matches!(parts.len(), 2 | 3)
        && num(parts[0]).is_some()
        && dec(parts[1])
        && parts[1].parse::<u32>().is_ok()
        && parts.get(2).is_none_or(|id| dec(id))
}

/// Checks the built-in guest's command line (see docs/guest.md) against `memory` bytes of RAM.
pub fn validate_cmdline(cmdline: &str, memory: u64) -> Result<()> {
    let mut mib = 64u64;
    let (mut disk, mut hostile) = (false, false);
    for tok in cmdline.split_ascii_whitespace() {
        let Some((k, v)) = tok.split_once('=') else {
            bail!("unknown guest argument '{tok}' (the built-in guest takes {ARGS})");
        };
        let num = |min: u64| -> Result<u64> {
            match v.parse::<u64>() {
                Ok(n) if n >= min => Ok(n),
                _ => bail!("guest argument {k}: '{v}' is not a number >= {min}"),
            }
        };
        match k {
            "mib" => mib = num(1)?,
            "rate" => {
                if v != "-1" {
                    num(0)?;
                }
            }
            "pattern" => {
                if !matches!(v, "seq" | "random" | "hot") {
                    bail!("guest argument pattern: '{v}' is not one of seq, random, hot");
                }
            }
            "hb_us" => {
                num(100)?;
            }
            "report_ms" => {
                num(10)?;
            }
            "disk" | "hostile" => {
                if !matches!(v, "0" | "1") {
                    bail!("guest argument {k}: '{v}' is not 0 or 1");
                }
                if k == "disk" {
                    disk = v == "1";
                } else {
                    hostile = v == "1";
                }
            }
            "disk_qd" => {
                if !matches!(num(1)?, 1..=32) {
                    bail!("guest argument disk_qd: '{v}' is not in 1..=32");
                }
            }
            "disk_rate" => {
                num(0)?;
            }
            "disk_mib" => {
                if !matches!(num(1)?, 1..=1024) {
                    bail!("guest argument disk_mib: '{v}' is not in 1..=1024");
                }
            }
            "word_bits" => {
                if !matches!(num(8)?, 8..=64) {
                    bail!("guest argument word_bits: '{v}' is not in 8..=64");
                }
            }
            // Added by the VMM for each virtio-mmio device (the Linux form); the guest probes them.
            "virtio_mmio.device" => {
                if !valid_mmio_device(v) {
                    bail!("guest argument virtio_mmio.device: '{v}' is not <size>@<base>:<irq>[:<id>]");
                }
            }
            _ => bail!("unknown guest argument '{k}' (the built-in guest takes {ARGS})"),
        }
    }
    if disk && hostile {
        bail!("guest arguments disk=1 and hostile=1: both would drive the one disk queue; choose one");
    }
    let need = (mib + mib / 256 + GUEST_OVERHEAD_MIB) << 20;
    if need > memory.min(3 << 30) {
        bail!(
            "the built-in guest's working set of {mib} MiB needs about {} MiB of RAM below 3 GiB; the VM has {} MiB",
            need >> 20,
            memory >> 20
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_cmdline_is_valid_in_256_mib() {
        assert!(validate_cmdline(DEFAULT_CMDLINE, 256 << 20).is_ok());
    }

    #[test]
    fn unknown_argument_is_named_in_the_error() {
        let e = validate_cmdline("mib=8 bogus=1", 1 << 30).unwrap_err().to_string();
        assert!(e.contains("unknown guest argument 'bogus'"), "{e}");
    }

    #[test]
    fn working_set_larger_than_memory_is_refused() {
        let e = validate_cmdline("mib=512", 256 << 20).unwrap_err().to_string();
        assert!(e.contains("working set of 512 MiB"), "{e}");
    }

    #[test]
    fn disk_arguments_and_virtio_mmio_tokens_are_accepted() {
        let c = "mib=8 disk=1 disk_qd=32 disk_rate=0 disk_mib=1024 word_bits=16 virtio_mmio.device=4K@0xd0000000:5 \
                 virtio_mmio.device=512@0xfeb00e00:12 virtio_mmio.device=0x1000@0xd0001000:6:3";
        validate_cmdline(c, 256 << 20).unwrap();
    }

    #[test]
    fn bad_disk_arguments_are_refused() {
        for (c, want) in [
            ("disk=2", "disk"),
            ("disk_qd=0", "disk_qd"),
            ("disk_qd=33", "disk_qd"),
            ("disk_mib=0", "disk_mib"),
            ("disk=1 hostile=1", "choose one"),
            ("hostile=2", "hostile"),
            ("disk_mib=1025", "disk_mib"),
            ("disk_rate=-1", "disk_rate"),
            ("word_bits=7", "word_bits"),
            ("word_bits=65", "word_bits"),
            ("virtio_mmio.device=4K", "virtio_mmio.device"),
            ("virtio_mmio.device=4K@0xd0000000", "virtio_mmio.device"),
            ("virtio_mmio.device=4X@0xd0000000:5", "virtio_mmio.device"),
            ("virtio_mmio.device=4K@0xzz:5", "virtio_mmio.device"),
            ("virtio_mmio.device=4K@0xd0000000:5:1:2", "virtio_mmio.device"),
        ] {
            let e = validate_cmdline(c, 256 << 20).unwrap_err().to_string();
            assert!(e.contains(want), "{c}: {e}");
        }
    }

    #[test]
    fn embedded_guest_is_a_pvh_elf() {
        assert_eq!(&GUEST_ELF[..4], b"\x7fELF");
    }
}
