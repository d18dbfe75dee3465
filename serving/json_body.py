"""A request body as a JSON object, or one clear client error: the parse the model server and the gateway share.

`json.loads` alone turns several hostile bodies into server errors: nesting deep enough to exhaust the recursion
limit (RecursionError), an integer literal past Python's 4,300-digit conversion limit (ValueError, even in a field
nobody reads), and a `\\ud800`-style escape that decodes to a lone UTF-16 surrogate, which is not Unicode text and
fails later in the tokenizer. Each is a 400 with a message that says what to change.
"""
from __future__ import annotations

import json
import re
import sys
from typing import Any

# A JSON escape of a UTF-16 surrogate (`\ud800`-`\udfff`): only a body holding one can decode to a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class JsonBodyError(ValueError):
    """The body is not a usable JSON object; the message is the client's 400. `param` names the field, if one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def parse_json_object(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonBodyError(f"Request body is not valid UTF-8 ({exc}); send JSON encoded as UTF-8") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise JsonBodyError("Request body nests arrays or objects too deeply to parse; a request needs a few "
                            "levels") from None
    except ValueError as exc:  # JSONDecodeError, or an integer literal past the int conversion limit
        if "integer string conversion" in str(exc):
            raise JsonBodyError(f"Request body holds an integer literal longer than {sys.get_int_max_str_digits()} "
                                "digits; no field takes such a number") from None
        raise JsonBodyError(f"Request body is not valid JSON ({exc}); send a JSON object") from None
    if not isinstance(data, dict):
        raise JsonBodyError(f"Request body must be a JSON object, not {type(data).__name__}")
    if _SURROGATE_ESCAPE.search(raw):
        found = _lone_surrogate(data)
        if found is not None:
            where, field = found
            raise JsonBodyError(f"{where} holds a lone UTF-16 surrogate (an escape in \\ud800-\\udfff without its "
                                "pair), which is not Unicode text; send valid Unicode", param=field)
    return data


def _lone_surrogate(data: dict) -> tuple[str, str] | None:
    """(path, top-level field) of the first string, value or key, in `data` that holds a lone surrogate, else None."""
    todo: list[tuple[str, str, Any]] = [(str(key), str(key), key) for key in data]
    todo += [(str(key), str(key), value) for key, value in data.items()]
    while todo:
        path, field, value = todo.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path, field
        elif isinstance(value, dict):
            todo += [(f"{path}.{key}", field, key) for key in value]
            todo += [(f"{path}.{key}", field, item) for key, item in value.items()]
        elif isinstance(value, list):
            todo += [(f"{path}[{index}]", field, item) for index, item in enumerate(value)]
    return None
