//! Builds the built-in guest (`crates/ferry-guest`, a bare-metal program with its own target
//! settings) with a nested cargo, and hands its ELF to `src/guest.rs` through OUT_DIR.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let guest = manifest.join("../ferry-guest");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target = out.join("guest-target");
    for p in ["src", "Cargo.toml", "build.rs", "linker.ld", ".cargo/config.toml"] {
        println!("cargo:rerun-if-changed={}", guest.join(p).display());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest).args(["build", "--release", "--locked", "--target-dir"]).arg(&target);
    // The guest has its own flags (.cargo/config.toml); nothing of this build may leak into it.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CLIPPY_ARGS",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("cannot run cargo to build the built-in guest");
    assert!(status.success(), "building the built-in guest (crates/ferry-guest) failed");
    let elf = target.join("x86_64-unknown-linux-gnu/release/ferry-guest");
    std::fs::copy(&elf, out.join("ferry-guest.elf")).expect("cannot copy the built-in guest ELF");
}
