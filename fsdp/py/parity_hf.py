#!/usr/bin/env python3
"""Parity of fsdp's CPU f32 reference, and of its GPU runtime, with transformers + peft +
bitsandbytes (GPU).

Usage (GPU machine, repository root):
    PYTHONPATH=bundle/py python3 fsdp/py/parity_hf.py target/fsdp-parity OUT.json
    PYTHONPATH=DIR_WITH_BITSANDBYTES python3 fsdp/py/parity_hf.py /tmp/fsdp-parity-gpu OUT.json

DIR comes from `cargo run --release -p fsdp --example parity_dump -- DIR`, or from
`parity_dump --gpu DIR` on the GPU machine (see that file and fsdp/PARITY.md). For every
variant in DIR/index.json and every HF configuration below, this script:

1. loads DIR/<variant>/model with AutoModelForCausalLM + BitsAndBytesConfig (nf4, double
   quant) and compares the NF4 bytes bitsandbytes produced with ours (nf4.safetensors);
2. loads our adapter with PeftModel.from_pretrained(is_trainable=True);
3. on the same batch (labels = input_ids): loss, logits and every LoRA gradient vs ours;
4. 20 steps of torch.optim.AdamW (same lr, betas, eps, weight decay, clipping) vs our
   per-step losses and gradient norms; the trained adapters vs ours;
5. our trained adapter (adapter_final) loaded into a fresh PeftModel: logits vs ours.

When the variant has the GPU runtime's results (meta.json's "gpu", from `--gpu`), for the
configurations in GPU_CONFIGS it also compares them with HF's: step-0 loss and LoRA
gradients, the 20 per-step losses and gradient norms, the trained adapters, and the
GPU-trained adapter (adapter_final_gpu) loaded into a fresh PeftModel: its logits vs
logits_final_gpu (that adapter's logits computed by our CPU f32 model: the GPU runtime
has no logits output). Results go under each row's "gpu" key.

Parity numbers are results, not failures: the exit status is 1 only when something
crashed. The spec's tolerances (first-step loss 1e-3 relative, per-step losses 1e-2
relative over 20 steps, logits of our adapter in peft within bf16 tolerance) are
evaluated and reported as PASS / MISS.
"""
import json
import math
import os
import sys
import time
import traceback

import torch

# HF configurations. "fp32" is the fair comparison with an f32 reference; the bf16 ones
# measure how far the usual QLoRA stack is from it.
CONFIGS = [
    {"name": "fp32", "dtype": "float32", "compute": "float32", "kbit_prep": False, "attn": "sdpa",
     "what": "dtype=float32, bnb compute float32, SDPA"},
    {"name": "fp32-eager", "dtype": "float32", "compute": "float32", "kbit_prep": False, "attn": "eager",
     "what": "as fp32, eager attention"},
    {"name": "bf16-qlora", "dtype": "bfloat16", "compute": "bfloat16", "kbit_prep": True, "attn": "sdpa",
     "what": "dtype=bfloat16 + prepare_model_for_kbit_training (norms, embedding, head in f32), bnb compute bf16, SDPA"},
    {"name": "bf16", "dtype": "bfloat16", "compute": "bfloat16", "kbit_prep": False, "attn": "sdpa",
     "what": "dtype=bfloat16 throughout, bnb compute bf16, SDPA"},
]

# The HF configurations the GPU runtime (bf16) is compared with.
GPU_CONFIGS = ("fp32", "bf16-qlora", "bf16")

# The spec's tolerances.
TOL_LOSS0 = 1e-3
TOL_STEPS = 1e-2
# "within bf16 tolerance": torch.testing's rtol for bfloat16, applied to the relative
# L2 (Frobenius) error of the whole logits tensor.
TOL_LOGITS = 1.6e-2


def rel_l2(ours, theirs):
    """||theirs - ours|| / ||ours||, in f64."""
    a, b = ours.double().cpu(), theirs.double().cpu()
    n = a.norm().item()
    d = (a - b).norm().item()
    return d / n if n > 0 else d


