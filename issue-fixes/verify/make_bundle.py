"""Builds what the GPU verification of the Unsloth patch series carries (run from the repo root):

    python3 issue-fixes/verify/make_bundle.py [target/dev-issue6]

- `site.zip`: unsloth / unsloth_zoo 2026.10.9 as released and the packages they import that the
  GPU machine lacks, unpacked from their wheels (the machine has no network): unsloth's wheel is
  mostly a web UI, so only `unsloth/`; bitsandbytes only its Python files and the CUDA 13.0
  library. Wheels: target/wheels (unsloth, unsloth_zoo, bitsandbytes) and DIR/wheels (the rest,
  `pip download --no-deps`, versions in WHEELS below).
- `patched/<slug>/`: every file a series in issue-fixes/patches/<slug>/ adds or changes, as it
  reads after `git apply` on the pinned release (target/upstream/2026.10.9, made by
  `cargo xtask pr --verify-upstream`). run_gpu.sh lays these over a copy of the pinned site.
"""

import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
PINNED = "2026.10.9"
SLUGS = ("flex-attention-dynamic", "attention-refactor")
WHEELS = (
    "trl-1.15.0", "datasets-4.3.0", "torchao-0.18.0", "tyro-1.0.17", "msgspec-0.22.0",
    "structlog-26.1.0", "json5-0.17.3", "nest_asyncio-1.6.0", "hf_transfer-0.1.9", "dill-0.4.1",
    "multiprocess-0.70.19", "docstring_parser-0.18.0", "shtab-1.13.0", "typeguard-4.6.1",
)


def keep(wheel_name, member):
    if ".data/" in member:
        return False
    if wheel_name.startswith("unsloth-"):
        return member.startswith(("unsloth/", f"unsloth-{PINNED}.dist-info/"))
    if wheel_name.startswith("bitsandbytes-"):
        return (
            member.endswith(".py")
            or member.endswith("libbitsandbytes_cuda130.so")
            or ".dist-info/" in member
        )
    if wheel_name.startswith("torchao-"):
        return not member.startswith("test/")
    return True


def one(folder, prefix):
    found = sorted(folder.glob(prefix + "-*.whl"))
    if len(found) != 1:
        raise SystemExit(f"{folder}: expected one {prefix} wheel, found {found}")
    return found[0]


def build_site(out):
    wheels = [one(ROOT / "target/wheels", f"{p}-{PINNED}") for p in ("unsloth", "unsloth_zoo")]
    wheels.append(one(ROOT / "target/wheels", "bitsandbytes-0.50.2"))
    wheels += [one(out / "wheels", w) for w in WHEELS]
    seen = {}
    with zipfile.ZipFile(out / "site.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for w in wheels:
            src = zipfile.ZipFile(w)
            for name in sorted(src.namelist()):
                if name.endswith("/") or not keep(w.name, name):
                    continue
                if name in seen:
                    raise SystemExit(f"{name} is in {seen[name]} and {w.name}")
                seen[name] = w.name
                z.writestr(name, src.read(name))
    mib = (out / "site.zip").stat().st_size / 2**20
    print(f"site.zip: {len(seen)} files from {len(wheels)} wheels, {mib:.1f} MiB")


def build_patched(out):
    release = ROOT / f"target/upstream/{PINNED}"
    if not (release / "unsloth_zoo").is_dir():
        raise SystemExit(f"{release}: run `cargo xtask pr --verify-upstream` first")
    for slug in SLUGS:
        patches = sorted((ROOT / "issue-fixes/patches" / slug).glob("*.patch"))
        with tempfile.TemporaryDirectory() as tmp:
            tree = pathlib.Path(tmp) / "tree"
            shutil.copytree(release, tree)
            changed = set()
            for p in patches:
                diff = p.read_bytes()
                diff = diff[diff.index(b"diff --git ") :]
                changed |= {m.decode() for m in re.findall(rb"^\+\+\+ b/(\S+)", diff, flags = re.M)}
                subprocess.run(["git", "apply", "-"], cwd = tree, input = diff, check = True)
            dest = out / "patched" / slug
            shutil.rmtree(dest, ignore_errors = True)
            for path in sorted(changed):
                (dest / path).parent.mkdir(parents = True, exist_ok = True)
                shutil.copy2(tree / path, dest / path)
            print(f"patched/{slug}: {sorted(changed)}")


def main():
    out = ROOT / (sys.argv[1] if len(sys.argv) > 1 else "target/dev-issue6")
    build_site(out)
    build_patched(out)


if __name__ == "__main__":
    main()
