//! `ferry update`: replace the running Ferry under its guest, guest memory in place
//! (docs/live-update.md).
//!
//! The old process checks the new binary (it starts and reads this Ferry's handover format),
//! pauses the guest, quiesces the disks, writes the handover (the machine's state, RAM by
//! reference) into a memfd, and passes it on with the descriptors worth keeping: the guest RAM
//! memfd, the disk images (their locks belong to the open file descriptions, so they never let
//! go), the API listener, the requesting client's connection, and the old binary itself.
//! `exec` replaces the process image (same PID, stdout, serial); `process` starts the new binary
//! as a child and exits once it acknowledged. The new side rebuilds the machine from the
//! handover, resumes it and answers the client. If the new image fails to rebuild it, it hands
//! the same handover back to the old binary (exec mode), which takes the guest back.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::api::ApiContext;

/// How the new binary takes over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// exec in place: same PID.
    Exec,
    /// A new process; the old exits after the acknowledgement.
    Process,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Exec => "exec",
            Mode::Process => "process",
        }
    }
}

/// What the new image is told on its command line (`--handover`), all descriptor numbers valid in
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoverArgs {
    pub state: RawFd,
    pub ram: RawFd,
    pub api: Option<RawFd>,
    pub reply: Option<RawFd>,
    /// The old binary (exec mode), to hand the guest back to if this image cannot take it.
    pub old: Option<RawFd>,
    /// Process mode: where to acknowledge.
    pub ack: Option<RawFd>,
    /// The old process's command line (NUL-separated, in a memfd): what a hand-back runs again.
    pub argv: Option<RawFd>,
    pub disks: Vec<RawFd>,
    /// CLOCK_MONOTONIC ns when the old side paused the guest.
    pub t0_ns: u64,
    pub mode: Mode,
    /// This image is the old binary taking the guest back.
    pub back: bool,
    /// The guest was paused (API `pause`) before the update: it stays paused.
    pub paused: bool,
    /// The old KVM VM and vCPUs (exec mode), kept open across the exec so that their teardown
    /// happens after the new machine runs; closed then. The first is the old address space
    /// holder's pipe (closed last), where there is one.
    pub old_kvm: Vec<RawFd>,
    /// Exec mode with a parked guest, in the parked process: the control socket on which the
    /// image after the exec pulls the guest back (docs/live-update.md, "Exec mode").
    pub park: Option<RawFd>,
    /// Exec mode with a parked guest, in the image after the exec: the control socket to the
    /// parked process, to pull the guest from (the handover then comes over a socket sent on it).
    pub pull: Option<RawFd>,
    /// The parked process (this image's child, reaped once it has handed the guest on).
    pub parked_pid: Option<u32>,
    /// How long the guest paused when it was parked (ns).
    pub park_pause_ns: Option<u64>,
}

impl HandoverArgs {
    pub fn encode(&self) -> String {
        let o = |f: Option<RawFd>| f.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
        let mut s = format!(
            "state={},ram={},api={},reply={},old={},ack={},argv={},disks={},t0={},mode={},back={},paused={},oldkvm={}",
            o(Some(self.state).filter(|&f| f >= 0)),
            self.ram,
            o(self.api),
            o(self.reply),
            o(self.old),
            o(self.ack),
            o(self.argv),
            self.disks.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(":"),
            self.t0_ns,
            self.mode.name(),
            u8::from(self.back),
            u8::from(self.paused),
            self.old_kvm.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(":")
        );
        // Keys a Ferry without parking does not know are only written when set: a single-step
        // exec hands over to such a Ferry too.
        let extra = [
            ("park", self.park.map(|v| v.to_string())),
            ("pull", self.pull.map(|v| v.to_string())),
            ("parkedpid", self.parked_pid.map(|v| v.to_string())),
            ("parkpause", self.park_pause_ns.map(|v| v.to_string())),
        ];
        for (k, v) in extra {
            if let Some(v) = v {
                s.push_str(&format!(",{k}={v}"));
            }
        }
        s
    }

    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let mut h = HandoverArgs {
            state: -1,
            ram: -1,
            api: None,
            reply: None,
            old: None,
            ack: None,
            argv: None,
            disks: Vec::new(),
            t0_ns: 0,
            mode: Mode::Exec,
            back: false,
            paused: false,
            old_kvm: Vec::new(),
            park: None,
            pull: None,
            parked_pid: None,
            park_pause_ns: None,
        };
        let fd = |v: &str| v.parse::<RawFd>().map_err(|_| format!("'{v}' is not a descriptor"));
        let opt = |v: &str| if v == "-" { Ok(None) } else { fd(v).map(Some) };
        for kv in s.split(',') {
            let (k, v) = kv.split_once('=').ok_or_else(|| format!("'{kv}' is not key=value"))?;
            match k {
                "state" => h.state = opt(v)?.unwrap_or(-1),
                "park" => h.park = opt(v)?,
                "pull" => h.pull = opt(v)?,
                "parkedpid" => h.parked_pid = Some(v.parse().map_err(|_| format!("'{v}' is not a process id"))?),
                "parkpause" => h.park_pause_ns = Some(v.parse().map_err(|_| format!("'{v}' is not a time"))?),
                "ram" => h.ram = fd(v)?,
                "api" => h.api = opt(v)?,
                "reply" => h.reply = opt(v)?,
                "old" => h.old = opt(v)?,
                "ack" => h.ack = opt(v)?,
                "argv" => h.argv = opt(v)?,
                "oldkvm" if v.is_empty() => {}
                "oldkvm" => h.old_kvm = v.split(':').map(fd).collect::<std::result::Result<_, _>>()?,
                "disks" if v.is_empty() => {}
                "disks" => h.disks = v.split(':').map(fd).collect::<std::result::Result<_, _>>()?,
                "t0" => h.t0_ns = v.parse().map_err(|_| format!("'{v}' is not a time"))?,
                "mode" => {
                    h.mode = match v {
                        "exec" => Mode::Exec,
                        "process" => Mode::Process,
                        _ => return Err(format!("'{v}' is not a mode")),
                    }
                }
                "back" => h.back = v == "1",
                "paused" => h.paused = v == "1",
                _ => return Err(format!("unknown handover key '{k}'")),
            }
        }
        if (h.state < 0 && h.pull.is_none()) || h.ram < 0 {
            return Err("the handover needs state= (or pull=) and ram=".into());
        }
        Ok(h)
    }

    fn all_fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.ram];
        v.extend(
            [
                Some(self.state).filter(|&f| f >= 0),
                self.api,
                self.reply,
                self.old,
                self.ack,
                self.argv,
                self.park,
                self.pull,
            ]
            .into_iter()
            .flatten(),
        );
        v.extend(&self.disks);
        v.extend(&self.old_kvm);
        v
    }
}

