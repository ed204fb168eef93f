"""The bad-input suite: every kind of mistake a user makes gives ONE line that names the file (or the field
path) and says how to fix it, exits 2, prints no traceback and writes nothing.

The cases are a table, built for classes of mistakes (recipe, data, file system, checkpoint, security) across
every command (validate, train, merge, infer, evaluate, preprocess):

- ``tests/bad_inputs/*.yaml``: one recipe each; leading comments say what to expect

      # expect: training.learning_rate      the field (or, for whole-file errors, the words) the error names
      # file: data/x.jsonl:3                the file the error names, when not the recipe itself
      # args: --no-model training.x=1       extra command-line arguments ({repo} = the repository root)
      # run: train                          run lora_ns.train (errors found only at train time)
      # needs: no-gpu                       skip where a GPU is visible
      # lines: 3                            several distinct mistakes in one file (e.g. three bad rows):
                                            one line each (default 1)

- `TABLE` below: cases whose inputs are written by the case itself (raw YAML, data files, broken adapters and
  checkpoints, paths under a file), for any command.

Each case runs in a fresh copy of the corpus, in-process (fast: torch is imported once), and the copy must be
byte-for-byte unchanged after. Progress bars are turned off: they are not part of what an error prints.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from conftest import REPO

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
COMMANDS = ("validate", "train", "merge", "infer", "evaluate", "preprocess")
NOTE = re.compile(r"^lora_ns\.validate: (info|warning): ")
LINE = re.compile(r"^lora_ns\.(?P<command>\w+): error: (?P<problem>.+ — \S.*)$")  # "... — <the fix>"


@dataclass(frozen=True)
class Case:
    name: str
    command: str
    args: tuple[str, ...]
    expect: str  # the field (or words) the error names
    file: str  # the file the error names
    files: dict[str, str | bytes] = field(default_factory=dict)  # written into the copy before the run
    setup: Callable[[Path], None] | None = None  # more set-up (e.g. a broken adapter) in the copy
    needs: str = ""
    cls: str = "recipe"  # recipe | data | filesystem | checkpoint | security | command line
    lines: int = 1  # error lines expected: one per mistake


# --- the corpus files ------------------------------------------------------------------------------------

def read_case(path: Path) -> Case:
    meta: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        if match := re.match(r"#\s*(expect|file|args|run|needs|lines):\s*(.*\S)", line):
            meta[match.group(1)] = match.group(2)
    assert "expect" in meta, f"{path.name}: the first comment lines need '# expect: <field>'"
    args = shlex.split(meta.get("args", "").replace("{repo}", str(REPO)))
    return Case(path.stem, meta.get("run", "validate"), (path.name, *args), meta["expect"],
                meta.get("file", path.name), needs=meta.get("needs", ""), cls="corpus", lines=int(meta.get("lines", 1)))


# --- the table ----------------------------------------------------------------------------------------------

def recipe(data: str = "sample:gsm8k", formatter: str = "gsm8k", *, model: str = "builtin:tiny-llama",
           extra: str = "", training: str = "") -> str:
    """A valid recipe's text, with `extra` lines appended and `training` lines under training:."""
    return (f"task: causal_lm\nmodel:\n  name_or_path: {model}\ndataset:\n  path: {data}\n  formatter: {formatter}\n"
            f"{extra}training:\n  max_steps: 1\n{training}")


def alias_bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def pc_recipe(data: str, extra: str = "") -> str:
    return recipe(data, "prompt_completion", extra=extra)


def msg_recipe(data: str) -> str:
    return recipe(data, "messages")


def jsonl(*rows: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


GOOD_ROWS = jsonl(*[{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)])
CHAT_OK = {"role": "assistant", "content": "ok"}


def tiny_config() -> str:
    from lora_ns.builtin_models import resolve_model_path

    return (Path(resolve_model_path("builtin:tiny-llama")) / "config.json").read_text()


def model_folder(weights: str, config: Callable[[], str] = tiny_config, **extra_config) -> Callable[[Path], None]:
    """A local model folder holding config.json (plus `extra_config` keys) and a weights file of that name."""
    def setup(work: Path) -> None:
        folder = work / "model"
        folder.mkdir()
        text = config()
        if extra_config:
            text = json.dumps({**json.loads(text), **extra_config})
        (folder / "config.json").write_text(text)
        (folder / weights).write_bytes(b"\x80\x02not loaded: lora_ns must refuse before reading it")
    return setup


def checkpoint(broken: str, name: str = "out/checkpoint-2") -> Callable[[Path], None]:
    """A checkpoint folder with `broken` damaged: 'weights' truncated, 'optimizer' truncated, 'state' missing."""
    def setup(work: Path) -> None:
        folder = work / name
        folder.mkdir(parents=True)
        shutil.copy(ADAPTER / "adapter_model.safetensors", folder)
        shutil.copy(ADAPTER / "adapter_config.json", folder)
        (folder / "optimizer.pt").write_bytes(TORCH_FILE)
        if broken != "state":
            (folder / "trainer_state.json").write_text('{"global_step": 2}')
        if broken == "weights":
            _truncate(folder / "adapter_model.safetensors")
        if broken == "optimizer":
            _truncate(folder / "optimizer.pt")
    return setup


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def adapter(change: str = "") -> Callable[[Path], None]:
    """A copy of the test adapter at ./adapter, damaged as `change` says."""
    def setup(work: Path) -> None:
        folder = work / "adapter"
        shutil.copytree(ADAPTER, folder)
        weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
        if change == "truncated":
            _truncate(weights)
        elif change == "empty_weights":
            weights.write_bytes(b"")
        elif change == "pickle_only":
            weights.rename(folder / "adapter_model.bin")
        elif change == "no_weights":
            weights.unlink()
        elif change == "no_recipe":
            (folder / "recipe.yaml").unlink()
        elif change == "config_not_json":
            config.write_text("{'r': 8,")
        elif change == "config_not_object":
            config.write_text("[1, 2]")
        elif change == "config_no_peft_type":
            config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "peft_type"}))
        elif change == "not_mergeable":
            config.write_text(json.dumps({**json.loads(config.read_text()), "peft_type": "PROMPT_TUNING"}))
    return setup


