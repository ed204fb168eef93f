"""``python -m lora_ns.evaluate [RECIPE.yaml] --adapter OUT_DIR``: score a model on the recipe's eval split
(default recipe: the one training saved in OUT_DIR).

What is measured follows the data (`eval_kind`); ``--metric`` adds any Hugging Face `evaluate` metric
on the same predictions and references. Perplexity is exp of TRL's eval loss on the examples rendered
as in training, so it matches the training log's eval_loss; by default the eval rows are exactly the
ones training evaluated on (``dataset.val_split`` through `lora_ns.data.formatted_examples`).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lora_ns.answers import extract_answer
from lora_ns.checkpoints import RECIPE_FILE, saved_recipe_file
from lora_ns.command_line import CommandParser, at_least_one
from lora_ns.config import load_recipe
from lora_ns.data import FORMATTERS, formatted_examples, label_id, render, sft_defaults
from lora_ns.data.loading import progress_bars_off
from lora_ns.data.sources import looks_local, resolve_sample
from lora_ns.errors import UserError, fail, program, require, run_cli
from lora_ns.fileio import guard_output_file, write_json_atomic, write_jsonl_atomic
from lora_ns.inference import classify, generate, load, pair_of, preference_ids, prompt_and_reference
from lora_ns.metrics import (classification_metrics, generation_metrics, library_metric, math_metrics,
                             perplexity)

PROG = "lora_ns.evaluate"
MATH_FORMATTERS = {"gsm8k", "metamath"}
METRICS_FILE, PREDICTIONS_FILE = "metrics.json", "predictions.jsonl"


def make_parser() -> argparse.ArgumentParser:
    parser = CommandParser(aliases={"--adapter_path": "--adapter", "--model_path": "--model"},
                           prog="python -m lora_ns.evaluate",
                           description="Evaluate an adapter, merged or base model on a recipe's eval split.",
                           epilog="Recipe overrides: key.sub=value, e.g. dataset.val_split=0.2",
                           paths=("recipe", "adapter", "model", "base", "data_file", "output_dir"))
    parser.add_argument("recipe", nargs="?", help="the recipe the model was trained with (default: the "
                        "recipe.yaml training saved beside the adapter or model)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--adapter", help="training output dir (holds adapter_config.json)")
    which.add_argument("--model", help="merged dir, base model folder, hub id or builtin:<name>")
    parser.add_argument("--base", help="base model for --adapter (default: the one in adapter_config.json)")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--split", help="evaluate on this split of the recipe's dataset instead of val_split "
                      "(train: the rows training used)")
    data.add_argument("--data-file", help="every row of this file (read by the recipe's formatter)")
    parser.add_argument("--limit", type=at_least_one, help="evaluate only the first N examples")
    parser.add_argument("--metric", action="append", default=[], metavar="NAME_OR_PATH",
                        help="also report this Hugging Face evaluate metric (repeatable)")
    parser.add_argument("--output-dir", help="for metrics.json, predictions.jsonl (default: MODEL_DIR/eval)")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier results in --output-dir")
    parser.add_argument("--batch-size", type=at_least_one, default=8)
    parser.add_argument("--max-new-tokens", type=at_least_one, default=256)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def eval_kind(recipe) -> str:
    """classification (sklearn), preference (accuracy, margin), unpaired (KTO: log-probs of desirable and
    undesirable replies), math (exact match of a greedy answer: GSM8K, MetaMath, GRPO's prompts), generation
    (BLEU, ROUGE-L, perplexity) or perplexity (cpt and plain text)."""
    kind = FORMATTERS[recipe.dataset.formatter].kind
    if recipe.task == "seq_cls":
        return "classification"
    if kind in ("preference", "unpaired"):
        return kind
    if recipe.task == "cpt" or kind == "text":
        return "perplexity"
    # GRPO's prompts have no completion to take a loss on; their answer is what the rewards compare with
    return "math" if recipe.dataset.formatter in MATH_FORMATTERS or kind == "prompt_only" else "generation"


def eval_examples(recipe, split: str | None, data_file: str | None, limit: int | None) -> tuple[list, str]:
    """Canonical (un-rendered) eval examples and where they come from."""
    cfg = recipe.dataset
    if data_file and not Path(data_file).exists():
        raise fail(data_file, "--data-file", "file not found", "check the path")
    if not (data_file or split or cfg.val_split is not None):
        raise UserError(recipe.problem("dataset.val_split", "the recipe has no eval split",
                                       "set dataset.val_split, or pass --split NAME or --data-file FILE"))
    if split and split != "train" and looks_local(cfg.path) and not Path(resolve_sample(cfg.path)).is_dir():
        raise fail("<command line>", "--split", f"{cfg.path} is one data set, without named splits",
                   "pass the eval rows with --data-file FILE (--split train: the rows training used)")
    where = data_file or (f"split {split}" if split else f"val_split {cfg.val_split}")
    if not (data_file or split) and isinstance(cfg.val_split, float):
        where = f"{cfg.val_split} held out of {cfg.path} (seed {cfg.seed})"
    rows = data_file or split or cfg.val_split
    if split == "train":  # the rows build_datasets trains on: max_samples, less a held-out fraction
        where, rows = f"the rows training used of {cfg.path}", None
    with progress_bars_off():  # datasets' "Generating train split" before evaluate's own report
        examples = list(formatted_examples(recipe, rows, limit))
    if not examples:
        raise fail(where, "", "no eval examples", "check the split / file")
    return examples, where


def check_references(references: list[str], where: str) -> None:
    """Exact match compares final answers: a reference without one scores every prediction wrong. None with
    one is an error before the model loads; some without, a warning."""
    missing = sum(extract_answer(r) is None for r in references)
    what = f"{missing} of {len(references)} references hold no final answer ('#### 42', 'The answer is 42')"
    if missing == len(references):
        raise fail(where, "reference", f"{what}: exact match would be 0 whatever the model says",
                   "check the eval rows' answer column (dataset.columns), or evaluate with --data-file")
    if missing:
        print(f"{program(PROG)}: warning: {where}: {what}; they count as wrong", file=sys.stderr)


def mean_eval_loss(loaded, recipe, examples, batch_size: int, progress: bool = True) -> float:
    """TRL's eval loss on the examples rendered as in training (completion tokens only, as trained)."""
    import datasets
    import torch
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    tokenizer = loaded.tokenizer
    rendered = datasets.Dataset.from_list([render(e, recipe, tokenizer) for e in examples])
    keep = ("max_length", "assistant_only_loss", "completion_only_loss", "dataset_text_field")
    options = {**sft_defaults(recipe), **{k: v for k, v in recipe.training.items() if k in keep}}
    with tempfile.TemporaryDirectory(prefix="lora_ns_eval_") as tmp:
        config = SFTConfig(output_dir=tmp, per_device_eval_batch_size=batch_size, report_to="none",
                           bf16=False, fp16=False, disable_tqdm=not progress,
                           dataloader_pin_memory=torch.cuda.is_available(), **options)
        # SFTTrainer insists on a train set; one row keeps its tokenizing cheap (it is never trained on).
        trainer = SFTTrainer(model=loaded.model, args=config, train_dataset=rendered.select([0]),
                             eval_dataset=rendered, processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # its dict of eval logs on stdout, beside evaluate's report
        return float(trainer.evaluate()["eval_loss"])


def reply_logprobs(loaded, example: dict[str, Any], recipe) -> list[tuple[float, int]]:
    """(log p(reply | prompt) in nats, its token count) for each reply of a preference row (chosen, rejected)
    or a KTO row (its completion), over the tokens TRL's trainers train on: the row rendered by training's
    own `render` (system prompt, chat template or prompt_template), each reply as the assistant turn (its
    end-of-turn token included) or, as plain text, followed by EOS. Replies start at the first token where
    the prompt alone and prompt + a reply differ (TRL's `common_prefix_length`)."""
    import torch

    model = loaded.model
    start, fulls = preference_ids(example, recipe, loaded.tokenizer)
    scores = []
    for full in fulls:
        ids = torch.tensor([full], device=model.device)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        picked = logprobs.gather(-1, ids[0, 1:, None])[start - 1:]
        scores.append((float(picked.sum()), len(picked)))
    return scores


def preference_margin(loaded, example: dict[str, Any], recipe) -> float:
    """log p(chosen | prompt) - log p(rejected | prompt) in nats (`reply_logprobs`)."""
    (chosen, _), (rejected, _) = reply_logprobs(loaded, example, recipe)
    return chosen - rejected


def unpaired_metrics(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """KTO's rows: the mean log-prob per token of the desirable and of the undesirable replies, and their gap
    (per token: unpaired replies differ in length, which a sum would mostly measure)."""
    means = {}
    for name, good in (("desirable", True), ("undesirable", False)):
        scores = [r["logp_per_token"] for r in rows if r["label"] == good]
        means[f"{name}_logp_per_token"] = sum(scores) / len(scores) if scores else None
    both = None not in means.values()
    return {**means, "kto_margin": means["desirable_logp_per_token"] - means["undesirable_logp_per_token"]
            if both else None}


def run_evaluation(kind: str, loaded, recipe, examples, args) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    progress, count = not args.no_progress, loaded.model.config.num_labels
    if kind == "classification":
        pairs = [pair_of(e) for e in examples]
        results = classify(loaded, pairs, batch_size=args.batch_size, progress=progress)
        rows = [{"row": e.get("row"), "sentence1": e["sentence1"], "sentence2": e.get("sentence2"),
                 "label": label_id(e["label"], recipe.model.labels, count), "predicted": r["label_id"],
                 "predicted_label": r["label"], "probabilities": r["probabilities"]}
                for e, r in zip(examples, results)]
        metrics = classification_metrics([r["predicted"] for r in rows], [r["label"] for r in rows], count)
    elif kind == "preference":  # margin: log p(chosen) - log p(rejected) in nats, on held-out pairs
        margins = [preference_margin(loaded, e, recipe) for e in examples]
        rows = [{"row": e.get("row"), "prompt": e["prompt"], "margin": m, "correct": m > 0}
                for e, m in zip(examples, margins)]
        metrics = {"preference_accuracy": sum(r["correct"] for r in rows) / len(rows),
                   "mean_margin": sum(r["margin"] for r in rows) / len(rows)}
    elif kind == "unpaired":  # KTO: how likely the desirable replies are against the undesirable ones
        scores = [reply_logprobs(loaded, e, recipe)[0] for e in examples]
        rows = [{"row": e.get("row"), "prompt": e["prompt"], "label": e["label"],
                 "logp_per_token": total / count} for e, (total, count) in zip(examples, scores)]
        metrics = unpaired_metrics(rows)
    elif kind == "perplexity":
        rows, metrics = [{"row": e.get("row"), "text": e["text"]} for e in examples], {}
    else:
        prompts, refs = map(list, zip(*(prompt_and_reference(e) for e in examples)))
        outputs = generate(loaded, prompts, recipe=recipe, max_new_tokens=args.max_new_tokens, greedy=True,
                           batch_size=args.batch_size, progress=progress)
        rows = [{"row": e.get("row"), "prompt": p, "reference": r, "prediction": o}
                for e, p, r, o in zip(examples, prompts, refs, outputs)]
        metrics = math_metrics(rows) if kind == "math" else generation_metrics(outputs, refs)
    if kind in ("generation", "perplexity"):
        loss = mean_eval_loss(loaded, recipe, examples, args.batch_size, progress=progress)
        metrics.update({"eval_loss": loss, "perplexity": perplexity(loss)})
    return metrics, rows


def main(argv: list[str] | None = None) -> int:
    args, overrides = make_parser().parse_known_args(argv)
    model_path = args.adapter or args.model
    if args.adapter and not Path(args.adapter).is_dir():
        raise fail(args.adapter, "--adapter", "folder not found", "point it at an output_dir")
    named = Path("outputs", "eval", re.sub(r"[^\w.-]+", "_", model_path))
    out = Path(args.output_dir or (Path(model_path) / "eval" if Path(model_path).is_dir() else named))
    for name in (METRICS_FILE, PREDICTIONS_FILE):
        guard_output_file(out / name, args.overwrite, "--output-dir")
    if args.recipe and "=" in args.recipe and not Path(args.recipe).exists():  # an override, no recipe
        overrides, args.recipe = [args.recipe, *overrides], None
    if args.recipe is None and not (saved := saved_recipe_file(model_path)):
        raise fail(model_path, "--adapter" if args.adapter else "--model", f"no {RECIPE_FILE} there to "
                   "evaluate with", "pass the recipe the model was trained with before --adapter/--model")
    args.recipe = args.recipe or str(saved)
    recipe = load_recipe(args.recipe, overrides)  # schema only: training-time rules don't apply here
    kind = eval_kind(recipe)
    if args.metric and kind in ("preference", "unpaired", "perplexity"):
        raise fail("<command line>", "--metric", f"{kind} evaluation has no predictions to score",
                   "drop --metric for this recipe")
    library = [library_metric(name) for name in args.metric]  # before the model: a bad name fails fast
    if kind == "generation":  # BLEU/ROUGE are the `metrics` extra: check before the model
        require("sacrebleu", "metrics", "BLEU")
        require("rouge_score.rouge_scorer", "metrics", "ROUGE-L")
    examples, where = eval_examples(recipe, args.split, args.data_file, args.limit)
    if kind == "math":
        check_references([prompt_and_reference(e)[1] for e in examples], where)

    started = time.time()
    with progress_bars_off(args.no_progress):
        loaded = load(model_path, base=args.base, recipe=recipe)
    metrics, rows = run_evaluation(kind, loaded, recipe, examples, args)
    predicted, reference = ("predicted", "label") if kind == "classification" else ("prediction", "reference")
    for metric in library:  # beside ours, on the same predictions and references
        scores = metric.compute(predictions=[r[predicted] for r in rows],
                                references=[r[reference] for r in rows])
        metrics.update({f"{metric.name}/{key}": value for key, value in (scores or {}).items()})
    metrics = {"kind": kind, **metrics, "num_examples": len(rows), "model": model_path,
               "model_kind": loaded.kind, "data": where, "recipe": args.recipe,
               "seconds": round(time.time() - started, 1)}
    write_jsonl_atomic(out / PREDICTIONS_FILE, rows)
    write_json_atomic(out / METRICS_FILE, metrics)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float) and k != "seconds")
    print(f"{kind} on {len(rows)} examples ({where}): {shown}")
    print(f"wrote {out / METRICS_FILE} and {out / PREDICTIONS_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(PROG, lambda: main(sys.argv[1:])))
