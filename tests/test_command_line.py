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
