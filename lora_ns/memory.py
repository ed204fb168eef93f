"""Per-GPU memory estimate for a recipe, before launch: weights, trainable state, activations, logits.

What HF Trainer + peft actually keep (peft 0.21, transformers 5):
- weights: frozen base in the load dtype; bitsandbytes 4-bit packs every nn.Linear of the decoder into
  0.5 byte/param plus absmax (fp32 per 64-block, or with double quant uint8 per block + fp32 per 256
  blocks); 8-bit is 1 byte/param + an fp32 scale per row. lm_head, embeddings and norms stay unquantized,
  and `prepare_model_for_kbit_training` (not under ZeRO-3/FSDP) upcasts them to fp32.
- LoRA adapters are fp32 (get_peft_model's autocast_adapter_dtype), so their gradients are fp32 and
  AdamW keeps two fp32 moments: 4 + 4 + 8 bytes/param. Full fine-tuning keeps params, grads and both
  moments in the load dtype (no fp32 master copy under Trainer's bf16 autocast).
- activations: the tensors autograd saves per decoder layer per token (see `_layer_bytes`); with
  gradient checkpointing only each layer's input plus one layer being recomputed.
- logits: the loss upcasts batch x seq x vocab to fp32; log_softmax keeps its fp32 output, and its
  backward holds that plus the fp32 gradient in and out: 12 bytes per logit at the peak.
ZeRO-2 shards gradients and optimizer state over the processes; ZeRO-3 and FSDP2 also the weights.
`total` is comparable to torch.cuda.max_memory_allocated; the CUDA context comes on top (`verdict`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GiB = 2**30
CUDA_CONTEXT = int(0.5 * GiB)  # CUDA/cuBLAS context: outside max_memory_allocated, still on the card
STRATEGIES = (None, "ddp", "zero2", "zero3", "fsdp2")
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Shape:
    """What the estimate needs from a transformers config (decoder-only LM, or an encoder for seq_cls)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    quantizable: int  # params in the decoder's nn.Linear layers (what bitsandbytes converts)
    linear_out_rows: int  # sum of out_features of those layers (8-bit row scales)
    linear_io: int  # sum of in_features + out_features of those layers (LoRA all-linear: r x this)
    other: int  # embeddings, lm_head (if untied), norms, biases
    largest_layer: int  # params of the largest module (ZeRO-3 gathers one at a time)


@dataclass
class MemoryEstimate:
    weights: int
    trainable_params: int
    trainable: int  # the trainable params' own bytes, when not already in `weights`
    gradients: int
    optimizer: int
    activations: int
    logits: int
    num_processes: int = 1
    strategy: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return (self.weights + self.trainable + self.gradients + self.optimizer + self.activations
                + self.logits)

    def lines(self) -> list[str]:
        s = self.settings
        head = (f"per-GPU memory estimate ({self.strategy or 'ddp'} over {self.num_processes}; batch "
                f"{s.get('batch')} x {s.get('seq')} tokens, {s.get('weights_dtype')} weights, gradient "
                f"checkpointing {'on' if s.get('checkpointing') else 'off'})")
        rows = [("weights", self.weights), (f"trainable ({self.trainable_params:,} params)", self.trainable),
                ("gradients", self.gradients), (f"optimizer ({s.get('optim')})", self.optimizer),
                ("activations", self.activations), ("logits + loss", self.logits), ("total", self.total)]
        return [head] + [f"  {name:<32} {nbytes / GiB:8.2f} GiB" for name, nbytes in rows]

    def verdict(self, gpu_bytes: int) -> str | None:
        """None if it fits under 90% of the card, else a warning naming the cheapest fix that fits."""
        limit = 0.9 * gpu_bytes
        if self.total + CUDA_CONTEXT <= limit:
            return None
        need = f"needs ~{(self.total + CUDA_CONTEXT) / GiB:.1f} GiB of {gpu_bytes / GiB:.1f} GiB (over 90%)"
        for fix, estimate in self._fixes():
            if estimate.total + CUDA_CONTEXT <= limit:
                return f"{need}; cheapest fix: {fix} (~{(estimate.total + CUDA_CONTEXT) / GiB:.1f} GiB)"
        return f"{need}; no single fix fits (try several: gradient checkpointing, batch 1, 4-bit, ZeRO-3)"

    def _fixes(self):
        s = self.settings
        if not s["checkpointing"]:
            yield "training.gradient_checkpointing: true", estimate(**{**s, "checkpointing": True})
        if s["batch"] > 1:
            half = s["batch"] // 2
            yield (f"per_device_train_batch_size: {half} with gradient_accumulation_steps doubled",
                   estimate(**{**s, "batch": half}))
        if s["quant"] is None:
            yield "quantization.load_in_4bit: true (QLoRA)", estimate(**{**s, "quant": "nf4-dq"})
        if self.num_processes > 1 and s["strategy"] not in ("zero3", "fsdp2"):
            yield "ZeRO-3 (accelerate_configs/, deepspeed stage 3)", estimate(**{**s, "strategy": "zero3"})


