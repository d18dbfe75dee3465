"""An S3-compatible object store as a model source, through boto3.

Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a service-account role...);
AWS_ENDPOINT_URL_S3 points it at another S3-compatible server (MinIO, Ceph, R2), which then gets path-style
addressing. Sizes are always checked; a single-part upload's ETag is its MD5, which is checked too, except for
objects encrypted with KMS or a customer key (their ETag is not an MD5). Every GET carries `If-Match: <ETag>`, so an
object overwritten during a fill fails it instead of mixing two versions.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from serving.fetch.credentials import AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, Credentials
from serving.fetch.errors import FetchError, TransientError
from serving.fetch.sources import Listing, RemoteFile, S3Source, content_range_start

CHUNK_BYTES = 1 << 20
DEFAULT_REGION = "us-east-1"
_MD5_ETAG = re.compile(r"[0-9a-f]{32}")


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
        options: dict[str, Any] = {"region_name": region, "connect_timeout": 10, "read_timeout": 120,
                                   "retries": {"mode": "standard", "max_attempts": 3}}
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
                    checks = {"md5": etag} if _MD5_ETAG.fullmatch(etag) else {}
                    files.append(RemoteFile(key[len(prefix) + 1:], entry["Size"], key, checks, etag or None))
        except _transient_errors() as exc:
            raise TransientError(f"cannot reach {self._where()}: {exc}") from exc
        except Exception as exc:
            raise self._error(exc, where) from None
        if not files:
            raise FetchError(f"no objects under {where}/; check the bucket and prefix (each model version is "
                             "published under its own prefix)")
        return Listing(f"{bucket}/{prefix}", tuple(files))

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
        except Exception as exc:
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
