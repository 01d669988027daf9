//! Turns a stream of trace records (and TORCH_LOGS text) into a [`Report`].

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::trace::{Issue, Record};

/// At most this many issues are kept verbatim; the rest are only counted.
const MAX_ISSUES: usize = 100;

/// One compilation of a frame (`frame_id/frame_compile_id`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Compile {
    /// `frame_id/frame_compile_id`.
    pub compile_id: String,
    /// FX ops in the graph dynamo produced (absent when it produced none).
    pub graph_op_count: Option<u64>,
    /// Wall time of the whole frame compile, seconds.
    pub compile_time_s: f64,
    /// Why dynamo restarted the analysis (a graph break, or an internal restart such as
    /// `TensorifyScalarRestartAnalysis`), first lines, as `compilation_metrics` lists them
    /// (a set: a reason that restarted twice appears once).
    pub restart_reasons: Vec<String>,
    /// How many times dynamo traced this compile id: the highest `attempt` seen, plus one.
    /// More than 1 when the analysis restarted.
    pub attempts: u64,
    /// `dynamo_output_graph`s logged by attempts that were then restarted: dynamo threw
    /// them away, so they are not in [`Report::graphs`] nor in [`Report::captured`].
    pub superseded_graphs: usize,
    /// Why the compile failed, if it did: the frame then runs eager.
    pub fail: Option<String>,
}

impl Compile {
    /// Restarts of this compile's analysis: `attempts - 1`, or the number of distinct
    /// reasons when the trace has no attempt numbers (older PyTorch).
    pub fn restarts(&self) -> usize {
        (self.attempts.saturating_sub(1) as usize).max(self.restart_reasons.len())
    }
}

/// A compiled frame (a Python code object dynamo processed).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Frame {
    /// The rank that compiled it (distributed runs only).
    pub rank: Option<u64>,
    /// dynamo's frame id (per rank).
    pub frame_id: u64,
    /// The code object's name (`forward`, `torch_dynamo_resume_in_forward_at_41`, ...).
    pub name: String,
    /// Where it is defined, `file:line`.
    pub location: String,
    /// Its compilations in order.
    pub compiles: Vec<Compile>,
}

impl Frame {
    /// `frame_id`, or `rN:frame_id` in a distributed run.
    pub fn label(&self) -> String {
        match self.rank {
            Some(r) => format!("r{r}:{}", self.frame_id),
            None => self.frame_id.to_string(),
        }
    }
}

/// A graph break, deduplicated by (where, what).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GraphBreak {
    /// The break type, e.g. `Failed to trace builtin operator`.
    pub kind: String,
    /// PyTorch's graph-break registry id, e.g. `GB0059`, when the message links it.
    pub registry_id: Option<String>,
    /// PyTorch's explanation.
    pub explanation: Option<String>,
    /// PyTorch's hints.
    pub hints: Vec<String>,
    /// User code location, `file:line`.
    pub location: Option<String>,
    /// The user-code stack (innermost last), as `file:line in function`, without
    /// PyTorch's own frames.
    pub stack: Vec<String>,
    /// How many times it happened.
    pub count: usize,
    /// The compiles it happened in.
    pub compile_ids: Vec<String>,
    /// Dynamo could not resume after this break and skipped the whole frame (it runs
    /// eager; listed among the fallbacks too). Not counted in `graph_breaks`.
    pub skipped_frame: bool,
}

/// A recompilation and the guard failures that caused it.
#[derive(Debug, Clone, Serialize)]
pub struct Recompile {
    /// The new compile's id.
    pub compile_id: String,
    /// The frame's name.
    pub frame: String,
    /// Guard failures, one per line of PyTorch's `recompile_reasons`.
    pub reasons: Vec<String>,
}

