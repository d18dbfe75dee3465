"""Generate the README's stack-config reference table from `llm_platform/config.py` itself.

    python config_reference.py            # print the Markdown table
    python config_reference.py --check    # exit 1 if README.md's table is stale
    python config_reference.py --write    # update README.md's table in place

Key paths, types and defaults come from the dataclasses; descriptions from each field's docstring. A test
runs the check, so the README cannot drift from the code.
"""
from __future__ import annotations

import ast
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

from llm_platform import config
from llm_platform.config import PROJECT, StackConfig, config_fields, config_key, field_default, type_name

ROOT = Path(__file__).resolve().parent
BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def field_docs() -> dict[tuple[str, str], str]:
    """(class name, field name) -> the string literal right after the field in llm_platform/config.py."""
    tree = ast.parse(Path(config.__file__).read_text())
    docs = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        body = cls.body
        for node, after in zip(body, body[1:], strict=False):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                    and isinstance(after.value.value, str):
                docs[(cls.name, node.target.id)] = " ".join(after.value.value.split())
    return docs


def _show_default(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if dataclasses.is_dataclass(value):
        return ""
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        return "; ".join(", ".join(f"{config_key(f)}: {getattr(v, f.name)}" for f in dataclasses.fields(v)
                                   if getattr(v, f.name) is not None) for v in value)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`" if value != {} and value != [] else "empty"


def rows(cls: type = StackConfig, prefix: str = "", docs: dict[tuple[str, str], str] | None = None,
         ) -> list[tuple[str, str, str, str]]:
    docs = field_docs() if docs is None else docs
    hints = typing.get_type_hints(cls)
    out = []
    for f in config_fields(cls):
        key = f"{prefix}{config_key(f)}"
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        nested = inner[0] if isinstance(inner[0], type) and dataclasses.is_dataclass(inner[0]) \
            and typing.get_origin(tp) is not list else None
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            nested_list = typing.get_args(tp)[0]
        else:
            nested_list = None
        out.append((key, type_name(tp), _show_default(field_default(f)), docs.get((cls.__name__, f.name), "")))
        if nested is not None:
            out.extend(rows(nested, f"{key}.", docs))
        if nested_list is not None:
            out.extend(rows(nested_list, f"{key}[].", docs))
    return out


def table() -> str:
    lines = [f"| key (`{PROJECT}:`...) | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, doc in rows():
        lines.append(f"| `{key}` | {tp} | {default} | {doc} |".replace("\n", " "))
    return "\n".join(lines)


def readme_table(readme: str) -> str:
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[start:end].strip()


def main(argv: list[str]) -> int:
    readme = ROOT / "README.md"
    if "--write" in argv:
        text = readme.read_text()
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        readme.write_text(text[:start] + "\n" + table() + "\n" + text[end:])
        return 0
    if "--check" in argv:
        current = readme_table(readme.read_text())
        if current != table():
            print("README.md's config reference is stale: run `python config_reference.py --write`",
                  file=sys.stderr)
            return 1
        return 0
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
