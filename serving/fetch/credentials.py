"""The fetcher's credentials: the fill's Secret mounted as files, or else the environment.

The platform mounts the Secret named by `models[].fill.secretName` at `$MODEL_SOURCE_CREDENTIALS_DIR` (one file per
key) for the fill only, so a token never sits in an environment variable or in the serving container. Run by hand,
the fetcher reads the same names from the environment. A file wins over the environment variable of the same name.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from serving.fetch.errors import EXIT_USAGE, FetchError

CREDENTIALS_DIR_ENV = "MODEL_SOURCE_CREDENTIALS_DIR"
HF_TOKEN = "HF_TOKEN"
AWS_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
AWS_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
AWS_SESSION_TOKEN = "AWS_SESSION_TOKEN"
KEYS = (HF_TOKEN, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN)
SECRET_HINT = "the Secret named by models[].fill.secretName"


@dataclass(frozen=True)
class Credentials:
    values: Mapping[str, str] = field(default_factory=dict)
    origins: Mapping[str, str] = field(default_factory=dict)  # key -> the file it came from, or "the environment"
    directory: str | None = None

    def get(self, key: str) -> str | None:
        return self.values.get(key)

    def origin(self, key: str) -> str:
        """Where `key` came from, for an error message."""
        return f"{key} from {self.origins[key]}"

    def how_to_set(self, *keys: str) -> str:
        """What an operator does to provide `keys`."""
        names = " and ".join(keys)
        what = f"the key{'s' if len(keys) > 1 else ''} {names}"
        if self.directory:
            return f"add {what} to {SECRET_HINT} (mounted at {self.directory})"
        return f"set {names} (in a cluster: add {what} to {SECRET_HINT})"

    def aws_keys(self) -> dict[str, str]:
        """boto3 client arguments for static keys; empty to use boto3's own chain (a workload role, a profile)."""
        has_id, has_secret = AWS_ACCESS_KEY_ID in self.values, AWS_SECRET_ACCESS_KEY in self.values
        if has_id != has_secret:
            given, missing = ((AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) if has_id
                              else (AWS_SECRET_ACCESS_KEY, AWS_ACCESS_KEY_ID))
            raise FetchError(f"{self.origin(given)} but no {missing}: S3 needs both keys; "
                             f"{self.how_to_set(missing)}", EXIT_USAGE)
        if not has_id:
            return {}
        keys = {"aws_access_key_id": self.values[AWS_ACCESS_KEY_ID],
                "aws_secret_access_key": self.values[AWS_SECRET_ACCESS_KEY]}
        if AWS_SESSION_TOKEN in self.values:
            keys["aws_session_token"] = self.values[AWS_SESSION_TOKEN]
        return keys


def load_credentials(environ: Mapping[str, str] | None = None) -> Credentials:
    """Read every known key from `$MODEL_SOURCE_CREDENTIALS_DIR`, falling back to the environment.

    A missing directory means no Secret was mounted (the platform marks it optional): the environment is used.
    An empty or unreadable key file is a usage error: the Secret exists but holds nothing usable.
    """
    env = os.environ if environ is None else environ
    directory = env.get(CREDENTIALS_DIR_ENV) or None
    values: dict[str, str] = {}
    origins: dict[str, str] = {}
    for key in KEYS:
        path = Path(directory, key) if directory else None
        if path is not None and path.is_file():  # a Secret volume's files are symlinks: is_file follows them
            try:
                value = path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise FetchError(f"cannot read {path} ({exc}); check the key {key} of {SECRET_HINT}",
                                 EXIT_USAGE) from None
            if not value:
                raise FetchError(f"{path} is empty; put the value of {key} in {SECRET_HINT}, or remove the key",
                                 EXIT_USAGE)
            values[key], origins[key] = value, str(path)
        elif value := env.get(key, "").strip():
            values[key], origins[key] = value, "the environment"
    return Credentials(values, origins, directory)
