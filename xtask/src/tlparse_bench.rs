//! `cargo xtask bench compile-audit`: parse + report a >= 100 MB trace, ours vs tlparse.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{cargo, root, run, target_dir};

const TLPARSE: &str = "tlparse==0.4.3";
const TARGET_BYTES: u64 = 100 << 20;

/// Builds the big input from the committed real (trimmed) traces, repeated.
fn big_trace(dir: &Path) -> Result<PathBuf> {
    let out = dir.join("big_trace.log");
    if out.metadata().map(|m| m.len() >= TARGET_BYTES).unwrap_or(false) {
        return Ok(out);
    }
    let fx = root().join("compile-audit/tests/fixtures");
    let parts: Vec<Vec<u8>> = ["breaks.log", "qlora_gc.log", "clean.log"]
        .iter()
        .map(|f| std::fs::read(fx.join(f)).with_context(|| format!("reading fixture {f}")))
        .collect::<Result<_>>()?;
    let mut data = Vec::with_capacity(TARGET_BYTES as usize + (4 << 20));
    while (data.len() as u64) < TARGET_BYTES {
        for p in &parts {
            data.extend_from_slice(p);
        }
    }
    std::fs::write(&out, data)?;
    Ok(out)
}

fn tlparse_exe() -> Option<PathBuf> {
    let tools = target_dir().join("tools");
    let exe = tools.join("bin/tlparse");
    if !exe.exists() {
        let ok = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--no-deps", "--target"])
            .arg(&tools)
            .arg(TLPARSE)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return None;
        }
    }
    exe.exists().then_some(exe)
}

/// (seconds, peak RSS in KiB if /usr/bin/time is there) of one run.
fn measure(cmd: &mut Command) -> Result<(f64, Option<u64>)> {
    let time = Path::new("/usr/bin/time");
    if time.exists() {
        let mut c = Command::new(time);
        c.arg("-f").arg("XTASK %e %M").arg(cmd.get_program()).args(cmd.get_args());
        let out = c.output()?;
        if !out.status.success() {
            bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err.lines().rev().find(|l| l.starts_with("XTASK ")).context("no /usr/bin/time output")?;
        let mut it = line.split_whitespace().skip(1);
        let secs: f64 = it.next().and_then(|s| s.parse().ok()).context("time")?;
        let kib: u64 = it.next().and_then(|s| s.parse().ok()).context("rss")?;
        Ok((secs, Some(kib)))
    } else {
        let t = std::time::Instant::now();
        let out = cmd.output()?;
        if !out.status.success() {
            bail!("{cmd:?} failed");
        }
        Ok((t.elapsed().as_secs_f64(), None))
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn bench(results: &Path, skipped: &mut Vec<String>) -> Result<()> {
    run(cargo().args(["build", "--release", "--quiet", "-p", "compile-audit"]))?;
    let dir = target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let input = big_trace(&dir)?;
    let bytes = input.metadata()?.len();
    let ours = target_dir().join("release/compile-audit");
    let Some(tl) = tlparse_exe() else {
        skipped.push(format!("compile-audit vs tlparse: could not install {TLPARSE} from PyPI into target/tools"));
        return Ok(());
    };
    let out_dir = dir.join("tl_out");
    let reps = 3;
    let (mut ours_t, mut tl_t, mut ours_m, mut tl_m) = (vec![], vec![], 0u64, 0u64);
    for _ in 0..reps {
        let (t, m) = measure(Command::new(&ours).arg("report").arg("--format").arg("json").arg(&input))?;
        ours_t.push(t);
        ours_m = ours_m.max(m.unwrap_or(0));
        let (t, m) =
            measure(Command::new(&tl).arg(&input).arg("-o").arg(&out_dir).args(["--overwrite", "--no-browser"]))?;
        tl_t.push(t);
        tl_m = tl_m.max(m.unwrap_or(0));
    }
    let (o, t) = (median(ours_t), median(tl_t));
    println!(
        "compile-audit report: {o:.2} s, peak {:.0} MiB | tlparse {TLPARSE}: {t:.2} s, peak {:.0} MiB | {:.1}x faster on {:.0} MB",
        ours_m as f64 / 1024.0,
        tl_m as f64 / 1024.0,
        t / o,
        bytes as f64 / 1e6
    );
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_default();
    let v = serde_json::json!({
        "suite": "compile-audit-vs-tlparse", "cpu": cpu, "input_bytes": bytes, "runs": reps,
        "input": "the committed real traces (compile-audit/tests/fixtures/*.log) repeated past 100 MB",
        "ours_s": o, "ours_peak_MiB": ours_m as f64 / 1024.0,
        "tlparse": TLPARSE, "tlparse_s": t, "tlparse_peak_MiB": tl_m as f64 / 1024.0,
        "speedup": t / o,
        "note": "ours: parse + full report as JSON to stdout; tlparse: parse + its HTML report folder (its normal use)",
    });
    std::fs::write(results.join("compile-audit-vs-tlparse.json"), serde_json::to_string_pretty(&v)?)?;
    Ok(())
}
