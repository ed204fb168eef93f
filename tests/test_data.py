"""lora_ns.data: formatters on their bundled samples, every file layout, splits, streaming, templates, stats."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lora_ns.config import parse_recipe
from lora_ns.data import (
    FORMATTERS, build_datasets, encode_pairs, formatted_examples, label_id, prompt_text, sft_defaults,
    split_last_reply,
)
from lora_ns.validate.data import check_dataset
from lora_ns.validate.tokens import padding
from lora_ns.data.loading import load
from lora_ns.data.sources import SAMPLES_DIR
from lora_ns.errors import UserError


def recipe(dataset: dict, task: str = "causal_lm", model: str = "builtin:tiny-llama", **model_fields):
    return parse_recipe({"task": task, "model": {"name_or_path": model, **model_fields}, "dataset": dataset})


def jsonl_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (SAMPLES_DIR / name).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def llama_tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


# --- formatters on the bundled samples ------------------------------------------------------------------

def test_gsm8k_keeps_the_whole_answer_as_completion():
    raw = jsonl_rows("gsm8k.jsonl")
    got = list(formatted_examples(recipe({"path": "sample:gsm8k", "formatter": "gsm8k"})))
    assert [(g["prompt"], g["completion"]) for g in got] == [(r["question"], r["answer"]) for r in raw]
    assert all("####" in g["completion"] for g in got)


def test_metamath_keeps_type_and_original_question_as_metadata():
    raw = jsonl_rows("metamath.jsonl")
    got = list(formatted_examples(recipe({"path": "sample:metamath", "formatter": "metamath"})))
    assert [g["completion"] for g in got] == [r["response"] for r in raw]
    assert all(g["completion"].splitlines()[-1].startswith("The answer is: ") for g in got)
    assert [g["metadata"] for g in got] == [{"type": r["type"], "original_question": r["original_question"]}
                                            for r in raw]
    assert {g["metadata"]["type"] for g in got} >= {"GSM_SV", "GSM_FOBAR", "MATH_AnsAug"}


def test_code_feedback_is_multi_turn_messages_with_id_metadata():
    raw = jsonl_rows("code_feedback.jsonl")
    got = list(formatted_examples(recipe({"path": "sample:code_feedback", "formatter": "code_feedback"})))
    assert [g["messages"] for g in got] == [r["messages"] for r in raw]
    assert [g["metadata"]["id"] for g in got] == [r["id"] for r in raw]
    assistant_turns = [sum(m["role"] == "assistant" for m in g["messages"]) for g in got]
    assert min(assistant_turns) >= 2 and max(assistant_turns) == 3


def test_alpaca_zh_keeps_chinese_byte_for_byte(llama_tok):
    raw = jsonl_rows("alpaca_zh.jsonl")
    r = recipe({"path": "sample:alpaca_zh", "formatter": "alpaca_zh"})
    got = list(formatted_examples(r))
    for g, row in zip(got, raw, strict=True):
        expected = f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]
        assert g["prompt"].encode("utf-8") == expected.encode("utf-8")
        assert g["completion"].encode("utf-8") == row["output"].encode("utf-8")
    assert any(not row["input"] for row in raw) and any(row["input"] for row in raw)
    train, _ = build_datasets(r, llama_tok)  # rendered as chat; the text survives tokenization too
    for rendered, row in zip(train, raw):
        answer = rendered["completion"][0]["content"]
        assert answer == row["output"]
        assert llama_tok.decode(llama_tok(answer, add_special_tokens=False)["input_ids"]) == row["output"]


def test_alpaca_english_without_input_is_just_the_instruction():
    raw = jsonl_rows("alpaca.jsonl")
    got = list(formatted_examples(recipe({"path": "sample:alpaca", "formatter": "alpaca"})))
    for g, row in zip(got, raw, strict=True):
        assert g["prompt"] == (f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"])


def test_sharegpt_maps_speakers_to_roles():
    raw = jsonl_rows("sharegpt.jsonl")
    got = list(formatted_examples(recipe({"path": "sample:sharegpt", "formatter": "sharegpt"})))
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    assert [g["messages"] for g in got] == [
        [{"role": roles[t["from"]], "content": t["value"]} for t in r["conversations"]] for r in raw]
    assert any(g["messages"][0]["role"] == "system" for g in got)


def test_content_given_as_text_parts_is_read_as_one_text(tmp_path):
    """The OpenAI form ("content": [{"type": "text", "text": ...}], mixed with plain strings across rows) was
    refused as "content must be text"; an image part is refused naming it (lora_ns trains on text only)."""
    def part(text):
        return [{"type": "text", "text": text}]

    path = tmp_path / "chat.jsonl"
    rows = [[{"role": "user", "content": part("2+2") + part("?")}, {"role": "assistant", "content": "4"}],
            [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": part("6")}]]
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows), encoding="utf-8")
    got = [row["messages"] for row in formatted_examples(recipe({"path": str(path), "formatter": "messages"}))]
    assert got == [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                   [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]]
    image = [{"type": "image_url", "image_url": {"url": "x.png"}}, *part("what is it?")]
    path.write_text(json.dumps({"messages": [{"role": "user", "content": image},
                                             {"role": "assistant", "content": "a cat"}]}) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        list(formatted_examples(recipe({"path": str(path), "formatter": "messages"})))
    (problem,) = err.value.problems
    assert problem.line == 1 and "message 1 (user) has image_url parts" in problem.message


def test_glue_mrpc_hf_schema():
    raw = jsonl_rows("glue_mrpc.jsonl")
    got = list(formatted_examples(recipe({"path": "sample:glue_mrpc", "formatter": "glue_mrpc"}, "seq_cls",
                                         "builtin:tiny-bert", num_labels=2)))
    assert [(g["sentence1"], g["sentence2"], g["label"], g["metadata"]["idx"]) for g in got] == \
        [(r["sentence1"], r["sentence2"], r["label"], r["idx"]) for r in raw]


def test_glue_mrpc_original_tsv_with_bom_and_unbalanced_quotes():
    path = SAMPLES_DIR / "glue_mrpc_msr.tsv"
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    expected = [line.split("\t") for line in lines[1:]]
    assert any(cells[3].count('"') % 2 for cells in expected)  # the sample does hold an unbalanced quote
    got = list(formatted_examples(recipe({"path": "sample:glue_mrpc_msr", "formatter": "glue_mrpc"}, "seq_cls",
                                         "builtin:tiny-bert", num_labels=2)))
    assert [(g["label"], g["metadata"]["#1 ID"], g["metadata"]["#2 ID"], g["sentence1"], g["sentence2"])
            for g in got] == [(int(q), i1, i2, s1, s2) for q, i1, i2, s1, s2 in expected]
    assert "NA" in [g["sentence1"] for g in got]  # not turned into a missing value


def test_text_formatter_skips_blank_lines_only():
    lines = (SAMPLES_DIR / "cpt_text.txt").read_text(encoding="utf-8").splitlines()
    r = recipe({"path": "sample:cpt_text", "formatter": "text"}, "cpt")
    train, _ = build_datasets(r)
    assert train["text"] == [line for line in lines if line.strip()]
    assert len(train) < len(lines) and len(lines) > 200


def test_a_number_among_texts_is_trained_as_text(tmp_path):
    """A number in a column of texts: `datasets` types the column `Json` and gave the converted rows that type,
    which decoded the text "42" back to 42 (train crashed in the tokenizer or in `str.strip`)."""
    path = tmp_path / "mixed.jsonl"
    rows = [{"sentence1": f"s {i}", "sentence2": "t", "label": i % 2} for i in range(4)]
    rows[2]["sentence1"] = 42
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    r = recipe({"path": str(path), "formatter": "glue_mrpc"}, "seq_cls", "builtin:tiny-bert", num_labels=2)
    assert build_datasets(r)[0]["sentence1"] == ["s 0", "s 1", "42", "s 3"]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("a", 4.5, "b")), encoding="utf-8")
    assert build_datasets(recipe({"path": str(path), "formatter": "text"}, "cpt"))[0]["text"] == ["a", "4.5", "b"]


@pytest.mark.parametrize("formatter", ["glue_mrpc", "pair"])
def test_labels_written_as_floats_are_read_as_the_class_ids(tmp_path, formatter):
    """pandas writes a column of ints with a gap as floats ("1.0" in a CSV): read as in JSON, where 1.0 was
    class 1 already; a fraction is still no class."""
    path = tmp_path / "labels.csv"
    path.write_text("sentence1,sentence2,label\na,b,1.0\nc,d,0.0\ne,f,0\n", encoding="utf-8")
    r = recipe({"path": str(path), "formatter": formatter}, "seq_cls", "builtin:tiny-bert", num_labels=2)
    assert [e["label"] for e in formatted_examples(r)] in ([1, 0, 0], ["1.0", "0.0", "0"])
    assert [label_id(e["label"]) for e in formatted_examples(r)] == [1, 0, 0]
    path.write_text("sentence1,sentence2,label\na,b,0.5\n", encoding="utf-8")
    with pytest.raises(UserError, match="labels.csv:2: label: unknown label '0.5'"):
        list(formatted_examples(r))
    kto = [FORMATTERS["kto"]({"prompt": "q", "completion": "a", "label": v})["label"] for v in ("1.0", 0.0, "0")]
    assert kto == [True, False, False]


def test_columns_map_generic_formatter_fields():
    r = recipe({"path": "sample:gsm8k", "formatter": "prompt_completion",
                "columns": {"prompt": "question", "completion": "answer"}})
    got = list(formatted_examples(r, limit=3))
    raw = jsonl_rows("gsm8k.jsonl")[:3]
    assert [(g["prompt"], g["completion"]) for g in got] == [(x["question"], x["answer"]) for x in raw]


def test_every_formatter_has_a_kind_and_required_fields():
    assert {"glue_mrpc", "gsm8k", "metamath", "code_feedback", "alpaca", "alpaca_zh", "messages", "sharegpt",
            "prompt_completion", "text", "pair"} <= set(FORMATTERS)
    for f in FORMATTERS.values():
        assert f.kind in ("prompt_completion", "messages", "text", "pair",
                          "preference", "unpaired", "prompt_only") and f.fields  # last 3: lora_ns.data.preference


# --- file layouts -------------------------------------------------------------------------------------------

ROWS = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(12)]


def write_layout(folder: Path, fmt: str) -> str:
    """ROWS in one file of the given format (or a glob / folder of several); returns dataset.path."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        (folder / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
        return str(folder / "d.jsonl")
    if fmt == "json":
        (folder / "d.json").write_text(json.dumps(ROWS, indent=1), encoding="utf-8")
        return str(folder / "d.json")
    if fmt in ("csv", "tsv"):
        with open(folder / f"d.{fmt}", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, ["question", "answer"], delimiter="," if fmt == "csv" else "\t",
                                    quoting=csv.QUOTE_MINIMAL if fmt == "csv" else csv.QUOTE_NONE, escapechar="\\")
            writer.writeheader()
            writer.writerows([{**r, "answer": r["answer"].replace("\n", " ")} if fmt == "tsv" else r for r in ROWS])
        return str(folder / f"d.{fmt}")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(ROWS), folder / "d.parquet")
        return str(folder / "d.parquet")
    if fmt == "glob":
        for k in range(3):
            (folder / f"part-{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[4 * k:4 * k + 4]))
        return str(folder / "part-*.jsonl")
    if fmt == "folder":
        for k in range(2):
            (folder / f"shard{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[6 * k:6 * k + 6]))
        return str(folder)
    raise ValueError(fmt)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv", "parquet", "glob", "folder"])
def test_every_file_layout_loads_the_same_rows(tmp_path, fmt):
    path = write_layout(tmp_path / fmt, fmt)
    got = list(formatted_examples(recipe({"path": path, "formatter": "gsm8k"})))
    expected = [r["answer"].replace("\n", " ") if fmt == "tsv" else r["answer"] for r in ROWS]
    assert [g["prompt"] for g in got] == [r["question"] for r in ROWS]
    assert [g["completion"] for g in got] == expected


def test_an_edited_csv_is_read_again_not_taken_from_the_cache(tmp_path):
    data = tmp_path / "qa.csv"
    r = recipe({"path": str(data), "formatter": "gsm8k"})
    for answer in ("first", "second"):
        data.write_text(f"question,answer\nq,{answer}\n", encoding="utf-8")
        assert load(r.dataset)[0]["answer"] == [answer]


def test_txt_file_and_max_samples(tmp_path):
    (tmp_path / "corpus.txt").write_text("first line\n\nsecond line\nthird line\n", encoding="utf-8")
    r = recipe({"path": str(tmp_path / "corpus.txt"), "formatter": "text", "max_samples": 3}, "cpt")
    raw = load(r.dataset)[0]
    assert raw["text"] == ["first line", "", "second line", "third line"]
    train, _ = build_datasets(r)
    assert train["text"] == ["first line", "second line"]  # 3 rows read, the blank one skipped


def test_folder_with_split_files_and_val_split_by_name(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:9]))
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[9:]))
    r = recipe({"path": str(tmp_path), "formatter": "gsm8k", "val_split": "validation"})
    train, evaluation = build_datasets(r)
    assert len(train) == 9 and len(evaluation) == 3
    assert [g["prompt"] for g in formatted_examples(r, split="validation")] == [x["question"] for x in ROWS[9:]]


