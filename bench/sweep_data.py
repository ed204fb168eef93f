"""What passes validate and then fails in training, for *data* rather than settings: each task's bundled
sample written as JSON lines, JSON, Parquet, CSV and TSV (flat rows), then one row spoiled (row 10 of 16, so
a check of the first rows alone misses it) or the whole file spoiled (bytes that are not UTF-8, a BOM, CRLF
line ends, blank lines, a cut-off last line); the JSON lines also streamed, and as the validation file.
Each case is validated with train's own set-up and, when that passes, trained two steps on the tiny models,
as in bench/sweep_combos.py.

    python bench/sweep_data.py                 # every case (~7 minutes on 2 CPU cores)
    python bench/sweep_data.py seq_cls kto     # the cases of some tasks
    python bench/sweep_data.py seq_cls:csv     # ... in one format
    python bench/sweep_data.py stream kto:eval # streamed cases; kto's spoiled validation files

A case is `refused` (validate said it), `trained`, `train-refused` (train's one-line net, after validate
passed), `unwritable` (pyarrow cannot write those rows as Parquet: no user has such a file) or `crashed`
(a traceback). Neither of the last two kinds of failure may appear: `crashed` is a check to add, and
`train-refused` a promise validate broke.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lora_ns.config import parse_recipe  # noqa: E402
from lora_ns.data.sources import resolve_sample  # noqa: E402
from sweep_combos import base  # noqa: E402  (bench/ is the script's folder)
from sweep_fields import tally, verdict  # noqa: E402

Rows = list[dict[str, Any]]
# case name -> (task for sweep_combos.base, sample, formatter, the text field spoiled, the label field)
TASKS = {
    "causal_lm": ("causal_lm", "gsm8k", "gsm8k", "answer", None),
    "alpaca": ("causal_lm", "alpaca", "alpaca", "output", None),
    "chat": ("chat", "code_feedback", "messages", "messages", None),
    "sharegpt": ("chat", "sharegpt", "sharegpt", "conversations", None),
    "cpt": ("cpt", "text", "text", "text", None),
    "seq_cls": ("seq_cls", "glue_mrpc", "glue_mrpc", "sentence1", "label"),
    "dpo": ("dpo", "preference", "preference", "chosen", None),
    "orpo": ("orpo", "ultrafeedback", "ultrafeedback", "chosen", None),
    "kto": ("kto", "kto", "kto", "completion", "label"),
    "grpo": ("grpo", "gsm8k", "gsm8k_prompt", "question", None),
}
SPOILED = 9  # the 0-based row a row defect changes
LONG = 300  # times a text is repeated: past max_length (128 tokens)

# row defects: name -> f(row, text field) changing the row in place
ROW: dict[str, Callable[[dict, str], None]] = {
    "null": lambda r, f: r.update({f: None}),
    "empty": lambda r, f: r.update({f: ""}),
    "blank": lambda r, f: r.update({f: "  \n "}),
    "number": lambda r, f: r.update({f: 42}),
    "float": lambda r, f: r.update({f: 4.5}),
    "bool": lambda r, f: r.update({f: True}),
    "list_of_text": lambda r, f: r.update({f: ["a", "b"]}),
    "object": lambda r, f: r.update({f: {"a": 1}}),
    "missing": lambda r, f: r.pop(f),
    "extra_column": lambda r, f: r.update({"extra": "x"}),
    "long": lambda r, f: r.update({f: _scaled(r[f], LONG)}),
    "control_chars": lambda r, f: r.update({f: _scaled(r[f], 1, " \x00\u200b\u202e😀 مرحبا \x1b[31m")}),
}
OTHER_FORMATS_ROW = ("null", "number", "missing", "empty", "long")  # the rest only as JSON lines
LABELS = ["1", 1.0, "true", True, 2, -1, "positive", None, 0.5]
MESSAGES: dict[str, Callable[[list], Any]] = {
    "unknown_role": lambda m: [{**m[0], "role": "bot"}, *m[1:]],
    "null_content": lambda m: [*m[:-1], {**m[-1], "content": None}],
    "no_assistant": lambda m: [x for x in m if x.get("role", x.get("from")) not in ("assistant", "gpt")],
    "assistant_first": lambda m: list(reversed(m)),
    "system_only": lambda m: [{"role": "system", "content": "Be brief."}],
    "no_role": lambda m: [{"content": "hi"}, *m[1:]],
    "empty_list": lambda m: [],
    "a_string": lambda m: "hello",
    "content_parts": lambda m: [{**x, "content": [{"type": "text", "text": str(x["content"])}]} for x in m],
    "image_part": lambda m: [{**m[0], "content": [{"type": "image", "url": "x.png"}]}, *m[1:]],
    "empty_reply": lambda m: [*m[:-1], {**m[-1], "content": ""}],
}


def _scaled(value: Any, times: int, tail: str = "") -> Any:
    """A text (or a chat's last message) repeated `times`, plus `tail`."""
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        last = dict(value[-1])
        key = "content" if "content" in last else "value"
        last[key] = str(last[key]) * times + tail
        return [*value[:-1], last]
    return str(value) * times + tail


def sample_rows(sample: str) -> Rows:
    path = resolve_sample(f"sample:{sample}")
    if path.endswith(".txt"):
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        return [{"text": line} for line in lines if line.strip()][:16]
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()][:16]


def flat(rows: Rows) -> bool:
    return all(not isinstance(v, (list, dict)) for r in rows for v in r.values())


