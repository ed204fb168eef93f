"""Sequence classification: the head trains and is saved with the adapter, eval reports the metrics."""

from __future__ import annotations

import json

import pytest

from lora_ns.config import parse_recipe

LABELS = ["not_equivalent", "equivalent"]


def seq_cls_recipe(out, method: str = "lora", **peft):
    return parse_recipe({
        "task": "seq_cls",
        "model": {"name_or_path": "builtin:tiny-bert", "dtype": "fp32", "num_labels": 2, "labels": LABELS},
        "peft": {"method": method, **peft},
        "dataset": {"path": "sample:glue_mrpc", "formatter": "glue_mrpc", "max_samples": 20,
                    "val_split": 0.2, "seed": 0},
        # one batch of the 16 training rows per step, so first and last losses are comparable
        "training": {"output_dir": str(out), "max_steps": 12, "per_device_train_batch_size": 16,
                     "learning_rate": 1e-2, "lr_scheduler_type": "constant", "logging_steps": 1,
                     "eval_strategy": "steps", "eval_steps": 6, "seed": 0, "report_to": "none",
                     "save_strategy": "no"},
    }, source="test.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert):
    """One LoRA seq_cls run shared by the tests below: (trainer, summary, output dir)."""
    from lora_ns.train import run_training

    out = tmp_path_factory.mktemp("seq_cls") / "out"
    trainer, summary = run_training(seq_cls_recipe(out, r=8, lora_alpha=16, target_modules=["query", "value"]))
    return trainer, summary, out


def batch(tiny_bert):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    return tokenizer(["The cat sat on the mat.", "Shares rose 4 percent."],
                     ["A cat was sitting on the mat.", "The market fell."], padding=True, return_tensors="pt")


def logits_of(model, inputs):
    import torch

    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def test_loss_goes_down_and_eval_reports_classification_metrics(trained):
    trainer, summary, _ = trained
    assert summary["last_loss"] < summary["first_loss"] - 0.02, summary
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert len(evals) == 2
    for key in ("eval_accuracy", "eval_f1", "eval_precision", "eval_recall"):
        assert 0.0 <= evals[-1][key] <= 1.0
    assert summary["eval"]["eval_accuracy"] == evals[-1]["eval_accuracy"]


def test_batch_eval_metrics_scores_the_whole_eval_set(tmp_path, tiny_bert):
    """With batch_eval_metrics the Trainer refused our metrics as it started (no `compute_result`); now they
    come a batch at a time and are scored once over all of them, as without it (and as unconcatenated)."""
    from lora_ns.train import run_training

    recipe = seq_cls_recipe(tmp_path / "out", r=4, target_modules=["query", "value"])
    recipe.training.update(max_steps=1, eval_steps=1, batch_eval_metrics=True, per_device_eval_batch_size=1)
    recipe.dataset.val_split = 0.5  # 10 rows of both labels: a score of the last batch alone would differ
    trainer, _ = run_training(recipe)
    batched = trainer.evaluate()
    trainer.args.batch_eval_metrics = False
    whole = trainer.evaluate()
    keys = ("eval_accuracy", "eval_f1", "eval_precision", "eval_recall")
    assert len(trainer.eval_dataset) == 10 and 0 < whole["eval_accuracy"] < 1, whole
    assert [batched[k] for k in keys] == [whole[k] for k in keys]
    trainer.args.eval_do_concat_batches = False  # a list of batches: our metrics crashed ('list'.argmax)
    assert [trainer.evaluate()[k] for k in keys] == [whole[k] for k in keys]


def test_saved_adapter_reloads_to_identical_logits(trained, tiny_bert):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    trainer, _, out = trained
    inputs = batch(tiny_bert)
    expected = logits_of(trainer.model, inputs)
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    untrained = logits_of(fresh, inputs)
    reloaded = logits_of(PeftModel.from_pretrained(fresh, str(out)), inputs)
    assert torch.equal(reloaded, expected)
    assert not torch.allclose(untrained, expected)  # training changed the model, so equality means something


def test_head_is_trained_and_saved_with_class_names(trained):
    from safetensors import safe_open

    trainer, _, out = trained
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as saved:
        keys = list(saved.keys())
    assert any("classifier" in k for k in keys) and any("lora_A" in k for k in keys)
    assert trainer.model.config.id2label == dict(enumerate(LABELS))
    assert json.loads((out / "run_summary.json").read_text())["task"] == "seq_cls"


def test_full_fine_tune_reloads_with_label_names(tmp_path, tiny_bert):
    import torch
    from transformers import AutoModelForSequenceClassification

    from lora_ns.train import run_training

    recipe = seq_cls_recipe(tmp_path / "out", "full")
    recipe.training.update(learning_rate=1e-3, max_steps=6, eval_steps=6)
    trainer, summary = run_training(recipe)
    assert summary["trainable_params"] == summary["total_params"]
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert reloaded.config.id2label == dict(enumerate(LABELS))
    inputs = batch(tiny_bert)
    assert torch.equal(logits_of(reloaded, inputs), logits_of(trainer.model, inputs))


def test_max_length_cuts_long_pairs_and_validate_reports_it(tmp_path, tiny_bert, capsys):
    """training.max_length is the classifier's truncation (TrainingArguments has none); without it rows are
    cut at the model's limit. MRPC pairs run 40-90 tokens on the tiny tokenizer."""
    from lora_ns.model import load_model, load_tokenizer
    from lora_ns.setup import training_arguments
    from lora_ns.train import build_trainer
    from lora_ns.data import build_datasets
    from lora_ns.validate.__main__ import main as validate_main

    def lengths(recipe) -> list[int]:
        tokenizer = load_tokenizer(recipe)
        trainer = build_trainer(recipe, training_arguments(recipe), load_model(recipe, tokenizer), tokenizer,
                                *build_datasets(recipe, tokenizer))
        return [len(row["input_ids"]) for row in trainer.train_dataset]

    base = seq_cls_recipe(tmp_path / "out").model_dump(exclude_unset=True)
    cut = parse_recipe({**base, "training": {**base["training"], "max_length": 24}}, "cut.yaml")
    assert max(lengths(seq_cls_recipe(tmp_path / "out"))) > 24 and max(lengths(cut)) == 24
    (tmp_path / "cut.yaml").write_text(cut.to_yaml(), encoding="utf-8")
    capsys.readouterr()
    assert validate_main([str(tmp_path / "cut.yaml")]) == 0
    assert "exceed training.max_length=24 and will be truncated" in capsys.readouterr().err

    import torch

    from conftest import make_adapter
    from lora_ns.inference import classify, load

    loaded = load(str(make_adapter(tmp_path / "adapter", cut)))  # infer and evaluate cut rows as training did
    pair = ("The company said its quarterly profit rose sharply on strong demand for its products. " * 2,
            "Quarterly profit at the company rose sharply, it said, on strong product demand. " * 2)
    (result,) = classify(loaded, [pair], progress=False)
    enc = loaded.tokenizer(*pair, truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        expected = torch.softmax(loaded.model(**enc).logits.float(), dim=-1)[0].tolist()
    assert list(result["probabilities"].values()) == pytest.approx(expected, abs=1e-6)
    # a file mixing pairs and single texts: each batch is one kind (the pair's second text was dropped)
    mixed = classify(loaded, [(pair[0], None), pair, (pair[1], None)], progress=False)
    alone = classify(loaded, [(pair[0], None)], progress=False)[0]
    assert mixed[1] == result and mixed[0]["label"] == alone["label"]  # the pair batched alone: same numbers
    # padded beside a longer text: masked, so equal up to fp32 summation order (~1e-7) and the 6-digit rounding
    assert list(mixed[0]["probabilities"].values()) == pytest.approx(list(alone["probabilities"].values()),
                                                                     abs=2e-6)


def test_the_generic_pair_formatter_saves_what_it_trained_on_for_inference(tmp_path, tiny_bert):
    from lora_ns.config import load_recipe
    from lora_ns.infer import takes_pairs
    from lora_ns.train import run_training

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"sentence1": f"a{i}", "sentence2": f"b{i}", "label": i % 2}) + "\n"
                            for i in range(4)), encoding="utf-8")
    recipe = seq_cls_recipe(tmp_path / "out")
    recipe.dataset = recipe.dataset.model_copy(update={"path": str(data), "formatter": "pair",
                                                       "max_samples": None, "val_split": None})
    recipe.training.update(max_steps=1, eval_strategy="no")
    assert not takes_pairs(recipe)  # `pair` takes one text or two: the data says which
    run_training(recipe)
    saved = load_recipe(tmp_path / "out" / "recipe.yaml")
    assert saved.dataset.pairs is True and takes_pairs(saved)