def rel(a, b):
    return abs(b - a) / abs(a) if a != 0 else abs(b - a)


def peft_key(name):
    """PEFT parameter name -> the adapter file's key (no adapter name)."""
    return name.replace(".default.", ".")


def verdict(value, tol):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return "PASS" if value <= tol else "MISS"


def load_model(mdir, cfg):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    bnb_cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, cfg["compute"]),
    )
    model = AutoModelForCausalLM.from_pretrained(
        mdir,
        quantization_config=bnb_cfg,
        dtype=getattr(torch, cfg["dtype"]),
        device_map={"": 0},
        attn_implementation=cfg["attn"],
    )
    model.config.use_cache = False
    return model


def linear4bit_modules(model):
    import bitsandbytes as bnb
    return [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def check_nf4(model, ours):
    """Our NF4 bytes vs what bitsandbytes made of the same bf16 checkpoint."""
    rows = []
    for name, mod in linear4bit_modules(model):
        key = name + ".weight"
        qs = mod.weight.quant_state
        packed_hf = mod.weight.data.contiguous().view(torch.uint8).reshape(-1).cpu()
        packed_ours = ours[key].contiguous().view(torch.uint8).reshape(-1)
        row = {"weight": key, "packed_bytes": int(packed_ours.numel()), "quant_state_dtype": str(qs.dtype)}
        if packed_hf.numel() != packed_ours.numel():
            row["error"] = f"packed length {packed_hf.numel()} vs ours {packed_ours.numel()}"
            rows.append(row)
            continue
        row["packed_differing"] = int((packed_hf != packed_ours).sum())
        row["blocksize"] = int(qs.blocksize)
        if qs.nested:
            codes_hf = qs.absmax.contiguous().view(torch.uint8).reshape(-1).cpu()
            codes_ours = ours[key + ".absmax"].contiguous().view(torch.uint8).reshape(-1)
            row["absmax_codes_differing"] = int((codes_hf != codes_ours).sum())
            a2_hf = qs.state2.absmax.float().contiguous().cpu().view(torch.int32)
            a2_ours = ours[key + ".nested_absmax"].float().contiguous().view(torch.int32)
            row["nested_absmax_differing"] = int((a2_hf != a2_ours).sum())
            qs_json = json.loads(bytes(ours[key + ".quant_state.bitsandbytes__nf4"].numpy().tobytes()).decode())
            row["offset_hf"] = float(qs.offset)
            row["offset_ours"] = float(qs_json["nested_offset"])
            row["offset_equal"] = torch.tensor(float(qs.offset), dtype=torch.float32).item() == \
                torch.tensor(float(qs_json["nested_offset"]), dtype=torch.float32).item()
        else:
            row["nested"] = False
        rows.append(row)
    bad = [r for r in rows if r.get("error") or r.get("packed_differing") or r.get("absmax_codes_differing")
           or r.get("nested_absmax_differing") or not r.get("offset_equal", True)]
    return {
        "weights": len(rows),
        "weights_identical": len(rows) - len(bad),
        "packed_bytes_differing": sum(r.get("packed_differing", 0) for r in rows),
        "packed_bytes": sum(r["packed_bytes"] for r in rows),
        "quant_state_dtypes": sorted({r["quant_state_dtype"] for r in rows}),
        "differing": bad,
    }


def guarded(fn, *args):
    """A diagnostic that must not take the main comparison down with it."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001
        return {"error": traceback.format_exc()}


def depth_errors(pm, ids, ours):
    """Along the depth: the final norm of the residual stream after k layers, vs ours."""
    with torch.no_grad():
        hs = pm(input_ids=ids, output_hidden_states=True).hidden_states
        norm = pm.base_model.model.model.norm
        layers = len(hs) - 1  # embeddings, then each layer's output (the last one already normed)
        depth = []
        for k in range(layers + 1):
            h = hs[k] if k == layers else norm(hs[k])
            depth.append(rel_l2(ours["hidden"][f"normed_{k}"], h.float().reshape(-1, h.shape[-1])))
    return depth


def fresh_peft_logits(mdir, cfg, adapter_dir, ids):
    """An adapter of ours loaded into a fresh PeftModel (same HF configuration): loss and
    logits [seqs, seq_len, vocab] (f32, CPU)."""
    from peft import PeftModel, prepare_model_for_kbit_training
    model = load_model(mdir, cfg)
    if cfg["compute"] == "float32":
        for _, m in linear4bit_modules(model):
            m.weight.quant_state.dtype = torch.float32
    if cfg["kbit_prep"]:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    pm = PeftModel.from_pretrained(model, adapter_dir)
    pm.eval()
    with torch.no_grad():
        out = pm(input_ids=ids, labels=ids)
    loss, lf = out.loss.item(), out.logits.float().cpu()
    del pm, model, out
    torch.cuda.empty_cache()
    return loss, lf


def logits_errors(ours, theirs):
    """rel L2, max abs, argmax agreement of logits `theirs` vs `ours`."""
    return (rel_l2(ours, theirs), (theirs - ours).abs().max().item(),
            float((theirs.argmax(-1) == ours.argmax(-1)).float().mean()))


def grad_errors(ours, theirs):
    """Relative L2 of every LoRA gradient: worst (and which), median, worst of A and B."""
    g_rel = {k: rel_l2(ours[k], theirs[k]) for k in theirs}
    order = sorted(g_rel, key=g_rel.get)
    res = {"grad_rel_l2_worst": g_rel[order[-1]], "grad_rel_l2_worst_tensor": order[-1],
           "grad_rel_l2_median": g_rel[order[len(order) // 2]]}
    for which in ("lora_A", "lora_B"):
        res[f"grad_rel_l2_worst_{which}"] = max(v for k, v in g_rel.items() if f".{which}." in k)
    return res, g_rel


def worst_by_proj(g_rel):
    """The worst relative L2 per projection name (q_proj, ...) over the layers and A/B."""
    by_proj = {}
    for k, v in g_rel.items():
        proj = k.split(".")[-3]
        by_proj[proj] = max(by_proj.get(proj, 0.0), v)
    return by_proj


def gpu_step_comparison(gpu, ours, loss0, grads, losses, norms, trained):
    """The GPU runtime's step 0 and 20 steps vs HF's (this configuration)."""
    res = {"device": gpu["device"], "dtype": gpu["dtype"], "loss0_gpu": gpu["loss0"], "loss0_hf": loss0,
           "loss0_rel": rel(gpu["loss0"], loss0)}
    worst, g_rel = grad_errors(ours["grads_gpu"], grads)
    res.update(worst)
    res["grad_rel_l2_worst_by_proj"] = worst_by_proj(g_rel)
    res["losses_gpu"] = gpu["losses"]
    res["step_loss_rel"] = [rel(a, b) for a, b in zip(gpu["losses"], losses)]
    res["step_loss_rel_max"] = max(res["step_loss_rel"])
    res["grad_norm_rel_max"] = max(rel(a, b) for a, b in zip(gpu["grad_norms"], norms))
    on = gpu["checkpointing_on"]["losses"]
    res["checkpointing_on_step_loss_rel_max"] = max(rel(a, b) for a, b in zip(on, losses))
    t_rel = {k: rel_l2(ours["adapter_final_gpu"][k], trained[k]) for k in trained}
    worst_t = max(t_rel, key=t_rel.get)
    res["trained_adapter_rel_l2_worst"] = t_rel[worst_t]
    res["trained_adapter_rel_l2_worst_tensor"] = worst_t
    return res


def run_config(vdir, meta, cfg, ours):
    from peft import PeftModel, prepare_model_for_kbit_training

    res = {"config": cfg["name"], "what": cfg["what"]}
    t0 = time.time()
    mdir = os.path.join(vdir, meta["model_dir"])
    model = load_model(mdir, cfg)
    res["rope_parameters"] = json.loads(json.dumps(getattr(model.config, "rope_parameters", None), default=str))
    res["nf4"] = guarded(check_nf4, model, ours["nf4"])
    if cfg["compute"] == "float32":
        # bnb's backward dequantizes to quant_state.dtype; an f32 comparison needs f32.
        forced = 0
        for _, m in linear4bit_modules(model):
            if m.weight.quant_state.dtype != torch.float32:
                m.weight.quant_state.dtype = torch.float32
                forced += 1
        res["quant_state_dtype_forced_to_f32"] = forced
    if cfg["kbit_prep"]:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    res["unquantized_param_dtypes"] = sorted({f"{n.rsplit('.', 2)[-2]}:{p.dtype}" for n, p in model.named_parameters()
                                              if p.dtype.is_floating_point})
    adir = os.path.join(vdir, meta["adapter_dir"])
    pm = PeftModel.from_pretrained(model, adir, is_trainable=True)
    pm.train()

    # The adapter as loaded equals the file (dtype, values), and the scaling is alpha / r.
    params = {peft_key(n): p for n, p in pm.named_parameters() if p.requires_grad}
    res["trainable_tensors"] = len(params)
    res["trainable_dtypes"] = sorted({str(p.dtype) for p in params.values()})
    worst_load = 0.0
    for k, p in params.items():
        worst_load = max(worst_load, (p.detach().float().cpu() - ours["adapter"][k].float()).abs().max().item())
    res["adapter_load_max_abs_diff"] = worst_load
    scalings = set()
    for m in pm.modules():
        if hasattr(m, "scaling") and isinstance(getattr(m, "scaling"), dict) and "default" in m.scaling:
            scalings.add(float(m.scaling["default"]))
    res["lora_scalings"] = sorted(scalings)
    missing = sorted(set(ours["grads"]) - set(params))
    extra = sorted(set(params) - set(ours["grads"]))
    if missing or extra:
        raise RuntimeError(f"trainable tensors differ from ours: missing {missing[:3]}, extra {extra[:3]}")

    ids = torch.tensor(meta["input_ids"], dtype=torch.long, device="cuda")
    res["attn_implementation"] = getattr(pm.config, "_attn_implementation", None)

    res["normed_hidden_rel_l2_by_depth"] = guarded(depth_errors, pm, ids, ours)

    # Step 0: loss, logits, gradients.
    out = pm(input_ids=ids, labels=ids)
    loss0 = out.loss.item()
    logits0 = out.logits.detach().float()
    out.loss.backward()
    grads = {k: p.grad.detach().float().cpu() for k, p in params.items()}
    res["loss0_ours"] = meta["ours"]["loss0"]
    res["loss0_hf"] = loss0
    res["loss0_rel"] = rel(meta["ours"]["loss0"], loss0)
    res["logits0_rel_l2"] = rel_l2(ours["logits"]["logits"], logits0)
    res["logits0_max_abs"] = (logits0.cpu() - ours["logits"]["logits"]).abs().max().item()
    res["logits0_argmax_agree"] = float((logits0.cpu().argmax(-1) == ours["logits"]["logits"].argmax(-1)).float().mean())
    worst, g_rel = grad_errors(ours["grads"], grads)
    res.update(worst)
    res["grad_rel_l2_worst_by_proj"] = worst_by_proj(g_rel)
    res["grad_rel_l2"] = g_rel

    # 20 AdamW steps, mirrored: zero grads, forward, backward, clip, step.
    tr = meta["train"]
    plist = list(params.values())
    opt = torch.optim.AdamW(plist, lr=tr["lr"], betas=tuple(tr["betas"]), eps=tr["eps"],
                            weight_decay=tr["weight_decay"], foreach=False)
    losses, norms = [], []
    ts = time.time()
    for _ in range(tr["steps"]):
        opt.zero_grad(set_to_none=True)
        out = pm(input_ids=ids, labels=ids)
        out.loss.backward()
        if tr.get("max_grad_norm"):
            gn = torch.nn.utils.clip_grad_norm_(plist, tr["max_grad_norm"])
        else:
            gn = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in plist]))
        opt.step()
        losses.append(out.loss.item())
        norms.append(float(gn))
    torch.cuda.synchronize()
    res["hf_seconds_per_step"] = (time.time() - ts) / tr["steps"]
    with torch.no_grad():
        final_loss = pm(input_ids=ids, labels=ids).loss.item()
    ol, on = meta["ours"]["losses"], meta["ours"]["grad_norms"]
    res["losses_hf"] = losses
    res["losses_ours"] = ol
    res["step_loss_rel"] = [rel(a, b) for a, b in zip(ol, losses)]
    res["step_loss_rel_max"] = max(res["step_loss_rel"])
    res["grad_norms_hf"] = norms
    res["grad_norm_rel_max"] = max(rel(a, b) for a, b in zip(on, norms))
    res["final_loss_hf"] = final_loss
    res["final_loss_ours"] = meta["ours"]["final_loss"]
    res["final_loss_rel"] = rel(meta["ours"]["final_loss"], final_loss)
    trained = {k: p.detach().float().cpu() for k, p in params.items()}
    t_rel = {k: rel_l2(ours["adapter_final"][k], trained[k]) for k in trained}
    worst = max(t_rel, key=t_rel.get)
    res["trained_adapter_rel_l2_worst"] = t_rel[worst]
    res["trained_adapter_rel_l2_worst_tensor"] = worst
    # How far training moved the adapters, for scale.
    moved = {k: rel_l2(ours["adapter"][k], ours["adapter_final"][k]) for k in trained}
    res["adapter_moved_rel_l2_median"] = sorted(moved.values())[len(moved) // 2]
    gpu = meta.get("gpu") if cfg["name"] in GPU_CONFIGS else None
    if gpu is not None:
        res["gpu"] = gpu_step_comparison(gpu, ours, loss0, grads, losses, norms, trained)
    del pm, model, opt, params, plist, out
    torch.cuda.empty_cache()

    # Our trained adapter loaded into a fresh peft model: its logits vs ours.
    loss_f, lf = fresh_peft_logits(mdir, cfg, os.path.join(vdir, meta["adapter_final_dir"]), ids)
    res["final_adapter_loss_hf"] = loss_f
    res["final_adapter_loss_rel"] = rel(meta["ours"]["final_loss"], loss_f)
    (res["final_adapter_logits_rel_l2"], res["final_adapter_logits_max_abs"],
     res["final_adapter_argmax_agree"]) = logits_errors(ours["logits"]["logits_final"], lf)

    if gpu is not None:
        # The GPU-trained adapter, saved by fsdp::peft::save, in a fresh peft model: its
        # logits vs the same adapter's logits by our CPU f32 model.
        g = res["gpu"]
        loss_g, lg = fresh_peft_logits(mdir, cfg, os.path.join(vdir, gpu["adapter_final_dir"]), ids)
        ref = ours["logits"][gpu["logits_final_key"]]
        g["final_adapter_loss_hf"] = loss_g
        g["final_adapter_loss_gpu"] = gpu["final_loss"]
        g["final_adapter_loss_cpu_f32"] = gpu["final_loss_cpu_f32"]
        g["final_adapter_loss_rel_vs_gpu"] = rel(gpu["final_loss"], loss_g)
        (g["final_adapter_logits_rel_l2"], g["final_adapter_logits_max_abs"],
         g["final_adapter_argmax_agree"]) = logits_errors(ref, lg)
        g["spec"] = {
            "first_step_loss_rel<=1e-3": verdict(g["loss0_rel"], TOL_LOSS0),
            "step_losses_rel<=1e-2": verdict(g["step_loss_rel_max"], TOL_STEPS),
            "peft_logits_gpu_trained_rel_l2<=1.6e-2": verdict(g["final_adapter_logits_rel_l2"], TOL_LOGITS),
        }

    res["spec"] = {
        "first_step_loss_rel<=1e-3": verdict(res["loss0_rel"], TOL_LOSS0),
        "step_losses_rel<=1e-2": verdict(res["step_loss_rel_max"], TOL_STEPS),
        "peft_logits_initial_rel_l2<=1.6e-2": verdict(res["logits0_rel_l2"], TOL_LOGITS),
        "peft_logits_trained_rel_l2<=1.6e-2": verdict(res["final_adapter_logits_rel_l2"], TOL_LOGITS),
    }
    res["seconds"] = time.time() - t0
    return res


def load_ours(vdir, meta):
    from safetensors.torch import load_file
    out = {
        "nf4": load_file(os.path.join(vdir, "nf4.safetensors")),
        "grads": load_file(os.path.join(vdir, "grads.safetensors")),
        "logits": load_file(os.path.join(vdir, "logits.safetensors")),
        "hidden": load_file(os.path.join(vdir, "hidden.safetensors")),
        "adapter": load_file(os.path.join(vdir, "adapter", "adapter_model.safetensors")),
        "adapter_final": load_file(os.path.join(vdir, "adapter_final", "adapter_model.safetensors")),
    }
    gpu = meta.get("gpu")
    if gpu is not None:
        out["grads_gpu"] = load_file(os.path.join(vdir, gpu["grads_file"]))
        out["adapter_final_gpu"] = load_file(os.path.join(vdir, gpu["adapter_final_dir"], "adapter_model.safetensors"))
    return out


def reshape_logits(ours, meta):
    rows, cols = len(meta["input_ids"]), len(meta["input_ids"][0])
    for k in ours["logits"]:  # logits, logits_final (and logits_final_gpu)
        ours["logits"][k] = ours["logits"][k].reshape(rows, cols, -1)


def environment():
    import bitsandbytes
    import peft
    import transformers
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "python": sys.version.split()[0],
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    try:
        env["cuda_matmul_fp32_precision"] = str(torch.backends.cuda.matmul.fp32_precision)
    except Exception:  # noqa: BLE001 -- older torch
        pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = list(torch.cuda.get_device_capability(0))
    return env


def fmt(x, spec=".2e"):
    return "-" if x is None else format(x, spec)


def depth_cell(d):
    return "error" if isinstance(d, dict) else " ".join(fmt(x, ".0e") for x in d)


def nf4_cell(n):
    return "error" if "error" in n else f"{n['packed_bytes_differing']}/{n['packed_bytes']}"


def table(results):
    head = ("variant", "config", "loss0 rel", "steps max rel", "grad worst", "grad median", "logits0 relL2",
            "trained logits relL2", "hidden relL2 by depth", "nf4 bytes diff", "spec")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['variant']} | {r['config']} | CRASH: {r['error'].splitlines()[-1]}")
            continue
        spec = " ".join(v for v in r["spec"].values())
        lines.append(" | ".join([
            r["variant"], r["config"], fmt(r["loss0_rel"]), fmt(r["step_loss_rel_max"]), fmt(r["grad_rel_l2_worst"]),
            fmt(r["grad_rel_l2_median"]), fmt(r["logits0_rel_l2"]), fmt(r["final_adapter_logits_rel_l2"]),
            depth_cell(r["normed_hidden_rel_l2_by_depth"]), nf4_cell(r["nf4"]), spec]))
    return "\n".join(lines)


def gpu_table(results):
    head = ("variant", "HF config", "loss0 rel", "steps max rel", "steps max rel (ckpt on)", "grad norm max rel",
            "grad worst", "grad median", "trained adapter worst", "GPU adapter in peft: logits relL2", "max abs",
            "argmax", "spec")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in results:
        g = r.get("gpu")
        if g is None or "error" in r:
            continue
        if "spec" not in g:
            lines.append(f"{r['variant']} | {r['config']} | incomplete")
            continue
        lines.append(" | ".join([
            r["variant"], r["config"], fmt(g["loss0_rel"]), fmt(g["step_loss_rel_max"]),
            fmt(g["checkpointing_on_step_loss_rel_max"]), fmt(g["grad_norm_rel_max"]), fmt(g["grad_rel_l2_worst"]),
            fmt(g["grad_rel_l2_median"]), fmt(g["trained_adapter_rel_l2_worst"]), fmt(g["final_adapter_logits_rel_l2"]),
            fmt(g["final_adapter_logits_max_abs"]), f"{100 * g['final_adapter_argmax_agree']:.1f}%",
            " ".join(g["spec"].values())]))
    return "\n".join(lines)


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    root, out_path = sys.argv[1], sys.argv[2]
    torch.set_float32_matmul_precision("highest")  # no TF32: an f32 comparison (PyTorch's default too)
    index = json.load(open(os.path.join(root, "index.json")))
    report = {"environment": environment(), "tolerances": {
        "first_step_loss_rel": TOL_LOSS0, "step_losses_rel": TOL_STEPS, "logits_rel_l2": TOL_LOGITS}, "results": []}
    print(json.dumps(report["environment"]), flush=True)
    crashed = False
    for variant in index["variants"]:
        vdir = os.path.join(root, variant)
        meta = json.load(open(os.path.join(vdir, "meta.json")))
        ours = load_ours(vdir, meta)
        reshape_logits(ours, meta)
        if "gpu" in meta:
            g = meta["gpu"]
            report.setdefault("gpu_runtime", {})[variant] = {
                k: g[k] for k in ("device", "dtype", "checkpointing", "loss0", "seconds_per_step", "vs_cpu_f32")}
            report["gpu_runtime"][variant]["checkpointing_on"] = {
                k: v for k, v in g["checkpointing_on"].items() if k not in ("losses", "grad_norms")}
        for cfg in CONFIGS:
            torch.manual_seed(0)
            try:
                r = run_config(vdir, meta, cfg, ours)
            except Exception:  # noqa: BLE001 -- record, go on with the other configurations
                crashed = True
                r = {"config": cfg["name"], "error": traceback.format_exc()}
                print(r["error"], file=sys.stderr, flush=True)
            r["variant"] = variant
            report["results"].append(r)
            if "error" not in r:
                print(f"{variant}/{cfg['name']}: loss0 ours {r['loss0_ours']:.6f} hf {r['loss0_hf']:.6f}; "
                      f"step losses max rel {r['step_loss_rel_max']:.2e}; grad worst {r['grad_rel_l2_worst']:.2e} "
                      f"({r['grad_rel_l2_worst_tensor']}); nf4 {nf4_cell(r['nf4'])} bytes differ; "
                      f"{r['seconds']:.1f} s", flush=True)
            if "error" not in r and "spec" in r.get("gpu", {}):
                g = r["gpu"]
                print(f"{variant}/{cfg['name']}: GPU runtime: loss0 {g['loss0_gpu']:.6f} hf {g['loss0_hf']:.6f}; "
                      f"step losses max rel {g['step_loss_rel_max']:.2e}; grad worst {g['grad_rel_l2_worst']:.2e}; "
                      f"GPU adapter in peft: logits rel L2 {g['final_adapter_logits_rel_l2']:.2e}", flush=True)
            with open(out_path, "w") as f:  # after every configuration: a later crash keeps the rest
                json.dump(report, f, indent=1)
    print(table(report["results"]))
    if any("gpu" in r for r in report["results"]):
        print("\nGPU runtime (bf16) vs HF:")
        print(gpu_table(report["results"]))
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