def test_val_split_as_a_file_path(tmp_path, llama_tok):
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:5]))
    r = recipe({"path": "sample:gsm8k", "formatter": "gsm8k", "val_split": str(tmp_path / "val.jsonl")})
    train, evaluation = build_datasets(r, llama_tok)
    assert len(train) == 40 and len(evaluation) == 5
    assert [row["prompt"][-1]["content"] for row in evaluation] == [x["question"] for x in ROWS[:5]]


def test_val_fraction_is_disjoint_and_formatted_examples_match_the_eval_rows(llama_tok):
    r = recipe({"path": "sample:gsm8k", "formatter": "gsm8k", "val_split": 0.25, "seed": 3})
    train, evaluation = build_datasets(r, llama_tok)
    questions = [x["question"] for x in jsonl_rows("gsm8k.jsonl")]
    train_q = [row["prompt"][-1]["content"] for row in train]
    eval_q = [row["prompt"][-1]["content"] for row in evaluation]
    assert len(eval_q) == 10 and sorted(train_q + eval_q) == sorted(questions) and not set(train_q) & set(eval_q)
    assert [g["prompt"] for g in formatted_examples(r, split=0.25)] == eval_q
    assert [g["prompt"] for g in formatted_examples(r)] == train_q
    assert [questions[g["row"] - 1] for g in formatted_examples(r, split=0.25)] == eval_q


