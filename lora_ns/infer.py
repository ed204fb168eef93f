"""``python -m lora_ns.infer --model PATH (--prompt TEXT | --input-file FILE | --interactive)``: run a model.

Causal models generate; seq_cls models print the predicted label and every class probability.
``--compare`` (``lora-ns compare``) answers with the base model too, side by side: both get the prompt
rendered with the tuned model's recipe (chat template, system prompt), greedy unless ``--sample``; a file
of prompts becomes a JSON list of {prompt, base, tuned}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lora_ns.checkpoints import saved_recipe_file
from lora_ns.command_line import CommandParser, at_least, at_least_one
from lora_ns.config import Recipe, load_recipe
from lora_ns.data import formatted_examples, sources
from lora_ns.data.loading import column_map, progress_bars_off
from lora_ns.data.formatters import FORMATTERS, RowError, check_messages, text_value
from lora_ns.data.sources import Location
from lora_ns.errors import UserError, fail, run_cli
from lora_ns.fileio import guard_output_file, write_json_atomic, write_jsonl_atomic
from lora_ns.inference import (classify, generate, is_chat, load, pair_of, prompt_and_reference,
                               render_prompt)
from lora_ns.model import context_length

PROG = "lora_ns.infer"
# The flags of the scripts lora_ns descends from (inference.py; README, "Train a recipe on GPUs") and of
# `lora-ns compare` (snake_case spellings are accepted anyway).
LEGACY_FLAGS = {"--model_path": "--model", "--adapter_path": "--model", "--input_text": "--prompt",
                "--config": "--recipe", "--tuned": "--model", "--questions-file": "--input-file",
                "--output": "--output-file"}


def read_inputs(path: str | Path, recipe: Recipe | None = None) -> list[dict[str, Any]]:
    """Rows of a .jsonl/.json file ("prompt", "messages", "text" or "sentence1"), or of text (one prompt a
    line), read as the data loader reads them (a bad line is one error naming it). Rows in the training
    data's own columns (GSM8K's question/answer) are read by the `recipe`'s formatter (`recipe_rows`)."""
    where = str(path)
    if not Path(where).is_file():
        raise fail(where, "--input-file", "file not found", "check the path")
    text = not where.endswith((".jsonl", ".json"))
    rows = []
    for line, row in sources.rows(where, "text" if text else sources.file_format(where)):
        row = {"prompt": row["text"]} if text else row
        if text and not row["prompt"].strip():
            continue
        key = next((k for k in ("prompt", "messages", "text", "sentence1") if k in row), None)  # as read next
        if key is None:
            fmt = FORMATTERS.get(recipe.dataset.formatter) if recipe else None
            if fmt and not column_map(fmt, recipe.dataset.columns, list(row), Location(where, line, 1))[1]:
                return recipe_rows(where, recipe)
            theirs = f" or the recipe formatter's ({', '.join(fmt.fields)})" if fmt else ""
            fix = f'give each line a "prompt" (or "messages") field{theirs}'
            raise fail(where, "prompt", "row has no prompt", fix, line)
        try:  # a number or a malformed chat crashed in the chat template, after the model loaded
            chat = key == "messages" or isinstance(row[key], list)
            row[key] = check_messages(row[key], key, needs_reply=False) if chat else text_value(row, key)
            if key == "sentence1" and "sentence2" in row:  # a pair's second text, as the tokenizer needs it
                row["sentence2"] = text_value(row, "sentence2", required=False)
        except RowError as err:
            raise fail(where, err.field, err.message, err.fix, line) from None
        rows.append(row)
    if not rows:
        raise fail(where, "--input-file" if text else "", "no prompts in the file", "add one prompt a line")
    return rows


def recipe_rows(path: str, recipe: Recipe) -> list[dict[str, Any]]:
    """Every row of a file read by the recipe's formatter, as ``evaluate --data-file`` reads it: the prompt,
    the reference answer as ``completion`` and the columns the formatter did not read."""
    return [{**example.pop("metadata"), **{k: v for k, v in example.items() if k != "row"}}
            for example in formatted_examples(recipe, split=path)]