def shape_from_config(config) -> Shape:
    """Counts from the real module tree, built on the meta device (accelerate's init_empty_weights)."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import calculate_maximum_sizes
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    with init_empty_weights():
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError:  # an encoder (seq_cls)
            model = AutoModelForSequenceClassification.from_config(config)
    quantizable = rows = io = 0
    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            quantizable += module.weight.numel()
            rows += module.out_features
            io += module.in_features + module.out_features
    total = sum(p.numel() for p in model.parameters())
    _, (largest, _) = calculate_maximum_sizes(model)  # bytes in the meta model's dtype
    largest //= next(model.parameters()).element_size()
    heads = text.num_attention_heads
    return Shape(hidden=text.hidden_size, intermediate=text.intermediate_size, layers=text.num_hidden_layers,
                 heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                 vocab=text.vocab_size, quantizable=quantizable, linear_out_rows=rows, linear_io=io,
                 other=total - quantizable, largest_layer=largest)


def _layer_bytes(shape: Shape, c: int, lora_r: int, dropout: bool) -> float:
    """Bytes autograd saves per token in one decoder layer (Llama/Qwen2 layout, frozen base, LoRA all-linear).

    The frozen linears save only their weight, so what stays is: each RMSNorm's fp32 copy of its input;
    q, k, v after rope and the attention output (plus fp32 logsumexp per head) for sdpa; silu's input and
    both operands of gate*up; and per LoRA module its input (a dropout copy and a bool mask when
    lora_dropout > 0, else shared with the base path) and its r-wide A output.
    """
    h, i, kv = shape.hidden, shape.intermediate, shape.hidden // shape.heads * shape.kv_heads
    norms = 2 * h * 4
    attention = (2 * h + 2 * kv) * c + shape.heads * 4
    mlp = 3 * i * c
    lora_inputs = (6 * h + i) * (c + 1) if dropout else 0  # q,k,v,o,gate,up see h, down sees i
    lora_mid = 7 * lora_r * c if lora_r else 0
    return norms + attention + mlp + lora_inputs + lora_mid


def estimate(*, shape: Shape, batch: int, seq: int, weights_dtype: str = "bf16", quant: str | None = None,
             method: str = "lora", lora_r: int = 16, lora_dropout: bool = True, optim: str = "adamw_torch",
             checkpointing: bool = False, strategy: str | None = None, num_processes: int = 1,
             task: str = "causal_lm", num_labels: int = 2) -> MemoryEstimate:
    """The breakdown for one shape and one set of training settings (all sizes in bytes, per GPU)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
    settings = {k: v for k, v in locals().items()}
    c = _BYTES[weights_dtype]
    kbit_prep = quant is not None and strategy not in ("zero3", "fsdp2")
    q = shape.quantizable
    if quant is None:
        weights = (q + shape.other) * c
    else:
        packed = q / 2 + (q / 64 + q / 64 / 256 * 4 if quant == "nf4-dq" else q / 64 * 4)
        if quant == "int8":
            packed = q + shape.linear_out_rows * 4
        weights = packed + shape.other * (4 if kbit_prep else c)
    full = method == "full"
    if full:
        params, per_param = q + shape.other, c  # grads and both AdamW moments in the load dtype
    else:
        params, per_param = lora_r * shape.linear_io, 4  # A (r x in) + B (out x r) on every linear
    trainable = 0 if full else params * 4
    states = 0 if "sgd" in optim or "adafactor" in optim else (2 if "8bit" in optim else 2 * per_param)
    if "lion" in optim:
        states //= 2
    grads, opt = params * per_param, params * states
    shard = max(num_processes, 1) if strategy in ("zero2", "zero3", "fsdp2") else 1
    grads, opt = grads / shard, opt / shard
    if strategy in ("zero3", "fsdp2"):
        weights = weights / num_processes + shape.largest_layer * c
        trainable = trainable / num_processes
    tokens = batch * seq
    classes = shape.vocab if task != "seq_cls" else num_labels
    vocab_bytes = classes * 12 if task != "seq_cls" else 0
    per_layer = _layer_bytes(shape, c, 0 if full else lora_r, lora_dropout and not full)
    if full:
        per_layer += (7 * shape.hidden + shape.intermediate) * c  # frozen-linear inputs now saved too
    if checkpointing:  # each layer's input; the recomputed layer lives after the loss buffers are freed
        acts = tokens * shape.layers * shape.hidden * c + max(0, tokens * per_layer - tokens * vocab_bytes)
    else:
        acts = tokens * shape.layers * per_layer
    acts += tokens * shape.hidden * 4  # final norm
    logits = (tokens if task != "seq_cls" else batch) * classes * 12
    return MemoryEstimate(weights=int(weights), trainable_params=int(params), trainable=int(trainable),
                          gradients=int(grads), optimizer=int(opt), activations=int(acts), logits=int(logits),
                          num_processes=num_processes, strategy=strategy, settings=settings)


