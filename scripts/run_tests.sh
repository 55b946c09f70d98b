#!/usr/bin/env bash
# The test command (README, CI): the whole CPU suite; GPU tests are skipped without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pytest tests -q -p no:cacheprovider "$@"
