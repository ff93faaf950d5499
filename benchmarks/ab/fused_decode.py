"""Cached decode of the bench config: PyTorch steps against the fused C step, alternated in one process
(BENCHMARKS.md "A fused decoding step"). Prints tokens/s of the cached steps (and with the refill) for batch 1
and 16: fp32 StepLinears in PyTorch ops, the step weights `step_weights_dtype` picks in PyTorch ops, and the
C step (cpu_decode.py), over one refill cycle after a 4,096-token prompt each.
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
print(f"streaming bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
for round in range(2):
    for batch in (1, 16):
        auto = step_weights_dtype(torch.device("cpu"), batch, torch.float32)
        for name, dtype, fused in (
            ("PyTorch fp32 StepLinear", torch.float32, False),
            (f"PyTorch {str(auto)[6:]} StepLinear", auto, False),
            ("fused C step (fp32)", torch.float32, True),
        ):
            r = decode_cycle(model, batch, dtype, bandwidth, fused=fused)
            print(
                f"round {round} batch {batch:2d} {name:26s} {r['tokens_per_s']:6.1f} tokens/s "
                f"({r['fraction_of_ceiling']:.0%} of the ceiling), with the refill {r['tokens_per_s_with_refill']:.1f}",
                flush=True,
            )