def both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(work: Path) -> None:
        for s in setups:
            s(work)
    return setup


def C(name, command, args, expect, file, cls, files=None, setup=None, needs="") -> Case:  # noqa: N802
    return Case(name, command, tuple(shlex.split(args)), expect, file, files or {}, setup, needs, cls)


ADAPTER = Path()  # set by the `made_adapter` fixture (the tiny Llama with a LoRA adapter, saved once)
TORCH_FILE = b""  # a small torch.save file, set by the same fixture
V, NM = "r.yaml --no-model", "r.yaml --no-model --no-data"
PY_TAG = "!!python/object/apply:os.system ['touch pwned']"

TABLE: list[Case] = [
    # --- recipe files: YAML itself --------------------------------------------------------------------------
    C("yaml_duplicate_key", "validate", NM, "peft.r", "r.yaml:9", "recipe",
      {"r.yaml": recipe(extra="peft:\n  r: 8\n  r: 16\n")}),
    C("yaml_duplicate_section", "validate", NM, "training", "r.yaml:9", "recipe",
      {"r.yaml": recipe() + "training:\n  learning_rate: 0.1\n"}),
    C("yaml_duplicate_top_key", "validate", NM, "task", "r.yaml:2", "recipe", {"r.yaml": "task: seq_cls\n" + recipe()}),
    C("yaml_recursive_alias", "validate", NM, "recursive YAML alias", "r.yaml", "security",
      {"r.yaml": recipe(extra="peft: &p\n  loop: *p\n")}),
    C("yaml_python_tag", "validate", NM, "invalid YAML", "r.yaml", "security",
      {"r.yaml": recipe(extra=f"peft:\n  r: {PY_TAG}\n")}),
    C("yaml_python_name_tag", "validate", NM, "invalid YAML", "r.yaml", "security",
      {"r.yaml": recipe(extra="peft:\n  r: !!python/name:os.system\n")}),
    C("yaml_too_big", "validate", NM, "KB", "r.yaml", "security",
      {"r.yaml": recipe() + "# " + "x" * (1 << 20) + "\n"}),
    C("yaml_two_documents", "validate", NM, "invalid YAML", "r.yaml", "recipe",
      {"r.yaml": recipe() + "---\n" + recipe()}),
    C("yaml_tab_indent", "validate", NM, "invalid YAML", "r.yaml:3", "recipe",
      {"r.yaml": "task: causal_lm\nmodel:\n\tname_or_path: x\n"}),
    C("yaml_unclosed_quote", "validate", NM, "invalid YAML", "r.yaml", "recipe",
      {"r.yaml": recipe(extra='peft:\n  target_modules: "all-linear\n')}),
    C("yaml_not_utf8", "validate", NM, "UTF-8", "r.yaml", "recipe", {"r.yaml": b"task: caus\xe9al_lm\n"}),
    C("yaml_empty_file", "validate", NM, "mapping of sections", "r.yaml", "recipe", {"r.yaml": ""}),
    C("yaml_a_list", "validate", NM, "mapping of sections", "r.yaml", "recipe", {"r.yaml": "- task\n- model\n"}),
    C("recipe_is_a_folder", "validate", "recipes_dir --no-model", "folder", "recipes_dir", "filesystem",
      setup=lambda w: (w / "recipes_dir").mkdir()),
    C("validate_show_sample_negative", "validate", "r.yaml --no-model --show-sample -1", "--show-sample",
      "<command line>", "command line", {"r.yaml": recipe()}),
    # --- recipe fields ------------------------------------------------------------------------------------------
    C("dataset_path_empty", "validate", NM, "dataset.path", "r.yaml:5", "recipe", {"r.yaml": recipe(data="''")}),
    C("chat_template_missing_file", "validate", V, "model.chat_template", "r.yaml", "recipe",
      {"r.yaml": recipe(extra="", training="").replace("model:\n", "model:\n  chat_template: templates/x.jinja\n")}),
    C("chat_template_missing_dir_path", "validate", V, "model.chat_template", "r.yaml", "recipe",
      {"r.yaml": recipe().replace("model:\n", "model:\n  chat_template: my_templates/chatml\n")}),
    C("chat_template_syntax_error", "validate", V, "model.chat_template", "r.yaml", "recipe",
      {"r.yaml": recipe().replace("model:\n", "model:\n  chat_template: '{% for m in messages %}{{ m.content }}'\n")}),
    C("chat_template_sandbox_escape", "validate", V, "model.chat_template", "r.yaml", "security",
      {"r.yaml": recipe().replace(
          "model:\n", "model:\n  chat_template: \"{{ ''.__class__.__mro__[1].__subclasses__() }}\"\n")}),
    C("chat_template_raises", "validate", V, "model.chat_template", "r.yaml", "recipe",
      {"r.yaml": recipe().replace("model:\n", "model:\n  chat_template: \"{{ raise_exception('no') }}\"\n")}),
    C("prompt_template_attribute", "validate", V, "dataset.prompt_template", "r.yaml", "security",
      {"r.yaml": pc_recipe("data/good.jsonl", "  prompt_template: '{prompt.__class__.__mro__}'\n"),
       "data/good.jsonl": GOOD_ROWS}),
    C("prompt_template_index", "validate", V, "dataset.prompt_template", "r.yaml", "security",
      {"r.yaml": pc_recipe("data/good.jsonl", "  prompt_template: 'Q: {prompt[0]}'\n"), "data/good.jsonl": GOOD_ROWS}),
    C("prompt_template_conversion", "validate", V, "dataset.prompt_template", "r.yaml", "recipe",
      {"r.yaml": pc_recipe("data/good.jsonl", "  prompt_template: 'Q: {prompt!r}'\n"), "data/good.jsonl": GOOD_ROWS}),
    C("prompt_template_positional", "validate", V, "dataset.prompt_template", "r.yaml", "recipe",
      {"r.yaml": pc_recipe("data/good.jsonl", "  prompt_template: 'Q: {}'\n"), "data/good.jsonl": GOOD_ROWS}),
    C("prompt_template_unknown_name", "validate", V, "dataset.prompt_template", "r.yaml", "recipe",
      {"r.yaml": pc_recipe("data/good.jsonl", "  prompt_template: 'Q: {question}'\n"), "data/good.jsonl": GOOD_ROWS}),
    C("prompt_template_unbalanced", "validate", V, "dataset.prompt_template", "r.yaml", "recipe",
      {"r.yaml": pc_recipe("data/good.jsonl", "  prompt_template: 'Q: {prompt'\n"), "data/good.jsonl": GOOD_ROWS}),
    C("prompt_template_no_prompt", "validate", V, "dataset.prompt_template", "r.yaml", "recipe",
      {"r.yaml": pc_recipe("data/good.jsonl", "  prompt_template: 'Q: {system}'\n"), "data/good.jsonl": GOOD_ROWS}),
    # --- data files ---------------------------------------------------------------------------------------------
    C("csv_unterminated_quote", "validate", V, "never closes", "data/q.csv:49", "data",
      {"r.yaml": pc_recipe("data/q.csv"),
       "data/q.csv": "prompt,completion\n" + "".join(f"q{i},a{i}\n" for i in range(47)) + '"q47,a47\n'
                     + "".join(f"q{i},a{i}\n" for i in range(48, 200))}),
    C("csv_ragged_row", "validate", V, "fields", "data/r.csv:3", "data",
      {"r.yaml": pc_recipe("data/r.csv"), "data/r.csv": "prompt,completion\nq,a\nq,a,extra\n"}),
    C("csv_duplicate_header", "validate", V, "duplicate column", "data/d.csv:1", "data",
      {"r.yaml": pc_recipe("data/d.csv"), "data/d.csv": "prompt,prompt\nq,a\n"}),
    C("csv_quote_inside_field", "validate", V, "malformed CSV", "data/s.csv", "data",
      {"r.yaml": pc_recipe("data/s.csv"), "data/s.csv": 'prompt,completion\n"q"x,a\n'}),
    C("jsonl_read_as_csv", "validate", V, "dataset.data_format", "data/j.jsonl", "data",
      {"r.yaml": pc_recipe("data/j.jsonl", "  data_format: csv\n"), "data/j.jsonl": GOOD_ROWS}),
    C("csv_read_as_json", "validate", V, "data_format", "data/c.csv:1", "data",
      {"r.yaml": pc_recipe("data/c.csv", "  data_format: json\n"), "data/c.csv": "prompt,completion\nq,a\n"}),
    C("csv_read_as_tsv", "validate", V, "data_format: csv", "data/c.csv", "data",
      {"r.yaml": pc_recipe("data/c.csv", "  data_format: tsv\n"), "data/c.csv": "prompt,completion\nq,a\n"}),
    C("csv_named_jsonl", "validate", V, "data_format", "data/c.jsonl:1", "data",
      {"r.yaml": pc_recipe("data/c.jsonl"), "data/c.jsonl": "prompt,completion\nq,a\n"}),
    C("chat_content_null", "validate", V, "messages", "data/m.jsonl:1", "data",
      {"r.yaml": msg_recipe("data/m.jsonl"),
       "data/m.jsonl": jsonl({"messages": [{"role": "user", "content": None}, CHAT_OK]})}),
    C("chat_content_a_list", "validate", V, "messages", "data/m.jsonl:2", "data",
      {"r.yaml": msg_recipe("data/m.jsonl"),
       "data/m.jsonl": jsonl({"messages": [{"role": "user", "content": "hi"}, CHAT_OK]},
                             {"messages": [{"role": "user", "content": ["hi"]}, CHAT_OK]})}),
    C("chat_unknown_role", "validate", V, "messages", "data/m.jsonl:1", "data",
      {"r.yaml": msg_recipe("data/m.jsonl"),
       "data/m.jsonl": jsonl({"messages": [{"role": "human", "content": "hi"}, CHAT_OK]})}),
    C("chat_no_role", "validate", V, "messages", "data/m.jsonl:1", "data",
      {"r.yaml": msg_recipe("data/m.jsonl"), "data/m.jsonl": jsonl({"messages": [{"content": "hi"}, CHAT_OK]})}),
    C("chat_no_assistant", "validate", V, "messages", "data/m.jsonl:1", "data",
      {"r.yaml": msg_recipe("data/m.jsonl"), "data/m.jsonl": jsonl({"messages": [{"role": "user", "content": "hi"}]})}),
    C("chat_messages_a_string", "validate", V, "messages", "data/m.jsonl:1", "data",
      {"r.yaml": msg_recipe("data/m.jsonl"), "data/m.jsonl": jsonl({"messages": "hi"})}),
    C("prompt_is_null", "validate", V, "prompt", "data/p.jsonl:2", "data",
      {"r.yaml": pc_recipe("data/p.jsonl"),
       "data/p.jsonl": jsonl({"prompt": "q", "completion": "a"}, {"prompt": None, "completion": "a"})}),
    C("prompt_is_a_dict", "validate", V, "prompt", "data/p.jsonl:1", "data",
      {"r.yaml": pc_recipe("data/p.jsonl"), "data/p.jsonl": jsonl({"prompt": {"q": 1}, "completion": "a"})}),
    C("jsonl_row_not_object", "validate", V, "JSON object", "data/p.jsonl:2", "data",
      {"r.yaml": pc_recipe("data/p.jsonl"), "data/p.jsonl": '{"prompt": "q", "completion": "a"}\n"just text"\n'}),
    C("jsonl_not_utf8", "validate", V, "UTF-8", "data/p.jsonl:2", "data",
      {"r.yaml": pc_recipe("data/p.jsonl"),
       "data/p.jsonl": b'{"prompt": "q", "completion": "a"}\n{"prompt": "\xff"}\n'}),
    C("json_item_not_object", "validate", V, "row 2: expected a JSON object", "data/p.json", "data",
      {"r.yaml": pc_recipe("data/p.json"), "data/p.json": '[{"prompt": "q", "completion": "a"}, 3]'}),
    C("json_truncated", "validate", V, "not valid JSON", "data/p.json", "data",
      {"r.yaml": pc_recipe("data/p.json"), "data/p.json": '[{"prompt": "q", "completion": "a"}'}),
    C("json_rows_under_a_key", "validate", V, "rows (they seem to sit under 'data')", "data/p.json", "data",
      {"r.yaml": pc_recipe("data/p.json"),
       "data/p.json": json.dumps({"version": 1, "data": [{"prompt": "q", "completion": "a"}]}, indent=2)}),
    C("data_unknown_extension", "validate", V, "data_format", "data/p.xlsx", "data",
      {"r.yaml": pc_recipe("data/p.xlsx"), "data/p.xlsx": "binary"}),
    C("data_glob_matches_nothing", "validate", V, "dataset.path", "data/*.parquet", "data",
      {"r.yaml": pc_recipe("data/*.parquet")}),
    C("data_empty_folder", "validate", V, "dataset.path", "data/empty", "data",
      {"r.yaml": pc_recipe("data/empty")}, setup=lambda w: (w / "data" / "empty").mkdir()),
    C("columns_map_absent_column", "validate", V, "dataset.columns.prompt", "data/good.jsonl", "data",
      {"r.yaml": pc_recipe("data/good.jsonl", "  columns: {prompt: question}\n"), "data/good.jsonl": GOOD_ROWS}),
    C("columns_map_unknown_field", "validate", V, "dataset.columns.answer", "data/good.jsonl", "data",
      {"r.yaml": pc_recipe("data/good.jsonl", "  columns: {answer: completion}\n"), "data/good.jsonl": GOOD_ROWS}),
    C("columns_map_field_typo", "validate", V, "did you mean 'completion'?", "data/good.jsonl", "data",
      {"r.yaml": pc_recipe("data/good.jsonl", "  columns: {completon: completion}\n"),
       "data/good.jsonl": GOOD_ROWS}),
    C("wrong_formatter_for_columns", "validate", V, "instruction", "data/good.jsonl", "data",
      {"r.yaml": recipe("data/good.jsonl", "alpaca"), "data/good.jsonl": GOOD_ROWS}),
    C("train_csv_quote_late", "train", "r.yaml", "never closes", "data/q.csv:302", "data",
      {"r.yaml": pc_recipe("data/q.csv"),
       "data/q.csv": "prompt,completion\n" + "".join(f"q{i},a{i}\n" for i in range(300)) + '"q,a\nq,a\n'}),
    # --- model folders ------------------------------------------------------------------------------------------
    C("model_pickle_only", "validate", "r.yaml --no-data", "model.name_or_path", "r.yaml", "security",
      {"r.yaml": recipe(model="./model")}, model_folder("pytorch_model.bin")),
    C("model_pickle_pt_only", "validate", "r.yaml --no-data", "model.name_or_path", "r.yaml", "security",
      {"r.yaml": recipe(model="./model")}, model_folder("model.pt")),
    C("model_custom_code", "validate", "r.yaml --no-data", "trust_remote_code", "r.yaml", "security",
      {"r.yaml": recipe(model="./model")},
      model_folder("model.safetensors", auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})),
    C("model_config_not_json", "validate", "r.yaml --no-data", "model.name_or_path", "r.yaml", "recipe",
      {"r.yaml": recipe(model="./model")}, model_folder("model.safetensors", config=lambda: "{oops")),
    C("model_folder_no_config", "validate", "r.yaml --no-data", "config.json", "r.yaml", "recipe",
      {"r.yaml": recipe(model="./model")}, lambda w: (w / "model").mkdir()),
    C("train_model_pickle_only", "train", "r.yaml", "model.name_or_path", "r.yaml", "security",
      {"r.yaml": recipe(model="./model")}, model_folder("pytorch_model.bin")),
    # --- output folders (file system) --------------------------------------------------------------------------
    C("output_dir_dot_with_user_files", "validate", NM, "training.output_dir", "r.yaml", "filesystem",
      {"r.yaml": recipe(training="  output_dir: .\n"), "README.md": "mine\n"}),
    C("output_dir_foreign_folder", "validate", NM, "training.output_dir", "r.yaml", "filesystem",
      {"r.yaml": recipe(training="  output_dir: notes\n"), "notes/todo.txt": "mine\n"}),
    C("output_dir_parent_is_file", "validate", NM, "training.output_dir", "r.yaml", "filesystem",
      {"r.yaml": recipe(training="  output_dir: data/not_a_folder.txt/run\n")}),
    C("output_dir_unwritable", "validate", NM, "training.output_dir", "r.yaml", "filesystem",
      {"r.yaml": recipe(training="  output_dir: /proc/sys/lora_ns_run\n")}, needs="linux"),
    C("train_output_dir_dot", "train", "r.yaml", "training.output_dir", "r.yaml", "filesystem",
      {"r.yaml": recipe(training="  output_dir: .\n"), "README.md": "mine\n"}),
    C("train_output_dir_parent_is_file", "train", "r.yaml", "training.output_dir", "r.yaml", "filesystem",
      {"r.yaml": recipe(training="  output_dir: data/not_a_folder.txt/run\n")}),
    C("train_output_dir_unwritable", "train", "r.yaml", "training.output_dir", "r.yaml", "filesystem",
      {"r.yaml": recipe(training="  output_dir: /proc/sys/lora_ns_run\n")}, needs="linux"),
    # --- checkpoints ---------------------------------------------------------------------------------------------
    C("resume_truncated_weights", "validate", NM, "training.resume_from_checkpoint", "r.yaml", "checkpoint",
      {"r.yaml": recipe(training="  output_dir: out\n  resume_from_checkpoint: out/checkpoint-2\n")},
      checkpoint("weights")),
    C("resume_truncated_optimizer", "validate", NM, "training.resume_from_checkpoint", "r.yaml", "checkpoint",
      {"r.yaml": recipe(training="  output_dir: out\n  resume_from_checkpoint: out/checkpoint-2\n")},
      checkpoint("optimizer")),
    C("resume_no_trainer_state", "validate", NM, "training.resume_from_checkpoint", "r.yaml", "checkpoint",
      {"r.yaml": recipe(training="  output_dir: out\n  resume_from_checkpoint: out/checkpoint-2\n")},
      checkpoint("state")),
    C("resume_from_a_file", "validate", NM, "training.resume_from_checkpoint", "r.yaml", "checkpoint",
      {"r.yaml": recipe(training="  resume_from_checkpoint: data/not_a_folder.txt\n")}),
    C("train_resume_truncated_weights", "train", "r.yaml", "training.resume_from_checkpoint", "r.yaml", "checkpoint",
      {"r.yaml": recipe(training="  output_dir: out\n  resume_from_checkpoint: out/checkpoint-2\n")},
      checkpoint("weights")),
    # --- merge -------------------------------------------------------------------------------------------------
    C("merge_no_args", "merge", "", "--adapter", "<command line>", "command line"),
    C("merge_bad_dtype", "merge", "--adapter adapter --output m --dtype fp8", "--dtype", "<command line>",
      "command line", setup=adapter()),
    C("merge_adapter_missing", "merge", "--adapter nowhere --output m", "--adapter", "nowhere", "filesystem"),
    C("merge_adapter_not_adapter", "merge", "--adapter data --output m", "--adapter", "data", "filesystem"),
    C("merge_truncated_weights", "merge", "--adapter adapter --output m", "truncated",
      "adapter/adapter_model.safetensors", "checkpoint", setup=adapter("truncated")),
    C("merge_empty_weights", "merge", "--adapter adapter --output m", "safetensors header",
      "adapter/adapter_model.safetensors", "checkpoint", setup=adapter("empty_weights")),
    C("merge_pickle_adapter", "merge", "--adapter adapter --output m", "pickle",
      "adapter/adapter_model.safetensors", "security", setup=adapter("pickle_only")),
    C("merge_no_weights", "merge", "--adapter adapter --output m", "not found",
      "adapter/adapter_model.safetensors", "checkpoint", setup=adapter("no_weights")),
    C("merge_config_not_json", "merge", "--adapter adapter --output m", "adapter config",
      "adapter/adapter_config.json", "checkpoint", setup=adapter("config_not_json")),
    C("merge_config_not_object", "merge", "--adapter adapter --output m", "peft_type",
      "adapter/adapter_config.json", "checkpoint", setup=adapter("config_not_object")),
    C("merge_config_no_peft_type", "merge", "--adapter adapter --output m", "peft_type",
      "adapter/adapter_config.json", "checkpoint", setup=adapter("config_no_peft_type")),
    C("merge_not_mergeable", "merge", "--adapter adapter --output m", "peft_type",
      "adapter/adapter_config.json", "checkpoint", setup=adapter("not_mergeable")),
    C("merge_output_under_file", "merge", "--adapter adapter --output data/not_a_folder.txt/m", "--output",
      "data/not_a_folder.txt/m", "filesystem", setup=adapter()),
    C("merge_output_is_file", "merge", "--adapter adapter --output data/not_a_folder.txt", "--output",
      "data/not_a_folder.txt", "filesystem", setup=adapter()),
    C("merge_output_not_empty", "merge", "--adapter adapter --output data", "--output", "data", "filesystem",
      setup=adapter()),
    C("merge_output_is_adapter", "merge", "--adapter adapter --output adapter", "--output", "adapter",
      "filesystem", setup=adapter()),
    C("merge_output_unwritable", "merge", "--adapter adapter --output /proc/sys/lora_ns_merged", "--output",
      "/proc/sys/lora_ns_merged", "filesystem", setup=adapter(), needs="linux"),
    # --- infer ---------------------------------------------------------------------------------------------------
    C("infer_no_model", "infer", "--prompt hi", "--model", "<command line>", "command line"),
    C("infer_prompt_and_file", "infer", "--model adapter --prompt hi --input-file p.txt", "--input-file",
      "<command line>", "command line"),
    C("infer_model_missing", "infer", "--model ./nowhere --prompt hi", "--model", "./nowhere", "filesystem"),
    C("infer_base_missing", "infer", "--model adapter --base ./nowhere --prompt hi", "folder not found", "./nowhere",
      "filesystem", setup=adapter()),
    C("infer_empty_prompt", "infer", "--model adapter --prompt ''", "--prompt", "<command line>", "command line",
      setup=adapter()),
    C("infer_blank_prompt", "infer", "--model adapter --prompt '  '", "--prompt", "<command line>", "command line",
      setup=adapter()),
    C("infer_negative_temperature", "infer", "--model adapter --prompt hi --temperature -1", "--temperature",
      "<command line>", "command line", setup=adapter()),
    C("infer_zero_temperature", "infer", "--model adapter --prompt hi --temperature 0", "--temperature",
      "<command line>", "command line", setup=adapter()),
    C("infer_infinite_temperature", "infer", "--model adapter --prompt hi --temperature inf", "--temperature",
      "<command line>", "command line", setup=adapter()),  # sampled uniformly from the vocabulary
    C("infer_top_p_zero", "infer", "--model adapter --prompt hi --top-p 0", "--top-p", "<command line>",
      "command line", setup=adapter()),
    C("infer_top_p_above_one", "infer", "--model adapter --prompt hi --top-p 1.5", "--top-p", "<command line>",
      "command line", setup=adapter()),
    C("infer_batch_size_zero", "infer", "--model adapter --prompt hi --batch-size 0", "--batch-size",
      "<command line>", "command line", setup=adapter()),
    C("infer_max_new_tokens_zero", "infer", "--model adapter --prompt hi --max-new-tokens 0", "--max-new-tokens",
      "<command line>", "command line", setup=adapter()),
    C("infer_negative_seed", "infer", "--model adapter --prompt hi --seed -1", "--seed", "<command line>",
      "command line", setup=adapter()),  # numpy's "Seed must be between 0 and 2**32 - 1" traceback
    C("infer_seed_past_numpy", "infer", "--model adapter --prompt hi --seed 4294967296", "--seed",
      "<command line>", "command line", setup=adapter()),
    C("infer_temperature_not_number", "infer", "--model adapter --prompt hi --temperature warm", "--temperature",
      "<command line>", "command line", setup=adapter()),
    C("infer_empty_prompt_file", "infer", "--model adapter --input-file p.txt", "--input-file", "p.txt", "data",
      {"p.txt": ""}, adapter()),
    C("infer_blank_prompt_file", "infer", "--model adapter --input-file p.txt", "--input-file", "p.txt", "data",
      {"p.txt": "\n  \n\n"}, adapter()),
    C("infer_empty_jsonl", "infer", "--model adapter --input-file p.jsonl", "no prompts", "p.jsonl", "data",
      {"p.jsonl": "\n"}, adapter()),
    C("infer_input_missing", "infer", "--model adapter --input-file nowhere.txt", "--input-file", "nowhere.txt",
      "filesystem", setup=adapter()),
    C("infer_input_bad_json", "infer", "--model adapter --input-file p.jsonl", "not valid JSON", "p.jsonl:2", "data",
      {"p.jsonl": '{"prompt": "a"}\n{"prompt": \n'}, adapter()),
    C("infer_input_no_prompt", "infer", "--model adapter --input-file p.jsonl", "prompt", "p.jsonl:1", "data",
      {"p.jsonl": '{"question": "a"}\n'}, adapter()),
    C("infer_input_not_utf8", "infer", "--model adapter --input-file p.txt", "not UTF-8", "p.txt:1", "data",
      {"p.txt": b"caf\xe9\n"}, adapter()),
    C("infer_output_exists", "infer", "--model adapter --prompt hi --output-file data/good.jsonl", "--output-file",
      "data/good.jsonl", "filesystem", {"data/good.jsonl": GOOD_ROWS}, adapter()),
    C("infer_output_under_file", "infer", "--model adapter --prompt hi --output-file data/not_a_folder.txt/o.jsonl",
      "--output-file", "data/not_a_folder.txt/o.jsonl", "filesystem", setup=adapter()),
    C("infer_output_is_folder", "infer", "--model adapter --prompt hi --output-file data --overwrite",
      "--output-file", "data", "filesystem", setup=adapter()),
    C("infer_truncated_adapter", "infer", "--model adapter --prompt hi", "truncated",
      "adapter/adapter_model.safetensors", "checkpoint", setup=adapter("truncated")),
    C("infer_adapter_config_not_json", "infer", "--model adapter --prompt hi", "adapter config",
      "adapter/adapter_config.json", "checkpoint", setup=adapter("config_not_json")),
    C("infer_pickle_adapter", "infer", "--model adapter --prompt hi", "pickle",
      "adapter/adapter_model.safetensors", "security", setup=adapter("pickle_only")),
    C("infer_bad_recipe", "infer", "--model adapter --recipe r.yaml --prompt hi", "peft.r", "r.yaml",
      "recipe", {"r.yaml": recipe(extra="peft:\n  r: 8\n  r: 16\n")}, adapter()),
    C("infer_pickle_only_model", "infer", "--model ./model --prompt hi", "model.safetensors", "./model", "security",
      setup=model_folder("pytorch_model.bin")),
    C("infer_hub_id_offline", "infer", "--model someone/no-such-model --prompt hi", "cannot load the model",
      "someone/no-such-model", "filesystem"),
    # --- evaluate --------------------------------------------------------------------------------------------------
    C("evaluate_no_recipe", "evaluate", "--adapter adapter", "no recipe.yaml there", "adapter", "filesystem",
      setup=adapter("no_recipe")),
    C("evaluate_recipe_missing", "evaluate", "nowhere.yaml --adapter adapter", "not found", "nowhere.yaml",
      "filesystem", setup=adapter()),
    C("evaluate_limit_zero", "evaluate", "adapter/recipe.yaml --adapter adapter --limit 0", "--limit",
      "<command line>", "command line", setup=adapter()),
    C("evaluate_batch_size_zero", "evaluate", "adapter/recipe.yaml --adapter adapter --batch-size 0",
      "--batch-size", "<command line>", "command line", setup=adapter()),
    C("evaluate_adapter_missing", "evaluate", "adapter/recipe.yaml --adapter nowhere", "--adapter", "nowhere",
      "filesystem", setup=adapter()),
    C("evaluate_data_file_missing", "evaluate", "adapter/recipe.yaml --adapter adapter --data-file nowhere.jsonl",
      "--data-file", "nowhere.jsonl", "filesystem", setup=adapter()),
    C("evaluate_no_eval_split", "evaluate", "adapter/recipe.yaml --adapter adapter", "dataset.val_split",
      "adapter/recipe.yaml", "recipe", setup=adapter()),
    C("evaluate_output_under_file", "evaluate",
      "adapter/recipe.yaml --adapter adapter --split train --output-dir data/not_a_folder.txt/eval", "--output-dir",
      "data/not_a_folder.txt/eval", "filesystem", setup=adapter()),
    C("evaluate_results_exist", "evaluate", "adapter/recipe.yaml --adapter adapter --split train --output-dir ev",
      "--output-dir", "ev/metrics.json", "filesystem", {"ev/metrics.json": "{}"}, adapter()),
    C("evaluate_bad_data_file", "evaluate",
      "adapter/recipe.yaml --adapter adapter --data-file data/bad.jsonl", "not valid JSON", "data/bad.jsonl:2",
      "data", {"data/bad.jsonl": '{"question": "q", "answer": "#### 1"}\n{"question": \n'}, adapter()),
    C("evaluate_truncated_adapter", "evaluate", "adapter/recipe.yaml --adapter adapter --data-file data/g.jsonl",
      "truncated", "adapter/adapter_model.safetensors", "checkpoint",
      {"data/g.jsonl": jsonl({"question": "1+1?", "answer": "#### 2"})}, adapter("truncated")),
    C("evaluate_recipe_override_typo", "evaluate", "adapter/recipe.yaml --adapter adapter dataset.pth=x",
      "dataset.pth", "adapter/recipe.yaml", "recipe", setup=adapter()),
    # --- preprocess ------------------------------------------------------------------------------------------------
    C("preprocess_raw_dir_missing", "preprocess", "--raw-dir nowhere --out-file o.txt", "--raw-dir", "nowhere",
      "filesystem"),
    C("preprocess_raw_dir_is_file", "preprocess", "--raw-dir data/not_a_folder.txt --out-file o.txt", "--raw-dir",
      "data/not_a_folder.txt", "filesystem"),
    C("preprocess_out_under_file", "preprocess", "--raw-dir raw --out-file data/not_a_folder.txt/o.txt",
      "--out-file", "data/not_a_folder.txt/o.txt", "filesystem", {"raw/a.txt": "some text\n"}),
    C("preprocess_out_exists", "preprocess", "--raw-dir raw --out-file data/not_a_folder.txt", "--out-file",
      "data/not_a_folder.txt", "filesystem", {"raw/a.txt": "some text\n"}),
    C("preprocess_bad_unit", "preprocess", "--raw-dir raw --out-file o.txt --unit page", "--unit",
      "<command line>", "command line", {"raw/a.txt": "some text\n"}),
]


