"""Fill a model directory once from a pinned source, so that serving pods never download weights.

Lifecycle of `fill(source, dest)`:
1. Refuse an unpinned source when asked to (before any request), then take `dest`'s lock: concurrent fills of
   one directory run one after the other.
2. `dest` already holds a complete fill of this source (manifest, every file at its size and, unless
   `verify_mode="size-only"`, at its recorded sha256): done, no request. A directory that fails the check is
   refilled.
3. Download every file into `dest.partial/` (same filesystem): each streams into `<path>.part`, resumes with a
   Range request after a dropped connection or an earlier interrupted run, and is renamed to `<path>` once its
   size and checksums verify. Nothing is opened or created through a symlink (`serving.fetch.nofollow`).
4. Write the manifest last, then swap `dest.partial` into place with renames: readers of `dest` see nothing, the
   old complete directory or the new complete one, never a partial model.
5. Optionally prune older revisions beside `dest`.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, TypeVar

from serving.fetch.checksums import Hashes, applicable_checks
from serving.fetch.credentials import Credentials, load_credentials
from serving.fetch.errors import EXIT_USAGE, FetchError, TransientError
from serving.fetch.manifest import (
    MANIFEST_NAME,
    PARTIAL_SUFFIX,
    REPLACED_MARKER,
    VERIFY_MODES,
    ManifestFile,
    VerifyMode,
    check_against_manifest,
    missing_files,
    prune_revisions,
    read_manifest,
    size_only_files,
    verify_directory,
    write_manifest,
)
from serving.fetch.nofollow import open_under, refuse_symlink, symlink_refused
from serving.fetch.sources import (
    HfSource,
    Listing,
    PvcSource,
    RemoteFile,
    S3Source,
    Source,
    Store,
    check_relative_path,
    parse_source,
    refuse_unpinned,
    same_source,
    select_files,
)

logger = logging.getLogger("serving.fetch")
T = TypeVar("T")

DEFAULT_RETRIES = 5
DEFAULT_RETRY_DELAY_S = 1.0
MAX_RETRY_DELAY_S = 60.0
PROGRESS_INTERVAL_S = 5.0
_READ_BYTES = 1 << 20


@dataclass(frozen=True)
class FillResult:
    dest: Path
    status: Literal["filled", "already-filled", "verified"]
    revision: str | None
    files: int
    bytes_downloaded: int  # over the network in this run
    pruned: tuple[Path, ...] = ()
    size_only: tuple[str, ...] = ()  # files whose source published no checksum this fill could check


@dataclass(frozen=True)
class _Options:
    keep_revisions: int
    excludes: tuple[str, ...]
    retries: int
    retry_delay: float
    verify_mode: VerifyMode
    require_checksums: bool


def fill(source: str, dest: Path | str, *, require_pinned: bool = False, keep_revisions: int = 0,
         retries: int = DEFAULT_RETRIES, excludes: Iterable[str] = (), verify_mode: VerifyMode = "full",
         require_checksums: bool = False, retry_delay: float = DEFAULT_RETRY_DELAY_S) -> FillResult:
    """Make `dest` a complete copy of `source`; raise FetchError (with its exit code) when that fails.

    `verify_mode` is how an existing fill of the same source is checked before it is kept (see `verify`).
    `require_checksums` refuses a source with a file whose only check would be its size (an S3 multipart upload
    without S3 checksums or a SHA256SUMS entry); without it such files are filled and recorded as size-only.
    `retry_delay` is the first backoff after a dropped connection (doubling per retry, at most a minute).
    """
    if retries < 0 or keep_revisions < 0:
        raise FetchError("--retries and --keep-revisions must be 0 or more", EXIT_USAGE)
    _check_mode(verify_mode)
    parsed = _parse(source, require_pinned)
    dest = Path(os.path.abspath(dest))
    if isinstance(parsed, PvcSource):
        return verify(source, dest, mode=verify_mode)  # already on a volume: nothing to download, only to check
    try:
        with _exclusive(dest):
            return _fill(parsed, dest, _Options(keep_revisions, tuple(excludes), retries, retry_delay, verify_mode,
                                                require_checksums))
    except OSError as exc:  # the volume: full, read-only, permissions
        raise FetchError(f"{exc}; check the model volume (free space, permissions, read-only mount)") from None


@contextmanager
def _exclusive(dest: Path) -> Iterator[None]:
    """Hold an advisory lock on `dest` (a `.NAME.lock` file beside it) for the whole fill.

    Two fills of one directory (a Job's next pod starting while the last one still terminates, or two pods
    sharing a volume) take turns instead of writing the same `.partial` files; the second then finds the first's
    manifest and has nothing to do. flock locks held by a pod that died are released with it (on NFS, when its
    lease expires).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    path = dest.with_name(f".{dest.name}.lock")
    try:  # a symlinked lock file would have the fill truncate whatever it points at
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError:
        if path.is_symlink():
            raise symlink_refused(path) from None
        raise
    with open(fd, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text(encoding="utf-8").strip() or "unknown"
            logger.info("%s: another fill of this directory is running (%s): waiting for it to finish", dest, holder)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{socket.gethostname()} pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fill(source: HfSource | S3Source, dest: Path, options: _Options) -> FillResult:
    manifest = read_manifest(dest)
    # The manifest of a complete fill of this source while that fill may still be kept, else None.
    current = manifest if (manifest is not None and same_source(str(manifest.get("source")), source)
                           and not missing_files(manifest, dest)) else None
    if current is not None and options.require_checksums and (unchecked := size_only_files(current)):
        # Filled before checksums were required: look at the source again (it may have published them since).
        logger.info("%s: %d files were filled with only their size checked (%s): checking the source again",
                    dest, len(unchecked), _first(unchecked))
        current = None
    if current is not None and source.pinned:  # the same URI always means the same bytes: no request needed
        if _still_intact(dest, current, options.verify_mode):
            return _already_filled(source, dest, current, options.keep_revisions)
        current = None
    store = _open_store(source, load_credentials())
    try:
        listing = _with_retries(store.list, options.retries, options.retry_delay, f"listing {source.uri}")
        if current is not None:
            # A branch may have moved since: the fill is current only if it still points at the same commit.
            if listing.revision != current.get("revision"):
                logger.info("%s: %s moved from %s to %s: refilling", dest, source.uri, current.get("revision"),
                            listing.revision)
            elif _still_intact(dest, current, options.verify_mode):
                return _already_filled(source, dest, current, options.keep_revisions)
        elif dest.exists():
            logger.info("%s: holds no complete fill of %s: it will be replaced", dest, source.uri)
        tmp = dest.with_name(dest.name + PARTIAL_SUFFIX)
        recorded, downloaded = _download(store, listing, source.uri, tmp, options)
    finally:
        store.close()

    _fsync_tree(tmp)
    write_manifest(tmp, source.uri, listing.revision, recorded)
    _swap_into_place(tmp, dest)
    size_only = tuple(entry.path for entry in recorded if not entry.checked)
    logger.info("%s: filled from %s (revision %s): %d files, %s downloaded%s", dest, source.uri, listing.revision,
                len(recorded), _human(downloaded),
                f"; {len(size_only)} checked by size only ({_first(size_only)})" if size_only else "")
    return FillResult(dest, "filled", listing.revision, len(recorded), downloaded,
                      _prune(dest, source, options.keep_revisions), size_only)


def _still_intact(dest: Path, manifest: dict, verify_mode: VerifyMode) -> bool:
    """Whether a complete fill of this source may be kept: its files still match the manifest (hashes unless
    size-only), so a same-size overwrite of the weights is refilled instead of trusted."""
    if problem := check_against_manifest(manifest, dest, verify_mode):
        logger.info("%s: %s: refilling", dest, problem)
        return False
    return True


def _already_filled(source: Source, dest: Path, manifest: dict, keep_revisions: int) -> FillResult:
    logger.info("%s: already filled from %s (revision %s)", dest, source.uri, manifest.get("revision"))
    return FillResult(dest, "already-filled", manifest.get("revision"), len(manifest["files"]), 0,
                      _prune(dest, source, keep_revisions), size_only_files(manifest))


def _first(paths: tuple[str, ...] | list[str], shown: int = 3) -> str:
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(paths[:shown]) + more


def _refuse_size_only(files: list[RemoteFile], source: str) -> None:
    """--require-checksums: every file needs a checksum this fill can check, before anything is downloaded."""
    unchecked = [file.path for file in files if not applicable_checks(file)]
    if not unchecked:
        return
    if source.startswith("hf://"):
        fix = "the hub listed no sha256 or git blob id for it; check that HF_ENDPOINT is a Hugging Face hub"
    else:
        fix = (f"publish a SHA256SUMS file under {source.rstrip('/')}/ (`sha256sum` output for every file), or "
               "upload the files with an S3 checksum (--checksum-algorithm SHA256 or CRC32)")
    raise FetchError(f"{source}: {_first(unchecked)} {'has' if len(unchecked) == 1 else 'have'} no checksum this "
                     "fill can check, only a size (checksums are required: --require-checksums or "
                     f"FILL_REQUIRE_CHECKSUMS); {fix}", EXIT_USAGE)


def _download(store: Store, listing: Listing, source: str, tmp: Path,
              options: _Options) -> tuple[list[ManifestFile], int]:
    """Fetch every selected file of `listing` into `tmp`; return the manifest entries and the bytes downloaded."""
    files, excluded = select_files(listing.files, (*options.excludes, MANIFEST_NAME))
    if not files:
        raise FetchError(f"{source}: nothing to download: every file is excluded ({', '.join(excluded)}); "
                         "check --exclude")
    for file in files:
        check_relative_path(file.path, source)
    if options.require_checksums:
        _refuse_size_only(files, source)
    elif unchecked := [file.path for file in files if not applicable_checks(file)]:
        logger.warning("%s: %d files have no checksum this fill can check, only their size (%s): they are filled "
                       "and recorded as size-only; publish SHA256SUMS in the source to check them", source,
                       len(unchecked), _first(unchecked))
    refuse_symlink(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    _remove_unlisted(tmp, {file.path for file in files})
    _check_free_space(tmp, files, source)
    logger.info("fetching %s (revision %s) into %s: %d files, %s%s", source, listing.revision, tmp,
                len(files), _human(sum(file.size for file in files)),
                f"; skipping {', '.join(excluded)}" if excluded else "")
    recorded, downloaded = [], 0
    for file in files:
        sha256, checked, fetched = _fetch_file(store, file, tmp, options.retries, options.retry_delay, source)
        recorded.append(ManifestFile(file.path, file.size, sha256, checked))
        downloaded += fetched
    return recorded, downloaded


def verify(source: str, dest: Path | str, *, require_pinned: bool = False,
           mode: VerifyMode = "full") -> FillResult:
    """Check, without network, that `dest` holds a complete model for `source`; raise FetchError if not.

    `mode`: "full" re-hashes every file against the manifest's sha256 (it reads the whole model once); "size-only"
    only checks that every file is there at its recorded size.
    """
    _check_mode(mode)
    parsed = _parse(source, require_pinned)
    dest = Path(os.path.abspath(dest))
    try:
        manifest = verify_directory(parsed, dest, mode)
    except OSError as exc:
        raise FetchError(f"{exc}; check the model volume (mounted, readable)") from None
    if manifest is None:
        logger.info("%s: looks like a complete model (no manifest; checked config.json and safetensors)", dest)
        return FillResult(dest, "verified", None, sum(1 for p in dest.rglob("*") if p.is_file()), 0)
    logger.info("%s: complete fill of %s (revision %s; %s)", dest, manifest.get("source"), manifest.get("revision"),
                "every file re-hashed" if mode == "full" else "sizes only, not re-hashed")
    return FillResult(dest, "verified", manifest.get("revision"), len(manifest["files"]), 0)


def _check_mode(mode: str) -> None:
    if mode not in VERIFY_MODES:
        raise FetchError(f"verify mode {mode!r} is not one of {', '.join(VERIFY_MODES)}", EXIT_USAGE)


def _parse(source: str, require_pinned: bool) -> Source:
    parsed = parse_source(source)
    if require_pinned:
        refuse_unpinned(parsed)
    return parsed


def _open_store(source: HfSource | S3Source, credentials: Credentials) -> Store:
    # Imported here: a hub fill never loads boto3, a verification loads neither.
    if isinstance(source, HfSource):
        from serving.fetch.hub import HubStore

        return HubStore(source, credentials)
    from serving.fetch.s3 import S3Store

    return S3Store(source, credentials)


def _prune(dest: Path, source: Source, keep_revisions: int) -> tuple[Path, ...]:
    for leftover in dest.parent.glob(f"{dest.name}{REPLACED_MARKER}*"):
        shutil.rmtree(leftover, ignore_errors=True)  # from a swap interrupted before its cleanup
    return tuple(prune_revisions(dest, source, keep_revisions))


def _with_retries(action: Callable[[], T], retries: int, delay: float, what: str) -> T:
    for attempt in range(retries + 1):
        try:
            return action()
        except TransientError as exc:
            if attempt == retries:
                raise FetchError(f"{what} failed after {retries} retries: {exc}; check the network path to the "
                                 "source, then run the fill again") from None
            logger.warning("%s: %s; retry %d of %d", what, exc, attempt + 1, retries)
            time.sleep(_backoff(delay, attempt))
    raise AssertionError("unreachable")


def _backoff(delay: float, attempt: int) -> float:
    return min(delay * 2 ** attempt, MAX_RETRY_DELAY_S)


def _hash_file(fd: int, file: RemoteFile, hashes: Hashes | None = None) -> Hashes:
    """Hash the bytes of the open file `fd` (then closed) into `hashes`."""
    hashes = hashes or Hashes(file)
    with open(fd, "rb") as existing:
        while chunk := existing.read(_READ_BYTES):
            hashes.update(chunk)
    return hashes


def _open_existing(tmp: Path, path: str) -> int | None:
    """A read descriptor for `tmp/path` (never through a symlink), or None when there is no such file."""
    try:
        return open_under(tmp, path, os.O_RDONLY)
    except FileNotFoundError:
        return None


def _fetch_file(store: Store, file: RemoteFile, tmp: Path, retries: int, delay: float,
                source: str) -> tuple[str, tuple[str, ...], int]:
    """Download (or resume, or keep) one file into `tmp`; return its sha256, the source checksums it passed and
    the bytes downloaded."""
    final = tmp / file.path
    part = final.with_name(final.name + ".part")
    if (existing := _open_existing(tmp, file.path)) is not None:
        if os.fstat(existing).st_size == file.size:
            hashes = _hash_file(existing, file)
            if hashes.mismatch(file) is None:
                logger.info("%s: already downloaded and verified", file.path)
                return hashes.sha256, hashes.checked(), 0
        else:
            os.close(existing)
        logger.info("%s: the earlier download does not verify: downloading it again", file.path)
        final.unlink()

    hashes = Hashes(file)
    # Created (with its directories) through open_under: a symlinked .part or directory is refused, not followed.
    out_fd = open_under(tmp, f"{file.path}.part", os.O_WRONLY | os.O_CREAT | os.O_APPEND, make_parents=True)
    written = os.fstat(out_fd).st_size
    if written > file.size:
        os.ftruncate(out_fd, 0)
        written = 0
    if written:
        _hash_file(open_under(tmp, f"{file.path}.part", os.O_RDONLY), file, hashes)
        logger.info("%s: resuming at %s of %s", file.path, _human(written), _human(file.size))
    progress = _Progress(file.path, file.size, written)
    skip_checks: frozenset[str] = frozenset()
    with open(out_fd, "ab") as out:
        for attempt in range(retries + 1):
            if written >= file.size:
                break  # complete (an empty file needs no request)
            try:
                with store.open(file, written) as body:
                    skip_checks = body.skip_checks
                    if body.start != written:
                        if body.start != 0:
                            raise TransientError(f"asked for bytes from {written}, the server sent from {body.start}")
                        logger.info("%s: the server ignored the Range request: restarting from zero", file.path)
                        out.truncate(0)
                        hashes, written = Hashes(file), 0
                        progress.restart()
                    for chunk in body.chunks():
                        out.write(chunk)
                        hashes.update(chunk)
                        written += len(chunk)
                        progress.advance(len(chunk), written)
                if written < file.size:
                    raise TransientError(f"the body ended after {written} of {file.size} bytes")
                break
            except TransientError as exc:
                out.flush()
                if attempt == retries:
                    raise FetchError(f"{source}: {file.path}: download failed after {retries} retries ({exc}); "
                                     f"{_human(written)} kept in {part}: run the fill again to resume") from None
                logger.warning("%s: %s; retry %d of %d from byte %d", file.path, exc, attempt + 1, retries, written)
                time.sleep(_backoff(delay, attempt))
        out.flush()
        os.fsync(out.fileno())

    if written != file.size:
        part.unlink()
        raise FetchError(f"{source}: {file.path}: size mismatch: expected {file.size} bytes, got {written}; the "
                         "source changed or the transfer was corrupted; run the fill again")
    if wrong := hashes.mismatch(file, skip_checks):
        algorithm, expected, actual = wrong
        part.unlink()
        raise FetchError(f"{source}: {file.path}: {algorithm} mismatch: expected {expected}, got {actual}; the "
                         "source changed or the transfer was corrupted; run the fill again")
    os.replace(part, final)
    progress.finish()
    return hashes.sha256, hashes.checked(skip_checks), progress.fetched


class _Progress:
    """At most one line per PROGRESS_INTERVAL_S while a file downloads, and one with its rate when it is done."""

    def __init__(self, path: str, size: int, resumed_at: int) -> None:
        self.path, self.size, self.resumed_at, self.fetched = path, size, resumed_at, 0
        self.started = self.last_line = time.monotonic()

    def restart(self) -> None:
        self.resumed_at = self.fetched = 0

    def advance(self, count: int, written: int) -> None:
        self.fetched += count
        now = time.monotonic()
        if now - self.last_line >= PROGRESS_INTERVAL_S:
            self.last_line = now
            logger.info("%s: %s of %s (%d%%), %s", self.path, _human(written), _human(self.size),
                        100 * written // max(self.size, 1), self._rate(now))

    def finish(self) -> None:
        now = time.monotonic()
        resumed = f", resumed at {_human(self.resumed_at)}" if self.resumed_at else ""
        logger.info("%s: done, %s in %.1f s (%s%s)", self.path, _human(self.fetched), now - self.started,
                    self._rate(now), resumed)

    def _rate(self, now: float) -> str:
        return f"{self.fetched / 1e6 / max(now - self.started, 1e-6):.1f} MB/s"


def _human(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _remove_unlisted(tmp: Path, listed: set[str]) -> None:
    """Drop what an earlier run left in `tmp` that this listing does not have (so it cannot end up in the model).

    A symlink in `tmp` is refused wherever it is, listed or not: the fill never makes one, so something else
    wrote into the fill's own directory.
    """
    keep = listed | {f"{path}.part" for path in listed}
    for path in sorted(tmp.rglob("*"), reverse=True):
        relative = path.relative_to(tmp).as_posix()
        if path.is_symlink():
            raise symlink_refused(path)
        if path.is_dir():
            if not any(name == relative or name.startswith(relative + "/") for name in listed):
                shutil.rmtree(path)
        elif relative not in keep:
            path.unlink()


def _check_free_space(tmp: Path, files: list[RemoteFile], source: str) -> None:
    needed = 0
    for file in files:
        have = 0
        for path in (tmp / file.path, tmp / f"{file.path}.part"):
            try:
                have = os.lstat(path).st_size
                break
            except FileNotFoundError:
                continue
        needed += max(file.size - have, 0)
    free = shutil.disk_usage(tmp).free
    if needed > free:
        raise FetchError(f"{tmp.parent}: {source} needs {_human(needed)} more, only {_human(free)} free; grow the "
                         "model volume or prune old revisions (--keep-revisions)")


def _fsync_tree(root: Path) -> None:
    for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Publish `tmp` as `dest` with renames only; an existing `dest` is moved aside first, then deleted."""
    replaced = None
    if dest.exists() or dest.is_symlink():
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        replaced = dest.with_name(f"{dest.name}{REPLACED_MARKER}{stamp}")
        os.rename(dest, replaced)
    os.rename(tmp, dest)
    _fsync_dir(dest.parent)
    if replaced is not None:
        if replaced.is_dir() and not replaced.is_symlink():
            shutil.rmtree(replaced)
        else:
            replaced.unlink()
