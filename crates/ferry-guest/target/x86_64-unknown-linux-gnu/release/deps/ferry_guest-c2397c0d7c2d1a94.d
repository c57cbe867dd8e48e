/work/main/crates/ferry-guest/target/x86_64-unknown-linux-gnu/release/deps/ferry_guest-c2397c0d7c2d1a94.d: src/main.rs src/clock.rs src/config.rs src/mem.rs src/out.rs src/sys.rs src/workload.rs src/boot.s

/work/main/crates/ferry-guest/target/x86_64-unknown-linux-gnu/release/deps/ferry_guest-c2397c0d7c2d1a94: src/main.rs src/clock.rs src/config.rs src/mem.rs src/out.rs src/sys.rs src/workload.rs src/boot.s

src/main.rs:
src/clock.rs:
src/config.rs:
src/mem.rs:
src/out.rs:
src/sys.rs:
src/workload.rs:
src/boot.s:
