"""GPU verification of the flex-attention-dynamic series against unsloth_zoo 2026.10.9.

One process per (mode, layout), so every run starts with empty Dynamo caches:

    python3 verify_flex.py --mode before|after --layout causal|padded|packed --out FILE.json

`before` uses only what the pinned release offers, the way its own code calls it:
  causal  reused_compiled_create_block_mask(causal_mask, None, None, L, L) (attention_sink.py)
  padded  generate_causal_mask_with_padding(padding_start_idx) + compiled_create_block_mask
          (left padding, as in flex_attention_with_sink's prefill)
  packed  the pinned release has no document mask: a user-written mask_mod over document ids
          (the same function the patch adds) + compiled_create_block_mask
`after` uses the patched API: the same causal call, and create_document_block_mask(
flex_document_ids(attention_mask = ...) / (position_ids = ...)) for padded / packed.

Every call runs unsloth_zoo's compiled flex_attention forward and backward (bf16, GQA 8/2 heads,
head_dim 64, batch 2) on a new length drawn from 100..1000 (seeded; 100 is always included,
a one-block length), and records: Dynamo frame compilations and their recompile reasons, the
wall time of the call (compilation included), and the output / input-gradient error against
SDPA in float32 (the reference) next to SDPA's own bfloat16 error, for the same mask.
Padding rows are not compared (the pinned left-padding mask leaves them empty, the patch gives
them their own document) and get a zero upstream gradient, as a masked loss gives them.
A decode-shaped tail (one query row, three KV lengths) checks that flex_decoding still runs.
"""

import argparse
import json
import random
import sys
import time
import traceback

import torch
import torch.nn.functional as F

B, HQ, HKV, D = 2, 8, 2, 64


def lengths(n = 10, seed = 3407):
    rng = random.Random(seed)
    out = [rng.randint(100, 1000) for _ in range(n - 1)]
    out.insert(5, 100)
    return out


def document_mask_mod(document_ids):
    def mask_mod(b, h, q_idx, kv_idx):
        same = document_ids[b, q_idx] == document_ids[b, kv_idx]
        return same & (q_idx >= kv_idx)

    return mask_mod


def batch(layout, qlen, rng, device):
    """(attention_mask or None, position_ids or None, document ids for the reference)."""
    if layout == "causal":
        return None, None, torch.zeros(B, qlen, dtype = torch.int32, device = device)
    if layout == "padded":
        valid = [qlen] + [rng.randint(1, qlen) for _ in range(B - 1)]
        mask = torch.zeros(B, qlen, dtype = torch.long, device = device)
        for row, n in enumerate(valid):
            mask[row, qlen - n :] = 1  # left padding, as generation / the pinned prefill mask
        ids = torch.where(mask == 1, 0, -1).to(torch.int32)
        return mask, None, ids
    rows = []
    for _ in range(B):
        pos = []
        while len(pos) < qlen:
            pos += range(rng.randint(1, qlen))
        rows.append(pos[:qlen])
    position_ids = torch.tensor(rows, device = device)
    ids = torch.cumsum(position_ids == 0, dim = -1, dtype = torch.int32)
    return None, position_ids, ids


def build_mask(FU, mode, layout, qlen, attention_mask, position_ids, ids, device):
    if layout == "causal":
        return FU.reused_compiled_create_block_mask(
            FU.causal_mask, None, None, qlen, qlen, device = device
        )
    if mode == "after":
        return FU.create_document_block_mask(
            FU.flex_document_ids(attention_mask = attention_mask, position_ids = position_ids)
        )
    if layout == "padded":
        start = attention_mask.argmax(1).to(torch.int32)
        mask_mod = FU.generate_causal_mask_with_padding(start)
    else:
        mask_mod = document_mask_mod(ids)
    return FU.compiled_create_block_mask(mask_mod, B, None, qlen, qlen, device = device)


def new_compiles(seen):
    from torch._dynamo.utils import _compilation_metrics

    entries = list(_compilation_metrics)
    fresh = entries[seen:]
    return len(entries), [
        {
            "co_name": m.co_name,
            "compile_id": m.compile_id,
            "recompile_reason": m.recompile_reason,
            "frame_compile_s": m.entire_frame_compile_time_s,
            "fail_reason": m.fail_reason,
        }
        for m in fresh
    ]


