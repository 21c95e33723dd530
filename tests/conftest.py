import os
import sys

# Spawned worker processes inherit sys.path; make tests/ importable there (toy_engines).
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import pytest  # noqa: E402

# One generated game per task type and split, shared by the ALFWorld tests (about a minute on 2 cores).
GAMES_ARGS = dict(seed=0, train_per_type=1, valid_per_type=1, workers=2)


@pytest.fixture(scope="session")
def generated_games(tmp_path_factory):
    from stepopsd.envs.alfworld.generate import make_games

    out = tmp_path_factory.mktemp("games")
    report = make_games(str(out), log=lambda *_: None, **GAMES_ARGS)
    return out, report
