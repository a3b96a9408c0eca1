#!/usr/bin/env bash
# One call on a GPU machine, from the repository root, with the machine's own python3:
#   bash bench/gpu_suite.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec python3 -m bench.gpu_suite ${1:+--out "$1"}
