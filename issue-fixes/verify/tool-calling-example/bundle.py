#!/usr/bin/env python3
"""Builds the folder the GPU machine gets for the tool-calling example (target/dev-tools/tool-calling).

    python3 issue-fixes/verify/tool-calling-example/bundle.py

What goes in (the GPU machine has torch, transformers, peft, accelerate, pandas, pyarrow and
friends, but no Unsloth stack and no network):

- upstream/: the files the patch series in issue-fixes/patches/tool-calling-example/ adds,
  read from the patches themselves, so what runs there is exactly what the PR carries;
- wheels/: unsloth_zoo, cut_cross_entropy, trl 1.15.0, datasets 4.3.0 and the small packages
  Unsloth imports, for `pip install --no-deps --target`;
- site/: the `unsloth/` package of the unsloth wheel (the rest of that wheel is a web UI) and
  bitsandbytes with only its Python files and libbitsandbytes_cuda130.so.

Wheels missing from target/wheels or target/dev-tools/wheels are downloaded with
`pip download --no-deps` for CPython 3.12 on manylinux x86-64.
"""

import argparse
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SERIES = ROOT / "issue-fixes" / "patches" / "tool-calling-example"
PINNED = "2026.10.9"
# (requirement, file-name prefix) for the GPU machine's Python 3.12.
WHEELS = [
    (f"unsloth_zoo=={PINNED}", f"unsloth_zoo-{PINNED}-"),
    (f"unsloth=={PINNED}", f"unsloth-{PINNED}-"),
    ("bitsandbytes==0.50.2", "bitsandbytes-0.50.2-"),
    ("cut_cross_entropy==25.1.1", "cut_cross_entropy-25.1.1-"),
    ("trl==1.15.0", "trl-1.15.0-"),
    ("datasets==4.3.0", "datasets-4.3.0-"),
    ("torchao==0.18.0", "torchao-0.18.0-"),
    ("tyro==1.0.17", "tyro-1.0.17-"),
    ("msgspec==0.22.0", "msgspec-0.22.0-"),
    ("structlog==26.1.0", "structlog-26.1.0-"),
    ("json5==0.17.3", "json5-0.17.3-"),
    ("nest_asyncio==1.6.0", "nest_asyncio-1.6.0-"),
    ("hf_transfer==0.1.9", "hf_transfer-0.1.9-"),
    ("dill==0.4.0", "dill-0.4.0-"),
    ("multiprocess==0.70.18", "multiprocess-0.70.18-py312"),
    ("docstring_parser==0.18.0", "docstring_parser-0.18.0-"),
    ("shtab==1.13.0", "shtab-1.13.0-"),
    ("typeguard==4.6.1", "typeguard-4.6.1-"),
]
SLIM = {"unsloth", "bitsandbytes"}
LIMIT = 60 * 2**20  # the device call carries 64 MiB in all, the repository included


def wheel(requirement, prefix, cache):
    for folder in (ROOT / "target" / "wheels", cache):
        found = sorted(folder.glob(prefix + "*.whl")) if folder.is_dir() else []
        if found:
            return found[0]
    cache.mkdir(parents = True, exist_ok = True)
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.12", "--implementation", "cp", "-d", str(cache), requirement]
        + [arg for p in platforms for arg in ("--platform", p)],
        check = True,
    )
    found = sorted(cache.glob(prefix + "*.whl"))
    if not found:
        sys.exit(f"pip downloaded no {prefix}*.whl for {requirement}")
    return found[0]


def added_files(patch_text, patch_name):
    """(path, text) of every file a patch adds; a patch that changes existing files is refused."""
    files, path, lines, in_hunk = [], None, [], False
    for line in patch_text.splitlines(keepends = True):
        if line.startswith("diff --git "):
            if path:
                files.append((path, "".join(lines)))
            path, lines, in_hunk = None, [], False
        elif path is None and line.startswith("+++ b/"):
            path = line[len("+++ b/") :].rstrip("\n")
        elif line.startswith("--- ") and not in_hunk and line.strip() != "--- /dev/null":
            sys.exit(f"{patch_name}: changes an existing file ({line.strip()}); this bundler only copies added files")
        elif line.startswith("@@ "):
            in_hunk = True
        elif in_hunk and line.startswith("+"):
            lines.append(line[1:])
        elif in_hunk and line.startswith("\\ No newline"):
            lines[-1] = lines[-1].rstrip("\n")
        elif in_hunk and line.startswith((" ", "-")):
            sys.exit(f"{patch_name}: a hunk with context or removals; this bundler only copies added files")
    if path:
        files.append((path, "".join(lines)))
    return files


def main():
    parser = argparse.ArgumentParser(description = __doc__.split("\n\n")[0])
    parser.add_argument("--out", type = Path, default = ROOT / "target" / "dev-tools" / "tool-calling")
    args = parser.parse_args()
    out, cache = args.out, ROOT / "target" / "dev-tools" / "wheels"
    if out.exists():
        shutil.rmtree(out)
    (out / "wheels").mkdir(parents = True)

    patches = sorted(SERIES.glob("*.patch"))
    if not patches:
        sys.exit(f"no patches in {SERIES}")
    for patch in patches:
        for path, text in added_files(patch.read_text(), patch.name):
            target = out / "upstream" / path
            target.parent.mkdir(parents = True, exist_ok = True)
            target.write_text(text)
            print(f"upstream/{path} ({len(text)} bytes, from {patch.name})")

    for requirement, prefix in WHEELS:
        source = wheel(requirement, prefix, cache)
        name = prefix.split("-")[0]
        if name not in SLIM:
            shutil.copy(source, out / "wheels" / source.name)
            continue
        with zipfile.ZipFile(source) as z:
            for member in z.namelist():
                top = member.split("/")[0]
                keep = top.endswith(".dist-info") or (
                    top == name
                    and (name != "bitsandbytes" or not member.endswith(".so") or member.endswith("_cuda130.so"))
                )
                if keep:
                    z.extract(member, out / "site")

    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {size / 2**20:.1f} MiB")
    if size > LIMIT:
        sys.exit(f"{out} is {size / 2**20:.1f} MiB, over the {LIMIT / 2**20:.0f} MiB the device call can carry")


if __name__ == "__main__":
    main()
