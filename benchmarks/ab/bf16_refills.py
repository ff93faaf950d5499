"""Decoding as `auto` runs it on a CPU with fast bf16 (the fused C step on bf16 weights and bf16 caches), with the
prompt's prefill and the refills in fp32 or in bf16 autocast, alternated in one process: bench config, one refill
cycle after a 4,096-token prompt, batch 1 and 16 (BENCHMARKS.md "bf16 refills").

    THP_MEM_ALLOC_ENABLE=1 python benchmarks/ab/bf16_refills.py
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
bf16 = torch.bfloat16
for round in range(3):
    for batch in (1, 16):
        weights = step_weights_dtype(torch.device("cpu"), batch, torch.float32)
        for refills in (torch.float32, bf16):
            r = decode_cycle(model, batch, weights, bandwidth, fused=True, cache_dtype=bf16, refill_dtype=refills)
            print(
                f"round {round} batch {batch:2d} {str(refills)[6:]:8s} refills: with the refill "
                f"{r['tokens_per_s_with_refill']:6.1f} tokens/s, cached steps {r['tokens_per_s']:6.1f}",
                flush=True,
            )
