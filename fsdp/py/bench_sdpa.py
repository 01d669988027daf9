"""PyTorch SDPA on the shapes of examples/bench_attention.rs: the bar for our fused kernel.

q, k, v are column slices of one fused [B, L, (H + 2 KV) * D] bf16 projection output (as in
the model), viewed as [B, H, L, D] (transposes, no copies), `is_causal=True`. Each backend
is forced with `sdpa_kernel`; GQA through `enable_gqa=True`, and also through HF's
`repeat_kv` (k/v expanded to H heads) where a backend refuses `enable_gqa`. Timing: CUDA
events around 10 back-to-back calls (Python dispatch gaps hidden, as in the Rust benchmark),
warm-up, median of the samples divided by 10. FLOPs: forward 4*B*H*L^2*D/2 (causal), backward 2.5x.
One JSON object per line on stdout, a table on stderr.
"""
import contextlib
import json
import statistics
import warnings
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

WARMUP, REPS = (1, 3) if "--quick" in sys.argv else (2, 9)
BATCH = 10
SHAPES = [("llama-1b", 4, 2048, 32, 8, 64), ("llama-3b", 4, 2048, 24, 8, 128)]
# None: whatever SDPA picks by itself (what HF's "sdpa" attention gets).
BACKENDS = [("default", None), ("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION)]


def timed(fn):
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(REPS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(BATCH):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / BATCH)
    return statistics.median(times)


def main():
    warnings.filterwarnings("ignore", category=UserWarning)
    card = torch.cuda.get_device_name(0)
    print(f"{card}, torch {torch.__version__}, warm-up {WARMUP}, median of {REPS} samples of {BATCH} calls",
          file=sys.stderr)
    torch.manual_seed(0)
    for name, B, L, H, KV, D in SHAPES:
        qkv = torch.randn(B, L, (H + 2 * KV) * D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dout = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
        flops = 4 * B * H * L * L * D / 2

        def views(repeat):
            q = qkv[..., : H * D].view(B, L, H, D).transpose(1, 2)
            k = qkv[..., H * D: (H + KV) * D].view(B, L, KV, D).transpose(1, 2)
            v = qkv[..., (H + KV) * D:].view(B, L, KV, D).transpose(1, 2)
            if repeat:
                k = k.repeat_interleave(H // KV, dim=1)
                v = v.repeat_interleave(H // KV, dim=1)
            return q, k, v

        for bname, backend in BACKENDS:
            for gqa in ["enable_gqa", "repeat_kv"]:
                def fwd():
                    q, k, v = views(gqa == "repeat_kv")
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa == "enable_gqa")

                def fwd_bwd():
                    qkv.grad = None
                    fwd().backward(dout)

                try:
                    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                        with torch.no_grad():
                            f_us = timed(fwd)
                        fb_us = timed(fwd_bwd)
                except Exception as e:  # backend refuses this shape / option
                    msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
                    print(f"{name:<9} {bname:<9} {gqa:<10} unavailable: {msg}", file=sys.stderr)
                    continue
                b_us = fb_us - f_us
                rec = dict(kind="sdpa", card=card, torch=torch.__version__, model=name, seqs=B, seq_len=L,
                           heads=H, kv_heads=KV, head_dim=D, backend=bname, gqa=gqa, fwd_us=round(f_us, 2),
                           fwd_bwd_us=round(fb_us, 2), bwd_us=round(b_us, 2),
                           fwd_tflops=round(flops / f_us / 1e6, 2),
                           bwd_tflops=round(2.5 * flops / b_us / 1e6, 2),
                           fwd_bwd_tflops=round(3.5 * flops / fb_us / 1e6, 2))
                print(json.dumps(rec), flush=True)
                print(f"{name:<9} {bname:<9} {gqa:<10} fwd {f_us:8.1f} us {rec['fwd_tflops']:6.1f} TF/s | "
                      f"bwd {b_us:8.1f} us {rec['bwd_tflops']:6.1f} TF/s | f+b {fb_us:8.1f} us "
                      f"{rec['fwd_bwd_tflops']:6.1f} TF/s", file=sys.stderr)


if __name__ == "__main__":
    main()
