"""Inference: adapter/base detection, prompt rendering as in training, batching, files, seq_cls output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_ns.errors import UserError, run_cli
from lora_ns.inference import generate, load, prompt_and_reference, render_prompt
from lora_ns.infer import main, read_inputs

from conftest import QUICKSTART, fp32_reassociation_tol, make_adapter

PROMPTS = ["What is 2+2?", "Ben has 33 stickers and gives away 27. How many stickers are left?", "请用中文回答"]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_llama) -> Path:
    from lora_ns.config import load_recipe

    out = tmp_path_factory.mktemp("infer") / "out"
    recipe = load_recipe(QUICKSTART, [f"training.output_dir={out}", "peft.init_lora_weights=false",
                                      "dataset.system_prompt=Answer briefly."])
    return make_adapter(out, recipe)


@pytest.fixture(scope="module")
def loaded(adapter_dir):
    return load(str(adapter_dir))


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tiny_bert) -> Path:
    from lora_ns.config import load_recipe

    folder = tmp_path_factory.mktemp("cls")
    (folder / "recipe.yaml").write_text(
        "task: seq_cls\nmodel: {name_or_path: 'builtin:tiny-bert', dtype: fp32, labels: [negative, positive]}\n"
        "peft: {method: lora, r: 4, target_modules: [query, value], init_lora_weights: false}\n"
        "dataset: {path: pairs.jsonl, formatter: glue_mrpc}\n", encoding="utf-8")
    return make_adapter(folder / "out", load_recipe(folder / "recipe.yaml"))


def test_detects_adapter_and_base(loaded, adapter_dir, tiny_llama):
    import torch
    from peft import PeftModel

    assert loaded.kind == "adapter" and loaded.task == "causal_lm"
    assert loaded.recipe is not None
    base = load("builtin:tiny-llama")
    assert base.kind == "base" and not isinstance(base.model, PeftModel) and base.recipe is None
    # The adapter is folded into the weights for decoding: the same logits as peft's unmerged model
    assert not isinstance(loaded.model, PeftModel)
    unmerged = PeftModel.from_pretrained(load("builtin:tiny-llama").model, str(adapter_dir)).eval()
    ids = loaded.tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        folded, expected, untuned = (m(**ids.to(m.device)).logits.cpu() for m in (loaded.model, unmerged, base.model))
    tol = fp32_reassociation_tol([expected])
    assert float((folded - expected).abs().max()) <= tol < float((untuned - expected).abs().max())


def test_prompts_are_rendered_as_in_training(loaded):
    from lora_ns.data.render import prompt_text

    tok, recipe = loaded.tokenizer, loaded.recipe
    example = {"prompt": "What is 2+2?", "completion": "4"}
    prompt = render_prompt(tok, example["prompt"], recipe)
    assert prompt.text == prompt_text(example, recipe, tok)
    assert prompt.text.startswith("<|im_start|>system\nAnswer briefly.") and prompt.text.endswith("assistant\n")
    assert not prompt.add_special_tokens  # the chat template carries its own special tokens

    templated = recipe.model_copy(update={"dataset": recipe.dataset.model_copy(
        update={"prompt_template": "Q: {prompt}\nA:"})})
    plain = render_prompt(tok, example["prompt"], templated)
    assert plain.text == prompt_text(example, templated, tok) and "Q: What is 2+2?\nA:" in plain.text
    assert plain.add_special_tokens

    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "again"}]
    assert render_prompt(tok, chat, recipe).text == prompt_text(
        {"messages": chat + [{"role": "assistant", "content": "x"}]}, recipe, tok)


def test_left_padded_batches_match_one_at_a_time(loaded):
    batched = generate(loaded, PROMPTS, max_new_tokens=8, batch_size=3, progress=False)
    single = [generate(loaded, [p], max_new_tokens=8, batch_size=1, progress=False)[0] for p in PROMPTS]
    assert batched == single
    assert any(batched)


def test_cli_single_prompt_prints_the_completion(adapter_dir, loaded, capsys):
    assert main(["--model", str(adapter_dir), "--prompt", PROMPTS[1], "--greedy", "--max-new-tokens", "8"]) == 0
    expected = generate(loaded, [PROMPTS[1]], max_new_tokens=8, progress=False)[0]
    assert capsys.readouterr().out.strip() == expected.strip()


def test_cli_input_file_to_output_file(adapter_dir, tmp_path, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": PROMPTS[0], "id": 1}, {"messages": [{"role": "user", "content": PROMPTS[1]}]}]) + "\n")
    out = tmp_path / "results.jsonl"
    argv = ["--model", str(adapter_dir), "--input-file", str(questions), "--output-file", str(out),
            "--greedy", "--max-new-tokens", "6", "--batch-size", "2", "--no-progress"]
    capsys.readouterr()
    assert main(argv) == 0
    assert "Loading weights" not in capsys.readouterr().err  # transformers' own bar: --no-progress is none
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("id") for r in rows] == [1, None] and all(isinstance(r["output"], str) for r in rows)

    out.write_text("earlier results")
    capsys.readouterr()
    assert run_cli("lora_ns.infer", lambda: main(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and "--overwrite" in err and err.count("\n") == 0
    assert out.read_text() == "earlier results"
    assert main(argv + ["--overwrite"]) == 0 and len(out.read_text().splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.jsonl", "results.jsonl"]  # no temp files left


def test_rows_in_the_training_datas_own_columns_are_read_by_the_recipes_formatter(adapter_dir, tmp_path):
    """GSM8K rows (question/answer), as the recipe trained on them, were refused ("row has no prompt") though
    evaluate --data-file reads them: the formatter gives the prompt, the answer stays as the reference."""
    rows = [{"question": PROMPTS[1], "answer": "Ben has 33 - 27 = 6 left.\n#### 6", "id": 7},
            {"question": PROMPTS[0], "answer": "2 + 2 = 4\n#### 4", "id": 8}]
    questions = tmp_path / "gsm8k.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "results.jsonl"
    assert main(["--model", str(adapter_dir), "--input-file", str(questions), "--output-file", str(out),
                 "--greedy", "--max-new-tokens", "4", "--no-progress"]) == 0
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["id"]) for r in results] == [(r["question"], r["id"]) for r in rows]
    assert all(r["completion"] and isinstance(r["output"], str) for r in results)
    with pytest.raises(UserError, match="row has no prompt") as err:
        read_inputs(questions)  # no recipe: no formatter to read them
    questions.write_text('{"query": "?"}\n')
    with pytest.raises(UserError) as err:
        main(["--model", str(adapter_dir), "--input-file", str(questions)])
    assert "row has no prompt" in str(err.value) and "(question, answer)" in str(err.value)


def test_interactive_answers_each_stdin_line(adapter_dir, loaded, monkeypatch, capsys):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{PROMPTS[0]}\n\n"))
    assert main(["--model", str(adapter_dir), "--interactive", "--greedy", "--max-new-tokens", "6"]) == 0
    expected = generate(loaded, [PROMPTS[0]], max_new_tokens=6, progress=False)[0]
    assert capsys.readouterr().out == f">>> {PROMPTS[0]}\n{expected}\n\n"


def test_interactive_keeps_the_conversation_of_a_chat_model(adapter_dir, loaded, monkeypatch, capsys):
    """Each line is the next user turn after the earlier ones and their replies; /clear starts over."""
    import io
    import sys

    one, two = PROMPTS[1], PROMPTS[0]
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{one}\n{two}\n/clear\n{two}\n"))
    assert main(["--model", str(adapter_dir), "--interactive", "--greedy", "--max-new-tokens", "6"]) == 0
    first = generate(loaded, [one], max_new_tokens=6, progress=False)[0]
    conversation = [{"role": "user", "content": one}, {"role": "assistant", "content": first},
                    {"role": "user", "content": two}]
    second = generate(loaded, [conversation], max_new_tokens=6, progress=False)[0]
    alone = generate(loaded, [two], max_new_tokens=6, progress=False)[0]
    assert second != alone  # the earlier turns change this reply: else the test could not tell them apart
    assert capsys.readouterr().out == (f">>> {one}\n{first}\n\n>>> {two}\n{second}\n\n"
                                       f"(new conversation)\n\n>>> {two}\n{alone}\n\n")


def test_interactive_leaves_out_the_earliest_turns_past_the_context(adapter_dir, loaded, monkeypatch, capsys):
    """A conversation that with its reply would pass the model's context loses its earliest exchange (and
    says so) rather than run past the positions the model knows."""
    import io
    import sys

    from lora_ns import infer
    from lora_ns.infer import prompt_tokens

    one, two = PROMPTS[1], PROMPTS[0]
    first = generate(loaded, [one], max_new_tokens=6, progress=False)[0]
    whole = [{"role": "user", "content": one}, {"role": "assistant", "content": first},
             {"role": "user", "content": two}]
    limit = prompt_tokens(loaded, whole) + 6 - 1  # one token short of the whole conversation and its reply
    assert prompt_tokens(loaded, whole[2:]) + 6 <= limit  # the last turn alone fits
    monkeypatch.setattr(infer, "context_length", lambda config: limit)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{one}\n{two}\n"))
    assert main(["--model", str(adapter_dir), "--interactive", "--greedy", "--max-new-tokens", "6"]) == 0
    alone = generate(loaded, [two], max_new_tokens=6, progress=False)[0]
    assert capsys.readouterr().out == (
        f">>> {one}\n{first}\n\n(the 2 earliest messages left out: with the reply the conversation passes the "
        f"model's {limit}-token context)\n>>> {two}\n{alone}\n\n")


def test_a_checkpoint_folder_is_run_with_its_runs_recipe(adapter_dir, loaded, tmp_path, capsys):
    """checkpoint-<step> folders hold no recipe.yaml: infer on one rendered prompts without the run's system
    prompt, template or task (answers to a question training never asked), and merge dropped it."""
    import shutil

    from lora_ns.checkpoints import saved_recipe_file
    from lora_ns.merge import main as merge_main

    run = tmp_path / "run"
    checkpoint = run / "checkpoint-2"
    shutil.copytree(adapter_dir, checkpoint, ignore=shutil.ignore_patterns("recipe.yaml"))
    shutil.copy2(adapter_dir / "recipe.yaml", run / "recipe.yaml")
    assert saved_recipe_file(checkpoint) == run / "recipe.yaml" and saved_recipe_file(tmp_path) is None
    from_checkpoint = load(str(checkpoint))
    assert from_checkpoint.recipe.model_dump() == loaded.recipe.model_dump()
    assert loaded.recipe.dataset.system_prompt == "Answer briefly."  # renders differently without the recipe
    assert main(["--model", str(checkpoint), "--prompt", PROMPTS[0], "--greedy", "--max-new-tokens", "6"]) == 0
    expected = generate(loaded, [PROMPTS[0]], max_new_tokens=6, progress=False)[0]
    assert capsys.readouterr().out.strip() == expected
    assert merge_main(["--adapter", str(checkpoint), "--output", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "recipe.yaml").read_text() == (run / "recipe.yaml").read_text()


def test_prompt_and_reference_of_a_row():
    """infer and evaluate split a row alike: a conversation ending on an assistant turn is asked up to that
    turn, which is the reference; one ending on a user turn is asked whole."""
    user, reply, again, last = ({"role": r, "content": c} for r, c in
                                [("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")])
    assert prompt_and_reference({"messages": [user, reply, again, last]}) == ([user, reply, again], "a2")
    assert prompt_and_reference({"messages": [user, reply, again]}) == ([user, reply, again], "")
    assert prompt_and_reference({"prompt": "q", "completion": "a", "text": "t"}) == ("q", "a")
    assert prompt_and_reference({"text": "t"}) == ("t", "")


def test_text_file_and_bad_jsonl(tmp_path):
    txt = tmp_path / "q.txt"
    txt.write_text("first\n\nsecond\n")
    assert read_inputs(txt) == [{"prompt": "first"}, {"prompt": "second"}]
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"question": "no prompt"}\n')
    with pytest.raises(UserError) as err:
        read_inputs(bad)
    assert err.value.problems[0].line == 2


@pytest.mark.parametrize("line, field, words", [
    ('{"prompt": {"q": 1}}', "prompt", "expected text, got dict"),
    ('{"messages": ["hi"]}', "messages", "message 1 needs 'role' and 'content'"),
    ('{"prompt": [{"role": "user", "content": null}]}', "prompt", "content must be text, got null"),
    ('{"sentence1": "a", "sentence2": ["b"]}', "sentence2", "expected text, got list"),
])
def test_prompts_that_are_not_text_or_chats_are_refused_naming_the_line(tmp_path, line, field, words):
    """Such a row crashed in the chat template, after the model had loaded."""
    path = tmp_path / "q.jsonl"
    path.write_text('{"prompt": "ok"}\n' + line + "\n")
    with pytest.raises(UserError) as err:
        read_inputs(path)
    (problem,) = err.value.problems
    assert (problem.line, problem.field) == (2, field) and words in problem.message
    chat = [{"role": "user", "content": "hi"}]
    pair = {"sentence1": "a", "sentence2": 2}
    path.write_text(json.dumps({"prompt": chat}) + '\n{"text": 3}\n' + json.dumps(pair))  # as the loader reads
    assert read_inputs(path) == [{"prompt": chat}, {"text": "3"}, {"sentence1": "a", "sentence2": "2"}]


def test_seq_cls_prints_label_names_and_probabilities(classifier_dir, capsys):
    assert main(["--model", str(classifier_dir), "--prompt", "a fine day", "--pair", "a fine evening"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] in ("negative", "positive")
    probs = dict(line.strip().split(": ") for line in lines[1:])
    assert set(probs) == {"negative", "positive"}
    # printed with 4 decimals: each rounded by <= 5e-5, so the two sum to 1 within 1e-4
    assert sum(float(p) for p in probs.values()) == pytest.approx(1.0, abs=2 * 5e-5 + 1e-12)
    assert lines[0] == max(probs, key=lambda k: float(probs[k]))


def test_a_classifier_trained_on_pairs_is_given_pairs(classifier_dir, capsys, monkeypatch):
    """A glue_mrpc classifier given one sentence answered a question it never learned, silently. The second
    text comes from --pair, after a tab (typed or .txt lines) or as sentence2; one text alone is an error."""
    import io
    import sys

    from lora_ns.inference import classify, load

    loaded = load(str(classifier_dir))
    expected = classify(loaded, [("a fine day", "a fine evening")], progress=False)[0]["label"]
    capsys.readouterr()
    code = run_cli("lora_ns.infer", lambda: main(["--model", str(classifier_dir), "--prompt", "a fine day"]))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "trained on sentence pairs (glue_mrpc)" in err and "--pair" in err
    monkeypatch.setattr(sys, "stdin", io.StringIO("a fine day\na fine day\ta fine evening\n"))
    assert main(["--model", str(classifier_dir), "--interactive"]) == 0  # the session goes on after the error
    out, err = capsys.readouterr()
    assert "prompt 1 is one text" in err and out.startswith(f">>> a fine day\ta fine evening\n{expected}\n")


def test_seq_cls_adapter_loads_without_the_newly_initialized_head_report(classifier_dir):
    """transformers reports the base's classifier as MISSING ... newly initialized; the adapter's saved head is
    loaded right after, so the report is wrong here and must not reach the user (a fresh process: transformers'
    log handler is bound to the real stderr)."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = ["--model", str(classifier_dir), "--prompt", "hi", "--pair", "hello"]
    result = subprocess.run([sys.executable, "-m", "lora_ns.infer", *command], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LOAD REPORT" not in result.stderr and "MISSING" not in result.stderr, result.stderr[-2000:]
    assert "gemm_4bit_forward" not in result.stderr


def test_a_missing_model_is_a_one_line_error(tmp_path, capsys):
    code = run_cli("lora_ns.infer", lambda: main(["--model", str(tmp_path / "nothing"), "--prompt", "hi"]))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not found" in err and err.count("\n") == 0


def test_an_adapter_type_peft_does_not_know_is_one_line(adapter_dir, tmp_path, capsys):
    """A newer peft's adapter (or a hand-edited config): peft's KeyError traceback from infer and evaluate."""
    import shutil

    copy = Path(shutil.copytree(adapter_dir, tmp_path / "adapter"))
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "FOO"}))
    code = run_cli("lora_ns.infer", lambda: main(["--model", str(copy), "--prompt", "hi"]))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "peft_type: FOO is no adapter type this peft knows" in err


