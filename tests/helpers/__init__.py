"""What several test modules share, and no tests: test modules import from here, never from one another.

- `runs`: the real `train.py` on the tiny configuration (`run_train`, `tiny_overrides`, `train_rows`).
- `configs`: composed Hydra configs (`cfg_of`, `heat_cpu_cfg`).
- `dist`: free ports, a tiny 2-layer Qwen3 and its FSDP2 sharding on a CPU gloo group.
- `batches`: hand-made `RolloutBatch`es (`synthetic_batch`, `batch_of`).
- `tiny_policy`: the word tokenizer and tiny Qwen3 of the policy tests (fixtures `tok`, `tiny`).
- `records`: hand-made rollout records (steps, trajectories, their batch) on a word tokenizer and a one-layer Qwen3
  (fixtures `tok`, `model`, `onpolicy_trajs`); `updates`: one Lightning update on a batch (`fit_one_batch`).
- `alfworld_text`: literal ALFWorld-like text; `search_corpus`: a tiny fictional retrieval corpus.
- `toy_engines`: engines for the worker-pool tests (importable by spawned workers).
- `launch_probe.py`: a script, one rank of the launch tests (run by path, not imported).

`tests/` is on `sys.path` (conftest.py), so `from helpers.runs import run_train` works in spawned processes too.
"""
