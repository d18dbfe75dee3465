#!/usr/bin/env bash
# Prepare the GPU session's carry folder `.gpu-session/` (git-ignored) on the development machine, which can reach
# PyPI: the serving image's Python packages as wheels for the GPU machine's Python (3.12, x86-64; it has torch and
# numpy but not FastAPI, uvicorn or pydantic), and the shared baseline script (../shared does not travel).
# Then run `bash serving/bench/gpu_session.sh` there, carrying `.gpu-session` (see docs/BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=.gpu-session
pip=${PIP:-python3 -m pip}
target=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
rm -rf "$dest" && mkdir -p "$dest/wheels"
# accelerate without its dependencies (they would bring a second torch); boto3 only serves the model fill.
grep -vE '^(accelerate|boto3)==' serving/requirements.txt > "$dest/requirements.txt"
$pip download -q --dest "$dest/wheels" "${target[@]}" -r "$dest/requirements.txt"
$pip download -q --dest "$dest/wheels" "${target[@]}" --no-deps "$(grep -E '^accelerate==' serving/requirements.txt)"
rm -f "$dest"/wheels/numpy-*.whl  # the GPU machine's torch was built against its own numpy
cp ../shared/bench/h100_baselines.py "$dest/"
# The engine before the paged KV cache, for gpu_session.sh's old-against-new comparison (stage paged-kv-old).
mkdir -p "$dest/base" && git archive "${PAGED_KV_BASE:-5f72b6e}" serving | tar -x -C "$dest/base"
du -sh "$dest"
