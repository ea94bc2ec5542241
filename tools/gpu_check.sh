#!/usr/bin/env bash
# The GPU check in one command (docs/gpu.md; harness/gpu_check.py says what it measures):
#
#   tools/gpu_check.sh [--pack ARCHIVE] [--backend cuda|vulkan|cpu] [--shape reference|tiny] [--out DIR] ...
#
# --pack: the archive of `python -m harness pack`, for a node without internet or package registry: it is
# unpacked under /tmp and gives the build its llama.cpp source (FQ_LLAMA_CPP_SDIST) and Python the pure-Python
# packages the node lacks (PYTHONPATH). Results go to --out (default $OUT, else ./gpu-check-out):
# gpu_check.json (rewritten after every step), gpu_check.log, bench.json, archs-*.md.
# $PYTHON picks the interpreter (default python3), $FQ_UNPACK_DIR where the pack goes (default a new
# /tmp/fq-offline.*). Exit 0 when every step succeeded.
set -euo pipefail
project=$(cd "$(dirname "$0")/.." && pwd)
pack=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --pack) pack="$2"; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
if [ -n "$pack" ]; then
    [ -f "$pack" ] || { echo "error: --pack $pack: no such file" >&2; exit 2; }
    unpacked=${FQ_UNPACK_DIR:-$(mktemp -d /tmp/fq-offline.XXXXXX)}
    mkdir -p "$unpacked"
    tar xzf "$pack" -C "$unpacked"
    export FQ_LLAMA_CPP_SDIST="$unpacked/ffn-fake-quant-offline/llama.cpp"
    export PYTHONPATH="$unpacked/ffn-fake-quant-offline/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$project${PYTHONPATH:+:$PYTHONPATH}"
cd "$project"
exec "${PYTHON:-python3}" -m harness.gpu_check "${args[@]}"
