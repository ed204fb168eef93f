"""Benchmark: dev accuracy/F1 of lora_ns's glue_mrpc recipe vs a plain peft + PyTorch loop, on real MRPC.

    OMP_NUM_THREADS=2 python bench/quality_mrpc.py                     # 3 seeds each side, ~15 min on 2 cores
    python bench/quality_mrpc.py --seeds 0 --max-train-rows 512        # a quick look
    python bench/quality_mrpc.py --data /path/to/mrpc                  # the folder with train.tsv and dev.tsv

Not a test. The data are the original GLUE MRPC TSV files (train 3,668 / dev 408 rows; UTF-8 with a
BOM, no quoting: some sentences hold an unbalanced ``"``); they are read in place, never copied.

- ``lora_ns``: ``recipes/glue_mrpc.yaml`` through lora_ns's own train path
  (`lora_ns.setup.check_recipe_file` + `lora_ns.train.run_training`, as ``python -m lora_ns.train``
  does) with overrides: model ``builtin:minilm-l6``, the TSV files, the settings below; dev scores are
  the Trainer's end-of-epoch eval.
- ``plain``: `plain_run` below, what a user writes by hand: transformers AutoModelForSequenceClassification,
  peft LoraConfig (task SEQ_CLS, so the head is trained and saved), torch AdamW, a linear schedule,
  a shuffled DataLoader with dynamic padding, and an argmax over the dev logits scored by scikit-learn.

Same settings on both sides: LoRA r 16, alpha 32, dropout 0.1 on query, key, value, dense; lr 1e-3 linear
to 0, no warm-up; batch 32; AdamW (weight decay 0.01 as the recipe sets); gradient clipping at 1.0
(the Trainer's default); truncation at the model's max length; 1 epoch; fp32 on CPU. Prints per-seed
accuracy/F1, mean and spread (sample standard deviation) per side, the gap, and one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "builtin:minilm-l6"
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": ["query", "key", "value", "dense"]}
TRAIN = {"learning_rate": 1e-3, "batch_size": 32, "epochs": 1, "weight_decay": 0.01, "max_grad_norm": 1.0}


def read_tsv(path: Path, limit: int | None = None) -> list[dict]:
    """GLUE's MRPC TSV: BOM, no quoting (sentences hold unbalanced quotes)."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = [{"s1": r["#1 String"], "s2": r["#2 String"], "label": int(r["Quality"])} for r in rows]
    return rows[:limit] if limit else rows


def recipe_overrides(data: Path, seed: int, limit: int | None, out: str) -> list[str]:
    overrides = [
        f"model.name_or_path={MODEL}", f"dataset.path={data / 'train.tsv'}", "dataset.name=null",
        f"dataset.val_split={data / 'dev.tsv'}", f"peft.r={LORA['r']}",
        f"peft.lora_alpha={LORA['lora_alpha']}", f"peft.lora_dropout={LORA['lora_dropout']}",
        f"peft.target_modules=[{','.join(LORA['target_modules'])}]",
        f"training.learning_rate={TRAIN['learning_rate']}", "training.warmup_steps=0",
        f"training.num_train_epochs={TRAIN['epochs']}",
        f"training.per_device_train_batch_size={TRAIN['batch_size']}",
        f"training.weight_decay={TRAIN['weight_decay']}", f"training.seed={seed}",
        f"training.output_dir={out}", "training.save_strategy=no", "training.load_best_model_at_end=false",
        "training.report_to=none", "training.disable_tqdm=true", "training.logging_steps=1000",
    ]
    return overrides + ([f"dataset.max_samples={limit}"] if limit else [])


def lora_ns_run(data: Path, seed: int, limit: int | None, out: str) -> dict:
    """lora_ns's own path: the recipe + overrides, checked and trained as `python -m lora_ns.train` does."""
    from lora_ns.train import run_training
    from lora_ns.setup import check_recipe_file

    overrides = recipe_overrides(data, seed, limit, out)
    recipe = check_recipe_file(REPO / "recipes" / "glue_mrpc.yaml", overrides, for_training=True)
    _, summary = run_training(recipe)
    return {"accuracy": summary["eval"]["eval_accuracy"], "f1": summary["eval"]["eval_f1"]}


