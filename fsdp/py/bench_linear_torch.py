"""Baseline for fsdp/examples/bench_linear.rs: the same Llama-3.2-1B projection groups as
PEFT runs them on a base weight that is *already* dequantized to bf16 (no NF4 dequant time
counted: bitsandbytes is not installed on the GPU machine), one nn.Linear-style product
per projection (q, k, v separately), LoRA r on every projection, torch autograd for the
backward (dx, dA, dB; W frozen).

    python3 bench_linear_torch.py [--rows 8192] [--rank 16] [--json out.json]

Times are CUDA-event medians (us) over 20 repetitions after 3 warm-ups, inputs rotated
over 4 copies, like the Rust benchmark.
"""
import argparse
import json

import torch

GROUPS = [("q|k|v", 2048, [2048, 512, 512]), ("o", 2048, [2048]), ("gate|up", 2048, [8192, 8192]), ("down", 8192, [2048])]


def median_us(fn, warmup=3, reps=20):
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(warmup + i)
        b.record()
        times.append((a, b))
    torch.cuda.synchronize()
    ts = sorted(a.elapsed_time(b) * 1e3 for a, b in times)
    n = len(ts)
    return ts[n // 2] if n % 2 else 0.5 * (ts[n // 2 - 1] + ts[n // 2])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json")
    a = ap.parse_args()
    dev, dt, r, rows, copies = "cuda", torch.bfloat16, a.rank, a.rows, 4
    torch.manual_seed(0)
    out = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, rows {rows}, r {r}, bf16 (us)")
    print(f"{'group':<8} {'gemm fwd':>9} {'fwd':>9} {'bwd':>9} {'fwd+bwd':>9}")
    for name, inf, outs in GROUPS:
        ws = [torch.randn(o, inf, device=dev, dtype=dt) / inf**0.5 for o in outs]
        As = [(torch.randn(r, inf, device=dev, dtype=dt) / inf**0.5).requires_grad_() for _ in outs]
        Bs = [(torch.randn(o, r, device=dev, dtype=dt) * 0.1).requires_grad_() for o in outs]
        xs = [torch.randn(rows, inf, device=dev, dtype=dt).requires_grad_() for _ in range(copies)]
        dys = [[torch.randn(rows, o, device=dev, dtype=dt) for o in outs] for _ in range(copies)]
        s = 2.0

        def fwd(i):
            x = xs[i % copies]
            return [torch.nn.functional.linear(x, w) + s * torch.nn.functional.linear(torch.nn.functional.linear(x, A), B) for w, A, B in zip(ws, As, Bs)]

        def gemm_fwd(i):
            x = xs[i % copies]
            with torch.no_grad():
                for w in ws:
                    torch.nn.functional.linear(x, w)

        ys = {}

        def fwd_keep(i):
            ys[i] = fwd(i)

        def bwd(i):
            torch.autograd.backward(ys.pop(i), dys[i % copies])

        t_gemm = median_us(gemm_fwd)
        t_fwd = median_us(fwd)
        # Backward timed alone: forwards run untimed before each timed backward.
        times = []
        for i in range(23):
            fwd_keep(i)
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            bwd(i)
            e1.record()
            if i >= 3:
                times.append((e0, e1))
        torch.cuda.synchronize()
        ts = sorted(e0.elapsed_time(e1) * 1e3 for e0, e1 in times)
        t_bwd = 0.5 * (ts[9] + ts[10])
        for t in xs + As + Bs:
            t.grad = None
        print(f"{name:<8} {t_gemm:>9.1f} {t_fwd:>9.1f} {t_bwd:>9.1f} {t_fwd + t_bwd:>9.1f}")
        out.append({"group": name, "in": inf, "outs": outs, "rows": rows, "rank": r,
                    "us": {"gemm_fwd": t_gemm, "fwd": t_fwd, "bwd": t_bwd}})
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": out}, f, indent=1)


if __name__ == "__main__":
    main()
