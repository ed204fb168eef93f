"""Every metric lora_ns reports, computed by the libraries that define them: scikit-learn, sacrebleu,
rouge-score, math-verify (through `lora_ns.answers`) and Hugging Face `evaluate` for any other."""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

from lora_ns.answers import answers_match, extract_answer
from lora_ns.errors import fail, first_line, require

# CJK ideographs (incl. extension A and compatibility), kana, hangul, fullwidth forms.
_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_ROUGE_TOKEN = re.compile(f"[{_CJK}]|[^\\W_]+", re.UNICODE)


def classification_metrics(predictions: Sequence[int], labels: Sequence[int], num_labels: int
                           ) -> dict[str, float]:
    """Accuracy, F1, precision and recall: binary (positive class 1) for 2 labels, macro-averaged otherwise
    (over every class, also ones absent from this sample)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    preds, refs = [int(p) for p in predictions], [int(y) for y in labels]
    kwargs: dict[str, Any] = {"average": "binary"}
    if num_labels != 2:
        kwargs = {"average": "macro", "labels": list(range(num_labels))}
    precision, recall, f1, _ = precision_recall_fscore_support(refs, preds, zero_division=0, **kwargs)
    return {"accuracy": float(accuracy_score(refs, preds)), "f1": float(f1),
            "precision": float(precision), "recall": float(recall)}


def math_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Fill in each row's extracted answers and verdict (a missing answer never matches); the share of
    exact matches and the share with an answer found."""
    for row in rows:
        row["reference_answer"] = extract_answer(row["reference"])
        row["predicted_answer"] = extract_answer(row["prediction"])
        row["correct"] = answers_match(row["predicted_answer"], row["reference_answer"])
    return {"exact_match": sum(r["correct"] for r in rows) / len(rows),
            "answer_found": sum(r["predicted_answer"] is not None for r in rows) / len(rows)}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU in [0, 1]; Chinese/Japanese/Korean references are tokenized per character."""
    sacrebleu = require("sacrebleu", "metrics", "BLEU")
    tokenize = "zh" if any(re.search(f"[{_CJK}]", r or "") for r in references) else "13a"
    score = sacrebleu.corpus_bleu([p or "" for p in predictions], [[r or "" for r in references]],
                                  tokenize=tokenize)
    return min(float(score.score) / 100.0, 1.0)  # float rounding can give 100.0000001


class CharAwareTokenizer:
    """rouge-score tokenizer: each CJK character is a token, other text splits into lowercase words."""

    def tokenize(self, text: str) -> list[str]:
        return _ROUGE_TOKEN.findall((text or "").lower())


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure in [0, 1] (per character for CJK text)."""
    rouge_scorer = require("rouge_score.rouge_scorer", "metrics", "ROUGE-L")
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=CharAwareTokenizer())
    scores = [scorer.score(r or "", p or "")["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return float(sum(scores) / max(len(scores), 1))


def perplexity(mean_loss: float) -> float:
    """exp(mean token cross-entropy); inf when the loss overflows."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    return {"bleu": bleu(predictions, references), "rouge_l": rouge_l(predictions, references)}


def library_metric(name: str):
    """A Hugging Face `evaluate` metric: a local script or folder loads offline; a hub name needs evaluate's
    cache (lora_ns never reaches the Hub)."""
    import evaluate

    try:
        return evaluate.load(name)
    except Exception as err:  # evaluate raises FileNotFoundError, ConnectionError, ImportError, ... by cause
        reason = first_line(err)
        raise fail(name, "--metric", f"cannot load this evaluate metric ({reason})",
                   "give a local metric script or folder (an evaluate.Metric)") from None
