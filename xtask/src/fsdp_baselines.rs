//! The `fsdp-baselines` part of the GPU bundle: the Python packages Unsloth needs beyond the
//! GPU machine's image (torch, transformers, peft, accelerate, triton are there), slimmed
//! and zipped into `bundle/py/fsdp-baselines-site.zip`, plus `fsdp/py/bench_baselines.py`.
//! `bundle/run.sh fsdp-baselines` unpacks the zip to /tmp and puts it first on PYTHONPATH.
//!
//! Why a zip of unpacked wheels: the machine has no network (no `pip install` from an
//! index), and the unpacked packages are ~50 MiB against a 64 MiB limit for everything
//! carried, zipped ~13 MiB. A wheel's `name/` folders plus its `.dist-info` are what pip
//! would install for these wheels (none has compiled entry points we need; `*.data/`
//! scripts are left out), and the `.dist-info` matters: Unsloth and transformers read
//! versions with `importlib.metadata`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::run;

/// What one pinned wheel contributes to the site zip.
struct Pin {
    /// pip requirement, pinned.
    spec: &'static str,
    /// How the wheel's file name starts (to find it in target/wheels).
    file_prefix: &'static str,
    /// Member prefixes to keep; empty: the whole wheel except `*.data/`.
    keep: &'static [&'static str],
}

/// Unsloth 2026.10.9 and what it imports that the GPU machine lacks (versions the H100
/// baseline of 2026-11-25 ran with). torchao: the newest on PyPI then, for torch 2.11.
const PINS: &[Pin] = &[
    // The wheel is mostly a web UI (studio/): only the library.
    Pin { spec: "unsloth==2026.10.9", file_prefix: "unsloth-2026.10.9-", keep: &["unsloth/", "unsloth-2026.10.9.dist-info/"] },
    Pin { spec: "unsloth_zoo==2026.10.9", file_prefix: "unsloth_zoo-2026.10.9-", keep: &[] },
    // The package itself is already in bundle/py (slim, CUDA 13.0 library only, see
    // bundle.rs); its metadata, so that importlib.metadata reports 0.50.2.
    Pin { spec: "bitsandbytes==0.50.2", file_prefix: "bitsandbytes-0.50.2-", keep: &["bitsandbytes-0.50.2.dist-info/"] },
    Pin { spec: "trl==1.15.0", file_prefix: "trl-1.15.0-", keep: &[] },
    Pin { spec: "datasets==4.3.0", file_prefix: "datasets-4.3.0-", keep: &[] },
    // Without its test/ folder.
    Pin { spec: "torchao==0.18.0", file_prefix: "torchao-0.18.0-", keep: &["torchao/", "torchao-0.18.0.dist-info/"] },
    Pin { spec: "tyro==1.0.17", file_prefix: "tyro-1.0.17-", keep: &[] },
    Pin { spec: "msgspec==0.22.0", file_prefix: "msgspec-0.22.0-", keep: &[] },
    Pin { spec: "structlog==26.1.0", file_prefix: "structlog-26.1.0-", keep: &[] },
    Pin { spec: "json5==0.17.3", file_prefix: "json5-0.17.3-", keep: &[] },
    Pin { spec: "nest_asyncio==1.6.0", file_prefix: "nest_asyncio-1.6.0-", keep: &[] },
    Pin { spec: "hf_transfer==0.1.9", file_prefix: "hf_transfer-0.1.9-", keep: &[] },
    Pin { spec: "dill==0.4.1", file_prefix: "dill-0.4.1-", keep: &[] },
    Pin { spec: "multiprocess==0.70.19", file_prefix: "multiprocess-0.70.19-", keep: &[] },
    Pin { spec: "docstring_parser==0.18.0", file_prefix: "docstring_parser-0.18.0-", keep: &[] },
    Pin { spec: "shtab==1.13.0", file_prefix: "shtab-1.13.0-", keep: &[] },
    Pin { spec: "typeguard==4.6.1", file_prefix: "typeguard-4.6.1-", keep: &[] },
];

/// Platform tags pip may pick for the GPU machine (glibc 2.39, CPython 3.12, x86-64): pip
/// matches `--platform` exactly, so name each manylinux level the pinned wheels use.
const PLATFORMS: &[&str] =
    &["manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"];

