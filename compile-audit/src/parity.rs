//! Eager-vs-compiled loss parity from per-step loss logs (JSONL).

use std::path::Path;

use serde::Serialize;

/// One step's comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// Step number.
    pub step: u64,
    /// Eager loss.
    pub eager: f64,
    /// Compiled loss.
    pub compiled: f64,
    /// |compiled - eager| / |eager|.
    pub rel: f64,
}

/// The comparison of two runs.
#[derive(Debug, Clone, Serialize)]
pub struct Parity {
    /// Steps present in both, in order.
    pub steps: Vec<Step>,
    /// Largest relative difference.
    pub max_rel: f64,
    /// Steps in only one of the files.
    pub unmatched: Vec<u64>,
}

impl Parity {
    /// Steps over `rtol` (or non-finite).
    pub fn violations(&self, rtol: f64) -> Vec<&Step> {
        // Not `<=`: a NaN difference (or rtol) is a violation too.
        self.steps.iter().filter(|s| !matches!(s.rel.partial_cmp(&rtol), Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal))).collect()
    }
}

/// Why a loss log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ParityError {
    /// I/O.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A line that is not a JSON object with a numeric `loss`.
    #[error("{path}:{line}: {problem}")]
    Line {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        problem: String,
    },
}

/// Reads `{"step": N, "loss": X}` lines (`step` defaults to the line's index).
pub fn read_losses(path: &Path) -> Result<Vec<(u64, f64)>, ParityError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ParityError::Io { path: p.clone(), source })?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |problem: String| ParityError::Line { path: p.clone(), line: i + 1, problem };
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let loss = v.get("loss").and_then(|l| l.as_f64()).ok_or_else(|| bad("no numeric `loss` field".into()))?;
        let step = v.get("step").and_then(|s| s.as_u64()).unwrap_or(out.len() as u64);
        out.push((step, loss));
    }
    Ok(out)
}

/// Compares two loss logs step by step.
pub fn compare(eager: &[(u64, f64)], compiled: &[(u64, f64)]) -> Parity {
    let c: std::collections::BTreeMap<u64, f64> = compiled.iter().copied().collect();
    let e: std::collections::BTreeMap<u64, f64> = eager.iter().copied().collect();
    let mut steps = vec![];
    let mut unmatched = vec![];
    for (&step, &el) in &e {
        match c.get(&step) {
            Some(&cl) => {
                let rel = (cl - el).abs() / el.abs().max(f64::MIN_POSITIVE);
                steps.push(Step { step, eager: el, compiled: cl, rel: if rel.is_nan() { f64::INFINITY } else { rel } });
            }
            None => unmatched.push(step),
        }
    }
    unmatched.extend(c.keys().filter(|k| !e.contains_key(k)));
    let max_rel = steps.iter().map(|s| s.rel).fold(0.0, f64::max);
    Parity { steps, max_rel, unmatched }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_differences_and_unmatched_steps() {
        let p = compare(&[(0, 2.0), (1, 1.0), (2, 0.5)], &[(0, 2.0), (1, 1.001), (3, 9.0)]);
        assert_eq!(p.steps.len(), 2);
        assert!((p.max_rel - 1e-3).abs() < 1e-12);
        assert_eq!(p.unmatched, vec![2, 3]);
        assert_eq!(p.violations(1e-4).len(), 1);
        assert!(p.violations(1e-2).is_empty());
        let nan = compare(&[(0, 1.0)], &[(0, f64::NAN)]);
        assert_eq!(nan.violations(1.0).len(), 1, "NaN never passes");
    }
}
