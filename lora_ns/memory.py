"""Per-GPU memory estimate for a recipe, before launch. What HF Trainer + peft 0.21 actually keep:

- weights: the frozen base in the load dtype. bitsandbytes 4-bit packs each decoder nn.Linear into 0.5
  byte/param + absmax (fp32 per 64-block; double quant: uint8 per block + fp32 per 256 blocks), 8-bit into
  1 byte/param + an fp32 scale per row. lm_head, embeddings and norms stay unquantized, and
  `prepare_model_for_kbit_training` (skipped under ZeRO-3/FSDP) upcasts them to fp32.
- LoRA adapters are fp32 (peft's autocast_adapter_dtype): fp32 grads, two fp32 AdamW moments, 16 bytes
  per param. Full fine-tuning keeps params, grads and moments in the load dtype (no fp32 master copy).
- activations: what autograd saves per layer per token (`_layer_bytes`); with checkpointing, each
  layer's input plus the one layer being recomputed; TRL's selective checkpointing also keeps each layer's
  attention output and fp32 logsumexp. Tokens are batch x the length batches really have
  (`batch_length`): the collator pads a batch to its longest row, not to max_length, so the peak batch is
  as long as the longest row (capped at max_length, rounded up to pad_to_multiple_of); packing fills every
  row to max_length.
- LM head + loss: TRL's SFT, DPO, KTO and GRPO trainers patch the model with `add_fused_lm_head` and never
  hold batch x seq x vocab logits (`_fused_head_bytes`). Elsewhere (seq_cls, ORPO, a TRL without it) the
  loss upcasts the logits to fp32 and log_softmax's backward holds its fp32 output and the fp32 gradient in
  and out: 12 bytes per logit at the peak.
- DPO and ORPO run each batch's chosen and rejected replies as one batch of twice the rows. The reference
  pass (DPO, KTO's KL rows) runs without gradients before the policy's: it keeps nothing to the peak.
- GRPO samples a whole generation batch (per_device_train_batch_size x steps_per_generation rows) with
  transformers' generate before the step, gradients already freed: the KV cache of every row at full length,
  plus fp32 logits, probabilities and the processors' copy of one position. The peak is the larger phase.
ZeRO-2 shards grads and optimizer state over the processes, ZeRO-3/FSDP2 the weights too. `total`
compares with torch.cuda.max_memory_allocated; `verdict` adds the CUDA context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from lora_ns.builtin_models import resolve_model_path
from lora_ns.config import SFT_TASKS, Recipe
from lora_ns.errors import UserError, first_line
from lora_ns.model import gradient_checkpointing, packs, selective_checkpointing, torch_dtype

GiB = 2**30
CUDA_CONTEXT = int(0.5 * GiB)  # CUDA/cuBLAS context: outside max_memory_allocated, still on the card
STRATEGIES = (None, "ddp", "zero2", "zero3", "fsdp2")
FUSED_HEAD_TASKS = (*SFT_TASKS, "dpo", "kto", "grpo")  # their TRL trainer scores tokens with lm_head.weight
PAIRED_TASKS = ("dpo", "orpo")  # chosen + rejected: 2 x per_device_train_batch_size rows per forward
SFT_DEFAULT_MAX_LENGTH = 1024  # SFTConfig.max_length's default, when the recipe sets none
GRPO_DEFAULT_COMPLETION, GRPO_PROMPT_GUESS = 512, 512  # GRPOConfig's default; prompts when none are sampled
TILE_TOKENS, TILE_VOCAB = 4096, 32768  # trl.kernels.chunked_logprob's TOKEN_CHUNK_SIZE, TRL's chunk size
# Per tile element, the torch fallback's `_backward_tile` (no Triton: CPU) at its peak: y, z, log_p, p, grad,
# and two unnamed fp32 temporaries (is_target.float() and its difference with p, or that and its product
# with grad_logprobs): 7 x 4 bytes, + the bool is_target
FALLBACK_TILE_BYTES = 7 * 4 + 1


def trl_fused_head() -> bool:
    """Whether the installed TRL's SFTTrainer uses the fused LM head (trl >= 1.16)."""
    import trl.trainer.utils

    return hasattr(trl.trainer.utils, "add_fused_lm_head")


