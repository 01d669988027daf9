"""QLoRA + torch.compile with zero graph breaks: the patches and wrappers of the recipe.

Each patch is small, named, and says in its docstring which upstream project should take
it. None changes the math: a patched model computes the same losses as the stock one (the
recipe checks that with `compile-audit parity` against a stock eager run).

    model = get_peft_model(quantized_llama, lora_config)
    patch_input_require_grads(model)            # only with gradient checkpointing
    masks = FlexBlockMaskCache(device)           # only with attn_implementation="flex_attention"
    compile_regions(model)                       # or: model = compile_qlora(model) (whole model)
    loss = model(input_ids=ids, labels=labels, attention_mask=masks.padded(valid_len, T)).loss

Measured with stock code (torch 2.11, transformers 5.17, peft 0.21, bitsandbytes 0.50.2):
gradient checkpointing gives 5 graph breaks (`Tensor.requires_grad_()` in the
input-require-grads hook) and 2 graphs; flex_attention with dynamic lengths gives 7 breaks
(data-dependent branching in the mask construction, `warnings.warn`) and 8-9 graphs.
"""
from __future__ import annotations

import functools

import torch

__all__ = [
    "patch_input_require_grads",
    "FlexBlockMaskCache",
    "flex_block_mask_cache",
    "document_ids_padded",
    "document_ids_packed",
    "compile_qlora",
    "compile_regions",
    "dynamo_counters",
]


# --------------------------------------------------------------------------------------------
# 1. Gradient checkpointing: the input-require-grads hook
# --------------------------------------------------------------------------------------------

def _checkpoint_is_reentrant(pretrained) -> bool | None:
    """True/False for the gradient checkpointing function installed on the model's layers,
    None when gradient checkpointing is off."""
    for m in pretrained.modules():
        if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func"):
            f = m._gradient_checkpointing_func
            kw = getattr(f, "keywords", None) or {}
            # torch.utils.checkpoint's own default is now use_reentrant=False as well
            return bool(kw.get("use_reentrant", False))
    return None


def patch_input_require_grads(model) -> int:
    """Remove the forward hook that calls `output.requires_grad_(True)` on the input
    embeddings when gradient checkpointing is non-reentrant. Returns how many hooks went.

    Why: `PreTrainedModel.gradient_checkpointing_enable()` always calls
    `enable_input_require_grads()`, which hooks the embedding layer to flip
    `requires_grad` on its output. Dynamo cannot trace an in-place `requires_grad_()`
    (GB0125 "Unsupported Tensor.requires_grad_() call"): with QLoRA that is 5 graph
    breaks and the model splits into 2 graphs, the embedding output then is a graph
    input whose `requires_grad` flips, which also costs a recompile. The hook exists
    for *reentrant* checkpointing, whose autograd.Function drops the graph when no input
    requires grad. Non-reentrant checkpointing (`use_reentrant=False`, transformers'
    default) recomputes through saved-tensor hooks and reaches the LoRA weights inside
    the layer whatever the input's `requires_grad`, so the hook is dead weight there:
    removing it changes no gradient (the recipe's parity check covers it).

    Upstream: transformers. `gradient_checkpointing_enable` should skip
    `enable_input_require_grads()` when the checkpoint function is non-reentrant (PEFT's
    `prepare_model_for_kbit_training` already does exactly this; PEFT's
    `_prepare_model_for_gradient_checkpointing` should follow for non-quantized models).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    reentrant = _checkpoint_is_reentrant(base)
    if reentrant is None:
        return 0
    if reentrant:
        raise ValueError("patch_input_require_grads: reentrant gradient checkpointing needs the hook "
                         "(and dynamo cannot trace it anyway); use use_reentrant=False")
    removed = 0
    for m in base.modules():
        hooks = getattr(m, "_require_grads_hooks", None)
        if hooks:
            removed += len(hooks)
            m.disable_input_require_grads()
    return removed


# --------------------------------------------------------------------------------------------
# 2. flex_attention: build the BlockMask outside the compiled region, once per layout
# --------------------------------------------------------------------------------------------

def document_ids_padded(valid_len: int, total_len: int) -> list[int]:
    """Document ids of one right-padded row: the tokens are document 0, the padding its own
    document 1. With a causal mask a real token never sees padding; padding sees only
    padding, so no row is empty and padded positions stay finite."""
    if not 0 < valid_len <= total_len:
        raise ValueError(f"valid_len {valid_len} not in 1..{total_len}")
    return [0] * valid_len + [1] * (total_len - valid_len)


def document_ids_packed(doc_lens: list[int]) -> list[int]:
    """Document ids of one row that packs documents of the given lengths back to back."""
    if not doc_lens or any(n <= 0 for n in doc_lens):
        raise ValueError(f"bad document lengths {doc_lens}")
    return [i for i, n in enumerate(doc_lens) for _ in range(n)]


def _causal_document_mask_mod(doc_ids: torch.Tensor):
    """mask_mod for flex_attention: causal within a document. `doc_ids` is (B, T) int32."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
    return mask_mod


