//! Security (issue 23, docs/security.md) on real KVM. Mutual TLS for TCP migration and
//! replication, with certificates made by the openssl tool: a migration with TLS on both sides;
//! every refusal with its reason, before a byte of the stream is read, the source running on
//! clean; a man in the middle presenting another CA's certificate refused. The API socket's
//! mode.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

static SERIAL: Mutex<()> = Mutex::new(());

const WORKLOAD: &str = "mib=32 rate=10 hb_us=2000 report_ms=200";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("the openssl tool");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Certificates in a directory: CAs `ca` and `evil`, and leaves made on demand.
struct Pki(PathBuf);

const EC: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"];

impl Pki {
    fn new(name: &str) -> Pki {
        let p = Pki(tmpdir(name));
        for ca in ["ca", "evil"] {
            let (subj, key, crt) = (format!("/CN={ca}"), format!("{ca}.key"), format!("{ca}.crt"));
            let mut a = vec!["req", "-x509"];
            a.extend_from_slice(&EC);
            a.extend_from_slice(&["-nodes", "-days", "2", "-subj", &subj, "-keyout", &key, "-out", &crt]);
            openssl(&p.0, &a);
        }
        p
    }

    /// A leaf `name` signed by `ca`, valid for DNS:name and IP 127.0.0.1, for `days` (0: it
    /// expires the second it is made).
    fn leaf(&self, name: &str, ca: &str, days: u32) {
        let (subj, key, csr, crt) =
            (format!("/CN={name}"), format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"));
        let mut a = vec!["req"];
        a.extend_from_slice(&EC);
        a.extend_from_slice(&["-nodes", "-subj", &subj, "-keyout", &key, "-out", &csr]);
        openssl(&self.0, &a);
        std::fs::write(self.0.join(format!("{name}.ext")), format!("subjectAltName=DNS:{name},IP:127.0.0.1\n"))
            .unwrap();
        let (cacrt, cakey, ext, days) =
            (format!("{ca}.crt"), format!("{ca}.key"), format!("{name}.ext"), days.to_string());
        openssl(
            &self.0,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &cacrt,
                "-CAkey",
                &cakey,
                "-CAcreateserial",
                "-days",
                &days,
                "-extfile",
                &ext,
                "-out",
                &crt,
            ],
        );
    }

    fn p(&self, f: &str) -> String {
        self.0.join(f).display().to_string()
    }

    /// `--tls-cert/--tls-key/--tls-ca` for leaf `name`, trusting `ca`.
    fn args(&self, name: &str, ca: &str) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.p(&format!("{name}.crt")),
            "--tls-key".into(),
            self.p(&format!("{name}.key")),
            "--tls-ca".into(),
            self.p(&format!("{ca}.crt")),
        ]
    }
}

fn port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn source(dir: &Path, name: &str) -> (Proc, PathBuf) {
    let api = dir.join(format!("{name}.sock"));
    let mut p = Proc::spawn(&["run", "--memory", "128M", "--cmdline", WORKLOAD, "--api-socket", api.to_str().unwrap()]);
    assert!(p.wait_reports(2, Duration::from_secs(40)), "{}", p.stderr_text());
    assert!(wait_socket(&api, Duration::from_secs(5)));
    (p, api)
}

fn destination(uri: &str, extra: &[String]) -> Proc {
    let mut a = vec!["run".to_string(), "--incoming".into(), uri.into()];
    a.extend_from_slice(extra);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let d = Proc::spawn(&a);
    assert!(d.wait_stderr("waiting for an incoming migration", Duration::from_secs(10)), "{}", d.stderr_text());
    d
}

