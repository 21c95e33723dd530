"""The scene catalogue the game generator draws from.

A scene is one of ALFRED's 120 floor plans (kitchens 1-30, living rooms 201-230, bedrooms 301-330,
bathrooms 401-430) as the `alfworld` package ships them in `alfworld/gen/layouts/`: the static
receptacles with their positions (`FloorPlan*-openable.json`, despite its name it lists every static
receptacle) and the object types present (`FloorPlan*-objects.json`). Object properties (which
objects fit which receptacles, which can be heated, cooled, cleaned, toggled) come from
`alfworld/gen/constants.py`. Nothing here is invented: the catalogue is the package's own data, read
into small frozen records.

Simplifications against official ALFWorld: no sliced objects, no objects nested inside movable
receptacles (a mug is an object, never a container), no movable-receptacle tasks (ALFWorld's
TextWorld version skips those too).
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import alfworld.gen.constants as C

LAYOUTS = os.path.join(os.path.dirname(C.__file__), "layouts")

# ALFRED's held-out scenes: never used in `train` or `valid_seen` (the natural `valid_unseen` set).
UNSEEN_FLOOR_PLANS = (10, 219, 308, 424)

OPENABLE = frozenset(C.OPENABLE_CLASS_SET) - {"Box"}
HEATABLE = frozenset(C.VAL_ACTION_OBJECTS["Heatable"])
COOLABLE = frozenset(C.VAL_ACTION_OBJECTS["Coolable"])
CLEANABLE = frozenset(C.VAL_ACTION_OBJECTS["Cleanable"])
TOGGLEABLE = frozenset({"DeskLamp"})
LAMP_HOLDERS = frozenset({"Desk", "SideTable", "Dresser"})  # where ALFRED scenes put desk lamps
# receptacle type -> object types it can hold (sliced variants dropped)
CAN_CONTAIN = {r: frozenset(o for o in objs if "Sliced" not in o) for r, objs in C.VAL_RECEPTACLE_OBJECTS.items()}
# Movable receptacles (mug, bowl, pan, ...) are objects here; static ones hold things.
MOVABLE_RECEPTACLES = frozenset(C.MOVABLE_RECEPTACLES) - {"Box"}
STATIC_RECEPTACLES = frozenset(CAN_CONTAIN) - MOVABLE_RECEPTACLES - {"Box"}
PICKUPABLE = frozenset().union(*CAN_CONTAIN.values()) - STATIC_RECEPTACLES - {"Box"}
# a layout name that differs from the PDDL receptacle type
LAYOUT_ALIASES = {"Sink": "SinkBasin", "Bathtub": "BathtubBasin"}


def room_type(floor_plan: int) -> str:
    for name, numbers in C.SCENE_TYPE.items():
        if floor_plan in numbers:
            return name
    raise ValueError(f"floor plan {floor_plan} is not an ALFRED scene (1-30, 201-230, 301-330, 401-430)")


@dataclass(frozen=True)
class Receptacle:
    rtype: str  # PDDL receptacle type without the `Type` suffix, e.g. "CounterTop"
    key: str  # layout id, e.g. "Cabinet|+00.68|+00.50|-02.20"
    location: tuple[int, int, int, int]  # grid x, grid z, rotation/90, camera horizon

    @property
    def openable(self) -> bool:
        return self.rtype in OPENABLE


@dataclass(frozen=True)
class Scene:
    floor_plan: int
    room: str  # Kitchen, LivingRoom, Bedroom, Bathroom
    receptacles: tuple[Receptacle, ...]
    object_types: tuple[str, ...]  # pickupable (and toggleable) object types present

    def has_receptacle(self, rtype: str) -> bool:
        return any(r.rtype == rtype for r in self.receptacles)

    @property
    def receptacle_types(self) -> tuple[str, ...]:
        return tuple(sorted({r.rtype for r in self.receptacles}))

    def holders(self, otype: str) -> tuple[Receptacle, ...]:
        """Receptacles of this scene that can hold an object of type `otype`."""
        if otype in TOGGLEABLE:
            return tuple(r for r in self.receptacles if r.rtype in LAMP_HOLDERS)
        return tuple(r for r in self.receptacles if otype in CAN_CONTAIN.get(r.rtype, ()))


@functools.lru_cache(maxsize=None)
def load_scene(floor_plan: int) -> Scene:
    with open(os.path.join(LAYOUTS, f"FloorPlan{floor_plan}-objects.json")) as f:
        present = set(json.load(f))
    with open(os.path.join(LAYOUTS, f"FloorPlan{floor_plan}-openable.json")) as f:
        positions = json.load(f)
    receptacles = []
    for key in sorted(positions):
        rtype = LAYOUT_ALIASES.get(key.split("|")[0], key.split("|")[0])
        if rtype not in STATIC_RECEPTACLES:
            continue
        x, z, rot, horizon = positions[key]
        receptacles.append(Receptacle(rtype, key, (round(x / 0.25), round(z / 0.25), int(rot) // 90 % 4, int(horizon))))
    objects = sorted(t for t in present if t in PICKUPABLE or t in TOGGLEABLE)
    return Scene(floor_plan, room_type(floor_plan), tuple(receptacles), tuple(objects))


def floor_plans() -> tuple[int, ...]:
    names = (n for n in os.listdir(LAYOUTS) if n.endswith("-objects.json"))
    return tuple(sorted(int(n[len("FloorPlan"):-len("-objects.json")]) for n in names))


def split_floor_plans(split: str) -> tuple[int, ...]:
    """`valid_unseen` uses ALFRED's unseen scenes only; `train` and `valid_seen` use all the others."""
    if split == "valid_unseen":
        return UNSEEN_FLOOR_PLANS
    if split in ("train", "valid_seen"):
        return tuple(n for n in floor_plans() if n not in UNSEEN_FLOOR_PLANS)
    raise ValueError(f"unknown split {split!r}: use train, valid_seen or valid_unseen")
