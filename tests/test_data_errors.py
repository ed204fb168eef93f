"""Bad data is a one-line UserError naming the file, the line (or row) and the field -- never a silent drop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lora_ns.config import parse_recipe
from lora_ns.data import build_datasets, encode_pairs, formatted_examples
from lora_ns.data.loading import load
from lora_ns.validate.data import check_dataset
from lora_ns.errors import UserError, run_cli

from conftest import REPO

QA = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(6)]


def recipe(path: Path | str, formatter: str = "gsm8k", task: str = "causal_lm", **dataset):
    model = {"name_or_path": "builtin:tiny-bert", "num_labels": 2} if task == "seq_cls" else \
        {"name_or_path": "builtin:tiny-llama"}
    dataset = {"path": str(path), "formatter": formatter, **dataset}
    return parse_recipe({"task": task, "model": model, "dataset": dataset})


def lines(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)


def one_problem(call) -> str:
    """Run `call`, expect a UserError with exactly one problem, return its printed line."""
    with pytest.raises(UserError) as caught:
        call()
    assert len(caught.value.problems) == 1, caught.value.problems
    text = str(caught.value.problems[0])
    assert "\n" not in text
    return text


def test_malformed_jsonl_line(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(lines(QA[0], QA[1], '{"question": "q2", "answer": ', QA[3]), encoding="utf-8")
    text = one_problem(lambda: build_datasets(recipe(data)))
    assert text.startswith(f"{data}:3: not valid JSON")


def test_malformed_line_past_the_precheck_is_located_after_the_loader_fails(tmp_path):
    data = tmp_path / "big.jsonl"
    rows = [lines({"question": f"q{i}", "answer": f"a{i}"}) for i in range(260)]
    rows[239] = "{'question': 'single quotes are not JSON'}\n"
    data.write_text("".join(rows), encoding="utf-8")
    text = one_problem(lambda: load(recipe(data).dataset)[0])
    assert text.startswith(f"{data}:240: not valid JSON")
    streamed = one_problem(lambda: build_datasets(recipe(data, streaming=True)))  # in the first block read
    assert streamed.startswith(f"{data}:240: not valid JSON")


def test_missing_column_names_the_field_and_file(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(lines(*[{"question": r["question"], "solution": r["answer"]} for r in QA]), encoding="utf-8")
    text = one_problem(lambda: build_datasets(recipe(data)))
    assert text.startswith(f"{data}:1: answer: column missing (columns: question, solution)")
    assert "dataset.columns" in text


def test_missing_value_in_one_row(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(lines(QA[0], "", QA[1], {"question": "q9"}, QA[2]), encoding="utf-8")
    text = one_problem(lambda: build_datasets(recipe(data)))
    assert text.startswith(f"{data}:4: answer: missing value")  # line 4: blank line 2 counted


def test_mapped_column_that_does_not_exist(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(lines(*QA), encoding="utf-8")
    with pytest.raises(UserError) as caught:
        build_datasets(recipe(data, "prompt_completion", columns={"prompt": "question", "completion": "reply"}))
    assert [str(p) for p in caught.value.problems] == [
        f"{data}:1: dataset.columns.completion: column 'reply' not found (columns: question, answer) — "
        "map the field to one of those columns"]


@pytest.mark.parametrize("name,content", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.csv", ""),
                                          ("header_only.tsv", "question\tanswer\n"), ("empty.txt", "")])
def test_empty_file(tmp_path, name, content):
    data = tmp_path / name
    data.write_text(content, encoding="utf-8")
    formatter, task = ("text", "cpt") if name.endswith(".txt") else ("gsm8k", "causal_lm")
    text = one_problem(lambda: load(recipe(data, formatter, task).dataset)[0])
    assert text.startswith(f"{data}: no rows: the file is empty")


def test_one_empty_file_in_a_glob(tmp_path):
    (tmp_path / "a.jsonl").write_text(lines(*QA), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("", encoding="utf-8")
    text = one_problem(lambda: build_datasets(recipe(tmp_path / "*.jsonl")))
    assert text.startswith(f"{tmp_path / 'b.jsonl'}: no rows")


def test_unknown_label_in_mrpc_jsonl(tmp_path):
    data = tmp_path / "mrpc.jsonl"
    row = {"sentence1": "a", "sentence2": "b", "idx": 0}
    data.write_text(lines({**row, "label": 1}, {**row, "label": 0}, {**row, "label": 2}), encoding="utf-8")
    text = one_problem(lambda: build_datasets(recipe(data, "glue_mrpc", "seq_cls")))
    assert text.startswith(f"{data}:3: label: unknown label 2")


def test_unknown_label_in_msr_tsv(tmp_path):
    data = tmp_path / "msr.tsv"
    data.write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tx \"y\tz\nmaybe\t3\t4\tu\tv\n",
                    encoding="utf-8")
    text = one_problem(lambda: build_datasets(recipe(data, "glue_mrpc", "seq_cls")))
    assert text.startswith(f"{data}:3: Quality: unknown label 'maybe'")


def test_unknown_class_name_against_model_labels(tmp_path):
    data = tmp_path / "sentiment.csv"
    data.write_text("text,label\ngreat,positive\nawful,negative\nmeh,neutral\n", encoding="utf-8")
    r = parse_recipe({"task": "seq_cls", "model": {"name_or_path": "builtin:tiny-bert",
                                                   "labels": ["negative", "positive"]},
                      "dataset": {"path": str(data), "formatter": "pair"}})
    text = one_problem(lambda: build_datasets(r))
    assert text.startswith(f"{data}:4: label: unknown label 'neutral'") and "negative, positive" in text


def test_encode_pairs_unknown_label_names_the_row(tiny_bert):
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    data = Dataset.from_list([{"sentence1": "a", "sentence2": "b", "label": "yes"},
                              {"sentence1": "c", "sentence2": "d", "label": "perhaps"}])
    text = one_problem(lambda: encode_pairs(data, tok, 16, ["no", "yes"], source="pairs.jsonl"))
    assert text.startswith("pairs.jsonl: label: row 2: unknown label 'perhaps'")


def test_tsv_row_with_an_extra_tab(tmp_path):
    data = tmp_path / "qa.tsv"
    data.write_text("question\tanswer\nq1\ta1\nq2\ta2\textra\n", encoding="utf-8")
    text = one_problem(lambda: load(recipe(data).dataset)[0])
    assert text.startswith(f"{data}:3: row has 3 fields but the header has 2")


def test_csv_short_row_far_down_is_caught(tmp_path):
    data = tmp_path / "qa.csv"
    data.write_text("question,answer\n" + "".join(f"q{i},a{i}\n" for i in range(300)) + "lonely\n", encoding="utf-8")
    text = one_problem(lambda: load(recipe(data).dataset)[0])
    assert text.startswith(f"{data}:302: row has 1 fields but the header has 2")


def test_json_list_item_that_is_not_an_object(tmp_path):
    data = tmp_path / "qa.json"
    data.write_text(json.dumps([QA[0], QA[1], ["q", "a"]]), encoding="utf-8")
    text = one_problem(lambda: load(recipe(data).dataset)[0])
    assert text.startswith(f"{data}: row 3: expected a JSON object")


@pytest.mark.parametrize("good_rows,streaming", [(1, False), (300, False), (1, True)])
def test_not_utf8(tmp_path, good_rows, streaming):
    """Found by the loader wherever it is (pyarrow's JSON reader alone keeps the byte: a traceback later)."""
    data = tmp_path / "latin1.jsonl"
    bad = '{"question": "café", "answer": "x"}\n'.encode("latin-1")
    data.write_bytes(lines(*[QA[0]] * good_rows).encode() + bad)
    text = one_problem(lambda: list(build_datasets(recipe(data, streaming=streaming))[0]))
    assert text.startswith(f"{data}:{good_rows + 1}: not UTF-8 text")


def test_sharegpt_unknown_speaker_and_a_turn_without_text(tmp_path):
    data = tmp_path / "chats.jsonl"
    ok = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    bad = {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "beep"}]}
    data.write_text(lines(ok, bad), encoding="utf-8")
    text = one_problem(lambda: list(formatted_examples(recipe(data, "sharegpt"))))
    assert text.startswith(f"{data}:2: conversations: turn 2 has unknown speaker 'from: robot'")
    bad["conversations"][1] = {"from": "gpt", "value": None}  # said in chat's words ("message 2 ... content")
    data.write_text(lines(ok, bad), encoding="utf-8")
    text = one_problem(lambda: list(formatted_examples(recipe(data, "sharegpt"))))
    assert text.startswith(f"{data}:2: conversations: turn 2 (gpt) value must be text, got null")
    assert '"value": "..."' in text