/// CLOCK_MONOTONIC in ns (the same clock in both processes).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn set_cloexec(fd: RawFd, on: bool) -> std::io::Result<()> {
    // SAFETY: F_SETFD on a descriptor this process holds; only its close-on-exec flag changes.
    let r = unsafe { libc::fcntl(fd, libc::F_SETFD, if on { libc::FD_CLOEXEC } else { 0 }) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// What `ferry update-check` prints: what the binary can take over.
pub fn check_info() -> Value {
    json!({
        "min_format": ferry_stream::MIN_FORMAT_VERSION,
        "max_format": ferry_stream::FORMAT_VERSION,
        "handover": true,
        // Pulls a guest parked for an exec (exec mode in two steps, docs/live-update.md).
        "pull": true,
        "version": env!("CARGO_PKG_VERSION"),
    })
}

/// Starts the new binary once (`update-check`) to see that it runs and reads this Ferry's
/// handover, before anything is paused. Returns what it said of itself (`update-check`).
fn preflight(binary: &Path) -> Result<Value> {
    let mut child = Command::new(binary)
        .arg("update-check")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("the new binary {} cannot be started", binary.display()))?;
    let end = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > end {
            let _ = child.kill();
            bail!("the new binary {} did not answer its start check within 20 s", binary.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = child.wait_with_output()?;
    if !status.success() {
        use std::os::unix::process::ExitStatusExt;
        let how = match status.signal() {
            Some(sig) => format!("crashed at start (signal {sig})"),
            None => format!("failed at start (exit status {})", status.code().unwrap_or(-1)),
        };
        let err = String::from_utf8_lossy(&out.stderr);
        let tail = err.trim().lines().last().unwrap_or("");
        bail!(
            "the new binary {} {how}{}",
            binary.display(),
            if tail.is_empty() { String::new() } else { format!(": {tail}") }
        );
    }
    let info: Value = serde_json::from_slice(&out.stdout).map_err(|_| {
        anyhow!(
            "the new binary {} is not a Ferry that can take over a running one (no handover support)",
            binary.display()
        )
    })?;
    let (lo, hi) = (info["min_format"].as_u64().unwrap_or(0), info["max_format"].as_u64().unwrap_or(0));
    let ours = u64::from(ferry_stream::FORMAT_VERSION);
    if info["handover"] != json!(true) || !(lo..=hi).contains(&ours) {
        bail!(
            "the new binary {} reads stream formats {lo} to {hi}; this Ferry writes format {ours}: it cannot take over",
            binary.display()
        );
    }
    Ok(info)
}

/// The old side: runs on the API connection `conn` that asked. On success in exec mode it does
/// not return (the new image answers the client); in process mode the process exits once the
/// new one acknowledged. On failure the guest runs on here, and the error is returned.
pub fn update(req: &Value, ctx: &ApiContext, conn: &UnixStream) -> Result<Value> {
    let binary = match req.get("binary").and_then(Value::as_str) {
        Some(b) => PathBuf::from(b),
        // This Ferry's own path: after a new binary was installed over it, the link names the
        // replaced file "… (deleted)"; the path is the new one.
        None => {
            let p = std::env::current_exe().context("cannot find this Ferry's own binary")?;
            let s = p.to_string_lossy();
            PathBuf::from(s.strip_suffix(" (deleted)").unwrap_or(&s).to_string())
        }
    };
    let mode = match req.get("mode").and_then(Value::as_str) {
        None | Some("exec") => Mode::Exec,
        Some("process") => Mode::Process,
        Some(m) => bail!("\"mode\" must be \"exec\" or \"process\", not \"{m}\""),
    };
    if ctx.migrated.load(Ordering::SeqCst) {
        bail!("the guest has migrated away; this Ferry is exiting");
    }
    let info = preflight(&binary)?;
    // A new binary that can pull a parked guest gets it in two short pauses, each independent
    // of the guest's size; an older one by the single exec (its VM built inside the pause).
    let park = info["pull"] == json!(true) && std::env::var_os("FERRY_UPDATE_SINGLE_EXEC").is_none();
    wait_for_teardown();
    {
        // Claimed under the state lock, as a migration is: a pause or resume is either done
        // before this or sees the update running.
        let _state = ctx.state_lock.lock();
        if ctx.migrating.swap(true, Ordering::SeqCst) {
            bail!("a migration or update is already running");
        }
    }
    // A snapshot pauses and resumes the guest too: one or the other at a time.
    let Ok(_no_snapshot) = ctx.snapshots.try_lock() else {
        ctx.migrating.store(false, Ordering::SeqCst);
        bail!("a snapshot is being taken; update after it");
    };
    let r = move_ram_into_memfd(ctx).and_then(|()| match mode {
        Mode::Exec if park => hand_over_parked(&binary, ctx, conn),
        Mode::Exec => hand_over(&binary, ctx, conn),
        Mode::Process => hand_over_prepared(&binary, ctx, conn),
    });
    ctx.migrating.store(false, Ordering::SeqCst);
    r
}

/// RAM restored from a snapshot by mmap is a private mapping of the snapshot file, which no
/// other process can take over: it moves into the machine's memfd first, with the guest
/// running (docs/live-update.md), and the update hands the memfd over as for any machine.
fn move_ram_into_memfd(ctx: &ApiContext) -> Result<()> {
    let moved = ctx
        .vm
        .move_ram_into_memfd(ctx.paused.load(Ordering::SeqCst))
        .context("cannot move the guest's RAM mapped from its snapshot file into memory for the update")?;
    if let Some(m) = moved {
        say!(
            "ferry: moved the guest's RAM mapped from its snapshot file into memory for the update: {} MiB copied \
             in {} rounds, {:.0} ms, guest paused {:.1} ms",
            m.bytes_copied >> 20,
            m.rounds,
            m.total.as_secs_f64() * 1000.0,
            m.pause.as_secs_f64() * 1000.0
        );
    }
    Ok(())
}

/// Process mode: the new Ferry starts and builds its VM (memory slots, vCPUs) from the
/// handover's first part while the guest still runs here; only then is the guest paused and the
/// rest (its state) sent. The pause holds no VM creation (memory slots cost 0.55 ms per GiB on
/// this host, where KVM shadows the guest's page tables).
fn hand_over_prepared(binary: &Path, ctx: &ApiContext, conn: &UnixStream) -> Result<Value> {
    start_prepared(binary, ctx, Some(conn.as_raw_fd()), None)?;
    // The new process runs the guest and answered the client: leave at once, touching nothing
    // (no resume, no cleanup of what it now owns).
    let _ = std::io::stdout().flush();
    // SAFETY: _exit ends the process without running destructors or atexit handlers, so
    // nothing of the guest's (now the new process's) is touched.
    unsafe { libc::_exit(0) }
}

/// A new process that took the guest over, prepared ahead.
struct Prepared {
    child: std::process::Child,
    /// How long the guest was paused, to the new process's acknowledgement (ns).
    pause_ns: u64,
}

/// Starts `binary` as a Ferry that builds its VM from the handover's first part while the guest
/// runs here, then pauses the guest and sends its state. Returns once the new process has
/// acknowledged (it runs the guest then; this machine stays paused, and must never run again).
/// `reply`: the client's connection, for the new process to answer; `park`: the new process
/// parks the guest for this one's exec (it then serves a pull on that socket). On failure the
/// guest runs on here.
fn start_prepared(binary: &Path, ctx: &ApiContext, reply: Option<RawFd>, park: Option<RawFd>) -> Result<Prepared> {
    let vm = &ctx.vm;
    let (stream_old, stream_new) = UnixStream::pair().context("cannot create the handover socket")?;
    let (ctl_old, ctl_new) = UnixStream::pair().context("cannot create the handover control socket")?;
    let ram_fd = vm.ram().memfd_raw();
    let h = HandoverArgs {
        state: stream_new.as_raw_fd(),
        ram: ram_fd,
        api: ctx.listener_fd(),
        reply,
        old: None,
        ack: Some(ctl_new.as_raw_fd()),
        argv: None,
        disks: vm.disks().iter().map(|d| d.image().file().as_raw_fd()).collect(),
        t0_ns: 0,
        mode: Mode::Process,
        back: false,
        paused: ctx.paused.load(Ordering::SeqCst),
        old_kvm: Vec::new(),
        park,
        pull: None,
        parked_pid: None,
        park_pause_ns: None,
    };
    let keep = h.all_fds();
    for &fd in &keep {
        set_cloexec(fd, false).with_context(|| format!("cannot pass descriptor {fd} on"))?;
    }
    let args = with_handover(own_args(), &h);
    let child = Command::new(binary).args(&args[1..]).spawn();
    for &fd in &keep {
        let _ = set_cloexec(fd, true);
    }
    drop((stream_new, ctl_new));
    let mut child = child.with_context(|| format!("the new binary {} cannot be started", binary.display()))?;
    // Ends the new process; an error it caused by dying says so.
    let abort = |child: &mut std::process::Child, e: anyhow::Error| -> anyhow::Error {
        std::thread::sleep(Duration::from_millis(20));
        if let Ok(Some(status)) = child.try_wait() {
            return anyhow!("the new Ferry exited before taking over ({status}); the guest runs on here");
        }
        let _ = child.kill();
        let _ = child.wait();
        e
    };
    // The first part, and the new Ferry's word that its VM is built: the guest still runs.
    let mut w = ferry_migrate::handover::write_handover_prefix(vm, BufWriter::new(&stream_old), ram_fd as u32)
        .map_err(|e| abort(&mut child, anyhow::Error::new(e).context("cannot send the handover")))?;
    wait_byte(&ctl_old, b'R', &mut child).map_err(|e| abort(&mut child, e))?;
    // The pause: only the state crosses now.
    let t0_ns = monotonic_ns();
    let was_paused = h.paused;
    vm.pause_keep_output()?;
    let undo = |child: &mut std::process::Child, e: anyhow::Error| -> anyhow::Error {
        let e = abort(child, e);
        let _ = vm.resume_disks();
        if !was_paused {
            let _ = vm.resume();
        }
        e
    };
    if let Err(e) = vm.quiesce_disks() {
        return Err(undo(&mut child, e.into()));
    }
    let _ = std::io::stdout().flush();
    if let Err(e) = (&ctl_old).write_all(&t0_ns.to_le_bytes()) {
        return Err(undo(&mut child, anyhow!("the new Ferry is gone: {e}")));
    }
    if let Err(e) = ferry_migrate::handover::write_handover_state(vm, &mut w) {
        return Err(undo(&mut child, anyhow::Error::new(e).context("cannot send the handover")));
    }
    match wait_byte(&ctl_old, b'A', &mut child) {
        Ok(()) => Ok(Prepared { child, pause_ns: monotonic_ns().saturating_sub(t0_ns) }),
        Err(e) => Err(undo(&mut child, e)),
    }
}

/// Waits for byte `want` from the new Ferry on `ctl`, or its death.
fn wait_byte(ctl: &UnixStream, want: u8, child: &mut std::process::Child) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let mut p = libc::pollfd { fd: ctl.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on one pollfd we own, 5 ms.
        let n = unsafe { libc::poll(&mut p, 1, 5) };
        if n > 0 {
            let mut b = [0u8; 1];
            match (&*ctl).read(&mut b) {
                Ok(1) if b[0] == want => return Ok(()),
                Ok(_) | Err(_) => {}
            }
        }
        if let Some(status) = child.try_wait()? {
            bail!("the new Ferry exited before taking over ({status}); the guest runs on here");
        }
        if Instant::now() > end {
            bail!("the new Ferry did not take over within 60 s; the guest runs on here");
        }
    }
}

/// Exec mode in two steps: the guest is parked in a process of this binary (prepared ahead, as
/// in process mode), this process execs the new binary, and the new image pulls the guest back
/// from the parked process, prepared ahead too. Two pauses, neither holding a VM's creation
/// (docs/live-update.md, "Exec mode").
fn hand_over_parked(binary: &Path, ctx: &ApiContext, conn: &UnixStream) -> Result<Value> {
    let vm = &ctx.vm;
    // This binary by descriptor: the parked process runs it, and a hand-back execs it (its path
    // may name the new binary by now).
    let old = File::open("/proc/self/exe").context("cannot open this Ferry's own binary")?;
    let argv = memfd_with(&own_args().join("\0")).context("cannot keep the command line")?;
    let (pull_end, park_end) = UnixStream::pair().context("cannot create the parking socket")?;
    let this_binary = PathBuf::from(format!("/proc/self/fd/{}", old.as_raw_fd()));
    let parked = start_prepared(&this_binary, ctx, None, Some(park_end.as_raw_fd()))
        .context("cannot park the guest for the exec")?;
    drop(park_end);
    // The guest runs in the parked process; this machine stays paused from here on.
    let h = HandoverArgs {
        state: -1,
        ram: vm.ram().memfd_raw(),
        api: ctx.listener_fd(),
        reply: Some(conn.as_raw_fd()),
        old: Some(old.as_raw_fd()),
        ack: Some(pull_end.as_raw_fd()),
        argv: Some(argv.as_raw_fd()),
        disks: vm.disks().iter().map(|d| d.image().file().as_raw_fd()).collect(),
        t0_ns: 0,
        mode: Mode::Exec,
        back: false,
        paused: ctx.paused.load(Ordering::SeqCst),
        old_kvm: Vec::new(),
        park: None,
        pull: Some(pull_end.as_raw_fd()),
        parked_pid: Some(parked.child.id()),
        park_pause_ns: Some(parked.pause_ns),
    };
    for fd in h.all_fds() {
        if let Err(e) = set_cloexec(fd, false) {
            return Err(give_up_parked(&h, &format!("cannot pass descriptor {fd} on: {e}")));
        }
    }
    let err = exec(binary, &with_handover(own_args(), &h));
    // This binary takes the guest back from the parked process.
    let why = format!("cannot exec the new binary {}: {err}", binary.display());
    say!("ferry: {why}");
    let err = hand_back(&h, &why);
    Err(give_up_parked(&h, &format!("{err:#}")))
}

/// The guest is parked and cannot come back into this process: the parked process keeps it
/// (once this one is gone, it serves the API itself). Answers the client and exits.
fn give_up_parked(h: &HandoverArgs, why: &str) -> anyhow::Error {
    let pid = h.parked_pid.unwrap_or(0);
    let msg = format!(
        "{why}; the guest runs on in the parked Ferry process {pid}, which serves the API once this one has exited"
    );
    say!("ferry: {msg}");
    reply(h, &json!({"ok": false, "error": msg}));
    let _ = std::io::stdout().flush();
    // SAFETY: _exit without destructors: this machine is paused and must not run again (the
    // guest runs in the parked process).
    unsafe { libc::_exit(1) }
}

/// A message on the parking socket.
enum Ctl {
    /// A pull, with the socket to send the handover on.
    Pull(UnixStream),
    Byte(u8),
    /// The pulling side is gone (every copy of its end closed).
    Gone,
}

fn recv_ctl(ctl: &UnixStream) -> Ctl {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let mut b = [0u8; 1];
    loop {
        match ctl.recv_with_fd(&mut b) {
            Ok((0, _)) => return Ctl::Gone,
            Ok((_, Some(f))) if b[0] == b'P' => return Ctl::Pull(UnixStream::from(OwnedFd::from(f))),
            Ok(_) => return Ctl::Byte(b[0]),
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(_) => return Ctl::Gone,
        }
    }
}

/// How a parked process's service ended.
pub enum ParkEnd {
    /// The guest went on to the image that pulled it: exit.
    HandedOn,
    /// The process that parked the guest here is gone without pulling it: this one keeps it.
    Orphaned,
}

/// The parked process: serves pulls on the parking socket until one takes the guest. A pull
/// that fails (the pulling image could not rebuild the machine and hands back to the previous
/// binary, which pulls again) leaves the guest running here.
pub fn park(vm: &ferry_vmm::vm::Vm, h: &HandoverArgs) -> ParkEnd {
    let Some(fd) = h.park else { return ParkEnd::Orphaned };
    // SAFETY: the parking socket, handed over for this; owned here.
    let ctl = unsafe { UnixStream::from_raw_fd(fd) };
    let mut next = None;
    loop {
        let stream = match next.take() {
            Some(s) => s,
            None => match recv_ctl(&ctl) {
                Ctl::Pull(s) => s,
                Ctl::Gone => return ParkEnd::Orphaned,
                Ctl::Byte(b) => {
                    say!("ferry: parked guest: unexpected byte {b:#04x} on the parking socket, ignored");
                    continue;
                }
            },
        };
        match hand_on(vm, h, &ctl, stream) {
            Ok(Step::Done) => return ParkEnd::HandedOn,
            Ok(Step::Again(s)) => next = Some(s),
            Ok(Step::Gone) => return ParkEnd::Orphaned,
            Err(e) => say!("ferry: handing the parked guest on failed: {e:#}; it runs on here"),
        }
    }
}

enum Step {
    Done,
    Again(UnixStream),
    Gone,
}

/// One pull: the prepared handover's protocol (process mode's), the pulling image on `ctl`.
fn hand_on(vm: &ferry_vmm::vm::Vm, h: &HandoverArgs, ctl: &UnixStream, stream: UnixStream) -> Result<Step> {
    // The RAM reference names the memfd by the number the image after the exec holds it under
    // (the same number here: both inherited it from the process that parked the guest).
    let mut w = ferry_migrate::handover::write_handover_prefix(vm, BufWriter::new(&stream), h.ram as u32)
        .context("cannot send the handover")?;
    match recv_ctl(ctl) {
        Ctl::Byte(b'R') => {}
        Ctl::Pull(s) => return Ok(Step::Again(s)),
        Ctl::Gone => return Ok(Step::Gone),
        Ctl::Byte(b) => bail!("unexpected byte {b:#04x} from the Ferry pulling the guest"),
    }
    let t0_ns = monotonic_ns();
    vm.pause_keep_output()?;
    let undo = || {
        let _ = vm.resume_disks();
        if !h.paused {
            let _ = vm.resume();
        }
    };
    if let Err(e) = vm.quiesce_disks() {
        undo();
        return Err(e.into());
    }
    let _ = std::io::stdout().flush();
    if (&*ctl).write_all(&t0_ns.to_le_bytes()).is_err() {
        undo();
        return Ok(Step::Gone);
    }
    if let Err(e) = ferry_migrate::handover::write_handover_state(vm, &mut w) {
        undo();
        return Err(anyhow::Error::new(e).context("cannot send the handover"));
    }
    match recv_ctl(ctl) {
        Ctl::Byte(b'A') => Ok(Step::Done),
        Ctl::Pull(s) => {
            undo();
            Ok(Step::Again(s))
        }
        Ctl::Gone => {
            undo();
            Ok(Step::Gone)
        }
        Ctl::Byte(b) => {
            undo();
            bail!("unexpected byte {b:#04x} from the Ferry pulling the guest")
        }
    }
}

/// The image after the exec (or a hand-back): asks the parked process for the guest. Returns
/// the socket the handover comes on.
pub fn pull(h: &HandoverArgs) -> Result<File> {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let fd = h.pull.ok_or_else(|| anyhow!("no parking socket"))?;
    let (ours, theirs) = UnixStream::pair().context("cannot create the handover socket")?;
    // SAFETY: the parking socket handed over for this; used, not owned (acknowledge closes it).
    let ctl = std::mem::ManuallyDrop::new(unsafe { UnixStream::from_raw_fd(fd) });
    ctl.send_with_fd(&b"P"[..], theirs.as_raw_fd())
        .map_err(|e| anyhow!("cannot ask the parked Ferry process for the guest: {e}"))?;
    Ok(File::from(OwnedFd::from(ours)))
}

/// Exec mode: the handover in a memfd, then exec.
fn hand_over(binary: &Path, ctx: &ApiContext, conn: &UnixStream) -> Result<Value> {
    let vm = &ctx.vm;
    let t0_ns = monotonic_ns();
    let was_paused = ctx.paused.load(Ordering::SeqCst);
    // A console line the pause cuts goes over in the serial section, whole, instead of half
    // here and half there (with the new Ferry's own messages possibly in between).
    vm.pause_keep_output()?;
    let undo = |e: anyhow::Error| -> anyhow::Error {
        let _ = vm.resume_disks();
        if !was_paused {
            let _ = vm.resume();
        }
        e
    };
    vm.quiesce_disks().map_err(|e| undo(e.into()))?;
    let _ = std::io::stdout().flush();
    // The handover, in a memfd the new image inherits.
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let state_fd = unsafe { libc::memfd_create(c"ferry-handover".as_ptr(), 0) };
    if state_fd < 0 {
        return Err(undo(anyhow!("cannot create the handover memfd: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: a fresh descriptor we own.
    let state = unsafe { File::from_raw_fd(state_fd) };
    let ram_fd = vm.ram().memfd_raw();
    let state = ferry_migrate::handover::write_handover(vm, BufWriter::new(state), ram_fd as u32)
        .map_err(|e| undo(anyhow::Error::new(e).context("cannot write the handover")))?
        .into_inner()
        .map_err(|e| undo(anyhow!("cannot write the handover: {}", e.error())))?;
    let old = File::open("/proc/self/exe").map_err(|e| undo(anyhow!("cannot open this Ferry's own binary: {e}")))?;
    // This process's command line, for a hand-back to run again as it is.
    let argv = memfd_with(&own_args().join("\0")).map_err(|e| undo(anyhow!("cannot keep the command line: {e}")))?;
    let h = HandoverArgs {
        state: state.as_raw_fd(),
        ram: ram_fd,
        api: ctx.listener_fd(),
        reply: Some(conn.as_raw_fd()),
        old: Some(old.as_raw_fd()),
        ack: None,
        argv: Some(argv.as_raw_fd()),
        disks: vm.disks().iter().map(|d| d.image().file().as_raw_fd()).collect(),
        t0_ns,
        mode: Mode::Exec,
        back: false,
        paused: was_paused,
        old_kvm: vm.kvm_fds(),
        park: None,
        pull: None,
        parked_pid: None,
        park_pause_ns: None,
    };
    // This address space outlives the exec in a holder process, so that the exec does not
    // tear it down (unmapping the guest's RAM, the KVM MMU's release) inside the pause. The
    // holder goes when the new image closes the holder's pipe, first in `old_kvm`, so closed
    // last (after the VM).
    let holder = MmHolder::start().map_err(|e| undo(anyhow!("cannot keep the address space for the exec: {e}")))?;
    let mut h = h;
    h.old_kvm.insert(0, holder.release_fd());
    let keep = h.all_fds();
    let restore_flags = || {
        for &fd in &keep {
            let _ = set_cloexec(fd, true);
        }
    };
    for &fd in &keep {
        if let Err(e) = set_cloexec(fd, false) {
            restore_flags();
            holder.stop();
            return Err(undo(anyhow!("cannot pass descriptor {fd} on: {e}")));
        }
    }
    let args = with_handover(own_args(), &h);
    let err = exec(binary, &args);
    restore_flags();
    holder.stop();
    Err(undo(anyhow!("cannot exec the new binary {}: {err}", binary.display())))
}

/// A process sharing this address space (CLONE_VM, its own thread group), which keeps it alive
/// across this process's exec: the exec then only drops a reference, and the unmapping of the
/// guest's RAM and the KVM MMU's release happen when the holder exits, after the new image has
/// resumed the guest and closed [`MmHolder::release_fd`]. Measured here: the exec took 8-14 ms
/// of the pause with the teardown in it.
struct MmHolder {
    pid: libc::pid_t,
    /// The pipe's write end: the holder exits when every copy of it is closed.
    release: RawFd,
}

/// The holder's stack size: it runs three raw system calls.
const HOLDER_STACK: usize = 64 * 1024;

/// The holder: closes every descriptor but the pipe's read end (so that it keeps no socket,
/// lock or KVM object alive), waits for the read end's EOF, and exits.
extern "C" fn mm_holder(arg: *mut libc::c_void) -> libc::c_int {
    let fds = arg as usize as u64;
    let (rfd, wfd) = ((fds & 0xffff_ffff) as libc::c_uint, (fds >> 32) as libc::c_int);
    // SAFETY: raw system calls on this process's own descriptor table only (CLONE_VM shares
    // memory, not descriptors); no memory is touched but this stack's `b`.
    unsafe {
        // The write end first, by itself: a kernel without close_range (before 5.9) must not
        // leave the holder holding its own EOF.
        libc::syscall(libc::SYS_close, wfd);
        if rfd > 0 {
            libc::syscall(libc::SYS_close_range, 0u32, rfd - 1, 0u32);
        }
        libc::syscall(libc::SYS_close_range, rfd + 1, u32::MAX, 0u32);
        let mut b = 0u8;
        while libc::syscall(libc::SYS_read, rfd, std::ptr::addr_of_mut!(b), 1usize) > 0 {}
        libc::syscall(libc::SYS_exit, 0);
    }
    0
}

impl MmHolder {
    fn start() -> std::io::Result<Self> {
        let mut p = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into `p`; checked.
        if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fresh descriptors we own.
        let (rfd, wfd) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        // The stack lives in the shared address space for as long as the holder runs; it is
        // leaked (64 KiB per update).
        let stack: &'static mut [u8] = Box::leak(vec![0u8; HOLDER_STACK].into_boxed_slice());
        // SAFETY: the top of a leaked, 16-byte aligned allocation (the stack grows down).
        let top = unsafe { stack.as_mut_ptr().add(HOLDER_STACK) }.map_addr(|a| a & !15);
        // The holder's argument: the pipe's read end, and its write end to close at once.
        let fds = (rfd.as_raw_fd() as u32 as u64) | ((wfd.as_raw_fd() as u32 as u64) << 32);
        // SAFETY: clone with CLONE_VM runs `mm_holder` on its own stack in this address space;
        // it makes only raw system calls (no allocation, no locks). Exit signal 0: reaped with
        // __WCLONE.
        let pid = unsafe { libc::clone(mm_holder, top.cast(), libc::CLONE_VM, fds as usize as *mut libc::c_void) };
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        drop(rfd);
        Ok(MmHolder { pid, release: wfd.into_raw_fd() })
    }

    fn release_fd(&self) -> RawFd {
        self.release
    }

    /// The exec failed: the holder goes now.
    fn stop(self) {
        // SAFETY: our write end; closing it is the holder's EOF.
        unsafe { libc::close(self.release) };
        // SAFETY: waits for our own clone child.
        unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), libc::__WCLONE) };
    }
}

/// This process's command line without a handover it came from.
fn own_args() -> Vec<String> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in std::env::args() {
        if skip {
            skip = false;
            continue;
        }
        if a == "--handover" || a == "--handover-failed" {
            skip = true;
            continue;
        }
        if a.starts_with("--handover=") || a.starts_with("--handover-failed=") {
            continue;
        }
        out.push(a);
    }
    out
}

/// `args` with the handover `h` added.
fn with_handover(mut args: Vec<String>, h: &HandoverArgs) -> Vec<String> {
    args.push("--handover".into());
    args.push(h.encode());
    args
}

/// A memfd (inheritable) holding `text`.
fn memfd_with(text: &str) -> std::io::Result<File> {
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"ferry-argv".as_ptr(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let mut f = unsafe { File::from_raw_fd(fd) };
    f.write_all(text.as_bytes())?;
    Ok(f)
}

fn exec(binary: &Path, args: &[String]) -> std::io::Error {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(binary.as_os_str().as_bytes()) else {
        return std::io::Error::from_raw_os_error(libc::EINVAL);
    };
    let Ok(cargs) = args.iter().map(|a| std::ffi::CString::new(a.as_bytes())).collect::<Result<Vec<_>, _>>() else {
        return std::io::Error::from_raw_os_error(libc::EINVAL);
    };
    let mut argv: Vec<*const libc::c_char> = cargs.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    // SAFETY: path and argv are NUL-terminated C strings kept alive across the call, argv ends
    // with a null pointer; execv only returns on failure.
    unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
    std::io::Error::last_os_error()
}

/// The new side's answer to the client, on the inherited connection.
pub fn reply(h: &HandoverArgs, v: &Value) {
    if let Some(fd) = h.reply {
        // SAFETY: the requesting client's connection, handed over for this reply; owned here.
        let mut c = unsafe { UnixStream::from_raw_fd(fd) };
        let _ = writeln!(c, "{v}");
    }
}

/// The new side: the old binary did not manage to take the guest (or this image could not):
/// give it back to the old binary (exec mode), with the same handover.
pub fn hand_back(h: &HandoverArgs, why: &str) -> anyhow::Error {
    let Some(old) = h.old.filter(|_| !h.back && h.mode == Mode::Exec) else {
        return anyhow!("{why}");
    };
    let back = HandoverArgs { back: true, ..h.clone() };
    // The old process's command line, as it ran.
    let old_args = h.argv.and_then(|fd| std::fs::read_to_string(format!("/proc/self/fd/{fd}")).ok());
    let old_args: Vec<String> = match old_args {
        Some(t) => t.split('\0').map(str::to_string).collect(),
        None => own_args(),
    };
    let mut args = with_handover(old_args, &back);
    args.push("--handover-failed".into());
    args.push(why.to_string());
    // Every handed-over descriptor stays open across this exec too.
    for fd in back.all_fds() {
        let _ = set_cloexec(fd, false);
    }
    let path = PathBuf::from(format!("/proc/self/fd/{old}"));
    let err = exec(&path, &args);
    anyhow!("{why}; handing the guest back to the previous binary failed too: {err}")
}

/// A duplicate of handed-over descriptor `fd` (close-on-exec), owned by the caller.
pub fn dup_file(fd: RawFd) -> std::io::Result<File> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor this process was handed; the new one is ours.
    let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if d < 0 {
        return Err(std::io::Error::other(format!("handed-over descriptor {fd}: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { File::from_raw_fd(d) })
}

/// Tears the old KVM VM down (closing its descriptors) off the critical path, once the new
/// machine runs.
pub fn release_old_vm(h: &HandoverArgs) {
    let fds = h.old_kvm.clone();
    if let Some(pid) = h.parked_pid {
        // The parked process exits on this image's acknowledgement: reaped here, so that a next
        // update waits for it and no zombie is left.
        let t = std::thread::Builder::new().name("parked-reaper".into()).spawn(move || loop {
            // SAFETY: waits for this process's own child, the parked Ferry.
            let r = unsafe { libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0) };
            if r >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break;
            }
        });
        if let (Ok(t), Ok(mut slot)) = (t, TEARDOWN.lock()) {
            *slot = Some(t);
        }
    }
    if fds.is_empty() {
        return;
    }
    let t = std::thread::Builder::new().name("old-vm-teardown".into()).spawn(move || {
        // vCPUs first, the VM, then the previous image's address space holder (first in the
        // list).
        for fd in fds.iter().rev() {
            // SAFETY: descriptors of the previous image's KVM objects and its address space
            // holder's pipe, handed over only to be closed here; nothing else uses them.
            unsafe { libc::close(*fd) };
        }
        // The holder exits on its pipe's EOF (the previous image's address space goes then);
        // reaped here, so that a next update waits for it. No clone child: ECHILD at once.
        loop {
            // SAFETY: waits for this process's clone children (only address space holders).
            let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::__WCLONE) };
            if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break;
            }
        }
    });
    if let (Ok(t), Ok(mut slot)) = (t, TEARDOWN.lock()) {
        *slot = Some(t);
    }
}

