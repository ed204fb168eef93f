"""Load raw rows from the Hub, local files or a bundled sample, then format and render them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_ns.config import DatasetConfig, Recipe
from lora_ns.data.formatters import get_formatter

SAMPLE_PREFIX = "sample:"
SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples"
_EXTENSION_FORMAT = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "tsv",
                     ".parquet": "parquet", ".txt": "text"}


def resolve_data_path(path: str) -> str:
    """``sample:gsm8k`` -> the bundled sample file; anything else unchanged."""
    if path.startswith(SAMPLE_PREFIX):
        name = path[len(SAMPLE_PREFIX):]
        return str(next(SAMPLES_DIR.glob(f"{name}.*")))
    return path


def load_raw(cfg: DatasetConfig, split: str | None = None):
    """A `datasets.Dataset` (or `IterableDataset` when streaming) of raw rows."""
    import datasets

    path = resolve_data_path(cfg.path)
    local = Path(path)
    if local.exists():
        fmt = cfg.data_format or _EXTENSION_FORMAT.get(local.suffix, "json")
        kwargs: dict[str, Any] = {"delimiter": "\t"} if fmt == "tsv" else {}
        return datasets.load_dataset("csv" if fmt == "tsv" else fmt, data_files=str(local), split="train",
                                     streaming=cfg.streaming, **kwargs)
    return datasets.load_dataset(path, cfg.name, split=split or cfg.split, revision=cfg.revision,
                                 streaming=cfg.streaming)


def render(example: dict[str, Any], recipe: Recipe, tokenizer) -> dict[str, Any]:
    """Turn a canonical example into what TRL's SFTTrainer takes (conversational when there is a chat template)."""
    if "prompt" in example and "completion" in example:
        if tokenizer is not None and tokenizer.chat_template and not recipe.dataset.prompt_template:
            system = [{"role": "system", "content": recipe.dataset.system_prompt}] if recipe.dataset.system_prompt else []
            return {"prompt": system + [{"role": "user", "content": example["prompt"]}],
                    "completion": [{"role": "assistant", "content": example["completion"]}]}
        template = recipe.dataset.prompt_template or "{prompt}\n"
        return {"prompt": template.format(prompt=example["prompt"]), "completion": example["completion"]}
    return example


def build_datasets(recipe: Recipe, tokenizer=None):
    """(train, eval or None), formatted and rendered."""
    cfg = recipe.dataset
    formatter = get_formatter(cfg.formatter)
    raw = load_raw(cfg)
    if cfg.max_samples and not cfg.streaming:
        raw = raw.select(range(min(cfg.max_samples, len(raw))))

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        renamed = {field: row[cfg.columns.get(field, field)] for field in formatter.fields}
        return render(formatter(renamed), recipe, tokenizer)

    columns = raw.column_names
    data = raw.map(convert, remove_columns=columns)
    eval_data = None
    if isinstance(cfg.val_split, float):
        parts = data.train_test_split(test_size=cfg.val_split, seed=cfg.seed)
        data, eval_data = parts["train"], parts["test"]
    elif isinstance(cfg.val_split, str):
        eval_raw = load_raw(cfg, cfg.val_split)
        eval_data = eval_raw.map(convert, remove_columns=eval_raw.column_names)
    return data, eval_data
