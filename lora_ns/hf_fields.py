"""Field names and type annotations of Hugging Face config dataclasses, read without importing them.

Importing transformers' `TrainingArguments`, TRL's `SFTConfig` or peft's `LoraConfig` takes ~6 s on a
small machine (they pull in torch, bitsandbytes and inductor). Checking a recipe's keys should not,
so `validate` reads the dataclass fields from the installed source with `ast`, following base classes
across modules. The real classes are still built at train time, which checks the values again.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path

# What a recipe's `training:` section is checked against, per task.
TRAINING_ARGS_CLASS = {
    "causal_lm": ("trl.trainer.sft_config", "SFTConfig"),
    "cpt": ("trl.trainer.sft_config", "SFTConfig"),
    "pretrain": ("trl.trainer.sft_config", "SFTConfig"),
    "seq_cls": ("transformers.training_args", "TrainingArguments"),
}

# peft method name -> (module, class) of its config dataclass.
PEFT_CONFIG_CLASS = {
    "lora": ("peft.tuners.lora.config", "LoraConfig"),
    "qlora": ("peft.tuners.lora.config", "LoraConfig"),
    "adalora": ("peft.tuners.adalora.config", "AdaLoraConfig"),
    "ia3": ("peft.tuners.ia3.config", "IA3Config"),
    "prefix_tuning": ("peft.tuners.prefix_tuning.config", "PrefixTuningConfig"),
    "prompt_tuning": ("peft.tuners.prompt_tuning.config", "PromptTuningConfig"),
}


def _module_path(module: str) -> Path | None:
    """Locate a module's source file without importing its parent packages."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(list(spec.submodule_search_locations)[0]).joinpath(*rest)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def _parse(module: str) -> ast.Module | None:
    path = _module_path(module)
    return ast.parse(path.read_text(encoding="utf-8")) if path else None


def _resolve_import(module: str, tree: ast.Module, name: str) -> str | None:
    """The module a name was imported from (``from x.y import name``), relative imports resolved."""
    for node in ast.walk(tree):  # walk: lazy packages import under `if TYPE_CHECKING:`
        if isinstance(node, ast.ImportFrom) and any(a.name == name for a in node.names):
            if node.level == 0:
                return node.module
            parts = module.split(".")
            is_package = _module_path(module).name == "__init__.py"
            parent = parts[: len(parts) - node.level + (1 if is_package else 0)]
            return ".".join(parent + ([node.module] if node.module else []))
    return None


@functools.cache
def dataclass_fields(module: str, cls: str) -> dict[str, str]:
    """Map field name -> annotation source for `cls` in `module` and its base classes."""
    tree = _parse(module)
    if tree is None:
        return {}
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None)
    if node is None:
        origin = _resolve_import(module, tree, cls)
        return dataclass_fields(origin, cls) if origin else {}
    fields: dict[str, str] = {}
    for base in node.bases:
        if isinstance(base, ast.Name):
            origin = module if any(
                isinstance(n, ast.ClassDef) and n.name == base.id for n in tree.body
            ) else _resolve_import(module, tree, base.id)
            if origin:
                fields.update(dataclass_fields(origin, base.id))
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            annotation = ast.unparse(stmt.annotation)
            if not annotation.startswith("ClassVar") and not stmt.target.id.startswith("_"):
                fields[stmt.target.id] = annotation
    return fields


# Keys of a recipe's `training:` section that lora_ns handles itself (not passed to the HF class).
LORA_NS_TRAINING_FIELDS = {
    "overwrite_output_dir": "bool",  # allow training into an output_dir that holds a finished run
}


def training_fields(task: str) -> dict[str, str]:
    return {**dataclass_fields(*TRAINING_ARGS_CLASS[task]), **LORA_NS_TRAINING_FIELDS}


def peft_fields(method: str) -> dict[str, str]:
    return dataclass_fields(*PEFT_CONFIG_CLASS[method]) if method in PEFT_CONFIG_CLASS else {}


_SIMPLE = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None),
           "list": list, "dict": dict, "Optional": None}


def allowed_types(annotation: str) -> set[type] | None:
    """Plain Python types an annotation admits, or None when it names anything richer (accept all)."""
    names = {n.split("[")[0].strip() for n in
             annotation.replace("Optional[", "None|").replace("Union[", "").replace("]", "")
             .replace(",", "|").split("|")}
    names = {n.split(".")[-1] for n in names if n}
    names = {"list" if n in ("List", "tuple", "Tuple", "Sequence") else n for n in names}
    names = {"dict" if n == "Dict" else n for n in names}
    if not names <= set(_SIMPLE) or "Any" in names:
        return None
    return {_SIMPLE[n] for n in names if _SIMPLE[n] is not None}


def coerce(value: object, annotation: str) -> tuple[bool, object]:
    """Check a YAML value against an annotation, converting strings like ``"2e-4"`` to numbers.

    YAML 1.1 reads ``2e-4`` (no dot) as a string, a classic trap for learning rates.
    Returns (ok, value).
    """
    types = allowed_types(annotation)
    if types is None or type(value) in types:
        return True, value
    if isinstance(value, bool):
        return False, value
    if isinstance(value, int) and float in types:
        return True, float(value)
    if isinstance(value, str):
        for kind in (int, float):
            if kind in types:
                try:
                    return True, kind(value)
                except ValueError:
                    pass
    if isinstance(value, (list, tuple)) and list in types:
        return True, list(value)
    return False, value
