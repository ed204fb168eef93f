"""Every metric lora_ns reports, computed by the libraries that define them.

- classification: scikit-learn (accuracy, F1, precision, recall; binary average for 2 classes,
  macro otherwise);
- exact match: the share of extracted answers equal to the reference's (`lora_ns.answers`: canonical
  numbers compare as strings, LaTeX expressions through Hugging Face's math-verify);
- BLEU: sacrebleu's corpus BLEU, with its ``zh`` tokenizer when the references contain CJK text,
  so Chinese is scored per character;
- ROUGE-L: rouge-score's F-measure, with a tokenizer that keeps CJK characters (rouge-score's
  default one drops every non-ASCII character, which would score all Chinese as empty);
- perplexity: exp of the mean token loss.

All scores are fractions in [0, 1] except perplexity; BLEU is sacrebleu's 0-100 score / 100.
`evaluate.load(...)` is not used: it fetches metric scripts from the Hub.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

# CJK ideographs (incl. extension A and compatibility), kana, hangul, fullwidth forms.
_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_CJK_CHAR = re.compile(f"[{_CJK}]")
_ROUGE_TOKEN = re.compile(f"[{_CJK}]|[^\\W_]+", re.UNICODE)


def classification_metrics(predictions: Sequence[int], labels: Sequence[int], num_labels: int) -> dict[str, float]:
    """Accuracy, F1, precision and recall: binary (positive class 1) for 2 labels, macro-averaged otherwise."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    preds, refs = [int(p) for p in predictions], [int(y) for y in labels]
    average = "binary" if num_labels == 2 else "macro"
    kwargs: dict[str, Any] = {"average": average, "zero_division": 0}
    if average == "macro":  # score every class, also ones absent from this sample
        kwargs["labels"] = list(range(num_labels))
    precision, recall, f1, _ = precision_recall_fscore_support(refs, preds, **kwargs)
    return {"accuracy": float(accuracy_score(refs, preds)), "f1": float(f1),
            "precision": float(precision), "recall": float(recall)}


def exact_match(predictions: Sequence[str | None], references: Sequence[str | None]) -> float:
    """Share of predictions equal to their reference (`lora_ns.answers.answers_match`: numbers exactly,
    LaTeX expressions by math-verify); a missing (None) answer never matches."""
    from lora_ns.answers import answers_match

    if not references:
        return 0.0
    return sum(answers_match(p, r) for p, r in zip(predictions, references, strict=True)) / len(references)


def has_cjk(texts: Sequence[str]) -> bool:
    return any(_CJK_CHAR.search(t or "") for t in texts)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU in [0, 1]; Chinese/Japanese/Korean references are tokenized per character."""
    import sacrebleu

    if not references:
        return 0.0
    tokenize = "zh" if has_cjk(references) else "13a"
    score = sacrebleu.corpus_bleu([p or "" for p in predictions], [[r or "" for r in references]], tokenize=tokenize)
    return min(float(score.score) / 100.0, 1.0)  # float rounding can give 100.0000001


class CharAwareTokenizer:
    """rouge-score tokenizer: each CJK character is a token, other text splits into lowercase words."""

    def tokenize(self, text: str) -> list[str]:
        return _ROUGE_TOKEN.findall((text or "").lower())


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure in [0, 1] (per character for CJK text)."""
    from rouge_score import rouge_scorer

    if not references:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=CharAwareTokenizer())
    scores = [scorer.score(ref or "", pred or "")["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return float(sum(scores) / len(scores))


def perplexity(mean_loss: float) -> float:
    """exp(mean token cross-entropy); inf when the loss overflows."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """BLEU and ROUGE-L for free-text answers."""
    return {"bleu": bleu(predictions, references), "rouge_l": rouge_l(predictions, references)}
