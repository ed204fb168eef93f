"""Evaluation end to end on the tiny models: metrics are computed from the predictions written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lora_ns.answers import answers_match, extract_answer
from lora_ns.errors import run_cli
from lora_ns.evaluate import main
from lora_ns.metrics import classification_metrics, generation_metrics, math_metrics

from conftest import QUICKSTART, make_adapter


def read_results(folder: Path) -> tuple[dict, list[dict]]:
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    return metrics, rows


@pytest.fixture(scope="module")
def gsm_adapter(tmp_path_factory, tiny_llama) -> Path:
    from lora_ns.config import load_recipe

    out = tmp_path_factory.mktemp("gsm") / "out"
    return make_adapter(out, load_recipe(QUICKSTART, [f"training.output_dir={out}", "peft.init_lora_weights=false"]))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_bert) -> Path:
    from lora_ns.config import load_recipe

    folder = tmp_path_factory.mktemp("cls")
    (folder / "recipe.yaml").write_text(
        "task: seq_cls\nmodel: {name_or_path: 'builtin:tiny-bert', dtype: fp32,"
        " labels: [not_equivalent, equivalent]}\n"
        "peft: {method: lora, r: 4, target_modules: [query, value], init_lora_weights: false}\n"
        "dataset: {path: 'sample:glue_mrpc', formatter: glue_mrpc, val_split: 0.2}\n"
        f"training: {{output_dir: '{folder / 'out'}'}}\n", encoding="utf-8")
    return make_adapter(folder / "out", load_recipe(folder / "recipe.yaml"))


def test_math_scores_the_held_out_rows_from_the_predictions(gsm_adapter, capsys):
    from lora_ns.config import load_recipe
    from lora_ns.data import build_datasets
    from lora_ns.model import load_tokenizer

    recipe_file = str(gsm_adapter / "recipe.yaml")
    argv = [recipe_file, "--adapter", str(gsm_adapter), "--limit", "3", "--max-new-tokens", "12", "--no-progress"]
    capsys.readouterr()
    assert main(argv) == 0
    assert "Loading weights" not in capsys.readouterr().err  # transformers' own bar: --no-progress is none
    metrics, rows = read_results(gsm_adapter / "eval")

    assert metrics["kind"] == "math" and metrics["num_examples"] == len(rows) == 3
    matches = [answers_match(extract_answer(r["prediction"]), extract_answer(r["reference"])) for r in rows]
    assert metrics["exact_match"] == sum(matches) / len(rows)
    assert all(r["reference_answer"] == extract_answer(r["reference"]) is not None for r in rows)
    assert all(r["correct"] == (r["predicted_answer"] == r["reference_answer"]) for r in rows)

    recipe = load_recipe(recipe_file)
    _, held_out = build_datasets(recipe, load_tokenizer(recipe))  # the rows training evaluated on
    assert [r["prompt"] for r in rows] == [ex["prompt"][-1]["content"] for ex in held_out.select(range(3))]

    capsys.readouterr()
    assert run_cli("lora_ns.evaluate", lambda: main(argv)) == 2  # results exist: not replaced silently
    assert "--overwrite" in capsys.readouterr().err


def test_a_perfect_math_prediction_set_scores_one():
    rows = [{"prediction": "The answer is: 1,080", "reference": "so 1080 in all\n#### 1080"},
            {"prediction": "#### -3", "reference": "#### -3"},
            {"prediction": "It costs $1,234.50", "reference": "#### 1234.5"}]
    assert math_metrics(rows)["exact_match"] == 1.0
    rows[1]["prediction"] = "#### 3"
    assert math_metrics(rows)["exact_match"] == pytest.approx(2 / 3)


def test_generation_metrics_and_perplexity(gsm_adapter, tmp_path, capsys):
    out = tmp_path / "zh"
    argv = [str(gsm_adapter / "recipe.yaml"), "--adapter", str(gsm_adapter), "--limit", "3", "--max-new-tokens",
            "8", "--output-dir", str(out), "--no-progress", "dataset.path=sample:alpaca_zh",
            "dataset.formatter=alpaca_zh"]
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()  # the report alone: no Trainer log dict beside it
    assert len(printed) == 2 and printed[0].startswith("generation on 3 examples"), printed
    metrics, rows = read_results(out)

    assert metrics["kind"] == "generation" and len(rows) == 3
    recomputed = generation_metrics([r["prediction"] for r in rows], [r["reference"] for r in rows])
    assert {k: metrics[k] for k in recomputed} == pytest.approx(recomputed)
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    perfect = generation_metrics([r["reference"] for r in rows], [r["reference"] for r in rows])
    assert perfect == pytest.approx({"bleu": 1.0, "rouge_l": 1.0})


def test_classification(classifier, tmp_path):
    out = tmp_path / "cls"
    assert main([str(classifier / "recipe.yaml"), "--adapter", str(classifier), "--output-dir", str(out),
                 "--no-progress"]) == 0
    metrics, rows = read_results(out)

    assert metrics["kind"] == "classification" and len(rows) == 6  # 0.2 of the 30 sample rows
    recomputed = classification_metrics([r["predicted"] for r in rows], [r["label"] for r in rows], 2)
    assert {k: metrics[k] for k in recomputed} == pytest.approx(recomputed)
    assert all(r["predicted_label"] == ["not_equivalent", "equivalent"][r["predicted"]] for r in rows)
    labels = [r["label"] for r in rows]
    assert classification_metrics(labels, labels, 2)["f1"] == (1.0 if 1 in labels else 0.0)


def test_the_recipe_defaults_to_the_one_training_saved(classifier, tmp_path, capsys):
    """`evaluate --adapter OUT` reads OUT/recipe.yaml (an override still applies); a folder without one is a
    one-line error naming the flag."""
    out = tmp_path / "cls"
    assert main(["--adapter", str(classifier), "--output-dir", str(out), "--no-progress",
                 "dataset.val_split=0.1"]) == 0
    metrics, rows = read_results(out)
    assert metrics["recipe"] == str(classifier / "recipe.yaml") and len(rows) == 3  # 0.1 of 30 rows
    code = run_cli("lora_ns.evaluate", lambda: main(["--model", str(tmp_path), "--output-dir", str(out / "x")]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "--model: no recipe.yaml there" in err[-1] and not (out / "x").exists()


def one_question_on_the_base(folder: Path, recipe: Path) -> tuple[dict, list[dict]]:
    """evaluate `recipe` with builtin:tiny-llama on a file of one GSM8K question (in `folder`, the cwd)."""
    data = folder / "questions.jsonl"
    data.write_text(json.dumps({"question": "What is 5 + 6?", "answer": "5 + 6 = 11\n#### 11"}) + "\n")
    assert main([str(recipe), "--model", "builtin:tiny-llama", "--data-file", str(data),
                 "--max-new-tokens", "4", "--no-progress"]) == 0
    return read_results(folder / "outputs" / "eval" / "builtin_tiny-llama")


def test_base_model_on_a_data_file(in_tmp, tiny_llama):
    metrics, rows = one_question_on_the_base(in_tmp, QUICKSTART)
    assert metrics["model_kind"] == "base" and [r["reference_answer"] for r in rows] == ["11"]


def test_math_references_without_a_final_answer_are_found_before_the_model(tmp_path, capsys, monkeypatch):
    """Exact match against references that hold no answer is 0 whatever the model says: none with one is a
    one-line error before any model loads; some without, a warning."""
    import lora_ns.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "load", lambda *a, **k: pytest.fail("the model must not load"))
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"Q{i}?", "answer": "see the book"}) for i in range(3)))
    argv = [str(QUICKSTART), "--model", "builtin:tiny-llama", "--data-file", str(data),
            "--output-dir", str(tmp_path / "e")]
    assert run_cli("lora_ns.evaluate", lambda: main(argv)) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()  # one line: no datasets "Generating" bar either
    assert "3 of 3 references hold no final answer" in line and str(data) in line
    monkeypatch.undo()
    data.write_text(json.dumps({"question": "What is 5 + 6?", "answer": "#### 11"}) + "\n"
                    + json.dumps({"question": "Q?", "answer": "see the book"}))
    assert main([*argv, "--max-new-tokens", "2", "--no-progress"]) == 0
    assert "warning: " in capsys.readouterr().err and (tmp_path / "e" / "metrics.json").is_file()


def test_a_recipe_without_eval_data_is_a_one_line_error(gsm_adapter, tmp_path, capsys):
    code = run_cli("lora_ns.evaluate", lambda: main([str(QUICKSTART), "--adapter", str(gsm_adapter),
                                                     "--output-dir", str(tmp_path / "e"), "dataset.val_split=null"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "dataset.val_split" in err[-1] and "--data-file" in err[-1]
    assert not (tmp_path / "e").exists()


def test_split_train_is_the_rows_training_used_and_other_names_need_a_folder(gsm_adapter, tmp_path, capsys):
    """The quickstart trains on one file less a held-out fraction: --split train scores exactly the rows it
    trained on; a split name the file cannot have is a one-line error pointing at --data-file."""
    from lora_ns.config import load_recipe
    from lora_ns.data import build_datasets
    from lora_ns.model import load_tokenizer

    base = [str(QUICKSTART), "--adapter", str(gsm_adapter), "--limit", "3", "--max-new-tokens", "4",
            "--no-progress", "--output-dir"]
    assert main(base + [str(tmp_path / "train"), "--split", "train"]) == 0
    _, rows = read_results(tmp_path / "train")
    recipe = load_recipe(QUICKSTART)
    trained, _ = build_datasets(recipe, load_tokenizer(recipe))
    assert [r["prompt"] for r in rows] == [ex["prompt"][-1]["content"] for ex in trained.select(range(3))]

    capsys.readouterr()
    code = run_cli("lora_ns.evaluate", lambda: main(base + [str(tmp_path / "test"), "--split", "test"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--split" in err[0] and "--data-file" in err[0], err
    assert not (tmp_path / "test").exists()


AGREEMENT_METRIC = '''
import datasets
import evaluate


class Agreement(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description="share of equal pairs", citation="", inputs_description="",
                                   features=datasets.Features({"predictions": datasets.Value("int64"),
                                                               "references": datasets.Value("int64")}))

    def _compute(self, predictions, references):
        return {"share": sum(p == r for p, r in zip(predictions, references)) / len(references), "n": len(references)}
'''


def test_an_evaluate_metric_from_a_local_script_is_reported_beside_ours(classifier, tmp_path):
    """`--metric PATH` loads a Hugging Face `evaluate` metric offline and scores the same predictions."""
    script = tmp_path / "agreement.py"
    script.write_text(AGREEMENT_METRIC, encoding="utf-8")
    out = tmp_path / "cls"
    assert main([str(classifier / "recipe.yaml"), "--adapter", str(classifier), "--output-dir", str(out),
                 "--metric", str(script), "--no-progress"]) == 0
    metrics, rows = read_results(out)
    assert metrics["agreement/n"] == len(rows) == 6
    # the same predictions and references as ours: the share of agreement is our accuracy, exactly
    assert metrics["agreement/share"] == metrics["accuracy"] < 1  # < 1: a swapped pair would score 1
    assert metrics["accuracy"] == sum(r["predicted"] == r["label"] for r in rows) / len(rows)


def test_a_metric_that_cannot_load_is_one_line_before_the_model(gsm_adapter, tmp_path, capsys):
    bad = tmp_path / "no_such_metric.py"
    code = run_cli("lora_ns.evaluate", lambda: main([str(gsm_adapter / "recipe.yaml"), "--adapter", str(gsm_adapter),
                                                     "--output-dir", str(tmp_path / "e"), "--metric", str(bad)]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--metric" in err[0] and str(bad) in err[0]
    assert not (tmp_path / "e").exists()


def test_a_grpo_run_is_scored_on_the_answers_its_rewards_compare_with(in_tmp, tiny_llama):
    """GRPO's prompt-only rows have no completion to take a loss on (evaluate stopped on a KeyError)."""
    recipe = in_tmp / "grpo.yaml"
    recipe.write_text("task: grpo\nmodel: {name_or_path: 'builtin:tiny-llama'}\n"
                      "dataset: {path: 'sample:gsm8k', formatter: gsm8k_prompt}\n"
                      "training: {reward_funcs: [gsm8k]}\n", encoding="utf-8")
    metrics, rows = one_question_on_the_base(in_tmp, recipe)
    assert metrics["kind"] == "math" and [r["reference_answer"] for r in rows] == ["11"]
