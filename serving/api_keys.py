"""API keys: the one reader of the keys file that the model server and the gateway share, and its reloading.

The file holds one key per line; `#` starts a comment line. A line is a plain key, or `NAME:KEY`, followed by
optional limits that only the gateway enforces:

    sk-team-a-0123456789abcdef                       # a plain key, named key-1 (its position among the keys)
    analytics:sk-analytics-0123456789abcdef rpm=60 tpm=200000

The name is what metrics and logs say instead of the key (a key never appears in a label or a log line). The
file is mounted from a Kubernetes Secret, which the kubelet updates in place (an atomic swap of a symlinked
directory), so a `KeyRing` stats it at most once a second and takes the new keys when it changed. A replacement
that cannot be used (unreadable, empty, malformed) is logged and the keys in force stay in force: a botched
rotation must not lock every client out, nor open the API.
"""
from __future__ import annotations

import hmac
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_LIMITS = {"rpm": "requests_per_minute", "tpm": "tokens_per_minute"}
RELOAD_CHECK_SECONDS = 1.0


class KeyFileError(ValueError):
    """The keys file cannot be used; the message names the file and line, never a key."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    """Stands for the key in metrics and logs."""
    secret: bytes = field(repr=False)
    requests_per_minute: int | None = None
    """Gateway limit on requests per minute for this key; None is unlimited."""
    tokens_per_minute: int | None = None
    """Gateway limit on prompt plus completion tokens per minute for this key; None is unlimited."""


def parse_keys(text: str, source: str) -> tuple[ApiKey, ...]:
    """The keys of a keys file's text; `source` names the file in errors."""
    keys: list[ApiKey] = []
    names: set[str] = set()
    secrets: set[bytes] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        first, *options = line.split()
        name, sep, secret = first.partition(":")
        if not sep or not _NAME.fullmatch(name):
            name, secret = f"key-{len(keys) + 1}", first
        if not secret:
            raise KeyFileError(f"{source} line {number}: the key after {name + ':'!r} is empty; write NAME:KEY")
        limits: dict[str, int] = {}
        for option in options:
            label, _, value = option.partition("=")
            if label not in _LIMITS or not value.isdigit() or int(value) < 1:
                raise KeyFileError(f"{source} line {number} (key {name!r}): {option!r} is not a limit; after the "
                                   "key only rpm=N (requests per minute) and tpm=N (tokens per minute) may follow, "
                                   "N a whole number of at least 1")
            limits[_LIMITS[label]] = int(value)
        if name in names:
            raise KeyFileError(f"{source} line {number}: the name {name!r} is used twice; give each key its own")
        if secret.encode() in secrets:
            raise KeyFileError(f"{source} line {number} (key {name!r}): the same key is listed twice")
        names.add(name)
        secrets.add(secret.encode())
        keys.append(ApiKey(name=name, secret=secret.encode(), **limits))
    return tuple(keys)


def read_keys_file(path: Path) -> tuple[ApiKey, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"API_KEYS_FILE {str(path)!r} cannot be read: "
                           f"{getattr(exc, 'strerror', None) or exc}") from exc
    keys = parse_keys(text, f"API_KEYS_FILE {str(path)!r}")
    if not keys:
        # An operator who points at a key file means to require keys: an empty file must not open the API.
        raise KeyFileError(f"API_KEYS_FILE {str(path)!r} contains no keys; add one key per line")
    return keys


def _signature(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)  # follows the Secret volume's symlinks to the file in force
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


class KeyRing:
    """The accepted keys: those of a keys file (reloaded when it changes) plus an optional key from the environment.

    `KeyRing(None)` with no `extra_key` accepts every request (`enabled` is False)."""

    def __init__(self, path: Path | None, extra_key: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._extra = (ApiKey(name="env", secret=extra_key.strip().encode()),) if extra_key and extra_key.strip() \
            else ()
        self._clock = clock
        self._file_keys: tuple[ApiKey, ...] = ()
        self._signature = None
        self._checked_at = clock()
        if path is not None:
            self._signature = _signature(path)
            self._file_keys = read_keys_file(path)  # at start a bad file stops the process (KeyFileError)
        self.reloads = 0

    @property
    def enabled(self) -> bool:
        return bool(self._file_keys or self._extra)

    @property
    def keys(self) -> tuple[ApiKey, ...]:
        self.refresh()
        return self._file_keys + self._extra

    def authenticate(self, presented: str) -> ApiKey | None:
        """The key `presented` is, or None. Compares against every key, always, each in constant time, so the
        timing says nothing about which key was close."""
        candidate = presented.encode("utf-8", "surrogatepass")
        found = None
        for key in self.keys:
            if hmac.compare_digest(candidate, key.secret):
                found = key
        return found

    def refresh(self) -> None:
        """Take the keys file's new contents if it changed (checked at most once a second)."""
        if self.path is None or self._clock() - self._checked_at < RELOAD_CHECK_SECONDS:
            return
        self._checked_at = self._clock()
        signature = _signature(self.path)
        if signature == self._signature:
            return
        try:
            keys = read_keys_file(self.path)
        except KeyFileError as exc:
            # Remember the bad version, so it is logged once, not every second; a later fix is a new signature.
            self._signature = signature
            log.error("API keys file changed but cannot be used; the previous keys stay in force: %s", exc)
            return
        self._signature, self._file_keys = signature, keys
        self.reloads += 1
        log.info("API keys reloaded from %s: %d key(s)", self.path, len(keys))
