//! The control socket (`--api-socket`): one JSON object per line in, one per line out; a
//! connection that opens with an HTTP request line is served as REST instead (crate::http).
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"pause"}`, `{"cmd":"resume"}`, `{"cmd":"quit"}`,
//! `{"cmd":"memory-read","gpa":N,"len":N}`, `{"cmd":"memory-write","gpa":N,"hex":"..."}`,
//! `{"cmd":"dirty-rate","window_ms":N}`, `migrate`, `snapshot`, `replicate`, `update`, ….
//! Every reply has `"ok": true|false`; failures carry `"error"`. The protocol is documented in
//! docs/cli.md ("Control socket"); the REST routes in docs/api/openapi.yaml.

use std::io::{BufRead, BufReader, Write};
use std::num::NonZeroU64;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ferry_migrate::source::{MigrateParams, Progress};
use ferry_migrate::transport::Uri;
use ferry_vmm::{ExitReason, Vm};
use serde_json::{json, Value};

use crate::request::{check_fields, read_request};

/// The followers of the events, shareable with threads that outlive a request (replication).
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<std::sync::mpsc::SyncSender<Value>>>>);

impl Events {
    /// Sends `ev` (stamped with ms since `started`) to every follower; one that cannot keep up
    /// loses it, one that went away is dropped.
    fn publish(&self, started: std::time::Instant, mut ev: Value) {
        ev["t_ms"] = json!(started.elapsed().as_millis() as u64);
        if let Ok(mut subs) = self.0.lock() {
            subs.retain(|s| !matches!(s.try_send(ev.clone()), Err(std::sync::mpsc::TrySendError::Disconnected(_))));
        }
    }
}

/// What `GET /metrics` counts besides what the machine keeps.
#[derive(Debug, Default, Clone)]
pub(crate) struct Counters {
    pub migrations_completed: u64,
    pub migrations_failed: u64,
    pub migrations_cancelled: u64,
    pub migration_bytes: u64,
    pub last_downtime_ms: f64,
    pub last_dirty_rate_pages_s: f64,
}

/// A post-copy *into* this Ferry is still running: pages of the guest are still at the source
/// (holes in guest memory, filled as they come). Nothing may copy, hand over or stop the
/// guest meanwhile: a snapshot or migration would take those holes for zero pages, an update
/// would hand them over as such, and a vCPU waiting on a page cannot be paused.
pub static POSTCOPY_INCOMING: AtomicBool = AtomicBool::new(false);

/// Refuses `cmd` while a post-copy into this Ferry runs.
pub(crate) fn refuse_during_postcopy(cmd: &str) -> Result<()> {
    if POSTCOPY_INCOMING.load(Ordering::SeqCst) {
        bail!("the guest's memory is still arriving (post-copy into this Ferry); {cmd} after it completes");
    }
    Ok(())
}

/// Shared state the API acts on.
pub struct ApiContext {
    pub vm: Arc<Vm>,
    pub paused: Arc<AtomicBool>,
    /// Replication to a backup (one at a time; kept after it ended, for its figures).
    pub(crate) replication: Mutex<Option<Replication>>,
    /// Replication's epochs are running: nothing else may pause, resume or move the guest.
    replicating: Arc<AtomicBool>,
    /// Held by every command that checks the machine's state and changes it (api::handle), and
    /// by a migration while it checks and claims the machine.
    pub(crate) state_lock: Mutex<()>,
    /// A migration is running (one at a time).
    pub migrating: AtomicBool,
    /// Set by `migrate-cancel`; the running migration stops at its next step.
    pub cancel: AtomicBool,
    /// Pages dirtied since the last snapshot (for incremental snapshots); also one at a time.
    pub snapshots: Mutex<Option<ferry_migrate::snapshot::Tracker>>,
    /// The guest moved away: it must never run here again.
    pub migrated: AtomicBool,
    /// The listening socket's descriptor (-1 before `serve`), for a live update to pass on.
    listener_fd: std::sync::atomic::AtomicI32,
    /// Subscribers of `GET /api/v1/events` (crate::http).
    events: Events,
    /// The last migration's live status (`GET /api/v1/vm.migration`).
    pub(crate) migration: Mutex<Value>,
    /// Counters for `GET /metrics`.
    pub(crate) counters: Mutex<Counters>,
    /// A post-copy whose link failed: the pages the destination is still owed, kept for
    /// `migrate-resume`.
    postcopy: Mutex<Option<Box<ferry_migrate::postcopy::PostcopySource>>>,
    started: std::time::Instant,
}

impl ApiContext {
    pub fn new(vm: Arc<Vm>) -> Self {
        ApiContext {
            vm,
            paused: Arc::new(AtomicBool::new(false)),
            replication: Mutex::new(None),
            replicating: Arc::new(AtomicBool::new(false)),
            state_lock: Mutex::new(()),
            migrating: AtomicBool::new(false),
            cancel: AtomicBool::new(false),
            snapshots: Mutex::new(None),
            migrated: AtomicBool::new(false),
            listener_fd: std::sync::atomic::AtomicI32::new(-1),
            events: Events::default(),
            migration: Mutex::new(json!({"status": "none"})),
            counters: Mutex::new(Counters::default()),
            postcopy: Mutex::new(None),
            started: std::time::Instant::now(),
        }
    }

    /// Sends an event to every `GET /api/v1/events` follower (one that cannot keep up loses
    /// it; one that went away is dropped).
    pub(crate) fn publish(&self, ev: Value) {
        self.events.publish(self.started, ev);
    }

    /// A new follower of the events.
    pub(crate) fn subscribe(&self) -> std::sync::mpsc::Receiver<Value> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1024);
        if let Ok(mut subs) = self.events.0.lock() {
            subs.push(tx);
        }
        rx
    }

    /// The VM's state for status replies and events.
    pub(crate) fn state_name(&self) -> &'static str {
        if self.migrated.load(Ordering::SeqCst) {
            "migrated"
        } else if self.paused.load(Ordering::SeqCst) {
            "paused"
        } else {
            "running"
        }
    }

    /// The API listener's descriptor, once serving.
    pub fn listener_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.listener_fd.load(Ordering::SeqCst)).filter(|&fd| fd >= 0)
    }
}

/// Binds the socket (replacing a stale one) and serves it on a background thread.
/// The socket file's mode is `mode` (0600 by default: the API controls the guest, its memory
/// included, so only its owner may connect).
pub fn serve(path: &Path, mode: u32, ctx: Arc<ApiContext>) -> Result<()> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        // Only a socket is ever replaced: anything else at the path is somebody's file.
        if !meta.file_type().is_socket() {
            bail!("{} exists and is not a socket: choose another --api-socket path", path.display());
        }
        // A live Ferry answers on it; a stale socket from a dead one is replaced.
        if UnixStream::connect(path).is_ok() {
            bail!("API socket {} is in use by another process", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("cannot remove stale API socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("cannot bind API socket {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of API socket {}", path.display()))?;
    serve_listener(listener, path, ctx)
}

/// Most API connections served at once (each has a thread); more are answered with an error
/// and closed.
pub const MAX_CONNECTIONS: usize = 32;
/// A client that takes no reply bytes for this long is dropped (its thread is freed).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves an already bound listener (one a live update handed over) on a background thread.
pub fn serve_listener(listener: UnixListener, path: &Path, ctx: Arc<ApiContext>) -> Result<()> {
    use std::os::fd::AsRawFd;
    ctx.listener_fd.store(listener.as_raw_fd(), Ordering::SeqCst);
    let path: PathBuf = path.to_path_buf();
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::Builder::new().name("api".into()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                open.fetch_sub(1, Ordering::SeqCst);
                let _ = conn.set_write_timeout(Some(Duration::from_millis(100)));
                let msg = format!("{MAX_CONNECTIONS} API connections are open already; close one and retry");
                let _ = writeln!(conn, "{}", json!({"ok": false, "error": msg}));
                continue;
            }
            let (ctx, open) = (ctx.clone(), open.clone());
            let spawned = std::thread::Builder::new().name("api-conn".into()).spawn({
                let open = open.clone();
                move || {
                    let _ = handle_conn(conn, &ctx);
                    open.fetch_sub(1, Ordering::SeqCst);
                }
            });
            if spawned.is_err() {
                open.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let _ = std::fs::remove_file(path);
    })?;
    Ok(())
}

fn handle_conn(conn: UnixStream, ctx: &Arc<ApiContext>) -> Result<()> {
    conn.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let mut out = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    let mut first = true;
    loop {
        let line = match read_request(&mut reader) {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(e) => {
                let _ = writeln!(out, "{}", json!({"ok": false, "error": format!("refused: {e}")}));
                break;
            }
        };
        // A connection that opens with an HTTP request line speaks REST (crate::http).
        if std::mem::take(&mut first) && crate::request::is_request_line(&line) {
            crate::http::serve(&line, &mut reader, &mut out, ctx)?;
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        let req = crate::request::parse_json_line(&line);
        let (reply, quit) = match req {
            Ok(req)
                if matches!(req["cmd"].as_str(), Some("update" | "migrate"))
                    && ctx.replicating.load(Ordering::SeqCst) =>
            {
                (
                    json!({"ok": false, "error": format!("replication to a backup is running; {} after `ferry replicate-stop`", req["cmd"].as_str().unwrap_or(""))}),
                    false,
                )
            }
            Ok(req) if req["cmd"] == "update" => {
                match refuse_during_postcopy("update").and_then(|()| crate::update::update(&req, ctx, &out)) {
                    // Only failures come back: on success the new Ferry answers on this connection.
                    Ok(v) => (v, false),
                    Err(e) => (json!({"ok": false, "error": format!("{e:#}")}), false),
                }
            }
            Ok(req) if req["cmd"] == "migrate" || req["cmd"] == "migrate-resume" => {
                let mut progress = |v: &Value| {
                    let _ = writeln!(out, "{v}");
                };
                let reply = if req["cmd"] == "migrate" {
                    migrate(&req, ctx, &mut progress)
                } else {
                    migrate_resume(&req, ctx, &mut progress)
                };
                let done = reply["ok"] == json!(true);
                // A client that went away (killed mid-migration) changes nothing: the guest
                // left, so this Ferry ends either way.
                let sent = writeln!(out, "{reply}");
                if done {
                    ctx.vm.request_exit(ExitReason::Migrated);
                }
                sent?;
                continue;
            }
            Ok(req) => match handle(&req, ctx) {
                Ok(mut v) => {
                    v["ok"] = json!(true);
                    (v, req["cmd"] == "quit")
                }
                Err(e) => (json!({"ok": false, "error": format!("{e:#}")}), false),
            },
            Err(e) => (json!({"ok": false, "error": e}), false),
        };
        writeln!(out, "{reply}")?;
        if quit {
            ctx.vm.request_exit(ExitReason::Stopped);
        }
    }
    Ok(())
}

/// Runs a migration: progress events go to `progress` (JSON lines on the connection that asked,
/// or nowhere for HTTP), to the live status and to the event followers; returns the final reply.
pub(crate) fn migrate(req: &Value, ctx: &ApiContext, progress: &mut dyn FnMut(&Value)) -> Value {
    {
        // Claimed under the state lock: a pause or resume is either done before this or sees
        // the migration running.
        let _state = ctx.state_lock.lock();
        if ctx.migrated.load(Ordering::SeqCst) {
            return json!({"ok": false, "error": "the guest has migrated away; this Ferry is exiting"});
        }
        if ctx.migrating.swap(true, Ordering::SeqCst) {
            return json!({"ok": false, "error": "a migration is already running"});
        }
    }
    ctx.cancel.store(false, Ordering::SeqCst);
    // A snapshot pauses and resumes the guest too: one or the other at a time.
    let _no_snapshot = match ctx.snapshots.try_lock() {
        Ok(g) => g,
        Err(_) => {
            ctx.migrating.store(false, Ordering::SeqCst);
            return json!({"ok": false, "error": "a snapshot is being taken; migrate after it"});
        }
    };
    let r = (|| -> Result<Value> {
        refuse_during_postcopy("migrate")?;
        let to = req.get("to").and_then(Value::as_str).ok_or_else(|| anyhow!("migrate needs \"to\""))?;
        if ctx.paused.load(Ordering::SeqCst) {
            bail!("the VM is paused by the API; resume it before migrating");
        }
        let params = migrate_params(req, to)?;
        set_migration(ctx, json!({"status": "active", "to": to, "iteration": 0}));
        ctx.publish(json!({"event": "migration-started", "to": to}));
        let mut progress = |p: &Progress| {
            if let Ok(v) = serde_json::to_value(p) {
                report_progress(ctx, progress, v);
            }
        };
        let summary = match ferry_migrate::source::migrate(&ctx.vm, &params, &ctx.cancel, &mut progress) {
            Ok(s) => s,
            Err(ferry_migrate::source::MigrateError::PostcopyInterrupted { error, pending }) => {
                // The guest runs on the destination: it must never run here again, and this
                // Ferry stays to serve the pages it is still owed once the link is back.
                ctx.migrated.store(true, Ordering::SeqCst);
                let e = anyhow::Error::new(error);
                postcopy_paused(ctx, pending, &format!("{e:#}"));
                return Err(e);
            }
            Err(e @ ferry_migrate::source::MigrateError::HandoverUnknown(_)) => {
                // The destination may run the guest: it stays paused here, as if by the API,
                // so that nothing but an explicit `resume` (or `quit`) touches it; a snapshot
                // or another migration would run it.
                ctx.paused.store(true, Ordering::SeqCst);
                ctx.publish(json!({"event": "state", "state": "paused"}));
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        // The destination runs the guest now: nothing may resume it here (the flag is set
        // before `migrating` drops, so no request slips in between).
        ctx.migrated.store(true, Ordering::SeqCst);
        Ok(json!({ "summary": summary }))
    })();
    ctx.migrating.store(false, Ordering::SeqCst);
    match r {
        Ok(mut v) => {
            if let Ok(mut c) = ctx.counters.lock() {
                c.migrations_completed += 1;
                c.migration_bytes += v["summary"]["bytes"].as_u64().unwrap_or(0);
                c.last_downtime_ms = v["summary"]["downtime_ms"].as_f64().unwrap_or(0.0);
            }
            set_migration(ctx, json!({"status": "completed", "summary": v["summary"]}));
            ctx.publish(json!({"event": "migration-completed", "summary": v["summary"]}));
            v["ok"] = json!(true);
            v
        }
        Err(e) => {
            let msg = format!("{e:#}");
            let status = if ctx.cancel.load(Ordering::SeqCst) { "cancelled" } else { "failed" };
            if let Ok(mut c) = ctx.counters.lock() {
                if status == "cancelled" {
                    c.migrations_cancelled += 1;
                } else {
                    c.migrations_failed += 1;
                }
            }
            if ctx.migration.lock().map(|m| m["status"] == "active").unwrap_or(false) {
                set_migration(ctx, json!({"status": status, "error": msg}));
                ctx.publish(json!({"event": format!("migration-{status}"), "error": msg}));
            }
            json!({"ok": false, "error": msg})
        }
    }
}

impl ApiContext {
    /// Whether an interrupted post-copy waits for `migrate-resume`.
    pub(crate) fn postcopy_pending(&self) -> bool {
        self.postcopy.lock().map(|p| p.is_some()).unwrap_or(false)
    }
}

/// Puts broken pages and machine checks on the events feed: `page-broken` (gpa, cause) when a
/// page joins the machine's poison set, `machine-check` (count so far) when a vCPU touched a
/// broken page and the guest got a machine check. Both happen in signal handlers and vCPU
/// threads, where nothing may block on a follower: a thread looks every 100 ms.
pub fn watch_machine_checks(ctx: Arc<ApiContext>) {
    let spawned = std::thread::Builder::new().name("mce-events".into()).spawn(move || {
        let mut seen = std::collections::BTreeSet::new();
        let mut mces = ferry_vmm::poison::sigbus_stats().vcpu_faults;
        for (g, _) in ctx.vm.ram().poison().list() {
            seen.insert(g);
        }
        while ctx.vm.exit_reason().is_none() {
            std::thread::sleep(Duration::from_millis(100));
            for (g, cause) in ctx.vm.ram().poison().list() {
                if seen.insert(g) {
                    ctx.publish(json!({"event": "page-broken", "gpa": g * 4096, "cause": cause}));
                }
            }
            let now = ferry_vmm::poison::sigbus_stats().vcpu_faults;
            if now > mces {
                ctx.publish(json!({"event": "machine-check", "new": now - mces, "total": now}));
                mces = now;
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("no machine-check events: {e}");
    }
}

/// Keeps an interrupted post-copy for `migrate-resume` and says so.
fn postcopy_paused(ctx: &ApiContext, pending: Box<ferry_migrate::postcopy::PostcopySource>, error: &str) {
    let left = pending.left();
    set_migration(
        ctx,
        json!({"status": "postcopy-paused", "pages_left": left, "postcopy": pending.stats, "error": error}),
    );
    ctx.publish(json!({"event": "postcopy-paused", "pages_left": left, "error": error}));
    if let Ok(mut p) = ctx.postcopy.lock() {
        *p = Some(pending);
    }
}

/// `migrate-resume`: finishes an interrupted post-copy over a new connection.
pub(crate) fn migrate_resume(req: &Value, ctx: &ApiContext, progress: &mut dyn FnMut(&Value)) -> Value {
    let pending = ctx.postcopy.lock().ok().and_then(|mut p| p.take());
    let Some(mut pc) = pending else {
        return json!({"ok": false, "error": "no interrupted post-copy here to resume"});
    };
    let r = (|| -> Result<()> {
        let to = Uri::parse(opt_str(req, "to")?.ok_or_else(|| anyhow!("migrate-resume needs \"to\""))?)?;
        let tls = tls_of(req)?;
        set_migration(ctx, json!({"status": "postcopy-active", "to": to.to_string(), "pages_left": pc.left()}));
        ctx.publish(json!({"event": "postcopy-resumed", "to": to.to_string(), "pages_left": pc.left()}));
        let mut progress = |p: &ferry_migrate::postcopy::PostcopyProgress| {
            if let Ok(mut v) = serde_json::to_value(p) {
                v["event"] = json!("postcopy");
                report_progress(ctx, progress, v);
            }
        };
        ferry_migrate::postcopy::resume(&ctx.vm, &mut pc, &to, tls.as_deref(), &mut progress)?;
        Ok(())
    })();
    match r {
        Ok(()) => {
            let summary = json!({"postcopy": pc.stats});
            set_migration(ctx, json!({"status": "completed", "summary": summary}));
            ctx.publish(json!({"event": "migration-completed", "summary": summary}));
            json!({"ok": true, "summary": summary})
        }
        Err(e) => {
            let msg = format!("{e:#}");
            postcopy_paused(ctx, pc, &msg);
            json!({"ok": false, "error": msg})
        }
    }
}

/// A progress event (`{"event":"iteration",…}`): to the caller, the live status and the events
/// feed (as `migration-progress`).
fn report_progress(ctx: &ApiContext, progress: &mut dyn FnMut(&Value), v: Value) {
    progress(&v);
    update_migration(ctx, &v);
    let mut ev = v;
    ev["progress"] = ev["event"].take();
    ev["event"] = json!("migration-progress");
    ctx.publish(ev);
}

fn set_migration(ctx: &ApiContext, v: Value) {
    if let Ok(mut m) = ctx.migration.lock() {
        *m = v;
    }
}

/// Folds a progress event into the live migration status (`query-migrate`'s figures).
fn update_migration(ctx: &ApiContext, ev: &Value) {
    let Ok(mut m) = ctx.migration.lock() else { return };
    match ev["event"].as_str() {
        Some("iteration") => {
            m["iteration"] = ev["iteration"].clone();
            let add = |m: &mut Value, k: &str, v: &Value| {
                m[k] = json!(m[k].as_u64().unwrap_or(0) + v.as_u64().unwrap_or(0));
            };
            add(&mut m, "pages_sent", &ev["pages_sent"]);
            add(&mut m, "bytes_sent", &ev["bytes"]);
            m["bandwidth_mib_s"] = ev["bandwidth_mib_s"].clone();
            m["dirty_rate_pages_s"] = ev["dirty_rate_pages_s"].clone();
            if let Ok(mut c) = ctx.counters.lock() {
                c.last_dirty_rate_pages_s = ev["dirty_rate_pages_s"].as_f64().unwrap_or(0.0);
            }
            m["expected_downtime_ms"] = ev["estimated_downtime_ms"].clone();
            m["remaining_pages"] = ev["pages_dirtied"].clone();
        }
        Some("switchover") => {
            m["phase"] = json!("switchover");
            m["remaining_pages"] = ev["pending_pages"].clone();
            m["expected_downtime_ms"] = ev["estimated_downtime_ms"].clone();
        }
        Some("throttle") => m["throttle_percent"] = ev["percent"].clone(),
        Some("dirty-limit") => m["dirty_limit_mib_s"] = ev["mib_s"].clone(),
        Some("postcopy-started") => {
            m["phase"] = json!("postcopy");
            m["remaining_pages"] = ev["pages"].clone();
        }
        Some("postcopy") => {
            m["phase"] = json!("postcopy");
            m["remaining_pages"] = ev["remaining_pages"].clone();
            m["postcopy_requested_pages"] = ev["requested_pages"].clone();
            m["postcopy_pushed_pages"] = ev["pushed_pages"].clone();
        }
        _ => {}
    }
}

/// Runs one command of the JSON API (the HTTP routes use it): fields checked, then run.
pub(crate) fn run_command(req: &Value, ctx: &ApiContext) -> Result<Value> {
    check_fields(req)?;
    handle(req, ctx)
}

/// Checks a `migrate` request before it starts in the background (HTTP): its fields, and that
/// nothing else holds the guest.
pub(crate) fn check_migrate(req: &Value, ctx: &ApiContext) -> Result<()> {
    check_fields(req)?;
    refuse_during_postcopy("migrate")?;
    if ctx.replicating.load(Ordering::SeqCst) {
        bail!("replication to a backup is running; migrate after `ferry replicate-stop`");
    }
    if ctx.migrated.load(Ordering::SeqCst) {
        bail!("the guest has migrated away; this Ferry is exiting");
    }
    if ctx.migrating.load(Ordering::SeqCst) {
        bail!("a migration is already running");
    }
    if ctx.paused.load(Ordering::SeqCst) {
        bail!("the VM is paused by the API; resume it before migrating");
    }
    let to = req.get("to").and_then(Value::as_str).ok_or_else(|| anyhow!("migrate needs \"to\" (a string)"))?;
    migrate_params(req, to).map(|_| ())
}

/// Highest zstd level a migration may ask for (higher ones need far more memory and time than
/// a migration can spend).
pub const MAX_ZSTD_LEVEL: u64 = 19;

/// Most connections a migration's page data may take (`channels`).
pub const MAX_CHANNELS: u64 = ferry_stream::MAX_CHANNELS as u64;

/// Largest bandwidth cap, MiB/s (the CLI's `--max-bandwidth` range ends there too).
pub const MAX_BANDWIDTH_MIB_S: u64 = 1 << 40;

/// Largest per-vCPU dirty-rate limit, MiB/s (far above any vCPU's dirty rate).
pub const MAX_DIRTY_LIMIT_MIB_S: u64 = 1 << 20;

/// The migration parameters a `migrate` request asks for; a field of the wrong type or out of
/// range is refused, never replaced by its default.
fn migrate_params(req: &Value, to: &str) -> Result<MigrateParams> {
    let force_switchover = opt_bool(req, "force_switchover")?.unwrap_or(false);
    let p = migrate_params_unchecked(req, to, force_switchover)?;
    if p.channels > 1 && p.postcopy.is_some() {
        bail!("\"channels\" and \"postcopy\" do not go together yet: the post-copy page stream has one connection");
    }
    Ok(p)
}

fn migrate_params_unchecked(req: &Value, to: &str, force_switchover: bool) -> Result<MigrateParams> {
    Ok(MigrateParams {
        to: Uri::parse(to)?,
        downtime_limit: match opt_u64(req, "downtime_ms")? {
            // Stopping and restarting a guest takes time: a pause of no time cannot be honoured.
            Some(0) => bail!("\"downtime_ms\" must be at least 1: no switch-over can pause the guest for 0 ms"),
            v => Duration::from_millis(v.unwrap_or(300)),
        },
        max_bandwidth: match opt_u64(req, "max_bandwidth_mib_s")? {
            // The CLI's range: 1 MiB/s to 2^40 MiB/s (2^60 bytes/s, far beyond any link).
            Some(m @ 1..=MAX_BANDWIDTH_MIB_S) => NonZeroU64::new(m << 20),
            Some(m) => bail!("\"max_bandwidth_mib_s\" must be 1 to {MAX_BANDWIDTH_MIB_S}, not {m}"),
            None => None,
        },
        max_iterations: match (opt_u64(req, "max_iterations")?, force_switchover) {
            // No pass before the switch-over can converge: without force it could only fail.
            (Some(0), false) => {
                bail!("\"max_iterations\": 0 switches over right after the first pass: it needs \"force_switchover\"")
            }
            (Some(n), _) => {
                u32::try_from(n).map_err(|_| anyhow!("\"max_iterations\" must be at most {}, not {n}", u32::MAX))?
            }
            (None, _) => 30,
        },
        force_switchover,
        auto_converge: opt_bool(req, "auto_converge")?.unwrap_or(true),
        stall_timeout: match opt_u64(req, "stall_timeout_ms")? {
            Some(0) => bail!("\"stall_timeout_ms\" must be at least 1"),
            Some(ms) => Duration::from_millis(ms),
            None => ferry_migrate::source::DEFAULT_STALL_TIMEOUT,
        },
        copy_storage: opt_bool(req, "copy_storage")?.unwrap_or(false),
        tls: tls_of(req)?,
        postcopy: {
            use ferry_migrate::postcopy::PostcopyMode;
            let after = match opt_u64(req, "postcopy_after_iterations")? {
                Some(n @ 1..=0xffff_ffff) => Some(n as u32),
                Some(n) => bail!("\"postcopy_after_iterations\" must be 1 to {}, not {n}", u32::MAX),
                None => None,
            };
            match (opt_str(req, "postcopy")?, after) {
                (None, None) => None,
                (None | Some("always"), Some(n)) => Some(PostcopyMode::After(n)),
                (Some("always"), None) => Some(PostcopyMode::After(1)),
                (Some("auto"), None) => Some(PostcopyMode::Auto),
                (Some("auto"), Some(_)) => {
                    bail!("\"postcopy\": \"auto\" decides when to switch itself: it takes no \"postcopy_after_iterations\"")
                }
                (Some(o), _) => bail!("\"postcopy\" must be \"always\" or \"auto\", not \"{o}\""),
            }
        },
        compress: {
            use ferry_migrate::source::Compression;
            let level = match opt_u64(req, "compress_level")? {
                Some(l @ 1..=MAX_ZSTD_LEVEL) => Some(l as i32),
                Some(l) => bail!("\"compress_level\" must be 1 to {MAX_ZSTD_LEVEL}, not {l}"),
                None => None,
            };
            match (opt_str(req, "compress")?, level) {
                (None, None) => None,
                (None, Some(_)) => bail!("\"compress_level\" needs \"compress\": \"zstd\""),
                (Some("zstd"), l) => Some(Compression::Zstd { level: l.unwrap_or(1) }),
                (Some(o), _) => bail!("\"compress\" must be \"zstd\", not \"{o}\""),
            }
        },
        channels: match opt_u64(req, "channels")? {
            Some(n @ 1..=MAX_CHANNELS) => n as u32,
            Some(n) => bail!("\"channels\" must be 1 to {MAX_CHANNELS}, not {n}"),
            None => 1,
        },
        dirty_limit: match opt_u64(req, "dirty_limit_mib_s")? {
            Some(n @ 1..=MAX_DIRTY_LIMIT_MIB_S) => NonZeroU64::new(n),
            Some(n) => bail!("\"dirty_limit_mib_s\" must be 1 to {MAX_DIRTY_LIMIT_MIB_S}, not {n}"),
            None => None,
        },
    })
}

/// The TLS identity a request names (`tls_cert`, `tls_key`, `tls_ca`: all three or none),
/// loaded in this process.
fn tls_of(req: &Value) -> Result<Option<Arc<ferry_migrate::tls::Tls>>> {
    match (opt_str(req, "tls_cert")?, opt_str(req, "tls_key")?, opt_str(req, "tls_ca")?) {
        (None, None, None) => Ok(None),
        (Some(cert), Some(key), Some(ca)) => {
            let files = ferry_migrate::tls::TlsFiles {
                cert: PathBuf::from(cert),
                key: PathBuf::from(key),
                ca: PathBuf::from(ca),
                allow: Vec::new(),
            };
            Ok(Some(Arc::new(ferry_migrate::tls::Tls::load(&files)?)))
        }
        _ => bail!("TLS needs all three of \"tls_cert\", \"tls_key\" and \"tls_ca\""),
    }
}

/// An optional field, read by `get`: absent or `null` is `None`; present with any other type
/// is an error naming the field and what it must be (never silently the default).
fn opt<'a, T>(req: &'a Value, name: &str, get: fn(&'a Value) -> Option<T>, what: &str) -> Result<Option<T>> {
    match req.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => get(v).map(Some).ok_or_else(|| anyhow!("\"{name}\" must be {what}, not {v}")),
    }
}

fn opt_u64(req: &Value, name: &str) -> Result<Option<u64>> {
    opt(req, name, Value::as_u64, "a non-negative integer")
}

fn opt_bool(req: &Value, name: &str) -> Result<Option<bool>> {
    opt(req, name, Value::as_bool, "true or false")
}

fn opt_str<'a>(req: &'a Value, name: &str) -> Result<Option<&'a str>> {
    opt(req, name, Value::as_str, "a string")
}

fn field_u64(req: &Value, name: &str) -> Result<u64> {
    req.get(name).and_then(Value::as_u64).ok_or_else(|| anyhow!("request needs a numeric \"{name}\""))
}

fn handle(req: &Value, ctx: &ApiContext) -> Result<Value> {
    let cmd = match req.get("cmd") {
        None => bail!("request has no \"cmd\""),
        Some(c) => c.as_str().ok_or_else(|| anyhow!("\"cmd\" must be a string naming a command, not {c}"))?,
    };
    // One state change at a time: the checks below and the change they guard happen under the
    // lock a migration takes to start, so neither can slip between the other's check and act.
    // Queries (status, dirty-rate, memory-read) never wait for it.
    let _state = if matches!(cmd, "pause" | "resume" | "snapshot" | "memory-write" | "replicate") {
        Some(ctx.state_lock.lock().map_err(|_| anyhow!("the API's state lock is poisoned"))?)
    } else {
        None
    };
    // Running or stopping the guest while it is moving (or after it moved) would let it run in
    // two places, or run after its final pass was taken.
    if matches!(cmd, "pause" | "resume" | "snapshot" | "memory-write" | "migrate" | "update" | "replicate")
        && ctx.replicating.load(Ordering::SeqCst)
    {
        bail!("replication to a backup is running; {cmd} after `ferry replicate-stop`");
    }
    if matches!(cmd, "pause" | "snapshot" | "replicate" | "update") {
        refuse_during_postcopy(cmd)?;
    }
    if matches!(cmd, "pause" | "resume" | "snapshot" | "memory-write" | "replicate") {
        if ctx.migrated.load(Ordering::SeqCst) {
            bail!("the guest has migrated away; this Ferry is exiting");
        }
        if ctx.migrating.load(Ordering::SeqCst) {
            bail!("a migration is running; {cmd} after it (or cancel it with migrate-cancel)");
        }
    }
    match cmd {
        "status" => Ok(json!({
            "state": if ctx.paused.load(Ordering::SeqCst) { "paused" } else { "running" },
            "vcpus": ctx.vm.vcpu_count(),
            "memory": ctx.vm.ram().size(),
            "disks": ctx.vm.disk_stats(),
            "broken_pages": ctx.vm.ram().poison().list().iter()
                .map(|(g, c)| json!({"gpa": g * 4096, "cause": c}))
                .collect::<Vec<_>>(),
            "sigbus": ferry_vmm::poison::sigbus_stats(),
            "replication": ctx.replication.lock().ok().and_then(|r| r.as_ref().map(|r| r.report(&ctx.vm))),
        })),
        "replicate" => replicate(req, ctx),
        "replicate-stop" => {
            let mut slot = ctx.replication.lock().map_err(|_| anyhow!("replication state lock poisoned"))?;
            let r = slot.as_mut().filter(|r| r.thread.is_some()).ok_or_else(|| anyhow!("no replication is running"))?;
            r.stop.store(true, Ordering::SeqCst);
            if let Some(t) = r.thread.take() {
                let _ = t.join();
            }
            Ok(json!({ "replication": r.report(&ctx.vm) }))
        }
        "seccomp-probe" => {
            use ferry_vmm::seccomp::ThreadKind;
            let kind = match opt_str(req, "thread")? {
                Some("vcpu") => ThreadKind::Vcpu,
                Some("device") => ThreadKind::Device,
                Some("process") => ThreadKind::Process,
                other => bail!("\"thread\" must be vcpu, device or process, not {other:?}"),
            };
            let r = ferry_vmm::seccomp::probe(kind).context("cannot start the probe thread")?;
            Ok(json!({ "result": r, "mode": format!("{:?}", ferry_vmm::seccomp::mode()).to_lowercase() }))
        }
        "poison" => {
            let gpa = field_u64(req, "gpa")?;
            let announce = opt_bool(req, "announce")?.unwrap_or(true);
            let page = match opt(req, "at", Value::as_str, "\"now\" or \"final-pass\"")? {
                None | Some("now") => ctx.vm.poison_gpa(gpa, announce)?,
                Some("final-pass") => ctx.vm.poison_at_final_pass(gpa, announce)?,
                Some(other) => bail!("\"at\" must be \"now\" or \"final-pass\", not \"{other}\""),
            };
            Ok(json!({ "gpa": page }))
        }
        "pause" => {
            ctx.vm.pause()?;
            ctx.paused.store(true, Ordering::SeqCst);
            ctx.publish(json!({"event": "state", "state": "paused"}));
            Ok(json!({}))
        }
        "resume" => {
            // A guest paused because its backup was lost runs unprotected from here: the output
            // it held for its last checkpoint goes out.
            ctx.vm.set_output_commit(false);
            // Disks left quiesced by a handover that ended unknown (the operator decides here
            // that the guest runs on this side).
            ctx.vm.resume_disks()?;
            ctx.vm.resume()?;
            ctx.paused.store(false, Ordering::SeqCst);
            ctx.publish(json!({"event": "state", "state": "running"}));
            Ok(json!({}))
        }
        "migrate-cancel" => {
            if !ctx.migrating.load(Ordering::SeqCst) {
                bail!("no migration is running");
            }
            ctx.cancel.store(true, Ordering::SeqCst);
            Ok(json!({}))
        }
        "snapshot" => {
            let to = req.get("to").and_then(Value::as_str).ok_or_else(|| anyhow!("snapshot needs \"to\""))?;
            let params = ferry_migrate::snapshot::SnapshotParams {
                path: PathBuf::from(to),
                live: opt_bool(req, "live")?.unwrap_or(false),
                stop: opt_bool(req, "stop")?.unwrap_or(false),
                incremental_from: opt_str(req, "incremental_from")?.map(PathBuf::from),
            };
            let mut tracker = ctx
                .snapshots
                .try_lock()
                .map_err(|_| anyhow!("another snapshot or a migration is running; snapshot after it"))?;
            let already_paused = ctx.paused.load(Ordering::SeqCst);
            let summary =
                ferry_migrate::snapshot::snapshot(&ctx.vm, &params, &mut tracker, already_paused, &ctx.cancel)?;
            if params.stop {
                ctx.paused.store(true, Ordering::SeqCst);
            }
            Ok(json!({ "summary": summary }))
        }
        "dirty-rate" => {
            let ms = opt_u64(req, "window_ms")?.unwrap_or(1000);
            if !(10..=60_000).contains(&ms) {
                bail!("dirty-rate window of {ms} ms: use 10 to 60000 ms");
            }
            let r = ferry_vmm::dirty_rate::measure(&ctx.vm, Duration::from_millis(ms))?;
            Ok(json!({ "dirty_rate": r }))
        }
        // The exit itself happens after the reply is written (see handle_conn).
        "quit" => Ok(json!({})),
        "memory-read" => {
            let gpa = field_u64(req, "gpa")?;
            let len = field_u64(req, "len")?;
            if len > 1 << 20 {
                bail!("memory-read of {len} bytes: at most 1 MiB per request");
            }
            let mut buf = vec![0u8; len as usize];
            // Never through a broken page (an error naming it instead).
            ctx.vm.ram().copy_out(gpa, &mut buf)?;
            Ok(json!({ "hex": hex_encode(&buf) }))
        }
        "memory-write" => {
            let gpa = field_u64(req, "gpa")?;
            let hex = req.get("hex").and_then(Value::as_str).ok_or_else(|| anyhow!("request needs \"hex\""))?;
            let bytes = hex_decode(hex)?;
            ctx.vm.write_guest(gpa, &bytes)?;
            Ok(json!({ "written": bytes.len() }))
        }
        other => bail!("unknown command \"{other}\""),
    }
}

/// A replication started by the API: its thread, stop flag and figures.
pub(crate) struct Replication {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<ferry_migrate::replicate::ReplicationStats>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Replication {
    pub(crate) fn report(&self, vm: &Vm) -> ferry_migrate::replicate::ReplicationReport {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).report(vm)
    }
}

/// What the primary does when its backup is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BackupLoss {
    /// Pause the guest (no split brain; output stays held until the API resumes it).
    Stop,
    /// Run on unprotected (its held output goes out).
    Continue,
}

/// Starts replication to a standby; answers once the guest is protected (the first checkpoint
/// acknowledged) or the initial copy failed. Replication goes on in its own thread.
fn replicate(req: &Value, ctx: &ApiContext) -> Result<Value> {
    use ferry_migrate::replicate::{self as repl, ReplState};
    let to = req.get("to").and_then(Value::as_str).ok_or_else(|| anyhow!("replicate needs \"to\""))?;
    let interval = opt_u64(req, "interval_ms")?.unwrap_or(25);
    if !(1..=60_000).contains(&interval) {
        bail!("\"interval_ms\" must be 1 to 60000, not {interval}");
    }
    let policy = match opt_str(req, "on_backup_loss")? {
        None | Some("stop") => BackupLoss::Stop,
        Some("continue") => BackupLoss::Continue,
        Some(o) => bail!("\"on_backup_loss\" must be \"stop\" or \"continue\", not \"{o}\""),
    };
    let ms = |name: &str, default: u64| -> Result<Duration> {
        match opt_u64(req, name)? {
            Some(0) => bail!("\"{name}\" must be at least 1"),
            v => Ok(Duration::from_millis(v.unwrap_or(default))),
        }
    };
    let params = repl::ReplicateParams {
        to: Uri::parse(to)?,
        interval: Duration::from_millis(interval),
        ack_timeout: ms("ack_timeout_ms", 1000)?,
        stall_timeout: ms("stall_timeout_ms", 10_000)?,
        tls: tls_of(req)?,
    };
    if ctx.paused.load(Ordering::SeqCst) {
        bail!("the VM is paused by the API; resume it before replicating");
    }
    if ctx.migrating.load(Ordering::SeqCst) {
        bail!("a migration is running; replicate after it");
    }
    let mut slot = ctx.replication.lock().map_err(|_| anyhow!("replication state lock poisoned"))?;
    if slot.as_ref().is_some_and(|r| r.thread.is_some() && !r.thread.as_ref().is_some_and(|t| t.is_finished())) {
        bail!("replication is already running (replicate-stop ends it)");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Mutex::new(repl::ReplicationStats::default()));
    let (tx, rx) = std::sync::mpsc::channel::<Result<Value, String>>();
    ctx.replicating.store(true, Ordering::SeqCst);
    let (vm, paused, replicating) = (ctx.vm.clone(), ctx.paused.clone(), ctx.replicating.clone());
    let (events, started) = (ctx.events.clone(), ctx.started);
    let publish = move |ev: Value| events.publish(started, ev);
    let (stop2, stats2) = (stop.clone(), stats.clone());
    let thread = std::thread::Builder::new().name("replicate".into()).spawn(move || {
        let mut was_protected = false;
        let r = repl::replicate(&vm, &params, &stop2, &stats2, &mut |report| {
            was_protected = true;
            publish(json!({"event": "replication-protected", "to": report.to}));
            let _ = tx.send(Ok(json!({ "replication": report })));
        });
        let set = |s: ReplState, e: Option<String>| stats2.lock().unwrap_or_else(|p| p.into_inner()).set_state(s, e);
        match r {
            Ok(()) => {
                vm.set_output_commit(false);
                publish(json!({"event": "replication-stopped"}));
            }
            Err(e) if !was_protected => {
                vm.set_output_commit(false);
                let msg = format!("{:#}", anyhow::Error::new(e));
                set(ReplState::Failed, Some(msg.clone()));
                publish(json!({"event": "replication-failed", "error": msg}));
                let _ = tx.send(Err(msg));
            }
            Err(e) => {
                let msg = format!("{:#}", anyhow::Error::new(e));
                set(ReplState::Unprotected, Some(msg.clone()));
                publish(json!({
                    "event": "replication-backup-lost",
                    "error": msg,
                    "policy": if policy == BackupLoss::Stop { "stop" } else { "continue" },
                }));
                match policy {
                    BackupLoss::Stop => {
                        let _ = vm.pause();
                        paused.store(true, Ordering::SeqCst);
                        say!(
                            "ferry: the backup is lost ({msg}); the guest is PAUSED (--on-backup-loss stop), its output \
                             since the last checkpoint held: `ferry api resume` runs it unprotected"
                        );
                    }
                    BackupLoss::Continue => {
                        vm.set_output_commit(false);
                        say!(
                            "ferry: the backup is lost ({msg}); the guest runs UNPROTECTED (--on-backup-loss continue)"
                        );
                    }
                }
            }
        }
        replicating.store(false, Ordering::SeqCst);
    })?;
    *slot = Some(Replication { stop, stats, thread: Some(thread) });
    drop(slot);
    match rx.recv() {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => bail!("replication failed; the guest runs on here unprotected: {e}"),
        Err(_) => bail!("replication ended before the guest was protected"),
    }
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Hex digits to bytes. Works on bytes, not `str` slices: a non-ASCII character (several
/// bytes) is an error naming its offset, never a slice through the middle of it.
fn hex_decode(s: &str) -> Result<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        bail!("hex string has an odd length");
    }
    let digit = |i: usize| -> Result<u8> {
        let c = b[i];
        (c as char).to_digit(16).filter(|_| c.is_ascii()).map(|d| d as u8).ok_or_else(|| {
            anyhow!(
                "bad hex at offset {i}: {}",
                if c.is_ascii() { format!("'{}'", c as char) } else { "a non-ASCII byte".into() }
            )
        })
    };
    (0..b.len()).step_by(2).map(|i| Ok(digit(i)? << 4 | digit(i + 1)?)).collect()
}

/// Sends one request and returns the reply (errors become `Err`).
pub fn call(socket: &Path, req: &Value) -> Result<Value> {
    let conn =
        UnixStream::connect(socket).with_context(|| format!("cannot connect to API socket {}", socket.display()))?;
    let mut w = conn.try_clone()?;
    writeln!(w, "{req}")?;
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line)?;
    let v: Value = serde_json::from_str(&line).with_context(|| format!("bad reply from Ferry: {line:?}"))?;
    if v.get("ok") != Some(&json!(true)) {
        bail!("{}", v.get("error").and_then(Value::as_str).unwrap_or("request failed"));
    }
    Ok(v)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn params(req: Value) -> Result<MigrateParams> {
        migrate_params(&req, "unix:/tmp/x")
    }

    #[test]
    fn migrate_request_defaults_apply_only_to_absent_fields() {
        let p = params(json!({})).unwrap();
        assert_eq!(p.downtime_limit, Duration::from_millis(300));
        assert_eq!(p.max_bandwidth, None);
        assert_eq!(p.max_iterations, 30);
        assert!(!p.force_switchover && p.auto_converge);
        assert_eq!(p.stall_timeout, ferry_migrate::source::DEFAULT_STALL_TIMEOUT);
        let p = params(json!({"downtime_ms": 20, "max_bandwidth_mib_s": 32, "max_iterations": 0,
            "force_switchover": true, "auto_converge": false, "stall_timeout_ms": 1500}))
        .unwrap();
        assert_eq!(p.downtime_limit, Duration::from_millis(20));
        assert_eq!(p.max_bandwidth.map(NonZeroU64::get), Some(32 << 20));
        assert_eq!(p.max_iterations, 0);
        assert!(p.force_switchover && !p.auto_converge);
        assert_eq!(p.stall_timeout, Duration::from_millis(1500));
    }

    #[test]
    fn migrate_request_fields_of_the_wrong_type_or_out_of_range_are_refused_by_name() {
        let cases = [
            (json!({"max_iterations": "5"}), "max_iterations"),
            (json!({"max_iterations": -1}), "max_iterations"),
            (json!({"max_iterations": 1u64 << 32}), "max_iterations"),
            (json!({"downtime_ms": 1.5}), "downtime_ms"),
            (json!({"downtime_ms": 0}), "downtime_ms"),
            (json!({"force_switchover": "yes"}), "force_switchover"),
            (json!({"auto_converge": 1}), "auto_converge"),
            (json!({"max_bandwidth_mib_s": 0}), "max_bandwidth_mib_s"),
            (json!({"max_bandwidth_mib_s": MAX_BANDWIDTH_MIB_S + 1}), "max_bandwidth_mib_s"),
            (json!({"stall_timeout_ms": 0}), "stall_timeout_ms"),
            (json!({"max_iterations": 0}), "force_switchover"),
            (json!({"compress": "lz4"}), "\"compress\" must be \"zstd\""),
            (json!({"compress": "zstd", "compress_level": 0}), "compress_level"),
            (json!({"compress": "zstd", "compress_level": MAX_ZSTD_LEVEL + 1}), "compress_level"),
            (json!({"compress_level": 3}), "needs \"compress\""),
            (json!({"channels": 0}), "\"channels\" must be 1 to 16"),
            (json!({"channels": MAX_CHANNELS + 1}), "\"channels\" must be 1 to 16"),
            (json!({"channels": "2"}), "channels"),
            (json!({"channels": 2, "postcopy": "always"}), "do not go together"),
            (json!({"dirty_limit_mib_s": 0}), "\"dirty_limit_mib_s\" must be 1 to"),
            (json!({"dirty_limit_mib_s": "8"}), "dirty_limit_mib_s"),
        ];
        for (req, field) in cases {
            let e = match params(req.clone()) {
                Ok(_) => panic!("{req} was accepted"),
                Err(e) => format!("{e:#}"),
            };
            assert!(e.contains(field), "{req}: {e}");
        }
        assert!(params(json!({"max_bandwidth_mib_s": MAX_BANDWIDTH_MIB_S})).is_ok());
        use ferry_migrate::source::Compression;
        assert_eq!(params(json!({})).unwrap().compress, None);
        assert_eq!(params(json!({"compress": "zstd"})).unwrap().compress, Some(Compression::Zstd { level: 1 }));
        let p = params(json!({"compress": "zstd", "compress_level": 7})).unwrap();
        assert_eq!(p.compress, Some(Compression::Zstd { level: 7 }));
        assert_eq!(params(json!({})).unwrap().channels, 1);
        assert_eq!(params(json!({"channels": 4})).unwrap().channels, 4);
        assert_eq!(params(json!({"dirty_limit_mib_s": 8})).unwrap().dirty_limit.map(|l| l.get()), Some(8));
        assert_eq!(params(json!({})).unwrap().dirty_limit, None);
    }

    #[test]
    fn a_field_the_command_does_not_take_is_refused_by_name() {
        let e = check_fields(&json!({"cmd": "migrate", "to": "unix:/x", "max_bandwidth": 100})).unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("unknown field \"max_bandwidth\" for migrate") && e.contains("max_bandwidth_mib_s"), "{e}");
        let e = format!("{:#}", check_fields(&json!({"cmd": "pause", "now": true})).unwrap_err());
        assert!(e.contains("unknown field \"now\" for pause (it takes none)"), "{e}");
        assert!(format!("{:#}", check_fields(&json!([1])).unwrap_err()).contains("JSON object"));
        // Every field a command reads is allowed; an unknown command is left to the dispatch.
        check_fields(&json!({"cmd": "migrate", "to": "unix:/x", "downtime_ms": 1, "max_bandwidth_mib_s": 1,
            "max_iterations": 1, "force_switchover": true, "auto_converge": false, "stall_timeout_ms": 1}))
        .unwrap();
        check_fields(&json!({"cmd": "snapshot", "to": "/x", "live": true, "stop": false, "incremental_from": "/y"}))
            .unwrap();
        check_fields(&json!({"cmd": "dirty-rate", "window_ms": 100})).unwrap();
        check_fields(&json!({"cmd": "memory-read", "gpa": 0, "len": 1})).unwrap();
        check_fields(&json!({"cmd": "memory-write", "gpa": 0, "hex": "00"})).unwrap();
        check_fields(&json!({"cmd": "no-such", "x": 1})).unwrap();
    }

    #[test]
    fn optional_fields_are_absent_when_missing_or_null_and_refused_when_mistyped() {
        let req = json!({"n": 7, "b": true, "s": "x", "null": null, "wrong": [1]});
        assert_eq!(opt_u64(&req, "n").unwrap(), Some(7));
        assert_eq!(opt_bool(&req, "b").unwrap(), Some(true));
        assert_eq!(opt_str(&req, "s").unwrap(), Some("x"));
        assert_eq!(opt_u64(&req, "missing").unwrap(), None);
        assert_eq!(opt_str(&req, "null").unwrap(), None);
        for e in [
            opt_u64(&req, "wrong").map(|_| ()),
            opt_bool(&req, "wrong").map(|_| ()),
            opt_str(&req, "wrong").map(|_| ()),
        ] {
            let e = format!("{:#}", e.unwrap_err());
            assert!(e.contains("\"wrong\"") && e.contains("[1]"), "{e}");
        }
    }
}