def make_parser() -> argparse.ArgumentParser:
    parser = CommandParser(aliases=LEGACY_FLAGS, prog="python -m lora_ns.infer",
                           description="Run a base, adapter or merged model on a prompt or a file of them.",
                           paths=("model", "base", "recipe", "input_file", "output_file"))
    parser.add_argument("--model", required=True,
                        help="training output dir (adapter), merged dir, folder, hub id or builtin:<name>")
    parser.add_argument("--base", help="base model for an adapter (default: the one in adapter_config.json)")
    parser.add_argument("--compare", action="store_true", help="also answer with --base, side by side")
    parser.add_argument("--recipe", help="render prompts as this recipe does (default: its recipe.yaml)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="a single prompt")
    parser.add_argument("--pair", metavar="TEXT", help="the second text of a sentence pair, after --prompt "
                        "(a classifier trained on pairs)")
    source.add_argument("--input-file", help=".txt (a prompt a line) or .jsonl ('prompt', 'messages' or "
                        "the recipe's columns)")
    source.add_argument("--interactive", action="store_true", help="read prompts from stdin, one a line "
                        "(a chat model keeps the conversation; /clear starts over)")
    parser.add_argument("--output-file", help="write results here (default: print)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output-file")
    for flag, kind, default in (("--batch-size", at_least_one, 8), ("--max-new-tokens", at_least_one, 256),
                                ("--temperature", float, 0.7), ("--top-p", float, 0.9),
                                ("--seed", at_least(0), 0)):
        parser.add_argument(flag, type=kind, default=default)
    parser.add_argument("--greedy", action="store_true", default=None,
                        help="greedy decoding, ignoring temperature/top-p (the default with --compare)")
    parser.add_argument("--sample", dest="greedy", action="store_false", default=None,
                        help="sample with --temperature and --top-p (the default without --compare)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `generate` keywords of the flags, checked before any model loads."""
    greedy = args.compare if args.greedy is None else args.greedy
    if not greedy and not 0 < args.temperature < float("inf"):  # inf: uniform over the vocabulary
        raise fail("<command line>", "--temperature", f"must be above 0 and finite, got {args.temperature}",
                   "use e.g. 0.7, or --greedy for deterministic output")
    if not 0 < args.top_p <= 1:
        raise fail("<command line>", "--top-p", f"must be in (0, 1], got {args.top_p}", "use e.g. 0.9")
    if args.seed >= 2 ** 32:  # numpy seeds 0..2**32-1 (transformers' set_seed)
        raise fail("<command line>", "--seed", f"must be below 2**32, got {args.seed}", "use e.g. 0")
    keys = ("max_new_tokens", "temperature", "top_p", "batch_size", "seed")
    return {"greedy": greedy, **{key: getattr(args, key) for key in keys}}


def takes_pairs(recipe: Recipe | None) -> bool:
    """A classifier lora_ns trained on sentence pairs (its saved recipe's dataset.pairs, or a formatter that
    requires sentence2, as glue_mrpc does): given one text alone it answers something it never learned."""
    if recipe is None or recipe.task != "seq_cls":
        return False
    fields = getattr(FORMATTERS.get(recipe.dataset.formatter), "fields", ())
    return recipe.dataset.pairs if recipe.dataset.pairs is not None else "sentence2" in fields


def classifier_inputs(rows: list[dict[str, Any]], recipe: Recipe | None) -> list[tuple[str, str | None]]:
    """(text, second text or None) a row; for a classifier trained on pairs a prompt "first<TAB>second" is a
    pair, and one text alone an error."""
    paired = takes_pairs(recipe)
    pairs = [pair_of(row, tab=paired) for row in rows]
    if paired and (alone := [i for i, (_, second) in enumerate(pairs, 1) if second is None]):
        trained = f"the classifier was trained on sentence pairs ({recipe.dataset.formatter})"
        raise fail("<input>", "--pair", f"{trained}; prompt {alone[0]} is one text", "give the second: "
                   "--pair TEXT, a tab between the two (--interactive, .txt), or sentence2 (.jsonl)")
    return pairs


def answer(loaded, base, rows: list[dict[str, Any]], options: dict[str, Any]) -> list[dict[str, Any]]:
    """One result a row: a classification, {"output"}, or with a `base` {"prompt", "base", "tuned"}."""
    if loaded.task == "seq_cls":
        pairs = classifier_inputs(rows, loaded.recipe)
        return classify(loaded, pairs, batch_size=options["batch_size"], progress=options["progress"])
    prompts = [prompt_and_reference(r)[0] for r in rows]
    if base is None:
        return [{"output": text} for text in generate(loaded, prompts, **options)]
    options = {**options, "recipe": loaded.recipe}  # the base gets the prompts as the tuned model sees them
    pairs = zip(prompts, generate(base, prompts, **options), generate(loaded, prompts, **options))
    return [{"prompt": p, "base": b, "tuned": t} for p, b, t in pairs]


def shown(result: dict[str, Any]) -> str:
    """A result as printed for one prompt."""
    if "tuned" in result:
        return f"[base]  {result['base']}\n[tuned] {result['tuned']}"
    if "probabilities" in result:
        probabilities = result["probabilities"].items()
        return result["label"] + "".join(f"\n  {name}: {p:.4f}" for name, p in probabilities)
    return result["output"]


def prompt_tokens(loaded, messages: list[dict[str, str]]) -> int:
    """How many tokens `messages` are once rendered as `generate` renders them."""
    rendered = render_prompt(loaded.tokenizer, messages, loaded.recipe)
    return len(loaded.tokenizer(rendered.text, add_special_tokens=rendered.add_special_tokens)["input_ids"])


def earliest_beyond_context(loaded, messages: list[dict[str, str]], new_tokens: int) -> int:
    """How many of the earliest messages (whole exchanges) to leave out so that the conversation and a reply
    of `new_tokens` fit the model's context; the last user turn always stays."""
    limit, dropped = context_length(loaded.model.config), 0
    if not limit:
        return 0
    while dropped + 1 < len(messages) and prompt_tokens(loaded, messages[dropped:]) + new_tokens > limit:
        dropped += 2  # a user turn and its reply
    return dropped


def converse(loaded, base, options: dict[str, Any]) -> None:
    """--interactive: each stdin line is a user turn. A chat model gets the conversation so far (a line
    "/clear" starts a new one); other models, and --compare, answer each line on its own."""
    chat = base is None and is_chat(loaded)
    if sys.stdin.isatty():
        print(f"type a prompt and press Enter ({'/clear: new conversation, ' * chat}Ctrl-D: quit)")
    history: list[dict[str, str]] = []
    for prompt in (line.strip() for line in sys.stdin):
        if chat and prompt == "/clear":
            history = []
            print("(new conversation)\n", flush=True)
        elif prompt:
            turn = [*history, {"role": "user", "content": prompt}] if chat else prompt
            if chat and (dropped := earliest_beyond_context(loaded, turn, options["max_new_tokens"])):
                turn = turn[dropped:]
                print(f"(the {dropped} earliest messages left out: with the reply the conversation passes "
                      f"the model's {context_length(loaded.model.config)}-token context)", flush=True)
            try:
                result = answer(loaded, base, [{"prompt": turn}], options)[0]
            except UserError as err:  # e.g. one text for a pair classifier: say so, keep the session
                print(f"error: {err.problems[0]}", file=sys.stderr, flush=True)
                continue
            history = [*turn, {"role": "assistant", "content": result["output"]}] if chat else []
            print(f">>> {prompt}\n{shown(result)}\n", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    options = generation_options(args)
    if args.prompt is not None and not args.prompt.strip():
        raise fail("<command line>", "--prompt", "is empty", "give the text to answer")
    if args.output_file and args.interactive:
        raise fail("<command line>", "--output-file", "not with --interactive",
                   "redirect stdout to keep an interactive session")
    if args.output_file:
        guard_output_file(args.output_file, args.overwrite)
    if args.pair is not None and args.prompt is None:
        raise fail("<command line>", "--pair", "needs --prompt (the first text)", "pass both")
    one = {"prompt": args.prompt} if args.pair is None else {"sentence1": args.prompt, "sentence2": args.pair}
    saved = saved_recipe_file(args.model)  # training's: read once, here, for `load` too
    recipe = load_recipe(args.recipe) if args.recipe else load_recipe(saved) if saved else None
    rows = read_inputs(args.input_file, recipe) if args.input_file else [one]
    if not args.interactive:
        classifier_inputs(rows, recipe)  # one text for a pair classifier: said before the weights load
    with progress_bars_off(args.no_progress):
        loaded, base = load(args.model, base=args.base, recipe=recipe), None
    if args.pair is not None and loaded.task != "seq_cls":
        raise fail(args.model, "--pair", "is for classifiers; this model generates", "put both in --prompt")
    if args.compare:
        if loaded.task == "seq_cls":
            raise fail(args.model, "--compare", "compare is for generative models",
                       "use lora_ns.evaluate for classifiers")
        if not (args.base or loaded.base):
            raise fail("<command line>", "--base", "needed when --model is not an adapter folder",
                       "pass --base MODEL")
        with progress_bars_off(args.no_progress):
            base = load(args.base or loaded.base)
    if args.interactive:
        converse(loaded, base, {**options, "progress": False})
        return 0
    progress = not args.no_progress and args.input_file is not None
    results = answer(loaded, base, rows, {**options, "progress": progress})
    if not args.compare:
        results = [{**row, **result} for row, result in zip(rows, results)]
    if args.output_file:
        (write_json_atomic if args.compare else write_jsonl_atomic)(args.output_file, results)
        what = "comparisons" if args.compare else "results"
        print(f"wrote {len(results)} {what} to {args.output_file}", file=sys.stderr)
    elif args.prompt is not None:
        print(shown(results[0]))
    elif args.compare:
        print(json.dumps(results, ensure_ascii=False, indent=2))
    else:
        for result in results:
            print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(PROG, lambda: main(sys.argv[1:])))
