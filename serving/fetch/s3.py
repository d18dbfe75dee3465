"""An S3-compatible object store as a model source, through boto3.

Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a service-account role...);
AWS_ENDPOINT_URL_S3 points it at another S3-compatible server (MinIO, Ceph, R2), which then gets path-style
addressing. Every GET carries `If-Match: <ETag>`, so an object overwritten during a fill fails it instead of mixing
two versions.

What each file is checked against (`serving.fetch.checksums`), besides its size:
- S3's own checksums, read with one HeadObject (ChecksumMode=ENABLED) per file: full-object ones directly, the
  composite ones of a multipart upload (`...-N`) part by part, with the part sizes from GetObjectAttributes.
- `SHA256SUMS` in the prefix (`sha256sum` output, paths relative to the prefix), when it is published: its sha256
  for every file it lists. It is read, not copied into the model.
- A single-part upload's ETag, which is its MD5, except for objects encrypted with KMS or a customer key.
A multipart upload's ETag (`...-N`) is not a digest of the content: with none of the above, a file's size is all
that is checked, which `serving.fetch.fill` records (or refuses, with --require-checksums).
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from serving.fetch.credentials import AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, Credentials
from serving.fetch.errors import FetchError, TransientError
from serving.fetch.sources import Listing, RemoteFile, S3Source, content_range_start

logger = logging.getLogger("serving.fetch")

CHUNK_BYTES = 1 << 20
DEFAULT_REGION = "us-east-1"
SUMS_NAME = "SHA256SUMS"
MAX_SUMS_BYTES = 16 << 20
_MD5_ETAG = re.compile(r"[0-9a-f]{32}")
_SUMS_LINE = re.compile(r"(?P<sha256>[0-9a-fA-F]{64}) [ *](?P<path>.+)")
# HeadObject's checksum fields -> check names (serving.fetch.checksums).
_S3_CHECKSUMS = {"ChecksumSHA256": "s3-sha256", "ChecksumSHA1": "s3-sha1", "ChecksumSHA512": "s3-sha512",
                 "ChecksumMD5": "s3-md5", "ChecksumCRC32": "s3-crc32", "ChecksumCRC32C": "s3-crc32c",
                 "ChecksumCRC64NVME": "s3-crc64nvme"}


def _transient_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import ConnectionError, HTTPClientError, IncompleteReadError
    from urllib3.exceptions import HTTPError as Urllib3Error

    # HTTPClientError covers ResponseStreamingError, ConnectionClosedError and ReadTimeoutError.
    return ConnectionError, HTTPClientError, IncompleteReadError, Urllib3Error


@dataclass
class _S3Body:
    stream: Any  # botocore StreamingBody
    start: int
    skip_checks: frozenset[str]

    def chunks(self) -> Iterator[bytes]:
        try:
            yield from self.stream.iter_chunks(CHUNK_BYTES)
        except _transient_errors() as exc:
            raise TransientError(f"connection lost: {exc}") from exc


class S3Store:
    def __init__(self, source: S3Source, credentials: Credentials) -> None:
        import boto3
        from botocore.config import Config

        self.source = source
        self.credentials = credentials
        keys = credentials.aws_keys()  # static keys from the fill's Secret or the environment; else boto3's chain
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
        # Checksums are checked by the fill itself (across resumed Range requests, which S3 sends without them);
        # botocore's own check of whole-object GETs would fail a fill on CRCs it cannot compute without awscrt.
        options: dict[str, Any] = {"region_name": region, "connect_timeout": 10, "read_timeout": 120,
                                   "retries": {"mode": "standard", "max_attempts": 3},
                                   "response_checksum_validation": "when_required",
                                   "request_checksum_calculation": "when_required"}
        if endpoint:
            # S3-compatible servers rarely have per-bucket DNS names.
            options["s3"] = {"addressing_style": "path"}
        self.endpoint = endpoint
        self._client = boto3.session.Session(**keys).client("s3", endpoint_url=endpoint, config=Config(**options))

    def close(self) -> None:
        self._client.close()

    def list(self) -> Listing:
        bucket, prefix = self.source.bucket, self.source.prefix
        where = f"s3://{bucket}/{prefix}"
        files = []
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
                for entry in page.get("Contents", ()):
                    key = entry["Key"]
                    if key.endswith("/"):
                        continue  # a "folder" marker
                    etag = entry.get("ETag", "").strip('"')
                    files.append(RemoteFile(key[len(prefix) + 1:], entry["Size"], key, {}, etag or None))
        except _transient_errors() as exc:
            raise TransientError(f"cannot reach {self._where()}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - any other botocore error: one FetchError saying what to do
            raise self._error(exc, where) from None
        if not files:
            raise FetchError(f"no objects under {where}/; check the bucket and prefix (each model version is "
                             "published under its own prefix)")
        sums_file = next((file for file in files if file.path == SUMS_NAME), None)
        sums = self._read_sums(sums_file, {file.path for file in files}) if sums_file else {}
        files = [self._with_checks(file, sums) for file in files if file is not sums_file]
        return Listing(f"{bucket}/{prefix}", tuple(files))

    def _with_checks(self, file: RemoteFile, sums: dict[str, str]) -> RemoteFile:
        """`file` with every checksum the store publishes for it (and the part sizes its composite ones need)."""
        where = f"s3://{self.source.bucket}/{file.location}"
        head = self._call(where, self._client.head_object, Bucket=self.source.bucket, Key=file.location,
                          ChecksumMode="ENABLED")
        checks = {name: head[field] for field, name in _S3_CHECKSUMS.items() if head.get(field)}
        encrypted = head.get("ServerSideEncryption", "").startswith("aws:kms") or head.get("SSECustomerAlgorithm")
        if file.etag and _MD5_ETAG.fullmatch(file.etag) and not encrypted:
            checks["md5"] = file.etag
        if file.path in sums:
            checks["SHA256SUMS"] = sums[file.path]
        parts: tuple[int, ...] = ()
        if any("-" in value for name, value in checks.items() if name.startswith("s3-")):
            parts = self._part_sizes(file, where)
        return RemoteFile(file.path, file.size, file.location, checks, file.etag, parts)

    def _part_sizes(self, file: RemoteFile, where: str) -> tuple[int, ...]:
        """The sizes of a multipart upload's parts, in order; () when the store will not say (its composite
        checksums then do not apply)."""
        sizes: list[int] = []
        marker = 0
        while True:
            try:
                answer = self._call(where, self._client.get_object_attributes, Bucket=self.source.bucket,
                                    Key=file.location, ObjectAttributes=["ObjectParts"], MaxParts=1000,
                                    PartNumberMarker=marker)
            except FetchError as exc:
                logger.warning("%s: cannot read its part sizes (%s): its composite checksum is not checked; allow "
                               "s3:GetObjectAttributes, or publish SHA256SUMS", file.path, exc.message)
                return ()
            parts = answer.get("ObjectParts", {})
            sizes += [part["Size"] for part in sorted(parts.get("Parts", ()), key=lambda part: part["PartNumber"])]
            following = parts.get("NextPartNumberMarker") or 0
            if not parts.get("IsTruncated") or following <= marker:  # the last page, or a store that loops
                return tuple(sizes)
            marker = following

    def _read_sums(self, sums_file: RemoteFile, listed: set[str]) -> dict[str, str]:
        """The sha256 of every file named by the prefix's SHA256SUMS (`sha256sum` output, relative paths)."""
        where = f"s3://{self.source.bucket}/{sums_file.location}"
        if sums_file.size > MAX_SUMS_BYTES:
            raise FetchError(f"{where} is {sums_file.size} bytes, more than a checksum list needs "
                             f"({MAX_SUMS_BYTES}); publish `sha256sum` output there")
        answer = self._call(where, self._client.get_object, Bucket=self.source.bucket, Key=sums_file.location)
        try:
            text = answer["Body"].read().decode("utf-8")
        except _transient_errors() as exc:
            raise TransientError(f"connection lost reading {where}: {exc}") from exc
        except UnicodeDecodeError:
            raise FetchError(f"{where} is not UTF-8 text; publish `sha256sum` output there") from None
        sums: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            if not (match := _SUMS_LINE.fullmatch(line.rstrip("\r"))):
                raise FetchError(f"{where}: line {number} is not `<sha256>  <path>`: {line[:120]!r}; publish "
                                 "`sha256sum` output (run in the model directory)")
            path = match["path"].removeprefix("./")
            if path not in listed:
                raise FetchError(f"{where} lists {path}, which is not under s3://{self.source.bucket}/"
                                 f"{self.source.prefix}/: the upload is incomplete, or SHA256SUMS was made "
                                 "elsewhere; finish the upload or fix SHA256SUMS")
            sums[path] = match["sha256"].lower()
        return sums

    def _call(self, where: str, method: Any, **request: Any) -> Any:
        try:
            return method(**request)
        except _transient_errors() as exc:
            raise TransientError(f"connection failed: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - any other botocore error: one FetchError saying what to do
            raise self._error(exc, where) from None

    @contextmanager
    def open(self, file: RemoteFile, offset: int) -> Iterator[_S3Body]:
        request: dict[str, Any] = {"Bucket": self.source.bucket, "Key": file.location}
        if file.etag:
            request["IfMatch"] = f'"{file.etag}"'
        try:
            try:
                response = self._client.get_object(**request, **({"Range": f"bytes={offset}-"} if offset else {}))
            except Exception as exc:
                if offset and _error_code(exc) == "InvalidRange":
                    response = self._client.get_object(**request)  # we hold more bytes than the object has
                else:
                    raise
        except _transient_errors() as exc:
            raise TransientError(f"connection failed: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - any other botocore error: one FetchError saying what to do
            raise self._error(exc, f"s3://{self.source.bucket}/{file.location}") from None
        status = response["ResponseMetadata"]["HTTPStatusCode"]
        start = content_range_start(response.get("ContentRange")) if status == 206 else 0
        encrypted = response.get("ServerSideEncryption", "").startswith("aws:kms") or response.get(
            "SSECustomerAlgorithm")
        body = response["Body"]
        try:
            yield _S3Body(body, start, frozenset({"md5"}) if encrypted else frozenset())
        finally:
            body.close()

    def _where(self) -> str:
        return self.endpoint or "S3"

    def _error(self, exc: Exception, where: str) -> Exception:
        from botocore.exceptions import ClientError, NoCredentialsError

        if isinstance(exc, NoCredentialsError):
            how = self.credentials.how_to_set(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)
            return FetchError(f"{where}: no AWS credentials: {how}, or give the fill's service account a role that "
                              "can read the bucket")
        if not isinstance(exc, ClientError):
            return exc
        code = _error_code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in ("PreconditionFailed", "412"):
            return FetchError(f"{where} changed while it was being fetched (its ETag no longer matches); publish "
                              "each model version under its own immutable prefix and run the fill again")
        if code in ("NoSuchBucket",):
            return FetchError(f"{where}: bucket {self.source.bucket} does not exist on {self._where()}; check the "
                              "source and AWS_ENDPOINT_URL_S3")
        if code in ("NoSuchKey", "404"):
            return FetchError(f"{where}: the object disappeared after it was listed; run the fill again")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
            used = (self.credentials.origin(AWS_ACCESS_KEY_ID) if self.credentials.get(AWS_ACCESS_KEY_ID)
                    else "boto3's default credentials")
            return FetchError(f"{where}: access denied ({code}) with {used}; check the key pair and that it may "
                              "list and read the bucket")
        if status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout"):
            return TransientError(f"{code} (HTTP {status})")
        return FetchError(f"{where}: S3 error {code} (HTTP {status}): {exc}")


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
