"""Run by test_loop.py under torchrun: train a few steps, then each rank dumps its weights for comparison."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from perceiver_cli.train.config import TrainConfig
from perceiver_cli.train.loop import train

data, run_dir, dump_dir = sys.argv[1:4]
config = TrainConfig(
    context=64,
    latents=16,
    d_model=32,
    layers=1,
    heads=2,
    batch_size=2,
    steps=4,
    warmup=2,
    eval_every=100,
    save_every=100,
    log_every=1,
    transpose=0,
    stretch=0.0,
    device="cpu",
    dtype="fp32",
)
result = train(Path(data), Path(run_dir), config)
rank = dist.get_rank()
torch.save({k: v.detach().clone() for k, v in result.model.state_dict().items()}, Path(dump_dir) / f"rank{rank}.pt")
dist.barrier()
dist.destroy_process_group()
