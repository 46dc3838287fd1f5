"""Stands in for the trainer module under torchrun (tests/integration/test_torchrun_launch.py): each
rank records the distributed env it was given and joins one gloo all-reduce with its peers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")

if __name__ == "__main__":
    dist.init_process_group("gloo")
    total = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(total)
    record = {k: os.environ.get(k) for k in (*KEYS, "HUVIDPO_TRAINER_FINETUNE_ID")}
    record["sum_of_ranks"] = total.item()
    out = Path(os.environ["RANK_PROBE_DIR"]) / f"rank{os.environ['RANK']}.json"
    out.write_text(json.dumps(record))
    dist.destroy_process_group()