def test_messages_without_an_assistant_turn(tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text(lines({"messages": [{"role": "user", "content": "hi"}]}), encoding="utf-8")
    text = one_problem(lambda: build_datasets(recipe(data, "messages")))
    assert text.startswith(f"{data}:1: messages: no assistant message")


def test_missing_file_and_unknown_sample(tmp_path):
    assert one_problem(lambda: load(recipe(tmp_path / "nope.jsonl").dataset)[0]).startswith(
        f"{tmp_path / 'nope.jsonl'}: dataset.path: file not found")
    text = one_problem(lambda: load(recipe("sample:gsm9k").dataset)[0])
    assert text.startswith("sample:gsm9k: dataset.path: no bundled sample named 'gsm9k'") and "gsm8k" in text


def test_named_split_of_a_single_file(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(lines(*QA), encoding="utf-8")
    text = one_problem(lambda: build_datasets(recipe(data, val_split="validation")))
    assert text.startswith(f"{data}: dataset.val_split: 'validation' is not a split of a local file")
    cut = recipe(data)
    cut.dataset.split = "test"  # the training split named on one file: the field the recipe set
    text = one_problem(lambda: build_datasets(cut))
    assert text.startswith(f"{data}: dataset.split: 'test' is not a split of a local file") and "folder" in text


def test_streaming_checks_the_first_rows_before_training(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(lines(QA[0], "not json", QA[1]), encoding="utf-8")
    text = one_problem(lambda: build_datasets(recipe(data, streaming=True)))
    assert text.startswith(f"{data}:2: not valid JSON")


def test_streaming_row_error_is_raised_when_the_row_is_reached(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(lines(QA[0], QA[1], {"question": "q", "answer": None}), encoding="utf-8")
    train, _ = build_datasets(recipe(data, streaming=True))
    text = one_problem(lambda: list(train))
    assert text.startswith(f"{data}:3: answer: missing value")


def test_streamed_malformed_row_past_validates_sample_stops_training_as_one_line(tmp_path, monkeypatch):
    """Streaming parses the files while training: in data too large for validate to read whole, a bad line
    past its sample and the first block is found there, and train's error path names it (not datasets'
    traceback). Data this small validate reads whole, and finds the line first."""
    import lora_ns.validate.data

    (tmp_path / "a.jsonl").write_text(lines(*(QA * 40)), encoding="utf-8")  # 240 rows: more than validate reads
    (tmp_path / "b.jsonl").write_text(lines(*QA[:3], '{"question": ', *QA[3:]), encoding="utf-8")
    streamed = recipe(tmp_path, streaming=True)
    (found,) = [str(p) for p in check_dataset(streamed) if p.is_error]
    assert found.startswith(f"{tmp_path / 'b.jsonl'}:4: not valid JSON")
    monkeypatch.setattr(lora_ns.validate.data, "EVERY_ROW_BYTES", 0)  # as if the data were large
    assert [p for p in check_dataset(streamed) if p.is_error] == []
    train, _ = build_datasets(streamed)
    with pytest.raises(Exception) as raw:  # what the Trainer's loop meets
        list(train)
    assert not isinstance(raw.value, UserError)
    text = one_problem(lambda: _stream(streamed, train))
    assert text.startswith(f"{tmp_path / 'b.jsonl'}:4: not valid JSON")
    eager = recipe(tmp_path, streaming=False)  # not streamed: the same error before any step
    with pytest.raises(UserError, match="b.jsonl:4: not valid JSON"):
        build_datasets(eager)


@pytest.mark.parametrize("bad, words, loaded", [
    ({"question": "q", "answer": None}, "answer: missing value", False), ('{"question": ', "not valid JSON", True)])
def test_validate_reads_small_local_data_past_its_sample(tmp_path, monkeypatch, bad, words, loaded):
    """A bad row after validate's 200-row sample, in data under EVERY_ROW_BYTES: validate finds it at
    file:line (training would find it only after the weights load); with the budget at 0, only the sample.
    Past max_samples a row is never formatted, but malformed JSON there still fails the loader (`loaded`)."""
    import lora_ns.validate.data

    data = tmp_path / "qa.jsonl"
    data.write_text(lines(*(QA * 50), bad, *QA), encoding="utf-8")  # the bad row is line 301
    problems = [str(p) for p in check_dataset(recipe(data)) if p.is_error]
    assert len(problems) == 1 and problems[0].startswith(f"{data}:301: ") and words in problems[0]
    assert bool([p for p in check_dataset(recipe(data, max_samples=300)) if p.is_error]) == loaded
    monkeypatch.setattr(lora_ns.validate.data, "EVERY_ROW_BYTES", 0)
    assert [p for p in check_dataset(recipe(data)) if p.is_error] == []


def test_training_reads_the_data_before_the_weights(tmp_path, monkeypatch, tiny_llama):
    """Data too large for validate to read whole: a bad row past its sample stops training at file:line
    while the data is built, before the model's weights load (minutes for a large model)."""
    import lora_ns.train
    import lora_ns.validate.data

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights loaded before the data was read")

    monkeypatch.setattr(lora_ns.validate.data, "EVERY_ROW_BYTES", 0)
    monkeypatch.setattr(lora_ns.train, "load_model", no_weights)
    data = tmp_path / "qa.jsonl"
    data.write_text(lines(*(QA * 50), {"question": "q", "answer": None}), encoding="utf-8")
    run = parse_recipe({"model": {"name_or_path": "builtin:tiny-llama"},
                        "dataset": {"path": str(data), "formatter": "gsm8k"},
                        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 1, "report_to": "none"}})
    assert one_problem(lambda: lora_ns.train.train(run)).startswith(f"{data}:301: answer: missing value")


def test_a_file_with_a_column_the_first_file_lacks(tmp_path):
    """datasets reads a folder's files as one table with the first file's columns and fails to cast a later
    file with another (a traceback-like "Couldn't cast"): validate, and training's load, name file and column."""
    (tmp_path / "a.jsonl").write_text(lines(*QA), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(lines(*QA[:2], {**QA[2], "id": 7}), encoding="utf-8")
    (problem,) = [str(p) for p in check_dataset(recipe(tmp_path)) if p.is_error]
    assert problem.startswith(f"{tmp_path / 'b.jsonl'}:3: column 'id' is not in {tmp_path / 'a.jsonl'}")
    assert one_problem(lambda: load(recipe(tmp_path).dataset)) == problem
    (tmp_path / "b.jsonl").write_text(lines(*QA[:2], {"question": "q"}), encoding="utf-8")  # fewer columns: fine
    assert load(recipe(tmp_path).dataset)[0].num_rows == 9


def _stream(streamed, train) -> None:
    from lora_ns.train import stream_errors  # train imports torch: only where needed

    with stream_errors(streamed):
        list(train)


def test_bad_prompt_template(tmp_path):
    text = one_problem(lambda: build_datasets(recipe("sample:gsm8k", prompt_template="Q: {question}\nA:")))
    assert "dataset.prompt_template: unknown placeholder(s) {question}" in text


def test_check_dataset_returns_the_same_errors(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(lines(QA[0], '{"question": ', QA[1]), encoding="utf-8")
    problems = check_dataset(recipe(data))
    assert [(p.file, p.line, p.severity) for p in problems] == [(str(data), 2, "error")]
    data.write_text(lines(QA[0], {"question": "q"}, {"question": "r"}), encoding="utf-8")
    problems = check_dataset(recipe(data))
    assert [(p.line, p.field, p.message) for p in problems] == [(2, "answer", "missing value"),
                                                                 (3, "answer", "missing value")]


def test_validate_prints_one_line_and_exits_2(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(lines(QA[0], QA[1], "{oops"), encoding="utf-8")
    path = tmp_path / "bad_data.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "builtin:tiny-llama"}, "training": {"max_steps": 1},
                                    "dataset": {"path": str(data), "formatter": "gsm8k"}}))
    run = subprocess.run([sys.executable, "-m", "lora_ns.validate", str(path), "--no-model"], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if ": error: " in line]
    assert errors == [f"lora_ns.validate: error: {data}:3: not valid JSON: Expecting property name enclosed in double "
                      "quotes (column 2) — fix or remove that line (one JSON object per line)"]


def test_run_cli_prints_a_data_error_as_one_line(tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text(lines(*QA[:2], {"question": "q"}), encoding="utf-8")
    assert run_cli("lora_ns.train", lambda: build_datasets(recipe(data)) and 0) == 2
    err = capsys.readouterr().err  # (beside the HF loader's progress bar)
    assert [line for line in err.splitlines() if "error" in line] == \
        [f"lora_ns.train: error: {data}:3: answer: missing value — fill it in or drop the row"]
    assert "Traceback" not in err


def test_pair_rows_of_both_kinds_are_refused_at_the_first_of_the_other_kind(tmp_path):
    # a classifier trained on a mix answers one kind from what it learned of the other
    data = tmp_path / "pairs.jsonl"
    rows = [{"sentence1": f"s{i}", "sentence2": f"t{i}", "label": i % 2} for i in range(250)]
    rows[204] = {"sentence1": "alone", "label": 1}
    data.write_text(lines(*rows), encoding="utf-8")
    text = one_problem(lambda: build_datasets(recipe(data, "pair", "seq_cls")))
    assert text.startswith(f"{data}:205: sentence2: missing in a sentence-pair dataset")
    # validate reads past its 200-row sample with the sample's converter: the kind row 1 set holds there
    errors = [p for p in check_dataset(recipe(data, "pair", "seq_cls")) if p.is_error]
    assert [(p.line, p.field) for p in errors] == [(205, "sentence2")]
    said_single = recipe(data, "pair", "seq_cls", pairs=False)  # the recipe's word beats row 1
    assert one_problem(lambda: build_datasets(said_single)).startswith(f"{data}:1: sentence2: set in a dataset")
    val = tmp_path / "val.jsonl"  # a validation file of the other kind: training stopped at its evaluation
    val.write_text(lines({"sentence1": "one", "label": 0}), encoding="utf-8")
    rows[204] = rows[0]
    data.write_text(lines(*rows), encoding="utf-8")
    errors = [p for p in check_dataset(recipe(data, "pair", "seq_cls", val_split=str(val))) if p.is_error]
    assert [(p.file, p.line, p.message) for p in errors] == [(str(val), 1, "missing in a sentence-pair dataset")]
