"""One safe YAML reader for recipes and accelerate configs.

Plain data only (SafeLoader: no tag constructs Python objects), bounded size and alias expansion (a 1 KB
"billion laughs" file would otherwise expand to a billion strings), and no duplicate keys (YAML silently
keeps the last one). PyYAML's composed nodes carry each key's line, so every refusal, and every later
recipe error, is one `UserError` line with the file and the line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lora_ns.errors import UserError, fail, suggest

MAX_YAML_BYTES = 1 << 20  # a recipe is a few KB; a bigger file is a mistake (or an attack) and slow to parse
MAX_YAML_NODES = 100_000  # nodes after expanding aliases: stops "billion laughs" alias bombs


def _key_lines(root: yaml.Node, source: str) -> dict[str, int]:
    """Map dotted key path -> 1-based line, walking the nodes as the data will expand them. A key written
    twice in one mapping, an alias used inside itself, or aliases expanding past MAX_YAML_NODES are errors,
    found before anything builds the data."""
    lines: dict[str, int] = {}
    count = 0

    def walk(node: yaml.Node, prefix: str | None, open_: set[int]) -> None:
        nonlocal count
        count, line = count + 1, node.start_mark.line + 1
        if count > MAX_YAML_NODES:
            raise fail(source, "", f"YAML aliases expand to over {MAX_YAML_NODES} values",
                       "write the values out instead of nesting aliases", line)
        if id(node) in open_:
            raise fail(source, "", "recursive YAML alias (an anchor used inside itself)", "remove the alias",
                       line)
        open_.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                walk(child, None, open_)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                walk(key, None, open_)
                path = None if prefix is None else f"{prefix}{key.value}"
                line = key.start_mark.line + 1
                if path in lines and isinstance(key, yaml.ScalarNode) and key.value != "<<":
                    raise fail(source, path, f"appears twice (lines {lines[path]} and {line}); YAML would "
                               "silently keep only the last", "delete one of them", line)
                if path is not None:
                    lines[path] = line
                walk(value, None if path is None else path + ".", open_)
        open_.discard(id(node))

    walk(root, "", set())
    return lines


def _too_big(source: str, size: int) -> UserError:
    return fail(source, "", f"file is {size // 1024} KB, over the {MAX_YAML_BYTES // 1024} KB a config "
                "may be", "check that this is the right file")


def parse_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Safely parse YAML text into the data and each dotted key path's line; errors are one line."""
    if len(text) > MAX_YAML_BYTES:
        raise _too_big(source, len(text))
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        lines = _key_lines(node, source)
        return loader.construct_document(node), lines
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise fail(source, "", f"invalid YAML: {reason}", "fix the indentation/quoting there",
                   mark.line + 1 if mark else None)
    except RecursionError:
        raise fail(source, "", "YAML nested too deeply", "flatten the file")
    finally:
        loader.dispose()


def _nearby_recipes(path: Path) -> str:
    """The closest recipe name in the folder named (a typo, or its words in another order), else the
    recipes there."""
    names = sorted(p.name for p in path.parent.glob("*.y*ml")) if path.parent.is_dir() else []
    if not names:
        return "check the path (see recipes/)"

    def words(name: str) -> list[str]:
        return sorted(name.replace("-", "_").replace(".", "_").split("_"))

    same = [name for name in names if words(name) == words(path.name)]
    hint = f"did you mean '{same[0]}'?" if same else suggest(path.name, names, f"recipes in {path.parent}/")
    return hint.replace("'", f"'{path.parent}/", 1) if hint.startswith("did you mean") else hint


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Read a recipe file into a dict plus key-path line numbers; bad YAML is a one-line error."""
    source = str(path)
    try:
        if (size := Path(path).stat().st_size) > MAX_YAML_BYTES:  # don't even read a huge file
            raise _too_big(source, size)
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise fail(source, "", "recipe file not found", _nearby_recipes(Path(path)))
    except IsADirectoryError:
        raise fail(source, "", "is a folder, not a recipe file", "pass the recipe's .yaml file")
    except (OSError, UnicodeDecodeError) as err:
        raise fail(source, "", f"cannot read recipe: {err}", "save it as UTF-8 text")
    data, lines = parse_yaml(text, source)
    if not isinstance(data, dict):
        raise fail(source, "", "a recipe must be a mapping of sections", "start from recipes/template.yaml")
    return data, lines
