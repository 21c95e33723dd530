"""Run by tests/test_launch.py, by path as a script, as one rank of a torchrun or simulated `srun` launch: what
stepopsd.launch agrees on, as one JSON line. argv: an output folder shared by the ranks."""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from stepopsd import launch

out = sys.argv[1]
info = launch.launch()
stamp = launch.run_stamp("%H-%M-%S-%f")  # microseconds: every process's own stamp would differ
own = launch.rank_suffix(), launch.rank_zero_only(".hydra")
marker = os.path.join(out, "written-by-rank-0")
with launch.rank_zero_first("the probe data"):
    if info.rank == 0:
        time.sleep(1.0)  # the others must wait, not race ahead
        open(marker, "w").close()
    seen = os.path.exists(marker)
# env:// as Lightning calls it (rank and world size given): the agent's store, or rank 0's server reused
dist.init_process_group("gloo", rank=info.rank, world_size=info.world_size)
total = torch.tensor([float(info.rank + 1)])
dist.all_reduce(total)
dist.destroy_process_group()
print(json.dumps({"kind": info.kind, "rank": info.rank, "world": info.world_size, "stamp": stamp, "suffix": own[0],
                  "subdir": own[1], "seen": seen, "sum": total.item()}), flush=True)
