"""Prefill (fp32, bf16) and a bf16 training step at 16k tokens; run it with and without THP_MEM_ALLOC_ENABLE=1
(as separate processes: PyTorch reads the variable once) to compare huge pages (BENCHMARKS.md "Huge pages").
"""

import os

import torch

from perceiver_cli.bench.core import VOCAB, bench_config, best_time
from perceiver_cli.device import autocast
from perceiver_cli.model import PerceiverAR, latent_loss

torch.set_num_threads(2)
torch.manual_seed(0)
ctx = 16384
m = PerceiverAR(bench_config(ctx))
tokens = torch.randint(0, VOCAB, (1, ctx + 1))
out = []
for dt in (torch.float32, torch.bfloat16):
    m.eval()

    def f(dt=dt):
        with torch.no_grad(), autocast(torch.device("cpu"), dt):
            m(tokens[:, :ctx])

    out.append(f"prefill {str(dt)[6:]} {best_time(f, 3):.3f}")
m.train()
opt = torch.optim.AdamW(m.parameters(), lr=1e-5, foreach=True)


def step():
    with autocast(torch.device("cpu"), torch.bfloat16):
        logits = m(tokens[:, :ctx])
    latent_loss(logits, tokens[:, 1:]).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


out.append(f"train bf16 {best_time(step, 2):.3f}")
print(f"THP={os.environ.get('THP_MEM_ALLOC_ENABLE', '0')}", " ".join(out), flush=True)
