//! What arrives on the API socket, parsed: a request line of the JSON-lines protocol (a JSON
//! object whose fields its command takes), or an HTTP/1.1 request (request line, headers, a
//! `Content-Length` body, a route, query fields). Nothing here touches the machine: the API
//! (api.rs, http.rs) runs what this accepts. Self-contained (std, serde_json, anyhow) so that
//! the API-request fuzz target in `fuzz/` and the test replaying its corpus build this very file.

use std::io::{BufRead, Read};

use anyhow::{bail, Result};
use serde_json::{json, Value};

/// Longest request line (a `memory-write` of 1 MiB is 2 MiB of hex).
pub const MAX_REQUEST: usize = 4 << 20;

/// Every route served: (method, path, the JSON command it runs or what it is).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/v1/vm.info"),
    ("PUT", "/api/v1/vm.pause"),
    ("PUT", "/api/v1/vm.resume"),
    ("PUT", "/api/v1/vm.shutdown"),
    ("PUT", "/api/v1/vm.migrate"),
    ("GET", "/api/v1/vm.migration"),
    ("PUT", "/api/v1/vm.migrate-cancel"),
    ("PUT", "/api/v1/vm.migrate-resume"),
    ("PUT", "/api/v1/vm.snapshot"),
    ("GET", "/api/v1/vm.dirty-rate"),
    ("PUT", "/api/v1/vm.replicate"),
    ("PUT", "/api/v1/vm.replicate-stop"),
    ("GET", "/api/v1/events"),
    ("GET", "/metrics"),
];

/// Whether `line` is an HTTP/1.x request line.
pub fn is_request_line(line: &str) -> bool {
    let mut it = line.trim_end().split(' ');
    matches!(
        (it.next(), it.next(), it.next(), it.next()),
        (Some(m), Some(p), Some(v), None)
            if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) && p.starts_with('/') && v.starts_with("HTTP/1.")
    )
}

/// The fields each command takes besides `cmd`.
pub const FIELDS: &[(&str, &[&str])] = &[
    ("status", &[]),
    ("pause", &[]),
    ("resume", &[]),
    ("quit", &[]),
    ("migrate-cancel", &[]),
    (
        "migrate",
        &[
            "to",
            "downtime_ms",
            "max_bandwidth_mib_s",
            "max_iterations",
            "force_switchover",
            "auto_converge",
            "stall_timeout_ms",
            "copy_storage",
            "tls_cert",
            "tls_key",
            "tls_ca",
            "postcopy",
            "postcopy_after_iterations",
            "compress",
            "compress_level",
            "channels",
            "dirty_limit_mib_s",
        ],
    ),
    ("migrate-resume", &["to", "tls_cert", "tls_key", "tls_ca"]),
    ("snapshot", &["to", "live", "stop", "incremental_from"]),
    ("dirty-rate", &["window_ms"]),
    ("memory-read", &["gpa", "len"]),
    ("memory-write", &["gpa", "hex"]),
    ("poison", &["gpa", "announce", "at"]),
    ("update", &["binary", "mode"]),
    (
        "replicate",
        &["to", "interval_ms", "on_backup_loss", "ack_timeout_ms", "stall_timeout_ms", "tls_cert", "tls_key", "tls_ca"],
    ),
    ("replicate-stop", &[]),
    ("seccomp-probe", &["thread"]),
];

/// Refuses a request that is not an object, or that has a field its command does not take (a
/// misspelt option, say `"max_bandwidth"` for `"max_bandwidth_mib_s"`, would otherwise be
/// ignored and the command run with the default). An unknown or missing `cmd` is left to the
/// dispatch, which names it.
pub fn check_fields(req: &Value) -> Result<()> {
    let Some(obj) = req.as_object() else { bail!("a request must be a JSON object, not {req}") };
    let Some(cmd) = obj.get("cmd").and_then(Value::as_str) else { return Ok(()) };
    let Some((_, allowed)) = FIELDS.iter().find(|(c, _)| *c == cmd) else { return Ok(()) };
    match obj.keys().find(|k| *k != "cmd" && !allowed.contains(&k.as_str())) {
        Some(k) if allowed.is_empty() => bail!("unknown field \"{k}\" for {cmd} (it takes none)"),
        Some(k) => bail!("unknown field \"{k}\" for {cmd} (it takes: {})", allowed.join(", ")),
        None => Ok(()),
    }
}

/// The next request line, at most [`MAX_REQUEST`] bytes: `None` at the end of the connection,
/// an error for a longer line (the rest of it is never buffered).
pub fn read_request<R: BufRead>(r: &mut R) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = std::io::Read::take(&mut *r, MAX_REQUEST as u64 + 1).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.len() > MAX_REQUEST {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a request line of more than {} MiB", MAX_REQUEST >> 20),
        ));
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// An HTTP request the API serves: a known route with the method it takes, and its fields (the
/// JSON object body, then the query's `k=v` pairs; numbers as numbers).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub fields: Value,
}

/// An HTTP request refused before it runs: the status to answer and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub message: String,
}

fn refuse<T>(code: u16, message: impl std::fmt::Display) -> std::io::Result<std::result::Result<T, Refusal>> {
    Ok(Err(Refusal { code, message: message.to_string() }))
}

