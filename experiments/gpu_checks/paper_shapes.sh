#!/usr/bin/env bash
# The GPU check of issue 19 (item 6) as ONE device call, from the repository root:
#   bash experiments/gpu_checks/paper_shapes.sh              # results in $OUT (default ./gpu_out)
#   bash experiments/gpu_checks/paper_shapes.sh --dry-run    # CPU, shrunken model, nothing installed (CI)
# Time by construction: BUDGET seconds (default 450) for everything after nvidia-smi: the install step has a hard
# limit (PIP_LIMIT, default 120 s, `timeout -k 10`), and the Python driver gets what is left, starts each phase only
# when the time left covers it and caps it with `timeout -k 10` (experiments/gpu_checks/paper_shapes.py): the call
# ends within BUDGET + ~15 s, under 8 minutes. Every result is one JSON line flushed to $OUT/results.jsonl at once.
# Installs only what the image lacks (pinned versions from pyproject.toml), never torch (kept and recorded); no hub.
set -uo pipefail
START=$SECONDS
OUT=${OUT:-gpu_out}
BUDGET=${BUDGET:-450}
PIP_LIMIT=${PIP_LIMIT:-120}
PY=${PYTHON:-python}
CHECK=experiments/gpu_checks/paper_shapes.py
DRY=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && DRY=1; done
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
timeout 20 nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true

reqs=$($PY "$CHECK" --missing 2>>"$OUT/pip.log")
echo "missing: ${reqs:-none}" >>"$OUT/pip.log"
if [ -n "$reqs" ] && [ "$DRY" = 0 ]; then
  torch_pin="torch==$($PY -c 'import importlib.metadata as m; print(m.version("torch"))')"
  echo "$torch_pin" >"$OUT/constraints.txt"  # pip may not touch the image's torch
  # shellcheck disable=SC2086
  timeout -k 10 "$PIP_LIMIT" $PY -m pip install --progress-bar off -c "$OUT/constraints.txt" $reqs >>"$OUT/pip.log" 2>&1
  echo "pip exit $?" >>"$OUT/pip.log"
fi

left=$((BUDGET - (SECONDS - START)))
$PY "$CHECK" --out "$OUT" --budget "$left" "$@"
echo "total ${SECONDS}s (budget ${BUDGET}s)" | tee -a "$OUT/summary.md"
