"""`python -m serving.fetch SOURCE DEST`: fill a model volume once from a pinned source, or verify it.

Runs in a fill Job (or an init container) from the serving image, so serving pods never download weights; the
serving pod's init container runs `--verify`, which needs no network. Light on purpose: no torch, transformers
or HTTP server is imported.

Python API: `fill(source, dest, ...)` and `verify(source, dest)` return a `FillResult` or raise `FetchError`
(`.message`, `.exit_code`). A complete model directory holds `llm-platform-manifest.json` (MANIFEST_NAME).
"""
from serving.fetch.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, FetchError
from serving.fetch.fill import FillResult, fill, verify
from serving.fetch.manifest import MANIFEST_NAME
from serving.fetch.sources import ACCEPTED_FORMS, DEFAULT_EXCLUDES, parse_source

__all__ = ["ACCEPTED_FORMS", "DEFAULT_EXCLUDES", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "MANIFEST_NAME",
           "FetchError", "FillResult", "fill", "parse_source", "verify"]
