"""CommandParser: snake_case and legacy spellings of flags, overrides left alone, one-line errors."""

from __future__ import annotations

import pytest

from lora_ns.command_line import CommandParser
from lora_ns.errors import UserError


def parser() -> CommandParser:
    p = CommandParser(prog="x", aliases={"--model_path": "--model", "--input_text": "--prompt"})
    p.add_argument("--model")
    p.add_argument("--prompt")
    p.add_argument("--output-file")
    p.add_argument("--max-new-tokens", type=int, default=1)
    return p


def test_snake_case_and_legacy_names_reach_the_same_option():
    args = parser().parse_args(["--model_path", "m", "--input_text=hi", "--output_file", "o", "--max_new_tokens=5"])
    assert (args.model, args.prompt, args.output_file, args.max_new_tokens) == ("m", "hi", "o", 5)


def test_unknown_tokens_and_values_after_the_separator_are_untouched():
    args, rest = parser().parse_known_args(["--training.output_dir", "5", "--model", "m", "--", "--model_path"])
    assert args.model == "m"
    assert rest[:2] == ["--training.output_dir", "5"] and "--model_path" in rest


def test_a_bad_flag_is_one_user_error_not_usage_text():
    with pytest.raises(UserError) as err:
        parser().parse_args(["--max-new-tokens", "many"])
    assert len(err.value.problems) == 1 and "--help" in str(err.value.problems[0])


def test_train_takes_the_hf_script_flags_as_overrides():
    from lora_ns.train import recipe_and_overrides

    recipe, overrides = recipe_and_overrides(["--config", "r.yaml", "--output_dir", "o", "--model_name_or_path=m",
                                              "training.max_steps=3", "--peft.r", "4"])
    assert recipe == "r.yaml"
    assert overrides == ["training.output_dir=o", "model.name_or_path=m", "training.max_steps=3", "--peft.r", "4"]


def test_legacy_script_names_and_flags_reach_our_commands(monkeypatch):
    from lora_ns import cli

    seen = {}
    monkeypatch.setattr(cli, "run_command", lambda name, args: seen.update(name=name, args=args) or 0)
    cli.main(["merge_adapter", "--adapter_path", "a", "--output_path", "b"])
    assert seen == {"name": "merge", "args": ["--adapter_path", "a", "--output_path", "b"]}
    cli.main(["validate_config", "--all"])
    assert seen["name"] == "validate"


def test_the_old_scripts_documented_command_lines_parse_to_our_options():
    from lora_ns import evaluate, infer, merge

    args = infer.make_parser().parse_args(["--config", "r.yaml", "--model_path", "m", "--input_text", "hi",
                                           "--output_file", "o.jsonl"])
    assert (args.recipe, args.model, args.prompt, args.output_file) == ("r.yaml", "m", "hi", "o.jsonl")
    args = merge.make_parser().parse_args(["--config", "r.yaml", "--adapter_path", "a", "--output_path", "b"])
    assert (args.recipe, args.adapter, args.output) == ("r.yaml", "a", "b")
    args = evaluate.make_parser().parse_args(["r.yaml", "--adapter_path", "a"])
    assert args.adapter == "a"
