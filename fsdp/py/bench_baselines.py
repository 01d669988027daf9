#!/usr/bin/env python3
"""The peers `fsdp` must beat: QLoRA training throughput of Unsloth and of
transformers + peft + bitsandbytes, one mode per process, on the Llama-3.2-1B shape.

Usage (GPU machine; `bash bundle/run.sh fsdp-baselines` runs the three standard modes):

    python3 bench_baselines.py --build-only [--model-dir DIR] [--shape llama-3.2-1b|tiny]
    python3 bench_baselines.py --impl hf|unsloth --ckpt none|on|unsloth-offload \\
        --steps N --warmup K --json OUT.json [--model-dir DIR] [--loop plain|sft]
    python3 bench_baselines.py --summary A.json B.json ...

What is measured (the issue's benchmark):
- model: Llama-3.2-1B's shape (hidden 2048, 16 layers, 32/8 heads, head_dim 64,
  intermediate 8192, vocab 128256, tied embeddings, rope theta 500000 with llama3 scaling,
  config.json as the Hub's), random bf16 weights N(0, 0.02) (norms 1), seeded per tensor,
  written once to DIR with a WordLevel tokenizer.json that Unsloth's loader accepts
  (Llama 3's special tokens at 128000.., pad = <|finetune_right_pad_id|>);
- 4-bit NF4 base, double quant, bf16 compute; LoRA r=16, alpha 16, dropout 0 on
  q,k,v,o,gate,up,down; batch 4 x 2048 random tokens (seeded, one batch per step, the
  same for every impl), labels = input_ids (the model shifts them: token t+1 is predicted
  from tokens <= t), SDPA attention, torch AdamW (fused, lr 2e-4, no weight decay, no
  clipping);
- per step: forward + backward + optimizer step, synchronised, wall clock. Reported:
  median / mean / min step time over the steps after `--warmup` (Unsloth compiles each
  decoder layer with torch.compile on its first step), tokens/s = tokens per step / median,
  the loss of every step (warm-up included), peak memory (torch.cuda.max_memory_allocated
  and max_memory_reserved) over the training steps and over model loading, and the model
  FLOPs utilisation against a bf16 GEMM (8192^3 torch.mm) timed in the same process.

How each tool is used (the way its users do, in a plain training loop):
- hf: AutoModelForCausalLM.from_pretrained(quantization_config=BitsAndBytesConfig(nf4,
  double quant, bf16 compute), dtype=bf16, attn_implementation="sdpa"), then what TRL
  1.15's SFTTrainer does to a 4-bit model: gradient_checkpointing_enable(use_reentrant=
  False) when asked + enable_input_require_grads, peft get_peft_model, LoRA weights cast to
  bf16. `--hf-recipe kbit` instead runs peft's prepare_model_for_kbit_training (the older
  recipe: norms, embedding and the tied head upcast to f32; LoRA stays f32).
- unsloth: `import unsloth` first, FastLanguageModel.from_pretrained(load_in_4bit=True,
  dtype=bf16, max_seq_length=2048), FastLanguageModel.get_peft_model(...,
  use_gradient_checkpointing=False | True | "unsloth"), FastLanguageModel.for_training.

Why a plain loop and not TRL's SFTTrainer: both impls then run exactly the same data,
optimizer and timing code, the step time is the training step alone (no dataloader,
collator, logging or callbacks), and the loss of every step is read directly. Unsloth's
speed comes from the model it returns (patched attention/MLP/LoRA kernels, fused loss,
per-layer torch.compile, offloaded checkpointing), which a plain loop runs as SFTTrainer
would; what the loop leaves out is the trainer's own bookkeeping (Unsloth's patched inner
loop: gradient accumulation normalisation, which one micro-batch per step does not need,
and gc.freeze around train()) and its defaults (clipping at 1.0, logging every step,
Unsloth's auto padding-free batches). `--loop sft` runs the same rows through TRL's
SFTTrainer (Unsloth's patched one under `--impl unsloth`) to measure that difference: the
step time is then the interval between step ends (data, compute, logging), with the compute
part alone in `step_ms_compute_all`, and the losses are the trainer's logged ones (it
shuffles the rows, so they are not step-by-step comparable with the plain loop's).

CPU smoke test of the logic (tiny shape; Unsloth only through its CPU backend):
    BENCH_BASELINES_ALLOW_CPU=1 python3 bench_baselines.py --impl unsloth --shape tiny \\
        --model-dir /tmp/tiny --batch 2 --seq 64 --steps 2 --warmup 1 --json /tmp/u.json

The JSON (one file per mode) also holds the versions, the card, the phase times (import,
load, peft, first step), dynamo's counters, the dtype of the LoRA weights and where the
input embedding lives. On any failure the JSON is still written, with status "error: ..."
and the traceback, and the exit status is 1.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_SPECIAL = 256  # Llama 3: 128000 regular tokens, then 256 special ones
DATA_SEED = 1234
WEIGHT_SEED = 20261125
LORA_SEED = 3407  # Unsloth's default random_state; used for HF's LoRA init too
LR = 2e-4
GEMM_N = 8192

SHAPES = {
    # Llama-3.2-1B's config.json as published (transformers 4 layout: rope_scaling + rope_theta).
    "llama-3.2-1b": {
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "vocab_size": 128256, "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    },
}
# For CPU smoke tests of this script's logic only: the same with small sizes.
SHAPES["tiny"] = {
    **SHAPES["llama-3.2-1b"],
    "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 4096,
}


def log(msg: str) -> None:
    print(f"[bench_baselines {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- model folder

def config_json(shape: str) -> dict:
    s = SHAPES[shape]
    regular = s["vocab_size"] - N_SPECIAL
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": regular,
        "eos_token_id": regular + 1,
        "head_dim": s["head_dim"],
        "hidden_act": "silu",
        "hidden_size": s["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": s["intermediate_size"],
        "max_position_embeddings": s["max_position_embeddings"],
        "mlp_bias": False,
        "num_attention_heads": s["num_attention_heads"],
        "num_hidden_layers": s["num_hidden_layers"],
        "num_key_value_heads": s["num_key_value_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": s["rope_scaling"],
        "rope_theta": s["rope_theta"],
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": s["vocab_size"],
    }


def weight_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama parameter names and shapes (tied head: no lm_head.weight in the file)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    out = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    out.append(("model.norm.weight", (h,)))
    return out


def special_tokens(regular: int) -> dict[int, str]:
    names = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>",
             6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>",
             10: "<|python_tag|>"}
    out, reserved = {}, 0
    for k in range(N_SPECIAL):
        if k in names:
            out[regular + k] = names[k]
        else:
            out[regular + k] = f"<|reserved_special_token_{reserved}|>"
            reserved += 1
    return out


def write_tokenizer(model_dir: str, vocab_size: int) -> None:
    """A WordLevel tokenizer over "<unk>", "t1" .. "t{regular-1}" plus Llama 3's specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, AddedToken

    regular = vocab_size - N_SPECIAL
    vocab = {"<unk>": 0}
    vocab.update({f"t{i}": i for i in range(1, regular)})
    specials = special_tokens(regular)
    vocab.update({name: i for i, name in specials.items()})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(specials[i], special=True, normalized=False)
                            for i in sorted(specials)])
    bos = specials[regular]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, regular)])
    tok.save(os.path.join(model_dir, "tokenizer.json"))
    special_map = {"bos_token": bos, "eos_token": specials[regular + 1],
                   "pad_token": specials[regular + 4]}
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 131072,
                   "clean_up_tokenization_spaces": True,
                   "model_input_names": ["input_ids", "attention_mask"], **special_map}, f, indent=1)
    with open(os.path.join(model_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special_map, f, indent=1)


def build_model_dir(model_dir: str, shape: str) -> dict:
    """config.json + model.safetensors (seeded random bf16) + tokenizer. Idempotent: a
    folder with the marker file is reused; a half-written one is rebuilt."""
    marker = os.path.join(model_dir, ".complete")
    if os.path.exists(marker):
        with open(marker) as f:
            info = json.load(f)
        if info.get("shape") == shape:
            log(f"model folder {model_dir}: reused ({info})")
            return info
        raise SystemExit(f"{model_dir} holds shape {info.get('shape')!r}, not {shape!r}: pick another --model-dir")
    import torch
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    os.makedirs(model_dir, exist_ok=True)
    cfg = config_json(shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tensors = {}
    for n, (name, shp) in enumerate(weight_shapes(cfg)):
        if len(shp) == 1:
            tensors[name] = torch.ones(shp, dtype=torch.bfloat16)
            continue
        g = torch.Generator(device=device).manual_seed(WEIGHT_SEED + n)
        w = torch.empty(shp, dtype=torch.float32, device=device).normal_(0.0, 0.02, generator=g)
        tensors[name] = w.to(torch.bfloat16).cpu()
    n_params = sum(t.numel() for t in tensors.values())
    save_file(tensors, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
    del tensors
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(model_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, f, indent=2)
    write_tokenizer(model_dir, cfg["vocab_size"])
    info = {"shape": shape, "params": n_params, "weight_seed": WEIGHT_SEED, "generated_on": device,
            "build_s": round(time.perf_counter() - t0, 2)}
    with open(marker, "w") as f:
        json.dump(info, f)
    log(f"model folder {model_dir}: {n_params / 1e9:.3f} B parameters, {info['build_s']} s")
    return info


# ----------------------------------------------------------------------------- accounting

def flops_per_token(cfg: dict, seq: int, lora_r: int) -> dict:
    """Model FLOPs of one training token (forward + backward), two conventions.

    `lora`: what this training step must compute. Frozen matmuls (the NF4 projections and
    the tied head) cost 2 (forward) + 2 (input gradient) FLOPs per weight, no weight
    gradient; LoRA matrices 6 per weight; causal attention (QK^T and PV, half the square)
    2*T*d forward, 3x that with the backward. Recomputation under checkpointing is not
    counted (model FLOPs, not hardware FLOPs).
    `6n`: the common 6*N + 12*L*d*T (PaLM's appendix B; full attention square), over the
    matmul weights, frozen or not: comparable with numbers others publish, not a
    statement of the work a LoRA step does.
    """
    h, i, v, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    d_q = cfg["num_attention_heads"] * cfg["head_dim"]
    d_kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    proj = {"q_proj": (h, d_q), "k_proj": (h, d_kv), "v_proj": (h, d_kv), "o_proj": (d_q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    frozen_layer = sum(a * b for a, b in proj.values())
    lora_layer = sum(lora_r * (a + b) for a, b in proj.values())
    head = h * v
    attn_fwd = 2 * seq * d_q  # causal: half of 4*T*d
    lora_flops = L * (4 * frozen_layer + 6 * lora_layer + 3 * attn_fwd) + 4 * head
    six_n = 6 * (L * (frozen_layer + lora_layer) + head) + 12 * L * d_q * seq
    return {"lora": float(lora_flops), "6n": float(six_n),
            "frozen_matmul_params": L * frozen_layer + head, "lora_params": L * lora_layer}


def gemm_rate() -> dict:
    """bf16 torch.mm throughput (8192^3, random inputs), CUDA events, median of 20."""
    import torch

    n = GEMM_N
    g = torch.Generator(device="cuda").manual_seed(7)
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        torch.mm(a, b, out=c)
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        torch.mm(a, b, out=c)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    med = statistics.median(times)
    del a, b, c
    torch.cuda.empty_cache()
    return {"shape": [n, n, n], "median_ms": med * 1e3, "tflops": 2 * n ** 3 / med / 1e12}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "triton", "unsloth",
                 "unsloth_zoo", "trl", "torchao", "datasets", "cut_cross_entropy", "xformers", "flash_attn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    out["python"] = sys.version.split()[0]
    return out


# ----------------------------------------------------------------------------- the two tools

def load_hf(args, dtype):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, quantization_config=q, dtype=dtype,
                                                 device_map={"": args.device}, attn_implementation="sdpa")
    model.config.use_cache = False
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ckpt = args.ckpt == "on"
    gc_kwargs = {"use_reentrant": False}
    if args.hf_recipe == "kbit":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    elif ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    torch.manual_seed(LORA_SEED)
    lcfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_r, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    if args.hf_recipe == "trl":
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(dtype)
    model.train()
    tokenizer = None
    if args.loop == "sft":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    return model, tokenizer, {"load_s": load_s, "peft_s": time.perf_counter() - t0}


def load_unsloth(args, dtype):
    from unsloth import FastLanguageModel

    gc = {"none": False, "on": True, "unsloth-offload": "unsloth"}[args.ckpt]
    t0 = time.perf_counter()
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=args.model_dir, max_seq_length=args.seq, dtype=dtype, load_in_4bit=True,
        use_gradient_checkpointing=gc)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = FastLanguageModel.get_peft_model(
        model, r=args.lora_r, lora_alpha=args.lora_r, lora_dropout=0.0, target_modules=LORA_TARGETS,
        bias="none", use_gradient_checkpointing=gc, random_state=LORA_SEED)
    model = FastLanguageModel.for_training(model)
    return model, tokenizer, {"load_s": load_s, "peft_s": time.perf_counter() - t0, "use_gradient_checkpointing": gc}


# ----------------------------------------------------------------------------- one run

def run(args, result: dict) -> None:
    t_import = time.perf_counter()
    if args.impl == "unsloth":
        import unsloth  # noqa: F401  first, before transformers/peft/trl: it patches them
    import torch

    result["phases_s"] = {"import": time.perf_counter() - t_import}
    cuda = torch.cuda.is_available()
    args.device = "cuda" if cuda else "cpu"
    if args.impl == "unsloth" and not cuda and os.environ.get("BENCH_BASELINES_ALLOW_CPU") != "1":
        raise RuntimeError("Unsloth needs a GPU (BENCH_BASELINES_ALLOW_CPU=1: its CPU backend, smoke tests only)")
    result["card"] = torch.cuda.get_device_name(0) if cuda else "cpu"
    result["versions"] = versions()
    result["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    if cuda:
        result["gemm_bf16"] = gemm_rate()
        log(f"{result['card']}: bf16 GEMM {result['gemm_bf16']['tflops']:.0f} TFLOP/s")

    with open(os.path.join(args.model_dir, "config.json")) as f:
        cfg = json.load(f)
    dtype = torch.bfloat16
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model, tokenizer, phases = (load_hf if args.impl == "hf" else load_unsloth)(args, dtype)
    result["phases_s"].update({k: v for k, v in phases.items() if k.endswith("_s")})
    if "use_gradient_checkpointing" in phases:
        result["unsloth_use_gradient_checkpointing"] = phases["use_gradient_checkpointing"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    result["trainable_params"] = sum(p.numel() for p in trainable)
    result["trainable_dtypes"] = sorted({str(p.dtype) for p in trainable})
    emb = model.get_input_embeddings()
    result["input_embedding"] = {"device": str(emb.weight.device), "dtype": str(emb.weight.dtype)}
    if cuda:
        result["load_peak_allocated_GB"] = torch.cuda.max_memory_allocated() / 1e9
        result["load_peak_reserved_GB"] = torch.cuda.max_memory_reserved() / 1e9
        result["after_load_allocated_GB"] = torch.cuda.memory_allocated() / 1e9
    log(f"loaded: {result['trainable_params']} trainable ({result['trainable_dtypes']}), "
        f"load {phases['load_s']:.1f} s, peft {phases['peft_s']:.1f} s")

    total = args.warmup + args.steps
    g = torch.Generator().manual_seed(DATA_SEED)
    regular = cfg["vocab_size"] - N_SPECIAL
    data = torch.randint(0, regular, (total, args.batch, args.seq), generator=g).to(args.device)
    if args.dump:
        # What another implementation needs to reproduce this run's loss curve: the batches
        # and the adapters as initialised (PEFT's format), before any step.
        os.makedirs(args.dump, exist_ok=True)
        with open(os.path.join(args.dump, "batches.json"), "w") as f:
            json.dump(data.tolist(), f)
        model.save_pretrained(args.dump)
        result["dump"] = {"dir": args.dump, "optimizer": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8,
                                                          "weight_decay": 0.0, "grad_clip": None}}
        log(f"dumped the batches and the initial adapter to {args.dump}")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if args.loop == "plain":
        step_s = train_plain(args, model, data, cuda, result)
    else:
        step_s = train_sft(args, model, tokenizer, data, cuda, result)
    result["phases_s"]["first_step"] = step_s[0]
    measured = step_s[args.warmup:]
    med = statistics.median(measured)
    tokens = args.batch * args.seq
    result.update({
        "step_ms": med * 1e3,
        "step_ms_mean": statistics.fmean(measured) * 1e3,
        "step_ms_min": min(measured) * 1e3,
        "step_ms_max": max(measured) * 1e3,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / med,
    })
    fl = flops_per_token(cfg, args.seq, args.lora_r)
    result["flops_per_token"] = fl
    result["model_tflops"] = fl["lora"] * tokens / med / 1e12
    if cuda:
        result["peak_allocated_GB"] = torch.cuda.max_memory_allocated() / 1e9
        result["peak_reserved_GB"] = torch.cuda.max_memory_reserved() / 1e9
        rate = result["gemm_bf16"]["tflops"]
        result["mfu"] = result["model_tflops"] / rate
        result["mfu_6n"] = fl["6n"] * tokens / med / 1e12 / rate
    try:
        from torch._dynamo.utils import counters

        result["dynamo"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "graph_break", "frames")}
    except Exception as e:  # noqa: BLE001 - diagnostics only
        result["dynamo"] = {"error": repr(e)}
    result["cut_cross_entropy_imported"] = "cut_cross_entropy" in sys.modules
    # Unsloth sets the allocator's configuration and Inductor's threads on import.
    result["env"] = {k: os.environ.get(k) for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF",
                                                    "TORCHINDUCTOR_COMPILE_THREADS", "UNSLOTH_ENABLE_CCE",
                                                    "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")}
    result["status"] = "ok"


def train_plain(args, model, data, cuda: bool, result: dict) -> list[float]:
    """forward, backward, AdamW step, zero_grad; synchronised; returns each step's seconds."""
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt_kwargs = {"lr": LR, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    opt = torch.optim.AdamW(trainable, fused=cuda, **opt_kwargs)
    result["optimizer"] = {"name": "torch.optim.AdamW", "fused": cuda, **opt_kwargs, "grad_clip": None}
    losses, step_s = [], []
    model.train()
    for step in range(data.shape[0]):
        ids = data[step]
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = float(loss.detach())  # syncs the host with the loss, not with the optimizer
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(value)
        step_s.append(dt)
        result["losses"], result["step_ms_all"] = losses, [s * 1e3 for s in step_s]
        if step < args.warmup + 2 or step == data.shape[0] - 1:
            log(f"step {step:3d} loss {value:.5f} {dt * 1e3:8.1f} ms{' (warm-up)' if step < args.warmup else ''}")
        if not math.isfinite(value):
            raise FloatingPointError(f"loss {value} at step {step}")
    return step_s


def train_sft(args, model, tokenizer, data, cuda: bool, result: dict) -> list[float]:
    """The same batches through TRL's SFTTrainer (pre-tokenized rows; the trainer shuffles
    them, pads nothing, builds the labels): the loop most users run. Returns the seconds
    between consecutive step ends (what a user's clock sees: data, forward, backward,
    clipping, optimizer, scheduler, logging); the compute part alone (step begin to end,
    synchronised) goes to `step_ms_compute_all`."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    total = data.shape[0]
    ds = Dataset.from_dict({"input_ids": data.reshape(-1, args.seq).cpu().tolist()})
    begins, ends, losses = [], [], []

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class StepClock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            sync()
            ends.append(time.perf_counter())  # the first interval starts here

        def on_step_begin(self, a, state, control, **kw):
            sync()
            begins.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            sync()
            ends.append(time.perf_counter())
            n = len(ends) - 1
            if n <= args.warmup + 2 or n == total:
                log(f"step {n - 1:3d} {(ends[-1] - ends[-2]) * 1e3:8.1f} ms"
                    f"{' (warm-up)' if n <= args.warmup else ''}")

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    hf_ckpt = args.impl == "hf" and args.ckpt == "on"
    cfg = SFTConfig(
        output_dir="/tmp/fsdp-baselines/sft-out", per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, max_steps=total, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, optim="adamw_torch_fused" if cuda else "adamw_torch", bf16=cuda,
        logging_steps=1, report_to="none", save_strategy="no", max_length=args.seq, packing=False,
        gradient_checkpointing=hf_ckpt, gradient_checkpointing_kwargs={"use_reentrant": False} if hf_ckpt else None,
        seed=DATA_SEED, dataloader_num_workers=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tokenizer,
                         callbacks=[StepClock()])
    trainer.train()
    a = trainer.args
    result["optimizer"] = {"name": str(a.optim), "lr": a.learning_rate, "weight_decay": a.weight_decay,
                           "grad_clip": a.max_grad_norm, "scheduler": str(a.lr_scheduler_type)}
    result["trainer"] = {"class": [c.__name__ for c in type(trainer).__mro__[:4]],
                         "gradient_checkpointing": a.gradient_checkpointing, "bf16": a.bf16,
                         "batch": a.per_device_train_batch_size, "steps": len(ends) - 1}
    intervals = [ends[i] - ends[i - 1] for i in range(1, len(ends))]
    result["losses"] = losses
    result["step_ms_all"] = [s * 1e3 for s in intervals]
    result["step_ms_compute_all"] = [(e - b) * 1e3 for b, e in zip(begins, ends[1:])]
    if len(intervals) != total:
        raise RuntimeError(f"the trainer ran {len(intervals)} steps, not {total}")
    return intervals


def summary(paths: list[str]) -> int:
    """One table row per JSON file, as run.sh prints at the end."""
    print(f"{'impl':8} {'ckpt':16} {'status':8} {'tok/s':>8} {'step ms':>8} {'peak GB':>8} {'resv GB':>8} "
          f"{'MFU':>6} {'first loss':>10} {'last loss':>10}  card")
    bad = 0
    for p in paths:
        try:
            with open(p) as f:
                r = json.load(f)
        except (OSError, ValueError) as e:
            print(f"{p}: unreadable ({e})")
            bad += 1
            continue
        ok = r.get("status") == "ok"
        bad += not ok

        def num(k, fmt):
            v = r.get(k)
            width = int(fmt.split(".")[0])
            return format(v, fmt) if isinstance(v, (int, float)) else "-".rjust(width)
        losses = r.get("losses") or [None]
        first = format(losses[0], ".5f") if losses[0] is not None else "-"
        last = format(losses[-1], ".5f") if losses[-1] is not None else "-"
        print(f"{r.get('impl', '?'):8} {r.get('ckpt', '?'):16} {'ok' if ok else 'FAILED':8} {num('tokens_per_s', '8.0f')} "
              f"{num('step_ms', '8.1f')} {num('peak_allocated_GB', '8.2f')} {num('peak_reserved_GB', '8.2f')} "
              f"{num('mfu', '6.3f')} {first:>10} {last:>10}  {r.get('card', '?')}")
        if not ok:
            print(f"    {str(r.get('status'))[:300]}")
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", choices=("hf", "unsloth"))
    p.add_argument("--ckpt", choices=("none", "on", "unsloth-offload"), default="none",
                   help="activation checkpointing: none, on (HF: non-reentrant; Unsloth: True), "
                        "unsloth-offload (Unsloth's use_gradient_checkpointing='unsloth')")
    p.add_argument("--steps", type=int, default=20, help="measured steps, after the warm-up")
    p.add_argument("--warmup", type=int, default=5, help="steps not measured (compilation, allocator)")
    p.add_argument("--json", help="where to write the result")
    p.add_argument("--model-dir", default="/tmp/fsdp-baselines/llama-3.2-1b-random")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--hf-recipe", choices=("trl", "kbit"), default="trl",
                   help="trl: what TRL 1.15's SFTTrainer does to a 4-bit model (bf16 LoRA); "
                        "kbit: peft's prepare_model_for_kbit_training (f32 norms, embedding, head, LoRA)")
    p.add_argument("--loop", choices=("plain", "sft"), default="plain",
                   help="plain: this script's loop (the measurement); sft: TRL's SFTTrainer (cross-check)")
    p.add_argument("--build-only", action="store_true", help="write the model folder and exit")
    p.add_argument("--dump", help="write the batches (batches.json) and the initial adapter (PEFT format) here")
    p.add_argument("--summary", nargs="+", metavar="JSON", help="print a table of result files and exit")
    args = p.parse_args(argv)

    if args.summary:
        return summary(args.summary)
    if args.build_only:
        build_model_dir(args.model_dir, args.shape)
        return 0
    if not args.impl or not args.json:
        p.error("--impl and --json are needed (or --build-only / --summary)")
    if args.impl == "hf" and args.ckpt == "unsloth-offload":
        p.error("--ckpt unsloth-offload is Unsloth's; HF has none or on")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")

    # Nothing may reach a hub: the model is local and the machine is offline.
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "UNSLOTH_DISABLE_STATISTICS"):
        os.environ.setdefault(k, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not os.path.exists(os.path.join(args.model_dir, ".complete")):
        # In a child process: building imports torch only, but this process must import
        # Unsloth before anything it patches.
        subprocess.run([sys.executable, os.path.abspath(__file__), "--build-only", "--model-dir", args.model_dir,
                        "--shape", args.shape], check=True)

    result = {
        "impl": args.impl, "ckpt": args.ckpt, "status": "running",
        "stack": "unsloth" if args.impl == "unsloth" else "transformers+peft+bitsandbytes",
        "hf_recipe": args.hf_recipe if args.impl == "hf" else None,
        "shape": args.shape, "batch": args.batch, "seq": args.seq, "attn": "sdpa", "dtype": "bfloat16",
        "quant": {"type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
        "lora": {"r": args.lora_r, "alpha": args.lora_r, "dropout": 0.0, "targets": LORA_TARGETS},
        "data": {"seed": DATA_SEED, "labels": "input_ids (shifted inside the model)"},
        "warmup": args.warmup, "steps": args.steps, "model_dir": args.model_dir,
        "loop": args.loop,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    def on_term(signum, frame):  # `timeout` sends SIGTERM: write what we have
        raise TimeoutError(f"signal {signum} (timeout?)")

    signal.signal(signal.SIGTERM, on_term)
    code = 0
    t0 = time.perf_counter()
    try:
        run(args, result)
    except BaseException as e:  # noqa: BLE001 - record, then fail
        traceback.print_exc()
        result["status"] = f"error: {type(e).__name__}: {str(e)[:800]}"
        result["traceback"] = traceback.format_exc()[-6000:]
        code = 1
    result["wall_s"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    if result["status"] == "ok":
        log(f"RESULT {args.impl} ckpt={args.ckpt}: {result['tokens_per_s']:.0f} tokens/s, "
            f"{result['step_ms']:.1f} ms/step, peak {result.get('peak_allocated_GB', float('nan')):.2f} GB "
            f"(reserved {result.get('peak_reserved_GB', float('nan')):.2f}), MFU {result.get('mfu', float('nan')):.3f}")
    else:
        log(f"FAILED {args.impl} ckpt={args.ckpt}: {result['status'][:300]}")
    return code


if __name__ == "__main__":
    sys.exit(main())
