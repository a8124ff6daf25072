"""Reading config files: JSON or YAML by extension, duplicate keys refused, and the small
text helpers that make every problem one line naming the file and the key path."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml


def top_is_mapping(doc: Any, path: str, problems: list[str], shape: str) -> bool:
    """True when ``doc`` is a mapping; otherwise record why not."""
    if isinstance(doc, dict):
        return True
    problems.append(f"{path}: top level must be a mapping ({shape}), got {type_name(doc)}")
    return False


def read(path: str, problems: list[str]) -> Any:
    """The parsed document, or None after recording why there is none."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        problems.append(f"{path}: file not found")
        return None
    except UnicodeDecodeError:
        problems.append(f"{path}: not UTF-8 text")
        return None
    except OSError as exc:
        problems.append(f"{path}: cannot read: {exc.strerror or type(exc).__name__}")
        return None
    duplicates: list[str] = []
    try:
        if path.lower().endswith(".json"):
            hook = json_pairs(duplicates)
            doc = json.loads(text, object_pairs_hook=hook) if text.strip() else None
        else:
            loader = StrictLoader(text)
            try:
                doc = loader.get_single_data()
            finally:
                loader.dispose()
            duplicates = loader.duplicates
    except json.JSONDecodeError as exc:
        problems.append(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")
        return None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problems.append(f"{path}: invalid YAML{where}: {one_line(exc.problem or exc.context)}")
        return None
    except yaml.YAMLError as exc:
        problems.append(f"{path}: invalid YAML: {one_line(str(exc))}")
        return None
    problems.extend(f"{path}: {dup}" for dup in duplicates)
    if doc is None:
        problems.append(f"{path}: file is empty")
    return doc


def json_pairs(duplicates: list[str]):
    """A json ``object_pairs_hook`` that records duplicate keys in ``duplicates``."""

    def hook(pairs: list[tuple[str, Any]]) -> dict:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                duplicates.append(f"duplicate key {quote(key)}")
            seen.add(key)
        return dict(pairs)

    return hook


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that records duplicate mapping keys instead of keeping the last silently."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    line = key_node.start_mark.line + 1
                    self.duplicates.append(f"duplicate key {quote(key)} at line {line}")
                seen.add(key)
        return super().construct_mapping(node, deep)


def flatten(messages: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """marshmallow's nested error messages → (key path suffix, message) pairs."""
    if isinstance(messages, dict):
        for key, value in messages.items():
            if key != "_schema":
                sub = where + (f".{key}" if isinstance(key, str) else f"[{key}]")
            else:
                sub = where
            yield from flatten(value, sub)
    elif isinstance(messages, list):
        for value in messages:
            yield from flatten(value, where)
    else:
        yield where, str(messages)


def error_messages(messages: Any) -> Iterator[str]:
    """Every message of marshmallow's nested error structure."""
    for _, message in flatten(messages):
        yield message


def key_path(key: Any) -> str:
    """A key as it appears in a key path: bare when it is a plain word, quoted otherwise."""
    plain = isinstance(key, str) and re.fullmatch(r"[A-Za-z_]\w*", key)
    return key if plain else f"[{quote(key)}]"


def quote(value: Any) -> str:
    """``"text"`` with quotes and control characters escaped (backslashes left readable)."""
    text = str(value).replace('"', '\\"')
    return '"' + "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) + '"'


def one_line(text: str) -> str:
    """``text`` with newlines folded, so every problem stays one line."""
    return " ".join(str(text).split("\n"))


def type_name(value: Any) -> str:
    """A human name for the type of ``value`` ("a mapping", "a list", ...)."""
    names = {dict: "a mapping", list: "a list", str: "a string", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")
