"""``python -m lora_ns.infer --model PATH (--prompt TEXT | --input-file FILE)``: run a model on prompts.

`--model` is a base model (hub id, folder, ``builtin:<name>``), a training output (adapter dir) or a
merged dir. Causal models generate (``model.generate``, left-padded batches); seq_cls models print
the predicted label and every class probability. Prompts are rendered as training rendered them
(see `lora_ns.inference_model`). `generate` and `classify` are also what `evaluate` and `compare` use.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from lora_ns.command_line import CommandParser
from lora_ns.errors import Problem, UserError, run_cli
from lora_ns.fileio import unwritable, write_text_atomic

PROG = "lora_ns.infer"
PromptInput = str | list[dict[str, str]]


# --- output files ------------------------------------------------------------------------------

def guard_output_file(path: str | Path, overwrite: bool, flag: str = "--output-file") -> None:
    """Refuse to replace an existing file unless asked (checked before any model is loaded)."""
    if Path(path).exists() and not overwrite:
        raise UserError(Problem(str(path), flag, "already exists", "choose another path or pass --overwrite"))
    if Path(path).is_dir():
        raise UserError(Problem(str(path), flag, "is a folder", "give a file path"))
    if why := unwritable(path):
        raise UserError(Problem(str(path), flag, why, "choose a path you can write to"))




def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


# --- input files -------------------------------------------------------------------------------

def read_inputs(path: str | Path) -> list[dict[str, Any]]:
    """Rows from a .txt (one prompt a line) or .jsonl file ("prompt", "messages", "text" or "sentence1" fields)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(Problem(str(path), "--input-file", "file not found", "check the path"))
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(Problem(str(path), "--input-file", f"cannot read it ({err})", "save it as UTF-8 text"))
    if file.suffix not in (".jsonl", ".json"):
        rows = [{"prompt": line} for line in lines if line.strip()]
        if not rows:
            raise UserError(Problem(str(path), "--input-file", "no prompts in the file", "add one prompt a line"))
        return rows
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(Problem(str(path), "", f"invalid JSON ({err.msg})", "write one JSON object a line", number))
        if not isinstance(row, dict) or not any(k in row for k in ("prompt", "messages", "text", "sentence1")):
            raise UserError(Problem(str(path), "prompt", "row has no prompt",
                                    'give each line a "prompt" (or "messages") field', number))
        rows.append(row)
    if not rows:
        raise UserError(Problem(str(path), "", "no prompts in the file", "add one prompt a line"))
    return rows


def prompt_of(row: dict[str, Any]) -> PromptInput:
    """The generation input of a row: its messages (up to the last user turn) or its prompt text."""
    if "messages" in row and "prompt" not in row:
        messages = list(row["messages"])
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        return messages
    return row.get("prompt", row.get("text", row.get("sentence1", "")))


# --- running the model -------------------------------------------------------------------------

def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order), size)]


def generation_config(loaded, max_new_tokens: int, greedy: bool, temperature: float, top_p: float):
    """A copy of the model's GenerationConfig with our options; stops at the tokenizer's eos too."""
    import copy

    config = copy.deepcopy(loaded.model.generation_config)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    eos = [e for e in [*eos, loaded.tokenizer.eos_token_id] if e is not None]
    sample = not greedy and temperature > 0
    config.update(max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=loaded.tokenizer.pad_token_id,
                  eos_token_id=sorted(set(eos)) or None, temperature=temperature if sample else None,
                  top_p=top_p if sample else None, top_k=None if not sample else config.top_k)
    return config


def generate(loaded, prompts: Sequence[PromptInput], *, recipe=None, max_new_tokens: int = 256,
             greedy: bool = True, temperature: float = 0.7, top_p: float = 0.9, batch_size: int = 8,
             progress: bool = True, seed: int | None = None) -> list[str]:
    """Completions for `prompts` (rendered with `recipe`, default the model's own), in input order."""
    import torch
    from tqdm.auto import tqdm

    from lora_ns.inference_model import render_prompt

    if seed is not None:
        from transformers import set_seed

        set_seed(seed)
    tokenizer, recipe = loaded.tokenizer, recipe or loaded.recipe
    tokenizer.padding_side = "left"
    rendered = [render_prompt(tokenizer, p, recipe) for p in prompts]
    encoded = [tokenizer(r.text, add_special_tokens=r.add_special_tokens)["input_ids"] for r in rendered]
    config = generation_config(loaded, max_new_tokens, greedy, temperature, top_p)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    outputs: list[str] = [""] * len(encoded)
    for batch in tqdm(_batches(order, batch_size), desc="generating", unit="batch", disable=not progress):
        inputs = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(loaded.device)
        with torch.no_grad():
            out = loaded.model.generate(**inputs, generation_config=config)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            outputs[i] = text.strip()
    return outputs


def label_names(model) -> list[str]:
    id2label = model.config.id2label or {}
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(model.config.num_labels)]


