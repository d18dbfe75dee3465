"""Model sources: where a model's weights come from, pinned to a revision.

`models[].source` is one of
- `hf://ORG/NAME@REVISION`: the Hugging Face hub; pinned when REVISION is a 40-hex commit (a branch or tag can move);
- `s3://BUCKET/PREFIX`: an S3-compatible store; each model version is published under its own immutable prefix;
- `pvc://CLAIM/PATH`: already on an existing PersistentVolumeClaim; nothing to download.

Pure functions (no Pulumi): the config check, the plan and the builders use them. The serving image's downloader
(`serving/fetch`) parses the same grammar; a test keeps the two in agreement.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

FORMS = "hf://ORG/NAME@REVISION, s3://BUCKET/PREFIX or pvc://CLAIM/PATH"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_HF_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HF_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CLAIM = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_SAFE_PATH = re.compile(r"^[A-Za-z0-9._/-]+$")


class SourceError(ValueError):
    """A source URI that cannot be used; the message says what is wrong and what is accepted."""


@dataclass(frozen=True)
class ModelSource:
    uri: str
    kind: Literal["hf", "s3", "pvc"]
    location: str
    """hf: ORG/NAME; s3: BUCKET; pvc: CLAIM."""
    path: str
    """hf: empty; s3: PREFIX; pvc: the model directory inside the claim."""
    revision: str | None
    """hf: the revision as written (None: unset, which the hub reads as `main`); s3 and pvc: None."""

    @property
    def pinned(self) -> bool:
        """Whether the source always means the same bytes."""
        if self.kind == "hf":
            return self.revision is not None and bool(_COMMIT.match(self.revision))
        return True

    @property
    def short_id(self) -> str:
        """8 hex characters that change whenever the source does (fill Job names)."""
        return hashlib.sha256(self.uri.encode()).hexdigest()[:8]

    @property
    def revision_label(self) -> str:
        """What the pods and the plan show as the running revision."""
        if self.kind == "hf":
            return self.revision or "main"
        return f"{self.location}/{self.path}" if self.kind == "s3" else self.uri

    @property
    def directory(self) -> str:
        """The revision's directory name under the model's folder: each revision is filled beside the last, so
        pods of the old revision keep reading theirs while the new one fills."""
        if self.kind == "hf" and self.pinned and self.revision is not None:
            return self.revision[:12]
        if self.kind == "hf":
            return re.sub(r"[^A-Za-z0-9._-]", "-", self.revision or "main") + "-" + self.short_id
        return f"s3-{self.short_id}"

    def unpinned_problem(self) -> str:
        return (f"{self.uri!r}: revision {self.revision or 'main'!r} is a branch or tag that can move, so replicas "
                f"could serve different weights; pin the commit: hf://{self.location}@<40-hex commit sha> (the "
                "model page's commit history lists them)")


def parse_source(uri: str) -> ModelSource:
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in ("hf", "s3", "pvc"):
        raise SourceError(f"{uri!r} is not a model source; use {FORMS}")
    if scheme == "hf":
        repo, at, revision = rest.partition("@")
        parts = repo.split("/")
        if len(parts) != 2 or not all(_HF_PART.match(p) for p in parts):
            raise SourceError(f"{uri!r}: the hub repository must be ORG/NAME, as in "
                              "hf://meta-llama/Llama-3.1-8B-Instruct@<40-hex commit sha>")
        if at and not _HF_REVISION.match(revision):
            raise SourceError(f"{uri!r}: {revision!r} is not a revision (a 40-hex commit sha, or a branch or tag)")
        return ModelSource(uri, "hf", repo, "", revision if at else None)
    location, _, path = rest.partition("/")
    path = path.strip("/")
    if scheme == "s3":
        if not _BUCKET.match(location) or not path or not _SAFE_PATH.match(path):
            raise SourceError(f"{uri!r}: use s3://BUCKET/PREFIX with a bucket name and a non-empty prefix, "
                              "one immutable prefix per model version (s3://models/llama-3.1-8b/2024-07-23)")
        return ModelSource(uri, "s3", location, path, None)
    if not _CLAIM.match(location) or len(location) > 253 or not path or not _SAFE_PATH.match(path) \
            or ".." in path.split("/"):
        raise SourceError(f"{uri!r}: use pvc://CLAIM/PATH naming an existing claim in the namespace and the model "
                          "directory inside it (pvc://shared-models/llama-3.1-8b)")
    return ModelSource(uri, "pvc", location, path, None)
