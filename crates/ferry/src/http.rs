//! REST over the API socket: HTTP/1.1 on the same UNIX socket as the JSON-lines protocol
//! (docs/api/openapi.yaml is the contract; `curl --unix-socket S http://localhost/api/v1/vm.info`).
//!
//! A connection whose first line is an HTTP request line is served here, one request per
//! connection (`Connection: close`); anything else is the JSON-lines protocol (api.rs). Each
//! route maps onto the same commands the JSON API runs, so both stay one implementation.
//! Requests (parsed in request.rs): a JSON body of at most [`crate::request::MAX_REQUEST`] bytes (`Content-Length`;
//! chunked bodies are refused), unknown fields refused. Errors: 4xx with `{"error": "..."}`.
//!
//! The parsing is written here rather than taken from a server crate: the socket is shared with
//! the JSON-lines protocol, so the server must be handed a connection whose first line it has
//! already read, which the threaded servers (tiny_http, micro_http) do not take; what is parsed
//! is a request line, `Content-Length` and a body.

use std::io::{BufRead, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::api::ApiContext;

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        501 => "Not Implemented",
        _ => "Error",
    }
}

fn respond(out: &mut UnixStream, code: u16, body: &Value) -> std::io::Result<()> {
    let b = body.to_string();
    write!(
        out,
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
        reason(code),
        b.len()
    )?;
    out.flush()
}

fn error(out: &mut UnixStream, code: u16, msg: impl std::fmt::Display) -> std::io::Result<()> {
    respond(out, code, &json!({ "error": msg.to_string() }))
}

/// The status of an error from a command: a state conflict (409) or a bad request (400).
fn status_of(msg: &str) -> u16 {
    let conflict = [
        "is running",
        "already running",
        "is paused",
        "migrated away",
        "no migration",
        "no replication",
        "still arriving",
        "no interrupted post-copy",
    ];
    if conflict.iter().any(|c| msg.contains(c)) {
        409
    } else {
        400
    }
}

/// Serves one HTTP request whose request line is `first`.
pub fn serve(
    first: &str,
    reader: &mut impl BufRead,
    out: &mut UnixStream,
    ctx: &Arc<ApiContext>,
) -> std::io::Result<()> {
    let req = match crate::request::parse_http(first, reader)? {
        Ok(r) => r,
        Err(r) => return error(out, r.code, r.message),
    };
    let (path, mut fields) = (req.path.as_str(), req.fields);
    if path == "/metrics" {
        return metrics(out, ctx);
    }
    let cmd = match path.trim_start_matches("/api/v1/") {
        "vm.info" => return respond(out, 200, &info(ctx)),
        "vm.migration" => {
            let m = ctx.migration.lock().map(|m| m.clone()).unwrap_or(Value::Null);
            return respond(out, 200, &m);
        }
        "events" => return events(out, ctx),
        "vm.migrate" => return migrate(out, ctx, fields),
        "vm.migrate-resume" => return migrate_resume(out, ctx, fields),
        "vm.shutdown" => "quit",
        other => other.trim_start_matches("vm."),
    };
    fields["cmd"] = json!(cmd);
    match crate::api::run_command(&fields, ctx) {
        Ok(mut v) => {
            if let Some(o) = v.as_object_mut() {
                o.remove("ok");
            }
            respond(out, 200, &v)?;
            if cmd == "quit" {
                ctx.vm.request_exit(ferry_vmm::ExitReason::Stopped);
            }
            Ok(())
        }
        Err(e) => {
            let msg = format!("{e:#}");
            error(out, status_of(&msg), msg)
        }
    }
}

fn info(ctx: &ApiContext) -> Value {
    json!({
        "state": ctx.state_name(),
        "migrating": ctx.migrating.load(Ordering::SeqCst),
        "vcpus": ctx.vm.vcpu_count(),
        "memory": ctx.vm.ram().size(),
        "disks": ctx.vm.disks().iter().map(|d| json!({
            "path": d.image().path().display().to_string(),
            "bytes": d.image().bytes(),
            "readonly": d.image().readonly(),
        })).collect::<Vec<_>>(),
        "ferry_version": env!("CARGO_PKG_VERSION"),
        "stream_format": {"writes": ferry_stream::FORMAT_VERSION, "reads": [ferry_stream::MIN_FORMAT_VERSION, ferry_stream::FORMAT_VERSION]},
    })
}

