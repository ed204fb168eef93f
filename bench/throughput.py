"""Benchmark: lora_ns training vs a plain hand-written TRL SFT script on the same model and data.

    python bench/throughput.py --threads 1                  # builtin:tiny-llama on CPU, 3 rounds (~12 min here)
    python bench/throughput.py --model builtin:smollm2-135m --steps 5 --batch-size 4 --max-length 256 \
        --max-tokens 256 --rounds 1 --threads 1 --variants trl,lora_ns,lora_ns+pack
    python bench/throughput.py --device cuda --model Qwen/Qwen2.5-0.5B --peak-tflops 989   # GPU (untested here)

Not a test. Every run is a fresh subprocess (timed from just before it starts), in rounds that
rotate the order of the variants, so drift on a shared machine hits all of them alike:

- ``trl``: `plain_trl_sft` below, what a user writes by hand: SFTTrainer + peft LoraConfig, TRL's
  SFTConfig defaults (no packing, padding to the longest in the batch, gradient checkpointing on).
  ``trl-gc``: the same script with gradient checkpointing off (lora_ns's default when not quantized),
  the like-for-like baseline of ``lora_ns`` as a user gets it.
- ``lora_ns``: ``python -m lora_ns.train`` on an equivalent recipe, *as lora_ns configures it by default*.
- ``lora_ns+pack`` / ``lora_ns-pack``: the same with ``training.packing`` forced on (TRL "bfd", which
  is padding-free) / off, to show how much packing is worth; ``lora_ns+gc``: gradient checkpointing
  forced on (TRL's default), to show how much that default is worth.

Same model, same variable-length data (prompt/completion rows of 16..512 tokens, rendered with the
chat template on both sides), same LoRA settings, same batch size, accumulation and steps. Both
sides log every step (``logging_steps: 1``) so TRL's own non-pad token counter (``num_tokens``,
the attention-mask sum, or every token when padding-free) is read per step; neither writes
TensorBoard logs (``report_to: none``; lora_ns's own default is tensorboard when it is installed).

Figures: non-pad tokens/s and steps/s between the end of step 1 and the last step (the first step
is warm-up); startup, from process start to the start of training (imports, checks, model loading,
tokenizing; the target is lora_ns within 1 s of the plain script); time to the end of step 1; peak
RSS; on CUDA also torch.cuda.max_memory_allocated and an MFU estimate
6 * params * tokens/s / (peak TFLOPS) (the 6N convention; LoRA skips the frozen weights' gradient,
and checkpointing recomputes the forward, so it is an estimate). Packed rows hold more tokens per
step, so compare tokens/s, not steps/s, across packing. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Variants: "trl" (the plain script), "trl-gc" (the same without gradient checkpointing) or "lora_ns" and any
# of these changes, e.g. "lora_ns+group+eager".
# A key with a dot is a recipe key; without, a key of the recipe's training section.
CHANGES: dict[str, dict[str, Any]] = {
    "+pack": {"packing": True, "packing_strategy": "bfd"},  # bfd packing, padding-free
    "-pack": {"packing": False},
    "+pf": {"padding_free": True, "packing": False, "max_length": None},  # padding-free (TRL: no max_length)
    "-pf": {"padding_free": False, "packing": False},
    "+group": {"train_sampling_strategy": "group_by_length"},  # batches of similar lengths (less padding)
    "-group": {"train_sampling_strategy": "random"},
    "+gc": {"gradient_checkpointing": True},
    "-gc": {"gradient_checkpointing": False},
    "+eager": {"model.attn_implementation": "eager"},
    # TRL's selective checkpointing: the attention output is saved, not recomputed (with +gc)
    "+sac": {"gradient_checkpointing_kwargs": {"selective": True}},
    "+liger": {"use_liger_kernel": True},  # Liger's Triton kernels (norms, SwiGLU, RoPE): CUDA only
}
# The plain TRL script's variants: SFTConfig arguments changed from TRL's defaults.
TRL_VARIANTS: dict[str, dict[str, Any]] = {"trl": {}, "trl-gc": {"gradient_checkpointing": False}}
DEFAULT_VARIANTS = ["trl", "lora_ns", "lora_ns+pack", "lora_ns-pack", "lora_ns+gc"]


def variant_changes(name: str) -> dict[str, Any] | None:
    """The recipe overrides of a variant ("lora_ns+group+eager"), None for the plain TRL script; ValueError if
    unknown."""
    if name in TRL_VARIANTS:
        return None
    parts = re.findall(r"[+-][a-z]+", name.removeprefix("lora_ns"))
    if not name.startswith("lora_ns") or "".join(parts) != name.removeprefix("lora_ns") \
            or any(p not in CHANGES for p in parts):
        raise ValueError(f"unknown variant {name!r}: use trl, trl-gc, or lora_ns and any of {' '.join(CHANGES)}")
    return {k: v for part in parts for k, v in CHANGES[part].items()}


def variant_overrides(name: str) -> list[str]:
    """`variant_changes` as ``python -m lora_ns.train`` overrides (``training.`` for a key without a section)."""
    changes = variant_changes(name) or {}
    return [f"{k if '.' in k else 'training.' + k}={json.dumps(v)}" for k, v in changes.items()]


LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}
# Dense bf16 peak TFLOPS by GPU name, for --peak-tflops auto.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0,
               "4090": 165.0, "3090": 71.0}

# Runs in each subprocess: a TrainerCallback records step times and TRL's token count, then the
# command runs as it would from a shell (lora_ns: python -m lora_ns.train; trl: plain_trl_sft).
_DRIVER = r"""
import json, os, resource, runpy, sys, time
from transformers import Trainer, TrainerCallback

