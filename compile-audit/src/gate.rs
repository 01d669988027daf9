//! CI gates over a [`Report`].

use crate::Report;

/// Thresholds. A frame that hit the recompile limit always fails the gate: it runs eager.
#[derive(Debug, Clone, Default)]
pub struct Gate {
    /// Most graph breaks allowed.
    pub max_graph_breaks: Option<usize>,
    /// Most recompilations allowed.
    pub max_recompiles: Option<usize>,
    /// Substrings that must name a captured op, user function or module.
    pub require_captured: Vec<String>,
}

/// One failed check, with a one-screen explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Short name of the check.
    pub check: String,
    /// What was found and what to do about it.
    pub explanation: String,
}

impl Gate {
    /// Checks a report; empty means it passes.
    pub fn check(&self, r: &Report) -> Vec<Violation> {
        let mut v = vec![];
        if let Some(max) = self.max_graph_breaks {
            if r.graph_breaks > max {
                let mut e = format!("{} graph breaks (allowed {max}):", r.graph_breaks);
                for b in r.breaks.iter().take(5) {
                    e += &format!(
                        "\n  {}x {}{} at {}",
                        b.count,
                        b.kind,
                        b.registry_id.as_ref().map(|id| format!(" [{id}]")).unwrap_or_default(),
                        b.location.as_deref().unwrap_or("?")
                    );
                    if let Some(h) = b.hints.first() {
                        e += &format!("\n      hint: {h}");
                    }
                }
                v.push(Violation { check: "max-graph-breaks".into(), explanation: e });
            }
        }
        if let Some(max) = self.max_recompiles {
            if r.recompiles > max {
                let mut e = format!("{} recompilations (allowed {max}):", r.recompiles);
                for rc in r.recompile_reasons.iter().take(5) {
                    e += &format!("\n  {} {}: {}", rc.compile_id, rc.frame, rc.reasons.first().map_or("?", |s| s.as_str()));
                }
                v.push(Violation { check: "max-recompiles".into(), explanation: e });
            }
        }
        let hits = r.recompile_limit_hits();
        if hits > 0 {
            let frames: Vec<String> =
                r.fallbacks.iter().filter(|f| f.recompile_limit).map(|f| format!("{} ({})", f.compile_id, f.frame)).collect();
            v.push(Violation {
                check: "recompile-limit".into(),
                explanation: format!(
                    "{hits} frame(s) hit torch._dynamo.config.recompile_limit and now run eager: {}. \
                     Mark the varying dimension dynamic (torch._dynamo.mark_dynamic / dynamic=True) or pad inputs.",
                    if frames.is_empty() { "see the TORCH_LOGS warning".to_string() } else { frames.join(", ") }
                ),
            });
        }
        for p in &self.require_captured {
            if !r.captured.matches(p) {
                v.push(Violation {
                    check: "require-captured".into(),
                    explanation: format!(
                        "nothing matching `{p}` ran inside a compiled graph ({} ops, {} user functions, {} modules captured): \
                         it runs eager, between graphs",
                        r.captured.ops.len(),
                        r.captured.user_functions.len(),
                        r.captured.modules.len()
                    ),
                });
            }
        }
        v
    }
}