/// Starts a migration and answers 202 at once; `GET vm.migration` and the events follow it.
/// After it completes Ferry answers for [`LINGER`] more (the guest runs elsewhere), then exits.
fn migrate(out: &mut UnixStream, ctx: &Arc<ApiContext>, mut fields: Value) -> std::io::Result<()> {
    fields["cmd"] = json!("migrate");
    if let Err(e) = crate::api::check_migrate(&fields, ctx) {
        let msg = format!("{e:#}");
        return error(out, status_of(&msg), msg);
    }
    let to = fields["to"].clone();
    // Active from the answer on: a GET right after the 202 must not see the previous status.
    if let Ok(mut m) = ctx.migration.lock() {
        *m = json!({"status": "active", "to": to, "iteration": 0});
    }
    let ctx2 = ctx.clone();
    let started = std::thread::Builder::new().name("migrate".into()).spawn(move || {
        let reply = crate::api::migrate(&fields, &ctx2, &mut |_| {});
        if reply["ok"] == json!(true) {
            std::thread::sleep(LINGER);
            ctx2.vm.request_exit(ferry_vmm::ExitReason::Migrated);
        }
    });
    if let Err(e) = started {
        return error(out, 409, format!("cannot start the migration: {e}"));
    }
    respond(out, 202, &json!({"status": "active", "to": to}))
}

/// Resumes an interrupted post-copy over a new connection; answers 202 at once (`GET
/// vm.migration` and the events follow it), 409 when there is none to resume.
fn migrate_resume(out: &mut UnixStream, ctx: &Arc<ApiContext>, mut fields: Value) -> std::io::Result<()> {
    fields["cmd"] = json!("migrate-resume");
    if let Err(e) = crate::request::check_fields(&fields) {
        return error(out, 400, format!("{e:#}"));
    }
    if !ctx.postcopy_pending() {
        return error(out, 409, "no interrupted post-copy here to resume");
    }
    if fields["to"].as_str().is_none() {
        return error(out, 400, "migrate-resume needs \"to\" (a string)");
    }
    let to = fields["to"].clone();
    let ctx2 = ctx.clone();
    let started = std::thread::Builder::new().name("migrate-resume".into()).spawn(move || {
        let reply = crate::api::migrate_resume(&fields, &ctx2, &mut |_| {});
        if reply["ok"] == json!(true) {
            std::thread::sleep(LINGER);
            ctx2.vm.request_exit(ferry_vmm::ExitReason::Migrated);
        }
    });
    if let Err(e) = started {
        return error(out, 409, format!("cannot resume the post-copy: {e}"));
    }
    respond(out, 202, &json!({"status": "postcopy-active", "to": to}))
}

