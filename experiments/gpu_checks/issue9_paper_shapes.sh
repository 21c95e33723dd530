#!/usr/bin/env bash
# Prepared GPU check for issue 9 (items 7-8), to run as ONE device call from the repository root:
#   bash experiments/gpu_checks/issue9_paper_shapes.sh        # writes into $OUT (default ./gpu_out)
# 1. train_step_memory.py at the paper shapes (256 rows x 2048 + 512 tokens) for Qwen3-1.7B and
#    Qwen2.5-3B built with random weights (no hub on the device machine), the trainer's row-wise recomputed
#    log-prob/entropy head against the plain one (--head both);
# 2. the main job's paper configuration (model.init=random, bf16-mixed, fp32 master weights, micro-batches,
#    gradient checkpointing) for 2 training steps at full batch shapes (16 tasks x group 8) on GENERATED heat
#    games, env steps capped at 5 so that the rollout of a random-weight model (512-token responses) fits.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
python -m pip install --no-deps -e . >"$OUT/pip.log" 2>&1 || export PYTHONPATH=$PWD
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
timeout 300 python experiments/benchmarks/train_step_memory.py --device cuda --no-shrink --rows 256 --prompt 2048 \
  --response 512 --peer 512 --micro 8 16 --teacher-micro 16 --checkpointing on --head both --peak-tflops 989 \
  >"$OUT/train_step_memory.md" 2>&1
timeout 240 python train.py experiment=alfworld_heat model.init=random training_steps=2 val_every=2 val_tasks=4 \
  env.max_steps=5 rollout.generate_batch_size=128 data.path=data/generated/gpu-heat \
  'data.generate={seed: 0, train_per_type: 16, valid_per_type: 4}' 'data.val_splits=[valid_seen]' \
  hydra.run.dir="$OUT/run" >"$OUT/train.log" 2>&1
echo "exit $?" >>"$OUT/train.log"
python - "$OUT" <<'PY' >"$OUT/summary.txt" 2>&1
import csv, glob, sys
for f in glob.glob(f"{sys.argv[1]}/run/csv/version_0/metrics.csv"):
    for r in csv.DictReader(open(f)):
        if r.get("actor/pg_loss"):
            print({k: r[k] for k in ("train_step", "actor/rollout_logp_gap", "time/rollout_s", "time/rescore_s",
                                     "time/update_s", "actor/grad_norm", "perf/update_peak_gpu_gb") if k in r})
PY