def test_streaming_gives_the_same_rendered_examples(llama_tok):
    base = {"path": "sample:metamath", "formatter": "metamath", "max_samples": 12}
    eager, _ = build_datasets(recipe(base), llama_tok)
    streamed, _ = build_datasets(recipe({**base, "streaming": True}), llama_tok)
    import datasets

    assert isinstance(streamed, datasets.IterableDataset) and streamed.column_names is None
    assert list(streamed) == list(eager) and len(eager) == 12
    s_ex = list(formatted_examples(recipe({**base, "streaming": True})))
    assert s_ex == list(formatted_examples(recipe(base)))


def test_streaming_hold_out_is_stable_and_disjoint(llama_tok):
    r = recipe({"path": "sample:gsm8k", "formatter": "gsm8k", "streaming": True, "val_split": 0.3})
    train, evaluation = build_datasets(r, llama_tok)
    t, e = [x["prompt"][-1]["content"] for x in train], [x["prompt"][-1]["content"] for x in evaluation]
    assert len(t) + len(e) == 40 and not set(t) & set(e) and e
    assert [g["prompt"] for g in formatted_examples(r, split=0.3)] == e


# --- rendering ------------------------------------------------------------------------------------------------

def test_explicit_prompt_template_wins_over_the_chat_template(llama_tok):
    template = "### Question:\n{prompt}\n### Answer:\n"
    r = recipe({"path": "sample:gsm8k", "formatter": "gsm8k", "prompt_template": template, "max_samples": 2})
    train, _ = build_datasets(r, llama_tok)
    raw = jsonl_rows("gsm8k.jsonl")[:2]
    assert train["prompt"] == [template.format(prompt=x["question"]) for x in raw]
    assert train["completion"] == [x["answer"] for x in raw]