/// `GET /metrics`: Prometheus text exposition.
fn metrics(out: &mut UnixStream, ctx: &ApiContext) -> std::io::Result<()> {
    use std::fmt::Write as _;
    let mut m = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
        let _ = writeln!(m, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(m, "{name}{labels} {v}");
        }
    };
    let c = ctx.counters.lock().map(|c| c.clone()).unwrap_or_default();
    metric("ferry_up", "gauge", "1 while this Ferry serves", &[("", 1.0)]);
    metric(
        "ferry_vm_paused",
        "gauge",
        "1 when the API paused the guest",
        &[("", ctx.paused.load(Ordering::SeqCst) as u8 as f64)],
    );
    metric("ferry_guest_memory_bytes", "gauge", "guest RAM", &[("", ctx.vm.ram().size() as f64)]);
    metric("ferry_vcpus", "gauge", "vCPUs", &[("", ctx.vm.vcpu_count() as f64)]);
    let e = ferry_vmm::vcpu::exit_counts();
    metric(
        "ferry_vcpu_exits_total",
        "counter",
        "vCPU exits by kind",
        &[
            ("{kind=\"pio\"}", e[0] as f64),
            ("{kind=\"mmio\"}", e[1] as f64),
            ("{kind=\"halt_or_interrupt\"}", e[2] as f64),
            ("{kind=\"other\"}", e[3] as f64),
        ],
    );
    metric(
        "ferry_migrations_total",
        "counter",
        "migrations by result",
        &[
            ("{result=\"completed\"}", c.migrations_completed as f64),
            ("{result=\"failed\"}", c.migrations_failed as f64),
            ("{result=\"cancelled\"}", c.migrations_cancelled as f64),
        ],
    );
    metric(
        "ferry_migration_bytes_total",
        "counter",
        "stream bytes of completed migrations",
        &[("", c.migration_bytes as f64)],
    );
    metric("ferry_migration_downtime_ms", "gauge", "the last completed migration's pause", &[("", c.last_downtime_ms)]);
    metric(
        "ferry_dirty_rate_pages_per_second",
        "gauge",
        "the guest's dirty rate at the last migration pass",
        &[("", c.last_dirty_rate_pages_s)],
    );
    let disks = ctx.vm.disk_stats();
    let per_disk = |f: fn(&ferry_vmm::devices::virtio_blk::BlockStats) -> u64| -> Vec<(String, f64)> {
        disks.iter().enumerate().map(|(i, d)| (format!("{{disk=\"{i}\"}}"), f(d) as f64)).collect()
    };
    for (name, help, f) in [
        (
            "ferry_disk_requests_total",
            "virtio-blk requests",
            (|d: &ferry_vmm::devices::virtio_blk::BlockStats| d.requests) as fn(&_) -> u64,
        ),
        ("ferry_disk_read_bytes_total", "bytes read by the guest", |d| d.bytes_read),
        ("ferry_disk_written_bytes_total", "bytes written by the guest", |d| d.bytes_written),
    ] {
        let v = per_disk(f);
        let s: Vec<(&str, f64)> = v.iter().map(|(l, x)| (l.as_str(), *x)).collect();
        metric(name, "counter", help, &s);
    }
    metric(
        "ferry_broken_pages",
        "gauge",
        "guest pages known broken (poisoned)",
        &[("", ctx.vm.ram().poison().list().len() as f64)],
    );
    if let Some(r) = ctx.replication.lock().ok().and_then(|r| r.as_ref().map(|r| r.report(&ctx.vm))) {
        metric(
            "ferry_replication_protected",
            "gauge",
            "1 while every checkpoint is acknowledged",
            &[("", r.protected as u8 as f64)],
        );
        metric("ferry_replication_epochs_total", "counter", "checkpoints acknowledged", &[("", r.epochs as f64)]);
        metric(
            "ferry_replication_pause_ms",
            "gauge",
            "guest pause per epoch",
            &[("{quantile=\"0.5\"}", r.pause_ms_p50), ("{quantile=\"0.99\"}", r.pause_ms_p99)],
        );
        metric(
            "ferry_replication_output_held_bytes",
            "gauge",
            "console output held for output commit",
            &[("", r.output_held_bytes as f64)],
        );
    }
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{m}",
        m.len()
    )?;
    out.flush()
}

/// How long a source whose guest left answers before it exits (for `GET vm.migration`).
const LINGER: Duration = Duration::from_secs(2);

/// `GET /api/v1/events`: one JSON event a line, as they happen, until the client goes.
fn events(out: &mut UnixStream, ctx: &ApiContext) -> std::io::Result<()> {
    let rx = ctx.subscribe();
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n"
    )?;
    writeln!(out, "{}", json!({"event": "state", "state": ctx.state_name()}))?;
    out.flush()?;
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(ev) => {
                writeln!(out, "{ev}")?;
                out.flush()?;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                // Finds a client that went away (the write fails) and ends with the machine.
                if ctx.vm.exit_reason().is_some() {
                    return Ok(());
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::request::{is_request_line, ROUTES};

    /// No drift: the OpenAPI document names exactly the routes served, with their methods.
    #[test]
    fn the_openapi_document_names_every_route_and_no_other() {
        let doc = include_str!("../../../docs/api/openapi.yaml");
        let mut documented = Vec::new();
        let mut path = None;
        for l in doc.lines() {
            if let Some(p) = l.strip_prefix("  /").and_then(|p| p.strip_suffix(':')) {
                path = Some(format!("/{p}"));
            } else if !l.starts_with("    ") && !l.starts_with("  /") && !l.trim().is_empty() {
                path = None;
            }
            if let (Some(p), Some(m)) = (&path, l.strip_prefix("    ").and_then(|m| m.strip_suffix(':'))) {
                if ["get", "put", "post", "delete", "patch"].contains(&m) {
                    documented.push((m.to_ascii_uppercase(), p.clone()));
                }
            }
        }
        let mut served: Vec<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
        documented.sort();
        served.sort();
        assert_eq!(documented, served, "docs/api/openapi.yaml and request::ROUTES differ");
    }

    #[test]
    fn request_lines_are_told_from_json_lines() {
        assert!(is_request_line("GET /api/v1/vm.info HTTP/1.1\r\n"));
        assert!(is_request_line("PUT /api/v1/vm.pause HTTP/1.0\n"));
        assert!(!is_request_line("{\"cmd\":\"status\"}\n"));
        assert!(!is_request_line("GET /x\n"));
        assert!(!is_request_line("get /x HTTP/1.1\n"));
    }
}