class FlexBlockMaskCache:
    """Build flex_attention `BlockMask`s outside the compiled model and hand them in as
    `attention_mask` (a 4-D BlockMask, which transformers' `create_causal_mask` returns
    untouched), cached by layout.

    Why: with `attn_implementation="flex_attention"` transformers builds the BlockMask
    inside `forward`: `flex_attention_mask` branches on `fast_all(attention_mask)` (a
    data-dependent `if` on a tensor: GB "Data-dependent branching"), packed sequences go
    through `find_packed_sequence_indices`, and `create_block_mask(_compile=True)` is a
    nested torch.compile of the mask construction whose warnings end up as
    `warnings.warn` breaks. Stock: 7 graph breaks, 8-9 graphs with dynamic lengths.
    A BlockMask is plain data (index tensors + a mask_mod closure over a document-id
    tensor), so the compiled model takes it as an input: with `dynamic=True` one graph
    serves every length and every document layout (the closure's tensor is a graph input,
    guarded by its code object, not by its values).

    The mask is causal within a document: right padding is a document of its own (see
    `document_ids_padded`), packed sequences one document each (`document_ids_packed`,
    with position_ids restarting at 0 per document). For real tokens that is exactly the
    mask transformers builds from a 2-D padding mask or from restarting position_ids.

    The masks are built eagerly (`_compile=False`): for the lengths of QLoRA training
    (<= a few thousand) the dense mask_mod evaluation costs milliseconds and keeps
    create_block_mask's own torch.compile frames out of the audited trace. The cache key
    is the document-id layout, so padded batches (few layouts) hit it almost always.

    Upstream: Unsloth (the flex-attention-for-dynamic-sequences bounty: ship this as the
    data collator's job, mask per batch, model compiled once) and transformers (accept a
    prebuilt BlockMask through the data collator / `DataCollatorWithFlattening`, and make
    `flex_attention_mask` branch-free under compile: `torch.cond` or no `fast_all` check).
    """

    def __init__(self, device, block_size: int = 128, max_entries: int = 64):
        self.device = torch.device(device)
        self.block_size = block_size
        self.max_entries = max_entries
        self._cache: dict[tuple, object] = {}
        self.hits = 0
        self.misses = 0

    def get(self, doc_ids: list[int] | tuple[int, ...]):
        from torch.nn.attention.flex_attention import create_block_mask

        key = tuple(doc_ids)
        bm = self._cache.get(key)
        if bm is not None:
            self.hits += 1
            return bm
        self.misses += 1
        t = len(key)
        ids = torch.tensor([key], dtype=torch.int32, device=self.device)
        bm = create_block_mask(_causal_document_mask_mod(ids), B=1, H=None, Q_LEN=t, KV_LEN=t,
                               device=self.device, BLOCK_SIZE=self.block_size, _compile=False)
        if len(self._cache) >= self.max_entries:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = bm
        return bm

    def padded(self, valid_len: int, total_len: int):
        return self.get(document_ids_padded(valid_len, total_len))

    def packed(self, doc_lens: list[int]):
        return self.get(document_ids_packed(doc_lens))


