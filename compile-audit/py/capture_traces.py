"""Capture real torch.compile structured traces (TORCH_TRACE) and TORCH_LOGS text on the
GPU machine, as compile-audit's test fixtures.

Usage: python3 capture_traces.py OUT_DIR SCENARIO
Scenarios (each in its own process, so each trace is one run):
  clean     a small transformer block, fixed shapes, fullgraph: 1 graph, 0 breaks
  breaks    the same with a print, a .item() branch and a data-dependent branch, and
            shapes that change between calls with dynamic=False until the recompile
            limit (set to 3) is hit: breaks, recompiles, a frame that falls back to eager
  qlora_gc  a 2-layer Llama-shaped model, bitsandbytes NF4 + double quant, PEFT LoRA,
            gradient checkpointing (use_reentrant=False) with enable_input_require_grads,
            dynamic=True over 3 lengths: the known requires_grad_() breaks
Writes the trace under OUT_DIR/<scenario>/ (TORCH_TRACE is set by the caller) and the
per-step losses as OUT_DIR/<scenario>_losses.jsonl.
"""
import json
import os
import sys

import torch

out_dir, scenario = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
dev = "cuda" if torch.cuda.is_available() else "cpu"


class Block(torch.nn.Module):
    def __init__(self, d=64, breaky=False):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))
        self.breaky = breaky

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.breaky:
            print("side effect in forward")  # graph break: print
            if a.sum().item() > 0:  # graph break: .item() + data-dependent branch
                a = a * 1.0001
        x = x + self.proj(a)
        return x + self.mlp(self.norm(x))


losses = []
if scenario in ("clean", "breaks"):
    breaky = scenario == "breaks"
    m = Block(breaky=breaky).to(dev)
    if breaky:
        torch._dynamo.config.recompile_limit = 3
        f = torch.compile(m, dynamic=False)
        lengths = [16, 24, 32, 40, 48, 16]
    else:
        f = torch.compile(m, fullgraph=True)
        lengths = [32] * 4
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    for step, t in enumerate(lengths):
        x = torch.randn(2, t, 64, device=dev)
        loss = f(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append({"step": step, "loss": loss.item()})
elif scenario == "qlora_gc":
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        model = LlamaForCausalLM.from_pretrained(d, quantization_config=q, dtype=torch.bfloat16, device_map=dev,
                                                 attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    f = torch.compile(model, dynamic=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for step, t in enumerate([64, 96, 128, 64]):
        ids = torch.randint(0, 512, (1, t), device=dev)
        loss = f(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append({"step": step, "loss": loss.item()})
else:
    sys.exit(f"unknown scenario {scenario}")

with open(os.path.join(out_dir, f"{scenario}_losses.jsonl"), "w") as fh:
    for r in losses:
        fh.write(json.dumps(r) + "\n")
print(f"{scenario}: {len(losses)} steps, last loss {losses[-1]['loss']:.4f}")
