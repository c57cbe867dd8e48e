//! The CLI's side of the REST API (crate::http, docs/api/openapi.yaml): one request per
//! connection over the API socket, and the events feed. The CLI drives a VM through the same
//! routes `curl --unix-socket` does, so what the CLI can do, a script can.
//!
//! The requests are a few lines of HTTP/1.1 with a JSON body and a `Content-Length` reply;
//! an HTTP client crate (hyper, ureq) would bring an async runtime or TLS stacks for that, and
//! none of them speaks to a UNIX socket without a connector of its own.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

fn connect(socket: &Path) -> Result<UnixStream> {
    UnixStream::connect(socket).with_context(|| format!("cannot connect to API socket {}", socket.display()))
}

fn send(conn: &mut UnixStream, method: &str, path: &str, body: Option<&Value>) -> Result<()> {
    let b = body.map(Value::to_string).unwrap_or_default();
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
        b.len()
    )?;
    conn.flush()?;
    Ok(())
}

/// Reads a status line and headers; returns the status and the Content-Length, if any.
fn read_head(r: &mut impl BufRead) -> Result<(u16, Option<usize>)> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        bail!("Ferry closed the API connection before answering (did its process die?)");
    }
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| anyhow!("not an HTTP answer from the API socket: {:?}", line.trim_end()))?;
    let mut len = None;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
            return Ok((status, len));
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().ok();
            }
        }
    }
}

/// One request; the reply's JSON body, or an error carrying the message Ferry gave.
pub fn request(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    let mut conn = connect(socket)?;
    send(&mut conn, method, path, body)?;
    let mut r = BufReader::new(conn);
    let (status, len) = read_head(&mut r)?;
    let mut b = Vec::new();
    match len {
        Some(n) => {
            b.resize(n, 0);
            r.read_exact(&mut b)?;
        }
        None => {
            r.read_to_end(&mut b)?;
        }
    }
    let v: Value = if b.is_empty() { Value::Null } else { serde_json::from_slice(&b)? };
    if status >= 400 {
        bail!("{}", v.get("error").and_then(Value::as_str).unwrap_or("request failed"));
    }
    Ok(v)
}

/// `GET /api/v1/events`: one JSON event a line, from the moment it is open.
pub struct Events {
    r: BufReader<UnixStream>,
    line: String,
}

impl Events {
    /// Opens the feed; once this returns, every later event reaches it.
    pub fn open(socket: &Path) -> Result<Events> {
        let mut conn = connect(socket)?;
        send(&mut conn, "GET", "/api/v1/events", None)?;
        let mut r = BufReader::new(conn);
        let (status, _) = read_head(&mut r)?;
        if status != 200 {
            bail!("the events feed answered {status}");
        }
        let mut e = Events { r, line: String::new() };
        // The first line (the machine's state) comes once the subscription is in place.
        e.next(Duration::from_secs(10))?.ok_or_else(|| anyhow!("the events feed said nothing"))?;
        Ok(e)
    }

    /// The next event, or None after `timeout` without one.
    pub fn next(&mut self, timeout: Duration) -> Result<Option<Value>> {
        self.r.get_ref().set_read_timeout(Some(timeout))?;
        match self.r.read_line(&mut self.line) {
            Ok(0) => bail!("Ferry closed the events feed (did its process die?)"),
            Ok(_) if self.line.ends_with('\n') => {
                let v = serde_json::from_str(self.line.trim_end());
                self.line.clear();
                Ok(Some(v.context("a bad line on the events feed")?))
            }
            // A part of a line: the rest comes with the next read.
            Ok(_) => Ok(None),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// How a migration (or a resumed post-copy) followed on the events feed ended.
pub enum Outcome {
    Completed(Value),
    Failed(String),
}

/// Follows a migration on `events` until it ends: each progress event (in the form the
/// engine reports it, `{"event":"iteration",…}`) goes to `progress`; `tick` runs at least every
/// 200 ms (Ctrl-C handling).
pub fn follow_migration(
    events: &mut Events,
    progress: &mut dyn FnMut(&Value),
    tick: &mut dyn FnMut(),
) -> Result<Outcome> {
    loop {
        tick();
        let Some(ev) = events.next(Duration::from_millis(200))? else { continue };
        match ev["event"].as_str().unwrap_or("") {
            "migration-progress" => {
                let mut p = ev.clone();
                p["event"] = ev["progress"].clone();
                if let Some(o) = p.as_object_mut() {
                    o.remove("progress");
                    o.remove("t_ms");
                }
                progress(&p);
            }
            "migration-completed" => return Ok(Outcome::Completed(ev["summary"].clone())),
            "migration-failed" | "migration-cancelled" | "postcopy-paused" => {
                return Ok(Outcome::Failed(ev["error"].as_str().unwrap_or("the migration failed").to_string()))
            }
            _ => {}
        }
    }
}
