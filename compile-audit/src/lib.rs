//! An auditor for `torch.compile` runs.
//!
//! `torch.compile` loses its speed quietly: a graph break splits a model into pieces, a
//! recompilation per input shape burns minutes, a frame that hits the recompile limit runs
//! eager for the rest of the job. The logs say so, but nobody reads 10 MB of them. This
//! crate reads them for you: TORCH_TRACE structured logs (a file, or a folder of them, one
//! per rank) and TORCH_LOGS text, and says per frame what broke, why (with PyTorch's
//! graph-break registry id, explanation and hints), what recompiled and on which guard,
//! what fell back to eager, and what actually ran inside compiled graphs: "0 graph breaks"
//! means little if the 4-bit linears were never captured.
//!
//! # Design
//!
//! - **Streaming** ([`trace::TraceReader`]): one record in memory at a time; payloads are
//!   kept only for the three record kinds the audit reads, the rest are checksummed and
//!   dropped. Memory grows with distinct frames, breaks and ops, not with the file.
//! - **Graphs per compile id**: dynamo may trace one compile id several times (a restarted
//!   analysis: a new `attempt`), logging a graph each time; only the last attempt's graph
//!   is installed, so only it counts in [`Report::graphs`] and [`Report::captured`]. The
//!   restarts and their reasons are reported on their own ([`Report::restarted`]).
//! - **Never fatal on input**: unparseable lines, md5 mismatches, truncated payloads and
//!   unknown events become entries in [`Report::issues`] / [`Report::other_events`].
//! - **Gate** ([`gate::Gate`]): thresholds on breaks and recompiles, a hard fail on the
//!   recompile limit, and `--require-captured` patterns checked against captured ops,
//!   user functions and module paths.
//!
//! # Example
//!
//! ```no_run
//! let report = compile_audit::audit_paths(&["/tmp/trace_dir"]).expect("readable");
//! println!("{} graph breaks, {} recompiles", report.graph_breaks, report.recompiles);
//! print!("{}", compile_audit::render::markdown(&report));
//! ```
#![deny(missing_docs)]

pub mod audit;
pub mod diff;
pub mod gate;
pub mod parity;
pub mod render;
pub mod trace;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

pub use audit::{Auditor, Report};

/// Why a path could not be audited (only I/O: content problems are report issues).
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct ReadError {
    /// The path.
    pub path: String,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

fn files_under(p: &Path, out: &mut Vec<PathBuf>) -> Result<(), ReadError> {
    let err = |source| ReadError { path: p.display().to_string(), source };
    if p.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(p).map_err(err)?.flatten().map(|e| e.path()).collect();
        entries.sort();
        for e in entries {
            files_under(&e, out)?;
        }
    } else {
        std::fs::metadata(p).map_err(err)?;
        out.push(p.to_path_buf());
    }
    Ok(())
}

/// Whether a file looks like a structured trace (a record in its first lines) rather
/// than TORCH_LOGS text.
fn is_trace(path: &Path) -> std::io::Result<bool> {
    let f = BufReader::new(std::fs::File::open(path)?);
    for line in f.split(b'\n').take(64) {
        let line = line?;
        let s = String::from_utf8_lossy(&line);
        if let Some(i) = s.find("] {") {
            if serde_json::from_str::<serde_json::Value>(&s[i + 2..]).is_ok() {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Feeds one file (trace or TORCH_LOGS text) to an auditor.
pub fn audit_file(auditor: &mut Auditor, path: &Path) -> Result<(), ReadError> {
    let err = |source| ReadError { path: path.display().to_string(), source };
    let name = path.display().to_string();
    auditor.source(&name);
    let trace = is_trace(path).map_err(err)?;
    let input = BufReader::new(std::fs::File::open(path).map_err(err)?);
    if trace {
        feed_trace(auditor, &name, input);
    } else {
        for line in input.split(b'\n') {
            auditor.log_line(&String::from_utf8_lossy(&line.map_err(err)?));
        }
    }
    Ok(())
}

/// Feeds a structured trace from any reader (`name` labels its issues). Never fails:
/// whatever does not parse becomes an issue in the report.
pub fn feed_trace(auditor: &mut Auditor, name: &str, input: impl BufRead) {
    auditor.begin_trace();
    let mut r = trace::TraceReader::new(input, audit::wants_payload);
    while let Some(item) = r.next_item() {
        match item {
            trace::Item::Record(rec) => auditor.record(rec),
            trace::Item::Issue(i) => auditor.issue(name, i),
        }
    }
}

/// Audits files and folders (every file under a folder, sorted), traces and TORCH_LOGS
/// text alike.
pub fn audit_paths<P: AsRef<Path>>(paths: &[P]) -> Result<Report, ReadError> {
    let mut files = vec![];
    for p in paths {
        files_under(p.as_ref(), &mut files)?;
    }
    let mut a = Auditor::new();
    for f in &files {
        audit_file(&mut a, f)?;
    }
    Ok(a.finish())
}