result = {"steps": [], "tokens": {}, "positions": {}}
positions = [0]  # token positions fed to the model, pads included (input_ids.numel() of every micro-batch)

class Probe(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        result["train_begin"] = time.time()
        result["params"] = sum(p.numel() for p in model.parameters()) if model is not None else None
        result["args"] = {k: getattr(args, k, None) for k in ("packing", "packing_strategy", "padding_free",
                          "train_sampling_strategy",
                          "gradient_checkpointing", "per_device_train_batch_size", "gradient_accumulation_steps",
                          "bf16", "max_length", "use_cpu")}
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 2 and os.environ.get("BENCH_TORCH_PROFILE"):  # steps 3 and 4, kernels timed
            import torch
            kinds = [torch.profiler.ProfilerActivity.CPU]
            kinds += [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []
            result["torch_profiler"] = torch.profiler.profile(activities=kinds)
            result["torch_profiler"].__enter__()
            result["torch_profile_start"] = time.time()
    def on_step_end(self, args, state, control, **kwargs):
        result["steps"].append((time.time(), state.global_step, time.process_time()))
        result["positions"][state.global_step] = positions[0]
        if state.global_step == 4 and "torch_profiler" in result:
            import torch
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.time() - result.pop("torch_profile_start")
            prof = result.pop("torch_profiler")
            prof.__exit__(None, None, None)
            table = prof.key_averages()
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            with open(os.environ["BENCH_TORCH_PROFILE"], "w") as f:
                f.write(f"steps 3-4: {wall:.3f} s wall\n")
                f.write(table.table(sort_by=sort, row_limit=40, max_name_column_width=60) + "\n")
                f.write(table.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
        if state.global_step == 1 and os.environ.get("BENCH_PROFILE"):  # profile the timed steps (2..last)
            import cProfile
            result["profiler"] = cProfile.Profile()
            result["profiler"].enable()
        elif state.global_step == state.max_steps and "profiler" in result:
            result.pop("profiler").dump_stats(os.environ["BENCH_PROFILE"])
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "num_tokens" in logs:
            result["tokens"][state.global_step] = logs["num_tokens"]
    def on_train_end(self, args, state, control, **kwargs):
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        import torch
        if torch.cuda.is_available():
            result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        with open(os.environ["BENCH_RESULT"], "w") as f:
            json.dump(result, f)

_init = Trainer.__init__
def _init_with_probe(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.add_callback(Probe())
Trainer.__init__ = _init_with_probe
_training_step = Trainer.training_step
def _counting_training_step(self, model, inputs, *args, **kwargs):
    positions[0] += inputs["input_ids"].numel()
    return _training_step(self, model, inputs, *args, **kwargs)
Trainer.training_step = _counting_training_step

kind, payload = sys.argv[1], sys.argv[2]
if kind in ("trl", "trl-gc"):
    runpy.run_path(os.environ["BENCH_SCRIPT"])["plain_trl_sft"](json.loads(payload))
else:
    sys.argv = ["lora_ns.train", *json.loads(payload)]
    try:
        runpy.run_module("lora_ns.train", run_name="__main__")
    except SystemExit as exc:
        if exc.code:
            raise
"""


def plain_trl_sft(cfg: dict[str, Any]) -> None:
    """The baseline: a plain TRL SFT script with TRL's defaults, as a user would write it."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    cuda = cfg["device"] == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(cfg["model_path"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model_path"], dtype="bfloat16" if cuda else "float32")
    data = load_dataset("json", data_files=cfg["data"], split="train")
    data = data.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}],
                                 "completion": [{"role": "assistant", "content": row["completion"]}]},
                    remove_columns=data.column_names)
    args = SFTConfig(output_dir=cfg["output_dir"], max_steps=cfg["steps"], per_device_train_batch_size=cfg["batch"],
                     gradient_accumulation_steps=cfg["grad_accum"], learning_rate=2e-4, max_length=cfg["max_length"],
                     logging_steps=1, save_strategy="no", report_to="none", seed=0, bf16=cuda, use_cpu=not cuda,
                     **cfg.get("trl_args", {}))
    peft_config = LoraConfig(task_type="CAUSAL_LM", **LORA)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config)
    trainer.train()