/// A compile whose analysis dynamo restarted: the same compile id traced again with a
/// new `attempt` number (after a graph break, to stop before it; or an internal restart
/// such as `TensorifyScalarRestartAnalysis`). Only the last attempt's graph is installed.
#[derive(Debug, Clone, Serialize)]
pub struct Restart {
    /// The compile id.
    pub compile_id: String,
    /// The frame's name.
    pub frame: String,
    /// Times the compile id was traced (restarts + 1).
    pub attempts: u64,
    /// Why, first lines (see [`Compile::restart_reasons`]).
    pub reasons: Vec<String>,
    /// Graphs the restarted attempts logged and dynamo discarded.
    pub superseded_graphs: usize,
}

/// A compile that failed: that frame runs eager from then on.
#[derive(Debug, Clone, Serialize)]
pub struct Fallback {
    /// The compile id.
    pub compile_id: String,
    /// The frame's name (if dynamo got that far).
    pub frame: String,
    /// First line of the failure.
    pub reason: String,
    /// User location, when reported.
    pub location: Option<String>,
    /// Whether this is the recompile limit (the frame runs eager for every new input).
    pub recompile_limit: bool,
}

/// What ran inside compiled graphs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Captured {
    /// FX op (callee) -> occurrences over all graphs.
    pub ops: BTreeMap<String, usize>,
    /// User function (`file:function`) -> graph lines attributed to it.
    pub user_functions: BTreeMap<String, usize>,
    /// Module path (from the graph's parameter inputs) -> parameters seen.
    pub modules: BTreeMap<String, usize>,
}

impl Captured {
    /// Whether `pattern` (a substring) names a captured op, user function or module.
    pub fn matches(&self, pattern: &str) -> bool {
        self.ops.keys().chain(self.user_functions.keys()).chain(self.modules.keys()).any(|k| k.contains(pattern))
    }

    fn add(&mut self, other: &Captured) {
        for (mine, theirs) in [(&mut self.ops, &other.ops), (&mut self.user_functions, &other.user_functions), (&mut self.modules, &other.modules)] {
            for (k, n) in theirs {
                *mine.entry(k.clone()).or_default() += n;
            }
        }
    }
}

/// What TORCH_LOGS text (`graph_breaks`, `recompiles` artifacts) says.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct LogSummary {
    /// `Graph break in user code at ...` messages.
    pub graph_breaks: usize,
    /// `Recompiling function ...` messages.
    pub recompiles: usize,
    /// `hit config.recompile_limit` warnings.
    pub recompile_limit_hits: usize,
}

/// The audit of one run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Files read.
    pub sources: Vec<String>,
    /// Graph-break events (each `dynamo_graph_break_reason`, except the re-reports of a
    /// break that made dynamo skip its frame, which count as fallbacks).
    pub graph_breaks: usize,
    /// Recompilations (distinct compile ids with `frame_compile_id > 0`).
    pub recompiles: usize,
    /// Graphs dynamo installed: per compile id, the `dynamo_output_graph`s of its last
    /// attempt. A restarted analysis logs a graph per attempt, but only the last one runs;
    /// the others are [`Report::superseded_graphs`].
    pub graphs: usize,
    /// Restarted analyses, summed over compiles (see [`Compile::restarts`]).
    pub restarts: usize,
    /// Graphs logged by attempts that dynamo then restarted (not counted in `graphs`).
    pub superseded_graphs: usize,
    /// The compiles whose analysis restarted, with why.
    pub restarted: Vec<Restart>,
    /// Compiles that failed and left their frame eager, recompile-limit hits among them.
    pub fallbacks: Vec<Fallback>,
    /// Deduplicated graph breaks, most frequent first.
    pub breaks: Vec<GraphBreak>,
    /// Recompilations with their reasons.
    pub recompile_reasons: Vec<Recompile>,
    /// Frames by id.
    pub frames: Vec<Frame>,
    /// Sum of frame compile times, seconds.
    pub total_compile_time_s: f64,
    /// What ran inside compiled graphs (the installed ones: superseded attempts excluded).
    pub captured: Captured,
    /// Records of kinds the auditor does not interpret, by kind.
    pub other_events: BTreeMap<String, usize>,
    /// Problems in the input (first 100).
    pub issues: Vec<Issue>,
    /// Total number of problems in the input.
    pub issue_count: usize,
    /// TORCH_LOGS text, if any was read.
    pub logs: Option<LogSummary>,
}

