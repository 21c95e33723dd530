#!/usr/bin/env bash
# The credit-assignment lab's runs on GENERATED credit games (machine=cpu, env=credit): every arm x seed of one
# setting, PARALLEL runs side by side with one thread each. Usage:
#   experiments/credit_lab/run.sh SETTING [ARM ...]          SETTING: credit_early | credit_spread
#   SEEDS="0 1 2 3" PARALLEL=2 EXTRA="training_steps=30" experiments/credit_lab/run.sh credit_early grpo lr0
# Arms (default: all): grpo rloo gigpo rlsd grpo_opsd stepopsd stepopsd_nobudget stepopsd_gigpo oracle lr0.
# Each finished run is copied into experiments/credit_lab/runs/<setting>/<arm>/seed<k>/ (experiments/collect.py;
# commit them) and skipped when the script runs again: stop it at any point and rerun the same command; only the
# runs in flight (about 3 minutes each) start over. Logs: outputs/credit_lab/<setting>/<arm>/seed<k>.log.
set -euo pipefail
cd "$(dirname "$0")/../.."
setting=${1:?usage: experiments/credit_lab/run.sh credit_early|credit_spread [ARM ...]}
shift
declare -A ARMS=(
  [grpo]="algorithm=grpo" [rloo]="algorithm=rloo" [gigpo]="algorithm=gigpo" [rlsd]="algorithm=rlsd"
  [grpo_opsd]="algorithm=grpo_opsd" [stepopsd]="algorithm=stepopsd"
  [stepopsd_nobudget]="algorithm=stepopsd algorithm.stepopsd.budget_clip=null"
  [stepopsd_gigpo]="algorithm=stepopsd algorithm.base=gigpo" [oracle]="algorithm=oracle"
  [lr0]="algorithm=grpo algorithm.ppo.lr=0")
arms=("$@")
[ ${#arms[@]} -eq 0 ] && arms=(grpo rloo gigpo rlsd grpo_opsd stepopsd stepopsd_nobudget stepopsd_gigpo oracle lr0)
for arm in "${arms[@]}"; do
  [ -n "${ARMS[$arm]:-}" ] || { echo "run.sh: unknown arm '$arm': use ${!ARMS[*]}" >&2; exit 2; }
done
study=experiments/credit_lab
jobs=()
for seed in ${SEEDS:-0 1 2}; do
  for arm in "${arms[@]}"; do
    [ -f "$study/runs/$setting/$arm/seed$seed/metrics.csv" ] || jobs+=("$arm $seed")
  done
done
echo "[generated credit games] $setting: ${#jobs[@]} runs to do, ${PARALLEL:-2} at a time"
run_one() {  # arm seed
  local dir=outputs/credit_lab/$setting/$1/seed$2
  rm -rf "$dir"
  mkdir -p "$(dirname "$dir")"
  # shellcheck disable=SC2086  # the arm's overrides and EXTRA are word lists
  if OMP_NUM_THREADS=1 python train.py experiment="$setting" machine=cpu arm="$1" seed="$2" ${ARMS[$1]} ${EXTRA:-} \
      hydra.run.dir="$dir" > "$dir.log" 2>&1; then
    python experiments/collect.py "$dir" --to "$study/runs/$setting"
  else
    echo "run.sh: $setting $1 seed $2 failed: see $dir.log" >&2
  fi
}
export -f run_one
export setting study EXTRA
export ARMS_DECL="$(declare -p ARMS)"
printf '%s\n' "${jobs[@]}" | xargs -P "${PARALLEL:-2}" -I{} bash -c 'eval "$ARMS_DECL"; run_one {}'
