"""``python -m lora_ns.merge --adapter OUT_DIR --output MERGED_DIR``: fold an adapter into its base model.

peft's ``merge_and_unload`` adds the deltas to the base that `inference.load` gives to merge: in fp32, or,
for a QLoRA adapter (unless ``--no-requantize``), the 4-bit weights training saw, dequantized. The result
is saved (safetensors, tokenizer, recipe.yaml) in the base checkpoint's dtype, or ``--dtype``. The largest
logit difference between merged and base+adapter on a few probe prompts is printed and kept in
merge_info.json. The folder is filled under a temporary name and renamed: a crash leaves nothing."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from lora_ns.adapters import merge_blocker
from lora_ns.checkpoints import (ADAPTER_CONFIG, RECIPE_FILE, is_adapter_dir, read_adapter_config,
                                 saved_recipe_file)
from lora_ns.command_line import CommandParser
from lora_ns.config import TORCH_DTYPES, load_recipe
from lora_ns.errors import fail, run_cli
from lora_ns.fileio import atomic_folder, unwritable, write_json_atomic
from lora_ns.inference import MERGE_INFO, load
from lora_ns.model import torch_dtype

PROG = "lora_ns.merge"
PROBE_PROMPTS = ["The quick brown fox jumps over the lazy dog.", "请用中文回答这个问题。",
                 "Question: Ben has 33 stickers and gives away 27. How many are left? Answer:"]
MERGEABLE = {"LORA", "ADALORA", "IA3", "LOHA", "LOKR", "OFT", "BOFT"}
DTYPE_NAMES = {torch_name: name for name, torch_name in TORCH_DTYPES.items()}  # bfloat16 -> bf16
# Flag names of the scripts lora_ns descends from (snake_case spellings are accepted anyway).
LEGACY_FLAGS = {"--adapter_path": "--adapter", "--output_path": "--output", "--base_model": "--base",
                "--config": "--recipe"}


def make_parser() -> argparse.ArgumentParser:
    parser = CommandParser(aliases=LEGACY_FLAGS, prog="python -m lora_ns.merge",
                           description="Merge a trained adapter into its base model and save it.",
                           paths=("adapter", "output", "base", "recipe"))
    parser.add_argument("--adapter", required=True, help="training output dir (holds adapter_config.json)")
    parser.add_argument("--output", required=True, help="folder for the merged model")
    parser.add_argument("--base", help="base model (default: the one named in adapter_config.json)")
    parser.add_argument("--recipe", help="recipe whose model and quantization to use (default: the adapter's "
                        "recipe.yaml)")
    parser.add_argument("--dtype", choices=list(TORCH_DTYPES), help="save dtype (default: the base's)")
    parser.add_argument("--no-requantize", action="store_true",
                        help="QLoRA: merge into the original base weights, skipping the 4-bit round trip")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    return parser


def check_paths(adapter: Path, output: Path, overwrite: bool) -> None:
    where, new = str(output), "choose a new folder"
    if not is_adapter_dir(adapter):
        if (adapter / "config.json").is_file():  # peft.method: full
            raise fail(str(adapter), "--adapter", "holds a whole model (a full fine-tune): there is no "
                       "adapter to merge", f"use it as it is (lora_ns.infer --model {adapter})")
        raise fail(str(adapter), "--adapter", f"no {ADAPTER_CONFIG} there",
                   "point it at a training output_dir")
    if output.resolve() == adapter.resolve():
        raise fail(where, "--output", "is the adapter folder", new)
    if output.exists() and not output.is_dir():
        raise fail(where, "--output", "exists and is not a folder", new)
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise fail(where, "--output", "folder exists and is not empty", "choose another or pass --overwrite")
    if why := unwritable(output):
        raise fail(where, "--output", why, "choose a folder you can write to")


def probe_logits(model, tokenizer) -> list:
    """Logits on the probe prompts, one prompt at a time (no padding), in fp32."""
    import torch

    with torch.no_grad():
        return [model(**tokenizer(p, return_tensors="pt").to(model.device)).logits.float().cpu()
                for p in PROBE_PROMPTS]


def max_difference(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def merge(adapter_dir: str, output: str, base: str | None = None, dtype: str | None = None,
          requantize: bool = True, overwrite: bool = False, recipe_path: str | None = None) -> dict[str, Any]:
    """Merge `adapter_dir` into its base and save it to `output`; return what merge_info.json records."""
    from transformers import AutoConfig

    adapter, target = Path(adapter_dir), Path(output)
    check_paths(adapter, target, overwrite)
    peft_type = str(read_adapter_config(adapter)["peft_type"]).upper()
    if peft_type not in MERGEABLE:
        raise fail(str(adapter / ADAPTER_CONFIG), "peft_type", f"{peft_type} adapters cannot be merged",
                   "use the adapter folder directly with lora_ns.infer")
    recipe = load_recipe(recipe_path) if recipe_path else None
    loaded = load(str(adapter), base, recipe, merging=True, requantize=requantize)
    recipe, tokenizer, rounded = loaded.recipe, loaded.tokenizer, loaded.requantized_layers
    trust = bool(recipe and recipe.model.trust_remote_code)
    saved = str(AutoConfig.from_pretrained(loaded.base, trust_remote_code=trust).dtype).removeprefix("torch.")
    recipe_dtype = recipe.model.dtype if recipe is not None and recipe.model.dtype != "auto" else None
    save_dtype = dtype or DTYPE_NAMES.get(saved) or recipe_dtype or "fp32"  # given, saved, trained, fp32
    if why := merge_blocker(loaded.model):
        raise fail(str(adapter), "--adapter", f"cannot be merged: {why}", "use the adapter folder directly "
                   "with lora_ns.infer (or train with peft.lora_bias: false)")
    reference = probe_logits(loaded.model, tokenizer)
    merged = loaded.model.merge_and_unload()  # the generation config keeps load's end-of-turn eos
    diff_fp32 = max_difference(probe_logits(merged, tokenizer), reference)
    merged = merged.to(torch_dtype(save_dtype))
    diff_saved = diff_fp32 if save_dtype == "fp32" else max_difference(probe_logits(merged, tokenizer),
                                                                        reference)
    info = {"adapter": str(adapter), "base": loaded.base, "task": loaded.task, "dtype": save_dtype,
            "requantized": bool(rounded), "requantized_layers": rounded,
            "max_logit_diff_fp32": diff_fp32, "max_logit_diff_saved": diff_saved}
    with atomic_folder(target) as folder:
        merged.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
        if saved := saved_recipe_file(adapter):  # a checkpoint's is its run's
            shutil.copy2(saved, folder / RECIPE_FILE)
        write_json_atomic(folder / MERGE_INFO, info)
    return info


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    info = merge(args.adapter, args.output, base=args.base, dtype=args.dtype,
                 requantize=not args.no_requantize, overwrite=args.overwrite, recipe_path=args.recipe)
    if info["requantized"]:
        print(f"requantized {info['requantized_layers']} layers through the 4-bit round trip before merging")
    diff = f"{info['max_logit_diff_fp32']:.3g} (fp32)"
    if info["dtype"] != "fp32":
        diff += f", {info['max_logit_diff_saved']:.3g} as saved in {info['dtype']}"
    print(f"max |logit difference| merged vs base+adapter: {diff}")
    print(f"merged model ({info['dtype']}) saved to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(PROG, lambda: main(sys.argv[1:])))
