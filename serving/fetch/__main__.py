"""`python -m serving.fetch [--verify] [--verify-mode full|size-only] [--require-pinned] [--require-checksums]
[--keep-revisions N] [--retries N] [--exclude GLOB ...] SOURCE DEST`.

Two options may also come from the environment, for the platform to set per stack: FILL_VERIFY_MODE (full or
size-only; the flag wins) and FILL_REQUIRE_CHECKSUMS (true/false, 1/0, yes/no; the flag turns it on).

Exit codes: 0 filled, already filled or verified; 1 failure (download, checksum, verification); 2 bad usage or a
refused source. Every failure is one line on stderr that says what is wrong and what to do; progress lines go to
stderr too (stdout stays empty).

Credentials: HF_TOKEN for the hub; AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) for S3, each
read from a file of that name in $MODEL_SOURCE_CREDENTIALS_DIR (the fill's Secret, mounted by the platform) or else
from the environment; without keys, S3 uses boto3's chain (a workload role). Endpoints: HF_ENDPOINT;
AWS_ENDPOINT_URL_S3 and AWS_REGION (or AWS_DEFAULT_REGION, default us-east-1).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn, cast

from serving.fetch.errors import EXIT_OK, EXIT_USAGE, FetchError
from serving.fetch.fill import DEFAULT_RETRIES, fill, verify
from serving.fetch.manifest import VERIFY_MODES, VerifyMode
from serving.fetch.sources import ACCEPTED_FORMS, DEFAULT_EXCLUDES

PROG = "serving.fetch"
VERIFY_MODE_ENV = "FILL_VERIFY_MODE"
REQUIRE_CHECKSUMS_ENV = "FILL_REQUIRE_CHECKSUMS"
_BOOLEANS = {"1": "true", "true": "true", "yes": "true", "0": "false", "false": "false", "no": "false"}


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (like every other failure) with exit code 2."""

    def error(self, message: str) -> NoReturn:
        usage = " ".join(self.format_usage().split()).removeprefix("usage: ")
        raise FetchError(f"{message} (usage: {usage})", EXIT_USAGE)


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="python -m serving.fetch", description="Fill DEST once from SOURCE (a model "
                            "volume, so serving pods never download weights), or --verify it. Exit codes: 0 ok, "
                            "1 failure, 2 bad usage or refused source.")
    parser.add_argument("source", metavar="SOURCE", help=f"where the model comes from: {ACCEPTED_FORMS}")
    parser.add_argument("dest", metavar="DEST", help="the revision-specific model directory, e.g. "
                                                     "/models/llama-3.1-8b/0e9e39f249a1")
    parser.add_argument("--verify", action="store_true",
                        help="only check that DEST holds a complete, unchanged model for SOURCE (no network)")
    parser.add_argument("--verify-mode", choices=VERIFY_MODES, default=None,
                        help=f"how --verify, and a fill that finds DEST already filled, check DEST against its "
                             f"manifest: full re-hashes every file (reads the whole model), size-only checks that "
                             f"every file is there at its size (default: ${VERIFY_MODE_ENV}, else full)")
    parser.add_argument("--require-pinned", action="store_true",
                        help="refuse a source whose content can change (an hf:// branch or tag)")
    parser.add_argument("--require-checksums", action="store_true",
                        help="refuse the fill, before downloading, when a file has no checksum it can check (an "
                             "S3 multipart upload with neither an S3 checksum nor a SHA256SUMS line), instead of "
                             f"filling it checked by size only (default: ${REQUIRE_CHECKSUMS_ENV}, else off)")
    parser.add_argument("--keep-revisions", type=_count, default=0, metavar="N",
                        help="after the fill, keep DEST and the N-1 most recent other fills of the same model "
                             "beside it (0: keep all); another model's fills are never pruned")
    parser.add_argument("--retries", type=_count, default=DEFAULT_RETRIES, metavar="N",
                        help=f"retries per file after a dropped connection (default {DEFAULT_RETRIES})")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                        help=f"skip files whose path matches GLOB (repeatable; always skipped: "
                             f"{', '.join(DEFAULT_EXCLUDES)}, and *.bin beside *.safetensors)")
    return parser


def main(argv: list[str] | None = None) -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    logger = logging.getLogger(PROG)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        return _run(build_parser(), argv)
    finally:  # as it was: main() may run inside a process that logs on (tests, a caller's own logging)
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    try:
        args = parser.parse_args(argv)
        # Both the flag's choices and the variable's allowed values are VERIFY_MODES.
        mode = cast(VerifyMode, args.verify_mode or _from_env(VERIFY_MODE_ENV, VERIFY_MODES, "full",
                                                              "--verify-mode"))
        require_checksums = args.require_checksums or _BOOLEANS.get(
            _from_env(REQUIRE_CHECKSUMS_ENV, tuple(_BOOLEANS), "false", "--require-checksums")) == "true"
        if args.verify:
            verify(args.source, args.dest, require_pinned=args.require_pinned, mode=mode)
        else:
            fill(args.source, args.dest, require_pinned=args.require_pinned, keep_revisions=args.keep_revisions,
                 retries=args.retries, excludes=args.exclude, verify_mode=mode, require_checksums=require_checksums)
    except FetchError as exc:
        print(f"{PROG}: {exc.message}", file=sys.stderr)
        return exc.exit_code
    return EXIT_OK


def _from_env(name: str, allowed: tuple[str, ...], default: str, flag: str) -> str:
    """The value of environment variable `name` (unset or empty: `default`); anything else is a usage error."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if value.lower() not in allowed:
        raise FetchError(f"{name}={value!r} is not one of {', '.join(allowed)}; fix the environment, or pass {flag}",
                         EXIT_USAGE)
    return value.lower()


if __name__ == "__main__":
    sys.exit(main())
