"""How a fetch goes wrong: for good (`FetchError`: one line for the operator and an exit code) or for now."""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # download, checksum or verification failure: fixing the source or the volume and rerunning helps
EXIT_USAGE = 2  # bad arguments or a refused source: rerunning the same command never helps


class FetchError(Exception):
    """A failure the operator must act on: `message` says what is wrong and what to do."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class TransientError(Exception):
    """A dropped connection, a timeout or a 5xx: worth retrying, resuming from the bytes already written."""
