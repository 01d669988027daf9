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

/// Markdown: summary, breaks, recompiles, restarts, fallbacks, frames, captured, input issues.
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
    if !r.restarted.is_empty() {
        let _ = writeln!(
            m,
            "## Restarted analyses\n\n{} restart(s): dynamo traced these compile ids again, with a new attempt number. Only the \
             last attempt's graph is installed and counted in graphs; {} graph(s) logged by restarted attempts are not.\n\n\
             | compile | frame | attempts | graphs discarded | reason |\n|---|---|---|---|---|",
            r.restarts, r.superseded_graphs
        );
        for rs in &r.restarted {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} |",
                rs.compile_id,
                cell(&rs.frame),
                rs.attempts,
                rs.superseded_graphs,
                cell(&rs.reasons.join("; "))
            );
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
                f.label(),
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
    for rs in &r.restarted {
        let _ = writeln!(
            t,
            "  restart   {:<6} {}: {} attempts, {} graph(s) discarded: {}",
            rs.compile_id,
            rs.frame,
            rs.attempts,
            rs.superseded_graphs,
            rs.reasons.first().map_or("", |s| s.as_str())
        );
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

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn html_table(out: &mut String, title: &str, head: &[&str], rows: Vec<Vec<String>>) {
    if rows.is_empty() {
        return;
    }
    let _ = write!(out, "<h2>{}</h2>\n<table>\n<tr>", esc(title));
    for h in head {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr>\n");
    for r in rows {
        out.push_str("<tr>");
        for c in r {
            let _ = write!(out, "<td>{}</td>", esc(&c));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
}

/// A self-contained static HTML page (no scripts, no external assets).
pub fn html(r: &Report) -> String {
    let mut h = String::from(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>torch.compile audit</title>\n<style>\n\
         body{font:14px/1.45 system-ui,sans-serif;margin:2em;color:#222}h1{font-size:22px}h2{font-size:17px;margin-top:1.6em}\n\
         .cards{display:flex;gap:10px;flex-wrap:wrap}.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:110px}\n\
         .card b{display:block;font-size:22px}.bad b{color:#b00020}.ok b{color:#1b7f3b}\n\
         table{border-collapse:collapse;margin-top:6px}td,th{border:1px solid #ddd;padding:4px 8px;vertical-align:top;text-align:left}\n\
         th{background:#f4f4f4}code{background:#f4f4f4;padding:1px 4px;border-radius:3px}\n</style></head><body>\n<h1>torch.compile audit</h1>\n<div class=\"cards\">\n",
    );
    for (k, v) in summary(r) {
        let bad = match k {
            "graph breaks" | "recompile-limit hits" | "eager fallbacks" => v != "0",
            _ => false,
        };
        let class = if k == "compile time" || k == "graphs" || k == "unique" || k == "recompiles" {
            "card"
        } else if bad {
            "card bad"
        } else {
            "card ok"
        };
        let _ = writeln!(h, "<div class=\"{class}\"><b>{}</b>{}</div>", esc(&v), esc(k));
    }
    h.push_str("</div>\n");
    if let Some(l) = &r.logs {
        let _ = writeln!(
            h,
            "<p>TORCH_LOGS text: {} graph-break messages, {} recompile messages, {} recompile-limit warnings.</p>",
            l.graph_breaks, l.recompiles, l.recompile_limit_hits
        );
    }
    html_table(
        &mut h,
        "Graph breaks",
        &["count", "type", "registry", "where", "compiles", "explanation", "hints", "user stack"],
        r.breaks
            .iter()
            .map(|b| {
                vec![
                    b.count.to_string(),
                    format!("{}{}", if b.skipped_frame { "(frame skipped) " } else { "" }, b.kind),
                    b.registry_id.clone().unwrap_or_default(),
                    b.location.clone().unwrap_or_default(),
                    b.compile_ids.join(" "),
                    b.explanation.clone().unwrap_or_default(),
                    b.hints.join(" / "),
                    b.stack.join(" -> "),
                ]
            })
            .collect(),
    );
    html_table(
        &mut h,
        "Recompilations",
        &["compile", "frame", "guard failures"],
        r.recompile_reasons.iter().map(|rc| vec![rc.compile_id.clone(), rc.frame.clone(), rc.reasons.join("; ")]).collect(),
    );
    html_table(
        &mut h,
        "Restarted analyses (only the last attempt's graph is installed and counted)",
        &["compile", "frame", "attempts", "graphs discarded", "reasons"],
        r.restarted
            .iter()
            .map(|rs| vec![rs.compile_id.clone(), rs.frame.clone(), rs.attempts.to_string(), rs.superseded_graphs.to_string(), rs.reasons.join("; ")])
            .collect(),
    );
    html_table(
        &mut h,
        "Compiles that failed (the frame runs eager)",
        &["compile", "frame", "reason", "where"],
        r.fallbacks
            .iter()
            .map(|f| {
                vec![
                    f.compile_id.clone(),
                    f.frame.clone(),
                    format!("{}{}", if f.recompile_limit { "recompile limit: " } else { "" }, f.reason),
                    f.location.clone().unwrap_or_default(),
                ]
            })
            .collect(),
    );
    html_table(
        &mut h,
        "Frames",
        &["frame", "function", "defined at", "compiles", "ops per compile", "compile time (s)"],
        r.frames
            .iter()
            .map(|f| {
                vec![
                    f.label(),
                    f.name.clone(),
                    f.location.clone(),
                    f.compiles.len().to_string(),
                    f.compiles.iter().map(|c| c.graph_op_count.map_or("-".into(), |n| n.to_string())).collect::<Vec<_>>().join(", "),
                    format!("{:.2}", f.compiles.iter().map(|c| c.compile_time_s).sum::<f64>()),
                ]
            })
            .collect(),
    );
    let mut ops: Vec<(&String, &usize)> = r.captured.ops.iter().collect();
    ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    html_table(&mut h, "Captured ops", &["op", "count"], ops.iter().map(|(k, v)| vec![k.to_string(), v.to_string()]).collect());
    html_table(
        &mut h,
        "Captured user functions",
        &["function", "graph lines"],
        r.captured.user_functions.iter().map(|(k, v)| vec![k.clone(), v.to_string()]).collect(),
    );
    html_table(
        &mut h,
        "Modules with parameters in graphs",
        &["module", "parameters"],
        r.captured.modules.iter().map(|(k, v)| vec![k.clone(), v.to_string()]).collect(),
    );
    html_table(
        &mut h,
        &format!("Input problems ({})", r.issue_count),
        &["line", "problem"],
        r.issues.iter().map(|i| vec![i.line.to_string(), i.what.clone()]).collect(),
    );
    let _ = writeln!(h, "<p>Sources: {}</p>\n</body></html>", esc(&r.sources.join(", ")));
    h
}
