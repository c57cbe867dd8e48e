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
        "dirty-limit" => format!("dirty set stopped shrinking: each vCPU limited to dirtying {} MiB/s", u(ev, "mib_s")),
        "postcopy-started" => {
            format!("post-copy: the guest runs on the destination; {} pages follow", u(ev, "pages"))
        }
        "postcopy" => postcopy_text(ev),
        _ => ev.to_string(),
    }
}

fn postcopy_text(ev: &Value) -> String {
    format!(
        "post-copy: {} pages left ({} asked for by the destination, {} pushed)",
        u(ev, "remaining_pages"),
        u(ev, "requested_pages"),
        u(ev, "pushed_pages")
    )
}

/// The post-copy part of a summary, if the migration switched to post-copy.
fn postcopy_summary(pc: &Value) -> String {
    if !pc.is_object() {
        return String::new();
    }
    let d = &pc["destination"];
    format!(
        "  post-copy       {} pages after the switch, in {:.1} ms: {} asked for, {} pushed; {} link recover{}\n  \
         destination     {} faults on missing pages (fault to page: p50 {} us, p99 {} us, max {} us), {} on zero pages\n",
        u(pc, "pages_at_switch"),
        f(pc, "duration_ms"),
        u(pc, "requested_pages"),
        u(pc, "pushed_pages"),
        u(pc, "recoveries"),
        if u(pc, "recoveries") == 1 { "y" } else { "ies" },
        u(d, "remote_faults"),
        u(d, "fault_p50_us"),
        u(d, "fault_p99_us"),
        u(d, "fault_max_us"),
        u(d, "zero_faults")
    )
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
    if s.get("iterations").is_none() {
        // A resumed post-copy: only its own figures.
        return format!("post-copy complete\n{}", postcopy_summary(&s["postcopy"]));
    }
    let p = &s["pages"];
    let d = &s["downtime_breakdown"];
    o += &format!("migration to {} complete\n", s["to"].as_str().unwrap_or("?"));
    o += &format!("  total time      {:>10.1} ms\n", f(s, "total_ms"));
    let (took, target) = (f(s, "downtime_ms"), u(s, "downtime_limit_ms"));
    // The target steers the switch (the estimated final pass must fit it); the pause itself can
    // still take longer (a vCPU slow to stop, state larger than estimated): said, not hidden.
    let over = if took > target as f64 { ", over it" } else { "" };
    o += &format!("  downtime        {took:>10.1} ms (target {target} ms{over})\n");
    o += &format!("  bytes sent      {:>10.1} MiB\n", u(s, "bytes") as f64 / (1 << 20) as f64);
    if u(s, "max_throttle_percent") > 0 {
        o += &format!("  vCPU throttle   {:>10} % at most (auto-converge)\n", u(s, "max_throttle_percent"));
    }
    let dl = &s["dirty_limit"];
    if u(dl, "engaged_at_iteration") > 0 {
        let per = |k: &str, unit: &str| -> String {
            dl[k].as_array().map_or(String::new(), |a| {
                a.iter().map(|x| format!("{:.0} {unit}", x.as_f64().unwrap_or(0.0))).collect::<Vec<_>>().join(", ")
            })
        };
        o += &format!(
            "  dirty limit     {:>10} MiB/s per vCPU from pass {}: held {}; dirtied {}\n",
            u(dl, "limit_mib_s"),
            u(dl, "engaged_at_iteration"),
            per("held_ms", "ms"),
            per("dirty_rate_mib_s", "MiB/s")
        );
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
    if let Some(per) = s["channel_bytes"].as_array().filter(|a| a.len() > 1) {
        let mib: Vec<String> =
            per.iter().map(|b| format!("{:.1}", b.as_u64().unwrap_or(0) as f64 / (1 << 20) as f64)).collect();
        o += &format!("  channels        {} connections, MiB each: {}\n", per.len(), mib.join(" / "));
    }
    let z = &s["zstd"];
    if z.is_object() {
        o += &format!(
            "  zstd            level {}: {:.1} MiB of page data in {:.1} MiB ({:.2}x)\n",
            u(z, "level"),
            u(z, "page_bytes") as f64 / (1 << 20) as f64,
            u(z, "wire_bytes") as f64 / (1 << 20) as f64,
            f(z, "ratio")
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
    o += &postcopy_summary(&s["postcopy"]);
    o
}

/// The live progress line `ferry migrate` shows on a terminal.
pub fn progress_bar() -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new_spinner();
    b.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {wide_msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    b.set_message("connecting");
    b.enable_steady_tick(std::time::Duration::from_millis(100));
    b
}

/// Folds a progress event into the live line: pass, what remains, MiB/s, the guest's dirty
/// rate, the pause expected if it switched over now.
pub fn update_bar(b: &indicatif::ProgressBar, ev: &Value) {
    let mib = |pages: f64| pages * 4096.0 / 1048576.0;
    match ev["event"].as_str().unwrap_or("") {
        "connected" => b.set_message(format!("connected to {}; pass 1 (every page)", ev["to"].as_str().unwrap_or("?"))),
        "iteration" => b.set_message(format!(
            "pass {} done: {:.1} MiB sent at {:.0} MiB/s | remaining {:.1} MiB | dirty {:.1} MiB/s | expected downtime {:.1} ms{}",
            u(ev, "iteration"),
            f(ev, "bytes") / 1048576.0,
            f(ev, "bandwidth_mib_s"),
            mib(f(ev, "pages_dirtied") - f(ev, "pages_sent")).max(0.0),
            mib(f(ev, "dirty_rate_pages_s")),
            f(ev, "estimated_downtime_ms"),
            if u(ev, "throttle_percent") > 0 { format!(" | throttle {}%", u(ev, "throttle_percent")) } else { String::new() }
        )),
        "switchover" => b.set_message(format!(
            "switching over: {:.1} MiB left, expected downtime {:.1} ms",
            mib(f(ev, "pending_pages")),
            f(ev, "estimated_downtime_ms")
        )),
        "throttle" => b.set_message(format!("throttling the guest to {}%", u(ev, "percent"))),
        "dirty-limit" => b.set_message(format!("limiting each vCPU to dirtying {} MiB/s", u(ev, "mib_s"))),
        "postcopy-started" | "postcopy" => b.set_message(progress_line(ev)),
        _ => {}
    }
}

/// A migration drawn as an SVG picture: one bar per pass (width its duration, height the pages
/// it sent; data pages dark, zero pages light), the bandwidth and the guest's dirty rate as
/// lines over the passes, and the pause at the end with where it went.
pub fn svg(s: &Value) -> String {
    use std::fmt::Write;
    let empty = Vec::new();
    let iters = s["iterations"].as_array().unwrap_or(&empty);
    let (w, h, left, top, plot_h) = (900.0f64, 430.0f64, 70.0f64, 40.0f64, 280.0f64);
    let plot_w = w - left - 50.0;
    let pc = &s["postcopy"];
    let total_ms: f64 =
        iters.iter().map(|i| f(i, "duration_ms")).sum::<f64>() + f(s, "downtime_ms") + f(pc, "duration_ms");
    let total_ms = total_ms.max(1e-3);
    let max_pages =
        iters.iter().map(|i| u(i, "pages_sent")).max().unwrap_or(1).max(u(pc, "pages_at_switch")).max(1) as f64;
    let max_bw = iters.iter().map(|i| f(i, "bandwidth_mib_s")).fold(1.0, f64::max);
    let max_dirty = iters.iter().map(|i| f(i, "dirty_rate_pages_s") * 4096.0 / 1048576.0).fold(1.0, f64::max);
    let max_rate = max_bw.max(max_dirty);
    let x = |ms: f64| left + ms / total_ms * plot_w;
    let y_pages = |p: f64| top + plot_h - p / max_pages * plot_h;
    let y_rate = |r: f64| top + plot_h - r / max_rate * plot_h;
    let mut o = String::new();
    let _ = write!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect x="0" y="0" width="{w}" height="{h}" fill="white"/>
<text x="{left}" y="22" font-size="15">Ferry migration to {} — {:.0} ms total, {:.1} ms paused, {:.1} MiB</text>
"#,
        esc(s["to"].as_str().unwrap_or("?")),
        f(s, "total_ms"),
        f(s, "downtime_ms"),
        f(s, "bytes") / 1048576.0
    );
    // Grid and axes.
    for k in 0..=4 {
        let yy = top + plot_h * k as f64 / 4.0;
        let _ =
            writeln!(o, r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/>"##, left + plot_w);
        let _ = writeln!(
            o,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">{:.0}</text>"##,
            left - 6.0,
            yy + 4.0,
            max_pages * (4 - k) as f64 / 4.0
        );
        // Right scale: MiB/s of the two lines.
        let _ = writeln!(
            o,
            r##"<text x="{:.1}" y="{:.1}" fill="#e6550d">{:.0}</text>"##,
            left + plot_w + 4.0,
            yy + 4.0,
            max_rate * (4 - k) as f64 / 4.0
        );
        // Time axis.
        let tx = left + plot_w * k as f64 / 4.0;
        let _ = writeln!(
            o,
            r##"<text x="{tx:.1}" y="{:.1}" text-anchor="middle" fill="#555">{:.0} ms</text>"##,
            top + plot_h + 16.0,
            total_ms * k as f64 / 4.0
        );
    }
    let _ = writeln!(
        o,
        r##"<text x="12" y="{:.1}" fill="#555" transform="rotate(-90 12 {:.1})">pages sent per pass</text>"##,
        top + plot_h / 2.0 + 50.0,
        top + plot_h / 2.0 + 50.0
    );
    let _ = writeln!(o, r##"<line x1="{left}" y1="{top}" x2="{left}" y2="{:.1}" stroke="#333"/>"##, top + plot_h);
    let _ = writeln!(
        o,
        r##"<line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#333"/>"##,
        top + plot_h,
        left + plot_w,
        top + plot_h
    );
    // Passes.
    let mut t = 0.0;
    let (mut bw, mut dirty) = (Vec::new(), Vec::new());
    for i in iters {
        let d = f(i, "duration_ms");
        let (x0, x1) = (x(t), x(t + d).max(x(t) + 1.0));
        let normal = u(i, "normal_pages") as f64;
        let sent = u(i, "pages_sent") as f64;
        let _ = writeln!(
            o,
            r##"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#c6dbef"><title>pass {}: {} pages ({} zero), {:.0} ms</title></rect>"##,
            y_pages(sent),
            x1 - x0,
            top + plot_h - y_pages(sent),
            u(i, "iteration"),
            u(i, "pages_sent"),
            u(i, "zero_pages"),
            d
        );
        let _ = writeln!(
            o,
            r##"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#3182bd"/>"##,
            y_pages(normal),
            x1 - x0,
            top + plot_h - y_pages(normal)
        );
        let mid = (x0 + x1) / 2.0;
        bw.push(format!("{mid:.1},{:.1}", y_rate(f(i, "bandwidth_mib_s"))));
        dirty.push(format!("{mid:.1},{:.1}", y_rate(f(i, "dirty_rate_pages_s") * 4096.0 / 1048576.0)));
        t += d;
    }
    for (pts, color) in [(&bw, "#e6550d"), (&dirty, "#31a354")] {
        let _ =
            writeln!(o, r##"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"##, pts.join(" "));
        for p in pts.iter() {
            if let Some((cx, cy)) = p.split_once(',') {
                let _ = writeln!(o, r##"<circle cx="{cx}" cy="{cy}" r="3" fill="{color}"/>"##);
            }
        }
    }
    // The pause.
    let (px0, px1) = (x(t), x(t + f(s, "downtime_ms")));
    let _ = writeln!(
        o,
        r##"<rect x="{px0:.1}" y="{top}" width="{:.1}" height="{plot_h}" fill="#de2d26" opacity="0.35"><title>paused {:.1} ms</title></rect>"##,
        (px1 - px0).max(2.0),
        f(s, "downtime_ms")
    );
    // Post-copy: the guest runs on the destination while the owed pages follow (those it asked
    // for darker).
    if pc.is_object() {
        let (x0, x1) = (px1, x(total_ms));
        let (owed, asked) = (u(pc, "pages_at_switch") as f64, u(pc, "requested_pages") as f64);
        let _ = writeln!(
            o,
            r##"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#bcbddc"><title>post-copy: {} pages in {:.0} ms ({} asked for by the destination, {} pushed)</title></rect>"##,
            y_pages(owed),
            (x1 - x0).max(1.0),
            top + plot_h - y_pages(owed),
            u(pc, "pages_at_switch"),
            f(pc, "duration_ms"),
            u(pc, "requested_pages"),
            u(pc, "pushed_pages")
        );
        let _ = writeln!(
            o,
            r##"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#756bb1"/>"##,
            y_pages(asked),
            (x1 - x0).max(1.0),
            top + plot_h - y_pages(asked)
        );
        let d = &pc["destination"];
        let _ = writeln!(
            o,
            r##"<text x="{left}" y="{:.1}"><tspan fill="#756bb1">■ asked for</tspan> <tspan fill="#bcbddc">■ pushed</tspan>: post-copy {:.0} ms, {} pages after the switch, {} asked for; faults p50 {} us, p99 {} us, max {} us</text>"##,
            top + plot_h + 84.0,
            f(pc, "duration_ms"),
            u(pc, "pages_at_switch"),
            u(pc, "requested_pages"),
            u(d, "fault_p50_us"),
            u(d, "fault_p99_us"),
            u(d, "fault_max_us")
        );
    }
    let b = &s["downtime_breakdown"];
    let _ = writeln!(
        o,
        r##"<text x="{left}" y="{:.1}">pause {:.2} ms: stop {:.2}, sync {:.2}, last pages {} in {:.2}, state {:.2}, destination load {:.2}, ACK wait {:.2}, COMMIT {:.2}</text>"##,
        top + plot_h + 40.0,
        f(s, "downtime_ms"),
        f(b, "pause_ms"),
        f(b, "final_sync_ms"),
        u(b, "final_pages"),
        f(b, "final_pages_ms"),
        f(b, "state_ms"),
        f(b, "dest_load_ms"),
        f(b, "ack_wait_ms"),
        f(b, "commit_ms")
    );
    let _ = writeln!(
        o,
        r##"<text x="{left}" y="{:.1}"><tspan fill="#3182bd">■ data pages</tspan>  <tspan fill="#9ecae1">■ zero pages</tspan>  <tspan fill="#e6550d">— bandwidth MiB/s</tspan>  <tspan fill="#31a354">— guest dirty rate MiB/s</tspan> (right scale max {:.0} MiB/s)  <tspan fill="#de2d26">■ pause</tspan></text>"##,
        top + plot_h + 62.0,
        max_rate
    );
    o.push_str("</svg>\n");
    o
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod svg_tests {
    use super::*;

    #[test]
    fn the_report_draws_each_pass_the_rates_and_the_pause() {
        let s = serde_json::json!({
            "to": "unix:/x<y>", "total_ms": 500.0, "downtime_ms": 3.0, "bytes": 1048576,
            "iterations": [
                {"iteration": 1, "duration_ms": 400.0, "pages_sent": 1000, "normal_pages": 600, "zero_pages": 400,
                 "bandwidth_mib_s": 900.0, "dirty_rate_pages_s": 0.0},
                {"iteration": 2, "duration_ms": 50.0, "pages_sent": 100, "normal_pages": 100, "zero_pages": 0,
                 "bandwidth_mib_s": 700.0, "dirty_rate_pages_s": 5000.0}
            ],
            "downtime_breakdown": {"pause_ms": 0.1}
        });
        let svg = svg(&s);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<title>pass").count(), 2);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("paused 3.0 ms"));
        assert!(svg.contains("unix:/x&lt;y&gt;"), "the target is not escaped");
        assert!(!svg.contains("post-copy"), "a pre-copy migration drew a post-copy phase");
    }

    #[test]
    fn a_post_copy_migration_draws_its_phase_after_the_pause() {
        let s = serde_json::json!({
            "to": "unix:/x", "total_ms": 900.0, "downtime_ms": 5.0, "bytes": 1048576,
            "iterations": [{"iteration": 1, "duration_ms": 400.0, "pages_sent": 1000, "normal_pages": 600,
                "zero_pages": 400, "bandwidth_mib_s": 900.0, "dirty_rate_pages_s": 0.0}],
            "downtime_breakdown": {},
            "postcopy": {"pages_at_switch": 3000, "requested_pages": 40, "pushed_pages": 2960, "duration_ms": 495.0,
                "destination": {"fault_p50_us": 150, "fault_p99_us": 800, "fault_max_us": 900}}
        });
        let svg = svg(&s);
        assert!(svg.contains("<title>post-copy: 3000 pages in 495 ms (40 asked for"), "{svg}");
        assert!(svg.contains("p99 800 us"), "{svg}");
        // The time axis covers the post-copy phase: its last label is the whole 900 ms.
        assert!(svg.contains(">900 ms</text>"), "{svg}");
    }
}