def _fused_head_bytes(shape: Shape, tokens: int, c: int, full: bool, triton: bool) -> int:
    """Peak of `trl.kernels.chunked_logprob.ChunkedLogProbFunction`, in its backward, on top of activations.

    Saved from forward: a copy of the final hidden states (the shifted slice; label positions only on
    Triton devices and, in lora_ns, the CPU; counted for every token, an upper bound), targets
    (int64), log Z and entropy (fp32): 2 x 4 + 8 bytes/token. Backward adds the fp32 hidden-state gradient
    and its cast back to the compute dtype, one [4096, 32768] tile in the compute dtype (+ the torch
    fallback's fp32 temporaries without Triton), and a trainable head's fp32 weight gradient (its cast to
    the weight dtype is `gradients`)."""
    h, cast = shape.hidden, c if c != 4 else 0  # .to(fp32) of an fp32 tensor is no copy
    per_token = h * c + h * 4 + h * cast + 16
    per_element = c + (0 if triton else FALLBACK_TILE_BYTES)
    tile = min(tokens, TILE_TOKENS) * min(shape.vocab, TILE_VOCAB) * per_element
    head_grad = shape.vocab * h * 4 if full and c != 4 else 0
    return tokens * per_token + tile + head_grad


@dataclass(frozen=True)
class Shape:
    """What the estimate needs from a transformers config (decoder-only LM, or an encoder for seq_cls)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int  # the config's own (Qwen3, Gemma: wider than hidden / heads), else hidden / heads
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
    generation: int = 0  # GRPO's sampling phase (KV cache), before the step's gradients exist
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        held = self.weights + self.trainable + self.optimizer  # the whole run
        return held + max(self.gradients + self.activations + self.logits, self.generation)

    def lines(self) -> list[str]:
        s = self.settings
        seq_from = f" ({s['seq_from']})" if s["seq_from"] else ""
        batch = f"{s['batch']} pairs" if s["task"] in PAIRED_TASKS else s["batch"]
        head = (f"per-GPU memory estimate ({s['strategy'] or 'ddp'} over {s['num_processes']}; batch "
                f"{batch} x {s['seq']} tokens{seq_from}, {s['quant'] or s['weights_dtype']} weights, "
                f"gradient checkpointing {'on' if s['checkpointing'] else 'off'})")
        logits = "LM head + loss (TRL fused, tiled)" if s["fused_head"] else "logits + loss (fp32)"
        rows = [("weights", self.weights), (f"trainable ({self.trainable_params:,} params)", self.trainable),
                ("gradients", self.gradients), (f"optimizer ({s.get('optim')})", self.optimizer),
                ("activations", self.activations), (logits, self.logits)]
        if self.generation:  # not added to the rows above: the larger phase counts
            gathered = " + whole model" if s["strategy"] == "zero3" and s["gather_for_generation"] else ""
            rows.append((f"or sampling {s['generation_rows']} rows (KV cache{gathered})", self.generation))
        rows.append(("total", self.total))
        width = max(len(name) for name, _ in rows)
        return [head] + [f"  {name:<{width}} {nbytes / GiB:8.2f} GiB" for name, nbytes in rows]

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
        """In this order: checkpointing, smaller batch, 4-bit, ZeRO-3; `verdict` names the first that fits."""
        s, half = self.settings, max(self.settings["batch"] // 2, 1)
        options = [(not s["checkpointing"], "training.gradient_checkpointing: true", {"checkpointing": True}),
                   (s["batch"] > 1, f"per_device_train_batch_size: {half}, gradient_accumulation_steps x2",
                    {"batch": half}),
                   (s["generation_rows"] > s["batch"], "sample one batch per step (training."
                    f"steps_per_generation: 1, or generation_batch_size: {s['batch'] * s['num_processes']})",
                    {"generation_rows": s["batch"]}),
                   (s["strategy"] == "zero3" and s["generation_rows"] > 0 and s["gather_for_generation"],
                    "training.ds3_gather_for_generation: false (sample on the shards, slower)",
                    {"gather_for_generation": False}),
                   (s["quant"] is None, "quantization.load_in_4bit: true (QLoRA)", {"quant": "nf4-dq"}),
                   (s["num_processes"] > 1 and s["strategy"] not in ("zero3", "fsdp2"),
                    "ZeRO-3 (an accelerate config with deepspeed stage 3)", {"strategy": "zero3"})]
        return [(fix, estimate(**{**s, **change})) for wanted, fix, change in options if wanted]


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
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    quantizable, rows = sum(m.weight.numel() for m in linears), sum(m.out_features for m in linears)
    io = sum(m.in_features + m.out_features for m in linears)
    total, (_, (largest, _)) = sum(p.numel() for p in model.parameters()), calculate_maximum_sizes(model)
    largest //= next(model.parameters()).element_size()  # bytes in the meta model's dtype -> params
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return Shape(text.hidden_size, text.intermediate_size, text.num_hidden_layers, heads,
                 getattr(text, "num_key_value_heads", None) or heads, head_dim, text.vocab_size, quantizable,
                 rows, io, total - quantizable, largest)


def _layer_bytes(shape: Shape, c: int, lora_r: int, dropout: bool) -> float:
    """Bytes autograd saves per token in one Llama/Qwen2 decoder layer (frozen base, LoRA all-linear).

    Frozen linears save only their weight. What stays: each RMSNorm's fp32 input; q, k, v after rope, the
    attention output and fp32 logsumexp (sdpa); silu's input and both operands of gate*up; per LoRA module
    its input (a dropout copy + bool mask when lora_dropout > 0, else shared) and its r-wide A output."""
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim  # query and key/value widths
    norms, attention, mlp = 2 * h * 4, (2 * q + 2 * kv) * c + shape.heads * 4, 3 * i * c
    lora_inputs = (5 * h + q + i) * (c + 1) if dropout else 0  # q,k,v,gate,up see h, o sees q, down sees i
    return norms + attention + mlp + lora_inputs + 7 * lora_r * c


def estimate(*, shape: Shape, batch: int, seq: int, weights_dtype: str = "bf16", quant: str | None = None,
             method: str = "lora", lora_r: int = 16, lora_dropout: bool = True, optim: str = "adamw_torch",
             checkpointing: bool = False, selective: bool = False, strategy: str | None = None,
             num_processes: int = 1, task: str = "causal_lm", num_labels: int = 2, seq_from: str = "",
             fused_head: bool | None = None, triton: bool = True, generation_rows: int = 0,
             gather_for_generation: bool = True) -> MemoryEstimate:
    """The breakdown for one shape and one set of training settings (all sizes in bytes, per GPU).
    `seq`: tokens per row of the longest batch (`batch_length`); `seq_from`: where that figure came from.
    `fused_head`: TRL's fused LM head (default: FUSED_HEAD_TASKS when TRL has it); `triton`: its GPU kernels.
    `batch` counts examples: a DPO/ORPO pair is two rows. `generation_rows`: GRPO's rows sampled at once;
    `gather_for_generation`: its ds3_gather_for_generation (ZeRO-3 gathers the whole model to sample)."""
    if fused_head is None:
        fused_head = task in FUSED_HEAD_TASKS and trl_fused_head()
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
    settings, c, q = dict(locals()), torch_dtype(weights_dtype).itemsize, shape.quantizable
    kbit_prep = quant is not None and strategy not in ("zero3", "fsdp2")
    packed = {None: q * c, "nf4": q / 2 + q / 64 * 4, "nf4-dq": q / 2 + q / 64 + q / 64 / 256 * 4,
              "int8": q + shape.linear_out_rows * 4}[quant]
    weights = packed + shape.other * (4 if kbit_prep else c)
    full = method == "full"  # then grads and both AdamW moments are in the load dtype
    # LoRA: A (r x in) + B (out x r) on every linear, fp32
    params, per_param = (q + shape.other, c) if full else (lora_r * shape.linear_io, 4)
    trainable = 0 if full else params * 4
    states = 0 if "sgd" in optim or "adafactor" in optim else (2 if "8bit" in optim else 2 * per_param)
    states //= 2 if "lion" in optim else 1  # one moment
    shard = max(num_processes, 1) if strategy in ("zero2", "zero3", "fsdp2") else 1
    grads, opt = params * per_param / shard, params * states / shard
    whole = weights
    if strategy in ("zero3", "fsdp2"):  # plus the one layer gathered at a time
        weights, trainable = weights / num_processes + shape.largest_layer * c, trainable / num_processes
    tokens = batch * seq * (2 if task in PAIRED_TASKS else 1)
    head = _fused_head_bytes(shape, tokens, c, full, triton) if fused_head else (
        tokens * shape.vocab * 12 if task != "seq_cls" else batch * num_labels * 12)
    per_layer = _layer_bytes(shape, c, 0 if full else lora_r, lora_dropout and not full)
    if full:
        per_layer += (7 * shape.hidden + shape.intermediate) * c  # frozen-linear inputs now saved too
    # checkpointing: each layer's input (selective: and its attention output + fp32 logsumexp); the
    # recomputed layer lives after the loss buffers are freed
    kept = shape.hidden * c + (shape.heads * (shape.head_dim * c + 4) if selective else 0)
    saved = kept if checkpointing else per_layer
    recompute = max(0, per_layer - (head / tokens if task != "seq_cls" else 0)) if checkpointing else 0
    acts = tokens * (shape.layers * saved + recompute + shape.hidden * 4)  # + the final norm's fp32 input
    kv_width = shape.kv_heads * shape.head_dim  # keys and values per layer per token
    generation = generation_rows * (seq * shape.layers * 2 * kv_width * c + shape.vocab * 12)
    if generation and strategy == "zero3" and gather_for_generation:  # FSDP2 samples on its shards
        generation += max(whole - weights, 0)
    return MemoryEstimate(weights=int(weights), trainable_params=int(params), trainable=int(trainable),
                          gradients=int(grads), optimizer=int(opt), activations=int(acts), logits=int(head),
                          generation=int(generation), settings=settings)


def batch_length(recipe: Recipe, row_lengths: Sequence[int] = ()) -> tuple[int, str]:
    """Tokens per row of the longest batch (see the module docstring), and where that figure comes from."""
    t = recipe.training
    if recipe.task == "grpo":  # `row_lengths`: prompts; each grows by up to max_completion_length tokens
        completion = int(t.get("max_completion_length") or GRPO_DEFAULT_COMPLETION)
        budget = f"max_completion_length {completion}"
        if not row_lengths:
            guess = GRPO_PROMPT_GUESS
            return guess + completion, f"{budget} + {guess} prompt tokens: no data sample"
        return max(row_lengths) + completion, f"the longest of {len(row_lengths)} sampled prompts + {budget}"
    limit = int(t.get("max_length") or SFT_DEFAULT_MAX_LENGTH)
    if (packed := packs(recipe)) or not row_lengths:
        return limit, "packed to max_length" if packed else "max_length: no data sample"
    capped = ", capped at max_length" if max(row_lengths) > limit else ""
    multiple = int(t.get("pad_to_multiple_of") or 1)
    seq = math.ceil(min(max(row_lengths), limit) / multiple) * multiple
    return seq, f"the longest of {len(row_lengths)} sampled rows{capped}"


def estimate_for_recipe(recipe: Recipe, num_processes: int = 1, strategy: str | None = None,
                        row_lengths: Sequence[int] = ()) -> MemoryEstimate:
    """The estimate for a Recipe, with lora_ns's defaults (checkpointing, dtype "auto" = bf16); `row_lengths`:
    tokens per row of a data sample, as training tokenizes them."""
    from transformers import AutoConfig

    m, t, qz = recipe.model, recipe.training, recipe.quantization
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(m.name_or_path), revision=m.revision,
                                            trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as err:
        reason = first_line(err)
        raise UserError(recipe.problem("model.name_or_path", f"cannot read the model config: {reason}",
                                       "point it at a local folder or a reachable hub id"))
    quant = ("nf4-dq" if qz.bnb_4bit_use_double_quant else "nf4") if qz.load_in_4bit else None
    quant = "int8" if qz.load_in_8bit else quant
    options, method = recipe.peft.options, recipe.peft.method
    seq, seq_from = batch_length(recipe, row_lengths)
    batch = int(t.get("per_device_train_batch_size", 8))
    return estimate(
        shape=shape_from_config(config), batch=batch, seq=seq,
        seq_from=seq_from, weights_dtype="bf16" if m.dtype == "auto" else m.dtype, quant=quant,
        method="full" if method == "full" else "lora", lora_r=int(options.get("r", 8)),
        lora_dropout=float(options.get("lora_dropout", 0.0)) > 0, optim=str(t.get("optim", "adamw_torch")),
        checkpointing=gradient_checkpointing(recipe), strategy=strategy, num_processes=num_processes,
        selective=selective_checkpointing(recipe),
        task=recipe.task, num_labels=m.num_labels or 2,
        generation_rows=generation_rows(recipe, batch, num_processes) if recipe.task == "grpo" else 0,
        gather_for_generation=bool(t.get("ds3_gather_for_generation", True)))


def generation_rows(recipe: Recipe, batch: int, num_processes: int) -> int:
    """Rows one process samples at once, as GRPOConfig derives them: generation_batch_size over the processes,
    else per_device_train_batch_size x steps_per_generation (default: gradient_accumulation_steps)."""
    t = recipe.training
    if t.get("generation_batch_size"):
        return max(int(t["generation_batch_size"]) // max(num_processes, 1), 1)
    return batch * int(t.get("steps_per_generation") or t.get("gradient_accumulation_steps") or 1)


