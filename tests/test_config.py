"""Recipe parsing: overrides, unknown-key suggestions, type coercion, YAML line numbers."""

from __future__ import annotations

import pytest

from lora_ns.config import apply_overrides, load_recipe, parse_overrides, parse_recipe
from lora_ns.errors import UserError
from lora_ns.yaml_reader import MAX_YAML_BYTES, parse_yaml

BASE = {
    "task": "causal_lm",
    "model": {"name_or_path": "builtin:tiny-llama"},
    "dataset": {"path": "sample:gsm8k", "formatter": "gsm8k"},
    "training": {"max_steps": 3},
}


def _copy() -> dict:
    import copy

    return copy.deepcopy(BASE)


def test_minimal_recipe_gets_defaults():
    recipe = parse_recipe(_copy())
    assert recipe.peft.method == "lora"
    assert recipe.model.trust_remote_code is False
    assert recipe.quantization.load_in_4bit is False
    assert recipe.output_dir == "outputs/<recipe>"


def test_override_forms_all_reach_the_recipe():
    pairs = parse_overrides(["training.learning_rate=1e-3", "--peft.r", "4", "--dataset.streaming",
                             "--model.dtype=fp32", "max_length=64"])
    data = _copy()
    apply_overrides(data, pairs)
    recipe = parse_recipe(data)
    assert recipe.training["learning_rate"] == pytest.approx(1e-3)  # "1e-3" text coerced to float
    assert recipe.peft.options["r"] == 4
    assert recipe.dataset.streaming is True
    assert recipe.model.dtype == "fp32"
    assert recipe.training["max_length"] == 64  # dotless key found in its only section


def test_a_text_field_override_keeps_the_text_as_typed():
    """YAML read a prompt template given on the command line as a mapping ('Q: {prompt}'), a '### Response:'
    line as a comment and a newline as a space: the template trained on was not the one typed."""
    typed = {"prompt_template": "### Question:\n{prompt}\nA:\n", "system_prompt": "Be brief.\nSay why."}
    data = _copy()
    apply_overrides(data, parse_overrides([f"dataset.{k}={v}" for k, v in typed.items()] + ["model.revision=007"]))
    recipe = parse_recipe(data)
    assert recipe.dataset.prompt_template == typed["prompt_template"]
    assert recipe.dataset.system_prompt == typed["system_prompt"] and recipe.model.revision == "007"
    apply_overrides(data, parse_overrides(["dataset.system_prompt=null", "training.max_steps=3"]))
    recipe = parse_recipe(data)
    assert recipe.dataset.system_prompt is None and recipe.training["max_steps"] == 3  # YAML still


def test_ambiguous_dotless_override_is_rejected():
    data = _copy()
    with pytest.raises(UserError, match="several sections"):
        apply_overrides(data, parse_overrides(["revision=main"]))  # model.revision and dataset.revision


def test_a_tilde_override_removes_the_key_a_new_task_lacks():
    """Switching `task` from the command line: a key the new task's trainer has no field for is an error
    until `~key` (Hydra's spelling) removes it; removing what the recipe does not hold is one too."""
    data = _copy()
    data["training"]["max_length"] = 64
    switch = ["task=grpo", "dataset.formatter=gsm8k_prompt"]
    apply_overrides(data, parse_overrides(switch))
    with pytest.raises(UserError, match=r"training.max_length: not a field for task .grpo. \(only for causal_lm"):
        parse_recipe(data)
    for removal in ("~training.max_length", "~max_length"):
        data = _copy()
        data["training"]["max_length"] = 64
        apply_overrides(data, parse_overrides([*switch, removal]))
        recipe = parse_recipe(data)
        assert recipe.task == "grpo" and "max_length" not in recipe.training
    with pytest.raises(UserError, match="~training.max_steps_typo: not in the recipe"):
        apply_overrides(_copy(), parse_overrides(["~training.max_steps_typo"]))


def test_unknown_keys_suggest_the_closest_field():
    data = _copy()
    data["training"]["learnig_rate"] = 0.1
    data["peft"] = {"method": "lora", "lora_alpah": 8}
    data["modle"] = {}
    with pytest.raises(UserError) as err:
        parse_recipe(data, "r.yaml")
    text = str(err.value)
    assert "training.learnig_rate: unknown field — did you mean 'learning_rate'?" in text
    assert "peft.lora_alpah" in text and "'lora_alpha'" in text
    assert "modle: unknown section — did you mean 'model'?" in text


def test_keys_the_libraries_dropped_say_what_replaced_them():
    from lora_ns.hf_fields import DROPPED_TRAINING_KEYS

    data = _copy()
    data["training"].update({key: 1 for key in DROPPED_TRAINING_KEYS})
    with pytest.raises(UserError) as err:
        parse_recipe(data, "r.yaml")
    fixes = {p.field: p.fix for p in err.value.problems}
    assert fixes == {f"training.{key}": fix for key, fix in DROPPED_TRAINING_KEYS.items()}
    assert "use warmup_steps: a value below 1 is a share of the run" in fixes["training.warmup_ratio"]
    assert fixes["training.group_by_length"] == "use train_sampling_strategy: group_by_length"