def test_chat_rendering_with_system_prompt_and_prompt_text(llama_tok):
    r = recipe({"path": "sample:gsm8k", "formatter": "gsm8k", "system_prompt": "Be brief.", "max_samples": 1})
    row = next(iter(build_datasets(r, llama_tok)[0]))
    assert [m["role"] for m in row["prompt"]] == ["system", "user"] and row["prompt"][0]["content"] == "Be brief."
    example = next(formatted_examples(r))
    text = prompt_text(example, r, llama_tok)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    assert example["prompt"] in text and example["completion"] not in text


def test_without_a_chat_template_the_default_template_is_used(llama_tok):
    import copy

    plain = copy.copy(llama_tok)
    plain.chat_template = None
    r = recipe({"path": "sample:gsm8k", "formatter": "gsm8k", "max_samples": 1})
    row = next(iter(build_datasets(r, plain)[0]))
    assert isinstance(row["prompt"], str) and row["prompt"].startswith("### Instruction:\n")
    with pytest.raises(UserError, match="no chat template"):
        build_datasets(recipe({"path": "sample:sharegpt", "formatter": "sharegpt"}), plain)


def test_split_last_reply_is_the_conversation_before_the_last_assistant_turn():
    user, first, again, last = ({"role": r, "content": c} for r, c in
                                (("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")))
    assert split_last_reply([user, first, again, last]) == ([user, first, again], "a2")
    assert split_last_reply([user]) == ([user], None)


