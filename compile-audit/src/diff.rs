//! What changed between two audited runs.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::Report;

/// A change in one counted thing.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Change {
    /// What (`graph breaks`, a break `type at place`, an op name, ...).
    pub what: String,
    /// In run A.
    pub a: usize,
    /// In run B.
    pub b: usize,
}

/// The differences, grouped.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Diff {
    /// Headline counters that differ.
    pub totals: Vec<Change>,
    /// Graph breaks (by type and place) whose count differs, appeared (a = 0) or disappeared (b = 0).
    pub breaks: Vec<Change>,
    /// Eager fallbacks (by frame and reason) that appeared or disappeared.
    pub fallbacks: Vec<Change>,
    /// Captured ops whose count differs.
    pub ops: Vec<Change>,
    /// Modules captured in only one run (a or b = 1).
    pub modules: Vec<Change>,
}

impl Diff {
    /// Whether nothing differs.
    pub fn is_empty(&self) -> bool {
        self.totals.is_empty() && self.breaks.is_empty() && self.fallbacks.is_empty() && self.ops.is_empty() && self.modules.is_empty()
    }
}

fn changes(a: &BTreeMap<String, usize>, b: &BTreeMap<String, usize>) -> Vec<Change> {
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let (x, y) = (a.get(k).copied().unwrap_or(0), b.get(k).copied().unwrap_or(0));
            (x != y).then(|| Change { what: k.clone(), a: x, b: y })
        })
        .collect()
}

/// Compares run `a` with run `b`.
pub fn diff(a: &Report, b: &Report) -> Diff {
    let totals_of = |r: &Report| -> BTreeMap<String, usize> {
        [
            ("graph breaks", r.graph_breaks),
            ("recompiles", r.recompiles),
            ("graphs", r.graphs),
            ("eager fallbacks", r.fallbacks.len()),
            ("recompile-limit hits", r.recompile_limit_hits()),
            ("input problems", r.issue_count),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    };
    let breaks_of = |r: &Report| -> BTreeMap<String, usize> {
        r.breaks
            .iter()
            .map(|g| (format!("{}{} at {}", if g.skipped_frame { "(frame skipped) " } else { "" }, g.kind, g.location.as_deref().unwrap_or("?")), g.count))
            .fold(BTreeMap::new(), |mut m, (k, v)| {
                *m.entry(k).or_default() += v;
                m
            })
    };
    let fallbacks_of = |r: &Report| -> BTreeMap<String, usize> {
        r.fallbacks.iter().fold(BTreeMap::new(), |mut m, f| {
            *m.entry(format!("{}: {}", f.frame, f.reason)).or_default() += 1;
            m
        })
    };
    let modules_of = |r: &Report| -> BTreeMap<String, usize> { r.captured.modules.keys().map(|k| (k.clone(), 1)).collect() };
    Diff {
        totals: changes(&totals_of(a), &totals_of(b)),
        breaks: changes(&breaks_of(a), &breaks_of(b)),
        fallbacks: changes(&fallbacks_of(a), &fallbacks_of(b)),
        ops: changes(&a.captured.ops, &b.captured.ops),
        modules: changes(&modules_of(a), &modules_of(b)),
    }
}

/// The diff as Markdown.
pub fn markdown(d: &Diff) -> String {
    if d.is_empty() {
        return "No differences.\n".into();
    }
    let mut m = String::new();
    for (title, rows) in
        [("Totals", &d.totals), ("Graph breaks", &d.breaks), ("Eager fallbacks", &d.fallbacks), ("Captured ops", &d.ops), ("Captured modules", &d.modules)]
    {
        if rows.is_empty() {
            continue;
        }
        m += &format!("## {title}\n\n| | A | B | change |\n|---|---|---|---|\n");
        for c in rows {
            let tag = if c.a == 0 { "appeared" } else if c.b == 0 { "disappeared" } else { "changed" };
            m += &format!("| {} | {} | {} | {tag} |\n", c.what.replace('|', "\\|"), c.a, c.b);
        }
        m += "\n";
    }
    m
}