@functools.lru_cache(maxsize=None)
def flex_block_mask_cache(device: str = "cuda") -> FlexBlockMaskCache:
    """The process-wide FlexBlockMaskCache for `device` (see FlexBlockMaskCache)."""
    return FlexBlockMaskCache(device)


# --------------------------------------------------------------------------------------------
# 3. Compile
# --------------------------------------------------------------------------------------------

def compile_qlora(model, dynamic: bool = True, backend: str = "inductor", fullgraph: bool = False):
    """torch.compile for a PEFT QLoRA model, with the settings the recipe audits.

    `dynamic=True`: sequence lengths change every step, so compile symbolic in the
    sequence dimension from the first call instead of specializing, recompiling and then
    going dynamic (batch size 1 stays specialized, sizes 0/1 always are). bitsandbytes >=
    0.46 registers its 4-bit ops (`torch.ops.bitsandbytes.*`) with fake kernels, so the
    NF4 linears (dequantize + gemm, LoRA A/B) are captured as ops in the graph.
    `fullgraph=False` on purpose: the audit counts breaks instead of dying on the first.

    Upstream: none (settings, not a patch).
    """
    return torch.compile(model, dynamic=dynamic, backend=backend, fullgraph=fullgraph)


def dynamo_counters() -> dict:
    """Dynamo's own counts, a cross-check for the trace audit: graph breaks by reason,
    unique graphs, frames seen/ok."""
    from torch._dynamo.utils import counters

    return {
        "graph_breaks": sum(counters["graph_break"].values()),
        "break_reasons": {k[:160]: v for k, v in counters["graph_break"].items()},
        "unique_graphs": counters["stats"].get("unique_graphs", 0),
        "frames_total": counters["frames"].get("total", 0),
        "frames_ok": counters["frames"].get("ok", 0),
        "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else None,
    }


def compile_regions(model, dynamic: bool = True, backend: str = "inductor",
                    one_layer_graph: bool = True) -> list[str]:
    """Regional compilation: compile each decoder layer, the final norm, the LM head and
    the loss, and leave the glue (embedding lookup, rotary tables, the Python loop over
    layers) eager. Returns the names of what was compiled.

    Why: a whole-model compile traces and lowers all 16 layers (112 4-bit linears, each an
    autograd.Function with a dequantize) one after the other. Measured here, dynamo plus
    AOTAutograd alone take ~18 s per layer on a slow CPU, so 16 layers blow any
    reasonable budget before Inductor starts. The layers are identical code with
    parameters as graph inputs (`inline_inbuilt_nn_modules`), so one compiled layer
    serves all 16: compile time stops growing with depth. Every part the audit requires
    (4-bit linears, LoRA, attention, MLP, norms, loss) is inside a compiled graph.

    `one_layer_graph`: the first layer's input (the frozen embedding's output) does not
    require grad while every later layer's does, which makes dynamo compile the layer
    twice (a `requires_grad mismatch` recompile). Running transformers' own
    input-require-grads hook, eagerly, outside the compiled regions (where it breaks
    nothing), gives all 16 layers the same input and one graph; it costs the input
    gradient of layer 0 in the backward (~1/48 of the backward's matmuls here).

    Upstream: none needed (torch's documented "regional compilation"); transformers could
    offer it as `model.compile(regions="layers")`. Unsloth compiles per module the same way.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.model
    done = []
    if one_layer_graph and not any(getattr(m, "_require_grads_hooks", None) for m in base.modules()):
        base.enable_input_require_grads()
        done.append("(eager input-require-grads hook: one graph for all layers)")
    for i, layer in enumerate(decoder.layers):
        layer.compile(dynamic=dynamic, backend=backend)
        done.append(f"model.layers.{i}")
    decoder.norm.forward = torch.compile(decoder.norm.forward, dynamic=dynamic, backend=backend)
    done.append("model.norm")
    base.lm_head.forward = torch.compile(base.lm_head.forward, dynamic=dynamic, backend=backend)
    done.append("lm_head")
    base.loss_function = torch.compile(base.loss_function, dynamic=dynamic, backend=backend)
    done.append("loss_function")
    return done