def plain_model(seed: int):
    """The hand-written model: seeded, then the base model with its new head, then peft's LoRA."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

    from lora_ns.builtin_models import resolve_model_path

    path = resolve_model_path(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    return get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, **LORA)), tokenizer


def check_init(data: Path, seed: int) -> int:
    """How many parameters (head and LoRA included) differ at the start between the two sides; 0 expected."""
    import torch

    from lora_ns.setup import check_recipe_file, training_arguments
    from lora_ns.train import prepare

    with tempfile.TemporaryDirectory(prefix="quality_mrpc_") as tmp:
        recipe = check_recipe_file(REPO / "recipes" / "glue_mrpc.yaml", recipe_overrides(data, seed, 64, tmp))
        theirs = dict(prepare(recipe, training_arguments(recipe))[0].model.named_parameters())
    ours = dict(plain_model(seed)[0].named_parameters())
    trainable = ({k for k, p in theirs.items() if p.requires_grad}
                 == {k for k, p in ours.items() if p.requires_grad})
    differ = [k for k in ours if k not in theirs or not torch.equal(ours[k], theirs[k])]
    print(f"init check, seed {seed}: {len(differ)} of {len(ours)} parameters differ {differ[:3]}; "
          f"same trainable set: {trainable}")
    return len(differ) + (not trainable)


def plain_run(data: Path, seed: int, limit: int | None) -> dict:
    """A hand-written peft + PyTorch loop with the same settings."""
    import torch
    from sklearn.metrics import accuracy_score, f1_score
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

    model, tokenizer = plain_model(seed)
    max_length = min(tokenizer.model_max_length, model.config.max_position_embeddings)

    def encode(rows):
        enc = tokenizer([r["s1"] for r in rows], [r["s2"] for r in rows], truncation=True,
                        max_length=max_length)
        return [{"input_ids": i, "attention_mask": a, "token_type_ids": t, "labels": r["label"]}
                for i, a, t, r in zip(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], rows)]

    collate = DataCollatorWithPadding(tokenizer)
    train = DataLoader(encode(read_tsv(data / "train.tsv", limit)), batch_size=TRAIN["batch_size"],
                       shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(seed))
    dev = DataLoader(encode(read_tsv(data / "dev.tsv")), batch_size=64, collate_fn=collate)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=TRAIN["learning_rate"], weight_decay=TRAIN["weight_decay"])
    schedule = get_linear_schedule_with_warmup(optimizer, 0, len(train) * TRAIN["epochs"])
    model.train()
    for _ in range(TRAIN["epochs"]):
        for batch in train:
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, TRAIN["max_grad_norm"])
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for batch in dev:
            labels += batch.pop("labels").tolist()
            preds += model(**batch).logits.argmax(-1).tolist()
    return {"accuracy": accuracy_score(labels, preds), "f1": f1_score(labels, preds)}


def summarize(runs: list[dict]) -> dict:
    out = {}
    for key in ("accuracy", "f1"):
        values = [r[key] for r in runs]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        out[key] = {"mean": statistics.mean(values), "sd": spread}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mrpc",
                        help="folder holding MRPC's train.tsv and dev.tsv (default: ../shared/data/mrpc)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--max-train-rows", type=int, default=None, help="train on the first N rows only")
    parser.add_argument("--sides", default="lora_ns,plain")
    parser.add_argument("--check-init", action="store_true",
                        help="only check that both sides start from identical parameters (exit 1 if not)")
    args = parser.parse_args()
    for name in ("train.tsv", "dev.tsv"):
        if not (args.data / name).is_file():
            print(f"quality_mrpc: {args.data / name}: not found; pass --data FOLDER with MRPC's TSV files")
            return 2
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.check_init:
        return 1 if any(check_init(args.data, seed) for seed in seeds) else 0
    sides = args.sides.split(",")
    results: dict[str, list[dict]] = {side: [] for side in sides}
    for seed in seeds:
        for side in sides:
            started = time.time()
            with tempfile.TemporaryDirectory(prefix="quality_mrpc_") as tmp:
                scores = (lora_ns_run(args.data, seed, args.max_train_rows, tmp) if side == "lora_ns"
                          else plain_run(args.data, seed, args.max_train_rows))
            scores.update(seed=seed, seconds=round(time.time() - started, 1))
            results[side].append(scores)
            print(f"{side:8s} seed {seed}: accuracy {scores['accuracy']:.4f}  F1 {scores['f1']:.4f}  "
                  f"({scores['seconds']} s)", flush=True)
    summary = {side: summarize(runs) for side, runs in results.items()}
    print(f"\n{'side':8s} {'accuracy mean ± sd':>20s} {'F1 mean ± sd':>20s}")
    for side, s in summary.items():
        print(f"{side:8s} {s['accuracy']['mean']:>12.4f} ± {s['accuracy']['sd']:.4f} "
              f"{s['f1']['mean']:>12.4f} ± {s['f1']['sd']:.4f}")
    if {"lora_ns", "plain"} <= summary.keys():
        gap = {k: summary["lora_ns"][k]["mean"] - summary["plain"][k]["mean"] for k in ("accuracy", "f1")}
        print(f"gap (lora_ns - plain): accuracy {gap['accuracy']:+.4f}  F1 {gap['f1']:+.4f}")
        summary["gap"] = gap
    print(json.dumps({"runs": results, "summary": summary, "max_train_rows": args.max_train_rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