impl Report {
    /// Recompile-limit hits (from the trace, or the logs when only they say so).
    pub fn recompile_limit_hits(&self) -> usize {
        let in_trace = self.fallbacks.iter().filter(|f| f.recompile_limit).count();
        in_trace.max(self.logs.as_ref().map_or(0, |l| l.recompile_limit_hits))
    }
}

/// The graphs of one compile id's latest attempt seen so far.
#[derive(Default)]
struct AttemptGraphs {
    attempt: u64,
    graphs: usize,
    captured: Captured,
}

/// (trace fed, rank, frame_id, frame_compile_id): compile ids are unique within one
/// process's trace (per rank), not across traces of separate processes.
type GraphKey = (usize, Option<u64>, u64, u64);

/// Accumulates records into a report; memory grows with the number of distinct frames,
/// breaks and ops, not with the trace's size. (A compile in progress keeps the op counts
/// of its latest attempt apart, since a later attempt replaces them, until its
/// `compilation_metrics` settles them.)
#[derive(Default)]
pub struct Auditor {
    report: Report,
    files: Vec<String>,
    frames: BTreeMap<(Option<u64>, u64), Frame>,
    breaks: BTreeMap<(String, String), GraphBreak>,
    recompiled: std::collections::BTreeSet<(Option<u64>, u64, u64)>,
    /// Which trace is being fed (counts [`Auditor::begin_trace`] calls).
    trace_no: usize,
    /// Graphs of compiles in progress, by compile id.
    graphs: BTreeMap<GraphKey, AttemptGraphs>,
    /// Graphs that are final: of compiles that ended, and of records without a compile id.
    settled: AttemptGraphs,
}

/// Which payloads the auditor reads (the rest are checksummed and dropped).
pub fn wants_payload(event: &str, body: &Value) -> bool {
    match event {
        "dynamo_output_graph" => true,
        "artifact" => matches!(body.get("name").and_then(Value::as_str), Some("dynamo_graph_break_reason" | "recompile_reasons")),
        _ => false,
    }
}

fn first_line(s: &str) -> String {
    s.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("").to_string()
}

/// `.../gb/gb0059.html` -> `GB0059`.
fn registry_id(text: &str) -> Option<String> {
    let i = text.find("/gb/gb")?;
    let digits: String = text[i + 6..].chars().take_while(|c| c.is_ascii_digit()).collect();
    (!digits.is_empty()).then(|| format!("GB{digits}"))
}

fn short_path(p: &str) -> String {
    let parts: Vec<&str> = p.rsplit('/').take(2).collect();
    parts.into_iter().rev().collect::<Vec<_>>().join("/")
}

