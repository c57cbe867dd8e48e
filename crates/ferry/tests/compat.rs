//! Compatibility on real KVM: streams and snapshots written by an older Ferry still load and the
//! guest verifies clean; and every incompatible combination is refused before anything is
//! loaded, naming what is wrong, with the source running on (a section of a version this Ferry
//! cannot read, a CPU feature the destination lacks, a handshake with no common format).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use common::*;

/// These tests run guests: one at a time on the machine's two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Plays a source from before the handshake: sends `stream` as it stands and returns the
/// destination's answer frame (type, body).
fn send_as_old_source(sock: &Path, stream: &[u8], dst: &Proc) -> (UnixStream, u32, Vec<u8>) {
    let mut c = UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    // The destination may refuse (and close) before it has read everything.
    let _ = c.write_all(stream);
    let mut head = [0u8; 8];
    let fail = |e: std::io::Error| -> ! { panic!("no answer from the destination ({e}): {}", dst.stderr_text()) };
    c.read_exact(&mut head).unwrap_or_else(|e| fail(e));
    let t = u32::from_le_bytes(head[..4].try_into().unwrap());
    let len = u32::from_le_bytes(head[4..].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len];
    c.read_exact(&mut body).unwrap_or_else(|e| fail(e));
    (c, t, body)
}

/// How many seconds this host's TSC is behind the TSC saved in `stream`'s first VCPU_STATE
/// (negative: ahead), at this host's TSC rate.
///
/// On KVM-PVM a guest's ring-3 `rdtsc` reads the host's TSC: restoring IA32_TSC does not reach
/// it (../shared/baseline/QEMU-RESULTS.md). A fixture's guest, saved on another boot, keeps
/// deadlines in its saved TSC, and stays silent until this host's TSC passes them. The v2
/// fixture's was 977 s: on a machine up for less than about 16 minutes its guest waited, and the
/// test failed on every fresh CI machine.
fn host_tsc_behind_fixture_secs(stream: &[u8]) -> f64 {
    use ferry_vmm::persist::SectionState;
    let mut r = ferry_stream::StreamReader::new(stream).unwrap();
    let saved = loop {
        match r.next_record().unwrap() {
            ferry_stream::Record::VcpuState { version, data, .. } => {
                let st = ferry_vmm::vcpu_state::VcpuState::decode(version, data).unwrap();
                break st.msrs.iter().find(|m| m.0 == 0x10).expect("the fixture saved no IA32_TSC").1;
            }
            ferry_stream::Record::End => panic!("the fixture has no VCPU_STATE"),
            _ => {}
        }
    };
    let khz = ferry_vmm::cpu::new_guest_model(&kvm_ioctls::Kvm::new().unwrap()).unwrap().tsc_khz;
    // SAFETY: rdtsc reads the time-stamp counter; it touches no memory.
    let now = unsafe { std::arch::x86_64::_rdtsc() };
    (saved as f64 - now as f64) / (khz as f64 * 1000.0)
}

