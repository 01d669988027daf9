"""A CPU stand-in for the three Unsloth calls the example makes, built on transformers + peft.

For checking the example's data, training loop and scoring on a machine without a GPU
(`import unsloth` needs one). It proves nothing about Unsloth itself: the GPU run does that.
Put this folder first on PYTHONPATH only for that check.
"""

import peft
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

__version__ = "cpu-shim"


def is_bfloat16_supported():
    return False


class FastLanguageModel:
    @staticmethod
    def from_pretrained(model_name, max_seq_length = 2048, dtype = None, load_in_4bit = False, **kwargs):
        if load_in_4bit:
            raise ValueError("cpu shim: no 4-bit on CPU")
        model = AutoModelForCausalLM.from_pretrained(model_name, dtype = torch.float32)
        return model, AutoTokenizer.from_pretrained(model_name)

    @staticmethod
    def get_peft_model(model, r, target_modules, lora_alpha, lora_dropout = 0, bias = "none", random_state = 3407, **kwargs):
        torch.manual_seed(random_state)
        config = peft.LoraConfig(
            r = r, lora_alpha = lora_alpha, lora_dropout = lora_dropout, bias = bias,
            target_modules = target_modules, task_type = "CAUSAL_LM",
        )
        return peft.get_peft_model(model, config)

    @staticmethod
    def for_inference(model):
        model.eval()
        return model

    @staticmethod
    def for_training(model, use_gradient_checkpointing = None):
        model.train()
        return model


class _TorchLogProbs:
    """TRL 1.15 computes SFT log-probabilities with a Triton kernel, which needs a GPU; this is
    the same per-token quantities in plain torch (Unsloth replaces that loss on the GPU)."""

    @staticmethod
    def apply(hidden, weight, bias, labels, temperature, chunk_size, softcap, logit_scale, outputs):
        logits = torch.nn.functional.linear(hidden, weight, bias).float()
        if logit_scale:
            logits = logits * logit_scale
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        logits = logits / temperature
        log_p = torch.log_softmax(logits, dim = -1)
        picked = log_p.gather(-1, labels[:, None]).squeeze(-1)
        with torch.no_grad():
            entropy = -(log_p.exp() * log_p).sum(-1)
            log_sum_sq = torch.logsumexp(2 * log_p, dim = -1)
            mean_logits = logits.mean(-1)
            is_top1 = logits.argmax(-1) == labels
        return picked, entropy, log_sum_sq, mean_logits, is_top1


import trl.trainer.utils as _trl_utils  # noqa: E402

_trl_utils._ChunkedLogProbFunction = _TorchLogProbs
