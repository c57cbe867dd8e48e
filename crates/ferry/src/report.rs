//! Human-readable migration progress and summary (the JSON forms come straight from the engine).

use serde_json::Value;

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0)
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// One progress event as a line.
pub fn progress_line(ev: &Value) -> String {
    match ev["event"].as_str().unwrap_or("") {
        "connected" => format!("connected to {}", ev["to"].as_str().unwrap_or("?")),
        "iteration" => format!(
            "iteration {}: {} pages dirty, sent {} ({} normal, {} zero), {:.1} MiB in {:.0} ms, {:.0} MiB/s{}",
            u(ev, "iteration"),
            u(ev, "pages_dirtied"),
            u(ev, "pages_sent"),
            u(ev, "normal_pages"),
            u(ev, "zero_pages"),
            u(ev, "bytes") as f64 / (1 << 20) as f64,
            f(ev, "duration_ms"),
            f(ev, "bandwidth_mib_s"),
            throttle_text(ev)
        ),
        "switchover" => format!(
            "switching over: {} pages left, estimated pause {:.1} ms",
            u(ev, "pending_pages"),
            f(ev, "estimated_downtime_ms")
        ),
        "throttle" => format!("dirty set stopped shrinking: throttling the vCPUs to {}%", u(ev, "percent")),
        _ => ev.to_string(),
    }
}

/// ", vCPUs throttled to P% (held off Q%)" for an iteration that ran throttled, else nothing.
fn throttle_text(it: &Value) -> String {
    match u(it, "throttle_percent") {
        0 => String::new(),
        p => format!(", vCPUs throttled to {p}% (held off {:.0}%)", f(it, "throttled_percent")),
    }
}

/// The summary as text.
pub fn summary_text(s: &Value) -> String {
    let mut o = String::new();
    let p = &s["pages"];
    let d = &s["downtime_breakdown"];
    o += &format!("migration to {} complete\n", s["to"].as_str().unwrap_or("?"));
    o += &format!("  total time      {:>10.1} ms\n", f(s, "total_ms"));
    o += &format!("  downtime        {:>10.1} ms (limit {} ms)\n", f(s, "downtime_ms"), u(s, "downtime_limit_ms"));
    o += &format!("  bytes sent      {:>10.1} MiB\n", u(s, "bytes") as f64 / (1 << 20) as f64);
    if u(s, "max_throttle_percent") > 0 {
        o += &format!("  vCPU throttle   {:>10} % at most (auto-converge)\n", u(s, "max_throttle_percent"));
    }
    o += &format!(
        "  pages           {} normal, {} zero, {} broken, {} discarded\n",
        u(p, "normal"),
        u(p, "zero"),
        u(p, "broken"),
        u(p, "discarded")
    );
    if s["disk_in_flight_at_stop"].as_u64().is_some() && s["disks"].as_u64().unwrap_or(0) > 0 {
        o += &format!(
            "  disk requests   {} in flight at the stop ({} finished here after the quiesce point), {} replayed on the destination; locks passed {}\n",
            u(s, "disk_in_flight_at_stop"),
            u(s, "disk_completed_after_quiesce"),
            u(s, "disk_replayed"),
            if s["disk_lock_released_before_commit"] == Value::Bool(true) { "before COMMIT" } else { "after COMMIT" }
        );
    }
    o += "  iteration   dirty pages    sent pages        MiB      ms     MiB/s  throttle  held off\n";
    for it in s["iterations"].as_array().into_iter().flatten() {
        o += &format!(
            "  {:>9} {:>13} {:>13} {:>10.1} {:>7.0} {:>9.0} {:>8}% {:>8.0}%\n",
            u(it, "iteration"),
            u(it, "pages_dirtied"),
            u(it, "pages_sent"),
            u(it, "bytes") as f64 / (1 << 20) as f64,
            f(it, "duration_ms"),
            f(it, "bandwidth_mib_s"),
            u(it, "throttle_percent"),
            f(it, "throttled_percent")
        );
    }
    o += "  downtime breakdown:\n";
    o += &format!("    pause vCPUs          {:>8.2} ms\n", f(d, "pause_ms"));
    o += &format!("    final dirty sync     {:>8.2} ms\n", f(d, "final_sync_ms"));
    o += &format!("    final pages          {:>8.2} ms ({} pages)\n", f(d, "final_pages_ms"), u(d, "final_pages"));
    o += &format!("    device + vCPU state  {:>8.2} ms\n", f(d, "state_ms"));
    o += &format!(
        "    destination load     {:>8.2} ms (of which KVM restore {:.2} ms)\n",
        f(d, "dest_load_ms"),
        f(d, "dest_restore_ms")
    );
    o += &format!("    wait for ACK         {:>8.2} ms\n", f(d, "ack_wait_ms"));
    o += &format!("    commit / resume      {:>8.2} ms\n", f(d, "commit_ms"));
    o
}
