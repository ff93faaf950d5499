"""Decode before/after the oneDNN step weights and transposed caches, alternated in one process (BENCHMARKS.md).

"before": the caches in the (T, Dh) layout and StepLinear without prepacked weights (or the model itself);
"after": the current code. Prints tokens/s of the cached steps (and with the refill) for batch 1 and 16.
"""

import torch
from _before import step_model, use_caches

import perceiver_cli.bench.efficiency as E
from perceiver_cli.bench.core import bench_config
from perceiver_cli.bench.efficiency import decode_cycle, streaming_bandwidth
from perceiver_cli.model import PerceiverAR

torch.set_num_threads(2)
torch.manual_seed(0)
m = PerceiverAR(bench_config(16384)).eval()
bw = streaming_bandwidth(m.num_parameters())
print("bw", bw / 1e9)
configs = {  # name: (the code before?, step weights; None = the model's own layers)
    "old model exact": (True, None),
    "new fp32 steps": (False, torch.float32),
    "old bf16 steps": (True, torch.bfloat16),
    "new bf16 steps": (False, torch.bfloat16),
    "old fp32 StepLinear": (True, torch.float32),
}
for rnd in range(2):
    for b in (1, 16):
        for name, (before, dt) in configs.items():
            if b == 1 and name == "old fp32 StepLinear":
                continue
            use_caches(before)
            E.step_model = lambda model, dtype, rows=1, before=before: step_model(model, dtype, rows, before)
            r = decode_cycle(m, b, dt, bw)
            print(
                rnd,
                b,
                name,
                f"{r['tokens_per_s']:.1f} tok/s, with refill {r['tokens_per_s_with_refill']:.1f}",
                flush=True,
            )
