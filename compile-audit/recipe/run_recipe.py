"""Train a Llama-3.2-1B-shaped QLoRA model for a few steps, eager or compiled, and record
per-step losses and timings (the caller sets TORCH_TRACE / TORCH_LOGS for the audit).

Usage: python3 run_recipe.py CONFIG OUT_DIR [--steps N] [--eager] [--stock] [options]

CONFIG (what issue 5 asks for; batch 1, gradient accumulation 2, lengths vary per step):
  sdpa         SDPA, unpadded, length T from BUCKETS
  sdpa_pad     SDPA, right padding: real length varies, padded to T
  sdpa_ckpt    SDPA with (non-reentrant) activation checkpointing
  flex_pad     flex_attention, dynamic lengths, padded batches
  flex_packed  flex_attention, packed documents (position_ids restart), document masking

--eager  no torch.compile (the reference loss curve and speed)
--stock  no recipe patches (reproduces the stock graph breaks; inputs as transformers
         expects them: 2-D attention_mask for padding, position_ids for packing)
--scope  layers (default: regional compile, see qlora_compile.compile_regions) or model
         (whole-model torch.compile, where the stock breaks appear)

Writes OUT_DIR/losses.jsonl ({"step": N, "loss": X, "grad_norm": G} per optimizer step) and
OUT_DIR/timing.json (step times, compile-inclusive first step, steady-state median,
tokens/s, peak memory, card, versions, dynamo's own counters).

The model has random weights (a checkpoint written once to --model-dir, then loaded with
BitsAndBytesConfig NF4 + double quant like a real one); the data are seeded random tokens
from a 2048-token sub-vocabulary, so the loss falls visibly and eager and compiled runs
see exactly the same batches.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

CONFIGS = ("sdpa", "sdpa_pad", "sdpa_ckpt", "flex_pad", "flex_packed")
BUCKETS = tuple(range(256, 1024 + 1, 128))  # padded/packed lengths: multiples of 128 (and 64)
SUB_VOCAB = 2048
GRAD_ACCUM = 2
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_1b_config(layers: int, tiny: bool):
    from transformers import LlamaConfig

    if tiny:  # for CPU smoke tests of the logic, not for results
        return LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                           num_attention_heads=8, num_key_value_heads=2, head_dim=32, vocab_size=4096,
                           max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5)
    return LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu", initializer_range=0.02,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_id=128001)


def ensure_checkpoint(model_dir: str, layers: int, tiny: bool, device: str) -> None:
    """Write a random-weight bf16 checkpoint once (seeded: every process loads the same)."""
    import torch
    from transformers import LlamaForCausalLM

    if os.path.exists(os.path.join(model_dir, "config.json")):
        return
    torch.manual_seed(1234)
    cfg = llama_1b_config(layers, tiny)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    tmp = model_dir + ".tmp"
    model.save_pretrained(tmp)
    os.replace(tmp, model_dir)
    del model


def build_model(args, attn: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = LlamaForCausalLM.from_pretrained(args.model_dir, quantization_config=q, dtype=torch.bfloat16,
                                             device_map={"": args.device}, attn_implementation=attn)
    model.config.use_cache = False
    if args.config == "sdpa_ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)  # LoRA A init
    lcfg = LoraConfig(r=32, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none",
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    model.train()
    return model


def make_batches(config: str, steps: int, buckets=BUCKETS, seed: int = 0):
    """The whole run's micro-batches, as plain Python data (same for every mode)."""
    rng = random.Random(seed * 7919 + CONFIGS.index(config))
    out = []
    for _ in range(steps * GRAD_ACCUM):
        t = rng.choice(buckets)
        b = {"T": t, "tokens": [rng.randrange(SUB_VOCAB) for _ in range(t)]}
        if config in ("sdpa_pad", "flex_pad"):
            b["valid"] = rng.randint(t // 2, t)  # real tokens; the rest is padding
        if config == "flex_packed":
            lens, left = [], t
            while left > 0:
                n = min(left, rng.randint(32, max(32, t // 2)))
                if 0 < left - n < 16:  # no runt documents at the end
                    n = left
                lens.append(n)
                left -= n
            b["docs"] = lens
        out.append(b)
    return out


def to_inputs(b: dict, config: str, device, stock: bool, masks):
    """Model kwargs for one micro-batch."""
    import torch

    t = b["T"]
    ids = torch.tensor([b["tokens"]], dtype=torch.long)
    labels = ids.clone()
    kw = {}
    if "valid" in b:
        v = b["valid"]
        labels[:, v:] = -100
        if config == "flex_pad" and not stock:
            kw["attention_mask"] = masks.padded(v, t)
        else:
            am = torch.zeros(1, t, dtype=torch.long)
            am[:, :v] = 1
            kw["attention_mask"] = am.to(device)
    if "docs" in b:
        pos, start = [], 0
        for n in b["docs"]:
            pos.extend(range(n))
            if start > 0:
                labels[:, start] = -100  # no prediction across a document boundary
            start += n
        kw["position_ids"] = torch.tensor([pos], dtype=torch.long).to(device)
        if not stock:
            kw["attention_mask"] = masks.packed(b["docs"])
    kw["input_ids"] = ids.to(device)
    kw["labels"] = labels.to(device)
    return kw


def versions() -> dict:
    import importlib

    v = {}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "triton"):
        try:
            v[name] = importlib.import_module(name).__version__
        except Exception as e:  # noqa: BLE001 - report, don't fail
            v[name] = f"unavailable: {type(e).__name__}"
    return v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", choices=CONFIGS)
    p.add_argument("out_dir")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps (each GRAD_ACCUM micro-batches)")
    p.add_argument("--eager", action="store_true", help="no torch.compile")
    p.add_argument("--stock", action="store_true", help="no recipe patches")
    p.add_argument("--layers", type=int, default=16, help="decoder layers (16 = Llama-3.2-1B)")
    p.add_argument("--tiny", action="store_true", help="tiny widths, for CPU smoke tests")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager for CPU checks)")
    p.add_argument("--device", default=None)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--scope", choices=("layers", "model"), default="layers",
                   help="regional compile (each layer, norm, head, loss) or the whole model at once")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--buckets", default=",".join(map(str, BUCKETS)),
                   help="comma-separated sequence lengths to draw from (padded/packed length)")
    p.add_argument("--prepare-only", action="store_true", help="write the checkpoint and exit")
    p.add_argument("--sdpa-math", action="store_true",
                   help="eager baseline of the baseline: SDPA's math kernel instead of flash/efficient "
                        "(another valid rounding order, to measure how far eager drifts from itself)")
    args = p.parse_args(argv)

    import torch

    if args.sdpa_math:
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.enable_math_sdp(True)

    import qlora_compile as qc

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model_dir is None:
        args.model_dir = os.path.join("/tmp", f"qlora-recipe-llama{'-tiny' if args.tiny else '-1b'}-{args.layers}l")
    ensure_checkpoint(args.model_dir, args.layers, args.tiny, args.device)
    if args.prepare_only:
        print(f"checkpoint at {args.model_dir}")
        return 0
    os.makedirs(args.out_dir, exist_ok=True)
    cuda = args.device.startswith("cuda")

    attn = "flex_attention" if args.config.startswith("flex") else "sdpa"
    t_load = time.perf_counter()
    model = build_model(args, attn)
    load_s = time.perf_counter() - t_load
    patches = []
    if not args.stock:
        if args.config == "sdpa_ckpt" and not args.eager and args.scope == "model":
            # whole-model compile only: under regional compile the hook runs eagerly, outside
            # every compiled region, and breaks nothing (compile_regions even relies on it)
            n = qc.patch_input_require_grads(model)
            patches.append(f"patch_input_require_grads (removed {n} hook(s))")
    masks = qc.FlexBlockMaskCache(args.device) if attn == "flex_attention" and not args.stock else None
    if masks is not None:
        patches.append("FlexBlockMaskCache")

    compiled = []
    if args.eager:
        fwd = model
    elif args.scope == "model":
        fwd = qc.compile_qlora(model, dynamic=True, backend=args.backend)
        compiled = ["whole model"]
    else:
        fwd = model
        compiled = qc.compile_regions(model, dynamic=True, backend=args.backend)
    params = [p_ for p_ in model.parameters() if p_.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    batches = make_batches(args.config, args.steps, tuple(int(x) for x in args.buckets.split(",")))
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    losses, step_s, tokens = [], [], []
    status = "ok"

    def on_term(signum, frame):  # `timeout` sends SIGTERM: still write what we have
        raise TimeoutError(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    loss_fh = open(os.path.join(args.out_dir, "losses.jsonl"), "w")
    try:
        for step in range(args.steps):
            t0 = time.perf_counter()
            micro = []
            ntok = 0
            for k in range(GRAD_ACCUM):
                b = batches[step * GRAD_ACCUM + k]
                kw = to_inputs(b, args.config, args.device, args.stock, masks)
                loss = fwd(**kw).loss
                (loss / GRAD_ACCUM).backward()
                micro.append(loss.detach())
                ntok += b.get("valid", b["T"])
            # the gradient's norm, logged beside the loss: parity of the backward itself, which a
            # loss curve that barely moves in 20 steps would not show
            grad_norm = float(torch.linalg.vector_norm(
                torch.stack([p_.grad.float().norm() for p_ in params if p_.grad is not None])))
            opt.step()
            opt.zero_grad(set_to_none=True)
            step_loss = float(torch.stack(micro).float().mean())  # syncs
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            losses.append({"step": step, "loss": step_loss, "grad_norm": grad_norm})
            loss_fh.write(json.dumps(losses[-1]) + "\n")
            loss_fh.flush()
            step_s.append(dt)
            tokens.append(ntok)
            print(f"[{args.config} {'eager' if args.eager else 'compiled'}] step {step:3d} "
                  f"T={[batches[step * GRAD_ACCUM + k]['T'] for k in range(GRAD_ACCUM)]} "
                  f"loss {step_loss:.5f} |g| {grad_norm:.5f}  {dt * 1000:.1f} ms", flush=True)
            if not math.isfinite(step_loss):
                status = "non-finite loss"
                break
    except Exception as e:  # noqa: BLE001 - record what happened, then fail
        import traceback

        traceback.print_exc()
        status = f"error: {type(e).__name__}: {str(e)[:500]}"
    finally:
        loss_fh.close()
        warm = step_s[2:] if len(step_s) > 4 else step_s[1:]
        med = statistics.median(warm) if warm else None
        tok_warm = tokens[2:] if len(step_s) > 4 else tokens[1:]
        timing = {
            "config": args.config,
            "mode": "eager" if args.eager else "compiled",
            "stock": args.stock,
            "status": status,
            "steps_done": len(losses),
            "steps_asked": args.steps,
            "lr": args.lr,
            "grad_accum": GRAD_ACCUM,
            "layers": args.layers,
            "tiny": args.tiny,
            "backend": None if args.eager else args.backend,
            "scope": None if args.eager else args.scope,
            "compiled": compiled,
            "dynamic": None if args.eager else True,
            "attn": attn,
            "patches": patches,
            "load_s": load_s,
            "step_s": step_s,
            "first_step_s": step_s[0] if step_s else None,
            "median_step_s_after_warmup": med,
            "warmup_steps_excluded": len(step_s) - len(warm) if step_s else None,
            "tokens_per_s_after_warmup": (sum(tok_warm) / sum(warm)) if warm else None,
            "total_s": sum(step_s),
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "versions": versions(),
            "dynamo": qc.dynamo_counters() if not args.eager else None,
            "mask_cache": {"hits": masks.hits, "misses": masks.misses} if masks is not None else None,
        }
        with open(os.path.join(args.out_dir, "timing.json"), "w") as fh:
            json.dump(timing, fh, indent=1)
    print(f"[{args.config} {'eager' if args.eager else 'compiled'}] {status}: {len(losses)} steps, "
          f"median step {timing['median_step_s_after_warmup']}, first step {timing['first_step_s']}")
    return 0 if status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
