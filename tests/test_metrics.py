"""Metric functions: classification averaging, exact match, BLEU/ROUGE-L on Chinese, perplexity."""

from __future__ import annotations

import math

import pytest

from lora_ns.metrics import bleu, classification_metrics, generation_metrics, math_metrics, perplexity, rouge_l


def test_binary_classification_uses_the_positive_class():
    m = classification_metrics([1, 0, 1, 1], [1, 0, 0, 1], num_labels=2)
    # TP=2, FP=1, FN=0: precision 2/3, recall 1, F1 0.8
    assert m == pytest.approx({"accuracy": 0.75, "precision": 2 / 3, "recall": 1.0, "f1": 0.8})


def test_multiclass_is_macro_averaged_and_counts_absent_classes():
    m = classification_metrics([0, 1, 1], [0, 1, 2], num_labels=3)
    # per class precision (1, .5, 0), recall (1, 1, 0), F1 (1, 2/3, 0)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(5 / 9)
    m4 = classification_metrics([0, 1], [0, 1], num_labels=4)  # classes 2, 3 never seen: macro over 4
    assert m4["accuracy"] == 1.0 and m4["recall"] == pytest.approx(0.5)


def test_perfect_predictions_score_one():
    assert classification_metrics([0, 2, 1], [0, 2, 1], 3) == {"accuracy": 1.0, "f1": 1.0, "precision": 1.0,
                                                               "recall": 1.0}
    refs = ["今天天气很好，我们去公园散步吧。", "def add(x, y): return x + y"]
    assert generation_metrics(refs, refs) == {"bleu": pytest.approx(1.0), "rouge_l": pytest.approx(1.0)}
    assert math_metrics([{"prediction": "1080", "reference": "#### 1080"},
                         {"prediction": "-3", "reference": "#### -3"}])["exact_match"] == 1.0


def test_exact_match_counts_missing_answers_as_wrong():
    rows = [{"prediction": "1080", "reference": "#### 1,080"}, {"prediction": "no idea", "reference": "#### 2"},
            {"prediction": "3.5", "reference": "#### 3.50"}]
    assert math_metrics(rows) == pytest.approx({"exact_match": 2 / 3, "answer_found": 2 / 3})
    assert rows[1]["predicted_answer"] is None and not rows[1]["correct"]
    assert math_metrics([{"prediction": "none", "reference": "none"}])["exact_match"] == 0.0  # None != None


def test_chinese_is_scored_per_character():
    ref, close = "今天天气很好", "今天天气不好"
    assert 0.0 < bleu([close], [ref]) < 1.0  # as one whitespace token it would score 0
    # LCS of 4 characters: precision 4/4, recall 4/6 -> F1 0.8
    assert rouge_l(["今天天气"], [ref]) == pytest.approx(0.8)
    assert rouge_l(["完全不同"], [ref]) == 0.0


def test_english_rouge_is_word_level_and_case_insensitive():
    assert rouge_l(["The cat"], ["the cat sat"]) == pytest.approx(0.8)


def test_perplexity_is_exp_of_mean_loss():
    assert perplexity(math.log(10.0)) == pytest.approx(10.0)
    assert perplexity(1e6) == math.inf


def test_bleu_without_the_metrics_extra_says_what_to_install(monkeypatch):
    import sys

    from lora_ns.errors import UserError

    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # `import sacrebleu` now fails as if not installed
    with pytest.raises(UserError, match=r"pip install 'lora_ns\[metrics\]'"):
        bleu(["a"], ["a"])