fn migrate(api: &Path, uri: &str, extra: &[String]) -> (bool, String) {
    let mut a =
        vec!["migrate".to_string(), "--api-socket".into(), api.display().to_string(), "--to".into(), uri.into()];
    a.extend_from_slice(extra);
    let out = Command::new(FERRY).args(&a).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn assert_runs_clean(p: &mut Proc) {
    let n = p.reports().len();
    assert!(p.wait_reports(n + 3, Duration::from_secs(20)), "stopped: {} {}", p.tail(3), p.stderr_text());
    assert!(p.reports().iter().all(|r| r.errors == 0), "{}", p.tail(3));
}

/// One destination, refusing every bad source by name and still waiting, then taking the good
/// one: another CA, an expired certificate, no TLS at all, a name not on its allow-list; then a
/// source with a certificate for an allowed name migrates, errors=0.
#[test]
fn a_tls_destination_refuses_each_bad_source_by_name_and_takes_the_authenticated_one() {
    if !kvm_available("a_tls_destination_refuses_each_bad_source_by_name_and_takes_the_authenticated_one") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let pki = Pki::new("tls-refusals");
    pki.leaf("dst", "ca", 2);
    pki.leaf("src", "ca", 2);
    pki.leaf("other", "ca", 2);
    pki.leaf("intruder", "evil", 2);
    pki.leaf("old", "ca", 0);
    std::thread::sleep(Duration::from_millis(1100)); // "old" has expired now
    let uri = format!("tcp:127.0.0.1:{}", port());
    let mut dargs = pki.args("dst", "ca");
    dargs.extend(["--tls-allow-peer".into(), "src".into()]);
    let mut dst = destination(&uri, &dargs);
    let (mut src, api) = source(&pki.0, "src");

    let cases: Vec<(Vec<String>, &str, &str)> = vec![
        (pki.args("intruder", "ca"), "refused this Ferry's certificate", "unknown CA"),
        (pki.args("old", "ca"), "refused this Ferry's certificate (expired)", "expired"),
        (vec!["--insecure".into()], "", "does not speak TLS"),
        (pki.args("other", "ca"), "", "not allowed"),
    ];
    for (i, (args, src_says, dst_says)) in cases.into_iter().enumerate() {
        let refused = i + 1;
        let (ok, err) = migrate(&api, &uri, &args);
        assert!(!ok, "{args:?} migrated into a TLS destination");
        assert!(err.contains(src_says), "{args:?}: the source says: {err}");
        assert!(
            wait_until(Duration::from_secs(5), || dst.stderr_text().matches("refused a connection").count() == refused),
            "{args:?}: {}",
            dst.stderr_text()
        );
        let said = dst.stderr_text().lines().rfind(|l| l.contains("refused a connection")).unwrap().to_string();
        assert!(said.contains(dst_says), "{args:?}: the destination says: {said}");
        assert!(dst.heartbeats().is_empty(), "the destination ran a guest");
        assert_runs_clean(&mut src);
    }

    let (ok, err) = migrate(&api, &uri, &pki.args("src", "ca"));

    assert!(ok, "{err}\n{}", dst.stderr_text());
    assert!(src.wait_exit(Duration::from_secs(10)).is_some());
    assert_runs_clean(&mut dst);
    let _ = std::fs::remove_dir_all(&pki.0);
}

/// A man in the middle: something at the destination's address answers TLS with a certificate
/// of another CA (openssl s_server). The source refuses it before a byte of the guest is sent.
#[test]
fn a_man_in_the_middle_with_another_certificate_is_refused_by_the_source() {
    if !kvm_available("a_man_in_the_middle_with_another_certificate_is_refused_by_the_source") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let pki = Pki::new("tls-mitm");
    pki.leaf("src", "ca", 2);
    pki.leaf("mitm", "evil", 2);
    let port = port();
    let mut mitm = Command::new("openssl")
        .current_dir(&pki.0)
        .args(["s_server", "-quiet", "-accept", &port.to_string(), "-cert", "mitm.crt", "-key", "mitm.key"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()));
    let (mut src, api) = source(&pki.0, "src");

    let (ok, err) = migrate(&api, &format!("tcp:127.0.0.1:{port}"), &pki.args("src", "ca"));

    let _ = mitm.kill();
    let _ = mitm.wait();
    let got = {
        use std::io::Read;
        let mut b = Vec::new();
        let _ = mitm.stdout.take().unwrap().read_to_end(&mut b);
        b
    };
    assert!(!ok);
    assert!(err.contains("not signed by the CA given with --tls-ca (unknown CA)"), "{err}");
    assert!(got.is_empty(), "the man in the middle got {} bytes of plaintext", got.len());
    assert_runs_clean(&mut src);
    let _ = std::fs::remove_dir_all(&pki.0);
}

/// Replication over TCP with mutual TLS: protected, then the primary dies and the backup takes
/// over, clean.
#[test]
fn replication_runs_over_mutual_tls_and_the_backup_takes_over() {
    if !kvm_available("replication_runs_over_mutual_tls_and_the_backup_takes_over") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let pki = Pki::new("tls-ha");
    pki.leaf("primary", "ca", 2);
    pki.leaf("backup", "ca", 2);
    let uri = format!("tcp:127.0.0.1:{}", port());
    let mut bargs = vec!["run".to_string(), "--incoming".into(), uri.clone(), "--standby".into()];
    bargs.extend(pki.args("backup", "ca"));
    let b: Vec<&str> = bargs.iter().map(String::as_str).collect();
    let mut backup = Proc::spawn(&b);
    assert!(
        backup.wait_stderr("standby: waiting for the primary", Duration::from_secs(10)),
        "{}",
        backup.stderr_text()
    );
    assert!(backup.stderr_text().contains("(mutual TLS)"));
    let (mut prim, api) = source(&pki.0, "primary");
    let mut r = vec!["replicate".to_string(), "--api-socket".into(), api.display().to_string(), "--to".into(), uri];
    r.extend(pki.args("primary", "ca"));
    let out = Command::new(FERRY).args(&r).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_runs_clean(&mut prim);

    prim.kill();

    assert!(backup.wait_stderr("the guest resumes here", Duration::from_secs(5)), "{}", backup.stderr_text());
    assert_runs_clean(&mut backup);
    let _ = std::fs::remove_dir_all(&pki.0);
}

/// The API socket is its owner's alone (0600) unless `--api-socket-mode` says otherwise.
#[test]
fn the_api_socket_is_created_0600_or_with_the_mode_asked_for() {
    if !kvm_available("the_api_socket_is_created_0600_or_with_the_mode_asked_for") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tmpdir("api-mode");
    for (mode, want) in [(None, 0o600), (Some("660"), 0o660)] {
        let api = dir.join(format!("{want:o}.sock"));
        let mut a = vec![
            "run",
            "--memory",
            "64M",
            "--cmdline",
            "mib=8 rate=1 report_ms=500",
            "--api-socket",
            api.to_str().unwrap(),
        ];
        if let Some(m) = mode {
            a.extend_from_slice(&["--api-socket-mode", m]);
        }
        let mut p = Proc::spawn(&a);
        assert!(wait_socket(&api, Duration::from_secs(20)), "{}", p.stderr_text());
        let got = std::fs::metadata(&api).unwrap().permissions().mode() & 0o777;
        assert_eq!(got, want, "API socket mode {got:o}");
        p.kill();
    }
    let bad = Command::new(FERRY).args(["run", "--api-socket-mode", "999"]).output().unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not a file mode"));
    let _ = std::fs::remove_dir_all(&dir);
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().count()
}

/// What a local client can make the API hold is bounded: a 300 MiB request line is refused
/// after 4 MiB (memory grows by less than 16 MiB), and 200 idle connections take at most 32
/// threads (the rest are told why and closed). The API answers throughout.
#[test]
fn the_api_bounds_request_size_and_connections() {
    if !kvm_available("the_api_bounds_request_size_and_connections") {
        return;
    }
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tmpdir("api-bounds");
    let api = dir.join("api.sock");
    let mut p = Proc::spawn(&[
        "run",
        "--memory",
        "64M",
        "--cmdline",
        "mib=8 rate=1 report_ms=500",
        "--api-socket",
        api.to_str().unwrap(),
    ]);
    assert!(wait_socket(&api, Duration::from_secs(20)), "{}", p.stderr_text());
    // The guest's fill touches its RAM, which counts in Ferry's RSS: done before the baseline.
    assert!(p.wait_lanes_verifying(Duration::from_secs(40)), "{}", p.tail(3));
    let pid = p.child.id();
    let rss0 = rss_kib(pid);

    let mut c = UnixStream::connect(&api).unwrap();
    let chunk = vec![b'x'; 1 << 20];
    let mut sent = 0;
    while sent < 300 && c.write_all(&chunk).is_ok() {
        sent += 1;
    }
    let mut reply = String::new();
    let _ = BufReader::new(&c).read_line(&mut reply);
    assert!(sent < 300, "the API took a 300 MiB request line");
    assert!(reply.contains("request line of more than 4 MiB"), "{reply}");
    let grown = rss_kib(pid).saturating_sub(rss0);
    assert!(grown < 16 << 10, "RSS grew by {grown} KiB");
    drop(c);

    let t0 = threads(pid);
    let conns: Vec<UnixStream> = (0..200).map(|_| UnixStream::connect(&api).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let t1 = threads(pid);
    assert!(t1 <= t0 + 32, "200 idle connections made {} threads", t1 - t0);
    let mut told = String::new();
    let _ = BufReader::new(&conns[199]).read_line(&mut told);
    assert!(told.contains("API connections are open already"), "{told}");
    drop(conns);
    assert!(
        wait_until(Duration::from_secs(5), || common::api(&api, r#"{"cmd":"status"}"#)["ok"] == true),
        "the API stopped answering"
    );
    p.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A destination fed garbage by whoever reaches it stays bounded: 1 GiB of random bytes is
/// refused at the first 8; a record header claiming 64 MiB (a page batch of "2^63" pages) costs
/// at most that record's buffer before it is refused; a million tiny records leave its memory
/// flat.
#[test]
fn a_hostile_stream_is_refused_or_stays_within_its_memory_bound() {
    if !kvm_available("a_hostile_stream_is_refused_or_stays_within_its_memory_bound") {
        return;
    }
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tmpdir("hostile");
    let sock = dir.join("in.sock");
    let uri = format!("unix:{}", sock.display());
    let hello = |c: &mut UnixStream| {
        let mut h = [0u8; 32];
        h[..8].copy_from_slice(b"FERRYHLO");
        h[8..12].copy_from_slice(&1u32.to_le_bytes());
        h[12..16].copy_from_slice(&ferry_stream::FORMAT_VERSION.to_le_bytes());
        c.write_all(&h).unwrap();
        let mut theirs = [0u8; 32];
        c.read_exact(&mut theirs).unwrap();
        c.write_all(&ferry_stream::StreamHeader::new(ferry_stream::StreamFlags::empty()).encode_for_tests()).unwrap();
    };

    // Random bytes: refused at once, whatever follows.
    let mut d = destination(&uri, &[]);
    let mut c = UnixStream::connect(&sock).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut sent = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while sent < 1 << 30 {
        for b in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        if c.write_all(&buf).is_err() {
            break;
        }
        sent += buf.len() as u64;
    }
    assert!(sent < 1 << 30, "the destination read 1 GiB of random bytes");
    assert!(d.wait_exit(Duration::from_secs(10)).is_some_and(|c| c != 0));
    assert!(d.stderr_text().contains("not a Ferry stream"), "{}", d.stderr_text());

    // A page batch of 64 MiB claiming 2^63 pages.
    let mut d = destination(&uri, &[]);
    let pid = d.child.id();
    let rss0 = rss_kib(pid);
    let mut c = UnixStream::connect(&sock).unwrap();
    hello(&mut c);
    let len = 64u32 << 20;
    c.write_all(&[&2u32.to_le_bytes()[..], &len.to_le_bytes()].concat()).unwrap();
    let mut body = vec![0u8; len as usize + 8];
    body[..8].copy_from_slice(&(1u64 << 63).to_le_bytes());
    c.write_all(&body[..body.len() - 1]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let grown = rss_kib(pid).saturating_sub(rss0);
    assert!(grown < (64 + 16) << 10, "a 64 MiB record grew the destination by {grown} KiB");
    let _ = c.write_all(&body[body.len() - 1..]);
    assert!(d.wait_exit(Duration::from_secs(10)).is_some_and(|c| c != 0));
    assert!(
        d.stderr_text().contains("checksum mismatch") || d.stderr_text().contains("pages (1 to 1024"),
        "{}",
        d.stderr_text()
    );

    // A million tiny records (HEARTBEAT, optional and empty): memory stays flat.
    let mut d = destination(&uri, &[]);
    let pid = d.child.id();
    let mut c = UnixStream::connect(&sock).unwrap();
    hello(&mut c);
    let mut w = ferry_stream::StreamWriter::new(
        Vec::new(),
        &ferry_stream::StreamHeader::new(ferry_stream::StreamFlags::empty()),
    )
    .unwrap();
    for _ in 0..4096 {
        w.heartbeat().unwrap();
    }
    let block = w.into_inner()[ferry_stream::HEADER_LEN..].to_vec();
    let mut rss = Vec::new();
    for i in 0..256 {
        c.write_all(&block).unwrap();
        if i % 64 == 63 {
            std::thread::sleep(Duration::from_millis(100));
            rss.push(rss_kib(pid));
        }
    }
    let spread = rss.iter().max().unwrap() - rss.iter().min().unwrap();
    assert!(spread < 4 << 10, "RSS moved by {spread} KiB over a million tiny records: {rss:?}");
    drop(c);
    assert!(d.wait_exit(Duration::from_secs(10)).is_some_and(|c| c != 0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits for `p` to end; the signal that ended it, if one did.
fn ended_by_signal(p: &mut Proc, timeout: Duration) -> Option<Option<i32>> {
    use std::os::unix::process::ExitStatusExt;
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if let Ok(Some(s)) = p.child.try_wait() {
            return Some(s.signal());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The seccomp filters (docs/security.md): every thread runs under the process-wide filter,
/// the vCPU and disk threads under one of their own as well, and a call outside a thread's
/// filter kills Ferry (SIGSYS) by default, or is let through and logged with `--seccomp log`.
/// The rest of the suite runs with the filters on (the default).
#[test]
fn each_thread_kind_runs_under_its_seccomp_filter_and_a_call_outside_it_kills_ferry() {
    if !kvm_available("each_thread_kind_runs_under_its_seccomp_filter_and_a_call_outside_it_kills_ferry") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tmpdir("seccomp");
    let img = dir.join("d.img");
    std::fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
    let start = |name: &str, mode: &str| {
        let api = dir.join(format!("{name}.sock"));
        let mut vm = Proc::spawn(&[
            "run",
            "--memory",
            "128M",
            "--cmdline",
            "mib=8 rate=5 disk=1 disk_mib=4 report_ms=300",
            "--disk",
            img.to_str().unwrap(),
            "--api-socket",
            api.to_str().unwrap(),
            "--seccomp",
            mode,
        ]);
        assert!(vm.wait_reports(2, Duration::from_secs(60)), "{}", vm.stderr_text());
        assert!(wait_socket(&api, Duration::from_secs(5)));
        (vm, api)
    };
    let probe = |api: &std::path::Path, kind: &str| {
        Command::new(FERRY)
            .args(["debug", "seccomp-probe", "--api-socket", api.to_str().unwrap(), "--thread", kind])
            .output()
            .unwrap()
    };

    // Which filters each thread carries (the kernel counts them per thread).
    let (mut vm, _api) = start("count", "kill");
    let pid = vm.child.id();
    let mut filters = std::collections::BTreeMap::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim().to_string();
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let n = status.lines().find_map(|l| l.strip_prefix("Seccomp_filters:")).map(|v| v.trim().to_string());
        filters.insert(comm, n.unwrap_or_default());
    }
    for (thread, want) in [("vcpu0", "2"), ("disk0", "2"), ("disk0-io0", "2"), ("api", "1"), ("serial-out", "1")] {
        assert_eq!(filters.get(thread).map(String::as_str), Some(want), "{thread}: {filters:?}");
    }
    vm.kill();

    // A forbidden call from each kind ends Ferry with SIGSYS; the guest's disk image is left
    // as it was (the lock goes with the process).
    for kind in ["vcpu", "device", "process"] {
        let (mut vm, api) = start(kind, "kill");
        let _ = probe(&api, kind);
        assert_eq!(
            ended_by_signal(&mut vm, Duration::from_secs(10)),
            Some(Some(libc::SIGSYS)),
            "{kind}: {}",
            vm.stderr_text()
        );
    }

    // With `log` the same calls go through (the kernel logs them) and the guest runs on.
    let (mut vm, api) = start("log", "log");
    for kind in ["vcpu", "device", "process"] {
        let out = probe(&api, kind);
        assert!(out.status.success(), "{kind}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["mode"], "log", "{v}");
    }
    let n = vm.reports().len();
    assert!(vm.wait_reports(n + 2, Duration::from_secs(10)), "the guest stopped: {}", vm.stderr_text());
    assert_eq!(vm.reports().last().unwrap().errors, 0);
}

/// This test process's uid (the sources it starts run as it).
fn own_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// An incoming UNIX listener restricted to one peer uid: a source running as another user is
/// refused by name (its uid and pid) before a byte of its stream is read, the destination waits
/// on and runs nothing, and the source's guest runs on clean; a destination that allows the
/// source's uid takes it, errors=0. The restriction on a tcp: address is refused up front.
#[test]
fn an_incoming_unix_listener_takes_only_the_allowed_peer_uid() {
    if !kvm_available("an_incoming_unix_listener_takes_only_the_allowed_peer_uid") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tmpdir("peer-uid");
    let uid = own_uid();
    let stranger = if uid == 4242 { 4343 } else { 4242 };
    let (mut src, api) = source(&dir, "src");

    let refusing = format!("unix:{}", dir.join("refusing.sock").display());
    let mut dst = destination(&refusing, &["--allow-peer-uid".into(), stranger.to_string()]);
    let (ok, err) = migrate(&api, &refusing, &[]);
    assert!(!ok, "a source of uid {uid} migrated into a destination that allows only uid {stranger}");
    assert!(
        wait_until(Duration::from_secs(5), || dst.stderr_text().contains("refused a connection")),
        "{}",
        dst.stderr_text()
    );
    let said = dst.stderr_text().lines().rfind(|l| l.contains("refused a connection")).unwrap().to_string();
    assert!(said.contains(&format!("runs as uid {uid}, not the allowed uid {stranger}")), "{said}");
    assert!(said.contains(&format!("(pid {})", src.child.id())), "the refusal names the source's process: {said}");
    assert!(dst.heartbeats().is_empty(), "the destination ran a guest");
    assert!(dst.child.try_wait().unwrap().is_none(), "the destination stopped waiting: {}", dst.stderr_text());
    assert_runs_clean(&mut src);
    eprintln!("source says: {err}");

    let out =
        Command::new(FERRY).args(["run", "--incoming", "tcp:127.0.0.1:1", "--allow-peer-uid", "0"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-peer-uid applies to unix: addresses"));

    let allowing = format!("unix:{}", dir.join("allowing.sock").display());
    let mut dst2 = destination(&allowing, &["--allow-peer-uid".into(), uid.to_string()]);
    let (ok, err) = migrate(&api, &allowing, &[]);
    assert!(ok, "{err}\n{}", dst2.stderr_text());
    assert!(src.wait_exit(Duration::from_secs(10)).is_some());
    assert_runs_clean(&mut dst2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 21 item 5: a hostile guest (`hostile=1`, docs/guest.md) attacks its own virtio-blk
/// device round after round: a looping chain, buffers outside guest memory, a 4 GiB buffer,
/// every descriptor in one ring, a head and a next index beyond the table, a short header, an
/// avail index a thousand ahead, random register writes, and a 4000-byte console line. Ferry
/// stays up and bounded (RSS and threads flat over ten rounds), fails what the guest broke (the
/// request completed with an error, or the device set NEEDS_RESET, named in Ferry's log), the
/// device works again after each reset, the API answers, and nothing else is affected: the
/// guest's memory verifier stays clean and its heartbeats unbroken.
#[test]
fn a_hostile_guest_breaks_only_its_own_device_and_ferry_stays_up_and_bounded() {
    if !kvm_available("a_hostile_guest_breaks_only_its_own_device_and_ferry_stays_up_and_bounded") {
        return;
    }
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmpdir("hostile");
    let sock = dir.join("api.sock");
    let img = dir.join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
    let mut vm = Proc::spawn(&[
        "run",
        "--memory",
        "1G",
        "--disk",
        img.to_str().unwrap(),
        "--api-socket",
        sock.to_str().unwrap(),
        "--cmdline",
        "mib=32 rate=50 hb_us=1000 report_ms=200 hostile=1",
    ]);
    let pid = vm.child.id();
    let round = |vm: &mut Proc, n: u64| {
        assert!(
            vm.wait_line(&format!("HOSTILE round={n} "), Duration::from_secs(120)).is_some(),
            "no round {n}: {} | {}",
            vm.tail(4),
            vm.stderr_text()
        );
    };
    round(&mut vm, 2);
    let (rss0, threads0) = (rss_kib(pid), threads(pid));

    round(&mut vm, 12);

    assert!(vm.child.try_wait().unwrap().is_none(), "Ferry exited: {}", vm.stderr_text());
    let (rss1, threads1) = (rss_kib(pid), threads(pid));
    assert!(rss1 <= rss0 + 8 * 1024, "RSS grew from {rss0} to {rss1} KiB over ten rounds");
    assert!(threads1 <= threads0, "threads grew from {threads0} to {threads1}");
    let last = vm.lines_with("HOSTILE ").pop().unwrap();
    for key in ["sent", "completed", "needs_reset", "reinit", "mmio_writes"] {
        assert!(field(&last, key).unwrap_or(0) > 0, "no {key} in {last}");
    }
    // Every malformed chain was answered: completed (with an error) or NEEDS_RESET.
    assert_eq!(field(&last, "ignored"), Some(0), "the device ignored a malformed chain: {last}");
    // Every reset the driver asked for brought the device back: one per NEEDS_RESET, per
    // ignored chain and per round's register burst.
    let f = |k: &str| field(&last, k).unwrap_or(0);
    assert_eq!(f("reinit"), f("needs_reset") + f("ignored") + f("round"), "{last}");
    let err = vm.stderr_text();
    assert!(err.contains("device needs a reset"), "Ferry never said why it stopped the device: {err}");
    assert!(vm.lines_with("GUEST-").is_empty(), "{:?}", vm.lines_with("GUEST-"));
    for l in vm.lines_with("FLOOD ") {
        assert_eq!(l.len(), 4006, "a cut flood line");
    }
    assert_eq!(api(&sock, r#"{"cmd":"status"}"#)["state"], "running");
    let r = vm.reports();
    assert!(r.len() >= 5 && r.iter().all(|x| x.errors == 0), "{}", r.last().map_or("", |x| x.line.as_str()));
    assert!(vm.lines_with("VERIFY-FAIL").is_empty());
    let hb: Vec<u64> = vm.heartbeats().iter().map(|h| h.1).collect();
    assert!(hb.windows(2).all(|w| w[1] == w[0] + 1), "heartbeats out of sequence");
    let _ = api(&sock, r#"{"cmd":"quit"}"#);
}
