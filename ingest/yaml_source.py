"""YAML files whose problems are reported as ``file:line: field: reason``.

Rule, channel and template definitions and the sales import profiles all parse YAML twice: once
into plain data for pydantic, once into nodes so a validation error can name the line it is on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml


def compose_yaml(text: str, source: str, error: type[Exception]) -> tuple[Any, yaml.Node | None]:
    """The data and node tree of YAML text; a syntax error raises `error` naming the file and line."""
    try:
        return yaml.safe_load(text), yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise error(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None


def line_of(root: yaml.Node | None, loc: Sequence[str | int]) -> int | None:
    """The 1-based line of the YAML node at a pydantic error location (its parent's when absent)."""
    node = root
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            pair = next(((key, value) for key, value in node.value if getattr(key, "value", None) == part), None)
            if pair is None:
                break
            # The key's line: for a nested block that is the line naming it ("params:").
            line, node = pair[0].start_mark.line + 1, pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line