def table_cases() -> list[Case]:
    names = [c.name for c in TABLE]
    assert len(names) == len(set(names)), "case names must be unique"
    return TABLE


CASES = [read_case(p) for p in sorted(CORPUS.glob("*.yaml"))] + table_cases()


# --- running a case -----------------------------------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every file and folder under `folder` with its modification time and contents."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def made_adapter(tmp_path_factory, tiny_llama):
    """A LoRA adapter on the tiny Llama saved like training saves one, and a small torch.save file."""
    global ADAPTER, TORCH_FILE
    import torch

    from conftest import make_adapter
    from lora_ns.config import parse_recipe

    folder = tmp_path_factory.mktemp("adapter")
    r = parse_recipe({"model": {"name_or_path": "builtin:tiny-llama"},
                      "dataset": {"path": "sample:gsm8k", "formatter": "gsm8k"}}, "adapter/recipe.yaml")
    ADAPTER = make_adapter(folder, r)
    torch.save({"state": {}, "param_groups": [{"lr": 0.1}]}, folder.parent / "optimizer.pt")
    TORCH_FILE = (folder.parent / "optimizer.pt").read_bytes()
    return ADAPTER


@pytest.fixture
def quiet_progress(monkeypatch):
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    monkeypatch.setenv("TQDM_DISABLE", "1")
    yield
    datasets.enable_progress_bars()
    transformers.utils.logging.enable_progress_bar()