/// Writes a zip of the kept members of each wheel. Deterministic: members sorted, fixed
/// timestamps, so an unchanged pin list gives the same bytes. Arguments: the zip, then
/// `wheel=prefix,prefix` (empty: all but `*.data/`).
const PACK_PY: &str = r#"
import sys, zipfile
out = zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_DEFLATED, compresslevel=9)
seen = {}
for arg in sys.argv[2:]:
    wheel, _, keep = arg.partition("=")
    keep = tuple(k for k in keep.split(",") if k)
    z = zipfile.ZipFile(wheel)
    names = [n for n in z.namelist() if not n.endswith("/")]
    names = [n for n in names if (n.startswith(keep) if keep else ".data/" not in n)]
    names = [n for n in names if "__pycache__/" not in n and not n.endswith(".pyc")]
    assert names, f"{wheel}: nothing kept for {keep}"
    for n in sorted(names):
        if n in seen:
            raise SystemExit(f"{n} is in both {seen[n]} and {wheel}")
        seen[n] = wheel
        info = zipfile.ZipInfo(n, date_time=(2026, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = (0o755 if n.endswith(".so") else 0o644) << 16
        out.writestr(info, z.read(n), compresslevel=9)
out.close()
print(f"{len(seen)} files from {len(sys.argv) - 2} wheels")
"#;

/// The wheel for `pin` from `cache` (target/wheels), downloaded there first if missing.
fn wheel(cache: &Path, pin: &Pin) -> Result<PathBuf> {
    let find = || {
        std::fs::read_dir(cache).ok().and_then(|d| {
            d.flatten()
                .find(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.starts_with(pin.file_prefix) && n.ends_with(".whl")
                })
                .map(|e| e.path())
        })
    };
    if find().is_none() {
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.12"]);
        cmd.args(["--implementation", "cp"]);
        for p in PLATFORMS {
            cmd.args(["--platform", p]);
        }
        run(cmd.arg("-d").arg(cache).arg(pin.spec))?;
    }
    find().with_context(|| format!("{}: no wheel in {} after the download", pin.spec, cache.display()))
}

/// Adds the `fsdp-baselines` files to `bundle` (its `py/` folder must exist).
pub fn bundle(root: &Path, bundle: &Path) -> Result<()> {
    let cache = crate::target_dir().join("wheels");
    std::fs::create_dir_all(&cache)?;
    let py = bundle.join("py");
    let mut args = vec![];
    for pin in PINS {
        let w = wheel(&cache, pin)?;
        args.push(format!("{}={}", w.display(), pin.keep.join(",")));
    }
    let zip = py.join("fsdp-baselines-site.zip");
    run(Command::new("python3").arg("-c").arg(PACK_PY).arg(&zip).args(&args))?;
    let script = root.join("fsdp/py/bench_baselines.py");
    std::fs::copy(&script, py.join("bench_baselines.py"))
        .with_context(|| format!("copy {} into {}", script.display(), py.display()))?;
    let mib = zip.metadata()?.len() as f64 / (1 << 20) as f64;
    if mib > 24.0 {
        bail!("{} is {mib:.1} MiB: more than this part's share of the 64 MiB bundle", zip.display());
    }
    println!("fsdp-baselines: {} ({mib:.1} MiB, {} wheels) + bench_baselines.py", zip.display(), PINS.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_exact_and_prefixes_match_their_spec() {
        for pin in PINS {
            let (name, version) = pin.spec.split_once("==").expect("pinned with ==");
            assert_eq!(pin.file_prefix, format!("{name}-{version}-"), "{}", pin.spec);
            for k in pin.keep {
                assert!(k.ends_with('/'), "{}: keep prefixes are folders: {k}", pin.spec);
            }
        }
    }

    #[test]
    fn run_sh_has_the_part_and_names_what_this_module_writes() {
        let sh = include_str!("run.sh");
        assert!(sh.contains("$what == fsdp-baselines"), "run.sh has no fsdp-baselines part");
        assert!(sh.contains("fsdp-baselines-site.zip"));
        assert!(sh.contains("bench_baselines.py"));
    }
}
