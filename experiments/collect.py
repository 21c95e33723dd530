"""Copy finished runs (or a sweep) into a study's committed layout, so that its tables regenerate from the repository.

    python experiments/collect.py 'outputs/study/heat/arms/*' --to experiments/stepopsd_vs_grpo/runs/heat
    python experiments/collect.py --storage sqlite:///outputs/optuna/<study>.db --study <study> \
        --to experiments/two_knob/runs/heat

Each run goes to `<to>/<arm>/seed<k>/` as metrics.csv, config.yaml (resolved), overrides.yaml and choices.yaml
(stepopsd.analysis.collect_run); a sweep's trials' jobs the same way, and the study exported to `<to>/study.json`
(stepopsd.analysis.collect_study). A run collected again is skipped; another run of an arm and seed already
there is refused unless --replace.
"""
from __future__ import annotations

import argparse
import os
import sys

from stepopsd.analysis import collect, collect_study


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="?", help=f"run directories or globs, {os.pathsep!r}-separated")
    ap.add_argument("--storage", help="an Optuna study's storage URL (a sweep): collect its trials' jobs and export it")
    ap.add_argument("--study", help="the study's name (with --storage)")
    ap.add_argument("--to", required=True, help="experiments/<study>/runs/<setting>")
    ap.add_argument("--replace", action="store_true", help="overwrite a committed run of the same arm and seed")
    args = ap.parse_args(argv)
    if bool(args.runs) == bool(args.storage) or bool(args.storage) != bool(args.study):
        ap.error("pass run directories, or --storage and --study")
    if args.storage:
        path = collect_study(args.storage, args.study, args.to, args.replace)
        print(f"study {args.study} exported to {path}")
    else:
        for src, dest in collect(args.runs, args.to, args.replace).items():
            print(f"{src} -> {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
