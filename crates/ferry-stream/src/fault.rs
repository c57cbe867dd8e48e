//! Fault injection at named points (issue 21, docs/reliability.md "Fault injection").
//!
//! Built only with the `fault-injection` cargo feature; without it every function here is an
//! empty inline function and a release build carries none of it. With it, the environment
//! variable `FERRY_FAULT=<point>=<action>[@<n>]` makes the `n`-th hit (default the first) of
//! `<point>` in this process do `<action>`:
//!
//! - `kill`: the process sends itself SIGKILL (what `kill -9` or an OOM kill does);
//! - `stall`: the thread sleeps 2 s (`stall:<ms>` for another length), then goes on;
//! - `drop`: the next read or write on a migration connection shuts the connection down and
//!   fails;
//! - `eio`: the next read or write of a stream (a connection or a snapshot file) fails with EIO;
//! - `enospc`: the next write of a stream fails with ENOSPC.
//!
//! Points are named `<side>.<step>`: `write.<RECORD>.before|after` and
//! `read.<RECORD>.before|after` around every record a stream writer writes or a reader reads
//! (`<RECORD>` as [`crate::rtype::name`] spells it), and the protocol steps the migration,
//! snapshot and transport code marks with [`hit`] (listed in docs/reliability.md). Each firing
//! is said on stderr (`ferry: fault injected at <point>: <action>`) before it acts, so a test
//! knows the point was reached.

#[cfg(feature = "fault-injection")]
mod imp {
    use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
    use std::sync::OnceLock;
    use std::time::Duration;

    /// What a point does when it fires.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Action {
        Kill,
        Stall(Duration),
        Drop,
        Eio,
        Enospc,
    }

    /// The parsed `FERRY_FAULT`.
    #[derive(Debug)]
    pub struct Spec {
        pub point: String,
        pub action: Action,
        pub nth: u64,
    }

    /// Parses `<point>=<action>[@<n>]`.
    pub fn parse(s: &str) -> Result<Spec, String> {
        let (point, rest) =
            s.split_once('=').ok_or_else(|| format!("FERRY_FAULT {s:?}: expected <point>=<action>[@<n>]"))?;
        let (action, nth) = match rest.split_once('@') {
            Some((a, n)) => (a, n.parse::<u64>().map_err(|_| format!("FERRY_FAULT {s:?}: bad hit count {n:?}"))?),
            None => (rest, 1),
        };
        let action = match action {
            "kill" => Action::Kill,
            "stall" => Action::Stall(Duration::from_secs(2)),
            "drop" => Action::Drop,
            "eio" => Action::Eio,
            "enospc" => Action::Enospc,
            a => match a.strip_prefix("stall:").and_then(|ms| ms.parse::<u64>().ok()) {
                Some(ms) => Action::Stall(Duration::from_millis(ms)),
                None => {
                    return Err(format!(
                        "FERRY_FAULT {s:?}: unknown action {a:?} (kill, stall, stall:<ms>, drop, eio, enospc)"
                    ))
                }
            },
        };
        if point.is_empty() || nth == 0 {
            return Err(format!("FERRY_FAULT {s:?}: empty point or a hit count of 0"));
        }
        Ok(Spec { point: point.to_string(), action, nth })
    }

    fn spec() -> Option<&'static Spec> {
        static SPEC: OnceLock<Option<Spec>> = OnceLock::new();
        SPEC.get_or_init(|| {
            let v = std::env::var("FERRY_FAULT").ok()?;
            match parse(&v) {
                Ok(s) => Some(s),
                Err(e) => {
                    // A test that names a fault it cannot get must not pass as if it had.
                    eprintln!("ferry: {e}");
                    std::process::exit(2);
                }
            }
        })
        .as_ref()
    }

    static HITS: AtomicU64 = AtomicU64::new(0);
    /// The armed I/O fault: 0 none, -1 drop, else an errno.
    static ARMED: AtomicI32 = AtomicI32::new(0);
    const DROP: i32 = -1;

    pub fn hit(point: &str) {
        let Some(s) = spec() else { return };
        if s.point != point || HITS.fetch_add(1, Ordering::SeqCst) + 1 != s.nth {
            return;
        }
        eprintln!("ferry: fault injected at {point}: {:?}", s.action);
        match s.action {
            Action::Kill => {
                // SAFETY: kill(2) on our own pid with a constant signal; no memory is involved.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                // SIGKILL cannot be caught; this is never reached.
                std::process::abort();
            }
            Action::Stall(d) => std::thread::sleep(d),
            Action::Drop => ARMED.store(DROP, Ordering::SeqCst),
            Action::Eio => ARMED.store(libc::EIO, Ordering::SeqCst),
            Action::Enospc => ARMED.store(libc::ENOSPC, Ordering::SeqCst),
        }
    }

    pub fn hit_record(side: &str, name: &str, when: &str) {
        let Some(s) = spec() else { return };
        // Only build the name when the point could be this one.
        if s.point.len() == side.len() + name.len() + when.len() + 2
            && s.point.starts_with(side)
            && s.point.ends_with(when)
        {
            hit(&format!("{side}.{name}.{when}"));
        }
    }

    pub fn take_io(write: bool) -> Option<std::io::Error> {
        let e = ARMED.load(Ordering::SeqCst);
        if e <= 0 || (e == libc::ENOSPC && !write) {
            return None;
        }
        ARMED.compare_exchange(e, 0, Ordering::SeqCst, Ordering::SeqCst).ok()?;
        eprintln!("ferry: fault injected: the next {} fails with errno {e}", if write { "write" } else { "read" });
        Some(std::io::Error::from_raw_os_error(e))
    }

    pub fn take_drop() -> bool {
        let taken = ARMED.compare_exchange(DROP, 0, Ordering::SeqCst, Ordering::SeqCst).is_ok();
        if taken {
            eprintln!("ferry: fault injected: the connection is dropped");
        }
        taken
    }

    pub fn disarm() {
        if ARMED.swap(0, Ordering::SeqCst) != 0 {
            eprintln!("ferry: fault injection: the armed I/O fault found no I/O to fail; disarmed");
        }
    }

    pub fn configured() -> Option<String> {
        spec().map(|s| format!("{}={:?}@{}", s.point, s.action, s.nth))
    }
}

