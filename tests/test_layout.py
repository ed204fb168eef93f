"""The house rules of the thin core, checked on our own source (never on installed libraries):
README's layout names every module, commands never import each other, files and lines stay short."""

from __future__ import annotations

import ast
import re

from conftest import REPO

PACKAGE = REPO / "lora_ns"
# Modules a user runs (python -m lora_ns.X): each imports the core, never another command.
COMMANDS = {"lora_ns.train", "lora_ns.merge", "lora_ns.infer", "lora_ns.evaluate",
            "lora_ns.cli", "lora_ns.validate.__main__", "lora_ns.preprocess.cli"}
MAX_FILE_LINES = 350
MAX_LINE_CHARS = 110


def sources() -> list:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_readme_layout_names_every_module():
    layout = re.search(r"## Layout\n+```\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)
    assert layout, "README has no Layout section"
    text = layout.group(1)
    for path in sources():
        rel = path.relative_to(PACKAGE)
        if rel.name in ("__init__.py", "__main__.py"):
            continue
        assert rel.stem in text, f"README layout does not mention lora_ns/{rel}"


def test_commands_do_not_import_each_other():
    for path in sources():
        own = module_name(path)
        for name in imported_modules(path) & COMMANDS - {own}:
            package = name.rsplit(".", 1)[0]
            assert own == package or own.startswith(package + "."), f"{own} imports the command module {name}"


def test_files_and_lines_stay_short():
    for path in sources():
        lines = path.read_text(encoding="utf-8").splitlines()
        assert len(lines) <= MAX_FILE_LINES, f"{path.relative_to(REPO)} has {len(lines)} lines"
        for number, line in enumerate(lines, 1):
            assert len(line) <= MAX_LINE_CHARS, f"{path.relative_to(REPO)}:{number} is {len(line)} characters"
