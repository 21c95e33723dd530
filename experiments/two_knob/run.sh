#!/usr/bin/env bash
# The two-knob grid on GENERATED heat games: alpha_clip {0.05, 0.1, 0.2} x lam0 {0.05, 0.1, 0.2}, 2 seeds a cell
# (hparams_search=two_knob_grid; machine=cpu). Resumable: run it again after an interruption. Then
#   python experiments/two_knob/summarise.py --storage sqlite:///outputs/optuna/two_knob_grid-alfworld_heat-cpu.db \
#       --study two_knob_grid-alfworld_heat-cpu --out experiments/two_knob
# Side by side on a machine with more cores: add hydra/launcher=submitit_local hydra.sweeper.n_jobs=4
set -euo pipefail
cd "$(dirname "$0")/../.."
python train.py -m hparams_search=two_knob_grid experiment=alfworld_heat machine=cpu "$@"