# --- data and recipe ---------------------------------------------------------------------------

def word_pool(tokenizer) -> list[tuple[str, int]]:
    """Words from the bundled samples with their token count (as a following word, after a space)."""
    words: set[str] = set()
    for path in sorted((REPO / "lora_ns" / "samples").glob("*")):
        words.update(path.read_text(encoding="utf-8", errors="ignore").split())
    chosen = sorted(w for w in words if len(w) < 20)[:4000]
    return [(w, len(tokenizer(" " + w, add_special_tokens=False)["input_ids"])) for w in chosen]


def make_text(rng: random.Random, pool: list[tuple[str, int]], tokens: int) -> str:
    out, count = [], 0
    while count < tokens:
        word, n = rng.choice(pool)
        out.append(word)
        count += n
    return " ".join(out)


def write_data(path: Path, tokenizer, rows: int, low: int, high: int, seed: int = 0) -> list[int]:
    """prompt/completion rows whose total length is uniform in [low, high] tokens (a quarter prompt)."""
    rng, pool = random.Random(seed), word_pool(tokenizer)
    lengths = []
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            total = rng.randint(low, high)
            prompt = max(4, total // 4)
            lengths.append(total)
            row = {"prompt": make_text(rng, pool, prompt), "completion": make_text(rng, pool, total - prompt)}
            f.write(json.dumps(row) + "\n")
    return lengths


def write_sample_data(path: Path, tokenizer, sample: str, rows: int, seed: int = 0) -> list[int]:
    """Real-schema rows: a bundled sample (``lora_ns/samples``) through its lora_ns formatter, as
    prompt/completion rows, repeated in shuffled passes until there are `rows` of them."""
    from lora_ns.config import parse_recipe
    from lora_ns.data import formatted_examples

    recipe = parse_recipe({"model": {"name_or_path": "builtin:tiny-llama"},
                           "dataset": {"path": f"sample:{sample}", "formatter": sample}})
    examples = [{"prompt": e["prompt"], "completion": e["completion"]} for e in formatted_examples(recipe)]
    rng, out = random.Random(seed), []
    while len(out) < rows:
        out += rng.sample(examples, len(examples))
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in out[:rows])
    return [len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) for r in out[:rows]]


def trainable_copy(model_path: str, work: Path) -> str:
    """`model_path`, or a copy without a leftover GGUF ``quantization_config`` (Trainer refuses to train those).

    builtin:smollm2-135m is converted from a GGUF file into plain safetensors, but its config.json
    still names the GGUF quantization, so transformers' Trainer refuses to train it.
    """
    config_file = Path(model_path) / "config.json"
    if not config_file.is_file():
        return model_path
    config = json.loads(config_file.read_text())
    if (config.get("quantization_config") or {}).get("quant_method") != "gguf":
        return model_path
    import shutil

    copy = work / "model"
    shutil.copytree(model_path, copy)
    del config["quantization_config"]
    (copy / "config.json").write_text(json.dumps(config, indent=2))
    return str(copy)


