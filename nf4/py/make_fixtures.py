"""Produce the nf4 crate's test fixtures with real bitsandbytes on a CUDA machine.

Run by `bundle/run.sh fixtures` on the GPU machine (see the README's contributor section).
Writes, under the output folder given as argv[1]:

- nf4_fixtures.safetensors: for each case, the input tensor (`<case>.input`), what
  bitsandbytes.functional.quantize_4bit returned, serialised exactly as bitsandbytes'
  `QuantState.as_dict(packed=True)` does (`<case>.weight`, `<case>.weight.absmax`, ...),
  the un-nested fp32 absmax (`<case>.absmax_fp32`) and dequantize_4bit's output
  (`<case>.dequant`). Plus `dynamic_map`, bitsandbytes' signed dynamic 8-bit map.
- tiny_llama_{nf4dq,fp4bf16}.safetensors + .json: a tiny random Llama quantised by
  transformers + bitsandbytes and saved with save_pretrained, with `<weight>.dequant`
  references in a sibling file.

The committed copies live in nf4/tests/fixtures/; regenerate them only on purpose.
"""

import json
import os
import sys
import tempfile

import torch
from safetensors.torch import save_file

import bitsandbytes as bnb
import bitsandbytes.functional as F

out_dir = sys.argv[1]
os.makedirs(out_dir, exist_ok=True)
dev = "cuda"
g = torch.Generator(device="cpu").manual_seed(20261125)

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


def make_input(shape, dtype, kind):
    n = 1
    for s in shape:
        n *= s
    x = torch.randn(n, generator=g) * (0.02 if kind == "small" else 1.0)
    if kind == "edge" and n >= 8:
        # a block of zeros (absmax 0), values exactly on NF4 codes and thresholds, a large outlier
        x[: min(n, 40)] = 0.0
        code = F.get_4bit_type("nf4", device="cpu")
        m = min(16, n - 40)
        if m > 0:
            x[40 : 40 + m] = code[:m]
        x[-1] = 37.5
        x[n // 2] = -0.0
    return x.reshape(shape).to(dtype)


tensors = {}
cases = []


def add_case(name, shape, dtype_name, blocksize, quant_type, nested, kind="normal", storage=torch.uint8):
    A = make_input(shape, DTYPES[dtype_name], kind).to(dev)
    packed, qs = F.quantize_4bit(
        A, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type, quant_storage=storage
    )
    _, qs_plain = F.quantize_4bit(A, blocksize=blocksize, compress_statistics=False, quant_type=quant_type)
    deq = F.dequantize_4bit(packed, qs)
    tensors[f"{name}.input"] = A.cpu().contiguous()
    tensors[f"{name}.weight"] = packed.cpu().contiguous()
    for k, v in qs.as_dict(packed=True).items():
        tensors[f"{name}.weight.{k}"] = v.cpu().contiguous()
    tensors[f"{name}.absmax_fp32"] = qs_plain.absmax.cpu().contiguous()
    tensors[f"{name}.dequant"] = deq.cpu().contiguous()
    cases.append(name)


i = 0
for bs in BLOCKSIZES:
    for qt in ("nf4", "fp4"):
        for nested in (False, True):
            dt = ["bf16", "f16", "f32"][i % 3]
            # odd sizes: tails shorter than a block, odd element counts (half-filled last byte)
            shape = [(3, 333), (1001,), (17, 129), (2 * bs + 7,), (64, 96)][i % 5]
            kind = ["normal", "small", "edge"][i % 3]
            add_case(f"c{i:03d}_{qt}_{dt}_bs{bs}_{'dq' if nested else 'plain'}", shape, dt, bs, qt, nested, kind)
            i += 1

# every input dtype at the common setting, more than 256 blocks so the nested absmax has >1 block
for dt in DTYPES:
    add_case(f"c{i:03d}_nf4_{dt}_bs64_dq_big", (130, 257), dt, 64, "nf4", True, "normal")
    i += 1
# a packed-storage dtype other than uint8 (as FSDP QLoRA saves it)
add_case(f"c{i:03d}_nf4_bf16_bs64_dq_storagebf16", (48, 80), "bf16", 64, "nf4", True, "normal", torch.bfloat16)
i += 1
# tiny tensors
for n in (1, 2, 3):
    add_case(f"c{i:03d}_nf4_f32_bs64_plain_n{n}", (n,), "f32", 64, "nf4", False, "normal")
    i += 1

tensors["dynamic_map"] = F.create_dynamic_map(signed=True).contiguous()
save_file(tensors, os.path.join(out_dir, "nf4_fixtures.safetensors"), metadata={
    "generator": "nf4/py/make_fixtures.py",
    "bitsandbytes": bnb.__version__,
    "torch": torch.__version__,
    "device": torch.cuda.get_device_name(),
    "cases": json.dumps(cases),
})
print(f"nf4_fixtures.safetensors: {len(cases)} cases, {sum(t.numel() * t.element_size() for t in tensors.values())} bytes")

# A tiny Llama quantised by transformers + bitsandbytes, saved the way users save them.
try:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(7)
    with tempfile.TemporaryDirectory() as src:
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(src)
        variants = {
            "nf4dq": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.bfloat16),
            "fp4bf16": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                                          bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16),
        }
        for tag, qcfg in variants.items():
            m = AutoModelForCausalLM.from_pretrained(src, quantization_config=qcfg, dtype=torch.bfloat16, device_map=dev)
            with tempfile.TemporaryDirectory() as dst:
                m.save_pretrained(dst, safe_serialization=True)
                os.replace(os.path.join(dst, "model.safetensors"), os.path.join(out_dir, f"tiny_llama_{tag}.safetensors"))
                with open(os.path.join(dst, "config.json")) as f:
                    conf = f.read()
            with open(os.path.join(out_dir, f"tiny_llama_{tag}.json"), "w") as f:
                f.write(conf)
            refs = {}
            for name, mod in m.named_modules():
                if isinstance(mod, bnb.nn.Linear4bit):
                    refs[f"{name}.weight.dequant"] = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).cpu().contiguous()
            save_file(refs, os.path.join(out_dir, f"tiny_llama_{tag}_dequant.safetensors"))
            print(f"tiny_llama_{tag}: {len(refs)} quantised linears")
except Exception as e:  # the unit fixtures above are still useful without this part
    print(f"tiny llama fixture FAILED: {type(e).__name__}: {e}")
    raise
