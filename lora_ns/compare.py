"""``python -m lora_ns.compare --tuned OUT_DIR [--base MODEL]``: the same prompts through both, side by side.

``--questions-file`` (txt or jsonl, as `lora_ns.infer` reads) writes a JSON list of {prompt, base, tuned};
``--interactive`` answers one prompt a line from stdin until EOF. Both models get the prompt rendered with
the tuned model's recipe (chat template, system prompt) when it has one. Greedy unless ``--sample``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lora_ns.command_line import CommandParser
from lora_ns.errors import Problem, UserError, run_cli
from lora_ns.fileio import guard_output_file, write_json_atomic
from lora_ns.inference import add_generation_flags, generate, generation_options, load, prompt_of, read_inputs

PROG = "lora_ns.compare"


def make_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="python -m lora_ns.compare",
                                     description="Answer the same prompts with a base and a tuned model.")
    parser.add_argument("--tuned", required=True, help="training output dir (adapter) or merged dir")
    parser.add_argument("--base", help="base model (default: the tuned adapter's base)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--questions-file", help=".txt (one prompt a line) or .jsonl with a 'prompt' field")
    mode.add_argument("--interactive", action="store_true", help="read prompts from stdin, one a line")
    parser.add_argument("--output", help="--questions-file mode: write the JSON here (default: print it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    add_generation_flags(parser, greedy=True)
    return parser


def answer_both(base, tuned, prompts: list[Any], args: argparse.Namespace, progress: bool = True) -> list:
    options = dict(recipe=tuned.recipe, progress=progress, **generation_options(args))
    base_out, tuned_out = generate(base, prompts, **options), generate(tuned, prompts, **options)
    return [{"prompt": p, "base": b, "tuned": t} for p, b, t in zip(prompts, base_out, tuned_out)]


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.output and args.interactive:
        raise UserError(Problem("<command line>", "--output", "only for --questions-file",
                                "redirect stdout to keep an interactive session"))
    if args.output:
        guard_output_file(args.output, args.overwrite, "--output")
    generation_options(args)  # checked before any model loads
    rows = read_inputs(args.questions_file) if args.questions_file else None
    tuned = load(args.tuned, base=args.base)
    if not (args.base or tuned.base):
        raise UserError(Problem("<command line>", "--base", "needed when --tuned is not an adapter folder",
                                "pass --base MODEL"))
    if tuned.task == "seq_cls":
        raise UserError(Problem(args.tuned, "--tuned", "compare is for generative models",
                                "use lora_ns.evaluate for classifiers"))
    base = load(args.base or tuned.base)
    if rows is None:
        if sys.stdin.isatty():
            print("type a prompt and press Enter (Ctrl-D to quit)")
        for prompt in (line.rstrip("\n") for line in sys.stdin if line.strip()):
            row = answer_both(base, tuned, [prompt], args, progress=False)[0]
            print(f">>> {prompt}\n[base]  {row['base']}\n[tuned] {row['tuned']}\n", flush=True)
        return 0
    results = answer_both(base, tuned, [prompt_of(r) for r in rows], args)
    if args.output:
        write_json_atomic(args.output, results)
        print(f"wrote {len(results)} comparisons to {args.output}", file=sys.stderr)
    else:
        print(json.dumps(results, ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(PROG, lambda: main(sys.argv[1:])))
