"""The checksums a source publishes for a file, computed while its bytes stream by.

Names (the keys of `RemoteFile.checks`) and the form of their expected value:
- `sha256` (hub LFS files), `git-sha1` (other hub files: the git blob id), `md5` (a single-part S3 upload's ETag),
  `SHA256SUMS` (the line for the file in a `SHA256SUMS` published beside it in the S3 prefix): lowercase hex.
- `s3-sha256`, `s3-sha1`, `s3-sha512`, `s3-md5`, `s3-crc32`, `s3-crc32c`, `s3-crc64nvme`: S3's own checksums
  (HeadObject with ChecksumMode=ENABLED), base64 of the big-endian digest. A full-object checksum covers the whole
  object; a composite one (`...-N`, from a multipart upload) is the checksum of the N parts' checksums, so it is
  checked only when the part sizes are known (`RemoteFile.parts`).
CRC32C and CRC64NVME (S3's default for objects uploaded without a checksum) need `awscrt`, AWS's own C library that
botocore uses for them; without it they do not apply, like any other checksum this module cannot compute.

`Hashes` runs every applicable check of one file, plus the sha256 that the manifest records, over its bytes once.
"""
from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import Callable
from typing import Protocol

from serving.fetch.sources import RemoteFile

HEX_CHECKS = ("sha256", "git-sha1", "md5", "SHA256SUMS")
S3_PREFIX = "s3-"


class Digest(Protocol):
    def update(self, chunk: bytes) -> None: ...

    def value(self) -> str:
        """The digest in the form the source publishes it (see the module docstring)."""


class _Raw(Protocol):
    def update(self, chunk: bytes | memoryview, /) -> None: ...

    def digest(self) -> bytes: ...


class _Crc:
    """A CRC with hashlib's update/digest, from a `crc(data, previous) -> int` function."""

    def __init__(self, crc: Callable[[bytes | memoryview, int], int], width: int) -> None:
        self._crc, self._width, self._value = crc, width, 0

    def update(self, chunk: bytes | memoryview, /) -> None:
        self._value = self._crc(chunk, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(self._width, "big")


def _crt(name: str) -> Callable[[bytes | memoryview, int], int] | None:
    try:
        from awscrt import checksums
    except ImportError:
        return None
    return getattr(checksums, name)


def _raw_factory(algorithm: str) -> Callable[[], _Raw] | None:
    """A new-digest function for S3 checksum `algorithm` (without the `s3-` prefix), None when not computable."""
    if algorithm in ("sha256", "sha1", "sha512", "md5"):
        return lambda: hashlib.new(algorithm, usedforsecurity=False)
    if algorithm == "crc32":
        return lambda: _Crc(zlib.crc32, 4)
    crc = _crt(algorithm) if algorithm in ("crc32c", "crc64nvme") else None
    if crc is None:
        return None
    return lambda: _Crc(crc, 8 if algorithm == "crc64nvme" else 4)


class _Hex:
    def __init__(self, digest: _Raw) -> None:
        self._digest = digest

    def update(self, chunk: bytes) -> None:
        self._digest.update(chunk)

    def value(self) -> str:
        return self._digest.digest().hex()


class _FullObject:
    def __init__(self, new: Callable[[], _Raw]) -> None:
        self._digest = new()

    def update(self, chunk: bytes) -> None:
        self._digest.update(chunk)

    def value(self) -> str:
        return base64.b64encode(self._digest.digest()).decode()


class _Composite:
    """S3's checksum of a multipart upload: each part's digest, then the digest of those digests, `-N` appended."""

    def __init__(self, new: Callable[[], _Raw], parts: tuple[int, ...]) -> None:
        self._new, self._parts = new, parts
        self._done: list[bytes] = []
        self._current, self._left = new(), parts[0]

    def update(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            if self._left == 0 and len(self._done) < len(self._parts) - 1:
                self._next_part()
                continue
            take = view[:self._left] if self._left else view  # bytes past the last part: the size check fails them
            self._current.update(take)
            self._left -= min(len(take), self._left)
            view = view[len(take):]

    def _next_part(self) -> None:
        self._done.append(self._current.digest())
        self._current, self._left = self._new(), self._parts[len(self._done)]

    def value(self) -> str:
        whole = self._new()
        for part in (*self._done, self._current.digest()):
            whole.update(part)
        return f"{base64.b64encode(whole.digest()).decode()}-{len(self._done) + 1}"


def new_digest(algorithm: str, expected: str, size: int, parts: tuple[int, ...] = ()) -> Digest | None:
    """A digest that computes check `algorithm` of a file of `size` bytes, or None when this fetcher cannot check
    it (an unknown algorithm, CRC32C/CRC64NVME without awscrt, a composite checksum without its part sizes)."""
    if algorithm in ("sha256", "SHA256SUMS"):
        return _Hex(hashlib.sha256())
    if algorithm == "git-sha1":
        blob = hashlib.sha1(b"blob %d\0" % size, usedforsecurity=False)
        return _Hex(blob)
    if algorithm == "md5":
        return _Hex(hashlib.md5(usedforsecurity=False))
    if not algorithm.startswith(S3_PREFIX) or (new := _raw_factory(algorithm.removeprefix(S3_PREFIX))) is None:
        return None
    _, dash, count = expected.rpartition("-")
    if not dash:
        return _FullObject(new)
    if not count.isdigit() or int(count) != len(parts) or sum(parts) != size or not all(parts):
        return None
    return _Composite(new, parts)


def matches(algorithm: str, expected: str, actual: str) -> bool:
    return actual == (expected.lower() if algorithm in HEX_CHECKS else expected)


def applicable_checks(file: RemoteFile) -> tuple[str, ...]:
    """The checksums published for `file` that this fetcher can compute; empty: its size is all that is checked."""
    return tuple(sorted(algorithm for algorithm, expected in file.checks.items()
                        if new_digest(algorithm, expected, file.size, file.parts) is not None))


class Hashes:
    """sha256 of every file (for the manifest) plus the applicable checksums its source publishes."""

    def __init__(self, file: RemoteFile) -> None:
        self._sha256 = hashlib.sha256()
        self.digests: dict[str, Digest] = {}
        for algorithm, expected in file.checks.items():
            if (digest := new_digest(algorithm, expected, file.size, file.parts)) is not None:
                self.digests[algorithm] = digest

    def update(self, chunk: bytes) -> None:
        self._sha256.update(chunk)
        for digest in self.digests.values():
            digest.update(chunk)

    def mismatch(self, file: RemoteFile, skip: frozenset[str] = frozenset()) -> tuple[str, str, str] | None:
        for algorithm, digest in self.digests.items():
            expected, actual = file.checks[algorithm], digest.value()
            if algorithm not in skip and not matches(algorithm, expected, actual):
                return algorithm, expected, actual
        return None

    def checked(self, skip: frozenset[str] = frozenset()) -> tuple[str, ...]:
        """The checksums that were compared (after `mismatch` found none wrong)."""
        return tuple(sorted(set(self.digests) - skip))

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()
