//! Project automation. Run `cargo xtask help`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

mod bundle;
mod fsdp_baselines;
mod fsdp_bench;
mod pr;
mod report;
mod tlparse_bench;

const HELP: &str = "\
cargo xtask <command>

Commands:
  bench [SUITE...] [--from-device DIR [--tag NAME]]
      SUITE: nf4, compile-audit, memlinear, fsdp (none named = all).
      Runs every benchmark suite that can run here and writes bench/results/*.json and
      bench/RESULTS.md. CPU suites always run. GPU suites run when a GPU (driver, NVRTC,
      device) is present, and the comparison against bitsandbytes / the Unsloth-style
      path when python3 also imports torch and bitsandbytes; otherwise they are listed as
      skipped, with the reason. memlinear runs its CPU bench here; its GPU comparison
      (vs torch eager, Liger, Cut Cross-Entropy) and parity checks run on the GPU machine
      (`bash bundle/run.sh memlinear`). fsdp times one QLoRA training step (`qlora
      bench`, every checkpointing mode, with --phases) when a GPU is present, and Unsloth
      and HF+peft+bitsandbytes when python3 imports them; it has no CPU part (the CPU
      model is the tests' reference, not a training path to time). Results measured
      elsewhere stay in RESULTS.md, each with its card's name.
      --from-device DIR [--tag NAME]: take the JSON a device run wrote (the $OUT files
      of `bash bundle/run.sh`) into bench/results (or bench/results/NAME, for a run on
      another card kept beside the main one), then regenerate RESULTS.md.

  gpu-bundle [--only core|fsdp]
      Builds, for a GPU machine without Rust (everything together is over the 64 MiB a
      device call carries: one part per call, `core` = nf4/cudakit/memlinear, `fsdp` =
      qlora, its GPU tests and the Unsloth/HF baselines): release binaries, libnf4.so, libmemlinear.so,
      every test executable, the Python scripts, a slim bitsandbytes (CUDA 13.0 library
      only) and the Liger / Cut Cross-Entropy Python packages into bundle/ (ignored by
      git, < 64 MiB), with bundle/run.sh to run there. See README.
      Also the fsdp baselines: Unsloth 2026.10.9 and what it needs beyond the GPU
      machine's image, zipped (bundle/py/fsdp-baselines-site.zip), and
      fsdp/py/bench_baselines.py; `bash bundle/run.sh fsdp-baselines` (not part of
      `all`: about 5 minutes) runs Unsloth without checkpointing, Unsloth with its
      offloaded checkpointing and HF+peft+bitsandbytes with checkpointing, JSON in
      $OUT/fsdp/.

  pr [--list | --verify-upstream | SLUG [--upstream PATH] [--no-verify] [--gpu-results DIR] [--python PATH]
      [--submit [--dry-run] [--base BRANCH] [--api URL]]]   (more: cargo xtask pr --help)
      The Unsloth bounties (issue-fixes crate). --list (default): each one's status in the
      pinned release and what is open. --verify-upstream: download unsloth and unsloth_zoo
      at the pinned version from PyPI, run every evidence check, write
      issue-fixes/upstream-<version>.json; fails if a claim is not backed.
      SLUG: apply issue-fixes/patches/SLUG/*.patch with git2 on branch fix/<issue>-SLUG of
      the upstream checkout (--upstream PATH, which must be clean and at the pinned
      version, or a repository made from the pinned wheels under target/), one commit per
      patch, run the checks in its verify.json (CPU checks here, GPU checks here or read
      from a recorded device run; a failed check stops it), and draft the PR into
      target/pr/SLUG/. Run again, it reuses a branch that already holds the series.
      --submit (never without it): with GITHUB_TOKEN, fork unslothai/unsloth (or
      unsloth-zoo, for a series under unsloth_zoo/) if you have no fork, publish the
      branch to it through GitHub's Git Data API (blobs, trees, commits, ref; on top of
      the fork's --base branch, default main, whose files the series touches must equal
      the pinned release's; never a force-push) and open a draft PR with the drafted
      text. A re-run reuses the fork, the branch and an open PR. On failure the local
      branch this run made is removed. The token is never printed. --dry-run: print the
      requests instead (no token, no network). --api URL: the API base (default
      $QLORA_KIT_GITHUB_API, else https://api.github.com).

  help
      This text.
";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// The build's target directory as cargo resolves it (`CARGO_TARGET_DIR`,
/// `build.target-dir`, else `<root>/target`): where the release binaries that the suites
/// run are built, and where xtask keeps its caches and scratch.
fn target_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let out = cargo().args(["metadata", "--no-deps", "--format-version", "1"]).output();
        out.ok()
            .filter(|o| o.status.success())
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
            .and_then(|v| v["target_directory"].as_str().map(PathBuf::from))
            .unwrap_or_else(|| root().join("target"))
    })
    .clone()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bench") => bench(&args[1..]),
        Some("gpu-bundle") => bundle::gpu_bundle(&bundle::Part::parse(&args[1..])?),
        Some("pr") => pr::pr(&args[1..]),
        Some("help") | Some("-h") | Some("--help") | None => {
            print!("{HELP}");
            Ok(())
        }
        Some(other) => bail!("unknown command `{other}`\n\n{HELP}"),
    }
}

fn bench(args: &[String]) -> Result<()> {
    let results = root().join("bench/results");
    std::fs::create_dir_all(&results)?;
    if let Some(i) = args.iter().position(|a| a == "--from-device") {
        let dir = PathBuf::from(args.get(i + 1).context("--from-device needs the folder the device run wrote")?);
        let dest = match args.iter().position(|a| a == "--tag") {
            Some(t) => results.join(args.get(t + 1).context("--tag needs a name")?),
            None => results.clone(),
        };
        std::fs::create_dir_all(&dest)?;
        let taken = report::ingest(&dir, &dest)?;
        println!("took {} result file(s) from {}", taken, dir.display());
        report::write_markdown(&results, &root().join("bench/RESULTS.md"), &[])?;
        return Ok(());
    }
    const SUITES: [&str; 4] = ["nf4", "compile-audit", "memlinear", "fsdp"];
    let named: Vec<&str> = args.iter().filter(|a| !a.starts_with("--")).map(String::as_str).collect();
    for a in &named {
        if !SUITES.contains(a) {
            bail!("unknown suite `{a}`: the suites are {SUITES:?}");
        }
    }
    let wants = |s: &str| named.is_empty() || named.contains(&s);
    let mut skipped: Vec<String> = vec![];
    if wants("compile-audit") {
        println!("== compile-audit: parse + report a >= 100 MB trace, vs tlparse");
        tlparse_bench::bench(&results, &mut skipped)?;
    }
    if wants("memlinear") {
        if root().join("memlinear/Cargo.toml").exists() {
            println!("== memlinear: CPU chunked linear + loss");
            run(cargo().args(["build", "--release", "--quiet", "-p", "memlinear", "--bin", "memlinear-bench"]))?;
            run(Command::new(target_dir().join("release/memlinear-bench"))
                .args(["cpu", "--json"])
                .arg(results.join("memlinear-cpu.json")))?;
        }
        skipped.push(
            "memlinear GPU comparison vs torch/Liger/CCE needs the GPU machine: cargo xtask gpu-bundle, then bash \
             bundle/run.sh memlinear; ingest with --from-device"
                .into(),
        );
    }
    if wants("fsdp") {
        fsdp_bench::bench(&results, &mut skipped)?;
    }
    if !wants("nf4") {
        return finish(&results, &skipped);
    }
    run(cargo().args(["build", "--release", "--quiet", "-p", "nf4", "--bin", "nf4-bench"]))?;
    let exe = target_dir().join("release/nf4-bench");

    println!("== nf4: CPU dequantize/quantize throughput");
    run(Command::new(&exe).args(["cpu", "--json"]).arg(results.join("nf4-cpu.json")))?;

    println!("== nf4: GPU kernel sweep");
    let out = Command::new(&exe).args(["gpu", "--json"]).arg(results.join("nf4-gpu-sweep.json")).output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    let gpu_ok = match out.status.code() {
        Some(0) => true,
        Some(3) => {
            let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
            skipped.push(format!("nf4 GPU suites (kernel sweep; ours vs bitsandbytes vs Unsloth-style): {why}"));
            false
        }
        _ => bail!("nf4-bench gpu failed:\n{}", String::from_utf8_lossy(&out.stderr)),
    };
    if gpu_ok {
        let py = root().join("bundle/py");
        let probe = Command::new("python3")
            .env("PYTHONPATH", &py)
            .args(["-c", "import torch, bitsandbytes; assert torch.cuda.is_available()"])
            .output();
        match probe {
            Ok(o) if o.status.success() => {
                run(cargo().args(["build", "--release", "--quiet", "-p", "nf4", "--lib"]))?;
                println!("== nf4: ours vs bitsandbytes vs Unsloth-style (Python, same process)");
                run(Command::new("python3")
                    .env("PYTHONPATH", &py)
                    .arg(root().join("nf4/py/bench_dequant.py"))
                    .arg(target_dir().join("release/libnf4.so"))
                    .arg(results.join("nf4-gpu-vs-bnb.json")))?;
            }
            _ => skipped.push(
                "nf4 vs bitsandbytes / Unsloth-style: python3 here cannot import torch (with CUDA) and bitsandbytes \
                 (run `cargo xtask gpu-bundle` for a slim bitsandbytes in bundle/py)"
                    .into(),
            ),
        }
    }
    finish(&results, &skipped)
}

/// Writes RESULTS.md and says what was skipped here, and why.
fn finish(results: &Path, skipped: &[String]) -> Result<()> {
    report::write_markdown(results, &root().join("bench/RESULTS.md"), skipped)?;
    println!("wrote bench/RESULTS.md and bench/results/*.json");
    if !skipped.is_empty() {
        println!("\nSkipped on this machine:");
        for s in skipped {
            println!("  - {s}");
        }
    }
    Ok(())
}
