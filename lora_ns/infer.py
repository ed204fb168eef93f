"""``python -m lora_ns.infer --model PATH (--prompt TEXT | --input-file FILE)``: run a model on prompts.

Causal models generate; seq_cls models print the predicted label and every class probability.
"""

from __future__ import annotations

import argparse
import json
import sys

from lora_ns.command_line import CommandParser
from lora_ns.config import load_recipe
from lora_ns.errors import Problem, UserError, run_cli
from lora_ns.fileio import guard_output_file, write_jsonl_atomic
from lora_ns.inference import (add_generation_flags, classify, generate, generation_options, load, pair_of,
                               prompt_of, read_inputs)

PROG = "lora_ns.infer"
# Flag names of the scripts lora_ns descends from (snake_case spellings are accepted anyway).
# The flags of the inference.py script lora_ns descends from (README, "Train a recipe on GPUs").
LEGACY_FLAGS = {"--model_path": "--model", "--adapter_path": "--model", "--input_text": "--prompt",
                "--config": "--recipe"}


def make_parser() -> argparse.ArgumentParser:
    parser = CommandParser(aliases=LEGACY_FLAGS, prog="python -m lora_ns.infer",
                           description="Run a base, adapter or merged model on a prompt or a file of them.")
    parser.add_argument("--model", required=True,
                        help="training output dir (adapter), merged dir, folder, hub id or builtin:<name>")
    parser.add_argument("--base", help="base model for an adapter (default: the one in adapter_config.json)")
    parser.add_argument("--recipe", help="render prompts as this recipe does (default: its recipe.yaml)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="a single prompt")
    source.add_argument("--input-file", help=".txt (a prompt a line) or .jsonl ('prompt' or 'messages')")
    parser.add_argument("--output-file", help="write results here as JSON lines (default: print)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output-file")
    add_generation_flags(parser, greedy=False)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    options = generation_options(args)
    if args.prompt is not None and not args.prompt.strip():
        raise UserError(Problem("<command line>", "--prompt", "is empty", "give the text to answer"))
    if args.output_file:
        guard_output_file(args.output_file, args.overwrite)
    rows = [{"prompt": args.prompt}] if args.prompt is not None else read_inputs(args.input_file)
    recipe = load_recipe(args.recipe) if args.recipe else None
    loaded = load(args.model, base=args.base, recipe=recipe)
    progress = not args.no_progress and args.prompt is None
    if loaded.task == "seq_cls":
        results = classify(loaded, [pair_of(r) for r in rows], batch_size=args.batch_size, progress=progress)
    else:
        texts = generate(loaded, [prompt_of(r) for r in rows], progress=progress, **options)
        results = [{"output": t} for t in texts]
    if args.output_file:
        write_jsonl_atomic(args.output_file, [{**r, **res} for r, res in zip(rows, results)])
        print(f"wrote {len(results)} results to {args.output_file}", file=sys.stderr)
    elif args.prompt is None:
        for row, result in zip(rows, results):
            print(json.dumps({**row, **result}, ensure_ascii=False))
    elif "probabilities" in results[0]:
        probabilities = results[0]["probabilities"].items()
        print(results[0]["label"] + "".join(f"\n  {name}: {p:.4f}" for name, p in probabilities))
    else:
        print(results[0]["output"])
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(PROG, lambda: main(sys.argv[1:])))