/// The running teardown of the VM before this one: a next update waits for it before it
/// pauses the guest (else the exec would close what is left of it, inside the pause).
static TEARDOWN: std::sync::Mutex<Option<std::thread::JoinHandle<()>>> = std::sync::Mutex::new(None);

fn wait_for_teardown() {
    let t = TEARDOWN.lock().ok().and_then(|mut s| s.take());
    if let Some(t) = t {
        let _ = t.join();
    }
}

/// Closes the handed-over descriptors this image has taken duplicates of (after it holds the
/// guest: a hand-back no longer needs them).
pub fn close_handed_over(h: &HandoverArgs) {
    let mut fds = vec![h.ram];
    fds.extend(Some(h.state).filter(|&f| f >= 0));
    fds.extend(&h.disks);
    fds.extend([h.old, h.argv].into_iter().flatten());
    for fd in fds {
        // SAFETY: closing descriptors this process was handed and no longer uses (duplicates
        // of them are used instead).
        unsafe { libc::close(fd) };
    }
}

/// Marks every handed-over descriptor close-on-exec again (they are this process's now).
pub fn own_fds(h: &HandoverArgs) {
    for fd in h.all_fds() {
        let _ = set_cloexec(fd, true);
    }
}

/// Process mode: tells the old Ferry the VM is built (it then pauses the guest and sends the
/// state).
pub fn ready(h: &HandoverArgs) {
    if let Some(fd) = h.ack {
        // SAFETY: the control socket handed over for this; written, not owned (it stays open).
        let f = std::mem::ManuallyDrop::new(unsafe { UnixStream::from_raw_fd(fd) });
        let _ = (&*f).write_all(b"R");
    }
}