def write(rows: Rows, fmt: str, path: Path) -> bool:
    """Write `rows` as `fmt`; False when pyarrow refuses them (a Parquet column of mixed types)."""
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    elif fmt == "txt":
        path.write_text("".join(f"{r.get('text')}\n" for r in rows), encoding="utf-8")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pq.write_table(pa.Table.from_pylist(rows), path)
        except (pa.ArrowException, TypeError, ValueError):
            return False
    else:  # csv, tsv: the columns of every row, a missing value empty; TSV has no quoting, so no newlines
        columns = list(dict.fromkeys(k for r in rows for k in r))
        text = io.StringIO()
        writer = csv.writer(text, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\") if fmt == "tsv" \
            else csv.writer(text)
        writer.writerow(columns)
        for r in rows:
            values = ["" if r.get(c) is None else r[c] for c in columns]
            writer.writerow([str(v).replace("\n", " ") if fmt == "tsv" else v for v in values])
        path.write_text(text.getvalue(), encoding="utf-8", newline="")
    return True


def spoil_bytes(data: bytes, defect: str) -> bytes:
    """A whole-file defect, on the written bytes."""
    lines = data.splitlines(keepends=True)
    if defect == "not_utf8":
        lines[SPOILED] = lines[SPOILED].replace(b" ", b" \xff\xfe ", 1)
    elif defect == "bom":
        lines[0] = b"\xef\xbb\xbf" + lines[0]
    elif defect == "crlf":
        lines = [line.rstrip(b"\n") + b"\r\n" for line in lines]
    elif defect == "blank_lines":
        lines = [line + b"\n" for line in lines]
    elif defect == "cut_off":
        lines[-1] = lines[-1][: len(lines[-1]) // 2]
    elif defect == "latin1":
        return data.decode("utf-8").encode("latin-1", errors="replace")
    return b"".join(lines)


FILE_DEFECTS = ["not_utf8", "bom", "crlf", "blank_lines", "cut_off", "latin1"]


def cases() -> list[tuple[str, str, str, str, Any]]:
    """(task, use, format, defect kind, defect) for every case: each format trained on; JSON lines also
    streamed, and as the validation file (a clean sample trained on)."""
    found = []
    for task, (_, sample, _, field, label) in TASKS.items():
        rows = sample_rows(sample)
        formats = ["txt", "jsonl"] if task == "cpt" else ["jsonl", "json", "parquet"] + \
            (["csv", "tsv"] if flat(rows) else [])
        for fmt in formats:
            found.append((task, fmt, "clean", None))
            found += [(task, fmt, "row", name) for name in ROW
                      if fmt == "jsonl" or fmt != "txt" and name in OTHER_FORMATS_ROW]
            found += [(task, fmt, "file", name) for name in FILE_DEFECTS if fmt not in ("parquet", "json")]
            found += [(task, fmt, "label", value) for value in LABELS if label and fmt in ("jsonl", "csv")]
            found += [(task, fmt, "messages", name) for name in MESSAGES
                      if fmt == "jsonl" and isinstance(rows[0].get(field), list)]
    found = [(task, "train", *case) for task, *case in found]
    return found + [(task, use, *case) for task, _, *case in found if case[0] == "jsonl"
                    for use in ("stream", "eval")]


def data_file(folder: Path, task: str, fmt: str, kind: str, defect: Any) -> Path | None:
    _, sample, _, field, label = TASKS[task]
    rows = copy.deepcopy(sample_rows(sample))
    row = rows[SPOILED]
    if kind == "row":
        ROW[defect](row, field)
    elif kind == "label":
        row[label] = defect
    elif kind == "messages" and task == "sharegpt":  # the defect on {role, content}, written as {from, value}
        speakers = {"user": "human", "assistant": "gpt"}
        chat = MESSAGES[defect]([{"role": t["from"].replace("human", "user").replace("gpt", "assistant"),
                                  "content": t["value"]} for t in row[field]])
        row[field] = chat if not isinstance(chat, list) else [
            {"from": speakers.get(m["role"], m["role"]) if "role" in m else None, "value": m["content"]}
            for m in chat]
    elif kind == "messages":
        row[field] = MESSAGES[defect](row[field])
    path = folder / f"data.{fmt}"
    if not write(rows, fmt, path):
        return None
    if kind == "file":
        path.write_bytes(spoil_bytes(path.read_bytes(), defect))
    return path


def outcome(task: str, use: str, fmt: str, kind: str, defect: Any) -> tuple[str, str]:
    combos_task, sample, formatter, _, _ = TASKS[task]

    def recipe(out: str):
        path = str(data_file(Path(out), task, fmt, kind, defect))
        config = base(combos_task, "lora", f"{out}/run")
        config["dataset"].update(path=path, formatter=formatter, streaming=use == "stream")
        if use == "eval":
            config["dataset"].update(path=f"sample:{sample}", val_split=path)
            config["training"].update(eval_strategy="steps", eval_steps=1)
        return parse_recipe(config, "case.yaml")

    with tempfile.TemporaryDirectory() as folder:
        if data_file(Path(folder), task, fmt, kind, defect) is None:
            return "unwritable", ""
    return verdict(recipe)


def results(chosen: list[str]) -> Iterator[tuple[str, str, str]]:
    for task, use, fmt, kind, defect in cases():
        if not chosen or {task, f"{task}:{fmt}", f"{task}:{use}", use} & set(chosen):
            columns = f"{task:9} {use:6} {fmt:7} {kind:8} {str(defect):15}"
            yield columns, *outcome(task, use, fmt, kind, defect)


def main(chosen: list[str]) -> None:
    tally("sweep_data", results(chosen))


if __name__ == "__main__":
    main(sys.argv[1:])
