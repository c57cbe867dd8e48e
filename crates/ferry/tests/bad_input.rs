//! Bad input to `ferry run` gets a clear error and a non-zero exit.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;

fn run_ferry(args: &[&str]) -> (i32, String) {
    let out = Command::new(FERRY).args(args).output().expect("run ferry");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A minimal ELF64 executable: one PT_LOAD of 16 bytes at `paddr`, and (optionally) a PVH note.
fn tiny_elf(paddr: u64, pvh: bool) -> Vec<u8> {
    let phnum: u16 = if pvh { 2 } else { 1 };
    let ph_off = 64u64;
    let note_off = ph_off + 56 * phnum as u64;
    let note: Vec<u8> = [4u32.to_le_bytes(), 4u32.to_le_bytes(), 18u32.to_le_bytes()]
        .concat()
        .into_iter()
        .chain(*b"Xen\0")
        .chain((paddr as u32).to_le_bytes())
        .collect();
    let code_off = note_off + if pvh { note.len() as u64 } else { 0 };
    let mut e = Vec::new();
    e.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&62u16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&paddr.to_le_bytes()); // entry
    e.extend_from_slice(&ph_off.to_le_bytes());
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes());
    e.extend_from_slice(&64u16.to_le_bytes());
    e.extend_from_slice(&56u16.to_le_bytes());
    e.extend_from_slice(&phnum.to_le_bytes());
    e.extend_from_slice(&64u16.to_le_bytes());
    e.extend_from_slice(&0u16.to_le_bytes());
    e.extend_from_slice(&0u16.to_le_bytes());
    let phdr = |t: u32, off: u64, addr: u64, size: u64| -> Vec<u8> {
        [
            t.to_le_bytes().to_vec(),
            5u32.to_le_bytes().to_vec(),
            off.to_le_bytes().to_vec(),
            addr.to_le_bytes().to_vec(),
            addr.to_le_bytes().to_vec(),
            size.to_le_bytes().to_vec(),
            size.to_le_bytes().to_vec(),
            4u64.to_le_bytes().to_vec(),
        ]
        .concat()
    };
    e.extend(phdr(1, code_off, paddr, 16));
    if pvh {
        e.extend(phdr(4, note_off, 0, note.len() as u64));
        e.extend(&note);
    }
    e.extend([0xf4u8; 16]); // hlt
    e
}

#[test]
fn missing_kernel_file_is_named_in_the_error() {
    let (code, err) = run_ferry(&["run", "--kernel", "/nonexistent/vmlinux"]);

    assert_ne!(code, 0);
    assert!(err.contains("/nonexistent/vmlinux") && err.contains("cannot read the kernel image"), "{err}");
}

#[test]
fn non_elf_kernel_is_refused_as_not_elf() {
    if !kvm_available("non_elf_kernel_is_refused_as_not_elf") {
        return;
    }
    let d = tmpdir("notelf");
    let p = d.join("kernel.bin");
    std::fs::write(&p, b"MZ this is not an ELF file at all").unwrap();

    let (code, err) = run_ferry(&["run", "--memory", "64M", "--kernel", p.to_str().unwrap()]);

    assert_ne!(code, 0);
    assert!(err.contains("not an ELF file"), "{err}");
}

#[test]
fn elf_without_pvh_note_is_refused_naming_the_note() {
    if !kvm_available("elf_without_pvh_note_is_refused_naming_the_note") {
        return;
    }
    let d = tmpdir("nopvh");
    let p = d.join("kernel.elf");
    std::fs::write(&p, tiny_elf(0x100000, false)).unwrap();

    let (code, err) = run_ferry(&["run", "--memory", "64M", "--kernel", p.to_str().unwrap()]);

    assert_ne!(code, 0);
    assert!(err.contains("no PVH entry point"), "{err}");
}

#[test]
fn kernel_loaded_beyond_guest_memory_is_refused() {
    if !kvm_available("kernel_loaded_beyond_guest_memory_is_refused") {
        return;
    }
    let d = tmpdir("toobig");
    let p = d.join("kernel.elf");
    std::fs::write(&p, tiny_elf(0x4000000, true)).unwrap(); // at 64 MiB

    let (code, err) = run_ferry(&["run", "--memory", "32M", "--kernel", p.to_str().unwrap()]);

    assert_ne!(code, 0);
    assert!(err.contains("cannot load the ELF kernel into guest memory"), "{err}");
}

#[test]
fn unknown_guest_argument_is_named_in_the_error() {
    let (code, err) = run_ferry(&["run", "--cmdline", "mib=16 speed=9"]);

    assert_ne!(code, 0);
    assert!(err.contains("unknown guest argument 'speed'"), "{err}");
}

