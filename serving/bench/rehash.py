"""What `serving.fetch --verify` (full mode) costs: the fetcher's own re-hash of a model directory, in MB/s.

The serving pods' init container re-hashes every file against the manifest before the server starts, so its time
is the model's size over this rate. Writes one file of `--size-gb` random bytes into `--dir`, then re-hashes it with
`serving.fetch.manifest.changed_files` (the code `--verify` runs) `--repeat` times: warm (the file in the page
cache: the CPU's sha256 rate) and cold (its pages dropped first with posix_fadvise, so the read comes from the
disk under `--dir`; a cluster volume has its own rate, and the slower of the two sets the pace):

    python -m serving.bench.rehash --size-gb 2 --repeat 3 --json-out rehash.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from serving.fetch.manifest import changed_files

_BLOCK = 64 << 20


def _write(path: Path, size: int) -> str:
    """Write `size` random bytes (one random block repeated) to `path`; return their sha256."""
    block, digest = os.urandom(_BLOCK), hashlib.sha256()
    with open(path, "wb") as out:
        for start in range(0, size, _BLOCK):
            chunk = block[:min(_BLOCK, size - start)]
            out.write(chunk)
            digest.update(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the file is written (default: a temporary directory)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        model = Path(scratch)
        size = int(args.size_gb * 1e9)
        sha256 = _write(model / "model.safetensors", size)
        manifest = {"files": [{"path": "model.safetensors", "size": size, "sha256": sha256}]}
        rows = []
        for cache in ("warm", "cold"):
            for run in range(args.repeat):
                if cache == "cold":
                    _drop_cache(model / "model.safetensors")
                started = time.monotonic()
                assert changed_files(manifest, model) is None
                elapsed = time.monotonic() - started
                rows.append({"cache": cache, "run": run, "gb": size / 1e9, "seconds": elapsed,
                             "mb_per_s": size / 1e6 / elapsed})
    print(f"{'cache':<6} {'run':>3} {'GB':>6} {'s':>7} {'MB/s':>7}")
    for row in rows:
        print(f"{row['cache']:<6} {row['run']:>3} {row['gb']:>6.2f} {row['seconds']:>7.2f} {row['mb_per_s']:>7.0f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                                   "cpus": os.cpu_count(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
