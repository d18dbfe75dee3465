"""Command-line options with environment equivalents, as the model server and the gateway both read them.

A flag wins over its environment variable, which wins over the default. Each value goes through a parser that
raises ValueError saying what is allowed; `read_options` turns that into one line naming the flag or variable and
the value, raised as the caller's own error type (the process prints it and exits 2).
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable, Mapping, NamedTuple, NoReturn, Sequence

LOG_LEVELS = ("debug", "info", "warning", "error")


class Option(NamedTuple):
    attribute: str
    flag: str
    env: str
    parse: Callable[[str], object]
    help: str


# ---- value parsers: each raises ValueError saying what is allowed --------------------------------------------


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("is not a whole number") from None


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError("is not a number") from None


def positive_int(text: str) -> int:
    value = whole_number(text)
    if value < 1:
        raise ValueError("must be a positive integer")
    return value


def port(text: str) -> int:
    value = whole_number(text)
    if not 1 <= value <= 65535:
        raise ValueError("must be between 1 and 65535")
    return value


def non_negative_float(text: str) -> float:
    value = number(text)
    if not 0 <= value < math.inf:  # also rejects NaN
        raise ValueError("must be a finite number >= 0")
    return value


def positive_float(text: str) -> float:
    value = number(text)
    if not 0 < value < math.inf:  # also rejects NaN
        raise ValueError("must be a finite number > 0")
    return value


def fraction(text: str) -> float:
    value = number(text)
    if not 0 < value <= 1:
        raise ValueError("must be in (0, 1]")
    return value


def switch(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise ValueError("must be on or off (true/false, 1/0)")


def auto_switch(text: str) -> bool | None:
    """`auto` (None: the engine decides), or a switch."""
    if text.strip().lower() == "auto":
        return None
    try:
        return switch(text)
    except ValueError:
        raise ValueError("must be auto, on or off") from None


def choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


# ---- the parser and the reading ------------------------------------------------------------------------------


def option_parser(prog: str, description: str, epilog: str, options: Sequence[Option],
                  error: type[Exception]) -> argparse.ArgumentParser:
    """argparse with a flag per option (`metavar` shows its variable); argparse's own errors (an unknown flag)
    are raised as `error`, one line, like every other bad value, instead of printing usage."""

    class OneLineErrorParser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            raise error(message)

    parser = OneLineErrorParser(prog=prog, description=description, epilog=epilog)
    for option in options:
        parser.add_argument(option.flag, dest=option.attribute, default=None, metavar=option.env,
                            help=f"{option.help} [env {option.env}]")
    return parser


def read_options(flags: Mapping[str, object], options: Sequence[Option], environ: Mapping[str, str],
                 error: type[Exception]) -> dict[str, Any]:
    """Each option given by flag or environment, parsed: {attribute: value}; `error` for a bad value.

    Each value has its option's parser's type, which only the table knows: the dict is Any-valued so that the
    callers can pass it on as their settings' fields (`Settings(**values)`)."""
    values: dict[str, Any] = {}
    for option in options:
        raw, source = flags.get(option.attribute), option.flag
        if raw is None and environ.get(option.env, "").strip():
            raw, source = environ[option.env], option.env
        if raw is None:
            continue
        try:
            values[option.attribute] = option.parse(str(raw).strip())
        except ValueError as exc:
            raise error(f"{source}={raw!r}: {exc}") from None
    return values
