#!/usr/bin/env bash
# The two-knob grid on GENERATED heat games: alpha_clip {0.05, 0.1, 0.2} x lam0 {0.05, 0.1, 0.2}, 2 seeds a cell
# (hparams_search=two_knob_grid; machine=cpu). Resumable: run it again after an interruption. Each time the sweep
# ends, its trials' runs are copied into experiments/two_knob/runs/heat/<arm>/seed<k>/ and the study exported to
# experiments/two_knob/runs/heat/study.json (experiments/collect.py; commit them), and the table, heatmap and
# README block are regenerated from there:
#   python experiments/two_knob/summarise.py --readme
# Side by side on a machine with more cores: add hydra/launcher=submitit_local hydra.sweeper.n_jobs=4
# (STUDY: the sweeper's study name, <hparams_search>-<experiment>-<machine>, if overrides change it)
set -euo pipefail
cd "$(dirname "$0")/../.."
study=${STUDY:-two_knob_grid-alfworld_heat-cpu}
python train.py -m hparams_search=two_knob_grid experiment=alfworld_heat machine=cpu "$@"
python experiments/collect.py --storage "sqlite:///outputs/optuna/$study.db" --study "$study" --to experiments/two_knob/runs/heat
python experiments/two_knob/summarise.py --readme
