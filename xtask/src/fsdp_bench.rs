//! `cargo xtask bench fsdp`: one QLoRA training step, ours (`qlora bench`, every
//! checkpointing mode) and, where this machine has them, Unsloth and transformers + peft +
//! bitsandbytes (`fsdp/py/bench_baselines.py`), into `bench/results/fsdp-gpu-*.json` (the
//! names `cargo xtask bench --from-device` gives a device run's files).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};

use crate::{cargo, root, run, target_dir};

/// The baseline modes of `run.sh fsdp-baselines`: (implementation, checkpointing).
const BASELINES: [(&str, &str); 3] = [("unsloth", "none"), ("unsloth", "unsloth-offload"), ("hf", "on")];

/// Runs what this machine can; pushes what it skipped, and why, onto `skipped`.
pub fn bench(results: &Path, skipped: &mut Vec<String>) -> Result<()> {
    let device_flow = "on the GPU machine: `cargo xtask gpu-bundle --only fsdp`, `bash bundle/run.sh fsdp`, then \
                       `cargo xtask bench --from-device DIR`";
    println!("== fsdp: one QLoRA training step (qlora bench: Llama-3.2-1B shape, batch 4 x 2048, LoRA r16 on 7 projections)");
    run(cargo().args(["build", "--release", "--quiet", "-p", "fsdp", "--bin", "qlora"]))?;
    // stdout (the results) is shown as it comes; stderr (progress, or why it skipped) is
    // kept to quote.
    let out = Command::new(target_dir().join("release/qlora"))
        .args(["bench", "--checkpointing", "off,on,offload", "--phases", "--json"])
        .arg(results.join("fsdp-gpu-ours.json"))
        .stdout(std::process::Stdio::inherit())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    eprint!("{err}");
    match out.status.code() {
        Some(0) => {}
        Some(3) => {
            let why = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().trim_start_matches("qlora bench: skipped: ");
            skipped.push(format!("fsdp training step (ours vs Unsloth vs HF+peft+bnb): {why}; {device_flow}"));
            return Ok(());
        }
        _ => bail!("qlora bench failed ({})", out.status),
    }
    let probe = Command::new("python3").args(["-c", "import torch, unsloth, peft, bitsandbytes; assert torch.cuda.is_available()"]).output();
    if !matches!(probe, Ok(ref o) if o.status.success()) {
        skipped.push(format!(
            "fsdp baselines (Unsloth 2026.10.9, transformers + peft + bitsandbytes): python3 here cannot import torch (with \
             CUDA), unsloth, peft and bitsandbytes; {device_flow} (the bundle carries them)"
        ));
        return Ok(());
    }
    let script = root().join("fsdp/py/bench_baselines.py");
    let model = target_dir().join("fsdp-baselines/llama-3.2-1b-random");
    println!("== fsdp baselines: building the random model folder");
    run(Command::new("python3").arg(&script).args(["--build-only", "--model-dir"]).arg(&model))?;
    for (imp, ckpt) in BASELINES {
        println!("== fsdp baseline: {imp}, checkpointing {ckpt}");
        let json = results.join(format!("fsdp-gpu-baseline-{imp}-{ckpt}.json"));
        // Each mode in its own process, as run.sh does: one mode's allocator state and
        // compiled kernels do not leak into the next.
        let st = Command::new("python3")
            .arg(&script)
            .args(["--impl", imp, "--ckpt", ckpt, "--model-dir"])
            .arg(&model)
            .arg("--json")
            .arg(&json)
            .status()?;
        if !st.success() {
            skipped.push(format!("fsdp baseline {imp} {ckpt}: bench_baselines.py failed ({st}); its output is above"));
        }
    }
    Ok(())
}
