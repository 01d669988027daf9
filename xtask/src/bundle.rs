//! `cargo xtask gpu-bundle`: everything the GPU machine needs, in bundle/.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{cargo, root, run};

const BNB: &str = "bitsandbytes==0.50.2";
/// The memlinear comparison's baselines: pure Python (Triton) wheels, used without their deps.
const LIGER: &str = "liger-kernel==0.8.5";
const CCE: &str = "cut-cross-entropy==25.1.1";
const LIMIT: u64 = 64 << 20;

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).with_context(|| format!("copy {} -> {}", from.display(), to.display()))?;
    Ok(())
}

/// The wheel for `spec` from target/wheels (`file_prefix`: how its file name starts),
/// downloaded there first if missing: no deps, for CPython 3.12 on x86-64 Linux (the GPU
/// machine's Python).
fn wheel(cache: &Path, spec: &str, file_prefix: &str) -> Result<PathBuf> {
    let find = || {
        std::fs::read_dir(cache)
            .ok()
            .and_then(|d| d.flatten().find(|e| e.file_name().to_string_lossy().starts_with(file_prefix)))
            .map(|e| e.path())
    };
    if find().is_none() {
        run(Command::new("python3").args([
            "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
            "--implementation", "cp", "--platform", "manylinux_2_24_x86_64", "-d",
        ]).arg(cache).arg(spec))?;
    }
    find().with_context(|| format!("{spec}: no wheel in {} after the download", cache.display()))
}

/// Extracts from `wheel` into `dest` the members whose names start with one of `prefixes` and
/// end with one of `suffixes`.
fn extract(wheel: &Path, dest: &Path, prefixes: &[&str], suffixes: &[&str]) -> Result<()> {
    run(Command::new("python3").arg("-c").arg(
        "import sys, zipfile\n\
         z = zipfile.ZipFile(sys.argv[1])\n\
         pre, suf = tuple(sys.argv[3].split(',')), tuple(sys.argv[4].split(','))\n\
         keep = [n for n in z.namelist() if n.startswith(pre) and n.endswith(suf)]\n\
         assert keep, f'{sys.argv[1]}: nothing matches {pre} / {suf}'\n\
         [z.extract(n, sys.argv[2]) for n in keep]\n",
    ).arg(wheel).arg(dest).arg(prefixes.join(",")).arg(suffixes.join(",")))
}

fn copy_py(from_dir: &Path, to_dir: &Path) -> Result<()> {
    for f in std::fs::read_dir(from_dir).with_context(|| format!("reading {}", from_dir.display()))? {
        let f = f?.path();
        if f.extension().is_some_and(|e| e == "py") {
            copy(&f, &to_dir.join(f.file_name().expect("file")))?;
        }
    }
    Ok(())
}

fn size(p: &Path) -> u64 {
    if p.is_dir() {
        std::fs::read_dir(p).map(|d| d.flatten().map(|e| size(&e.path())).sum()).unwrap_or(0)
    } else {
        p.metadata().map(|m| m.len()).unwrap_or(0)
    }
}

/// What a bundle holds: everything is over the device's 64 MiB carry limit, so a device
/// call takes one part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// nf4, cudakit, memlinear: their tools, libraries, tests and Python baselines.
    Core,
    /// fsdp: `qlora`, its GPU tests, the Unsloth / HF baselines.
    Fsdp,
}

impl Part {
    /// From `--only NAME`.
    pub fn parse(args: &[String]) -> Result<Vec<Part>> {
        match args {
            [] => Ok(vec![Part::Core, Part::Fsdp]),
            [flag, name] if flag == "--only" => match name.as_str() {
                "core" => Ok(vec![Part::Core]),
                "fsdp" => Ok(vec![Part::Fsdp]),
                other => bail!("--only {other}: expected core or fsdp"),
            },
            _ => bail!("usage: cargo xtask gpu-bundle [--only core|fsdp]"),
        }
    }
}

