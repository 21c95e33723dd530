#!/usr/bin/env bash
# The StepOPSD-vs-GRPO study at equal budget on GENERATED games (machine=cpu: same steps, tasks, group and
# validation in every arm; seeds paired across arms). Three arms: grpo, stepopsd, stepopsd with the per-step
# budget off (budget_clip=null, spec §10). Usage: experiments/stepopsd_vs_grpo/run.sh [TASK ...] (default: heat pick_two)
# Seeds: SEEDS=0,1,2 (default); fix the count before running (README: the seeds a 0.05 difference needs).
# Runs go to outputs/study/<task>/{arms,budget_off}-seeds<SEEDS>/<job>/; each finished multirun is copied into
# experiments/stepopsd_vs_grpo/runs/<task>/<arm>/seed<k>/ (experiments/collect.py: metrics.csv, resolved config,
# overrides, choices; commit them), and the tables, figures and README blocks are regenerated from there:
#   python experiments/stepopsd_vs_grpo/summarise.py --readme
set -euo pipefail
cd "$(dirname "$0")/../.."
seeds=${SEEDS:-0,1,2}
tag=seeds${seeds//,/_}
study=experiments/stepopsd_vs_grpo
# pick_two: a warm start whose demonstrations show recovery from "Nothing happens." (model.sft.demo_repeat), and a
# second validation split, 16 of the training games, because valid_seen stays at the floor at this scale (README)
extra_pick_two=(model.sft.demo_repeat=0.3 "data.val_splits=[valid_seen,train]")
for task in "${@:-heat pick_two}"; do
  for t in $task; do
    extra_name="extra_$t[@]"
    extra=("${!extra_name}")
    python train.py -m experiment=alfworld_$t machine=cpu algorithm=grpo,stepopsd seed=$seeds "${extra[@]}" \
        hydra.sweep.dir=outputs/study/$t/arms-$tag
    python experiments/collect.py "outputs/study/$t/arms-$tag/*" --to $study/runs/$t
    python train.py -m experiment=alfworld_$t machine=cpu algorithm=stepopsd algorithm.stepopsd.budget_clip=null \
        seed=$seeds "${extra[@]}" hydra.sweep.dir=outputs/study/$t/budget_off-$tag
    python experiments/collect.py "outputs/study/$t/budget_off-$tag/*" --to $study/runs/$t
  done
done
python $study/summarise.py --readme