def classify(loaded, inputs: Sequence[str | tuple[str, str | None]], *, batch_size: int = 16,
             progress: bool = True) -> list[dict[str, Any]]:
    """For each text (or sentence pair): {"label", "label_id", "probabilities": {label name: p}}."""
    import torch
    from tqdm.auto import tqdm

    names = label_names(loaded.model)
    pairs = [x if isinstance(x, tuple) else (x, None) for x in inputs]
    results: list[dict[str, Any]] = []
    for batch in tqdm(_batches(list(range(len(pairs))), batch_size), desc="classifying", unit="batch",
                      disable=not progress):
        first = [pairs[i][0] for i in batch]
        second = [pairs[i][1] for i in batch]
        enc = loaded.tokenizer(first, second if all(s is not None for s in second) else None, padding=True,
                               truncation=True, return_tensors="pt").to(loaded.device)
        with torch.no_grad():
            probs = torch.softmax(loaded.model(**enc).logits.float(), dim=-1)
        for row in probs.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            results.append({"label": names[best], "label_id": best,
                            "probabilities": {name: round(p, 6) for name, p in zip(names, row)}})
    return results


def pair_of(row: dict[str, Any]) -> tuple[str, str | None]:
    if "sentence1" in row:
        return row["sentence1"], row.get("sentence2")
    return str(prompt_of(row)), None


# --- command line ------------------------------------------------------------------------------
# Flag names of the scripts lora_ns descends from (snake_case spellings are accepted anyway).
LEGACY_FLAGS = {"--model_path": "--model", "--adapter_path": "--model", "--input_text": "--prompt", "--config": "--recipe"}

def make_parser() -> argparse.ArgumentParser:
    parser = CommandParser(aliases=LEGACY_FLAGS, prog="python -m lora_ns.infer", description="Run a base, adapter or merged "
                                     "model on one prompt or a file of prompts.")
    parser.add_argument("--model", required=True, help="training output dir (adapter), merged dir, folder, hub id "
                        "or builtin:<name>")
    parser.add_argument("--base", help="base model for an adapter (default: the one in adapter_config.json)")
    parser.add_argument("--recipe", help="recipe whose prompt rendering to use (default: the model dir's recipe.yaml)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="a single prompt")
    source.add_argument("--input-file", help=".txt (one prompt a line) or .jsonl with a 'prompt' or 'messages' field")
    parser.add_argument("--output-file", help="write results here as JSON lines (default: print)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output-file")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (ignores temperature/top-p)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], help="load dtype (default: the saved one)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    for flag in ("batch_size", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise UserError(Problem("<command line>", "--" + flag.replace("_", "-"), "must be at least 1", "use 1 or more"))
    if not args.greedy and not args.temperature > 0:
        raise UserError(Problem("<command line>", "--temperature", f"must be above 0, got {args.temperature}",
                                "use e.g. 0.7, or --greedy for deterministic output"))
    if not 0 < args.top_p <= 1:
        raise UserError(Problem("<command line>", "--top-p", f"must be in (0, 1], got {args.top_p}", "use e.g. 0.9"))
    if args.prompt is not None and not args.prompt.strip():
        raise UserError(Problem("<command line>", "--prompt", "is empty", "give the text to answer"))
    if args.output_file:
        guard_output_file(args.output_file, args.overwrite)


def _print_result(row: dict[str, Any], result: dict[str, Any], single: bool) -> None:
    if not single:
        print(json.dumps({**row, **result}, ensure_ascii=False))
    elif "probabilities" in result:
        print(result["label"])
        for name, p in result["probabilities"].items():
            print(f"  {name}: {p:.4f}")
    else:
        print(result["output"])


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    _check_args(args)
    rows = [{"prompt": args.prompt}] if args.prompt is not None else read_inputs(args.input_file)
    from lora_ns.inference_model import load_for_inference

    recipe = None
    if args.recipe:
        from lora_ns.config import load_recipe

        recipe = load_recipe(args.recipe)
    loaded = load_for_inference(args.model, base=args.base, recipe=recipe, dtype=args.dtype)
    progress = not args.no_progress and args.prompt is None
    if loaded.task == "seq_cls":
        results = classify(loaded, [pair_of(r) for r in rows], batch_size=args.batch_size, progress=progress)
    else:
        texts = generate(loaded, [prompt_of(r) for r in rows], max_new_tokens=args.max_new_tokens,
                         greedy=args.greedy, temperature=args.temperature, top_p=args.top_p,
                         batch_size=args.batch_size, progress=progress, seed=args.seed)
        results = [{"output": t} for t in texts]
    if args.output_file:
        write_jsonl_atomic(args.output_file, [{**r, **res} for r, res in zip(rows, results)])
        print(f"wrote {len(results)} results to {args.output_file}", file=sys.stderr)
    else:
        for row, result in zip(rows, results):
            _print_result(row, result, single=args.prompt is not None)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(PROG, lambda: main(sys.argv[1:])))
