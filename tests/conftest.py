import os
import sys

# Spawned worker processes inherit sys.path; make tests/ importable there (toy_engines).
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)
