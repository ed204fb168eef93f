"""``python -m lora_ns.compare --base MODEL --tuned OUT_DIR``: the same prompts through both, side by side.

``--questions-file`` (txt or jsonl, as `lora_ns.infer` reads) writes a JSON list of
{prompt, base, tuned}; ``--interactive`` reads one prompt a line from stdin until EOF and prints
both answers. Both models get the prompt rendered the same way: with the tuned model's recipe
(chat template, system prompt) when it has one. Decoding is greedy unless ``--sample``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Iterable, TextIO

from lora_ns.errors import Problem, UserError, run_cli

PROG = "lora_ns.compare"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_ns.compare",
                                     description="Answer the same prompts with a base and a fine-tuned model.")
    parser.add_argument("--tuned", required=True, help="training output dir (adapter) or merged dir")
    parser.add_argument("--base", help="base model (default: the tuned adapter's base)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--questions-file", help=".txt (one prompt a line) or .jsonl with a 'prompt' field")
    mode.add_argument("--interactive", action="store_true", help="read prompts from stdin, one a line, until EOF")
    parser.add_argument("--output", help="--questions-file mode: write the JSON here (default: print it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sample", action="store_true", help="sample (with --temperature/--top-p) instead of greedy")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def load_pair(tuned: str, base: str | None):
    """(base model, tuned model); the base defaults to the one the adapter was trained on."""
    from lora_ns.inference_model import adapter_base, is_adapter_dir, load_for_inference, saved_recipe

    tuned_model = load_for_inference(tuned, base=base)
    if base is None:
        if not is_adapter_dir(tuned):
            raise UserError(Problem("<command line>", "--base", "needed when --tuned is not an adapter folder",
                                    "pass --base MODEL"))
        base = adapter_base(tuned, None, saved_recipe(tuned))
    return load_for_inference(base), tuned_model


def answer_both(models, prompts: list[Any], args: argparse.Namespace, progress: bool = True) -> list[dict[str, Any]]:
    from lora_ns.generation import generate

    base, tuned = models
    options = dict(recipe=tuned.recipe, max_new_tokens=args.max_new_tokens, greedy=not args.sample,
                   temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size, progress=progress)
    base_out = generate(base, prompts, seed=args.seed, **options)
    tuned_out = generate(tuned, prompts, seed=args.seed, **options)
    return [{"prompt": p, "base": b, "tuned": t} for p, b, t in zip(prompts, base_out, tuned_out)]


def interactive(models, args: argparse.Namespace, lines: Iterable[str], out: TextIO) -> int:
    """Answer each non-empty line; return how many prompts were answered."""
    count = 0
    show_prompt = sys.stdin.isatty()
    if show_prompt:
        print("type a prompt and press Enter (Ctrl-D to quit)", file=out)
    for line in lines:
        prompt = line.rstrip("\n")
        if not prompt.strip():
            continue
        row = answer_both(models, [prompt], args, progress=False)[0]
        print(f">>> {prompt}\n[base]  {row['base']}\n[tuned] {row['tuned']}\n", file=out, flush=True)
        count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    from lora_ns.fileio import guard_output_file, write_json_atomic
    from lora_ns.generation import prompt_of, read_inputs

    if args.output:
        if args.interactive:
            raise UserError(Problem("<command line>", "--output", "only for --questions-file",
                                    "redirect stdout to keep an interactive session"))
        guard_output_file(args.output, args.overwrite, "--output")
    rows = read_inputs(args.questions_file) if args.questions_file else None
    models = load_pair(args.tuned, args.base)
    if models[1].task == "seq_cls":
        raise UserError(Problem(args.tuned, "--tuned", "compare is for generative models",
                                "use lora_ns.evaluate for classifiers"))
    if rows is None:
        interactive(models, args, sys.stdin, sys.stdout)
        return 0
    results = answer_both(models, [prompt_of(r) for r in rows], args)
    if args.output:
        write_json_atomic(args.output, results)
        print(f"wrote {len(results)} comparisons to {args.output}", file=sys.stderr)
    else:
        print(json.dumps(results, ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(PROG, lambda: main(sys.argv[1:])))
