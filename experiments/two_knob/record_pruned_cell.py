"""Record the cell that the pre-fix sweeper wrongly marked PRUNED (trial 5, alpha_clip 0.2, lam0 0.05) as a
COMPLETE trial, its value read from its two runs' metrics.csv (the last validation of each), so the study and
its heatmap hold all 9 cells. Run once: `python experiments/two_knob/record_pruned_cell.py`. It applies to that
legacy study database only (outputs/optuna/two_knob_grid-alfworld_heat-cpu.db, never committed and now gone);
since the sweeper's fix (`pruner: null` is a NopPruner) a fresh sweep needs no such repair."""
import os
import sys

import optuna
import pandas as pd

STORAGE = "sqlite:///outputs/optuna/two_knob_grid-alfworld_heat-cpu.db"
STUDY = "two_knob_grid-alfworld_heat-cpu"
METRIC = "val_generated/valid_seen/success"


def main() -> int:
    study = optuna.load_study(study_name=STUDY, storage=STORAGE)
    if any(t.user_attrs.get("recorded_from") == 5 for t in study.trials):
        print("already recorded")
        return 0
    pruned = study.trials[5]
    assert pruned.state == optuna.trial.TrialState.PRUNED, pruned.state
    dirs = pruned.user_attrs["job_dirs"]
    values = [float(pd.read_csv(os.path.join(d, "csv", "version_0", "metrics.csv"))[METRIC].dropna().iloc[-1])
              for d in dirs]
    study.add_trial(optuna.trial.create_trial(
        params=pruned.params, distributions=pruned.distributions, value=sum(values) / len(values),
        user_attrs={"seeds": pruned.user_attrs["seeds"], "seed_values": values, "job_dirs": dirs, "recorded_from": 5}))
    print(f"recorded {pruned.params}: {values} -> {sum(values) / len(values):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
