"""NF4 dequant on the GPU: ours (libnf4.so via ctypes) against bitsandbytes and the
Unsloth-style three-launch path, in one process, on the same tensors and stream.

Usage: python3 bench_dequant.py LIBNF4_SO OUT_JSON

For every benchmark shape and output dtype it first checks parity (ours == bitsandbytes'
`dequantize_4bit`, bit for bit, fresh random weights; plus f32 output and the non-nested
state), then times the three implementations with CUDA events (median of many), two ways:
- eager: one event pair around each call, as a training loop sees it (includes launch
  and Python overhead when those exceed the kernel; ours and the Unsloth-style path are
  called with prebuilt ctypes arguments, bitsandbytes through its public API);
- graph: 20 calls captured in a CUDA graph, replayed, time / 20 (device time only).
Weights rotate among enough copies that every call reads from HBM, not L2.
Exits non-zero if any parity check fails.
"""
import ctypes
import json
import math
import sys

import torch

import bitsandbytes as bnb
import bitsandbytes.functional as F
from bitsandbytes.cextension import lib as bnblib

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
OUT_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

ours = ctypes.CDLL(sys.argv[1])
ours.nf4_dequantize.restype = ctypes.c_int
ours.nf4_dequantize.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64,
                                                         ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_int,
                                                         ctypes.c_void_p]
ours.nf4_last_error.restype = ctypes.c_char_p
dev = torch.device("cuda")
props = torch.cuda.get_device_properties(dev)
failures = []


def ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def stream():
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


def ours_dequant(packed, qs, out, offset=None):
    """`offset`: the nested offset as a Python float (read it once, outside graph capture)."""
    nested = qs.nested
    if nested and offset is None:
        offset = float(qs.offset)
    rc = ours.nf4_dequantize(
        ptr(packed), ptr(qs.absmax), ptr(qs.state2.absmax) if nested else None, ptr(qs.state2.code) if nested else None,
        offset if nested else 0.0, None, 0 if qs.quant_type == "nf4" else 1, out.numel(), qs.blocksize,
        qs.state2.blocksize if nested else 0, ptr(out), OUT_CODE[out.dtype], stream())
    if rc != 0:
        raise RuntimeError(ours.nf4_last_error().decode())


def ours_prepare(packed, qs, out, offset, s):
    """Arguments built once, so the timed call is one ctypes call (as a C++ caller would be)."""
    nested = qs.nested
    args = (ptr(packed), ptr(qs.absmax), ptr(qs.state2.absmax) if nested else None, ptr(qs.state2.code) if nested else None,
            offset if nested else 0.0, None, 0 if qs.quant_type == "nf4" else 1, out.numel(), qs.blocksize,
            qs.state2.blocksize if nested else 0, ptr(out), OUT_CODE[out.dtype], s)
    f = ours.nf4_dequantize
    return lambda: f(*args)


def unsloth_prepare(un, packed, qs, out, s):
    """Unsloth's fast_dequantize with its arguments built once, likewise."""
    a1 = (ptr(qs.state2.code), ptr(qs.absmax), ptr(qs.state2.absmax), ptr(un.absmax32),
          ctypes.c_int(qs.state2.blocksize), ctypes.c_int(qs.absmax.numel()), s)
    a2 = (None, ptr(packed), ptr(un.absmax32), ptr(out), ctypes.c_int(qs.blocksize), ctypes.c_int(out.numel()), s)
    f1, f2, absmax32, offset = bnblib.cdequantize_blockwise_fp32, un.fn, un.absmax32, qs.offset

    def call():
        f1(*a1)
        absmax32.add_(offset)
        f2(*a2)
    return call


class UnslothStyle:
    """Unsloth's fast_dequantize: 8-bit absmax dequant to fp32, += offset, NF4 kernel; buffers preallocated."""

    def __init__(self, qs, dtype):
        self.absmax32 = torch.empty(qs.absmax.numel(), dtype=torch.float32, device=dev)
        self.fn = {torch.bfloat16: bnblib.cdequantize_blockwise_bf16_nf4, torch.float16: bnblib.cdequantize_blockwise_fp16_nf4}[dtype]

    def __call__(self, packed, qs, out):
        s = stream()
        bnblib.cdequantize_blockwise_fp32(ptr(qs.state2.code), ptr(qs.absmax), ptr(qs.state2.absmax), ptr(self.absmax32),
                                          ctypes.c_int(qs.state2.blocksize), ctypes.c_int(qs.absmax.numel()), s)
        self.absmax32 += qs.offset
        self.fn(None, ptr(packed), ptr(self.absmax32), ptr(out), ctypes.c_int(qs.blocksize), ctypes.c_int(out.numel()), s)


def bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def check(name, a, b):
    if not torch.equal(bits(a), bits(b)):
        bad = (bits(a) != bits(b)).nonzero()
        failures.append(f"{name}: {bad.shape[0]} elements differ, first at {bad[0].tolist()}")
        print("PARITY FAIL", failures[-1])
        return False
    return True