def estimate_for_config(config, **settings) -> MemoryEstimate:
    """`estimate` from a transformers config object (the bench uses this)."""
    return estimate(shape=shape_from_config(config), **settings)


def estimate_for_recipe(recipe, num_processes: int = 1, strategy: str | None = None) -> MemoryEstimate:
    """The estimate for a lora_ns Recipe, with lora_ns's own defaults (checkpointing, dtype "auto" = bf16)."""
    from transformers import AutoConfig

    from lora_ns.builtin_models import resolve_model_path
    from lora_ns.errors import UserError
    from lora_ns.model import gradient_checkpointing

    m, t, qz = recipe.model, recipe.training, recipe.quantization
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(m.name_or_path), revision=m.revision,
                                            trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(recipe.problem("model.name_or_path", f"cannot read the model config: {err}",
                                       "point it at a local folder or a reachable hub id"))
    quant = None
    if qz.load_in_4bit:
        quant = "nf4-dq" if qz.bnb_4bit_use_double_quant else "nf4"
    elif qz.load_in_8bit:
        quant = "int8"
    options = recipe.peft.options
    method = recipe.peft.method
    return estimate_for_config(
        config, batch=int(t.get("per_device_train_batch_size", 8)), seq=int(t.get("max_length") or 1024),
        weights_dtype="bf16" if m.dtype == "auto" else m.dtype, quant=quant,
        method="full" if method == "full" else "lora", lora_r=int(options.get("r", 8)),
        lora_dropout=float(options.get("lora_dropout", 0.0)) > 0, optim=str(t.get("optim", "adamw_torch")),
        checkpointing=gradient_checkpointing(recipe), strategy=strategy, num_processes=num_processes,
        task=recipe.task, num_labels=m.num_labels or 2)


def with_settings(est: MemoryEstimate, **changes) -> MemoryEstimate:
    """The same estimate with some settings changed (e.g. batch=1)."""
    return estimate(**{**est.settings, **changes})