def rel_err(x, ref, rows = None):
    x, ref = x.float(), ref.float()
    if rows is not None:
        x, ref = x[rows], ref[rows]
    return ((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices = ["before", "after"], required = True)
    ap.add_argument("--layout", choices = ["causal", "padded", "packed"], required = True)
    ap.add_argument("--out", required = True)
    ap.add_argument("--lengths", help = "comma-separated lengths instead of the seeded 10")
    ap.add_argument("--batch", type = int, default = B)
    args = ap.parse_args()
    globals()["B"] = args.batch
    res = {"mode": args.mode, "layout": args.layout, "calls": [], "decode": []}

    def dump():
        with open(args.out, "w") as f:
            json.dump(res, f, indent = 1, default = str)

    t0 = time.time()
    try:
        import unsloth  # noqa: F401  first, as users do
        import unsloth_zoo
        from unsloth_zoo.flex_attention import utils as FU

        res["import_s"] = time.time() - t0
        res["versions"] = {
            "torch": torch.__version__,
            "unsloth": unsloth.__version__,
            "unsloth_zoo": unsloth_zoo.__version__,
            "unsloth_zoo_file": unsloth_zoo.__file__,
            "device": torch.cuda.get_device_name(0),
            "patched": hasattr(FU, "create_document_block_mask"),
        }
        assert res["versions"]["patched"] == (args.mode == "after"), res["versions"]
        device = "cuda"
        gen = torch.Generator(device = device).manual_seed(0)
        rng = random.Random(1)
        seen, _ = new_compiles(0)
        res["compiles_at_start"] = seen
        todo = [int(x) for x in args.lengths.split(",")] if args.lengths else lengths()
        for qlen in todo:
            attention_mask, position_ids, ids = batch(args.layout, qlen, rng, device)
            torch.cuda.synchronize()
            t = time.time()
            block_mask = build_mask(
                FU, args.mode, args.layout, qlen, attention_mask, position_ids, ids, device
            )
            torch.cuda.synchronize()
            mask_s = time.time() - t

            def rnd(heads):
                x = torch.randn(B, heads, qlen, D, device = device, generator = gen)
                return x.to(torch.bfloat16).requires_grad_()

            q, k, v = rnd(HQ), rnd(HKV), rnd(HKV)
            grad = torch.randn(B, HQ, qlen, D, device = device, generator = gen)
            token = (ids >= 0)[:, None, :, None]  # (B, 1, L, 1)
            grad = grad * token
            t = time.time()
            out = FU.flex_attention(
                q, k, v,
                block_mask = block_mask,
                enable_gqa = True,
                kernel_options = FU.PREFILL_KERNEL_OPTIONS,
            )
            out.backward(grad.to(out.dtype))
            torch.cuda.synchronize()
            call_s = time.time() - t
            seen, fresh = new_compiles(seen)

            idx = torch.arange(qlen, device = device)
            dense = (ids[:, :, None] == ids[:, None, :]) & (idx[:, None] >= idx[None, :])
            dense = dense[:, None]

            def sdpa(dtype):
                qs, ks, vs = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask = dense, enable_gqa = True)
                o.backward(grad.to(dtype))
                return {"out": o, "dq": qs.grad, "dk": ks.grad, "dv": vs.grad}

            ref, bf16 = sdpa(torch.float32), sdpa(torch.bfloat16)
            flex = {"out": out, "dq": q.grad, "dk": k.grad, "dv": v.grad}
            rows = token.expand(B, HQ, qlen, D)
            errors = {}
            for name in ref:
                sel = rows if name == "out" else None
                errors[name] = {
                    "flex": rel_err(flex[name], ref[name], sel),
                    "sdpa_bf16": rel_err(bf16[name], ref[name], sel),
                    "flex_vs_sdpa_bf16_max_abs": (
                        (flex[name].float() - bf16[name].float())[sel].abs().max().item()
                        if sel is not None
                        else (flex[name].float() - bf16[name].float()).abs().max().item()
                    ),
                }
            ok = all(e["flex"] <= 2 * e["sdpa_bf16"] + 1e-3 for e in errors.values())
            finite = all(torch.isfinite(t).all().item() for t in flex.values())
            res["calls"].append(
                {
                    "qlen": qlen,
                    "mask_s": mask_s,
                    "call_s": call_s,
                    "compiles": fresh,
                    "errors": errors,
                    "within_bf16_tolerance": ok,
                    "finite": finite,
                }
            )
            dump()
        # Decode-shaped tail: one query row against a growing KV (flex_decoding kernels).
        if args.layout == "causal" and not args.lengths:

            def full(b, h, q_idx, kv_idx):
                return kv_idx >= 0

            for kvlen in (301, 302, 577):
                q = torch.randn(B, HQ, 1, D, device = device, dtype = torch.bfloat16)
                k = torch.randn(B, HKV, kvlen, D, device = device, dtype = torch.bfloat16)
                v = torch.randn(B, HKV, kvlen, D, device = device, dtype = torch.bfloat16)
                bm = FU.compiled_create_block_mask(full, None, None, 1, kvlen, device = device)
                t = time.time()
                with torch.no_grad():
                    out = FU.flex_attention(q, k, v, block_mask = bm, enable_gqa = True)
                torch.cuda.synchronize()
                call_s = time.time() - t
                seen, fresh = new_compiles(seen)
                ref = F.scaled_dot_product_attention(
                    q.float(), k.float(), v.float(), enable_gqa = True
                )
                res["decode"].append(
                    {
                        "kvlen": kvlen,
                        "call_s": call_s,
                        "compiles": fresh,
                        "rel_err": rel_err(out, ref),
                    }
                )
                dump()
    except Exception:
        res["error"] = traceback.format_exc()
    res["total_s"] = time.time() - t0
    calls = res["calls"]
    res["summary"] = {
        "calls": len(calls),
        "flex_frames_compiled": sum(
            1 for c in calls for m in c["compiles"] if m["co_name"] == "flex_attention"
        ),
        "frames_compiled": sum(len(c["compiles"]) for c in calls),
        "recompiles": sum(1 for c in calls for m in c["compiles"] if m["recompile_reason"]),
        "all_within_bf16_tolerance": all(c["within_bf16_tolerance"] for c in calls),
        "all_finite": all(c["finite"] for c in calls),
        "wall_s_all_calls": sum(c["call_s"] + c["mask_s"] for c in calls),
        "wall_s_after_first_two": sum(c["call_s"] + c["mask_s"] for c in calls[2:]),
    }
    dump()
    print(json.dumps({k: res.get(k) for k in ("mode", "layout", "summary", "error")}, indent = 1))
    return 0 if "error" not in res else 1


if __name__ == "__main__":
    sys.exit(main())