def test_sft_defaults_follow_the_formatter_kind():
    assert sft_defaults(recipe({"path": "sample:code_feedback", "formatter": "code_feedback"})) == \
        {"assistant_only_loss": True}
    assert sft_defaults(recipe({"path": "sample:gsm8k", "formatter": "gsm8k"}))["completion_only_loss"] is True
    assert sft_defaults(recipe({"path": "sample:cpt_text", "formatter": "text"}, "cpt")) == {}


# --- seq_cls encoding ---------------------------------------------------------------------------------------

def test_encode_pairs_maps_string_labels_and_tokenizes_pairs(tiny_bert):
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    data = Dataset.from_list([{"sentence1": "a cat sat", "sentence2": "a cat was sitting", "label": "equivalent"},
                              {"sentence1": "it rained", "sentence2": "it was sunny", "label": "not_equivalent"}])
    enc = encode_pairs(data, tok, 32, ["not_equivalent", "equivalent"])
    assert enc["labels"] == [1, 0]
    assert enc[0]["input_ids"] == tok("a cat sat", "a cat was sitting", truncation=True, max_length=32)["input_ids"]
    assert set(enc.column_names) == {*tok("a", "b").keys(), "labels"}  # the text columns are gone
    single = encode_pairs(Dataset.from_list([{"sentence1": "fine", "sentence2": None, "label": 1}]), tok, 8, None)
    assert single[0]["input_ids"] == tok("fine")["input_ids"]


