"""The composition point: reads a stack's config, validates it and plans it, in that order.

`load()` is the only reader of `pulumi.Config`; `parse_stack_config()` does the same from a plain mapping (tests,
tools). Reading and validation live in `llm_platform.config`, the capacity plan in `llm_platform.plan`, which
builds on the config types only.
"""
from __future__ import annotations

import json
import re
from typing import Any, Mapping

import pulumi

from llm_platform.config import PROJECT, ConfigError, ConfigReader, parse_config
from llm_platform.plan import PlannedStack, plan_stack


def parse_stack_config(stack: str, values: Mapping[str, Any]) -> PlannedStack:
    """Read, validate and plan a stack from `{key: value}` with the `llm-platform:` prefix removed."""
    return plan_stack(parse_config(stack, values), ConfigReader(stack).fail)


def load() -> PlannedStack:
    """Read this stack's `llm-platform:*` config from Pulumi (the only pulumi.Config reader), validated and planned."""
    stack = pulumi.get_stack()
    config = pulumi.Config(PROJECT)
    from pulumi.runtime.config import CONFIG  # every key set for this stack, to refuse unknown ones

    values: dict[str, Any] = {}
    for full_key in CONFIG.get():
        namespace, _, key = full_key.partition(":")
        if namespace != PROJECT:
            continue
        raw = config.get(key)
        try:
            values[key] = json.loads(raw) if raw and raw[:1] in "[{" else _scalar(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(stack, key, f"is not valid JSON/YAML: {exc}") from exc
    return parse_stack_config(stack, values)


def _scalar(raw: str | None) -> Any:
    """Pulumi passes top-level scalars as strings; recover YAML's numbers and booleans."""
    if raw in ("true", "false"):
        return raw == "true"
    if raw is not None and re.fullmatch(r"-?\d+", raw):
        return int(raw)
    return raw
