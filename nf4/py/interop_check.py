"""Loads a checkpoint written by `cargo run -p nf4 --example interop` with bitsandbytes.

For each 4-bit weight W: QuantState.from_dict (as transformers' loader calls it) must
accept our keys and JSON, and dequantize_4bit must return exactly our CPU bytes
(`ref.W.dequant`). Then bitsandbytes re-quantizes `ref.W.input` on the GPU and we count
how many packed bytes / absmax values differ from ours (reported, see nf4's quantize docs).
Exit status 1 if any dequantization differs or a state fails to load.
"""
import json
import sys

import torch
from safetensors.torch import load_file

import bitsandbytes.functional as F

tensors = load_file(sys.argv[1], device="cuda")
weights = sorted({k.split(".quant_state.")[0] for k in tensors if ".quant_state.bitsandbytes__" in k})
fail = 0
report = []
for w in weights:
    qs_dict = {k: v for k, v in tensors.items() if k.startswith(w + ".")}
    qs = F.QuantState.from_dict(qs_dict, device=torch.device("cuda"))
    packed = tensors[w]
    ours = tensors[f"ref.{w}.dequant"]
    theirs = F.dequantize_4bit(packed, qs)
    iv = lambda t: t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)
    same = theirs.shape == ours.shape and torch.equal(iv(theirs.contiguous()), iv(ours))
    fail += not same
    x = tensors[f"ref.{w}.input"]
    p2, qs2 = F.quantize_4bit(x, blocksize=qs.blocksize, compress_statistics=qs.nested, quant_type=qs.quant_type,
                              quant_storage=packed.dtype)
    pb, pb2 = packed.view(torch.uint8).reshape(-1), p2.view(torch.uint8).reshape(-1)
    m = min(pb.numel(), pb2.numel())
    row = {"weight": w, "bnb_loads_and_dequant_equal": bool(same), "elements": x.numel(),
           "packed_bytes_differing": int((pb[:m] != pb2[:m]).sum()), "packed_bytes": m,
           "absmax_differing": int((qs.absmax.view(torch.uint8 if qs.nested else torch.int32) !=
                                    qs2.absmax.view(torch.uint8 if qs.nested else torch.int32)).sum()),
           "offset_ours": float(qs.offset) if qs.nested else None, "offset_bnb": float(qs2.offset) if qs.nested else None}
    report.append(row)
    print(json.dumps(row))
with open(sys.argv[2], "w") as f:
    json.dump(report, f, indent=1)
print(f"interop: {len(weights)} weights, {fail} dequantization mismatches")
sys.exit(1 if fail or not weights else 0)
