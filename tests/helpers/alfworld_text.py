"""Literal ALFWorld-like text shared by the policy and rollout tests (no engine needed)."""

GOAL = "put a clean mug in coffeemachine."
OBS = [
    "You are in the middle of a room. Looking quickly around you, you see a cabinet 1, a coffeemachine 1, "
    "a countertop 1, a drawer 2, a fridge 1, and a sinkbasin 1.",
    "You arrive at countertop 1. On the countertop 1, you see a mug 1, and a spoon 2.",
    "You pick up the mug 1 from the countertop 1.",
    "You clean the mug 1 using the sinkbasin 1.",
    "Nothing happens.",
]
ADMISSIBLE = ["go to cabinet 1", "go to coffeemachine 1", "go to countertop 1", "go to drawer 2",
              "go to fridge 1", "go to sinkbasin 1", "inventory", "look", "help",
              "take mug 1 from countertop 1", "clean mug 1 with sinkbasin 1", "put mug 1 in/on coffeemachine 1"]