def test_torch_spellings_of_a_dtype_are_read_as_the_short_names():
    """HF configs and docs write bfloat16 / torch.float16 (torch_dtype: bfloat16, quant_storage=torch.bfloat16)."""
    data = _copy()
    data["model"]["dtype"] = "bfloat16"
    data["quantization"] = {"load_in_4bit": True, "bnb_4bit_compute_dtype": "torch.float16",
                            "bnb_4bit_quant_storage": "bfloat16"}
    recipe = parse_recipe(data, "r.yaml")
    assert recipe.model.dtype == "bf16" and recipe.quantization.bnb_4bit_compute_dtype == "fp16"
    assert recipe.quantization.bnb_4bit_quant_storage == "bf16"
    data["model"]["dtype"] = "bfloat17"
    with pytest.raises(UserError, match="model.dtype: got 'bfloat17'"):
        parse_recipe(data, "r.yaml")


def test_misspelt_values_suggest_the_closest_choice():
    from lora_ns.data import label_id

    with pytest.raises(UserError, match="task: got 'causal-lm' — did you mean 'causal_lm'"):
        parse_recipe({**_copy(), "task": "causal-lm"}, "r.yaml")
    with pytest.raises(UserError, match="task: got 'translation' — use one of: causal_lm, "):
        parse_recipe({**_copy(), "task": "translation"}, "r.yaml")
    with pytest.raises(ValueError, match="unknown label 'equivalnet'") as err:
        label_id("equivalnet", ["not_equivalent", "equivalent"])
    assert err.value.fix == "did you mean 'equivalent'?"


def test_peft_fields_depend_on_method():
    data = _copy()
    data["peft"] = {"method": "prompt_tuning", "num_virtual_tokens": 8}
    assert parse_recipe(data).peft.options == {"num_virtual_tokens": 8}
    data["peft"] = {"method": "ia3", "num_virtual_tokens": 8}
    with pytest.raises(UserError, match="unknown field for peft method 'ia3'"):
        parse_recipe(data)


def test_every_peft_method_is_one_table_row_with_a_peft_config_class():
    """config.PeftMethod is hf_fields.PEFT_TYPES plus full: a method added to the table is accepted,
    listed in the typo message and builds its own peft config class."""
    from lora_ns.config import PeftMethod
    from lora_ns.hf_fields import PEFT_TYPES, peft_config_class

    assert PeftMethod.__args__ == (*PEFT_TYPES, "full")
    for method, kind in PEFT_TYPES.items():
        assert peft_config_class(method).__name__.upper() == f"{kind.replace('_', '')}CONFIG", method
    data = _copy()
    data["peft"] = {"method": "lorra"}
    with pytest.raises(UserError) as err:
        parse_recipe(data)
    assert "use " + ", ".join(f"'{m}'" for m in PEFT_TYPES) + " or 'full'" in str(err.value)


def test_managed_peft_fields_are_refused():
    data = _copy()
    data["peft"] = {"method": "lora", "task_type": "CAUSAL_LM"}
    with pytest.raises(UserError, match="peft.task_type: is set by lora_ns"):
        parse_recipe(data)


def test_wrong_type_names_the_field_and_expected_type():
    data = _copy()
    data["training"]["num_train_epochs"] = "three"
    with pytest.raises(UserError, match=r"training.num_train_epochs: expected float, got 'three'"):
        parse_recipe(data)


def test_errors_carry_the_yaml_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("task: causal_lm\nmodel:\n  name_or_path: x\ndataset:\n  path: y\n  formater: gsm8k\n")
    with pytest.raises(UserError) as err:
        load_recipe(path)
    assert f"{path}:6: dataset.formater" in str(err.value)


def test_invalid_yaml_is_one_line_with_line_number(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("task: causal_lm\nmodel:\n  name_or_path: [unclosed\n")
    with pytest.raises(UserError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "invalid YAML" in message and "\n" not in message


@pytest.mark.parametrize("text, words", [
    ("a: 1\nb:\n  c: 2\n  c: 3\n", "b.c: appears twice (lines 3 and 4)"),
    ("a: &x [1]\nb: !!python/object/apply:os.system ['true']\n", "invalid YAML"),  # SafeLoader: no code
    ("a: &x [*x]\n", "recursive YAML alias"),
    ("x" * (MAX_YAML_BYTES + 1), "KB"),
])
def test_one_yaml_reader_refuses_what_yaml_would_take_silently_or_slowly(text, words):
    with pytest.raises(UserError) as err:
        parse_yaml(text, "f.yaml")
    assert words in str(err.value) and "\n" not in str(err.value)


def test_alias_expansion_bound_counts_shared_nodes_once_per_use():
    """Aliases are fine until their expansion would exceed MAX_YAML_NODES: 10 levels of 10 copies is 10**10."""
    ok = "a: &a [1, 2]\nb: [*a, *a, *a]\n"
    assert parse_yaml(ok, "f.yaml")[0]["b"] == [[1, 2]] * 3
    bomb = "l0: &l0 [0,0,0,0,0,0,0,0,0,0]\n" + "".join(
        f"l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 10))
    with pytest.raises(UserError, match="aliases expand to over"):
        parse_yaml(bomb, "f.yaml")


def test_saved_recipe_round_trips(tmp_path):
    recipe = parse_recipe(_copy())
    path = tmp_path / "saved.yaml"
    path.write_text(recipe.to_yaml())
    again = load_recipe(path)
    assert again.model_dump() == recipe.model_dump()


def test_bare_no_strategy_reads_as_the_string_no():
    data = _copy()
    data["training"]["eval_strategy"] = False  # what YAML makes of `eval_strategy: no`
    assert parse_recipe(data).training["eval_strategy"] == "no"