/// Parses a `dynamo_graph_break_reason` payload.
fn parse_break(text: &str) -> GraphBreak {
    let mut b = GraphBreak::default();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i].trim();
        if let Some(loc) = l.strip_prefix("Graph break in user code at ") {
            b.location = Some(short_path(loc.trim()));
        } else if let Some(r) = l.strip_prefix("Graph Break Reason:") {
            let r = r.trim();
            // Newer PyTorch: "Encountered graph break when attempting to trace ...:" (or
            // "Failed to handle graph break gracefully. ... Graph break encountered:") then
            // the break type on the next non-empty line; older: the reason right here.
            b.skipped_frame = r.starts_with("Failed to handle graph break gracefully");
            if r.starts_with("Encountered graph break") || b.skipped_frame || r.is_empty() {
                if let Some(next) = lines[i + 1..].iter().map(|s| s.trim()).find(|s| !s.is_empty()) {
                    b.kind = next.to_string();
                }
            } else {
                b.kind = r.to_string();
            }
        } else if let Some(e) = l.strip_prefix("Explanation:") {
            b.explanation.get_or_insert_with(|| e.trim().to_string());
        } else if let Some(h) = l.strip_prefix("Hint:") {
            b.hints.push(h.trim().to_string());
        } else if l == "User code traceback:" {
            let mut j = i + 1;
            while j < lines.len() {
                let t = lines[j].trim();
                if let Some(rest) = t.strip_prefix("File \"") {
                    // File "path", line N, in func
                    if let Some((path, tail)) = rest.split_once("\", line ") {
                        // PyTorch's own frames (dynamo's interpreter, Module.__call__) are
                        // noise here: the user wants their code and their libraries.
                        if !(path.contains("site-packages/torch/") || path.contains("/torch/_dynamo/")) {
                            let (line, func) = tail.split_once(", in ").unwrap_or((tail, "?"));
                            b.stack.push(format!("{}:{} in {}", short_path(path), line, func));
                        }
                    }
                }
                j += 1;
            }
            break;
        }
        i += 1;
    }
    b.registry_id = registry_id(text);
    if b.kind.is_empty() {
        b.kind = first_line(text);
    }
    b
}

/// Module path from a graph input name like `L_self_modules_layers_modules_0_modules_q_proj_parameters_weight_`.
fn module_of(input: &str) -> Option<String> {
    let rest = input.strip_prefix("L_self_")?;
    let rest = rest.strip_prefix("modules_")?;
    let end = rest.find("_parameters_").or_else(|| rest.find("_buffers_"))?;
    Some(rest[..end].split("_modules_").collect::<Vec<_>>().join("."))
}

/// Counts ops, user functions and modules in a `dynamo_output_graph` payload (FX code).
fn scan_graph(code: &str, into: &mut Captured) {
    for line in code.lines() {
        let t = line.trim();
        if let Some(f) = t.strip_prefix("# File: ") {
            // "# File: /path/x.py:37 in forward, code: ..."
            if let Some((loc, rest)) = f.split_once(" in ") {
                let path = loc.rsplit_once(':').map_or(loc, |(p, _)| p);
                let func = rest.split(", code:").next().unwrap_or(rest).trim();
                *into.user_functions.entry(format!("{}:{}", short_path(path), func)).or_default() += 1;
            }
            continue;
        }
        if t.starts_with("def forward(") {
            for param in t.trim_start_matches("def forward(").split(", ") {
                let name = param.split(':').next().unwrap_or("").trim();
                if let Some(m) = module_of(name) {
                    *into.modules.entry(m).or_default() += 1;
                }
            }
            continue;
        }
        let Some((_, rhs)) = t.split_once(" = ") else { continue };
        let Some(open) = rhs.find('(') else { continue };
        let callee = &rhs[..open];
        if callee.is_empty() || callee.contains(' ') || callee.contains('[') {
            continue;
        }
        let op = if callee.starts_with("torch.") || callee.starts_with("operator.") || callee.starts_with("math.") {
            callee.to_string()
        } else if let Some((_, method)) = callee.rsplit_once('.') {
            format!("Tensor.{method}")
        } else {
            callee.to_string()
        };
        *into.ops.entry(op).or_default() += 1;
    }
}

impl Auditor {
    /// A fresh auditor.
    pub fn new() -> Self {
        Self::default()
    }

    /// Notes that a file is being read.
    pub fn source(&mut self, name: &str) {
        self.files.push(name.to_string());
    }

    /// Notes that the records that follow come from another trace (another process):
    /// a compile id seen again there is a different compile. [`crate::feed_trace`] calls it.
    pub fn begin_trace(&mut self) {
        self.trace_no += 1;
    }

    /// Records a problem in the input.
    pub fn issue(&mut self, source: &str, issue: Issue) {
        self.report.issue_count += 1;
        if self.report.issues.len() < MAX_ISSUES {
            self.report.issues.push(Issue { line: issue.line, what: format!("{source}: {}", issue.what) });
        }
    }

