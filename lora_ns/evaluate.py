"""``python -m lora_ns.evaluate RECIPE.yaml --adapter OUT_DIR``: score a model on the recipe's eval split.

What is measured follows the data:

- seq_cls: accuracy, F1, precision, recall of the predicted class;
- math formatters (gsm8k, metamath): greedy generation, final number extracted
  (`lora_ns.answers`), exact-match accuracy;
- other generative data (alpaca_zh, code_feedback, ...): greedy generation scored with BLEU and
  ROUGE-L against the reference answer (per character for Chinese), plus perplexity;
- cpt (plain text): perplexity.

Perplexity is exp of TRL's eval loss, computed by SFTTrainer.evaluate on the examples rendered
exactly as in training (so it is comparable to the training log's eval_loss).

The eval split is ``dataset.val_split`` (a split name, a file, or the fraction held out of train),
read with `lora_ns.data.formatted_examples`, which yields exactly the rows training evaluated on.
``--split`` or ``--data-file`` evaluate elsewhere. Writes metrics.json and predictions.jsonl to
``--output-dir`` (default ``ADAPTER_DIR/eval/``).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lora_ns.command_line import CommandParser
from lora_ns.errors import Problem, UserError, run_cli

PROG = "lora_ns.evaluate"
MATH_FORMATTERS = {"gsm8k", "metamath"}
METRICS_FILE, PREDICTIONS_FILE = "metrics.json", "predictions.jsonl"

# Flag names of the scripts lora_ns descends from (snake_case spellings are accepted anyway).
LEGACY_FLAGS = {"--adapter_path": "--adapter", "--model_path": "--model"}

def make_parser() -> argparse.ArgumentParser:
    parser = CommandParser(aliases=LEGACY_FLAGS, prog="python -m lora_ns.evaluate",
                                     description="Evaluate an adapter, merged or base model on a recipe's eval split.",
        epilog="Recipe overrides: key.sub=value, e.g. dataset.val_split=0.2")
    parser.add_argument("recipe", help="the recipe the model was trained with (e.g. OUT_DIR/recipe.yaml)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--adapter", help="training output dir (holds adapter_config.json)")
    which.add_argument("--model", help="merged dir, base model folder, hub id or builtin:<name>")
    parser.add_argument("--base", help="base model for --adapter (default: the one in adapter_config.json)")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--split", help="evaluate on this split of the recipe's dataset instead of val_split")
    data.add_argument("--data-file", help="evaluate on every row of this file (formatted by the recipe's formatter)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N examples")
    parser.add_argument("--output-dir", help="where metrics.json and predictions.jsonl go (default: MODEL_DIR/eval)")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier results in --output-dir")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


# --- the examples ------------------------------------------------------------------------------

def eval_kind(recipe) -> str:
    """classification | preference | math | generation | perplexity."""
    from lora_ns.data import get_formatter

    if recipe.task == "seq_cls":
        return "classification"
    if get_formatter(recipe.dataset.formatter).kind == "preference":
        return "preference"
    if recipe.task == "cpt" or get_formatter(recipe.dataset.formatter).kind == "text":
        return "perplexity"
    return "math" if recipe.dataset.formatter in MATH_FORMATTERS else "generation"


def eval_target(recipe, split: str | None = None, data_file: str | None = None) -> tuple[str | float, str]:
    """(what to pass as `formatted_examples`' split, a description of it)."""
    if data_file:
        if not Path(data_file).exists():
            raise UserError(Problem(data_file, "--data-file", "file not found", "check the path"))
        return data_file, data_file
    if split:
        return split, f"split {split}"
    cfg = recipe.dataset
    if isinstance(cfg.val_split, float):
        return cfg.val_split, f"{cfg.val_split} held out of {cfg.path} (seed {cfg.seed})"
    if cfg.val_split is not None:
        return cfg.val_split, f"val_split {cfg.val_split}"
    raise UserError(recipe.problem("dataset.val_split", "the recipe has no eval split",
                                   "set dataset.val_split, or pass --split NAME or --data-file FILE"))


def eval_examples(recipe, split: str | None = None, data_file: str | None = None,
                  limit: int | None = None) -> tuple[list[dict[str, Any]], str]:
    """Canonical (un-rendered) eval examples: with val_split, exactly the rows training evaluated on."""
    from lora_ns.data import formatted_examples

    target, where = eval_target(recipe, split, data_file)
    examples = list(formatted_examples(recipe, target, limit))
    if not examples:
        raise UserError(Problem(where, "", "no eval examples", "check the split / file"))
    return examples, where


def split_reference(example: dict[str, Any]) -> tuple[Any, str]:
    """(prompt to generate from, reference answer) of a prompt/completion or messages example."""
    if "messages" in example:
        messages = list(example["messages"])
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            return messages, ""
        return messages[:last], messages[last]["content"]
    return example["prompt"], example["completion"]


# --- scoring -----------------------------------------------------------------------------------

def score_classification(loaded, examples, args) -> tuple[dict[str, float], list[dict[str, Any]]]:
    from lora_ns.data import label_id
    from lora_ns.generation import classify
    from lora_ns.metrics import classification_metrics

    names, count = loaded.recipe.model.labels if loaded.recipe else None, loaded.model.config.num_labels
    results = classify(loaded, [(e["sentence1"], e.get("sentence2")) for e in examples],
                       batch_size=args.batch_size, progress=not args.no_progress)
    rows = [{"row": e.get("row"), "sentence1": e["sentence1"], "sentence2": e.get("sentence2"),
             "label": label_id(e["label"], names, count), "predicted": r["label_id"], "predicted_label": r["label"],
             "probabilities": r["probabilities"]} for e, r in zip(examples, results)]
    metrics = classification_metrics([r["predicted"] for r in rows], [r["label"] for r in rows],
                                     loaded.model.config.num_labels)
    return metrics, rows


def generate_answers(loaded, recipe, examples, args) -> list[dict[str, Any]]:
    from lora_ns.generation import generate

    prompts, references = zip(*(split_reference(e) for e in examples))
    outputs = generate(loaded, list(prompts), recipe=recipe, max_new_tokens=args.max_new_tokens, greedy=True,
                       batch_size=args.batch_size, progress=not args.no_progress)
    return [{"row": e.get("row"), "prompt": p, "reference": r, "prediction": o}
            for e, p, r, o in zip(examples, prompts, references, outputs)]


def score_math(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Fill in the extracted answers of each row; exact-match accuracy over them."""
    from lora_ns.answers import answers_match, extract_answer
    from lora_ns.metrics import exact_match

    for row in rows:
        row["reference_answer"] = extract_answer(row["reference"])
        row["predicted_answer"] = extract_answer(row["prediction"])
        row["correct"] = answers_match(row["predicted_answer"], row["reference_answer"])
    return {"exact_match": exact_match([r["predicted_answer"] for r in rows], [r["reference_answer"] for r in rows]),
            "answer_found": sum(r["predicted_answer"] is not None for r in rows) / len(rows)}


def mean_eval_loss(loaded, recipe, examples, batch_size: int, progress: bool = True) -> float:
    """TRL's eval loss on the examples rendered as in training (completion tokens only, as trained)."""
    import datasets
    import torch
    from trl import SFTConfig, SFTTrainer

    from lora_ns.data import render, sft_defaults

    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "right"
    rendered = datasets.Dataset.from_list([render(e, recipe, tokenizer) for e in examples])
    keep = ("max_length", "assistant_only_loss", "completion_only_loss", "dataset_text_field")
    options = {**sft_defaults(recipe), **{k: v for k, v in recipe.training.items() if k in keep}}
    with tempfile.TemporaryDirectory(prefix="lora_ns_eval_") as tmp:
        config = SFTConfig(output_dir=tmp, per_device_eval_batch_size=batch_size, report_to="none", bf16=False,
                           fp16=False, disable_tqdm=not progress,
                           dataloader_pin_memory=torch.cuda.is_available(), **options)
        # SFTTrainer insists on a train set; one row keeps its tokenizing cheap (it is never trained on).
        trainer = SFTTrainer(model=loaded.model, args=config, train_dataset=rendered.select([0]),
                             eval_dataset=rendered, processing_class=tokenizer)
        loss = trainer.evaluate()["eval_loss"]
    tokenizer.padding_side = "left"
    return float(loss)


def score_preference(loaded, recipe, examples) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Preference accuracy (chosen more likely than rejected) and the mean margin in nats, on held-out pairs."""
    from lora_ns.generation import reply_logprob

    rows = []
    for example in examples:
        margin = (reply_logprob(loaded, example["prompt"], example["chosen"], recipe)
                  - reply_logprob(loaded, example["prompt"], example["rejected"], recipe))
        rows.append({"row": example.get("row"), "prompt": example["prompt"], "margin": margin, "correct": margin > 0})
    return {"preference_accuracy": sum(r["correct"] for r in rows) / len(rows),
            "mean_margin": sum(r["margin"] for r in rows) / len(rows)}, rows


def run_evaluation(loaded, recipe, examples, args) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from lora_ns.metrics import generation_metrics, perplexity

    kind = eval_kind(recipe)
    if kind == "classification":
        metrics, rows = score_classification(loaded, examples, args)
    elif kind == "preference":
        metrics, rows = score_preference(loaded, recipe, examples)
    elif kind == "perplexity":
        rows = [{"row": e.get("row"), "text": e["text"]} for e in examples]
        metrics = {}
    else:
        rows = generate_answers(loaded, recipe, examples, args)
        if kind == "math":
            metrics = score_math(rows)
        else:
            metrics = generation_metrics([r["prediction"] for r in rows], [r["reference"] for r in rows])
    if kind in ("generation", "perplexity"):
        loss = mean_eval_loss(loaded, recipe, examples, args.batch_size, progress=not args.no_progress)
        metrics.update({"eval_loss": loss, "perplexity": perplexity(loss)})
    return {"kind": kind, **metrics}, rows


# --- command line ------------------------------------------------------------------------------

def default_output_dir(model: str) -> Path:
    if Path(model).is_dir():
        return Path(model) / "eval"
    return Path("outputs") / "eval" / re.sub(r"[^\w.-]+", "_", model)


def main(argv: list[str] | None = None) -> int:
    args, overrides = make_parser().parse_known_args(argv)
    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise UserError(Problem("<command line>", flag, "must be at least 1", "use 1 or more"))
    from lora_ns.fileio import guard_output_file, write_json_atomic, write_jsonl_atomic
    from lora_ns.config import load_recipe

    model_path = args.adapter or args.model
    if args.adapter and not Path(args.adapter).is_dir():
        raise UserError(Problem(args.adapter, "--adapter", "folder not found", "point it at a training output_dir"))
    out = Path(args.output_dir) if args.output_dir else default_output_dir(model_path)
    for name in (METRICS_FILE, PREDICTIONS_FILE):
        guard_output_file(out / name, args.overwrite, "--output-dir")
    recipe = load_recipe(args.recipe, overrides)  # schema only: training-time rules don't apply here
    examples, where = eval_examples(recipe, args.split, args.data_file, args.limit)

    from lora_ns.inference_model import load_for_inference

    started = time.time()
    loaded = load_for_inference(model_path, base=args.base, recipe=recipe)
    metrics, rows = run_evaluation(loaded, recipe, examples, args)
    metrics = {**metrics, "num_examples": len(rows), "model": model_path, "model_kind": loaded.kind,
               "data": where, "recipe": args.recipe, "seconds": round(time.time() - started, 1)}
    write_jsonl_atomic(out / PREDICTIONS_FILE, rows)
    write_json_atomic(out / METRICS_FILE, metrics)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float) and k != "seconds")
    print(f"{metrics['kind']} on {len(rows)} examples ({where}): {shown}")
    print(f"wrote {out / METRICS_FILE} and {out / PREDICTIONS_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(PROG, lambda: main(sys.argv[1:])))