#[cfg(feature = "fault-injection")]
pub use imp::{disarm, hit, hit_record, take_drop, take_io};

/// Forgets an armed I/O fault that found no I/O to fail in the migration that armed it (called
/// when a migration starts, so that it fails that migration or none).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn disarm() {}

/// Marks the named point: with the feature and `FERRY_FAULT` naming it, does its action.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn hit(_point: &str) {}

/// `<side>.<record name>.<when>`, built only when a fault is configured.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn hit_record(_side: &str, _name: &str, _when: &str) {}

/// The armed EIO/ENOSPC fault, taken by the stream I/O that is to fail (ENOSPC only by a write).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn take_io(_write: bool) -> Option<std::io::Error> {
    None
}

/// Whether an armed `drop` is due: the connection that takes it shuts itself down.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn take_drop() -> bool {
    false
}

/// Whether this build can inject faults.
pub const ENABLED: bool = cfg!(feature = "fault-injection");

/// The configured fault, if any (`FERRY_FAULT`, parsed; exits with status 2 when it does not
/// parse). Without the feature: `FERRY_FAULT` as set, so that the binary can refuse a fault it
/// cannot inject.
#[cfg(feature = "fault-injection")]
pub fn configured() -> Option<String> {
    imp::configured()
}

/// The configured fault, if any. Without the feature: `FERRY_FAULT` as set, so that the binary
/// can refuse a fault it cannot inject.
#[cfg(not(feature = "fault-injection"))]
pub fn configured() -> Option<String> {
    std::env::var("FERRY_FAULT").ok()
}

#[cfg(all(test, feature = "fault-injection"))]
mod tests {
    use super::imp::{parse, Action};
    use std::time::Duration;

    #[test]
    fn specs_parse_and_bad_ones_are_refused_by_name() {
        let s = parse("write.PAGE_BATCH.before=kill@3").unwrap();
        assert_eq!((s.point.as_str(), s.action, s.nth), ("write.PAGE_BATCH.before", Action::Kill, 3));
        assert_eq!(parse("source.commit-sent=stall:50").unwrap().action, Action::Stall(Duration::from_millis(50)));
        assert_eq!(parse("x=enospc").unwrap().nth, 1);
        assert!(parse("x").unwrap_err().contains("expected <point>=<action>"));
        assert!(parse("x=explode").unwrap_err().contains("unknown action"));
        assert!(parse("x=kill@0").is_err());
        assert!(parse("x=kill@two").unwrap_err().contains("bad hit count"));
    }
}