/// Process mode: the moment the old Ferry paused the guest (it sends it once the state is on
/// its way).
pub fn pause_start(h: &HandoverArgs) -> Option<u64> {
    let fd = h.ack?;
    // SAFETY: the control socket handed over for this; read, not owned (it stays open).
    let f = std::mem::ManuallyDrop::new(unsafe { UnixStream::from_raw_fd(fd) });
    let mut b = [0u8; 8];
    (&*f).read_exact(&mut b).ok()?;
    Some(u64::from_le_bytes(b))
}

/// Process mode: the acknowledgement to the old process (it exits on it).
pub fn acknowledge(h: &HandoverArgs) {
    if let Some(fd) = h.ack {
        // SAFETY: the control socket handed over for this; owned here, closed after.
        let mut f = unsafe { UnixStream::from_raw_fd(fd) };
        let _ = f.write_all(b"A");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn handover_args_round_trip() {
        let h = HandoverArgs {
            state: 9,
            ram: 3,
            api: Some(5),
            reply: None,
            old: Some(11),
            ack: None,
            argv: Some(4),
            disks: vec![6, 7],
            t0_ns: 123,
            mode: Mode::Process,
            back: true,
            paused: true,
            old_kvm: vec![12, 13],
            park: None,
            pull: Some(14),
            parked_pid: Some(4242),
            park_pause_ns: Some(900_000),
        };
        assert_eq!(HandoverArgs::parse(&h.encode()).unwrap(), h);
        // Without the parking keys, the line is the one a Ferry without parking reads.
        let single = HandoverArgs { pull: None, parked_pid: None, park_pause_ns: None, ..h.clone() };
        assert!(!single.encode().contains("pull") && !single.encode().contains("park"));
        assert_eq!(HandoverArgs::parse(&single.encode()).unwrap(), single);
        let pulled = HandoverArgs { state: -1, ..h.clone() };
        assert!(pulled.encode().starts_with("state=-,"));
        assert_eq!(HandoverArgs::parse(&pulled.encode()).unwrap(), pulled);
        assert!(HandoverArgs::parse("state=-,ram=3").unwrap_err().contains("pull="));
        assert!(HandoverArgs::parse("ram=3").unwrap_err().contains("state="));
        assert!(HandoverArgs::parse("state=1,ram=2,color=red").unwrap_err().contains("color"));
    }
}
