#!/usr/bin/env bash
# The test command (README, CI): the whole CPU suite; GPU tests are skipped without CUDA.
# Fails loudly before any test runs when an import breaks (a new release of a dependency, a top-level folder
# shadowing an installed package): first the packages the suite needs are imported from the repo root (as
# `python -m pytest` does), then the tests are collected; pytest's own exit status (2 for collection errors,
# 5 for no tests) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -W ignore - <<'PY'   # (megatron's Transformer-Engine warnings are not news here)
import importlib, sys
names = ("torch", "triton", "megatron.core", "diffusers", "transformers", "safetensors", "megatron_qvgen",
         "qvgen_kernels")
versions, failed = [], []
for name in names:
    try:
        module = importlib.import_module(name)
        versions.append(f"{name} {getattr(module, '__version__', '')}".strip())
    except Exception as exc:  # any import failure here is a broken environment, not a test failure
        failed.append(f"  import {name}: {type(exc).__name__}: {exc}")
if failed:
    print("run_tests: the test environment is broken (imports from the repo root):", *failed, sep="\n", file=sys.stderr)
    sys.exit(3)
print("run_tests: " + ", ".join(versions))
PY
collect_log=$(mktemp)
rc=0
python -m pytest tests --collect-only -q -p no:cacheprovider > "$collect_log" 2>&1 || rc=$?
if [ "$rc" -ne 0 ]; then
  tail -n 60 "$collect_log" >&2
  rm -f "$collect_log"
  echo "run_tests: test collection failed (pytest exit $rc); nothing was run" >&2
  exit "$rc"
fi
echo "run_tests: $(tail -n 1 "$collect_log")"
rm -f "$collect_log"
exec python -m pytest tests -q -p no:cacheprovider "$@"