pub fn gpu_bundle(parts: &[Part]) -> Result<()> {
    let (core, fsdp) = (parts.contains(&Part::Core), parts.contains(&Part::Fsdp));
    let root = root();
    let b = root.join("bundle");
    if b.exists() {
        std::fs::remove_dir_all(&b)?;
    }
    for d in ["bin", "lib", "tests", "py"] {
        std::fs::create_dir_all(b.join(d))?;
    }
    if core {
        run(cargo().args(["build", "--release", "-p", "nf4", "--lib", "--bins", "--examples"]))?;
        copy(&crate::target_dir().join("release/libnf4.so"), &b.join("lib/libnf4.so"))?;
        copy(&crate::target_dir().join("release/nf4-bench"), &b.join("bin/nf4-bench"))?;
        copy(&crate::target_dir().join("release/examples/interop"), &b.join("bin/interop"))?;
    }
    // memlinear: its C ABI library and bench binary, once the crate exists.
    let memlinear = root.join("memlinear/Cargo.toml").exists();
    if core && memlinear {
        run(cargo().args(["build", "--release", "-p", "memlinear", "--lib", "--bins"]))?;
        copy(&crate::target_dir().join("release/libmemlinear.so"), &b.join("lib/libmemlinear.so"))?;
        let bench = crate::target_dir().join("release/memlinear-bench");
        if bench.exists() {
            copy(&bench, &b.join("bin/memlinear-bench"))?;
        }
    } else if core {
        println!("note: no memlinear crate yet: bundle/ has no libmemlinear.so (run.sh memlinear will say so)");
    }

    // fsdp: the `qlora` command (its `bench` is the training benchmark).
    if fsdp {
        run(cargo().args(["build", "--release", "-p", "fsdp", "--bins"]))?;
        copy(&crate::target_dir().join("release/qlora"), &b.join("bin/qlora"))?;
    }

    // Test executables: `cargo test --no-run` prints their paths as JSON messages.
    let out = cargo()
        .args(["test", "--release", "--workspace", "--no-run", "--message-format=json"])
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let mut n_tests = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if v["reason"] == "compiler-artifact" && v["profile"]["test"] == true {
            let kind = v["target"]["kind"][0].as_str().unwrap_or("test");
            let pkg = v["package_id"].as_str().unwrap_or("");
            // Tests of the crates with GPU code (the CPU-only crates' tests need their own
            // binaries from target/ and run in CI anyway); not the harnesses of bins.
            let wanted: &[&str] = match (core, fsdp) {
                (true, true) => &["/nf4#", "/cudakit#", "/memlinear#", "/fsdp#"],
                (true, false) => &["/nf4#", "/cudakit#", "/memlinear#"],
                _ => &["/fsdp#"],
            };
            let gpu_crate = wanted.iter().any(|c| pkg.contains(c));
            if !(kind == "test" || kind == "lib" || kind == "rlib") || !gpu_crate {
                continue;
            }
            if let Some(exe) = v["executable"].as_str() {
                // "<crate>--<target>-<kind>-<n>": run.sh selects a crate's tests by prefix.
                let krate = pkg.rsplit('/').next().unwrap_or("").split('#').next().unwrap_or("x");
                let name = format!("{krate}--{}-{}-{}", v["target"]["name"].as_str().unwrap_or("t"), kind, n_tests);
                copy(Path::new(exe), &b.join("tests").join(name))?;
                n_tests += 1;
            }
        }
    }

    // A slim bitsandbytes (both parts): Python files and the CUDA 13.0 library only (~5 MB of 43).
    let cache = crate::target_dir().join("wheels");
    std::fs::create_dir_all(&cache)?;
    let py = b.join("py");
    extract(&wheel(&cache, BNB, "bitsandbytes-0.50.2")?, &py, &["bitsandbytes/"], &[".py", "py.typed", "_cuda130.so", "_cpu.so"])?;
    if core {
    // Liger and Cut Cross-Entropy: their Python packages, and METADATA so that
    // importlib.metadata reports their versions.
    extract(&wheel(&cache, LIGER, "liger_kernel-0.8.5-")?, &py, &["liger_kernel/", "liger_kernel-0.8.5.dist-info/METADATA"], &[".py", "py.typed", "METADATA"])?;
    extract(&wheel(&cache, CCE, "cut_cross_entropy-25.1.1-")?, &py, &["cut_cross_entropy/", "cut_cross_entropy-25.1.1.dist-info/METADATA"], &[".py", "py.typed", "METADATA"])?;
    copy_py(&root.join("nf4/py"), &py)?;
    if root.join("memlinear/py").is_dir() {
        copy_py(&root.join("memlinear/py"), &py)?;
    }
    }
    // Unsloth and HF QLoRA baselines for the fsdp benchmark (`run.sh fsdp-baselines`).
    if fsdp {
        crate::fsdp_baselines::bundle(&root, &b)?;
    }
    std::fs::write(b.join("run.sh"), include_str!("run.sh"))?;
    let total = size(&b);
    println!("bundle/: {n_tests} test executables, {:.1} MiB", total as f64 / (1 << 20) as f64);
    if total > LIMIT {
        bail!(
            "bundle/ is {:.1} MiB, over the device's 64 MiB: build one part per device call (--only core, --only fsdp)",
            total as f64 / (1 << 20) as f64
        );
    }
    let what = if fsdp && !core { "fsdp" } else { "all" };
    println!("Run it on the GPU machine with the device tool:\n  run(command=\"bash bundle/run.sh {what}\", carry=[\"bundle\"])\nthen: cargo xtask bench --from-device <files_at>");
    Ok(())
}
