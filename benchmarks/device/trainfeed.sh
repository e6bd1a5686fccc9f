#!/usr/bin/env bash
# The training-feed benchmark on the lent GPU machine (16 cores, one H100/H200), in ONE device call.
#
# Here, first (PyPI is reachable here, not there):  bash benchmarks/device/wheels.sh
# Then the device tool's run, with the carried wheels (about 25 MB):
#   command: bash benchmarks/device/trainfeed.sh        carry: [".whl"]        timeout_s: 560
# A session has 15 device minutes in all, start-up included (one to two minutes): BUDGET_S (default
# 420 s) bounds the benchmark itself, so that the call ends well inside its limit. Records are written
# as they are measured: a run cut short still brings back what it measured. Arguments after the script
# go to benchmarks.trainfeed (e.g. --sections 2d,train --workers 0,4,16). Back here, copy
# trainfeed.jsonl into docs/device-runs/ (trainfeed-<gpu>-runN.jsonl), and `python -m
# benchmarks.trainfeed --render FILE...` prints the tables for BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench-output/device}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if [ -z "${SKIP_WHEELS:-}" ]; then
    # beside the image's own numpy, tensorstore, h5py, torch, ... (never over them: --no-deps)
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "trainfeed.sh: the carried wheels did not install" >&2; exit 1; }
    export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1 KERAS_BACKEND=torch
"$PYTHON" -c "import torch, service.cli, loaders, benchmarks.trainfeed
print('torch', torch.__version__, '| cuda:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')" \
    || { echo "trainfeed.sh: an import failed (a wheel missing from benchmarks/device/wheels.sh?)" >&2; exit 1; }
started=$(date +%s)
timeout "${BUDGET_S:-420}" "$PYTHON" -m benchmarks.trainfeed --work /tmp/trainfeed --out "$OUT/trainfeed.jsonl" "$@" \
    > "$OUT/log" 2>&1
status=$?
echo "trainfeed: exit $status after $(( $(date +%s) - started )) s (124: stopped at BUDGET_S)"
tail -n 3 "$OUT/log"
[ -s "$OUT/trainfeed.jsonl" ] && "$PYTHON" -m benchmarks.trainfeed --render "$OUT/trainfeed.jsonl"
exit 0