def test_a_home_relative_model_path_is_expanded(adapter_dir, capsys, monkeypatch):
    """``--model=~/run`` (no shell expands a ``~`` after ``=``) was called missing though the folder exists."""
    monkeypatch.setenv("HOME", str(adapter_dir.parent))
    code = run_cli("lora_ns.infer", lambda: main([f"--model=~/{adapter_dir.name}", "--prompt", "hi",
                                                  "--max-new-tokens", "2"]))
    assert code == 0, capsys.readouterr().err[-500:]
    code = run_cli("lora_ns.infer", lambda: main(["--model=~/nothing", "--prompt", "hi"]))
    assert code == 2 and f"{adapter_dir.parent / 'nothing'}: --model: model folder not found" in \
        capsys.readouterr().err


def test_a_base_the_adapter_does_not_fit_is_one_line_and_another_name_a_warning(adapter_dir, tmp_path, capsys,
                                                                               tiny_llama, tiny_qwen2):
    """--base of other shapes printed a page of torch's "size mismatch" lines; one of the same shapes but
    another name (a local copy, or the wrong model) loads with a warning naming both."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_llama)
    config.intermediate_size *= 2
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "wider")
    args = ["--model", str(adapter_dir), "--prompt", "hi", "--max-new-tokens", "2", "--base"]
    code = run_cli("lora_ns.infer", lambda: main([*args, str(tmp_path / "wider")]))
    err = [line for line in capsys.readouterr().err.splitlines() if "Loading weights" not in line]
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert "--base: the adapter does not fit" in err[-1] and tiny_llama in err[-1]
    assert run_cli("lora_ns.infer", lambda: main([*args, tiny_qwen2])) == 0
    assert f"trained on {tiny_llama}; loading it on --base {tiny_qwen2}" in capsys.readouterr().err
    assert run_cli("lora_ns.infer", lambda: main([*args, "builtin:tiny-llama"])) == 0  # the same model
    assert "warning" not in capsys.readouterr().err
