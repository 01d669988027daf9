"""Loads the base model folder in bf16 (transformers) and the adapter qlora wrote (peft); prints
the mean next-token loss on a few rows of the training data without and with the adapter."""
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model_dir, adapter_dir, data = sys.argv[1:4]
rows = [json.loads(l)["input_ids"][:1024] for l in open(data)][:4]
ids = torch.tensor(rows, device="cuda")
m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
with torch.no_grad():
    base = m(input_ids=ids, labels=ids).loss.item()
    pm = PeftModel.from_pretrained(m, adapter_dir).eval()
    tuned = pm(input_ids=ids, labels=ids).loss.item()
cfg = json.load(open(adapter_dir + "/adapter_config.json"))
print(json.dumps({"loss_base": base, "loss_with_adapter": tuned, "r": cfg["r"], "lora_alpha": cfg["lora_alpha"],
                  "target_modules": sorted(cfg["target_modules"])}))
