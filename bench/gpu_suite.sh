#!/usr/bin/env bash
# One call on a GPU machine, from the repository root, with the machine's own python3:
#   bash bench/gpu_suite.sh [OUT_DIR] [--budget SECONDS] [--skip-tests]
# (--budget: the whole suite's wall-clock seconds, default 540; keep it under the device call's limit)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out=()
if [[ $# -gt 0 && $1 != --* ]]; then out=(--out "$1"); shift; fi
exec python3 -m bench.gpu_suite ${out[@]+"${out[@]}"} "$@"  # (the empty-array form bash < 4.4 accepts under set -u)