/// Waits for a restored fixture's guest to run: it verifies clean (below) once this host's TSC
/// has passed the fixture's. Until then (a host up for less time than the fixture's was) its
/// guest cannot run here: that is said loudly, with what was checked instead (the stream
/// loaded, the guest is running and its process lives).
fn assert_fixture_guest_verifies_clean(p: &mut Proc, what: &str, behind_secs: f64, api_sock: Option<&Path>) {
    // A guest a little behind catches up while we wait.
    if behind_secs < 30.0 {
        std::thread::sleep(Duration::from_secs_f64(behind_secs.max(0.0)));
        return assert_guest_verifies_clean(p, what);
    }
    eprintln!(
        "PARTLY SKIPPED ({what}): this host's TSC is {behind_secs:.0} s behind the fixture's saved guest TSC; on \
         KVM-PVM the guest's ring-3 rdtsc is the host's TSC, so its workload waits that long before it runs. \
         Checked: the stream loaded and the guest is running; its verifier runs once the host has been up longer."
    );
    if let Some(sock) = api_sock {
        assert!(wait_socket(sock, Duration::from_secs(10)), "{what}: no API socket");
        assert_eq!(api(sock, r#"{"cmd":"status"}"#)["state"], "running", "{what}: {}", p.stderr_text());
    }
    assert!(p.wait_exit(Duration::from_secs(3)).is_none(), "{what}: the destination exited: {}", p.stderr_text());
    assert!(p.lines_with("VERIFY-FAIL").is_empty() && p.lines_with("GUEST-ERROR").is_empty(), "{}", p.tail(4));
}

/// The built-in guest running with a report every 200 ms has verified more pages after the
/// move and counted no error.
fn assert_guest_verifies_clean(p: &mut Proc, what: &str) {
    assert!(p.wait_reports(4, Duration::from_secs(60)), "{what}: no reports: {} {}", p.tail(4), p.stderr_text());
    let r = p.reports();
    let (first, last) = (&r[0], r.last().unwrap());
    assert!(r.iter().all(|x| x.errors == 0), "{what}: {}", last.line);
    assert!(p.lines_with("VERIFY-FAIL").is_empty(), "{what}: {:?}", p.lines_with("VERIFY-FAIL"));
    assert!(last.verified > first.verified, "{what}: the guest stopped verifying: {}", last.line);
    assert!(last.t_ms > first.t_ms, "{what}: the guest's clock stood still: {}", last.line);
}

#[test]
fn a_format_1_migration_stream_from_an_older_ferry_still_loads_and_its_guest_verifies_clean() {
    if !kvm_available("a_format_1_migration_stream_from_an_older_ferry_still_loads_and_its_guest_verifies_clean") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmpdir("v1stream");
    let sock = dir.join("in.sock");
    let dst_api = dir.join("api.sock");
    let mut dst = Proc::spawn(&[
        "run",
        "--incoming",
        &format!("unix:{}", sock.display()),
        "--api-socket",
        dst_api.to_str().unwrap(),
    ]);
    assert!(wait_listening(&sock), "the destination socket never appeared");
    let stream = std::fs::read(fixture("v1-migration-stream.bin")).unwrap();

    let (mut c, t, body) = send_as_old_source(&sock, &stream, &dst);
    assert_eq!(t, 1, "the destination refused: {}", String::from_utf8_lossy(&body));
    c.write_all(b"FERRYCMT").unwrap();

    let behind = host_tsc_behind_fixture_secs(&stream);
    assert_fixture_guest_verifies_clean(&mut dst, "format 1 stream", behind, Some(&dst_api));
}

/// The records of `stream` (after its 32-byte header): (type, offset of the record, its length
/// with padding and trailer).
fn records(stream: &[u8]) -> Vec<(u32, usize, usize)> {
    let mut v = Vec::new();
    let mut o = 32;
    while o < stream.len() {
        let t = u32::from_le_bytes(stream[o..o + 4].try_into().unwrap());
        let len = u32::from_le_bytes(stream[o + 4..o + 8].try_into().unwrap()) as usize;
        let total = 8 + len + (8 - len % 8) % 8 + 8;
        v.push((t, o, total));
        o += total;
    }
    v
}

/// `stream` with its CPU_MODEL record replaced by the model this host gives a new guest.
/// The fixture's own model is this project's development host's: a CI machine with another CPU
/// or TSC rate rightly refuses it (`a_destination_lacking_a_cpu_feature…` tests that refusal).
fn with_this_hosts_cpu_model(stream: &[u8]) -> Vec<u8> {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let model = ferry_vmm::cpu::new_guest_model(&kvm).unwrap();
    let header = ferry_stream::StreamHeader::new(ferry_stream::StreamFlags::empty());
    let mut w = ferry_stream::StreamWriter::new(Vec::new(), &header).unwrap();
    w.cpu_model(&model).unwrap();
    let record = w.into_inner()[32..].to_vec();
    let (_, at, len) = *records(stream)
        .iter()
        .find(|r| r.0 == ferry_stream::rtype::CPU_MODEL)
        .expect("a format 2 stream has a CPU_MODEL record");
    [&stream[..at], &record[..], &stream[at + len..]].concat()
}

#[test]
fn a_format_2_migration_stream_with_a_version_2_vcpu_section_loads_and_its_guest_verifies_clean() {
    if !kvm_available("a_format_2_migration_stream_with_a_version_2_vcpu_section_loads_and_its_guest_verifies_clean") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fixture_bytes = std::fs::read(fixture("v2-migration-stream.bin")).unwrap();
    let summary = ferry_stream::inspect(fixture_bytes.as_slice(), &mut std::io::sink()).unwrap();
    assert!(summary.ended, "the fixture does not read as a complete stream");
    let dir = tmpdir("v2stream");
    let sock = dir.join("in.sock");
    let dst_api = dir.join("api.sock");
    let mut dst = Proc::spawn(&[
        "run",
        "--incoming",
        &format!("unix:{}", sock.display()),
        "--api-socket",
        dst_api.to_str().unwrap(),
    ]);
    assert!(wait_listening(&sock), "the destination socket never appeared");

    let (mut c, t, body) = send_as_old_source(&sock, &with_this_hosts_cpu_model(&fixture_bytes), &dst);
    assert_eq!(t, 1, "the destination refused: {}", String::from_utf8_lossy(&body));
    c.write_all(b"FERRYCMT").unwrap();

    let behind = host_tsc_behind_fixture_secs(&fixture_bytes);
    assert_fixture_guest_verifies_clean(&mut dst, "format 2 stream", behind, Some(&dst_api));
}

#[test]
fn a_format_1_snapshot_from_an_older_ferry_still_restores_and_its_guest_verifies_clean() {
    if !kvm_available("a_format_1_snapshot_from_an_older_ferry_still_restores_and_its_guest_verifies_clean") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let path = fixture("v1-snapshot.ferry");
    let api_sock = tmpdir("v1snap").join("api.sock");

    let mut vm = Proc::spawn(&["run", "--restore", path.to_str().unwrap(), "--api-socket", api_sock.to_str().unwrap()]);

    let behind = host_tsc_behind_fixture_secs(&std::fs::read(&path).unwrap());
    assert_fixture_guest_verifies_clean(&mut vm, "format 1 snapshot", behind, Some(&api_sock));
}

/// The format 1 fixture with its VCPU_STATE section's version set to `version` (the record's
/// checksum made right again, so only the version is wrong).
fn stream_with_vcpu_section_version(version: u32) -> Vec<u8> {
    let mut s = std::fs::read(fixture("v1-migration-stream.bin")).unwrap();
    let mut o = 32;
    loop {
        let t = u32::from_le_bytes(s[o..o + 4].try_into().unwrap());
        let len = u32::from_le_bytes(s[o + 4..o + 8].try_into().unwrap()) as usize;
        let body = o + 8;
        let crc_at = body + len + (8 - len % 8) % 8;
        if t == ferry_stream::rtype::VCPU_STATE {
            s[body + 4..body + 8].copy_from_slice(&version.to_le_bytes());
            let mut c = crc32c::crc32c(&s[o..o + 8]);
            c = crc32c::crc32c_append(c, &s[body..body + len]);
            s[crc_at..crc_at + 4].copy_from_slice(&c.to_le_bytes());
            return s;
        }
        assert_ne!(t, ferry_stream::rtype::END, "the fixture has no VCPU_STATE");
        o = crc_at + 8;
    }
}

#[test]
fn a_state_section_of_an_unknown_version_is_refused_naming_the_section_and_the_versions_read() {
    if !kvm_available("a_state_section_of_an_unknown_version_is_refused_naming_the_section_and_the_versions_read") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmpdir("sectionversion");
    let sock = dir.join("in.sock");
    let mut dst = Proc::spawn(&["run", "--incoming", &format!("unix:{}", sock.display())]);
    assert!(wait_listening(&sock), "the destination socket never appeared");

    let (_c, t, body) = send_as_old_source(&sock, &stream_with_vcpu_section_version(9), &dst);

    let msg = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(t, 2, "the destination accepted a section it cannot read");
    assert!(
        msg.contains(
            "vCPU 0 state is section 'vcpu' version 9, which this Ferry cannot read (it reads versions 2 and 1)"
        ),
        "{msg}"
    );
    assert_ne!(dst.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(dst.reports().is_empty(), "the destination ran a guest");
}

struct Source {
    vm: Proc,
    api: PathBuf,
    dir: PathBuf,
}

fn source(name: &str) -> Source {
    let dir = tmpdir(name);
    let api = dir.join("api.sock");
    let vm = Proc::spawn(&[
        "run",
        "--memory",
        "256M",
        "--cmdline",
        "mib=32 rate=20 report_ms=300",
        "--api-socket",
        api.to_str().unwrap(),
    ]);
    let mut s = Source { vm, api, dir };
    assert!(s.vm.wait_reports(2, Duration::from_secs(60)), "source never reported: {}", s.vm.stderr_text());
    assert!(wait_socket(&s.api, Duration::from_secs(5)));
    s
}

fn migrate(api: &Path, uri: &str) -> (i32, String) {
    let out = Command::new(FERRY)
        .args(["migrate", "--api-socket", api.to_str().unwrap(), "--to", uri, "--stall-timeout-ms", "5000"])
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The source guest keeps running clean after a refused migration.
fn assert_source_runs_on(src: &mut Source) {
    let n = src.vm.reports().len();
    assert!(src.vm.wait_reports(n + 3, Duration::from_secs(20)), "source stopped: {}", src.vm.tail(3));
    assert!(src.vm.reports().iter().all(|r| r.errors == 0), "{}", src.vm.tail(2));
    assert_eq!(api(&src.api, r#"{"cmd":"status"}"#)["state"], "running");
}

#[test]
fn a_destination_lacking_a_cpu_feature_refuses_before_loading_and_the_source_runs_on() {
    if !kvm_available("a_destination_lacking_a_cpu_feature_refuses_before_loading_and_the_source_runs_on") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut src = source("cpumask");
    let sock = src.dir.join("masked.sock");
    // A host like this one but without the FPU bit (leaf 1 EDX bit 0), which every guest has.
    let uri = format!("unix:{}", sock.display());
    let mut dst = Proc::spawn(&["run", "--incoming", &uri, "--debug-mask-cpuid", "1.edx.0"]);
    assert!(wait_listening(&sock), "the destination socket never appeared");

    let (code, err) = migrate(&src.api, &uri);

    assert_ne!(code, 0, "the migration went through");
    assert!(
        err.contains("this host cannot run the guest's CPU: it lacks FPU (CPUID leaf 0x1 subleaf 0 EDX bit 0)"),
        "{err}"
    );
    assert_ne!(dst.wait_exit(Duration::from_secs(20)), Some(0));
    let dst_err = dst.stderr_text();
    assert!(dst_err.contains("nothing was started") && dst_err.contains("lacks FPU"), "{dst_err}");
    assert!(dst.reports().is_empty(), "the destination ran a guest");
    assert_source_runs_on(&mut src);

    // The same guest moves to a destination that has the feature.
    let sock2 = src.dir.join("full.sock");
    let uri2 = format!("unix:{}", sock2.display());
    let mut dst2 = Proc::spawn(&["run", "--incoming", &uri2]);
    assert!(wait_listening(&sock2), "the destination socket never appeared");
    let (code, err) = migrate(&src.api, &uri2);
    assert_eq!(code, 0, "{err}");
    assert!(dst2.wait_reports(3, Duration::from_secs(30)), "{}", dst2.stderr_text());
    assert!(dst2.reports().iter().all(|r| r.errors == 0), "{}", dst2.tail(2));
}

#[test]
fn a_destination_reading_only_other_formats_fails_the_handshake_before_any_page_and_the_source_runs_on() {
    if !kvm_available(
        "a_destination_reading_only_other_formats_fails_the_handshake_before_any_page_and_the_source_runs_on",
    ) {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut src = source("handshake");
    let sock = src.dir.join("future.sock");
    let l = UnixListener::bind(&sock).unwrap();
    // A future destination that reads stream formats 7 to 9 only.
    let fake = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut hello = [0u8; 32];
        c.read_exact(&mut hello).unwrap();
        let mut reply = hello;
        reply[8..12].copy_from_slice(&7u32.to_le_bytes());
        reply[12..16].copy_from_slice(&9u32.to_le_bytes());
        c.write_all(&reply).unwrap();
        // Everything the source sends after our answer (it must close without a stream).
        let mut rest = Vec::new();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = c.read_to_end(&mut rest);
        (hello, rest.len())
    });

    let (code, err) = migrate(&src.api, &format!("unix:{}", sock.display()));

    let (hello, after) = fake.join().unwrap();
    assert_eq!(&hello[..8], b"FERRYHLO");
    assert_ne!(code, 0);
    assert!(
        err.contains("the source writes format versions 3 to 3, the destination reads 7 to 9"),
        "the error does not name both sides' versions: {err}"
    );
    assert_eq!(after, 0, "the source sent {after} bytes after a failed handshake");
    assert_source_runs_on(&mut src);
}

#[test]
fn a_source_writing_a_section_version_the_destination_cannot_read_is_refused_and_runs_on() {
    if !kvm_available("a_source_writing_a_section_version_the_destination_cannot_read_is_refused_and_runs_on") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut src = source("sectionproxy");
    let sock = src.dir.join("dst.sock");
    let mut dst = Proc::spawn(&["run", "--incoming", &format!("unix:{}", sock.display())]);
    assert!(wait_listening(&sock), "the destination socket never appeared");
    // A source from the future: its vCPU sections are version 7.
    let fault = common::proxy::Fault::SetSectionVersion { record: ferry_stream::rtype::VCPU_STATE, version: 7 };
    let proxy = common::proxy::Proxy::start(src.dir.join("proxy.sock"), sock, fault);

    let (code, err) = migrate(&src.api, &proxy.uri);

    assert_ne!(code, 0, "the migration went through");
    assert!(
        err.contains(
            "vCPU 0 state is section 'vcpu' version 7, which this Ferry cannot read (it reads versions 2 and 1)"
        ),
        "{err}"
    );
    assert_ne!(dst.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(dst.reports().is_empty(), "the destination ran a guest");
    assert_source_runs_on(&mut src);
}

/// A live-update handover (RAM by reference to a descriptor) is never accepted from a migration
/// peer.
#[test]
fn a_handover_stream_sent_to_a_migration_destination_is_refused() {
    if !kvm_available("a_handover_stream_sent_to_a_migration_destination_is_refused") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmpdir("handover-peer");
    let sock = dir.join("in.sock");
    let mut dst = Proc::spawn(&["run", "--incoming", &format!("unix:{}", sock.display())]);
    assert!(wait_listening(&sock), "the destination socket never appeared");
    let h = ferry_stream::StreamHeader::new(ferry_stream::StreamFlags::HANDOVER);
    let mut w = ferry_stream::StreamWriter::new(Vec::new(), &h).unwrap();
    w.machine_config(&ferry_stream::MachineConfig { memory_bytes: 16 << 20, vcpus: 1, regions: vec![(0, 16 << 20)] })
        .unwrap();
    w.ram_reference(&ferry_stream::RamReference { region: 0, fd: 3, gpa: 0, size: 16 << 20, offset: 0 }).unwrap();
    w.end().unwrap();

    let (_c, t, body) = send_as_old_source(&sock, &w.into_inner(), &dst);

    let msg = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(t, 2, "the destination accepted a handover from a peer");
    assert!(msg.contains("handover stream is not valid in a migration stream"), "{msg}");
    assert_ne!(dst.wait_exit(Duration::from_secs(20)), Some(0));
}

#[test]
fn a_source_offering_a_format_the_destination_does_not_read_is_refused_naming_both() {
    if !kvm_available("a_source_offering_a_format_the_destination_does_not_read_is_refused_naming_both") {
        return;
    }
    let dir = tmpdir("oldhello");
    let sock = dir.join("in.sock");
    let mut dst = Proc::spawn(&["run", "--incoming", &format!("unix:{}", sock.display())]);
    assert!(wait_listening(&sock), "the destination socket never appeared");
    let mut hello = [0u8; 32];
    hello[..8].copy_from_slice(b"FERRYHLO");
    hello[8..12].copy_from_slice(&5u32.to_le_bytes());
    hello[12..16].copy_from_slice(&6u32.to_le_bytes());

    let (_c, t, body) = send_as_old_source(&sock, &hello, &dst);

    let msg = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(t, 2, "the destination answered a source it cannot read");
    assert!(msg.contains("the source writes format versions 5 to 6, the destination reads 1 to 3"), "{msg}");
    assert_ne!(dst.wait_exit(Duration::from_secs(20)), Some(0));
}

/// A destination from Ferry 0.1.0 whose HELLO lacks feature bit `bit` (it answers with the
/// source's own HELLO, that bit cleared): `ferry migrate` with `args` must fail naming `want`,
/// send no byte after the handshake, and leave the source running.
fn refused_by_an_older_destination(name: &str, bit: u32, args: &[&str], want: &str) {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut src = source(name);
    let sock = src.dir.join("old.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let fake = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut hello = [0u8; 32];
        c.read_exact(&mut hello).unwrap();
        let mut reply = hello;
        reply[16..24]
            .copy_from_slice(&(u64::from_le_bytes(hello[16..24].try_into().unwrap()) & !(1 << bit)).to_le_bytes());
        reply[24..30].copy_from_slice(&[0, 0, 1, 0, 0, 0]);
        c.write_all(&reply).unwrap();
        let mut rest = Vec::new();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _ = c.read_to_end(&mut rest);
        (hello, rest.len())
    });

    let out = Command::new(FERRY)
        .args(["migrate", "--api-socket", src.api.to_str().unwrap(), "--to"])
        .arg(format!("unix:{}", sock.display()))
        .args(args)
        .output()
        .unwrap();

    let (hello, after) = fake.join().unwrap();
    let offered = u64::from_le_bytes(hello[16..24].try_into().unwrap());
    assert_ne!(offered & (1 << bit), 0, "this Ferry's HELLO does not offer feature bit {bit}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(err.contains(want), "{err}");
    assert_eq!(after, 0, "the source sent {after} bytes after the handshake");
    assert_source_runs_on(&mut src);
}

/// A destination that does not read compressed pages (a Ferry from before them: its HELLO
/// lacks ZSTD_PAGES, bit 5) is refused by a source asked to `--compress`, before any byte of
/// the stream, naming the destination's version; the source runs on.
#[test]
fn a_compressed_migration_to_a_destination_that_cannot_read_it_is_refused_before_any_page() {
    if !kvm_available("a_compressed_migration_to_a_destination_that_cannot_read_it_is_refused_before_any_page") {
        return;
    }
    let want = "the destination (Ferry 0.1.0) does not read zstd-compressed pages";
    refused_by_an_older_destination("no-zstd", 5, &["--compress", "zstd"], want);
}

/// A destination that takes no page channels (its HELLO lacks CHANNELS, bit 6) is refused by a
/// source asked for `--channels`, before any byte of the stream; the source runs on.
#[test]
fn a_migration_over_channels_to_a_destination_without_them_is_refused_before_any_page() {
    if !kvm_available("a_migration_over_channels_to_a_destination_without_them_is_refused_before_any_page") {
        return;
    }
    let want = "the destination (Ferry 0.1.0) does not take page channels";
    refused_by_an_older_destination("no-channels", 6, &["--channels", "2"], want);
}