#[test]
fn zero_cpus_is_refused() {
    let (code, err) = run_ferry(&["run", "--cpus", "0"]);

    assert_ne!(code, 0);
    assert!(err.contains("--cpus 0"), "{err}");
}

#[test]
fn memory_too_small_for_the_working_set_is_refused() {
    let (code, err) = run_ferry(&["run", "--memory", "64M", "--cmdline", "mib=128"]);

    assert_ne!(code, 0);
    assert!(err.contains("working set of 128 MiB"), "{err}");
}

#[test]
fn malformed_memory_size_is_refused() {
    let (code, err) = run_ferry(&["run", "--memory", "lots"]);

    assert_ne!(code, 0);
    assert!(err.contains("'lots' is not a size"), "{err}");
}

#[test]
fn prefault_on_an_incoming_migration_without_memory_size_is_refused() {
    let (code, err) = run_ferry(&["run", "--incoming", "unix:/tmp/ferry-never-used.sock", "--prefault"]);
    assert_ne!(code, 0);
    assert!(err.contains("--prefault with --incoming needs --memory"), "{err}");
    assert!(!std::path::Path::new("/tmp/ferry-never-used.sock").exists(), "nothing may listen");
}

#[test]
fn a_destination_stall_timeout_without_incoming_or_of_zero_is_refused() {
    let (code, err) = run_ferry(&["run", "--stall-timeout-ms", "500"]);
    assert_ne!(code, 0);
    assert!(err.contains("--stall-timeout-ms applies to --incoming only"), "{err}");

    let (code, err) = run_ferry(&["run", "--incoming", "unix:/tmp/ferry-never-used-2.sock", "--stall-timeout-ms", "0"]);
    assert_ne!(code, 0);
    assert!(err.contains("--stall-timeout-ms"), "{err}");
    assert!(!std::path::Path::new("/tmp/ferry-never-used-2.sock").exists(), "nothing may listen");
}

/// `ferry migrate` with `extra` options, to a source that does not exist: a refusal of the
/// options must come before any attempt to reach it.
fn migrate_with(extra: &[&str]) -> (i32, String) {
    let mut args = vec!["migrate", "--api-socket", "/tmp/ferry-no-such.sock", "--to", "unix:/tmp/x"];
    args.extend_from_slice(extra);
    run_ferry(&args)
}

#[test]
fn a_zero_bandwidth_cap_is_refused() {
    let (code, err) = migrate_with(&["--max-bandwidth", "0"]);
    assert_ne!(code, 0);
    assert!(err.contains("--max-bandwidth"), "{err}");
}

#[test]
fn a_compression_level_without_compression_or_out_of_range_is_refused() {
    let (code, err) = migrate_with(&["--compress-level", "3"]);
    assert_ne!(code, 0);
    assert!(err.contains("--compress"), "{err}");
    let (code, err) = migrate_with(&["--compress", "zstd", "--compress-level", "20"]);
    assert_ne!(code, 0);
    assert!(err.contains("--compress-level"), "{err}");
    let (code, err) = migrate_with(&["--compress", "lz4"]);
    assert_ne!(code, 0);
    assert!(err.contains("--compress") && err.contains("zstd"), "{err}");
}

#[test]
fn a_channel_count_out_of_range_or_with_postcopy_is_refused() {
    for n in ["0", "17", "two"] {
        let (code, err) = migrate_with(&["--channels", n]);
        assert_ne!(code, 0);
        assert!(err.contains("--channels"), "--channels {n}: {err}");
    }
    let (code, err) = migrate_with(&["--channels", "2", "--postcopy"]);
    assert_ne!(code, 0);
    assert!(err.contains("--channels") && err.contains("--postcopy"), "{err}");
}

#[test]
fn zero_iterations_without_forced_switchover_is_refused() {
    let (code, err) = migrate_with(&["--max-iterations", "0"]);
    assert_ne!(code, 0);
    assert!(err.contains("--max-iterations 0") && err.contains("--force-switchover"), "{err}");
}

/// The same image given twice is named as such (it used to fail as "in use by another
/// process", which was this one); sizes take a T suffix.
#[test]
fn the_same_disk_twice_is_named_and_sizes_take_t() {
    let dir = tmpdir("disk-twice");
    let img = dir.join("d.img");
    std::fs::File::create(&img).unwrap().set_len(1 << 20).unwrap();
    let same = dir.join(".").join("d.img");
    let (code, err) = run_ferry(&["run", "--disk", img.to_str().unwrap(), "--disk", same.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("is given twice"), "{err}");
    let (code, err) = run_ferry(&["run", "--memory", "2X"]);
    assert_ne!(code, 0);
    assert!(err.contains("e.g. 512M, 1G, 1T"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
