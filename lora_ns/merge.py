"""``python -m lora_ns.merge --adapter OUT_DIR --output MERGED_DIR``: fold an adapter into its base model.

The base is loaded unquantized in fp32 (peft never merges into a 4-bit model here), the adapter is
applied and ``merge_and_unload`` adds the deltas; the result is saved (safetensors + tokenizer) in
the base's own dtype, or ``--dtype``.

QLoRA adapters were trained against nf4/fp4-rounded base weights, not the originals. Unless
``--no-requantize``, every layer that bitsandbytes quantized during training (the same selection
transformers makes: nn.Linear layers except the output head, tied and skipped modules) goes through
bitsandbytes' quantize_4bit -> dequantize_4bit round trip first, so the merged model computes what
the trained one did.

Before writing, the logits of the merged model are compared with the unmerged base+adapter on a few
probe prompts and the largest difference is reported (and kept in merge_info.json). The folder is
written beside the target under a temporary name and renamed at the end: a crash leaves nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Callable

from lora_ns.command_line import CommandParser
from lora_ns.errors import Problem, UserError, run_cli

PROG = "lora_ns.merge"
PROBE_PROMPTS = ["The quick brown fox jumps over the lazy dog.",
                 "Question: Ben has 33 stickers and gives away 27. How many are left? Answer:",
                 "请用中文回答这个问题。"]
MERGEABLE = {"LORA", "ADALORA", "IA3", "LOHA", "LOKR", "OFT", "BOFT"}
_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}

# Flag names of the scripts lora_ns descends from (snake_case spellings are accepted anyway).
LEGACY_FLAGS = {"--adapter_path": "--adapter", "--output_path": "--output", "--base_model": "--base"}

def make_parser() -> argparse.ArgumentParser:
    parser = CommandParser(aliases=LEGACY_FLAGS, prog="python -m lora_ns.merge",
                                     description="Merge a trained adapter into its base model and save it.")
    parser.add_argument("--adapter", required=True, help="training output dir (holds adapter_config.json)")
    parser.add_argument("--output", required=True, help="folder for the merged model")
    parser.add_argument("--base", help="base model (default: the one named in adapter_config.json)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="save dtype (default: the base's)")
    parser.add_argument("--no-requantize", action="store_true",
                        help="QLoRA: merge into the original base weights, skipping the 4-bit round trip")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    return parser


# --- checks ------------------------------------------------------------------------------------

def check_paths(adapter: Path, output: Path, overwrite: bool) -> None:
    from lora_ns.fileio import unwritable
    from lora_ns.inference_model import ADAPTER_CONFIG, is_adapter_dir

    if not is_adapter_dir(adapter):
        raise UserError(Problem(str(adapter), "--adapter", f"no {ADAPTER_CONFIG} there",
                                "point --adapter at a training output_dir"))
    if output.resolve() == adapter.resolve():
        raise UserError(Problem(str(output), "--output", "is the adapter folder", "choose a new folder"))
    if output.exists() and not output.is_dir():
        raise UserError(Problem(str(output), "--output", "exists and is not a folder", "choose a new folder"))
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UserError(Problem(str(output), "--output", "folder exists and is not empty",
                                "choose a new folder or pass --overwrite"))
    if why := unwritable(output):
        raise UserError(Problem(str(output), "--output", why, "choose a folder you can write to"))


def check_mergeable(adapter: Path) -> None:
    from lora_ns.inference_model import ADAPTER_CONFIG, check_adapter_files, read_adapter_config

    peft_type = str(read_adapter_config(adapter).get("peft_type", "")).upper()
    if peft_type not in MERGEABLE:
        raise UserError(Problem(str(adapter / ADAPTER_CONFIG), "peft_type", f"{peft_type} adapters cannot be merged",
                                "use the adapter folder directly with lora_ns.infer"))
    check_adapter_files(adapter)


# --- loading and merging -----------------------------------------------------------------------

def output_dtype(base_path: str, requested: str | None, recipe) -> str:
    """--dtype, else the dtype the base checkpoint was saved in, else the recipe's, else fp32."""
    if requested:
        return requested
    from transformers import AutoConfig

    trust = bool(recipe and recipe.model.trust_remote_code)
    saved = getattr(AutoConfig.from_pretrained(base_path, trust_remote_code=trust), "dtype", None)
    name = _DTYPE_NAMES.get(str(saved).removeprefix("torch.")) if saved is not None else None
    if name:
        return name
    if recipe is not None and recipe.model.dtype != "auto":
        return recipe.model.dtype
    return "fp32"


def load_full_precision(base_path: str, task: str, recipe):
    """The base in fp32, never quantized; seq_cls head sized and labelled as in training."""
    import torch

    from lora_ns.model import auto_model_class, head_loaded_next

    kwargs: dict[str, Any] = {}
    if recipe is not None:
        from lora_ns.model import model_kwargs

        kwargs = {k: v for k, v in model_kwargs(recipe).items() if k not in ("quantization_config", "device_map")}
    kwargs["dtype"] = torch.float32
    with head_loaded_next(task):  # the adapter's saved head replaces the new one next
        return auto_model_class(task).from_pretrained(base_path, **kwargs)


