"""The fused C step as `auto` runs it (the step weights `step_weights_dtype` picks) with fp32 and with bf16
key/value caches, alternated in one process: cached decode of the bench config over one refill cycle after a
4,096-token prompt, batch 1 and 16 (BENCHMARKS.md "bf16 caches").

    THP_MEM_ALLOC_ENABLE=1 python benchmarks/ab/bf16_caches.py
"""

import torch

from perceiver_cli.bench.core import bench_config
from perceiver_cli.bench.efficiency import decode_cycle, streaming_bandwidth
from perceiver_cli.generate import step_weights_dtype
from perceiver_cli.model import PerceiverAR

torch.set_num_threads(2)
torch.manual_seed(0)
model = PerceiverAR(bench_config(16384)).eval()
bandwidth = streaming_bandwidth(model.num_parameters())
for round in range(3):
    for batch in (1, 16):
        weights = step_weights_dtype(torch.device("cpu"), batch, torch.float32)
        for caches in (torch.float32, torch.bfloat16):
            r = decode_cycle(model, batch, weights, bandwidth, fused=True, cache_dtype=caches)
            print(
                f"round {round} batch {batch:2d} {str(weights)[6:]} weights, {str(caches)[6:]:8s} caches: "
                f"{r['tokens_per_s']:6.1f} tokens/s ({r['bytes_per_step'] / 1e6:.0f} MB a step), "
                f"with the refill {r['tokens_per_s_with_refill']:.1f}",
                flush=True,
            )
