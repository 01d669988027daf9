"""Audit what run_all.sh brought back with the Rust tool and write results.json + a
Markdown table (runs here, not on the GPU machine; needs `cargo build --release -p
compile-audit` or pass --bin).

Usage: python3 summarize.py RUN_DIR [RUN_DIR ...] [--bin target/release/compile-audit]
                            [--json results.json] [--md results-table.md]
RUN_DIR is an unpacked recipe-<tag>.tar.gz: RUN_DIR/<config>/{eager,compiled}/...
Per config it runs `report --format json`, `gate --max-graph-breaks 0 --max-recompiles 29
--require-captured ...` (the patterns below) and `parity --rtol 1e-3`, and reads the two
timing.json files.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

CONFIGS = ("sdpa", "sdpa_pad", "sdpa_ckpt", "flex_pad", "flex_packed")
# what must run inside a compiled graph, by part (substrings of captured ops, user functions
# or module paths as compile-audit reports them)
REQUIRED = {
    "4-bit linears": ["bitsandbytes.dequantize_4bit", "lora_A", "lora_B", "autograd_function_apply"],
    "attention": {"sdpa": ["scaled_dot_product_attention"], "flex": ["higher_order.flex_attention"]},
    "MLP": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "silu"],
    "norms": ["input_layernorm", "post_attention_layernorm", "rsqrt"],
    "loss": ["cross_entropy", "ForCausalLMLoss"],
}


def patterns_for(config: str) -> dict[str, list[str]]:
    out = {}
    for part, pats in REQUIRED.items():
        if isinstance(pats, dict):
            pats = pats["flex" if config.startswith("flex") else "sdpa"]
        out[part] = pats
    return out


def run(cmd: list[str]) -> tuple[int, str]:
    p = subprocess.run(cmd, capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr


def load_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def grad_norms(path: str) -> dict[int, float]:
    out = {}
    try:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if "grad_norm" in r:
                    out[r["step"]] = r["grad_norm"]
    except (OSError, ValueError):
        pass
    return out


def losses_of(path: str) -> list[float]:
    try:
        with open(path) as f:
            return [json.loads(l)["loss"] for l in f if l.strip()]
    except (OSError, ValueError):
        return []


def captured_match(captured: dict, pat: str) -> bool:
    return any(pat in k for group in ("ops", "user_functions", "modules") for k in captured.get(group, {}))


def audit_config(binary: str, run_dir: str, config: str) -> dict | None:
    cdir = os.path.join(run_dir, config, "compiled")
    edir = os.path.join(run_dir, config, "eager")
    if not os.path.isdir(cdir) and not os.path.isdir(edir):
        return None
    res: dict = {"config": config, "run": os.path.basename(run_dir)}
    ct = load_json(os.path.join(cdir, "timing.json")) or {}
    et = load_json(os.path.join(edir, "timing.json")) or {}
    res["compiled_status"] = ct.get("status", "missing")
    res["eager_status"] = et.get("status", "missing")
    res["card"] = ct.get("device") or et.get("device")
    res["layers"] = ct.get("layers") or et.get("layers")
    res["scope"] = ct.get("scope")
    res["steps"] = {"compiled": ct.get("steps_done"), "eager": et.get("steps_done")}
    res["patches"] = ct.get("patches")
    res["compiled_regions"] = ct.get("compiled")
    trace = os.path.join(cdir, "trace")
    logs = os.path.join(cdir, "torch_logs.txt")
    inputs = [p for p in (trace, logs) if os.path.exists(p)]
    if os.path.isdir(trace):
        rc, out = run([binary, "report", *inputs, "--format", "json"])
        rep = json.loads(out) if rc == 0 else {}
        res["graph_breaks"] = rep.get("graph_breaks")
        res["recompiles"] = rep.get("recompiles")
        res["graphs"] = rep.get("graphs")  # per compile id, last attempt (a restarted trace is not a graph)
        res["restarts"] = rep.get("restarts")
        res["superseded_graphs"] = rep.get("superseded_graphs")
        res["restart_reasons"] = [f"{r.get('compile_id')} {r.get('frame')}: {'; '.join(r.get('reasons', []))[:200]}"
                                  for r in (rep.get("restarted") or [])][:10]
        res["eager_fallbacks"] = len(rep.get("fallbacks", []) or [])
        res["recompile_reasons"] = [f"{r.get('compile_id')} {r.get('frame')}: {'; '.join(r.get('reasons', []))[:200]}"
                                    for r in (rep.get("recompile_reasons") or [])][:10]
        res["compile_time_s"] = rep.get("total_compile_time_s")
        res["frames"] = [f"{f['name']} ({f['location']}) x{len(f['compiles'])}" for f in rep.get("frames", [])
                         if any(c.get("graph_op_count") for c in f["compiles"])]
        cap = rep.get("captured", {})
        pats = patterns_for(config)
        res["captured"] = {part: all(captured_match(cap, p) for p in ps) for part, ps in pats.items()}
        res["captured_missing"] = {part: [p for p in ps if not captured_match(cap, p)] for part, ps in pats.items()
                                   if not all(captured_match(cap, p) for p in ps)}
        gate_cmd = [binary, "gate", *inputs, "--max-graph-breaks", "0", "--max-recompiles", "29"]
        for ps in pats.values():
            for p in ps:
                gate_cmd += ["--require-captured", p]
        rc, out = run(gate_cmd)
        res["gate"] = "pass" if rc == 0 else "FAIL"
        if res["compiled_status"] != "ok":  # a cut-off run: the gate saw only part of it
            res["gate"] += " (run incomplete)"
        res["gate_output"] = [l for l in out.splitlines() if l.startswith("gate")][:10]
        res["gate_command"] = " ".join(["compile-audit", *gate_cmd[1:]]).replace(run_dir + "/", "")
        rc, out = run([binary, "report", *inputs])
        res["report_table"] = out.strip().splitlines()
    el = os.path.join(edir, "losses.jsonl")
    cl = os.path.join(cdir, "losses.jsonl")
    if os.path.exists(el) and os.path.exists(cl):
        rc, out = run([binary, "parity", el, cl, "--rtol", "1e-3"])
        m = re.search(r"max relative difference ([0-9.eE+-]+|NaN|inf)", out)
        res["parity"] = "pass" if rc == 0 else "FAIL"
        res["parity_max_rel"] = float(m.group(1)) if m else None
        res["parity_output"] = out.strip().splitlines()[-3:]
    ge, gc = grad_norms(el), grad_norms(cl)
    common = sorted(set(ge) & set(gc))
    if common:
        res["grad_norm_steps"] = len(common)
        res["grad_norm_max_rel"] = max(abs(ge[s] - gc[s]) / max(abs(ge[s]), 1e-12) for s in common)
    res["lr"] = ct.get("lr") or et.get("lr")
    lc = losses_of(cl)
    if lc:
        res["loss_first_last"] = [lc[0], lc[-1]]
    e_med, c_med = et.get("median_step_s_after_warmup"), ct.get("median_step_s_after_warmup")
    res["eager_step_s"] = e_med
    res["compiled_step_s"] = c_med
    res["speedup"] = (e_med / c_med) if e_med and c_med else None
    e_tps, c_tps = et.get("tokens_per_s_after_warmup"), ct.get("tokens_per_s_after_warmup")
    res["throughput_speedup"] = (c_tps / e_tps) if e_tps and c_tps else None
    res["compiled_first_step_s"] = ct.get("first_step_s")
    res["eager_first_step_s"] = et.get("first_step_s")
    res["eager_tokens_per_s"] = et.get("tokens_per_s_after_warmup")
    res["compiled_tokens_per_s"] = ct.get("tokens_per_s_after_warmup")
    res["peak_mem_gb"] = {"eager": et.get("peak_mem_gb"), "compiled": ct.get("peak_mem_gb")}
    res["versions"] = ct.get("versions") or et.get("versions")
    return res


def fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def yes(b):
    return "-" if b is None else ("yes" if b else "**no**")


def markdown(rows: list[dict]) -> str:
    head = ("| run | config | card | scope | layers | breaks | recompiles | graphs | linears | attention | MLP | norms | loss "
            "| gate | loss parity (max rel) | grad-norm max rel | eager step | compiled step | speedup | compiled 1st step |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        cap = r.get("captured", {})
        card = (r.get("card") or "-").replace("NVIDIA ", "")
        lines.append(
            f"| {r['run']} | {r['config']} | {card} | {r.get('scope')} | {r.get('layers')} | {fmt(r.get('graph_breaks'), 'd')} | "
            f"{fmt(r.get('recompiles'), 'd')} | {fmt(r.get('graphs'), 'd')} | {yes(cap.get('4-bit linears'))} | "
            f"{yes(cap.get('attention'))} | {yes(cap.get('MLP'))} | {yes(cap.get('norms'))} | {yes(cap.get('loss'))} | "
            f"{r.get('gate', '-')} | {r.get('parity', '-')} ({fmt(r.get('parity_max_rel'), '.2e')}) | "
            f"{fmt(r.get('grad_norm_max_rel'), '.2e')} | "
            f"{fmt(r.get('eager_step_s') and r['eager_step_s'] * 1000, '.0f')} ms | "
            f"{fmt(r.get('compiled_step_s') and r['compiled_step_s'] * 1000, '.0f')} ms | "
            f"{fmt(r.get('speedup'), '.2f')}x | {fmt(r.get('compiled_first_step_s'), '.0f')} s |")
    return head + "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--bin", default="target/release/compile-audit")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    a = p.parse_args()
    rows = []
    for d in a.run_dirs:
        for c in CONFIGS:
            r = audit_config(a.bin, d.rstrip("/"), c)
            if r is not None:
                rows.append(r)
    md = markdown(rows)
    print(md)
    for r in rows:
        print(f"{r['config']} ({r['run']}): gate {r.get('gate')}, parity {r.get('parity')}, "
              f"status compiled={r['compiled_status']} eager={r['eager_status']}")
        for l in r.get("gate_output", []):
            print("   ", l)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