    fn frame(&mut self, rank: Option<u64>, id: u64) -> &mut Frame {
        self.frames.entry((rank, id)).or_insert_with(|| Frame { rank, frame_id: id, ..Default::default() })
    }

    fn frame_name(&self, rec: &Record) -> String {
        rec.frame_id.and_then(|f| self.frames.get(&(rec.rank, f))).map(|f| f.name.clone()).unwrap_or_default()
    }

    /// The compile a record belongs to (created on first sight), its attempt count updated.
    fn compile(&mut self, rec: &Record) -> Option<&mut Compile> {
        let (fid, cid) = (rec.frame_id?, rec.compile_id()?);
        let f = self.frame(rec.rank, fid);
        let i = match f.compiles.iter().position(|c| c.compile_id == cid) {
            Some(i) => i,
            None => {
                f.compiles.push(Compile { compile_id: cid, ..Default::default() });
                f.compiles.len() - 1
            }
        };
        let c = &mut f.compiles[i];
        c.attempts = c.attempts.max(rec.attempt.unwrap_or(0) + 1);
        Some(c)
    }

    /// A `dynamo_output_graph`: counted for its compile id's latest attempt only. A higher
    /// attempt supersedes what earlier attempts logged (dynamo restarted and discarded
    /// them); graphs of the same attempt add up; a lower attempt than one already seen is
    /// stale and only counted as superseded.
    fn output_graph(&mut self, rec: &Record) {
        let code = rec.payload.as_deref().unwrap_or("");
        let (Some(fid), Some(cid)) = (rec.frame_id, rec.frame_compile_id) else {
            self.settled.graphs += 1;
            scan_graph(code, &mut self.settled.captured);
            return;
        };
        let attempt = rec.attempt.unwrap_or(0);
        let g = self.graphs.entry((self.trace_no, rec.rank, fid, cid)).or_insert_with(|| AttemptGraphs { attempt, ..Default::default() });
        let superseded = if attempt > g.attempt {
            std::mem::replace(g, AttemptGraphs { attempt, ..Default::default() }).graphs
        } else if attempt < g.attempt {
            1
        } else {
            0
        };
        if attempt == g.attempt {
            g.graphs += 1;
            scan_graph(code, &mut g.captured);
        }
        self.report.superseded_graphs += superseded;
        if let Some(c) = self.compile(rec) {
            c.superseded_graphs += superseded;
        }
    }

    /// A compile's graphs are final once it ends (`compilation_metrics`, logged after every
    /// attempt) or once its id starts a new compile (`dynamo_start`, logged once per compile,
    /// before the first attempt: an id reused after `torch._dynamo.reset()`).
    fn settle(&mut self, rec: &Record) {
        if let (Some(f), Some(c)) = (rec.frame_id, rec.frame_compile_id) {
            if let Some(g) = self.graphs.remove(&(self.trace_no, rec.rank, f, c)) {
                self.settled.graphs += g.graphs;
                self.settled.captured.add(&g.captured);
            }
        }
    }

    // A compile id with frame_compile_id > 0, seen in a dynamo_start or a recompile_reasons
    // artifact (a compile refused by the recompile limit has only the latter).
    fn note_recompile(&mut self, rec: &Record) {
        if let (Some(f), Some(c)) = (rec.frame_id, rec.frame_compile_id) {
            if c > 0 {
                self.recompiled.insert((rec.rank, f, c));
            }
        }
    }

