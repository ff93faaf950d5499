"""A training step at 16k tokens (bench config), bf16 autocast and fp32, in one process; run it alternately with
PERCEIVER_CPU_KERNELS=0 (PyTorch's attention) and =1 (cpu_attention.c forward and backward) to compare
(BENCHMARKS.md "bf16 training attention"). The fp32 step never uses the kernels: it is each process's yardstick.

    for i in 1 2 3; do for k in 0 1; do PERCEIVER_CPU_KERNELS=$k THP_MEM_ALLOC_ENABLE=1 \
        python benchmarks/ab/bf16_training.py; done; done
"""

import os

import torch

from perceiver_cli.bench.core import VOCAB, bench_config, best_time
from perceiver_cli.bench.efficiency import gemm_peak
from perceiver_cli.device import autocast
from perceiver_cli.model import PerceiverAR, latent_loss

torch.set_num_threads(2)
torch.manual_seed(0)
context = 16384
model = PerceiverAR(bench_config(context)).train()
tokens = torch.randint(0, VOCAB, (1, context + 1))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
seconds = {}
for dtype in (torch.bfloat16, torch.float32):

    def step(dtype=dtype):
        with autocast(torch.device("cpu"), dtype):
            logits = model(tokens[:, :context])
        latent_loss(logits, tokens[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds[dtype] = best_time(step, 2)
peaks = {name: gemm_peak(dtype) / 1e9 for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
print(
    f"PERCEIVER_CPU_KERNELS={os.environ.get('PERCEIVER_CPU_KERNELS', '1')}"
    f" train bf16 {seconds[torch.bfloat16]:.3f} s fp32 {seconds[torch.float32]:.3f} s"
    f" ratio {seconds[torch.float32] / seconds[torch.bfloat16]:.2f}"
    f" | GEMM peak fp32 {peaks['fp32']:.0f} bf16 {peaks['bf16']:.0f} GFLOP/s (ratio {peaks['bf16'] / peaks['fp32']:.2f})",
    flush=True,
)
