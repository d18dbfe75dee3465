"""The fill's completion record (`llm-platform-manifest.json`), the checks of a directory against it, and pruning.

The manifest is written last, into the temporary directory, before the rename that publishes the model: a model
directory with a manifest is complete, one without is not ours or not finished. A directory is checked against its
manifest in one of two modes: `full` re-hashes every file (a same-size overwrite of the weights passes a size check),
`size-only` only checks that every file is there at its recorded size.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from serving.fetch.errors import FetchError
from serving.fetch.nofollow import open_under
from serving.fetch.sources import PvcSource, Source, check_relative_path, same_model, same_source

MANIFEST_NAME = "llm-platform-manifest.json"
MANIFEST_FORMAT = 1
FETCHER = "llm-platform serving.fetch"
PARTIAL_SUFFIX = ".partial"
REPLACED_MARKER = ".replaced-"
VERIFY_MODES = ("full", "size-only")
VerifyMode = Literal["full", "size-only"]
_READ_BYTES = 1 << 20

logger = logging.getLogger("serving.fetch")


@dataclass(frozen=True)
class ManifestFile:
    path: str
    size: int
    sha256: str
    checked: tuple[str, ...] = ()  # the source's checksums it matched when downloaded; empty: its size only


def write_manifest(directory: Path, source: str, revision: str | None, files: list[ManifestFile]) -> dict[str, Any]:
    """Write and fsync the manifest into `directory`; return its content."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": source,
        "revision": revision,
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256, "checkedAgainst": list(f.checked)}
                  for f in sorted(files, key=lambda f: f.path)],
        "completedAt": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        "fetcher": FETCHER,
    }
    fd = open_under(directory, MANIFEST_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with open(fd, "w", encoding="utf-8") as out:
        json.dump(manifest, out, indent=2)
        out.write("\n")
        out.flush()
        os.fsync(out.fileno())
    return manifest


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest in `directory`, or None when there is none or it is not one of ours."""
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        return None
    return manifest


def size_only_files(manifest: dict[str, Any]) -> tuple[str, ...]:
    """Files the manifest records as checked against nothing but their size when they were downloaded.

    Manifests written before `checkedAgainst` existed say nothing either way, and count as checked.
    """
    return tuple(str(entry.get("path")) for entry in manifest["files"]
                 if isinstance(entry, dict) and entry.get("checkedAgainst") == [])


def missing_files(manifest: dict[str, Any], directory: Path) -> str | None:
    """What is wrong with `directory` against its manifest (file present at its recorded size), or None if nothing."""
    for entry in manifest["files"]:
        try:
            path, size = check_relative_path(entry["path"], str(directory)), int(entry["size"])
        except (KeyError, TypeError, ValueError):
            return f"the manifest has a malformed entry {entry!r}"
        try:
            info = os.lstat(directory / path)
        except OSError:
            return f"{path} is missing"
        if stat.S_ISLNK(info.st_mode):
            return f"{path} is a symlink, not a file the fill wrote"
        if (actual := info.st_size) != size:
            return f"{path} is {actual} bytes, the manifest says {size}"
    return None


def changed_files(manifest: dict[str, Any], directory: Path) -> str | None:
    """What no longer matches the sha256 the manifest recorded (None if every file does), read without symlinks.

    Call after `missing_files`: the entries are then well-formed and every file is there at its size.
    """
    started, total = time.monotonic(), 0
    for entry in manifest["files"]:
        digest = hashlib.sha256()
        with open(open_under(directory, entry["path"], os.O_RDONLY), "rb") as existing:
            while chunk := existing.read(_READ_BYTES):
                digest.update(chunk)
                total += len(chunk)
        if digest.hexdigest() != str(entry.get("sha256", "")).lower():
            return (f"{entry['path']} has changed since the fill: sha256 {digest.hexdigest()}, the manifest says "
                    f"{entry.get('sha256')}")
    elapsed = time.monotonic() - started
    logger.info("%s: re-hashed %d files, %.1f GB in %.1f s (%.0f MB/s)", directory, len(manifest["files"]),
                total / 1e9, elapsed, total / 1e6 / max(elapsed, 1e-6))
    return None


def check_against_manifest(manifest: dict[str, Any], directory: Path, mode: VerifyMode) -> str | None:
    """What is wrong with `directory` against its manifest in `mode`, or None when nothing is."""
    return missing_files(manifest, directory) or (changed_files(manifest, directory) if mode == "full" else None)


def verify_directory(source: Source, dest: Path, mode: VerifyMode = "full") -> dict[str, Any] | None:
    """Check that `dest` holds a complete, unchanged model for `source` (hashing every file unless `mode` is
    size-only); return its manifest (None for a pvc:// directory without one) or raise FetchError."""
    if not dest.is_dir():
        raise FetchError(f"{dest}: does not exist: the fill for {source.uri} has not run or has not completed; "
                         "check the model's fill Job logs")
    manifest = read_manifest(dest)
    if manifest is None and isinstance(source, PvcSource):
        _check_model_shape(source, dest)
        return None
    if manifest is None:
        raise FetchError(f"{dest}: no manifest: the fill for {source.uri} has not completed; check the model's fill "
                         "Job logs")
    # A pvc:// model may well have been filled from the hub or S3: any complete fill of ours is fine there.
    if not isinstance(source, PvcSource) and not same_source(str(manifest.get("source")), source):
        raise FetchError(f"{dest}: holds {manifest.get('source')}, not {source.uri}; point the deployment at the "
                         f"directory filled from {source.uri}, or run its fill Job")
    if problem := check_against_manifest(manifest, dest, mode):
        raise FetchError(f"{dest}: incomplete model for {source.uri}: {problem}; run the model's fill Job again "
                         "to repair it")
    return manifest


def _check_model_shape(source: PvcSource, dest: Path) -> None:
    """Without a manifest, a pvc:// directory must at least look like a finished safetensors model."""
    if not (dest / "config.json").is_file():
        raise FetchError(f"{dest}: no config.json: {source.uri} is not a Hugging Face model directory; point the "
                         "source at the directory that holds config.json")
    if not any(dest.glob("*.safetensors")):
        raise FetchError(f"{dest}: no *.safetensors weights in {source.uri}; copy the safetensors weights there")
    if leftover := next(dest.rglob("*.part"), None):
        raise FetchError(f"{dest}: {leftover.relative_to(dest)} is a partial download: the copy into {source.uri} "
                         "has not finished; finish it (or remove the .part file)")


def prune_revisions(dest: Path, source: Source, keep: int) -> list[Path]:
    """Keep `dest` and the `keep - 1` most recently completed sibling fills of the same model; delete the others.

    Only directories whose manifest names a revision of the same model as `source` (`same_model`) count: another
    model's fill beside it (two models given one claim and modelPath) is left alone and logged, and directories
    without a manifest are never touched, except the leftovers of an interrupted swap (`*.replaced-*`).
    """
    if keep <= 0:
        return []
    fills: list[tuple[datetime, Path]] = []
    removed: list[Path] = []
    for sibling in dest.parent.iterdir():
        if sibling == dest or sibling.is_symlink() or not sibling.is_dir() or sibling.name.endswith(PARTIAL_SUFFIX):
            continue
        if REPLACED_MARKER in sibling.name:
            removed.append(_remove(sibling))
        elif manifest := read_manifest(sibling):
            if same_model(str(manifest.get("source")), source):
                fills.append((_completed_at(manifest), sibling))
            else:
                logger.info("not pruning %s: it holds %s, not a revision of %s's model (give each model its own "
                            "modelPath)", sibling, manifest.get("source"), source.uri)
    fills.sort(key=lambda fill: fill[0], reverse=True)
    for _, sibling in fills[keep - 1:]:
        logger.info("pruning %s (keeping %d revisions)", sibling, keep)
        removed.append(_remove(sibling))
        sibling.with_name(f".{sibling.name}.lock").unlink(missing_ok=True)  # the fill's lock file (fill.py)
    return removed


def _completed_at(manifest: dict[str, Any]) -> datetime:
    try:
        completed = datetime.fromisoformat(str(manifest.get("completedAt")))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)  # unreadable: treat as the oldest
    return completed if completed.tzinfo else completed.replace(tzinfo=timezone.utc)


def _remove(path: Path) -> Path:
    shutil.rmtree(path)
    return path
