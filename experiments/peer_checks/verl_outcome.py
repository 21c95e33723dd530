"""Peer check: our outcome-level advantage estimators vs volcengine/verl's reference implementations.

Run on demand (not part of any test tier):

    python experiments/peer_checks/verl_outcome.py [--scratch PATH] [--seeds 5] [--batches 40]

What it does
* installs verl==0.9.1 with `pip install --no-deps --target <scratch>` if it is not there yet
  (default scratch: experiments/peer_checks/.scratch/, gitignored), plus the light pure-Python
  import-time dependencies listed in LIGHT_DEPS, and puts the scratch first on sys.path;
* imports `verl.trainer.ppo.core_algos`. Its package import chain pulls in ray (verl/protocol.py) and
  tensordict (a compiled extension pinned to older torch releases); those are NOT installed: any
  import-time module that is still missing is replaced by an empty stub module, the stubs are listed
  in the output, and the script checks that none of the three compared functions reaches a stubbed
  name (the functions only use torch, numpy and collections.defaultdict);
* for many random batches compares, on the first response token of verl's [B, T] output,
    - ours group_advantages(scale_by_std=True)  vs verl compute_grpo_outcome_advantage(norm_adv_by_std_in_grpo=True)
    - ours group_advantages(scale_by_std=False) vs verl compute_grpo_outcome_advantage(norm_adv_by_std_in_grpo=False)
    - ours rloo_advantages                      vs verl compute_rloo_outcome_advantage
  and reports the worst absolute and relative error (relative to max(|ref|, 1e-6)) separately for
  rows of regular groups (>= 2 members, not all equal), uniform groups (>= 2 members, all equal) and
  singleton groups (1 member: a documented difference, verl returns the raw score, we return 0);
* prints a table and writes it as JSON lines to experiments/peer_checks/results/verl_outcome.json
  (first line: run metadata; then one line per table row).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import types
from importlib.machinery import ModuleSpec
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
VERL_VERSION = "0.9.1"
# import-time dependencies of verl's package chain that are light, pure Python: installed with --no-deps
LIGHT_DEPS = {"codetiming": "codetiming"}
# import-time dependencies that are heavy or compiled: never installed, stubbed if missing
HEAVY_DEPS = ("ray", "tensordict", "vllm", "sglang", "flash_attn", "deepspeed", "megatron")
ESTIMATORS = ("grpo", "drgrpo", "rloo")
CATEGORIES = ("regular", "uniform", "singleton")


# ----------------------------------------------------------------------------------------------
# installing and importing verl
# ----------------------------------------------------------------------------------------------
def _pip_target(scratch: Path, spec: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--target", str(scratch), spec]
    print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True)


def ensure_verl(scratch: Path) -> None:
    scratch.mkdir(parents=True, exist_ok=True)
    if not (scratch / f"verl-{VERL_VERSION}.dist-info").is_dir():
        _pip_target(scratch, f"verl=={VERL_VERSION}")
    for module, dist in LIGHT_DEPS.items():
        if importlib.util.find_spec(module) is None and not (scratch / module).exists():
            _pip_target(scratch, dist)
    if str(scratch) not in sys.path:
        sys.path.insert(0, str(scratch))


class _Stub(types.ModuleType):
    """An empty module: any attribute is a do-nothing class (usable as decorator, base class or call)."""

    __stub__ = True

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {"__init__": lambda self, *a, **k: None,
                                "__call__": lambda self, *a, **k: (a[0] if len(a) == 1 and callable(a[0]) else self),
                                "__stub__": True})
        setattr(self, name, value)
        return value


def _install_stub(name: str) -> None:
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sub = ".".join(parts[:i])
        if sub not in sys.modules:
            mod = _Stub(sub)
            mod.__path__ = []
            mod.__spec__ = ModuleSpec(sub, None, is_package=True)
            sys.modules[sub] = mod
            if i > 1:
                setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], mod)


def import_core_algos(max_tries: int = 50):
    """Import verl.trainer.ppo.core_algos, stubbing missing import-time modules. Returns (module, stubbed names)."""
    stubbed: list[str] = []
    for _ in range(max_tries):
        try:
            return importlib.import_module("verl.trainer.ppo.core_algos"), stubbed
        except ModuleNotFoundError as err:
            name = err.name
            if not name or name == "verl" or name.startswith("verl.") or name in sys.modules:
                raise
            for key in [k for k in sys.modules if k == "verl" or k.startswith("verl.")]:
                del sys.modules[key]  # start the verl chain again with the stub in place
            _install_stub(name)
            stubbed.append(name)
    raise RuntimeError(f"verl import still failing after stubbing {stubbed}")


def _names_reached(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names_reached(const)
    return names


def check_no_stub_used(fn) -> list[str]:
    """Global names the function reaches that resolve to a stub (should be empty)."""
    bad = []
    for name in sorted(_names_reached(fn.__code__)):
        obj = fn.__globals__.get(name)
        if obj is not None and (getattr(obj, "__stub__", False) or isinstance(obj, _Stub)):
            bad.append(name)
    return bad


# ----------------------------------------------------------------------------------------------
# random batches
# ----------------------------------------------------------------------------------------------
def random_batch(rng, torch, np, dtype):
    """One batch: rewards [N], integer group ids [N] (shuffled, non-contiguous), per-row category,
    verl inputs token_level_rewards [N, T], response_mask [N, T] (reward on the last valid token)."""
    n_groups = int(rng.integers(1, 17))
    kind = rng.choice(["binary", "continuous", "mixed"])
    rewards, gids, cats = [], [], []
    ids = rng.choice(10_000, size=n_groups, replace=False)
    for g in range(n_groups):
        size = 1 if rng.random() < 0.1 else int(rng.integers(2, 9))  # 2..8, some singletons
        binary = kind == "binary" or (kind == "mixed" and rng.random() < 0.5)
        if binary:
            r = rng.integers(0, 2, size=size).astype(np.float64)
        else:
            r = rng.normal(loc=rng.normal(), scale=10 ** rng.uniform(-2, 1), size=size)
        if size > 1 and rng.random() < 0.2:  # force a uniform group
            r[:] = r[0]
        r = r.astype(np.float32 if dtype == torch.float32 else np.float64)
        if size == 1:
            cat = "singleton"
        elif np.all(r == r[0]):
            cat = "uniform"
        else:
            cat = "regular"
        rewards.extend(r.tolist())
        gids.extend([int(ids[g])] * size)
        cats.extend([cat] * size)
    perm = rng.permutation(len(rewards))
    rewards = torch.tensor([rewards[i] for i in perm], dtype=dtype)
    gids_np = np.array([gids[i] for i in perm], dtype=np.int64)
    cats = [cats[i] for i in perm]
    n, t = len(rewards), int(rng.integers(1, 7))
    lengths = rng.integers(1, t + 1, size=n)
    mask = torch.zeros(n, t, dtype=dtype)
    tok = torch.zeros(n, t, dtype=dtype)
    for i in range(n):
        mask[i, : lengths[i]] = 1
        tok[i, lengths[i] - 1] = rewards[i]
    return rewards, gids_np, cats, tok, mask


def run_checks(core, torch, np, seeds: int, batches: int):
    from stepopsd.algorithms.grpo import group_advantages
    from stepopsd.estimators.rloo import rloo_advantages

    ours = {
        "grpo": lambda r, g: group_advantages(r, g, scale_by_std=True),
        "drgrpo": lambda r, g: group_advantages(r, g, scale_by_std=False),
        "rloo": lambda r, g: rloo_advantages(r, g),
    }
    ref = {
        "grpo": lambda tok, m, idx: core.compute_grpo_outcome_advantage(tok, m, idx, epsilon=1e-6,
                                                                         norm_adv_by_std_in_grpo=True)[0],
        "drgrpo": lambda tok, m, idx: core.compute_grpo_outcome_advantage(tok, m, idx, epsilon=1e-6,
                                                                           norm_adv_by_std_in_grpo=False)[0],
        "rloo": lambda tok, m, idx: core.compute_rloo_outcome_advantage(tok, m, idx, epsilon=1e-6)[0],
    }
    stats = {}
    for dtype in (torch.float32, torch.float64):
        dname = str(dtype).replace("torch.", "")
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            for _ in range(batches):
                rewards, gids, cats, tok, mask = random_batch(rng, torch, np, dtype)
                for est in ESTIMATORS:
                    a = ours[est](rewards.clone(), torch.from_numpy(gids)).to(torch.float64)
                    full = ref[est](tok.clone(), mask.clone(), gids)  # [N, T]
                    b = full[:, 0].to(torch.float64)  # first response token (always inside the mask)
                    abs_err = (a - b).abs()
                    rel_err = abs_err / b.abs().clamp(min=1e-6)
                    # verl again on the same inputs in float64: separates verl's own float32 rounding from a difference
                    b64 = ref[est](tok.clone().double(), mask.clone().double(), gids)[:, 0]
                    abs_err64 = (a - b64).abs()
                    for cat in CATEGORIES:
                        sel = torch.tensor([c == cat for c in cats], dtype=torch.bool)
                        key = (est, dname, cat)
                        s = stats.setdefault(key, {"batches": 0, "rows": 0, "max_abs": 0.0, "max_rel": 0.0,
                                                   "ours_max_abs": 0.0, "max_abs_vs_f64": 0.0,
                                                   "ref_equals_raw_score": True})
                        if not bool(sel.any()):
                            continue
                        s["batches"] += 1
                        s["rows"] += int(sel.sum())
                        s["max_abs"] = max(s["max_abs"], float(abs_err[sel].max()))
                        s["max_rel"] = max(s["max_rel"], float(rel_err[sel].max()))
                        s["ours_max_abs"] = max(s["ours_max_abs"], float(a[sel].abs().max()))
                        s["max_abs_vs_f64"] = max(s["max_abs_vs_f64"], float(abs_err64[sel].max()))
                        if cat == "singleton":  # verl: (R - 0) / (1 + eps) for GRPO, R for Dr.GRPO and RLOO
                            raw = rewards.to(torch.float64)[sel] / (1 + 1e-6 if est == "grpo" else 1)
                            s["ref_equals_raw_score"] &= bool(torch.allclose(b[sel], raw, rtol=1e-6, atol=0))
    return stats


# ----------------------------------------------------------------------------------------------
def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"uname_m": platform.machine(), "cpu": cpu, "git_commit": commit}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scratch", type=Path, default=HERE / ".scratch", help="where verl is pip-installed (--target)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=40, help="random batches per seed and dtype")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "verl_outcome.json")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(REPO))
    os.environ.setdefault("VERL_LOGGING_LEVEL", "WARN")
    ensure_verl(args.scratch.resolve())
    import numpy as np
    import torch

    torch.set_num_threads(1)
    core, stubbed = import_core_algos()
    import verl

    verl_version = getattr(verl, "__version__", None) or VERL_VERSION
    fns = [core.compute_grpo_outcome_advantage, core.compute_rloo_outcome_advantage]
    leaks = {fn.__name__: check_no_stub_used(fn) for fn in fns}
    if any(leaks.values()):
        raise RuntimeError(f"a compared verl function reaches a stubbed name: {leaks}")
    if stubbed:
        heavy = [s for s in stubbed if s.split(".")[0] in HEAVY_DEPS]
        other = [s for s in stubbed if s not in heavy]
        print(f"note: verl's import chain needs modules not installed here; stubbed (empty modules, not used by "
              f"the compared functions - checked): {', '.join(stubbed)}"
              + (f" [not in the known heavy list: {', '.join(other)}]" if other else ""))
    print(f"verl {verl_version} from {Path(core.__file__).resolve()}")

    stats = run_checks(core, torch, np, args.seeds, args.batches)

    meta = {"kind": "meta", "verl_version": verl_version, "torch_version": torch.__version__,
            "numpy_version": np.__version__, "python": platform.python_version(), **machine_info(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO)]
                                               + (sys.argv[1:] if argv is None else list(argv))),
            "seeds": args.seeds, "batches_per_seed_and_dtype": args.batches, "stubbed_modules": stubbed,
            "relative_error": "|ours - verl| / max(|verl|, 1e-6), verl's first response token",
            "max_abs_err_vs_verl_in_float64": "ours (at the batch dtype) vs verl run on the same inputs upcast to "
                                              "float64: isolates verl's float32 rounding",
            "singleton_note": "intended difference: verl returns the raw score for a 1-member group "
                              "(mean 0, std 1), ours returns 0"}
    pairs = {"grpo": "group_advantages(scale_by_std=True) vs compute_grpo_outcome_advantage(norm_adv_by_std_in_grpo=True)",
             "drgrpo": "group_advantages(scale_by_std=False) vs compute_grpo_outcome_advantage(norm_adv_by_std_in_grpo=False)",
             "rloo": "rloo_advantages vs compute_rloo_outcome_advantage"}
    rows = []
    for (est, dname, cat), s in stats.items():
        row = {"kind": "row", "estimator": est, "dtype": dname, "groups": cat, "pair": pairs[est],
               "batches": s["batches"], "rows": s["rows"], "max_abs_err": s["max_abs"], "max_rel_err": s["max_rel"],
               "max_abs_err_vs_verl_in_float64": s["max_abs_vs_f64"]}
        if cat == "uniform":
            row["ours_all_zero"] = s["ours_max_abs"] == 0.0
        if cat == "singleton":
            row["expected_difference"] = True
            row["ours_all_zero"] = s["ours_max_abs"] == 0.0
            row["verl_equals_raw_score"] = s["ref_equals_raw_score"]
        rows.append(row)

    hdr = f"{'estimator':<9} {'dtype':<8} {'groups':<10} {'batches':>7} {'rows':>6} {'max abs err':>12} {'max rel err':>12} {'abs vs verl64':>13}  note"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        note = ""
        if r["groups"] == "uniform":
            note = f"ours exactly 0: {'yes' if r['ours_all_zero'] else 'NO'}"
        if r["groups"] == "singleton":
            note = (f"expected: ours 0 ({'yes' if r['ours_all_zero'] else 'NO'}), "
                    f"verl raw score ({'yes' if r['verl_equals_raw_score'] else 'NO'})")
        print(f"{r['estimator']:<9} {r['dtype']:<8} {r['groups']:<10} {r['batches']:>7} {r['rows']:>6} "
              f"{r['max_abs_err']:>12.3e} {r['max_rel_err']:>12.3e} {r['max_abs_err_vs_verl_in_float64']:>13.3e}  {note}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for rec in [meta] + rows:
            f.write(json.dumps(rec) + "\n")
    print(f"wrote {os.path.relpath(args.out, REPO) if args.out.is_absolute() else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
