//! `cargo xtask gpu-bundle`: everything the GPU machine needs, in bundle/.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{cargo, root, run};

const BNB: &str = "bitsandbytes==0.50.2";
const LIMIT: u64 = 64 << 20;

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).with_context(|| format!("copy {} -> {}", from.display(), to.display()))?;
    Ok(())
}

fn size(p: &Path) -> u64 {
    if p.is_dir() {
        std::fs::read_dir(p).map(|d| d.flatten().map(|e| size(&e.path())).sum()).unwrap_or(0)
    } else {
        p.metadata().map(|m| m.len()).unwrap_or(0)
    }
}

pub fn gpu_bundle() -> Result<()> {
    let root = root();
    let b = root.join("bundle");
    if b.exists() {
        std::fs::remove_dir_all(&b)?;
    }
    for d in ["bin", "lib", "tests", "py"] {
        std::fs::create_dir_all(b.join(d))?;
    }
    run(cargo().args(["build", "--release", "-p", "nf4", "--lib", "--bins", "--examples"]))?;
    copy(&root.join("target/release/libnf4.so"), &b.join("lib/libnf4.so"))?;
    copy(&root.join("target/release/nf4-bench"), &b.join("bin/nf4-bench"))?;
    copy(&root.join("target/release/examples/interop"), &b.join("bin/interop"))?;

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
            let gpu_crate = ["/nf4#", "/cudakit#"].iter().any(|c| pkg.contains(c));
            if !(kind == "test" || kind == "lib" || kind == "rlib") || !gpu_crate {
                continue;
            }
            if let Some(exe) = v["executable"].as_str() {
                let name = format!("{}-{}-{}", v["target"]["name"].as_str().unwrap_or("t"), kind, n_tests);
                copy(Path::new(exe), &b.join("tests").join(name))?;
                n_tests += 1;
            }
        }
    }

    // A slim bitsandbytes: Python files and the CUDA 13.0 library only (~5 MB of 43).
    let cache = root.join("target/wheels");
    std::fs::create_dir_all(&cache)?;
    let have_wheel = |c: &Path| std::fs::read_dir(c).ok().and_then(|d| d.flatten().find(|e| e.file_name().to_string_lossy().starts_with("bitsandbytes-0.50.2")));
    if have_wheel(&cache).is_none() {
        run(Command::new("python3").args([
            "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
            "--implementation", "cp", "--platform", "manylinux_2_24_x86_64", "-d",
        ]).arg(&cache).arg(BNB))?;
    }
    let wheel = have_wheel(&cache).context("bitsandbytes wheel missing after download")?.path();
    run(Command::new("python3").arg("-c").arg(
        "import sys, zipfile\n\
         z = zipfile.ZipFile(sys.argv[1])\n\
         keep = [n for n in z.namelist() if n.startswith('bitsandbytes/') and (n.endswith(('.py', 'py.typed')) or n.endswith(('_cuda130.so', '_cpu.so')))]\n\
         [z.extract(n, sys.argv[2]) for n in keep]\n",
    ).arg(&wheel).arg(b.join("py")))?;
    for f in std::fs::read_dir(root.join("nf4/py"))? {
        let f = f?.path();
        if f.extension().is_some_and(|e| e == "py") {
            copy(&f, &b.join("py").join(f.file_name().expect("file")))?;
        }
    }
    std::fs::write(b.join("run.sh"), include_str!("run.sh"))?;
    let total = size(&b);
    println!("bundle/: {n_tests} test executables, {:.1} MiB", total as f64 / (1 << 20) as f64);
    if total > LIMIT {
        bail!("bundle/ is {:.1} MiB, over the device's 64 MiB", total as f64 / (1 << 20) as f64);
    }
    println!("Run it on the GPU machine with the device tool:\n  run(command=\"bash bundle/run.sh all\", carry=[\"bundle\"])\nthen: cargo xtask bench --from-device <files_at>");
    Ok(())
}
