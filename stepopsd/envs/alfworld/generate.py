"""Generate ALFWorld games in the official format, offline: `stepopsd-make-games --out DIR --seed N`.

Each game is a PDDL problem over one of ALFRED's floor plans (see `scenes.py`): the real static
receptacles of that room (closed ones closed), the task's target objects and random distractors
placed in receptacles that can hold them, the goal taken from the `alfworld` package's own goal
library, and the package's own domain (`alfred.pddl`) and grammar (`alfred.twl2`) with the goal
sentence filled in. It is written as `DIR/json_2.1.1/<split>/<task-folder>/<trial>/` with
`game.tw-pddl` and `traj_data.json` exactly as official games are, so the real loader reads it.

Every candidate is played by the package's hand-coded expert before it is accepted; unsolved ones
(and plans outside [min_plan, max_plan]) are rejected and counted by reason. Output bytes depend
only on the seed and the options. `traj_data.json` carries `stepopsd_generated` so every loader and
log can label these games "generated": they are never ALFWorld results.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
from dataclasses import asdict, dataclass, field

import alfworld
import alfworld.gen.goal_library as goal_library

from stepopsd.envs.alfworld import scenes
from stepopsd.envs.alfworld.expert import iter_experts
from stepopsd.envs.alfworld.tasks import GENERATED_KEY, SPLITS, TASK_TYPES, resolve_task_types
from stepopsd.errors import UserError, refuse_foreign_folder
from stepopsd.progress import Progress

DATA = os.path.join(os.path.dirname(alfworld.__file__), "data")
GENERATOR_VERSION = 1
# what each task type needs: room types (ALFRED's GOALS_VALID) and the appliance/lamp in the room
ROOMS = {
    "pick": {"Kitchen", "LivingRoom", "Bathroom", "Bedroom"},
    "pick_two": {"Kitchen", "LivingRoom", "Bathroom", "Bedroom"},
    "look": {"LivingRoom", "Bedroom"},
    "clean": {"Kitchen", "Bathroom"},
    "heat": {"Kitchen"},
    "cool": {"Kitchen"},
}
APPLIANCE = {"clean": "SinkBasin", "heat": "Microwave", "cool": "Fridge"}
PROPERTY = {"clean": scenes.CLEANABLE, "heat": scenes.HEATABLE, "cool": scenes.COOLABLE}


@dataclass(frozen=True)
class Placement:
    otype: str
    oid: str  # mangled object id, e.g. Apple_bar__plus_00_dot_10_bar_...
    receptacle: scenes.Receptacle


@dataclass(frozen=True)
class GameSpec:
    split: str
    task_type: str  # short name
    floor_plan: int
    object_target: str
    parent_target: str  # "" for look
    toggle_target: str  # "DeskLamp" for look, else ""
    goal: str  # the sentence shown to the agent
    placements: tuple[Placement, ...]
    seed: int
    attempt: int

    @property
    def task_folder(self) -> str:
        return f"{TASK_TYPES[self.task_type]}-{self.object_target}-None-{self.parent_target or self.toggle_target}-{self.floor_plan}"

    @property
    def trial(self) -> str:
        return f"trial_gen_s{self.seed}_{self.attempt:05d}"


def mangle(key: str) -> str:
    """ALFRED id `Apple|+00.10|-01.20` -> PDDL-safe `Apple_bar__plus_00_dot_10_bar__minus_01_dot_20`."""
    for a, b in (("|", "_bar_"), ("+", "_plus_"), ("-", "_minus_"), (".", "_dot_")):
        key = key.replace(a, b)
    return key


def receptacle_id(r: scenes.Receptacle) -> str:
    # official ids of basins keep the layout name and append the basin type
    return mangle(r.key + (f"|{r.rtype}" if r.rtype.endswith("Basin") else ""))


def location_id(loc: tuple[int, ...]) -> str:
    return mangle("loc|" + "|".join(str(v) for v in loc))


def _place(rng: random.Random, scene: scenes.Scene, otype: str, n: int, avoid: frozenset, used: set) -> list[Placement]:
    holders = [r for r in scene.holders(otype) if r.rtype not in avoid]
    out = []
    for _ in range(n):
        r = rng.choice(holders)
        while True:
            x, y, z = (rng.uniform(-3, 3) for _ in range(3))
            key = f"{otype}|{x:+06.2f}|{abs(y):+06.2f}|{z:+06.2f}"
            if key not in used:
                used.add(key)
                break
        out.append(Placement(otype, mangle(key), r))
    return out


def sample_game(split: str, task_type: str, seed: int, attempt: int) -> GameSpec | None:
    """One candidate game, a pure function of its arguments; None when the drawn scene cannot host it."""
    rng = random.Random(f"stepopsd-games/{seed}/{split}/{task_type}/{attempt}")
    appliance = APPLIANCE.get(task_type)
    pool = [scenes.load_scene(n) for n in scenes.split_floor_plans(split)]
    pool = [s for s in pool if s.room in ROOMS[task_type] and (appliance is None or s.has_receptacle(appliance))]
    if task_type == "look":
        pool = [s for s in pool if "DeskLamp" in s.object_types and s.holders("DeskLamp")]
    scene = rng.choice(pool)
    targets = [o for o in scene.object_types if o in PROPERTY.get(task_type, scenes.PICKUPABLE) and o in scenes.PICKUPABLE]
    rng.shuffle(targets)
    for obj in targets:
        parents = sorted({r.rtype for r in scene.holders(obj)} - {appliance})
        if task_type == "look":
            parents = [""]
        rng.shuffle(parents)
        for parent in parents:  # the targets must start somewhere other than the goal receptacle
            if any(r.rtype != parent for r in scene.holders(obj)):
                return _populate(rng, scene, split, task_type, obj, parent, seed, attempt)
    return None


def _populate(rng, scene, split, task_type, obj, parent, seed, attempt) -> GameSpec:
    used: set = set()
    n_target = rng.randint(2, 4) if task_type == "pick_two" else rng.randint(1, 3)
    placements = _place(rng, scene, obj, n_target, frozenset({parent}), used)
    toggle = "DeskLamp" if task_type == "look" else ""
    if "DeskLamp" in scene.object_types and scene.holders("DeskLamp"):
        placements += _place(rng, scene, "DeskLamp", 1, frozenset(), used)
    others = [o for o in scene.object_types if o not in (obj, "DeskLamp") and scene.holders(o)]
    for other in rng.sample(others, min(len(others), rng.randint(8, 14))):
        placements += _place(rng, scene, other, rng.randint(1, 2), frozenset(), used)
    goal_type = TASK_TYPES[task_type]
    templates = goal_library.gdict[goal_type]["templates"]
    goal = rng.choice(templates).format(obj=obj.lower(), recep=parent.lower(), toggle=toggle.lower(), mrecep="")
    return GameSpec(split, task_type, scene.floor_plan, obj, parent, toggle, goal, tuple(placements), seed, attempt)


def pddl_problem(spec: GameSpec) -> str:
    scene = scenes.load_scene(spec.floor_plan)
    locations = sorted({r.location for r in scene.receptacles})
    start = (min(l[0] for l in locations) - 1, min(l[1] for l in locations) - 1, 0, 30)
    otypes = sorted({p.otype for p in spec.placements})
    rtypes = sorted({r.rtype for r in scene.receptacles})
    init = [f"(atLocation agent1 {location_id(start)})"]
    for r in scene.receptacles:
        rid = receptacle_id(r)
        init += [f"(receptacleType {rid} {r.rtype}Type)", f"(receptacleAtLocation {rid} {location_id(r.location)})"]
        if r.openable:
            init.append(f"(openable {rid})")
    for p in spec.placements:
        init += [f"(objectType {p.oid} {p.otype}Type)", f"(inReceptacle {p.oid} {receptacle_id(p.receptacle)})",
                 f"(objectAtLocation {p.oid} {location_id(p.receptacle.location)})"]
        if p.otype in scenes.TOGGLEABLE:
            init.append(f"(toggleable {p.oid})")
        else:
            init.append(f"(pickupable {p.oid})")
        for prop, kinds in (("heatable", scenes.HEATABLE), ("coolable", scenes.COOLABLE), ("cleanable", scenes.CLEANABLE)):
            if p.otype in kinds:
                init.append(f"({prop} {p.oid})")
        if p.otype in scenes.MOVABLE_RECEPTACLES:
            init.append(f"(isReceptacleObject {p.oid})")
    init += [f"(canContain {rt}Type {ot}Type)" for rt in rtypes for ot in otypes if ot in scenes.CAN_CONTAIN.get(rt, ())]
    goal = goal_library.gdict[TASK_TYPES[spec.task_type]]["pddl"].format(
        obj=spec.object_target, recep=spec.parent_target, toggle=spec.toggle_target, mrecep="").replace("#", "-")
    objects = " ".join(p.oid for p in spec.placements)
    receptacles = " ".join(receptacle_id(r) for r in scene.receptacles)
    return "\n".join([
        f"(define (problem gen_{spec.split}_{spec.task_type}_{spec.seed}_{spec.attempt})",
        " (:domain alfred)",
        " (:objects",
        "  agent1 - agent",
        f"  {' '.join(o + 'Type' for o in otypes)} - otype",
        f"  {' '.join(r + 'Type' for r in rtypes)} - rtype",
        f"  {objects} - object",
        f"  {receptacles} - receptacle",
        f"  {' '.join(location_id(l) for l in [start] + locations)} - location",
        " )",
        " (:init",
        *(f"  {fact}" for fact in init),
        " )",
        goal.strip(),
    ]) + "\n"


def write_game(spec: GameSpec, root: str) -> str:
    """Write the game under `root/<split>/<task-folder>/<trial>/`; returns the path of game.tw-pddl."""
    folder = os.path.join(root, spec.split, spec.task_folder, spec.trial)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(DATA, "alfred.pddl")) as f:
        domain = f.read()
    with open(os.path.join(DATA, "alfred.twl2")) as f:
        grammar = f.read().replace("UNKNOWN GOAL", spec.goal)
    game = {"pddl_domain": domain, "grammar": grammar, "pddl_problem": pddl_problem(spec), "solvable": True}
    traj = {
        "task_type": TASK_TYPES[spec.task_type],
        "task_id": f"gen_{spec.split}_{spec.seed}_{spec.attempt:05d}",
        "pddl_params": {"object_target": spec.object_target, "parent_target": spec.parent_target,
                        "toggle_target": spec.toggle_target, "mrecep_target": "", "object_sliced": False},
        "scene": {"floor_plan": f"FloorPlan{spec.floor_plan}", "scene_num": spec.floor_plan, "random_seed": spec.seed},
        "turk_annotations": {"anns": [{"task_desc": spec.goal[0].upper() + spec.goal[1:] + ".", "votes": []}]},
        GENERATED_KEY: {"generator": "stepopsd", "version": GENERATOR_VERSION, "seed": spec.seed, "attempt": spec.attempt},
    }
    path = os.path.join(folder, "game.tw-pddl")
    with open(path, "w") as f:
        json.dump(game, f, indent=None, sort_keys=True)
    with open(os.path.join(folder, "traj_data.json"), "w") as f:
        json.dump(traj, f, indent=2, sort_keys=True)
    return path


def _record_expert(gamefile: str, expert: str, steps: int) -> None:
    """Note in traj_data.json which expert solved the game, in how many steps (demos replay it)."""
    path = os.path.join(os.path.dirname(gamefile), "traj_data.json")
    with open(path) as f:
        traj = json.load(f)
    traj[GENERATED_KEY] |= {"expert": expert, "expert_steps": steps}
    with open(path, "w") as f:
        json.dump(traj, f, indent=2, sort_keys=True)


@dataclass
class GenerationReport:
    """What was generated: accepted counts, rejections by reason, expert plan lengths per type."""

    seed: int
    accepted: dict = field(default_factory=dict)  # split -> task type -> count
    rejected: dict = field(default_factory=dict)  # reason -> count
    plan_lengths: dict = field(default_factory=dict)  # task type -> list of expert steps to win
    data_label: str = "generated"

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def table(self) -> str:
        rows = ["task type | games (train/valid_seen/valid_unseen) | expert plan length min/median/mean/max [generated]",
                "--- | --- | ---"]
        for t in TASK_TYPES:
            if t not in self.plan_lengths:
                continue
            n = "/".join(str(self.accepted.get(s, {}).get(t, 0)) for s in SPLITS)
            L = self.plan_lengths[t]
            rows.append(f"{t} | {n} | {min(L)}/{statistics.median(L):g}/{statistics.mean(L):.1f}/{max(L)}")
        rows.append("rejected: " + (", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"))
        return "\n".join(rows)


def _own_output(out: str) -> bool:
    """Whether `out` holds only games this generator wrote (a finished or an interrupted generation)."""
    names = set(os.listdir(out)) if os.path.isdir(out) else set()
    root = os.path.join(out, "json_2.1.1")
    if not names <= {"json_2.1.1", ".staging"}:
        return False
    if os.path.isfile(os.path.join(root, "generation_report.json")):
        return True
    for dirpath, _, files in os.walk(root):  # interrupted: its first game says whose it is
        if "traj_data.json" in files:
            try:
                with open(os.path.join(dirpath, "traj_data.json")) as f:
                    return GENERATED_KEY in json.load(f)
            except (OSError, ValueError):
                return False
    return True


def make_games(out: str, seed: int = 0, *, train_per_type: int = 20, valid_per_type: int = 5,
               task_types=None, min_plan: int = 5, max_plan: int = 30, workers: int | None = None,
               max_attempts_per_game: int = 20, log=print) -> GenerationReport:
    """Generate, check with the expert, and write games under `out/json_2.1.1/`."""
    types = resolve_task_types(task_types)
    if train_per_type < 0 or valid_per_type < 0:
        raise ValueError("games per type must be >= 0")
    if not 1 <= min_plan <= max_plan:
        raise ValueError(f"need 1 <= min_plan <= max_plan, got {min_plan}, {max_plan}")
    root = os.path.join(out, "json_2.1.1")
    staging = os.path.join(out, ".staging")
    refuse_foreign_folder(out, _own_output(out), "stepopsd-make-games")
    shutil.rmtree(staging, ignore_errors=True)
    want = {(s, t): (train_per_type if s == "train" else valid_per_type) for s in SPLITS for t in types}
    report = GenerationReport(seed)
    next_attempt = {k: 0 for k in want}
    with Progress("games", sum(want.values()), "accepted", description="Generating games [generated]") as bar:
        while True:
            todo = {k: n - report.accepted.get(k[0], {}).get(k[1], 0) for k, n in want.items()}
            todo = {k: n for k, n in todo.items() if n > 0}
            if not todo:
                break
            batch = []
            for key, missing in todo.items():
                if next_attempt[key] >= max_attempts_per_game * want[key]:
                    raise RuntimeError(f"could not generate {want[key]} solvable {key[1]} games for {key[0]} in "
                                       f"{next_attempt[key]} attempts; widen --max-plan or lower the count")
                for _ in range(missing + 1):
                    spec = sample_game(key[0], key[1], seed, next_attempt[key])
                    next_attempt[key] += 1
                    if spec is None:
                        report.reject("no_scene_fit")
                    else:
                        batch.append(spec)
            paths = [write_game(spec, staging) for spec in batch]
            # The hand-coded expert searches as an agent must (goes, opens, looks): its step count is a
            # realistic plan length, and it is pure Python (no planner search that can blow up).
            jobs = [(p, {"seed": spec.attempt, "max_steps": 50}) for p, spec in zip(paths, batch)]
            for ep, spec, path in zip(iter_experts(jobs, workers), batch, paths):  # progress as games are checked
                steps = len(ep.steps)
                if not ep.won:
                    report.reject("expert_error" if ep.error else "unsolved")
                elif not min_plan <= steps <= max_plan:
                    report.reject("plan_too_short" if steps < min_plan else "plan_too_long")
                elif report.accepted.setdefault(spec.split, {}).get(spec.task_type, 0) < want[(spec.split, spec.task_type)]:
                    report.accepted[spec.split][spec.task_type] = report.accepted[spec.split].get(spec.task_type, 0) + 1
                    report.plan_lengths.setdefault(spec.task_type, []).append(steps)
                    _record_expert(path, "handcoded", steps)
                    final = os.path.join(root, spec.split, spec.task_folder, spec.trial)
                    shutil.rmtree(final, ignore_errors=True)
                    os.makedirs(os.path.dirname(final), exist_ok=True)
                    shutil.move(os.path.dirname(path), final)
                bar.update(sum(sum(v.values()) for v in report.accepted.values()), rejected=sum(report.rejected.values()))
            shutil.rmtree(staging, ignore_errors=True)
            log(f"[generated games] accepted {sum(sum(v.values()) for v in report.accepted.values())}"
                f"/{sum(want.values())}, rejected {sum(report.rejected.values())}")
    with open(os.path.join(root, "generation_report.json"), "w") as f:
        json.dump(asdict(report), f, indent=2, sort_keys=True)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="stepopsd-make-games", description=(
        "Write GENERATED ALFWorld-format games (all six task types, train/valid_seen/valid_unseen) checked "
        "solvable by the alfworld package's expert. Never report results on them as ALFWorld results."))
    p.add_argument("--out", required=True, help="output folder; games go to OUT/json_2.1.1/<split>/...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-per-type", type=int, default=20)
    p.add_argument("--valid-per-type", type=int, default=5, help="games per task type in each validation split")
    p.add_argument("--task-types", nargs="+", default=["all"], help=f"subset of: {' '.join(TASK_TYPES)} (default all)")
    p.add_argument("--min-plan", type=int, default=5, help="reject games the expert solves in fewer steps")
    p.add_argument("--max-plan", type=int, default=30, help="reject games the expert needs more steps for")
    p.add_argument("--workers", type=int, default=None, help="checker processes (default: all cores)")
    a = p.parse_args(argv)
    try:
        report = make_games(a.out, a.seed, train_per_type=a.train_per_type, valid_per_type=a.valid_per_type,
                            task_types=a.task_types, min_plan=a.min_plan, max_plan=a.max_plan, workers=a.workers)
    except (ValueError, RuntimeError, UserError) as e:
        print(f"stepopsd-make-games: error: {e}", file=sys.stderr)
        return 2
    print(report.table())
    print(f"wrote generated games to {os.path.join(a.out, 'json_2.1.1')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