/// Reads the rest of the HTTP request whose request line is `first` from `reader`: at most 100
/// header lines of 16 KiB, a body of at most [`MAX_REQUEST`] bytes. An I/O error (the client
/// went away, a slow client's timeout) is the outer error; a request that is wrong is a
/// [`Refusal`] naming what is wrong.
pub fn parse_http(
    first: &str,
    reader: &mut impl BufRead,
) -> std::io::Result<std::result::Result<HttpRequest, Refusal>> {
    let mut parts = first.trim_end().split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    // Headers: Content-Length only matters; chunked bodies are not taken.
    let mut len: Option<usize> = None;
    let mut chunked = false;
    for _ in 0..100 {
        let mut h = String::new();
        if Read::take(&mut *reader, 16 << 10).read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                len = v.parse().ok();
                if len.is_none() {
                    return refuse(400, format!("Content-Length '{v}' is not a number"));
                }
            } else if k == "transfer-encoding" && !v.eq_ignore_ascii_case("identity") {
                chunked = true;
            }
        }
    }
    if chunked {
        return refuse(411, "chunked request bodies are not taken: send Content-Length");
    }
    let n = len.unwrap_or(0);
    if n > MAX_REQUEST {
        return refuse(413, format!("a body of {n} bytes; at most {MAX_REQUEST}"));
    }
    let mut body = vec![0u8; n];
    reader.read_exact(&mut body)?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let known: Vec<&str> = ROUTES.iter().filter(|r| r.1 == path).map(|r| r.0).collect();
    if known.is_empty() {
        return refuse(404, format!("no such path {path} (see docs/api/openapi.yaml)"));
    }
    if !known.contains(&method) {
        return refuse(405, format!("{path} takes {}, not {method}", known.join(", ")));
    }
    let mut fields = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(v @ Value::Object(_)) => v,
            Ok(v) => return refuse(400, format!("the body must be a JSON object, not {v}")),
            Err(e) => return refuse(400, format!("the body is not JSON: {e}")),
        }
    };
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        fields[k] = v.parse::<u64>().map(Value::from).unwrap_or_else(|_| Value::from(v));
    }
    Ok(Ok(HttpRequest { method: method.to_string(), path: path.to_string(), fields }))
}

/// A JSON-lines request: a JSON object whose fields its command takes.
pub fn parse_json_line(line: &str) -> std::result::Result<Value, String> {
    serde_json::from_str::<Value>(line)
        .map_err(|e| format!("request is not JSON: {e}"))
        .and_then(|req| check_fields(&req).map(|()| req).map_err(|e| format!("{e:#}")))
}

/// The fuzz target's body: `data` as a connection's bytes, read as the API reads them (request
/// lines; an HTTP request if the first is a request line, JSON lines otherwise), at most 64
/// requests. Returns how many were accepted. (Used by `fuzz/` and the corpus test below, not by
/// the binary.)
#[allow(dead_code)]
pub fn fuzz_connection(data: &[u8]) -> usize {
    let mut r = std::io::BufReader::new(data);
    let mut accepted = 0;
    for i in 0..64 {
        let Ok(Some(line)) = read_request(&mut r) else { break };
        if i == 0 && is_request_line(&line) {
            if let Ok(Ok(req)) = parse_http(&line, &mut r) {
                // What the HTTP side runs goes through the same field check.
                let mut f = req.fields;
                if f.is_object() {
                    f["cmd"] = json!(req.path.trim_start_matches("/api/v1/vm."));
                }
                accepted += usize::from(check_fields(&f).is_ok());
            }
            break;
        }
        accepted += usize::from(!line.trim().is_empty() && parse_json_line(&line).is_ok());
    }
    accepted
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed corpus of the API-request fuzz target (fuzz/corpus/api_request), replayed:
    /// every input read as a connection, no panic; and the corpus is there.
    #[test]
    fn the_api_request_fuzz_corpus_replays_without_a_panic() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/api_request");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let data = std::fs::read(e.unwrap().path()).unwrap();
            fuzz_connection(&data);
            n += 1;
        }
        assert!(n >= 20, "only {n} inputs in {}", dir.display());
    }

    #[test]
    fn requests_are_parsed_and_refused_by_name() {
        let http = |s: &str| {
            let mut r = std::io::BufReader::new(s.as_bytes());
            let first = read_request(&mut r).unwrap().unwrap();
            parse_http(&first, &mut r).unwrap()
        };
        let ok =
            http("PUT /api/v1/vm.migrate?downtime_ms=20 HTTP/1.1\r\nContent-Length: 16\r\n\r\n{\"to\":\"unix:/x\"}");
        assert_eq!(ok.unwrap().fields, json!({"to": "unix:/x", "downtime_ms": 20}));
        assert_eq!(http("GET /nope HTTP/1.1\r\n\r\n").unwrap_err().code, 404);
        assert_eq!(http("GET /api/v1/vm.pause HTTP/1.1\r\n\r\n").unwrap_err().code, 405);
        assert_eq!(http("PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: x\r\n\r\n").unwrap_err().code, 400);
        assert_eq!(http("PUT /api/v1/vm.pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap_err().code, 411);
        let huge = format!("PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_REQUEST + 1);
        assert_eq!(http(&huge).unwrap_err().code, 413);
        assert!(parse_json_line("{\"cmd\":\"pause\",\"now\":1}").unwrap_err().contains("unknown field \"now\""));
        assert_eq!(fuzz_connection(b"{\"cmd\":\"status\"}\n{\"cmd\":\"pause\"}\nnot json\n"), 2);
    }
}