def prepare(case: Case, tmp: Path) -> Path:
    work = tmp / "corpus"
    shutil.copytree(CORPUS, work)
    for name, content in case.files.items():
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    if case.setup:
        case.setup(work)
    return work


def run_in_process(case: Case, work: Path, capsys, monkeypatch) -> tuple[int, str]:
    from lora_ns.errors import run_cli

    monkeypatch.chdir(work)
    main = importlib.import_module(f"lora_ns.{case.command}").main
    capsys.readouterr()
    try:
        code = run_cli(f"lora_ns.{case.command}", lambda: main(list(case.args)))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def check_one_line(case: Case, code: int, stderr: str) -> None:
    # train prints validate's info/warning notes before it loads anything; an error found later follows them.
    lines = [line for line in stderr.splitlines()
             if line.strip() and not (case.command == "train" and NOTE.match(line))]
    assert code == 2, f"{case.name}: exit {code}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, f"{case.name}: a traceback was printed\n{stderr[-3000:]}"
    assert len(lines) == case.lines, f"{case.name}: expected {case.lines} line(s), got {len(lines)}:\n" + \
        "\n".join(lines[:20])
    for line in lines:
        match = LINE.match(line)
        assert match and match.group("command") == case.command, \
            f"{case.name}: not 'lora_ns.{case.command}: error: <problem> — <fix>':\n{line}"
    assert case.file in lines[0] and case.expect in lines[0], \
        f"{case.name}: the line does not name both {case.file!r} and {case.expect!r}:\n{lines[0]}"
    assert len(set(lines)) == len(lines), f"{case.name}: the same problem is reported twice"


