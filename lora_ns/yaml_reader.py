"""One safe YAML reader for recipes and accelerate configs.

Plain data only (SafeLoader: no tag constructs Python objects), bounded size and alias expansion (a 1 KB
"billion laughs" file would otherwise expand to a billion strings), and no duplicate keys (YAML silently
keeps the last one). Every refusal is one `UserError` line with the file and the line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lora_ns.errors import Problem, UserError


def _key_lines(node: yaml.Node, prefix: str = "", source: str | None = None) -> dict[str, int]:
    """Map dotted key path -> 1-based line number, from a composed YAML node.

    With `source`, a key written twice in one mapping is an error naming both lines (YAML itself
    silently keeps the last one)."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = f"{prefix}{key.value}"
            line = key.start_mark.line + 1
            if source and path in lines and isinstance(key, yaml.ScalarNode) and key.value != "<<":
                raise UserError(Problem(source, path, f"appears twice (lines {lines[path]} and {line}); YAML "
                                        "would silently keep only the last", "delete one of them", line))
            lines[path] = line
            lines.update(_key_lines(value, path + ".", source))
    return lines


MAX_YAML_BYTES = 1 << 20  # a recipe is a few KB; a bigger file is a mistake (or an attack) and slow to parse
MAX_YAML_NODES = 100_000  # nodes after expanding aliases: stops "billion laughs" alias bombs


def _yaml_problem(source: str, err: yaml.YAMLError) -> Problem:
    mark = getattr(err, "problem_mark", None)
    reason = getattr(err, "problem", None) or str(err).splitlines()[0]
    return Problem(source, "", f"invalid YAML: {reason}", "fix the indentation/quoting there",
                   mark.line + 1 if mark else None)


def _check_nodes(node: yaml.Node, source: str) -> None:
    """Refuse alias graphs that expand past MAX_YAML_NODES (or into themselves) before anything walks them."""
    sizes: dict[int, int] = {}

    def size(n: yaml.Node, open_: set[int]) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in open_:
            raise UserError(Problem(source, "", "recursive YAML alias (an anchor used inside itself)",
                                    "remove the alias", n.start_mark.line + 1))
        open_.add(id(n))
        children = [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else \
            n.value if isinstance(n, yaml.SequenceNode) else []
        total = 1 + sum(size(c, open_) for c in children)
        open_.discard(id(n))
        if total > MAX_YAML_NODES:
            raise UserError(Problem(source, "", f"YAML aliases expand to over {MAX_YAML_NODES} values",
                                    "write the values out instead of nesting aliases", n.start_mark.line + 1))
        sizes[id(n)] = total
        return total

    size(node, set())


def _too_big(source: str, size: int) -> UserError:
    return UserError(Problem(source, "", f"file is {size // 1024} KB, over the {MAX_YAML_BYTES // 1024} KB a "
                             "config may be", "check that this is the right file"))


def parse_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Safely parse YAML text: plain data only (SafeLoader: no tags run code), bounded size and alias
    expansion, no duplicate keys. Returns the data and each dotted key path's line; errors are one line."""
    if len(text) > MAX_YAML_BYTES:
        raise _too_big(source, len(text))
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        _check_nodes(node, source)
        lines = _key_lines(node, source=source)
        return loader.construct_document(node), lines
    except yaml.YAMLError as err:
        raise UserError(_yaml_problem(source, err))
    except RecursionError:
        raise UserError(Problem(source, "", "YAML nested too deeply", "flatten the file"))
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Read a recipe file into a dict plus key-path line numbers; bad YAML is a one-line error."""
    source = str(path)
    try:
        if (size := Path(path).stat().st_size) > MAX_YAML_BYTES:  # don't even read a huge file
            raise _too_big(source, size)
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(Problem(source, "", "recipe file not found", "check the path (see recipes/)"))
    except IsADirectoryError:
        raise UserError(Problem(source, "", "is a folder, not a recipe file", "pass the recipe's .yaml file"))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(Problem(source, "", f"cannot read recipe: {err}", "save it as UTF-8 text"))
    data, lines = parse_yaml(text, source)
    if not isinstance(data, dict):
        raise UserError(Problem(source, "", "a recipe must be a mapping of sections",
                                "start from recipes/template.yaml"))
    return data, lines
