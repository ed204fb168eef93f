"""What passes validate and then fails in training, for the *model folder*: a copy of the builtin tiny model
spoiled one way (no tokenizer, a broken config, pickle or cut-off weights, no eos or pad token, a tokenizer
larger than the embeddings, too few positions, no or a broken chat template, ...), then validated with train's
own set-up and, when that passes, trained two steps, as in bench/sweep_combos.py.

    python bench/sweep_models.py               # every case (~5 minutes on 2 CPU cores)
    python bench/sweep_models.py chat seq_cls  # the cases of some tasks

A case is `refused` (validate said it), `trained`, `train-refused` (train's one-line net, after validate
passed) or `crashed` (a traceback: a check to add).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lora_ns.builtin_models import resolve_model_path  # noqa: E402
from lora_ns.config import parse_recipe  # noqa: E402
from sweep_combos import base  # noqa: E402  (bench/ is the script's folder)
from sweep_fields import tally, verdict  # noqa: E402

TASKS = ("causal_lm", "chat", "seq_cls", "dpo", "grpo")


def edit_json(folder: Path, name: str, change: Callable[[dict], Any]) -> None:
    data = json.loads((folder / name).read_text(encoding="utf-8"))
    change(data)
    (folder / name).write_text(json.dumps(data, indent=1), encoding="utf-8")


def resave(folder: Path, **kwargs) -> None:
    """The weights saved again by transformers, with `kwargs` to `save_pretrained` and a dtype."""
    import torch
    import transformers

    architecture = json.loads((folder / "config.json").read_text(encoding="utf-8"))["architectures"][0]
    dtype = kwargs.pop("dtype", torch.float32)
    model = getattr(transformers, architecture).from_pretrained(folder, dtype=dtype)
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, **kwargs)


def pickle_weights(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def more_tokens(folder: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(2000)])
    tokenizer.save_pretrained(folder)


def cut(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def delete(*names: str) -> Callable[[Path], None]:
    return lambda folder: [(folder / n).unlink() for n in names if (folder / n).exists()] and None


def config(**change: Any) -> Callable[[Path], None]:
    return lambda folder: edit_json(folder, "config.json", lambda c: c.update(change))


def tokenizer_config(**change: Any) -> Callable[[Path], None]:
    return lambda folder: edit_json(folder, "tokenizer_config.json", lambda c: [
        c.pop(k, None) if v is None else c.update({k: v}) for k, v in change.items()])


DEFECTS: dict[str, Callable[[Path], None]] = {
    "clean": lambda folder: None,
    "no_tokenizer": delete("tokenizer.json", "tokenizer_config.json"),
    "no_config": delete("config.json"),
    "config_not_json": lambda folder: (folder / "config.json").write_text('{"model_type": ', "utf-8"),
    "no_architectures": lambda folder: edit_json(folder, "config.json", lambda c: c.pop("architectures")),
    "unknown_model_type": config(model_type="llamax"),
    "remote_code": config(auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM",
                                    "AutoConfig": "configuration_x.XConfig"}, model_type="x-custom"),
    "no_weights": delete("model.safetensors"),
    "pickle_weights": pickle_weights,
    "cut_weights": lambda folder: cut(folder / "model.safetensors"),
    "sharded": lambda folder: resave(folder, max_shard_size="20KB"),
    "missing_shard": lambda folder: (resave(folder, max_shard_size="20KB"),
                                     next(folder.glob("model-00002-of-*.safetensors")).unlink()),
    "bf16_weights": lambda folder: resave(folder, dtype=__import__("torch").bfloat16),
    "vocab_in_config_smaller": config(vocab_size=512),
    "tokenizer_larger": more_tokens,
    "few_positions": config(max_position_embeddings=32),
    "tiny_model_max_length": tokenizer_config(model_max_length=16),
    "no_eos": tokenizer_config(eos_token=None),
    "eos_not_in_vocab": tokenizer_config(eos_token="<|nope|>"),
    "no_pad": lambda folder: (tokenizer_config(pad_token=None)(folder), config(pad_token_id=None)(folder)),
    "no_chat_template": delete("chat_template.jinja"),
    "template_not_jinja": lambda folder: (folder / "chat_template.jinja").write_text("{% for %}", "utf-8"),
    "template_without_generation": lambda folder: (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "utf-8"),
    "generation_config_not_json": lambda folder: (folder / "generation_config.json").write_text("{", "utf-8"),
    "head_of_3_classes": lambda folder: (config(num_labels=3, id2label={i: str(i) for i in range(3)},
                                                label2id={str(i): i for i in range(3)})(folder),
                                         resave(folder)),
}
CHAT_ONLY = {"no_chat_template", "template_not_jinja", "template_without_generation",
             "generation_config_not_json"}
SEQ_CLS_ONLY = {"head_of_3_classes"}  # the recipe's classifier has 2


def outcome(task: str, defect: str) -> tuple[str, str]:
    def recipe(out: str):
        config_ = base(task, "lora", f"{out}/run")
        folder = Path(out) / "model"
        shutil.copytree(resolve_model_path(config_["model"]["name_or_path"]), folder)
        DEFECTS[defect](folder)
        config_["model"]["name_or_path"] = str(folder)
        return parse_recipe(config_, "case.yaml")

    return verdict(recipe)


def results(chosen: list[str]) -> Iterator[tuple[str, str, str]]:
    for task in (t for t in TASKS if not chosen or t in chosen):
        for defect in DEFECTS:
            if defect not in (CHAT_ONLY if task == "seq_cls" else SEQ_CLS_ONLY):
                yield f"{task:9} {defect:28}", *outcome(task, defect)


def main(chosen: list[str]) -> None:
    tally("sweep_models", results(chosen))


if __name__ == "__main__":
    main(sys.argv[1:])