def skip_unless_possible(case: Case) -> None:
    if case.needs == "no-gpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("needs a machine without a GPU")
    if case.needs == "linux" and (not Path("/proc/sys").is_dir() or os.access("/proc/sys", os.W_OK)):
        pytest.skip("needs a read-only /proc/sys (a folder nobody, root included, can create files in)")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.command}-{c.name}")
def test_bad_input(case: Case, tmp_path, capsys, monkeypatch, made_adapter, quiet_progress):
    skip_unless_possible(case)
    work = prepare(case, tmp_path)
    before = snapshot(work)
    code, stderr = run_in_process(case, work, capsys, monkeypatch)
    check_one_line(case, code, stderr)
    assert snapshot(work) == before, f"{case.name}: files were written or changed in the working folder"


def test_suite_covers_every_command_and_class():
    assert len(CASES) >= 120
    assert {c.command for c in CASES} == set(COMMANDS)
    assert {c.cls for c in TABLE} == {"recipe", "data", "filesystem", "checkpoint", "security", "command line"}
    assert len({c.expect for c in CASES}) >= 60, "cases should name many different fields"


# --- cases that need a process of their own ------------------------------------------------------------------

def run_subprocess(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_alias_bomb_is_refused_quickly(tmp_path):
    """A 1 KB "billion laughs" recipe expands to 9**9 strings: refused while composing, long before anything
    walks it (the old reader spun for minutes in the secret scan). 60 s is slack for a slow CI machine: the
    refusal itself is milliseconds; the rest is the interpreter starting."""
    (tmp_path / "r.yaml").write_text(alias_bomb() + recipe())
    assert len((tmp_path / "r.yaml").read_bytes()) < 2048
    result = run_subprocess(["-m", "lora_ns.validate", "r.yaml", "--no-model", "--no-data"], tmp_path, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("lora_ns.validate: error: r.yaml:") and "aliases expand" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.mark.parametrize("command", ["validate", "train"])
def test_missing_recipe_file(command, in_tmp):
    result = run_subprocess(["-m", f"lora_ns.{command}", "no_such_recipe.yaml"], in_tmp, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"lora_ns.{command}: error: no_such_recipe.yaml: recipe file not found" in result.stderr
    assert list(in_tmp.iterdir()) == []


# --- what is not an error: the safe paths stay open ----------------------------------------------------------

def test_yaml_aliases_within_bounds_and_merge_keys_still_work(tmp_path):
    from lora_ns.yaml_reader import read_yaml

    (tmp_path / "r.yaml").write_text("base: &b {lr: 1}\nrun:\n  <<: *b\n  steps: 2\nsame: [*b, *b]\n")
    data, lines = read_yaml(tmp_path / "r.yaml")
    assert data["run"] == {"lr": 1, "steps": 2} and data["same"] == [{"lr": 1}, {"lr": 1}]
    assert lines["run.steps"] == 4


def test_output_dir_rules_allow_runs_and_explicit_overwrite(tmp_path):
    from lora_ns.checkpoints import output_dir_problem
    from lora_ns.config import parse_recipe

    def problem(out: Path, **training):
        return output_dir_problem(parse_recipe({"model": {"name_or_path": "builtin:tiny-llama"},
                                                "dataset": {"path": "sample:gsm8k", "formatter": "gsm8k"},
                                                "training": {"output_dir": str(out), **training}}, "r.yaml"))

    mine = tmp_path / "mine"
    (mine / ".hidden").mkdir(parents=True)
    assert problem(mine) is None  # empty but for hidden files
    (mine / "README.md").write_text("x")
    assert "not a lora_ns run" in problem(mine).message
    (mine / "recipe.yaml").write_text("x")  # lora_ns saves it with the weights, run_summary.json last
    assert "a lora_ns run cut off as it saved" in problem(mine).message
    assert problem(mine, overwrite_output_dir=True) is None  # the user said so
    (mine / "checkpoint-3").mkdir()
    assert problem(mine) is None  # an interrupted lora_ns run: resumed, not refused


def test_resume_skips_a_damaged_newest_checkpoint(tmp_path, made_adapter, capsys):
    """The README promises resume from the last COMPLETE checkpoint: a newer one with a truncated file is
    skipped, and the line says which and why."""
    from lora_ns.checkpoints import last_checkpoint

    for step, broken in ((1, ""), (2, "optimizer"), (3, "weights")):
        checkpoint(broken, f"out/checkpoint-{step}")(tmp_path)
    assert last_checkpoint(tmp_path / "out") == str(tmp_path / "out" / "checkpoint-1")
    err = capsys.readouterr().err
    assert "checkpoint-3: adapter_model.safetensors is truncated" in err
    assert "checkpoint-2: optimizer.pt is truncated" in err


def test_full_disk_while_saving_is_one_line_naming_the_last_checkpoint(tmp_path, made_adapter):
    import errno

    from lora_ns.train import disk_errors
    from lora_ns.config import parse_recipe
    from lora_ns.errors import UserError

    checkpoint("", "out/checkpoint-1")(tmp_path)
    r = parse_recipe({"model": {"name_or_path": "builtin:tiny-llama"},
                      "dataset": {"path": "sample:gsm8k", "formatter": "gsm8k"},
                      "training": {"output_dir": str(tmp_path / "out")}}, "r.yaml")
    with pytest.raises(UserError) as caught, disk_errors(r):
        raise OSError(errno.ENOSPC, "No space left on device")
    line = str(caught.value)
    assert "\n" not in line and "No space left on device" in line and line.endswith("out/checkpoint-1")
    with pytest.raises(ValueError), disk_errors(r):  # not a disk problem: not hidden
        raise ValueError("a bug")


def test_bitsandbytes_kernel_warning_is_hidden_and_nothing_else(caplog):
    import logging

    from lora_ns.errors import LIBRARY_NOISE, quiet_library_noise

    quiet_library_noise()
    quiet_library_noise()  # idempotent
    name, prefix = next(iter(LIBRARY_NOISE.items()))
    logger = logging.getLogger(name)
    logger.warning(prefix + " from kernels-community: %s. Please make sure...", "no kernels")
    logger.warning("a real warning")
    assert prefix not in caplog.text and "a real warning" in caplog.text


def test_a_file_the_os_refuses_mid_run_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    """The checks up front cannot foresee every write (a disk that fills, a path refused at creation): what
    an OSError names becomes one line; one naming no file is a bug and keeps its traceback."""
    import errno

    from lora_ns.errors import run_cli
    from lora_ns.fileio import write_json_atomic

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".metrics.json.tmp"))

    monkeypatch.setattr(os, "replace", full_disk)
    assert run_cli("lora_ns.evaluate", lambda: write_json_atomic(tmp_path / "metrics.json", {}) or 0) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"lora_ns.evaluate: error: {tmp_path}/.metrics.json.tmp: No space left on device — ")
    assert not (tmp_path / "metrics.json").exists()

    def bug():
        raise OSError("no file named")

    with pytest.raises(OSError, match="no file named"):
        run_cli("lora_ns.evaluate", bug)
