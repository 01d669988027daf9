//! Training metrics: one JSON line per optimizer step (flushed as it is written, so a
//! crashed run keeps every finished step), and the loss curve as a standalone SVG.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};

/// One optimizer step, as written to `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepMetrics {
    /// 0-based optimizer step.
    pub step: u64,
    /// Mean loss over the step's counted targets.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used by this step's update.
    pub lr: f64,
    /// Counted targets.
    pub targets: usize,
    /// Tokens processed (padding included).
    pub tokens: usize,
    /// Wall time of the step, milliseconds.
    pub step_ms: f64,
    /// `tokens / step time`.
    pub tokens_per_s: f64,
    /// Device bytes the runtime holds (GPU) or 0 (CPU).
    pub memory_bytes: usize,
}

/// Appends [`StepMetrics`] to a JSONL file.
pub struct MetricsWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsWriter {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> Result<MetricsWriter> {
        let file = std::fs::File::create(path).map_err(Error::io(path))?;
        Ok(MetricsWriter { path: path.to_path_buf(), file })
    }

    /// Writes one line and flushes it.
    pub fn write(&mut self, m: &StepMetrics) -> Result<()> {
        let mut line = serde_json::to_string(m).map_err(|e| Error::Json { path: self.path.display().to_string(), source: e })?;
        line.push('\n');
        self.file.write_all(line.as_bytes()).and_then(|_| self.file.flush()).map_err(Error::io(&self.path))
    }
}

/// The loss curve (`(step, loss)` points) as an SVG document: axes with tick labels, the
/// per-step losses as a thin line and their running mean (window `max(1, n/20)`) as a
/// thick one. Non-finite losses are skipped (and said in the subtitle).
pub fn loss_svg(title: &str, points: &[(u64, f64)]) -> String {
    let (w, h, ml, mr, mt, mb) = (720.0, 420.0, 64.0, 20.0, 48.0, 44.0);
    let finite: Vec<(f64, f64)> = points.iter().filter(|p| p.1.is_finite()).map(|&(s, l)| (s as f64, l)).collect();
    let skipped = points.len() - finite.len();
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{ml}\" y=\"20\" font-size=\"15\">{}</text>\n",
        escape(title)
    );
    let sub = format!("{} steps{}", points.len(), if skipped > 0 { format!(", {skipped} non-finite losses not drawn") } else { String::new() });
    out += &format!("<text x=\"{ml}\" y=\"36\" fill=\"#555\">{}</text>\n", escape(&sub));
    if finite.is_empty() {
        return out + "</svg>\n";
    }
    let (x0, x1) = (finite[0].0, finite.last().unwrap().0.max(finite[0].0 + 1.0));
    let lo = finite.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = finite.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let pad = ((hi - lo) * 0.05).max(1e-6);
    let (y0, y1) = (lo - pad, hi + pad);
    let (pw, ph) = (w - ml - mr, h - mt - mb);
    let sx = |x: f64| ml + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| mt + (y1 - y) / (y1 - y0) * ph;
    out += &format!("<rect x=\"{ml}\" y=\"{mt}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#999\"/>\n");
    for i in 0..=4 {
        let y = y0 + (y1 - y0) * i as f64 / 4.0;
        let x = x0 + (x1 - x0) * i as f64 / 4.0;
        out += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{:.4}</text>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.0}</text>\n",
            ml - 6.0,
            sy(y) + 4.0,
            y,
            sx(x),
            h - mb + 16.0,
            x
        );
    }
    out += &format!("<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">optimizer step</text>\n", ml + pw / 2.0, h - 8.0);
    let path = |pts: &[(f64, f64)]| pts.iter().map(|&(x, y)| format!("{:.2},{:.2}", sx(x), sy(y))).collect::<Vec<_>>().join(" ");
    out += &format!("<polyline fill=\"none\" stroke=\"#9ab\" stroke-width=\"1\" points=\"{}\"/>\n", path(&finite));
    let win = (finite.len() / 20).max(1);
    let smooth: Vec<(f64, f64)> = (0..finite.len())
        .map(|i| {
            let from = i.saturating_sub(win - 1);
            let s = &finite[from..=i];
            (finite[i].0, s.iter().map(|p| p.1).sum::<f64>() / s.len() as f64)
        })
        .collect();
    out += &format!("<polyline fill=\"none\" stroke=\"#c33\" stroke-width=\"2\" points=\"{}\"/>\n", path(&smooth));
    out += &format!("<text x=\"{:.1}\" y=\"{:.1}\" fill=\"#c33\" text-anchor=\"end\">running mean of {win}</text>\n", w - mr - 4.0, mt + 14.0);
    out + "</svg>\n"
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_lines_are_json_and_flushed_per_step() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.jsonl");
        let mut w = MetricsWriter::create(&p).unwrap();
        let m = StepMetrics { step: 3, loss: 2.5, grad_norm: 1.0, lr: 1e-4, targets: 10, tokens: 12, step_ms: 5.0, tokens_per_s: 2400.0, memory_bytes: 0 };
        w.write(&m).unwrap();
        // Read while the writer is still open: the line is already on disk.
        let text = std::fs::read_to_string(&p).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(v["step"], 3);
        assert_eq!(v["loss"], 2.5);
        assert_eq!(v["tokens_per_s"], 2400.0);
    }

    #[test]
    fn svg_has_both_curves_and_skips_non_finite() {
        let pts: Vec<(u64, f64)> = (0..50).map(|i| (i, 5.0 - i as f64 * 0.05)).chain([(50, f64::NAN)]).collect();
        let svg = loss_svg("loss <tiny>", &pts);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("1 non-finite losses not drawn"));
        assert!(svg.contains("loss &lt;tiny&gt;"));
        assert!(!svg.contains("NaN"));
        // the first point sits at the left edge, the highest loss at the top of the plot
        assert!(svg.contains("64.00,"));
        assert_eq!(loss_svg("empty", &[]).matches("<polyline").count(), 0);
    }
}
