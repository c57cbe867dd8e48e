//! The built-in guest: its ELF (built by build.rs from `crates/ferry-guest`) and the rules of its
//! command line, checked before boot so a typo fails at once with a clear error.

use anyhow::{bail, Result};

/// The built-in guest's ELF image (PVH-bootable, also under `qemu-system-x86_64 -kernel`).
pub static GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry-guest.elf"));

/// Default command line of the built-in guest.
pub const DEFAULT_CMDLINE: &str = "mib=64 rate=50 pattern=seq hb_us=1000 report_ms=1000";

/// RAM the guest needs besides its working set: its image, stacks and generation table.
const GUEST_OVERHEAD_MIB: u64 = 8;

/// Checks the built-in guest's command line (see docs/guest.md) against `memory` bytes of RAM.
pub fn validate_cmdline(cmdline: &str, memory: u64) -> Result<()> {
    let mut mib = 64u64;
    for tok in cmdline.split_ascii_whitespace() {
        let Some((k, v)) = tok.split_once('=') else {
            bail!(
                "unknown guest argument '{tok}' (the built-in guest takes mib=, rate=, pattern=, hb_us=, report_ms=)"
            );
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
            _ => bail!(
                "unknown guest argument '{k}' (the built-in guest takes mib=, rate=, pattern=, hb_us=, report_ms=)"
            ),
        }
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
    fn embedded_guest_is_a_pvh_elf() {
        assert_eq!(&GUEST_ELF[..4], b"\x7fELF");
    }
}
