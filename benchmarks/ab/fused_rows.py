"""Cached steps of the fused C step, fp32 weights and caches, at batch 16 and 1, twice each: one line of tokens/s.
For before/after comparisons of cpu_decode.c in separate processes, alternated (BENCHMARKS.md "Packed weights"):

    git worktree add /tmp/ab_before COMMIT
    for i in 1 2 3; do
        PYTHONPATH=/tmp/ab_before python benchmarks/ab/fused_rows.py before
        PYTHONPATH=$PWD python benchmarks/ab/fused_rows.py after
    done
"""

import sys

import torch

from perceiver_cli.bench.core import bench_config
from perceiver_cli.bench.efficiency import decode_cycle
from perceiver_cli.model import PerceiverAR

torch.set_num_threads(2)
torch.manual_seed(0)
model = PerceiverAR(bench_config(16384)).eval()
rates = []
for _ in range(2):
    for batch in (16, 1):
        result = decode_cycle(model, batch, torch.float32, 1e9, fused=True)  # bandwidth unused here
        rates.append(f"b{batch} {result['tokens_per_s']:.1f}")
print(sys.argv[1] if len(sys.argv) > 1 else "", " | ".join(rates), flush=True)
