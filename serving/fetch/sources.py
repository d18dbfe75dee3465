"""Model sources: URI parsing, the pinned/unpinned rule, the remote file listing and which files are skipped.

Accepted forms:
- `hf://ORG/NAME[@REVISION]`: a Hugging Face hub repository; pinned only when REVISION is a 40-hex commit sha.
- `s3://BUCKET/PREFIX`: an S3-compatible store; treated as pinned, so publish each model version under its own
  prefix and never overwrite it (the fill also refuses an object whose ETag changed while it was being fetched).
- `pvc://CLAIM[/PATH]`: a model already on a volume; nothing to download.

A store (`serving.fetch.hub.HubStore`, `serving.fetch.s3.S3Store`) lists a source's files and opens one at a
byte offset; `serving.fetch.fill` does the rest (resume, checksums, manifest, atomic rename).
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Protocol

from serving.fetch.errors import EXIT_USAGE, FetchError

ACCEPTED_FORMS = "hf://ORG/NAME[@REVISION], s3://BUCKET/PREFIX or pvc://CLAIM[/PATH]"
DEFAULT_REVISION = "main"

# Never needed to serve a transformers/safetensors model, and often the biggest files in a repository:
# Llama's `original/` holds a second, consolidated copy of the weights.
DEFAULT_EXCLUDES = (".gitattributes", "original/*", "*.pth", "*.pt", "*.gguf", "*.h5", "*.msgpack", "*.onnx",
                    "*.onnx_data", "*.ot")
# Pickled PyTorch weights duplicate the safetensors ones when both are published.
PICKLE_WEIGHTS = "*.bin"

_COMMIT = re.compile(r"[0-9a-f]{40}")
_HF = re.compile(r"hf://(?P<org>[A-Za-z0-9][\w.-]*)/(?P<name>[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^\s@]+))?")
_S3 = re.compile(r"s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/(?P<prefix>\S+)")
_PVC = re.compile(r"pvc://(?P<claim>[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?)(?:/(?P<path>\S*))?")


@dataclass(frozen=True)
class HfSource:
    uri: str
    repo_id: str
    revision: str
    revision_given: bool

    @property
    def pinned(self) -> bool:
        return _COMMIT.fullmatch(self.revision) is not None

    @property
    def canonical(self) -> str:
        return f"hf://{self.repo_id}@{self.revision}"


@dataclass(frozen=True)
class S3Source:
    uri: str
    bucket: str
    prefix: str  # without the trailing slash
    pinned = True

    @property
    def canonical(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class PvcSource:
    uri: str
    claim: str
    path: str
    pinned = True

    @property
    def canonical(self) -> str:
        return f"pvc://{self.claim}/{self.path}"


Source = HfSource | S3Source | PvcSource


def parse_source(uri: str) -> Source:
    """Parse a source URI; anything malformed is a usage error (exit 2) that lists the accepted forms."""
    if match := _HF.fullmatch(uri):
        revision = match["revision"]
        return HfSource(uri, f"{match['org']}/{match['name']}", revision or DEFAULT_REVISION, revision is not None)
    if (match := _S3.fullmatch(uri)) and (prefix := _clean_path(match["prefix"])):
        return S3Source(uri, match["bucket"], prefix)
    if (match := _PVC.fullmatch(uri)) and (path := _clean_path(match["path"] or "")) is not None:
        return PvcSource(uri, match["claim"], path)
    raise FetchError(f"{uri!r} is not a model source; use {ACCEPTED_FORMS}", EXIT_USAGE)


def same_source(uri: str, source: Source) -> bool:
    """Whether `uri` names the same thing as `source` (`hf://o/n` is `hf://o/n@main`; a trailing `/` is ignored)."""
    try:
        return parse_source(uri).canonical == source.canonical
    except FetchError:
        return False


def same_model(uri: str, source: Source) -> bool:
    """Whether `uri` names a revision of the same model as `source`, so that pruning may delete its directory.

    hf: the same repository, any revision. s3: the same bucket and the same prefix above the version folder
    (`s3://b/llama/v1` and `s3://b/llama/v2`; a one-folder prefix matches only itself, since its parent is the
    whole bucket). pvc: never (nothing of ours to prune).
    """
    try:
        other = parse_source(uri)
    except FetchError:
        return False
    if isinstance(source, HfSource) and isinstance(other, HfSource):
        return other.repo_id == source.repo_id
    if isinstance(source, S3Source) and isinstance(other, S3Source):
        return other.bucket == source.bucket and _model_prefix(other.prefix) == _model_prefix(source.prefix)
    return False


def _model_prefix(prefix: str) -> str:
    parent, _, _ = prefix.rpartition("/")
    return parent or prefix


def refuse_unpinned(source: Source) -> None:
    """Raise a usage error for a source whose content can change under the same URI."""
    if not isinstance(source, HfSource) or source.pinned:  # s3 and pvc sources are always pinned
        return
    example = f"hf://{source.repo_id}@<40-hex sha>"
    moving = (f"revision '{source.revision}' is a branch or tag and can move" if source.revision_given
              else f"no revision means '{DEFAULT_REVISION}', a branch that can move")
    raise FetchError(f"{source.uri}: {moving}; pin the commit: {example} (see the model's commit history on the hub)",
                     EXIT_USAGE)


def _clean_path(path: str) -> str | None:
    """`path` without surrounding slashes, or None when it climbs out with `..`."""
    path = path.strip("/")
    return None if ".." in path.split("/") else path


@dataclass(frozen=True)
class RemoteFile:
    """One file of a listing: where it goes, how big it is and what its bytes must hash to."""

    path: str  # relative to the model directory, `/`-separated
    size: int
    location: str  # a URL (hub) or an object key (S3)
    checks: Mapping[str, str] = field(default_factory=dict)  # check name -> expected value (serving.fetch.checksums)
    etag: str | None = None
    parts: tuple[int, ...] = ()  # S3: the part sizes of a multipart upload, for its composite checksums


@dataclass(frozen=True)
class Listing:
    revision: str | None  # hub: the resolved commit sha; S3: "BUCKET/PREFIX"
    files: tuple[RemoteFile, ...]


class Body(Protocol):
    """An open download: the offset its first byte belongs at, and the bytes."""

    start: int  # the requested offset, or 0 when the server ignored the Range and sends the whole file
    skip_checks: frozenset[str]  # checksums the source published that do not apply to these bytes

    def chunks(self) -> Iterator[bytes]:
        """The body; raises TransientError when the connection drops."""


class Store(Protocol):
    def list(self) -> Listing:
        """Every file of the source with its size and checksums; raises FetchError or TransientError."""

    def open(self, file: RemoteFile, offset: int) -> AbstractContextManager[Body]:
        """Start downloading `file` from byte `offset`; raises FetchError or TransientError."""

    def close(self) -> None: ...


def content_range_start(header: str | None) -> int:
    """The first byte of a `Content-Range: bytes START-END/TOTAL` answer (-1 when it cannot be read)."""
    if header is None:
        return -1
    try:
        return int(header.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1


def check_relative_path(path: str, where: str) -> str:
    """Refuse a listed path that would land outside the model directory."""
    parts = PurePosixPath(path).parts
    if not parts or path.startswith("/") or ".." in parts or "\\" in path:
        raise FetchError(f"{where}: refusing the unsafe file path {path!r}; fix the source")
    return path


def select_files(files: Iterable[RemoteFile], excludes: Iterable[str] = ()) -> tuple[list[RemoteFile], list[str]]:
    """Split a listing into the files to fetch and the excluded paths (defaults plus `excludes`, fnmatch on the path).

    `*.bin` is excluded only when safetensors weights remain, so a pickle-only model still downloads.
    """
    patterns = (*DEFAULT_EXCLUDES, *excludes)
    kept: list[RemoteFile] = []
    excluded: list[RemoteFile] = []
    for file in files:
        (excluded if any(fnmatch.fnmatchcase(file.path, p) for p in patterns) else kept).append(file)
    if any(file.path.endswith(".safetensors") for file in kept):
        excluded += [file for file in kept if fnmatch.fnmatchcase(file.path, PICKLE_WEIGHTS)]
        kept = [file for file in kept if not fnmatch.fnmatchcase(file.path, PICKLE_WEIGHTS)]
    return sorted(kept, key=lambda f: f.path), sorted(file.path for file in excluded)