def copy_bandwidth():
    x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(20)]
    for a, b in ev:
        a.record(); y.copy_(x); b.record()
    torch.cuda.synchronize()
    ms = sorted(a.elapsed_time(b) for a, b in ev)[len(ev) // 2]
    return 2 * x.numel() / (ms * 1e-3) / 1e9


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def time_eager(prepare, sets, reps=200, warmup=20):
    """`prepare(set, stream)` returns a no-argument callable that enqueues one dequantization."""
    calls = [prepare(st, stream()) for st in sets]
    for i in range(warmup):
        calls[i % len(calls)]()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i, (a, b) in enumerate(ev):
        a.record(); calls[i % len(calls)](); b.record()
    torch.cuda.synchronize()
    return median([a.elapsed_time(b) * 1e3 for a, b in ev])


def time_graph(prepare, sets, per_graph=20, reps=30):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        calls = [prepare(st, stream()) for st in sets]
        for i in range(3):
            calls[i % len(calls)]()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        calls = [prepare(st, stream()) for st in sets]
        for i in range(per_graph):
            calls[i % len(calls)]()
    for _ in range(3):
        g.replay()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        a.record(); g.replay(); b.record()
    torch.cuda.synchronize()
    return median([a.elapsed_time(b) * 1e3 / per_graph for a, b in ev])


gbps = copy_bandwidth()
print(f"device: {props.name}, copy bandwidth {gbps:.0f} GB/s (read + write)")
results = {"device": props.name, "torch": torch.__version__, "bitsandbytes": bnb.__version__, "copy_GBps": gbps, "rows": []}

for (r, c) in SHAPES:
    for dname, dt in DTYPES.items():
        n = r * c
        bytes_per_call = n * (0.5 + 1 / 64 + 4 / 16384 + 2)
        copies = max(2, math.ceil(4 * props.L2_cache_size / bytes_per_call))
        sets_bnb, sets_ours, sets_un = [], [], []
        ok = True
        for k in range(copies):
            W = (torch.randn(r, c, device=dev) * 0.02).to(dt)
            packed, qs = F.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
            del W
            out = torch.empty(r, c, dtype=dt, device=dev)
            if k == 0:  # parity on fresh random weights: bf16/fp16, fp32 out, non-nested state
                ref = F.dequantize_4bit(packed, qs)
                out.fill_(float("nan"))
                ours_dequant(packed, qs, out)
                ok &= check(f"{r}x{c} {dname}", out, ref)
                qs32 = F.QuantState(absmax=qs.absmax, shape=qs.shape, code=qs.code, blocksize=qs.blocksize,
                                    quant_type=qs.quant_type, dtype=torch.float32, offset=qs.offset, state2=qs.state2)
                out32 = torch.full((r, c), float("nan"), dtype=torch.float32, device=dev)
                ours_dequant(packed, qs32, out32)
                ok &= check(f"{r}x{c} {dname}->fp32", out32, F.dequantize_4bit(packed, qs32))
                del out32, ref
                W2 = (torch.randn(r, c, device=dev) * 0.02).to(dt)
                p2, qs2 = F.quantize_4bit(W2, blocksize=64, compress_statistics=False, quant_type="nf4")
                o2 = torch.full((r, c), float("nan"), dtype=dt, device=dev)
                ours_dequant(p2, qs2, o2)
                ok &= check(f"{r}x{c} {dname} non-nested", o2, F.dequantize_4bit(p2, qs2))
                del W2, p2, qs2, o2
            sets_bnb.append((packed, qs))
            sets_ours.append((packed, qs, out, float(qs.offset)))
            sets_un.append((packed, qs, out))
        un = UnslothStyle(sets_un[0][1], dt)
        floor_us = bytes_per_call / (gbps * 1e9) * 1e6
        row = {"shape": [r, c], "dtype": dname, "parity": ok, "copies": copies, "floor_us": floor_us}
        for mode, timer in (("eager", time_eager), ("graph", time_graph)):
            row[f"bnb_{mode}_us"] = timer(lambda st, s: (lambda: F.dequantize_4bit(*st)), sets_bnb)
            row[f"unsloth_{mode}_us"] = timer(lambda st, s: unsloth_prepare(un, *st, s), sets_un)
            row[f"ours_{mode}_us"] = timer(lambda st, s: ours_prepare(*st, s), sets_ours)
        results["rows"].append(row)
        print(f"{r}x{c} {dname}: parity={'ok' if ok else 'FAIL'}  graph: ours {row['ours_graph_us']:.1f} us, "
              f"unsloth {row['unsloth_graph_us']:.1f}, bnb {row['bnb_graph_us']:.1f}, floor {floor_us:.1f} | eager: ours "
              f"{row['ours_eager_us']:.1f}, unsloth {row['unsloth_eager_us']:.1f}, bnb {row['bnb_eager_us']:.1f}")
        del sets_bnb, sets_ours, sets_un, un
        torch.cuda.empty_cache()

results["parity_failures"] = failures
with open(sys.argv[2], "w") as f:
    json.dump(results, f, indent=1)
sys.exit(1 if failures else 0)