def resized_copy(model_path: str, work: Path, size: str) -> str:
    """A random-init copy of a causal LM with ``HIDDEN,LAYERS`` (heads of 64, 2 query heads per KV head,
    intermediate 8/3 hidden rounded to 64), same tokenizer: a model where compute, not Python, dominates."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hidden, layers = (int(x) for x in size.split(","))
    copy = work / f"model-{hidden}x{layers}"
    shutil.copytree(model_path, copy, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    config = AutoConfig.from_pretrained(copy)
    heads = max(1, hidden // 64)
    config.update({"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                   "head_dim": 64, "num_key_value_heads": max(1, heads // 2),
                   "intermediate_size": (8 * hidden // 3 + 63) // 64 * 64})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(copy)
    return str(copy)


def write_recipe(path: Path, model: str, data: Path, args: argparse.Namespace) -> None:
    import yaml

    recipe = {
        "task": "causal_lm",
        "model": {"name_or_path": model, "dtype": "bf16" if args.device == "cuda" else "fp32"},
        "peft": {"method": "lora", **LORA},
        "dataset": {"path": str(data), "formatter": "prompt_completion"},
        "training": {"max_steps": args.steps, "per_device_train_batch_size": args.batch_size,
                     "gradient_accumulation_steps": args.grad_accum, "learning_rate": 2e-4,
                     "max_length": args.max_length, "logging_steps": 1, "seed": 0, "report_to": "none"},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")


# --- running and measuring ---------------------------------------------------------------------

def run_variant(name: str, work: Path, index: int, cfg: dict[str, Any], recipe: Path,
                device: str, threads: int | None, profile: bool = False) -> dict[str, Any]:
    """One fresh subprocess; returns the probe's record plus the start time, or an error."""
    run_dir = work / f"run{index:02d}-{name}"
    run_dir.mkdir()
    env = {**os.environ, "BENCH_RESULT": str(run_dir / "result.json"), "BENCH_SCRIPT": str(Path(__file__).resolve()),
           "HF_DATASETS_CACHE": str(run_dir / "hf_datasets"),  # cold cache for every run: no one reuses another's map
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if profile:
        env["BENCH_PROFILE"] = str(run_dir / "profile.pstats")
    if name in TRL_VARIANTS:
        payload = json.dumps({**cfg, "output_dir": str(run_dir / "out"), "trl_args": TRL_VARIANTS[name]})
    else:
        output = f"training.output_dir={run_dir / 'out'}"
        payload = json.dumps([str(recipe), output, *variant_overrides(name)])
    with open(run_dir / "log.txt", "w") as log:
        started = time.time()
        proc = subprocess.run([sys.executable, "-c", _DRIVER, name if name in TRL_VARIANTS else "lora_ns", payload],
                              cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
        ended = time.time()
    result_file = run_dir / "result.json"
    if proc.returncode or not result_file.is_file():
        tail = (run_dir / "log.txt").read_text(errors="replace").strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return {**json.loads(result_file.read_text()), "started": started, "wall_s": ended - started}


def figures(record: dict[str, Any], peak_tflops: float | None) -> dict[str, Any]:
    """tokens/s and steps/s after step 1, time to step 1, memory, MFU."""
    steps = record["steps"]
    tokens = {int(k): v for k, v in record["tokens"].items()}
    (t1, s1, c1), (tn, sn, cn) = steps[0], steps[-1]
    span, cpu = tn - t1, cn - c1
    out = {"startup_s": record["train_begin"] - record["started"], "first_step_s": t1 - record["started"], "steps": sn,
           "steps_per_s": (sn - s1) / span if span > 0 else None,
           "tokens_per_s": (tokens[sn] - tokens[s1]) / span if span > 0 and s1 in tokens and sn in tokens else None,
           "tokens_per_cpu_s": (tokens[sn] - tokens[s1]) / cpu if cpu > 0 and s1 in tokens and sn in tokens
           else None,
           "peak_rss_mb": record.get("peak_rss_mb"), "params": record.get("params"), "args": record.get("args")}
    positions = {int(k): v for k, v in record.get("positions", {}).items()}
    if positions.get(sn, 0) > positions.get(s1, 0) and s1 in tokens and sn in tokens:
        # share of the timed steps' token positions that were padding (0 when padding-free or packed)
        out["pad_share"] = 1 - (tokens[sn] - tokens[s1]) / (positions[sn] - positions[s1])
    if "cuda_max_allocated_mb" in record:
        out["cuda_max_allocated_mb"] = record["cuda_max_allocated_mb"]
        if peak_tflops and out["tokens_per_s"] and out["params"]:
            out["mfu"] = 6 * out["params"] * out["tokens_per_s"] / (peak_tflops * 1e12)
    return out


def median_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"] if runs else "not run"}
    merged: dict[str, Any] = {"runs": len(ok), "args": ok[0].get("args"), "profile": ok[0].get("profile")}
    for key in ("tokens_per_s", "tokens_per_cpu_s", "steps_per_s", "startup_s", "first_step_s", "peak_rss_mb",
                "cuda_max_allocated_mb", "mfu", "pad_share"):
        values = [r[key] for r in ok if r.get(key) is not None]
        if values:
            merged[key] = statistics.median(values)
    return merged


def auto_peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name()
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)


# --- report ------------------------------------------------------------------------------------

# Where the timed steps go, by cProfile's cumulative time (parts overlap: forward includes the loss head).
PROFILE_PARTS = {"dataloader + collator": ("get_batch_samples",), "forward + loss": ("compute_loss",),
                 "backward": ("backward",), "optimizer + scheduler": ("step",), "log": ("log",),
                 "callbacks": ("call_event",), "fused LM head": ("_fused_forward",),
                 "checkpointing": ("checkpoint",)}


def profile_shares(pstats_file: Path) -> dict[str, float]:
    """Share of the profiled steps' time spent under each of `PROFILE_PARTS` (cumulative, not exclusive)."""
    import pstats

    stats = pstats.Stats(str(pstats_file)).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    total = sum(tt for _, _, tt, _, _ in stats.values())
    shares = {}
    for part, names in PROFILE_PARTS.items():
        # the outermost call of each name: the largest cumulative time (recursion is counted once by cProfile)
        times = [ct for (_, _, fn), (_, _, _, ct, _) in stats.items() if fn in names]
        shares[part] = round(max(times, default=0.0) / total, 3) if total else 0.0
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:8]
    shares["top_self"] = [(f"{Path(f).name}:{fn}", round(v[2] / total, 3)) for (f, _, fn), v in top]
    return shares

