"""bf16 prefill at 16k tokens with our AVX512-BF16 attention kernel and with PyTorch's, alternated in one process
(BENCHMARKS.md "bf16 prefill on the CPU"). Run with THP_MEM_ALLOC_ENABLE=1, as the CLI does.
"""

import torch

from perceiver_cli import cpu_attention
from perceiver_cli.bench.core import VOCAB, bench_config, best_time
from perceiver_cli.device import autocast
from perceiver_cli.model import PerceiverAR

torch.set_num_threads(2)
torch.manual_seed(0)
ctx = 16384
model = PerceiverAR(bench_config(ctx)).eval()
tokens = torch.randint(0, VOCAB, (1, ctx))


def prefill():
    with torch.no_grad(), autocast(torch.device("cpu"), torch.bfloat16):
        return model(tokens)


kernel = cpu_attention._kernel
with_kernel = prefill().float()
cpu_attention._kernel = lambda: None  # what supports() sees: PyTorch's kernels
without_kernel = prefill().float()
cpu_attention._kernel = kernel
print(f"max |logit difference| {(with_kernel - without_kernel).abs().max().item():.4f}")
for round in range(3):
    times = []
    for use_kernel in (False, True):
        cpu_attention._kernel = kernel if use_kernel else (lambda: None)
        times.append(best_time(prefill, 3))
    cpu_attention._kernel = kernel
    print(f"round {round}: prefill bf16 PyTorch attention {times[0]:.3f} s, ours {times[1]:.3f} s", flush=True)
