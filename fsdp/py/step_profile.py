#!/usr/bin/env python3
"""Where one training step's GPU time goes, from an Nsight Compute CSV of `qlora bench`.

Record (on the GPU machine; two steps, the second is summarised):
    ncu --clock-control none --metrics gpu__time_duration.sum --csv \
        bundle/bin/qlora bench --checkpointing off --warmup 1 --steps 1 > prof.csv
Then:
    python3 fsdp/py/step_profile.py prof.csv [--kernels]      (prof.csv.gz works too)

ncu serialises kernels and flushes caches between them, so the sum is a little off the
step time `qlora bench` reports (no overlap, no launch gaps, cold caches), and copies that
are not kernels (cuMemcpy) are not in it. The step is the kernels after the first
`adamw_step` up to and including the second.
"""
import collections
import csv
import gzip
import re
import sys

# (category, pattern on the kernel name), first match wins. The LoRA GEMMs are cuBLAS's
# small-tile kernels (one dimension is the rank) and the split-K reduces behind them.
CATEGORIES = [
    ("attention", r"^attn_"),
    ("SwiGLU", r"swiglu"),
    ("RMSNorm", r"^rms_"),
    ("RoPE", r"^rope"),
    ("NF4 dequant", r"nf4_dequant"),
    ("LM head loss kernel", r"memlinear_loss"),
    ("LoRA (own kernels)", r"^lora_"),
    ("LoRA GEMMs (cuBLAS small tiles, split-K reduces)", r"splitKreduce|nvjet_sm90_\w+_(16|32|48|64)x(16|32|64)_64x1[5-6]"),
    ("base + head GEMMs (cuBLAS)", r"nvjet|gemm|cutlass"),
    ("casts", r"^cast_"),
    ("optimizer, embedding, loss bookkeeping", r"adamw|sum_squares|clip_factor|sum_losses|validate_targets|embedding"),
]


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    path = sys.argv[1]
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    try:
        hi = next(i for i, r in enumerate(rows) if r and r[0] == "ID")
    except StopIteration:
        sys.exit(f"{sys.argv[1]}: no ncu CSV header (a row starting with \"ID\")")
    h = rows[hi]
    ki, vi, ui = h.index("Kernel Name"), h.index("Metric Value"), h.index("Metric Unit")
    scale = {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "msecond": 1e3, "nsecond": 1e-3}
    ks = []
    for r in rows[hi + 1:]:
        if len(r) == len(h) and r[vi]:
            ks.append((r[ki], float(r[vi].replace(",", "")) * scale.get(r[ui], 1e-3)))
    ad = [i for i, (n, _) in enumerate(ks) if "adamw" in n]
    if len(ad) < 2:
        sys.exit(f"{sys.argv[1]}: fewer than two adamw_step launches: record two steps (--warmup 1 --steps 1)")
    step = ks[ad[0] + 1: ad[1] + 1]
    total = sum(t for _, t in step)
    cat = collections.defaultdict(lambda: [0, 0.0])
    per_kernel = collections.defaultdict(lambda: [0, 0.0])
    for n, t in step:
        c = next((c for c, p in CATEGORIES if re.search(p, n)), "other")
        cat[c][0] += 1
        cat[c][1] += t
        per_kernel[n[:80]][0] += 1
        per_kernel[n[:80]][1] += t
    print(f"one step: {len(step)} kernels, {total / 1e3:.1f} ms of kernel time\n")
    print("| category | launches | ms | share |\n|---|---|---|---|")
    for c, (k, t) in sorted(cat.items(), key=lambda x: -x[1][1]):
        print(f"| {c} | {k} | {t / 1e3:.2f} | {100 * t / total:.1f}% |")
    if "--kernels" in sys.argv:
        print("\n| kernel | launches | µs total | µs each |\n|---|---|---|---|")
        for n, (k, t) in sorted(per_kernel.items(), key=lambda x: -x[1][1]):
            print(f"| `{n}` | {k} | {t:.0f} | {t / k:.1f} |")


if __name__ == "__main__":
    main()
