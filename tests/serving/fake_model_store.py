"""A fake Hugging Face hub and S3-compatible store on 127.0.0.1, with fault injection, for `serving.fetch`'s tests.

Hub, as huggingface_hub 2.4 and the fetcher use it:
- `GET /api/models/{org}/{name}[/revision/{rev}]` (`?blobs=True` adds each file's size, git blob id and LFS sha256,
  as `HfApi.model_info(files_metadata=True)` asks); `rev` is a branch resolving to a commit, or the commit itself.
  Unknown repos and revisions answer 404 with the hub's `X-Error-Code` (RepoNotFound / RevisionNotFound).
- `GET /{org}/{name}/resolve/{rev}/{path}`: small files are served directly (ETag = git blob sha1); LFS files
  redirect (302) to `/cdn/{sha256}`, as the hub redirects to its CDN.
A repository added with `token=` is gated: without `Authorization: Bearer <token>` every request about it answers 401
with `X-Error-Code: GatedRepo`, as the hub does.
S3, path-style: `GET /{bucket}?list-type=2` (ListObjectsV2 XML, paginated by `list_page_size`) and `GET`/`HEAD
/{bucket}/{key}` (ETag = MD5, `If-Match` honoured). Signatures are not checked; with `access_key_id` set, a request
signed with another key id answers 403 `InvalidAccessKeyId`. Objects may be multipart uploads (`part_size=`: the
ETag is then the MD5 of the parts' MD5s with `-N`, as S3 makes it, not a digest of the content) and may carry an S3
checksum (`checksum=`, full-object or composite), sent as `x-amz-checksum-*` headers on HEAD and whole-object GET
when the request says `x-amz-checksum-mode: ENABLED`. `GET /{bucket}/{key}?attributes` is GetObjectAttributes with
the parts (paginated by `parts_page_size`; like S3, parts are listed only for objects with a checksum).

Every byte-serving answer supports `Range: bytes=N-` (206 + Content-Range; 416 past the end) unless
`ignore_ranges` is set. Faults, per file
location (`hf://org/name/path` or `s3://bucket/key`): `drop_connection` sends the full Content-Length header, then
N bytes, then closes the socket; `corrupt` serves bytes of the same size with different content. Every request is
recorded in `requests`.
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote_plus, unquote, urlsplit
from xml.sax.saxutils import escape

LAST_MODIFIED = "2024-07-23T16:39:53.000Z"
LAST_MODIFIED_HTTP = "Tue, 23 Jul 2024 16:39:53 GMT"
LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # decoded, without the query
    query: str
    range: str | None
    authorization: str | None


@dataclass
class _Fault:
    drop_after: int | None = None
    drops_left: int = 0
    corrupt: bool = False


@dataclass
class _Repo:
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit
    token: str | None = None  # gated: only this bearer token may read it
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> path -> bytes


@dataclass
class _Object:
    data: bytes
    etag: str
    kms: bool
    parts: tuple[int, ...] = ()  # a multipart upload's part sizes
    checksums: dict[str, str] = field(default_factory=dict)  # header suffix ("sha256", "crc32") -> value
    checksum_type: str | None = None  # FULL_OBJECT or COMPOSITE


def _raw_checksum(algorithm: str, data: bytes) -> bytes:
    """S3 checksum `algorithm` (sha256, sha1, sha512, md5, crc32, crc32c, crc64nvme) of `data`, big-endian bytes."""
    if algorithm in ("sha256", "sha1", "sha512", "md5"):
        return hashlib.new(algorithm, data).digest()
    if algorithm == "crc32":
        return zlib.crc32(data).to_bytes(4, "big")
    from awscrt import checksums  # CRC32C and CRC64NVME: tests that use them skip without awscrt

    return getattr(checksums, algorithm)(data).to_bytes(8 if algorithm == "crc64nvme" else 4, "big")


def s3_checksum(algorithm: str, data: bytes, parts: tuple[int, ...] = ()) -> str:
    """The value S3 reports: base64 of the checksum, or for a composite one of `parts`, of the parts' checksums
    concatenated, with `-N`."""
    if not parts:
        return base64.b64encode(_raw_checksum(algorithm, data)).decode()
    offsets = [sum(parts[:i]) for i in range(len(parts))]
    joined = b"".join(_raw_checksum(algorithm, data[start:start + size]) for start, size in zip(offsets, parts))
    return f"{base64.b64encode(_raw_checksum(algorithm, joined)).decode()}-{len(parts)}"


class FakeModelStore:
    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.buckets: dict[str, dict[str, _Object]] = {}
        self.requests: list[RecordedRequest] = []
        self.downloads: list[tuple[str, str | None]] = []  # (location, Range header) of every GET serving bytes
        self.list_page_size = 1000
        self.access_key_id: str | None = None  # S3: the only key id accepted (None: any)
        self.ignore_ranges = False  # answer 200 with the whole body, as some servers and proxies do
        self.parts_page_size = 1000  # GetObjectAttributes: parts per answer
        self.deny_object_attributes = False  # GetObjectAttributes answers 403, as without s3:GetObjectAttributes
        self._lfs: dict[str, tuple[str, bytes]] = {}  # sha256 -> (location, bytes)
        self._faults: dict[str, _Fault] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    def __enter__(self) -> FakeModelStore:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- content -------------------------------------------------------------------------------------------------
    def add_commit(self, repo_id: str, files: dict[str, bytes], *, commit: str | None = None,
                   branch: str = "main", token: str | None = None) -> str:
        """Add a commit holding `files` and point `branch` at it; return its sha. `token` gates the repository."""
        commit = commit or hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
        repo = self.repos.setdefault(repo_id, _Repo())
        repo.token = token or repo.token
        repo.commits[commit] = dict(files)
        repo.refs[branch] = commit
        for path, data in files.items():
            if path.endswith(LFS_SUFFIXES):
                self._lfs[hashlib.sha256(data).hexdigest()] = (f"hf://{repo_id}/{path}", data)
        return commit

    def add_objects(self, bucket: str, objects: dict[str, bytes], *, kms: bool = False, part_size: int | None = None,
                    checksum: str | None = None, full_object: bool = False) -> None:
        """Add objects; `kms` imitates SSE-KMS, whose ETag is not the MD5 of the content.

        `part_size`: uploaded in parts of that size (objects larger than one part): a multipart ETag. `checksum`
        (sha256, sha1, sha512, md5, crc32, crc32c, crc64nvme): the S3 checksum it was uploaded with, composite for a multipart
        upload unless `full_object`.
        """
        for key, data in objects.items():
            parts: tuple[int, ...] = ()
            if part_size and len(data) > part_size:
                parts = tuple(min(part_size, len(data) - start) for start in range(0, len(data), part_size))
            if parts:
                offsets = range(0, len(data), part_size)
                md5s = b"".join(hashlib.md5(data[start:start + part_size]).digest() for start in offsets)
                etag = f"{hashlib.md5(md5s + (b'kms' if kms else b'')).hexdigest()}-{len(parts)}"
            else:
                etag = hashlib.md5(data + (b"kms" if kms else b"")).hexdigest()
            obj = _Object(data, etag, kms, parts)
            if checksum:
                composite = bool(parts) and not full_object
                obj.checksums[checksum] = s3_checksum(checksum, data, parts if composite else ())
                obj.checksum_type = "COMPOSITE" if composite else "FULL_OBJECT"
            self.buckets.setdefault(bucket, {})[key] = obj

    # --- faults and records --------------------------------------------------------------------------------------
    def drop_connection(self, location: str, *, after: int, times: int = 1) -> None:
        """The next `times` downloads of `location` send `after` body bytes, then the connection closes."""
        fault = self._faults.setdefault(location, _Fault())
        fault.drop_after, fault.drops_left = after, times

    def corrupt(self, location: str) -> None:
        """Serve `location` with the same size and different bytes (its listed checksums stay the true ones)."""
        self._faults.setdefault(location, _Fault()).corrupt = True

    def ranges(self, location: str) -> list[str | None]:
        """The Range header of every GET that served bytes of `location` (`hf://org/name/path`, `s3://bucket/key`),
        in order; None for a request without one."""
        with self._lock:
            return [range_ for served, range_ in self.downloads if served == location]

    def _take_fault(self, location: str) -> tuple[int | None, bool]:
        with self._lock:
            fault = self._faults.get(location)
            if fault is None:
                return None, False
            drop = None
            if fault.drop_after is not None and fault.drops_left > 0:
                fault.drops_left -= 1
                drop = fault.drop_after
            return drop, fault.corrupt


def _corrupted(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 16]) + data[middle + 16:]


def _handler_for(store: FakeModelStore) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in separate writes: without TCP_NODELAY each response waits on a delayed ACK.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_GET(self) -> None:
            self._route(head=False)

        def _route(self, head: bool) -> None:
            split = urlsplit(self.path)
            path = unquote(split.path)
            with store._lock:
                store.requests.append(RecordedRequest(self.command, path, split.query, self.headers.get("Range"),
                                                      self.headers.get("Authorization")))
            query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
            segments = split.path.split("/")[1:]  # still quoted: a revision may contain an encoded "/"
            if segments[:2] == ["api", "models"]:
                self._hub_api(segments[2:], query)
            elif len(segments) >= 5 and segments[2] == "resolve":
                self._hub_resolve(segments, head)
            elif segments[0] == "cdn":
                location, data = store._lfs.get(segments[1], (None, None))
                if data is None:
                    return self._send(404, b"", {})
                self._serve_bytes(location, data, f'"{segments[1]}"', {}, head)
            else:
                self._s3(segments, query, head)

        # --- hub ----------------------------------------------------------------------------------------------
        def _hub_api(self, segments: list[str], query: dict[str, str]) -> None:
            if len(segments) not in (2, 4) or (len(segments) == 4 and segments[2] != "revision"):
                return self._hub_error(404, "RepoNotFound", "Repository not found")
            repo_id = f"{segments[0]}/{segments[1]}"
            revision = unquote(segments[3]) if len(segments) == 4 else "main"
            commit, files = self._resolve(repo_id, revision)
            if files is None:
                return
            with_blobs = query.get("blobs", "").lower() == "true"
            siblings = []
            for path, data in sorted(files.items()):
                sibling: dict = {"rfilename": path}
                if with_blobs:
                    sibling["size"] = len(data)
                    if path.endswith(LFS_SUFFIXES):
                        pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:"
                                   f"{hashlib.sha256(data).hexdigest()}\nsize {len(data)}\n").encode()
                        sibling["blobId"] = git_blob_sha1(pointer)
                        sibling["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                          "pointerSize": len(pointer)}
                    else:
                        sibling["blobId"] = git_blob_sha1(data)
                siblings.append(sibling)
            body = {"_id": "0" * 24, "id": repo_id, "modelId": repo_id, "author": segments[0], "sha": commit,
                    "lastModified": LAST_MODIFIED, "createdAt": LAST_MODIFIED, "private": False, "disabled": False,
                    "gated": False, "downloads": 0, "likes": 0, "tags": ["transformers", "safetensors"],
                    "library_name": "transformers", "siblings": siblings}
            self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

        def _hub_resolve(self, segments: list[str], head: bool) -> None:
            repo_id = f"{segments[0]}/{segments[1]}"
            commit, files = self._resolve(repo_id, unquote(segments[3]))
            if files is None:
                return
            path = unquote("/".join(segments[4:]))
            if path not in files:
                return self._hub_error(404, "EntryNotFound", "Entry not found")
            data = files[path]
            headers = {"X-Repo-Commit": commit}
            if path.endswith(LFS_SUFFIXES):
                sha256 = hashlib.sha256(data).hexdigest()
                headers.update({"Location": f"/cdn/{sha256}", "X-Linked-Etag": f'"{sha256}"',
                                "X-Linked-Size": str(len(data))})
                return self._send(302, b"", headers)
            self._serve_bytes(f"hf://{repo_id}/{path}", data, f'"{git_blob_sha1(data)}"', headers, head)

        def _resolve(self, repo_id: str, revision: str) -> tuple[str | None, dict[str, bytes] | None]:
            repo = store.repos.get(repo_id)
            if repo is None:
                self._hub_error(404, "RepoNotFound", "Repository not found")
                return None, None
            if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                self._hub_error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access "
                                "to it and be authenticated to access it. Please log in.")
                return None, None
            commit = repo.refs.get(revision, revision)
            if commit not in repo.commits:
                self._hub_error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return None, None
            return commit, repo.commits[commit]

        def _hub_error(self, status: int, code: str, message: str) -> None:
            self._send(status, json.dumps({"error": message}).encode(),
                       {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message})

        # --- S3 -----------------------------------------------------------------------------------------------
        def _s3(self, segments: list[str], query: dict[str, str], head: bool) -> None:
            signed_by = self.headers.get("Authorization", "")
            if store.access_key_id and f"Credential={store.access_key_id}/" not in signed_by:
                return self._s3_error(403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist "
                                      "in our records.", head)
            bucket = store.buckets.get(unquote(segments[0]))
            if bucket is None:
                return self._s3_error(404, "NoSuchBucket", "The specified bucket does not exist", head)
            key = unquote("/".join(segments[1:]))
            if not key:
                return self._s3_list(unquote(segments[0]), bucket, query)
            obj = bucket.get(key)
            if obj is None:
                return self._s3_error(404, "NoSuchKey", "The specified key does not exist.", head)
            if_match = self.headers.get("If-Match")
            if if_match and if_match.strip('"') != obj.etag:
                return self._s3_error(412, "PreconditionFailed", "At least one of the preconditions failed", head)
            if "attributes" in query:
                return self._s3_attributes(obj)
            headers = {"Last-Modified": LAST_MODIFIED_HTTP, "Content-Type": "application/octet-stream"}
            if obj.kms:
                headers["x-amz-server-side-encryption"] = "aws:kms"
            if obj.parts:
                headers["x-amz-mp-parts-count"] = str(len(obj.parts))
            whole = head or not self.headers.get("Range")  # S3 sends no checksum with a range of the object
            if self.headers.get("x-amz-checksum-mode", "").upper() == "ENABLED" and whole and obj.checksums:
                headers.update({f"x-amz-checksum-{name}": value for name, value in obj.checksums.items()})
                headers["x-amz-checksum-type"] = obj.checksum_type or "FULL_OBJECT"
            self._serve_bytes(f"s3://{segments[0]}/{key}", obj.data, f'"{obj.etag}"', headers, head, s3=True)

        def _s3_list(self, name: str, bucket: dict[str, _Object], query: dict[str, str]) -> None:
            prefix = query.get("prefix", "")
            encode = query.get("encoding-type") == "url"
            keys = sorted(key for key in bucket if key.startswith(prefix))
            start = int(query.get("continuation-token") or 0)
            page_size = min(int(query.get("max-keys") or 1000), store.list_page_size)
            page = keys[start:start + page_size]
            truncated = start + page_size < len(keys)
            encoded = (lambda text: quote_plus(text, safe="/")) if encode else (lambda text: text)
            contents = "".join(
                f"<Contents><Key>{escape(encoded(key))}</Key><LastModified>{LAST_MODIFIED}</LastModified>"
                f"<ETag>&quot;{bucket[key].etag}&quot;</ETag><Size>{len(bucket[key].data)}</Size>"
                f"<StorageClass>STANDARD</StorageClass></Contents>" for key in page)
            xml = ('<?xml version="1.0" encoding="UTF-8"?>\n'
                   '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                   f"<Name>{escape(name)}</Name><Prefix>{escape(encoded(prefix))}</Prefix>"
                   f"<KeyCount>{len(page)}</KeyCount><MaxKeys>{page_size}</MaxKeys>"
                   + ("<EncodingType>url</EncodingType>" if encode else "")
                   + f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"
                   + (f"<ContinuationToken>{start}</ContinuationToken>" if start else "")
                   + (f"<NextContinuationToken>{start + page_size}</NextContinuationToken>" if truncated else "")
                   + contents + "</ListBucketResult>")
            self._send(200, xml.encode(), {"Content-Type": "application/xml"})

        def _s3_attributes(self, obj: _Object) -> None:
            if store.deny_object_attributes:
                return self._s3_error(403, "AccessDenied", "Access Denied", False)
            marker = int(self.headers.get("x-amz-part-number-marker") or 0)
            page_size = min(int(self.headers.get("x-amz-max-parts") or 1000), store.parts_page_size)
            numbered = list(enumerate(obj.parts, 1)) if obj.checksums else []
            page = numbered[marker:marker + page_size]
            truncated = marker + page_size < len(numbered)
            parts = "".join(f"<Part><PartNumber>{number}</PartNumber><Size>{size}</Size></Part>"
                            for number, size in page)
            xml = ('<?xml version="1.0" encoding="UTF-8"?>\n'
                   '<GetObjectAttributesResponse xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><ObjectParts>'
                   f"<PartsCount>{len(obj.parts)}</PartsCount><PartNumberMarker>{marker}</PartNumberMarker>"
                   f"<NextPartNumberMarker>{marker + len(page)}</NextPartNumberMarker><MaxParts>{page_size}</MaxParts>"
                   f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>{parts}</ObjectParts>"
                   "</GetObjectAttributesResponse>")
            self._send(200, xml.encode(), {"Content-Type": "application/xml"})

        def _s3_error(self, status: int, code: str, message: str, head: bool) -> None:
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                   f"<RequestId>FAKE</RequestId></Error>")
            self._send(status, b"" if head else xml.encode(), {"Content-Type": "application/xml"})

        # --- bytes ---------------------------------------------------------------------------------------------
        def _serve_bytes(self, location: str, data: bytes, etag: str, headers: dict[str, str], head: bool,
                         s3: bool = False) -> None:
            drop_after, corrupt = (None, False) if head else store._take_fault(location)
            if not head:
                with store._lock:
                    store.downloads.append((location, self.headers.get("Range")))
            if corrupt:
                data = _corrupted(data)
            headers = {**headers, "ETag": etag, "Accept-Ranges": "bytes"}
            status, body = 200, data
            if (ranged := self.headers.get("Range")) and not store.ignore_ranges:
                first, _, last = ranged.removeprefix("bytes=").partition("-")
                start = int(first)
                end = min(int(last), len(data) - 1) if last else len(data) - 1
                if start >= len(data):
                    if s3:
                        return self._s3_error(416, "InvalidRange", "The requested range is not satisfiable", head)
                    return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                status, body = 206, data[start:end + 1]
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            if head:
                return self._send(status, b"", headers, content_length=len(body))
            if drop_after is not None:
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body[:drop_after])
                self.wfile.flush()
                self.close_connection = True  # the server closes the socket: the client sees a short body
                return
            self._send(status, body, headers)

        def _send(self, status: int, body: bytes, headers: dict[str, str], content_length: int | None = None) -> None:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
            self.end_headers()
            if body:
                self.wfile.write(body)

    return Handler
