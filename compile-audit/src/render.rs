//! Human-readable renderings of a [`Report`] (JSON is `serde_json::to_string(&report)`).

use std::fmt::Write as _;

use crate::Report;

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// The headline numbers, labelled, in the order both renderings show them.
fn summary(r: &Report) -> [(&'static str, String); 7] {
    [
        ("graph breaks", r.graph_breaks.to_string()),
        ("unique", r.breaks.len().to_string()),
        ("recompiles", r.recompiles.to_string()),
        ("graphs", r.graphs.to_string()),
        ("eager fallbacks", r.fallbacks.len().to_string()),
        ("recompile-limit hits", r.recompile_limit_hits().to_string()),
        ("compile time", format!("{:.1} s", r.total_compile_time_s)),
    ]
}

/// Markdown: summary, breaks, recompiles, fallbacks, frames, captured, input issues.
pub fn markdown(r: &Report) -> String {
    let mut m = String::new();
    let _ = writeln!(m, "# torch.compile audit\n");
    let s = summary(r);
    let _ = writeln!(
        m,
        "| {} |\n|{}\n| {} |\n",
        s.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(" | "),
        "---|".repeat(s.len()),
        s.iter().map(|(_, v)| v.as_str()).collect::<Vec<_>>().join(" | ")
    );
    if let Some(l) = &r.logs {
        let _ = writeln!(
            m,
            "TORCH_LOGS text: {} graph-break messages, {} recompile messages, {} recompile-limit warnings.\n",
            l.graph_breaks, l.recompiles, l.recompile_limit_hits
        );
    }
    if !r.breaks.is_empty() {
        m += "## Graph breaks\n\n| count | type | registry | where | compiles | explanation | hint |\n|---|---|---|---|---|---|---|\n";
        for b in &r.breaks {
            let _ = writeln!(
                m,
                "| {} | {}{} | {} | {} | {} | {} | {} |",
                b.count,
                if b.skipped_frame { "(frame skipped) " } else { "" },
                cell(&b.kind),
                b.registry_id.as_deref().unwrap_or(""),
                cell(b.location.as_deref().unwrap_or("?")),
                b.compile_ids.join(" "),
                cell(b.explanation.as_deref().unwrap_or("")),
                cell(b.hints.first().map_or("", |s| s.as_str()))
            );
        }
        m += "\n";
    }
    if !r.recompile_reasons.is_empty() {
        m += "## Recompilations\n\n| compile | frame | guard failure |\n|---|---|---|\n";
        for rc in &r.recompile_reasons {
            let _ = writeln!(m, "| {} | {} | {} |", rc.compile_id, cell(&rc.frame), cell(&rc.reasons.join("; ")));
        }
        m += "\n";
    }
    if !r.fallbacks.is_empty() {
        m += "## Compiles that failed (the frame runs eager)\n\n| compile | frame | reason | where |\n|---|---|---|---|\n";
        for f in &r.fallbacks {
            let _ = writeln!(
                m,
                "| {} | {} | {}{} | {} |",
                f.compile_id,
                cell(&f.frame),
                if f.recompile_limit { "**recompile limit**: " } else { "" },
                cell(&f.reason),
                cell(f.location.as_deref().unwrap_or(""))
            );
        }
        m += "\n";
    }
    if !r.frames.is_empty() {
        m += "## Frames\n\n| frame | function | defined at | compiles | ops per compile | compile time |\n|---|---|---|---|---|---|\n";
        for f in &r.frames {
            let ops: Vec<String> =
                f.compiles.iter().map(|c| c.graph_op_count.map_or("-".into(), |n| n.to_string())).collect();
            let t: f64 = f.compiles.iter().map(|c| c.compile_time_s).sum();
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} | {:.2} s |",
                f.frame_id,
                cell(&f.name),
                cell(&f.location),
                f.compiles.len(),
                ops.join(", "),
                t
            );
        }
        m += "\n";
    }
    let c = &r.captured;
    m += "## Captured in compiled graphs\n\n";
    if c.ops.is_empty() {
        m += "Nothing: no graph was produced.\n\n";
    } else {
        let mut ops: Vec<(&String, &usize)> = c.ops.iter().collect();
        ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let list: Vec<String> = ops.iter().take(25).map(|(k, v)| format!("`{k}` x{v}")).collect();
        let _ = writeln!(m, "Ops ({} kinds): {}{}\n", c.ops.len(), list.join(", "), if ops.len() > 25 { ", ..." } else { "" });
        let funcs: Vec<String> = c.user_functions.keys().map(|k| format!("`{k}`")).collect();
        let _ = writeln!(m, "User functions ({}): {}\n", funcs.len(), funcs.join(", "));
        let mods: Vec<String> = c.modules.keys().take(40).map(|k| format!("`{k}`")).collect();
        let _ = writeln!(m, "Modules with parameters in graphs ({}): {}{}\n", c.modules.len(), mods.join(", "), if c.modules.len() > 40 { ", ..." } else { "" });
    }
    if r.issue_count > 0 {
        let _ = writeln!(m, "## Input problems ({})\n", r.issue_count);
        for i in &r.issues {
            let _ = writeln!(m, "- line {}: {}", i.line, i.what);
        }
        m += "\n";
    }
    m
}

/// A terminal summary: one screen.
pub fn table(r: &Report) -> String {
    let mut t = String::new();
    let line: Vec<String> = summary(r).iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(t, "{}", line.join(" | "));
    for b in &r.breaks {
        let _ = writeln!(
            t,
            "  break x{:<3} {:<7} {}{}  at {}",
            b.count,
            b.registry_id.as_deref().unwrap_or("-"),
            if b.skipped_frame { "(frame skipped) " } else { "" },
            b.kind,
            b.location.as_deref().unwrap_or("?")
        );
    }
    for rc in &r.recompile_reasons {
        let _ = writeln!(t, "  recompile {:<6} {}: {}", rc.compile_id, rc.frame, rc.reasons.first().map_or("", |s| s.as_str()));
    }
    for f in &r.fallbacks {
        let _ = writeln!(t, "  eager     {:<6} {}: {}", f.compile_id, f.frame, f.reason);
    }
    let _ = writeln!(
        t,
        "  captured: {} op kinds, {} user functions, {} modules",
        r.captured.ops.len(),
        r.captured.user_functions.len(),
        r.captured.modules.len()
    );
    if r.issue_count > 0 {
        let _ = writeln!(t, "  input problems: {} (see --format md)", r.issue_count);
    }
    t
}