def requantize_like_training(model, recipe) -> list[str]:
    """Round-trip the weights bitsandbytes quantized in training through quantize_4bit/dequantize_4bit.

    Returns the names of the layers changed. The selection and options are the ones transformers'
    bnb quantizer uses when loading a model with the recipe's BitsAndBytesConfig.
    """
    import bitsandbytes.functional as bnbf
    import torch
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    from lora_ns.model import quantization_config, torch_dtype

    bnb = quantization_config(recipe)
    skip = HfQuantizer.get_modules_to_not_convert(model, bnb.llm_int8_skip_modules,
                                                  getattr(model, "_keep_in_fp32_modules", None))
    load_dtype = torch_dtype(recipe.model.dtype)  # the dtype the weights had when bitsandbytes quantized them
    changed = []
    for name, module in model.named_modules():
        if not should_convert_module(name, skip) or not (type(module) is torch.nn.Linear or isinstance(module, Conv1D)):
            continue
        weight = module.weight.data
        as_linear = weight.T if isinstance(module, Conv1D) else weight  # transformers transposes Conv1D first
        packed, state = bnbf.quantize_4bit(as_linear.to(load_dtype).contiguous(), blocksize=None,
                                           compress_statistics=bnb.bnb_4bit_use_double_quant,
                                           quant_type=bnb.bnb_4bit_quant_type,
                                           quant_storage=bnb.bnb_4bit_quant_storage)
        rounded = bnbf.dequantize_4bit(packed, state).to(weight.dtype)
        module.weight.data = (rounded.T if isinstance(module, Conv1D) else rounded).contiguous()
        changed.append(name)
    return changed


def probe_logits(model, tokenizer) -> list:
    """Logits of the model on the probe prompts, one prompt at a time (no padding), in fp32."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for prompt in PROBE_PROMPTS:
            enc = tokenizer(prompt, return_tensors="pt").to(device)
            out.append(model(**enc).logits.float().cpu())
    return out


def max_difference(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


# --- writing -----------------------------------------------------------------------------------

def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary folder beside `target`, then rename it into place (replacing an old target)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()  # not mkdtemp: that one is private (0700), and the rename would keep it so
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    try:
        write(tmp)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
    except BaseException:
        if old.exists() and not target.exists():
            old.rename(target)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def merge(adapter_dir: str, output: str, base: str | None = None, dtype: str | None = None,
          requantize: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Merge `adapter_dir` into its base and save it to `output`; return what merge_info.json records."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from lora_ns.inference_model import MERGE_INFO, RECIPE_FILE, adapter_base, detect_task, saved_recipe
    from lora_ns.fileio import write_json_atomic
    from lora_ns.model import torch_dtype

    adapter, target = Path(adapter_dir), Path(output)
    check_paths(adapter, target, overwrite)
    check_mergeable(adapter)
    recipe = saved_recipe(adapter)
    task = detect_task(adapter, recipe)
    base_path = adapter_base(adapter, base, recipe)
    try:
        save_dtype = output_dtype(base_path, dtype, recipe)
        model = load_full_precision(base_path, task, recipe)
    except OSError as err:  # from_pretrained: missing, unreachable or incomplete base model
        raise UserError(Problem(base_path, "--base", f"cannot load the base model: {str(err).strip()[:200]}",
                                "pass --base with a local folder, hub id or builtin: name"))
    rounded: list[str] = []
    four_bit = recipe is not None and recipe.quantization.load_in_4bit
    if four_bit and requantize:
        rounded = requantize_like_training(model, recipe)
    has_tokenizer = (adapter / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter) if has_tokenizer else base_path)
    model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    reference = probe_logits(model, tokenizer)
    merged = model.merge_and_unload()
    diff_fp32 = max_difference(probe_logits(merged, tokenizer), reference)
    merged = merged.to(torch_dtype(save_dtype))
    diff_saved = diff_fp32 if save_dtype == "fp32" else max_difference(probe_logits(merged, tokenizer), reference)

    info = {"adapter": str(adapter), "base": base_path, "task": task, "dtype": save_dtype,
            "requantized": bool(rounded), "requantized_layers": len(rounded),
            "max_logit_diff_fp32": diff_fp32, "max_logit_diff_saved": diff_saved}

    def write(folder: Path) -> None:
        merged.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
        if (adapter / RECIPE_FILE).is_file():
            shutil.copy2(adapter / RECIPE_FILE, folder / RECIPE_FILE)
        write_json_atomic(folder / MERGE_INFO, info)

    write_atomically(target, write)
    return info


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    check_paths(Path(args.adapter), Path(args.output), args.overwrite)  # before any model loads
    info = merge(args.adapter, args.output, base=args.base, dtype=args.dtype, requantize=not args.no_requantize,
                 overwrite=args.overwrite)
    if info["requantized"]:
        print(f"requantized {info['requantized_layers']} layers through the 4-bit round trip before merging")
    print(f"max |logit difference| merged vs base+adapter: {info['max_logit_diff_fp32']:.3g} (fp32)"
          + ("" if info["dtype"] == "fp32" else f", {info['max_logit_diff_saved']:.3g} as saved in {info['dtype']}"))
    print(f"merged model ({info['dtype']}) saved to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(PROG, lambda: main(sys.argv[1:])))