def test_encode_pairs_on_the_msr_sample(tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    r = recipe({"path": "sample:glue_mrpc_msr", "formatter": "glue_mrpc"}, "seq_cls", "builtin:tiny-bert", num_labels=2)
    train, _ = build_datasets(r, tok)
    enc = encode_pairs(train, tok, 64, None)
    assert enc["labels"] == train["label"] and max(len(x) for x in enc["input_ids"]) <= 64


# --- padding statistics -----------------------------------------------------------------------------------

def test_padding_counts_the_pad_tokens_of_unpacked_batches():
    # batches (10, 2) and (2, 2): 8 pad tokens; one row per batch pads nothing; (3, 5, 5): 2 to reach 5.
    assert padding([10, 2, 2, 2], 2) == 8 and padding([40, 3], 1) == 0 and padding([3, 5, 5], 3) == 2


# --- validate's data check ---------------------------------------------------------------------------------

def test_check_dataset_reads_only_a_sample(tmp_path, tiny_llama, monkeypatch):
    """validate stays quick on any data size because of data over EVERY_ROW_BYTES it reads the first
    SAMPLE_ROWS rows only: a file with that many good rows and then a broken one checks clean, and says how
    many rows it sampled."""
    import lora_ns.validate.data
    from lora_ns.validate.data import SAMPLE_ROWS

    monkeypatch.setattr(lora_ns.validate.data, "EVERY_ROW_BYTES", 0)  # as if the file were large

    data = tmp_path / "big.jsonl"
    good = "".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(SAMPLE_ROWS))
    data.write_text(good + "{not json, and never read\n", encoding="utf-8")
    problems = check_dataset(recipe({"path": str(data), "formatter": "gsm8k"}))
    assert not [p for p in problems if p.severity != "info"], problems
    assert any(f"{SAMPLE_ROWS} rows sampled" in p.message for p in problems), problems
    data.write_text("{not json\n" + good, encoding="utf-8")  # the same broken row inside the sample is caught
    assert [(p.file, p.line) for p in check_dataset(recipe({"path": str(data), "formatter": "gsm8k"}))
            if p.is_error] == [(str(data), 1)]


@pytest.mark.parametrize("limit", [128, 64])  # 64: rows exceed it, so the counts must be the untruncated lengths
def test_check_dataset_reports_token_stats(llama_tok, limit):
    r = parse_recipe({"model": {"name_or_path": "builtin:tiny-llama"},
                      "dataset": {"path": "sample:gsm8k", "formatter": "gsm8k"}, "training": {"max_length": limit}})
    problems = check_dataset(r)
    assert not [p for p in problems if p.severity != "info"]
    stats = next(p for p in problems if "p50" in p.message)
    lengths = [len(llama_tok.apply_chat_template([{"role": "user", "content": x["question"]},
                                                  {"role": "assistant", "content": x["answer"]}],
                                                 tokenize=True, return_dict=True)["input_ids"])
               for x in jsonl_rows("gsm8k.jsonl")]
    assert stats.file.endswith("gsm8k.jsonl")
    assert f"max {max(lengths)};" in stats.message
    assert f"; {sum(n > limit for n in lengths)} exceed training.max_length={limit}" in stats.message


def test_check_dataset_errors_and_warnings(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "q1", "answer": "a1"}) + "\n" +
                    json.dumps({"question": "q2", "answer": "  "}) + "\n" +
                    json.dumps({"question": "q3", "answer": ""}) + "\n", encoding="utf-8")
    problems = check_dataset(recipe({"path": str(data), "formatter": "gsm8k"}))
    warning = next(p for p in problems if p.severity == "warning")
    assert (warning.file, warning.line, warning.field) == (str(data), 2, "answer") and "2 of 3" in warning.message
    assert "'answer'" in warning.message
    missing = check_dataset(recipe({"path": str(data), "formatter": "metamath"}))
    assert {(p.field, p.line) for p in missing if p.is_error} == {("query, response", 1)}  # one line, one mistake


def test_check_dataset_offline_hub_dataset_is_a_warning():
    problems = check_dataset(recipe({"path": "nyu-mll/glue", "name": "mrpc", "formatter": "glue_mrpc"}, "seq_cls",
                                    "builtin:tiny-bert", num_labels=2))
    assert [(p.severity, "not reachable" in p.message) for p in problems] == [("warning", True)]
