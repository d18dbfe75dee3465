"""The Hugging Face hub as a model source: list with `HfApi.model_info`, download with httpx (Range resume).

Files are always downloaded at the resolved commit sha, so a branch that moves during a fill cannot mix two
revisions. LFS files are checked against their sha256, other files against their git blob sha1.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx

from serving.fetch.credentials import HF_TOKEN, Credentials
from serving.fetch.errors import FetchError, TransientError
from serving.fetch.sources import HfSource, Listing, RemoteFile, content_range_start

DEFAULT_ENDPOINT = "https://huggingface.co"
_TIMEOUT = httpx.Timeout(30.0, read=120.0)


@dataclass
class _HttpBody:
    response: httpx.Response
    start: int
    skip_checks: frozenset[str] = frozenset()

    def chunks(self) -> Iterator[bytes]:
        try:
            # No chunk_size: httpx would hold bytes back to fill a chunk, and lose them when the connection drops.
            yield from self.response.iter_bytes()
        except httpx.TransportError as exc:
            raise TransientError(f"connection lost: {exc}") from exc


class HubStore:
    def __init__(self, source: HfSource, credentials: Credentials, *, endpoint: str | None = None) -> None:
        self.source = source
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        self.credentials = credentials
        self.token = credentials.get(HF_TOKEN)
        # identity: a compressed body would make byte offsets (Range) and Content-Length mean something else.
        headers = {"Accept-Encoding": "identity", "User-Agent": "llm-platform-serving-fetch"}
        # httpx drops Authorization when a redirect leaves the hub's origin (LFS files are served by a CDN).
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self._client = httpx.Client(follow_redirects=True, timeout=_TIMEOUT, headers=headers)

    def close(self) -> None:
        self._client.close()

    def list(self) -> Listing:
        import httpx2  # huggingface_hub 2.x's HTTP client: its connection errors are worth a retry
        from huggingface_hub import HfApi, hf_hub_url
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        repo_id, revision, uri = self.source.repo_id, self.source.revision, self.source.uri
        api = HfApi(endpoint=self.endpoint, token=self.token or False)
        try:
            with _hub_settings():
                info = api.model_info(repo_id, revision=revision, files_metadata=True)
        except GatedRepoError:
            raise FetchError(f"{uri}: {repo_id} is gated on {self.endpoint}: {self._access_hint()}") from None
        except RevisionNotFoundError:
            raise FetchError(f"{uri}: revision '{revision}' not found in {repo_id} on {self.endpoint}; use a branch, "
                             "tag or 40-hex commit sha that exists") from None
        except RepositoryNotFoundError:
            hint = (f"check that the account of {self.credentials.origin(HF_TOKEN)} can read it" if self.token
                    else f"if it is private, {self.credentials.how_to_set(HF_TOKEN)}")
            raise FetchError(f"{uri}: repository {repo_id} not found on {self.endpoint}; check the name, or "
                             f"{hint}") from None
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status is None or status >= 500 or status == 429:
                raise TransientError(f"listing {repo_id}: HTTP {status}") from exc
            raise FetchError(f"{uri}: the hub refused the listing (HTTP {status}: {_first_line(exc)})") from None
        except httpx2.TransportError as exc:
            raise TransientError(f"cannot reach {self.endpoint}: {type(exc).__name__}: {exc}") from exc
        if not info.sha or info.siblings is None:
            raise FetchError(f"{uri}: the hub's answer has no commit sha or file list; is HF_ENDPOINT "
                             f"({self.endpoint}) a Hugging Face hub?")
        files = []
        for sibling in info.siblings:
            size = sibling.lfs.size if sibling.lfs else sibling.size
            if size is None:
                raise FetchError(f"{uri}: the hub listed {sibling.rfilename} without its size; is HF_ENDPOINT "
                                 f"({self.endpoint}) a Hugging Face hub?")
            if sibling.lfs:
                checks = {"sha256": sibling.lfs.sha256}
            else:
                checks = {"git-sha1": sibling.blob_id} if sibling.blob_id else {}
            url = hf_hub_url(repo_id, sibling.rfilename, revision=info.sha, endpoint=self.endpoint)
            files.append(RemoteFile(sibling.rfilename, size, url, checks))
        return Listing(info.sha, tuple(files))

    @contextmanager
    def open(self, file: RemoteFile, offset: int) -> Iterator[_HttpBody]:
        try:
            with self._client.stream("GET", file.location, headers=_range(offset)) as response:
                if response.status_code == 416 and offset:
                    # The bytes we hold are longer than the file: start again from zero.
                    response.close()
                    with self._client.stream("GET", file.location) as whole:
                        yield self._body(file, whole, 0)
                    return
                yield self._body(file, response, offset)
        except httpx.TransportError as exc:
            raise TransientError(f"connection failed: {type(exc).__name__}: {exc}") from exc

    def _body(self, file: RemoteFile, response: httpx.Response, offset: int) -> _HttpBody:
        status = response.status_code
        if status == 206:
            return _HttpBody(response, content_range_start(response.headers.get("Content-Range")))
        if status == 200:
            return _HttpBody(response, 0)
        where = f"{self.source.uri}: {file.path}"
        if status in (401, 403):
            raise FetchError(f"{where}: download refused (HTTP {status}): the repository is private or gated; "
                             f"{self._access_hint()}")
        if status == 404:
            raise FetchError(f"{where}: not found at commit {self.source.revision} (HTTP 404) although the hub "
                             "listed it; run the fill again")
        if status >= 500 or status in (408, 429):
            raise TransientError(f"HTTP {status} from {response.url.host}")
        raise FetchError(f"{where}: unexpected HTTP {status} from {response.url}")


    def _access_hint(self) -> str:
        if self.token:
            return (f"{self.credentials.origin(HF_TOKEN)} was refused: accept the model's licence on the hub with "
                    "that token's account, or use a token with read access")
        return (f"no HF_TOKEN was given: {self.credentials.how_to_set(HF_TOKEN)}, from an account that accepted "
                "the model's licence on the hub")


def _range(offset: int) -> dict[str, str]:
    return {"Range": f"bytes={offset}-"} if offset else {}


def _first_line(exc: Exception) -> str:
    return next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


@contextmanager
def _hub_settings() -> Iterator[None]:
    """Online, without telemetry, whatever the environment says (huggingface_hub reads it once, at import).

    The serving image sets HF_HUB_OFFLINE=1 so that the server never reaches the hub; the fetcher, running from the
    same image, is the one process whose job is to reach it. Telemetry off: otherwise huggingface_hub 2.x fetches
    `/api/agent-harnesses` while building its User-Agent, a request the listing does not need.
    """
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_TELEMETRY
    constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_TELEMETRY = False, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_TELEMETRY = saved