def per_round(runs: dict[str, list[dict[str, Any]]], a: str, b: str, key: str, ratio: bool) -> list[float]:
    """a/b (or a-b) for `key` in each round."""
    pairs = zip(runs.get(a, []), runs.get(b, []))
    return [round(x[key] / y[key] if ratio else x[key] - y[key], 3) for x, y in pairs
            if x.get(key) and y.get(key)]


def paired(runs: dict[str, list[dict[str, Any]]], a: str, b: str, key: str, ratio: bool) -> float | None:
    """Median over rounds of a/b (or a-b) for `key`: runs of one round are next to each other in time,
    so this cancels most of the drift of a shared machine that a ratio of medians would keep."""
    values = per_round(runs, a, b, key, ratio)
    return round(statistics.median(values), 3) if values else None


def ratios(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in runs:
        for base in (b for b in TRL_VARIANTS if b in runs and b != name):  # each plain TRL baseline run
            if name in TRL_VARIANTS and base != "trl":
                continue  # trl-gc / trl is the checkpointing-off gain; its inverse says nothing more
            out[f"{name}_vs_{base}_tokens_per_s"] = paired(runs, name, base, "tokens_per_s", ratio=True)
            out[f"{name}_vs_{base}_tokens_per_cpu_s"] = paired(runs, name, base, "tokens_per_cpu_s", ratio=True)
            out[f"{name}_vs_{base}_per_round"] = per_round(runs, name, base, "tokens_per_s", ratio=True)
            out[f"{name}_vs_{base}_cpu_per_round"] = per_round(runs, name, base, "tokens_per_cpu_s", ratio=True)
            out[f"{name}_minus_{base}_startup_s"] = paired(runs, name, base, "startup_s", ratio=False)
    if "lora_ns+pack" in runs and "lora_ns-pack" in runs:
        out["packing_on_vs_off_tokens_per_s"] = paired(runs, "lora_ns+pack", "lora_ns-pack", "tokens_per_s", ratio=True)
    return out


def print_table(results: dict[str, dict[str, Any]], compared: dict[str, Any], gpu: bool) -> None:
    """Medians per variant; "x trl" and "+startup" are the paired per-round figures of `ratios`."""
    cols = ["variant", "tok/s", "x trl", "tok/cpu-s", "x trl cpu", "steps/s", "startup s", "+startup",
            "1st step s", "peak RSS MB", "pad %", "packing", "grad ckpt"]
    if gpu:
        cols += ["CUDA max MB", "MFU"]
    print(" | ".join(f"{c:>11}" for c in cols))
    for name, r in results.items():
        if "error" in r:
            print(f"{name:>11} | failed: {r['error']}")
            continue
        args = r.get("args") or {}
        speed, startup = compared.get(f"{name}_vs_trl_tokens_per_s"), compared.get(f"{name}_minus_trl_startup_s")
        cpu = compared.get(f"{name}_vs_trl_tokens_per_cpu_s")
        cells = [name, f"{r.get('tokens_per_s', 0):.0f}", f"{speed:.2f}" if speed else "-",
                 f"{r.get('tokens_per_cpu_s', 0):.0f}", f"{cpu:.2f}" if cpu else "-",
                 f"{r.get('steps_per_s', 0):.2f}", f"{r.get('startup_s', 0):.2f}",
                 f"{startup:+.2f}" if startup is not None else "-", f"{r.get('first_step_s', 0):.2f}",
                 f"{r.get('peak_rss_mb', 0):.0f}", f"{r['pad_share']:.0%}" if "pad_share" in r else "-",
                 str(args.get("packing")), str(args.get("gradient_checkpointing"))]
        if gpu:
            cells += [f"{r.get('cuda_max_allocated_mb', 0):.0f}", f"{r['mfu']:.1%}" if "mfu" in r else "-"]
        print(" | ".join(f"{c:>11}" for c in cells))


# --- command line ------------------------------------------------------------------------------

def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python bench/throughput.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:tiny-llama", help="builtin:<name>, a folder or a hub id")
    parser.add_argument("--size", metavar="HIDDEN,LAYERS", help="train a random-init resized copy of --model "
                        "instead (e.g. 512,4: compute-bound on a CPU, unlike the 64-wide builtin models)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--data", choices=["synthetic", "gsm8k", "alpaca_zh"], default="synthetic",
                        help="synthetic rows of --min-tokens..--max-tokens, or a bundled sample's rows")
    parser.add_argument("--min-tokens", type=int, default=16, help="shortest row (prompt + completion tokens)")
    parser.add_argument("--max-tokens", type=int, default=512, help="longest row")
    parser.add_argument("--rows", type=int, help="rows in the training set (default: 256, or 3 x the rows "
                        "the steps take if more); length grouping sorts mega-batches of min(rows / (4 x batch), "
                        "50) batches, so a real data set's size (GSM8K train: 7,473) groups more closely")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant (median reported)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma list of: trl, trl-gc, lora_ns and any of {' '.join(CHANGES)}")
    parser.add_argument("--peak-tflops", type=float, help="GPU peak TFLOPS for MFU (default: by GPU name)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every run (default: torch's choice); "
                        "1 is far steadier on a CPU that other jobs share")
    parser.add_argument("--profile", action="store_true", help="cProfile the timed steps of each run, print "
                        "where the time goes (slows the runs: read shares, not tokens/s)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs of every run)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        [variant_changes(v) for v in variants]
    except ValueError as err:
        raise SystemExit(str(err))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    from transformers import AutoTokenizer

    from lora_ns.builtin_models import resolve_model_path

    work = Path(tempfile.mkdtemp(prefix="lora_ns_bench_"))
    model_path = trainable_copy(resolve_model_path(args.model), work)  # built once, before any timing
    if args.size:
        model_path = resized_copy(model_path, work, args.size)
    model_name = args.model if model_path == resolve_model_path(args.model) else model_path
    rows = args.rows or max(256, 3 * args.steps * args.batch_size * args.grad_accum)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if args.data == "synthetic":
        lengths = write_data(work / "data.jsonl", tokenizer, rows, args.min_tokens, args.max_tokens)
    else:
        lengths = write_sample_data(work / "data.jsonl", tokenizer, args.data, rows)
    write_recipe(work / "recipe.yaml", model_name, work / "data.jsonl", args)
    cfg = {"model_path": model_path, "data": str(work / "data.jsonl"), "device": args.device, "steps": args.steps,
           "batch": args.batch_size, "grad_accum": args.grad_accum, "max_length": args.max_length}
    peak = args.peak_tflops or auto_peak_tflops(args.device)
    print(f"model {args.model} (size {args.size or 'as is'}) on {args.device}; {args.data} data: {rows} rows "
          f"of "
          f"{min(lengths)}..{max(lengths)} tokens "
          f"(mean {statistics.mean(lengths):.0f}); batch {args.batch_size} x accum {args.grad_accum}, "
          f"{args.steps} steps, max_length {args.max_length}; {args.rounds} round(s); "
          f"threads {args.threads or 'auto'}; "
          f"load average {os.getloadavg()[0]:.1f}; work dir {work}")
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    index = 0
    for round_no in range(args.rounds):
        order = variants[round_no % len(variants):] + variants[:round_no % len(variants)]  # rotate
        for name in order:
            record = run_variant(name, work, index, cfg, work / "recipe.yaml", args.device, args.threads,
                                 args.profile)
            pstats_file = work / f"run{index:02d}-{name}" / "profile.pstats"
            index += 1
            runs[name].append(record if "error" in record else figures(record, peak))
            if pstats_file.is_file():
                runs[name][-1]["profile"] = profile_shares(pstats_file)
                print(f"  round {round_no + 1} {name} profile: {json.dumps(runs[name][-1]['profile'])}")
            shown = runs[name][-1]
            print(f"  round {round_no + 1} {name}: " + (shown["error"] if "error" in shown else
                  f"{shown['tokens_per_s'] or 0:.0f} tok/s, startup {shown['startup_s']:.2f} s, "
                  f"first step done {shown['first_step_s']:.2f} s"), flush=True)
    results = {name: median_figures(r) for name, r in runs.items()}
    compared = ratios(runs)
    print()
    print_table(results, compared, args.device == "cuda")
    print("x trl, +startup: medians over rounds of each round's ratio / difference to the trl run")
    for name in runs:
        for base in (b for b in TRL_VARIANTS if f"{name}_vs_{b}_per_round" in compared):  # as `ratios` chose
            print(f"  {name} / {base} per round: tokens/s {compared[f'{name}_vs_{base}_per_round']}, "
                  f"tokens/cpu-s {compared[f'{name}_vs_{base}_cpu_per_round']} (medians "
                  f"{compared[f'{name}_vs_{base}_tokens_per_s']} / {compared[f'{name}_vs_{base}_tokens_per_cpu_s']})")
    pad = results.get("trl", {}).get("pad_share")
    if pad is not None:
        print(f"trl's batches were {pad:.0%} padding: removing all of it, with every other cost the same, is worth "
              f"at most x{1 / (1 - pad):.2f} (more only from cheaper tokens: attention, checkpointing, kernels)")
    summary = {"bench": "throughput", "date": time.strftime("%Y-%m-%d"), "model": args.model,
               "size": args.size, "data": args.data, "device": args.device,
               "cpu_count": os.cpu_count(), "steps": args.steps, "batch_size": args.batch_size,
               "grad_accum": args.grad_accum, "max_length": args.max_length, "rounds": args.rounds,
               "row_tokens": [args.min_tokens, args.max_tokens], "peak_tflops": peak, "threads": args.threads,
               "load_average": round(os.getloadavg()[0], 1),
               "results": results, "ratios": compared,
               "targets": {"lora_ns_vs_trl_tokens_per_s": ">= 1.5", "lora_ns_minus_trl_startup_s": "<= 1.0"}}
    print(json.dumps(summary))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