    /// Feeds one record.
    pub fn record(&mut self, rec: Record) {
        match rec.event.as_str() {
            "str" => {}
            "dynamo_start" => {
                self.settle(&rec);
                self.note_recompile(&rec);
                let _ = self.compile(&rec);
            }
            "dynamo_output_graph" => self.output_graph(&rec),
            "compilation_metrics" => {
                let m = &rec.body;
                let s = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_string);
                let name = s("co_name").unwrap_or_default();
                let location = match (s("co_filename"), m.get("co_firstlineno").and_then(Value::as_u64)) {
                    (Some(f), Some(l)) => format!("{}:{l}", short_path(&f)),
                    _ => String::new(),
                };
                let fail = s("fail_type").map(|t| {
                    let reason = s("fail_reason").map(|r| first_line(&r)).unwrap_or_default();
                    if reason.is_empty() { t } else { reason }
                });
                let restarts: Vec<String> = m
                    .get("restart_reasons")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_str).map(first_line).collect())
                    .unwrap_or_default();
                let time = m.get("entire_frame_compile_time_s").and_then(Value::as_f64).unwrap_or(0.0);
                let ops = m.get("graph_op_count").and_then(Value::as_u64);
                if let Some(fid) = rec.frame_id {
                    let f = self.frame(rec.rank, fid);
                    if f.name.is_empty() && !name.is_empty() {
                        f.name = name.clone();
                        f.location = location.clone();
                    }
                }
                self.report.total_compile_time_s += time;
                let frame_name = if name.is_empty() {
                    self.frame_name(&rec)
                } else {
                    name.clone()
                };
                if let Some(reason) = &fail {
                    let fail_loc = match (s("fail_user_frame_filename"), m.get("fail_user_frame_lineno").and_then(Value::as_u64)) {
                        (Some(f), Some(l)) => Some(format!("{}:{l}", short_path(&f))),
                        _ => None,
                    };
                    self.report.fallbacks.push(Fallback {
                        compile_id: rec.compile_id().unwrap_or_default(),
                        frame: frame_name,
                        reason: reason.clone(),
                        location: fail_loc,
                        recompile_limit: reason.contains("recompile limit") || reason.contains("recompile_limit"),
                    });
                }
                if let Some(c) = self.compile(&rec) {
                    c.compile_time_s += time;
                    c.graph_op_count = ops.or(c.graph_op_count);
                    c.restart_reasons = restarts;
                    c.fail = fail;
                }
                self.settle(&rec);
            }
            "artifact" => match rec.artifact_name() {
                Some("dynamo_graph_break_reason") => {
                    let b = parse_break(rec.payload.as_deref().unwrap_or(""));
                    if !b.skipped_frame {
                        self.report.graph_breaks += 1;
                    }
                    let key = (b.location.clone().unwrap_or_default(), format!("{}{}", b.kind, b.skipped_frame));
                    let cid = rec.compile_id().unwrap_or_default();
                    let e = self.breaks.entry(key).or_insert(GraphBreak { count: 0, ..b });
                    e.count += 1;
                    if !e.compile_ids.contains(&cid) {
                        e.compile_ids.push(cid);
                    }
                }
                Some("recompile_reasons") => {
                    self.note_recompile(&rec);
                    // The payload is a JSON list of strings, or plain text (one per line).
                    let text = rec.payload.as_deref().unwrap_or("");
                    let reasons: Vec<String> = match serde_json::from_str::<Vec<String>>(text) {
                        Ok(list) => list.iter().flat_map(|s| s.lines()).map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect(),
                        Err(_) => text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect(),
                    };
                    let frame = self.frame_name(&rec);
                    self.report.recompile_reasons.push(Recompile { compile_id: rec.compile_id().unwrap_or_default(), frame, reasons });
                }
                other => *self.report.other_events.entry(format!("artifact:{}", other.unwrap_or("?"))).or_default() += 1,
            },
            other => *self.report.other_events.entry(other.to_string()).or_default() += 1,
        }
    }

    /// Feeds TORCH_LOGS text (one line at a time).
    pub fn log_line(&mut self, line: &str) {
        let logs = self.report.logs.get_or_insert_with(LogSummary::default);
        if line.contains("[__graph_breaks] Graph break in user code at") {
            logs.graph_breaks += 1;
        } else if line.contains("[__recompiles] Recompiling function") {
            logs.recompiles += 1;
        } else if line.contains("hit config.recompile_limit") || line.contains("hit config.cache_size_limit") {
            logs.recompile_limit_hits += 1;
        }
    }

    /// The finished report.
    pub fn finish(mut self) -> Report {
        self.report.sources = self.files;
        self.report.recompiles = self.recompiled.len();
        self.report.frames = self.frames.into_values().collect();
        // Compiles still in progress (a trace cut short) count with their latest attempt.
        let mut all = std::mem::take(&mut self.settled);
        for g in self.graphs.values() {
            all.graphs += g.graphs;
            all.captured.add(&g.captured);
        }
        self.report.graphs = all.graphs;
        self.report.captured = all.captured;
        for f in &self.report.frames {
            for c in f.compiles.iter().filter(|c| c.restarts() > 0) {
                self.report.restarts += c.restarts();
                self.report.restarted.push(Restart {
                    compile_id: c.compile_id.clone(),
                    frame: f.name.clone(),
                    attempts: c.attempts,
                    reasons: c.restart_reasons.clone(),
                    superseded_graphs: c.superseded_graphs,
                });
            }
        }
        let mut breaks: Vec<GraphBreak> = self.breaks.into_values().collect();
        breaks.sort_by(|a, b| b.count.cmp(&a.count).then(a.location.cmp(&b.location)));
        self.report.breaks = breaks;
        self.report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_paths_from_graph_inputs() {
        assert_eq!(module_of("L_self_modules_norm_parameters_weight_").as_deref(), Some("norm"));
        assert_eq!(
            module_of("L_self_modules_layers_modules_0_modules_self_attn_modules_q_proj_parameters_weight_").as_deref(),
            Some("layers.0.self_attn.q_proj")
        );
        assert_eq!(module_of("L_x_"), None);
    }

    fn graph(frame: Option<(u64, u64)>, attempt: Option<u64>, code: &str) -> Record {
        Record {
            line: 1,
            event: "dynamo_output_graph".into(),
            body: Value::Null,
            frame_id: frame.map(|f| f.0),
            frame_compile_id: frame.map(|f| f.1),
            attempt,
            rank: None,
            payload: Some(code.into()),
        }
    }

    #[test]
    fn graphs_count_per_compile_id_and_last_attempt() {
        let (old, new) = ("x = torch.sin(a)", "x = torch.cos(a)");
        let mut a = Auditor::new();
        a.begin_trace();
        a.record(graph(Some((0, 0)), Some(0), old));
        a.record(graph(Some((0, 0)), Some(2), new)); // attempt 2 supersedes attempt 0
        a.record(graph(Some((0, 0)), Some(1), old)); // a stale attempt: not counted
        a.record(graph(Some((0, 1)), Some(0), new)); // another compile id: counted
        a.record(graph(None, None, new)); // no compile id: counted as it comes
        a.begin_trace(); // another process: its 0/0 is another compile
        a.record(graph(Some((0, 0)), None, new));
        // The same id starting a new compile (after torch._dynamo.reset()): another graph.
        a.record(Record { event: "dynamo_start".into(), payload: None, ..graph(Some((0, 0)), Some(0), "") });
        a.record(graph(Some((0, 0)), Some(0), new));
        let r = a.finish();
        assert_eq!((r.graphs, r.superseded_graphs), (5, 2));
        assert_eq!(r.captured.ops.get("torch.cos"), Some(&5));
        assert_eq!(r.captured.ops.get("torch.sin"), None, "superseded graphs are not captured");
        assert_eq!(r.restarts, 2, "0/0 traced 3 times in the first trace");
        assert_eq!((r.restarted[0].compile_id.as_str(), r.restarted[0].attempts, r.restarted[0].superseded_graphs), ("0/0", 3, 2));
    }

    #[test]
    fn registry_ids() {
        assert_eq!(registry_id("see https://x/compile-graph-break-site/gb/gb0124.html").as_deref(), Some("GB0124"));
        assert_eq!(registry_id("no link"), None);
    }
}
