"""Decode before/after the oneDNN step weights and transposed caches, alternated in one process (BENCHMARKS.md).

"before": the caches in the (T, Dh) layout and StepLinear without prepacked weights (or the model itself);
"after": the current code. Prints tokens/s of the cached steps (and with the refill) for batch 1 and 16.
"""

import sys

import torch

import perceiver_cli.bench.efficiency as E
from perceiver_cli.bench.core import bench_config
from perceiver_cli.bench.efficiency import decode_cycle, streaming_bandwidth
from perceiver_cli.model import PerceiverAR

G = sys.modules["perceiver_cli.generate"]

torch.set_num_threads(2)
torch.manual_seed(0)
m = PerceiverAR(bench_config(16384)).eval()
new_alloc = G.DecodeState._allocate


def old_alloc(self, like):
    c = self.model.config
    shape = (self.batch, c.num_heads, self.cross_capacity, c.head_dim)
    self.cross_key = like.new_empty(shape)
    self.cross_value = like.new_empty(shape)
    ls = (self.batch, c.num_heads, self.latent_capacity, c.head_dim)
    self.latent_keys = [like.new_empty(ls) for _ in self.model.layers]
    self.latent_values = [like.new_empty(ls) for _ in self.model.layers]


orig_step_model = G.step_model


def unpacked_step_model(model, dtype, rows=1):
    s = orig_step_model(model, dtype, rows)
    for mod in s.modules():
        if isinstance(mod, G.StepLinear):
            mod.packed = None
    return s


bw = streaming_bandwidth(m.num_parameters())
print("bw", bw / 1e9)
configs = {
    "old model exact": (old_alloc, orig_step_model, None),
    "new fp32 steps": (new_alloc, orig_step_model, torch.float32),
    "old bf16 steps": (old_alloc, unpacked_step_model, torch.bfloat16),
    "new bf16 steps": (new_alloc, orig_step_model, torch.bfloat16),
    "old fp32 StepLinear": (old_alloc, unpacked_step_model, torch.float32),
}
for rnd in range(2):
    for b in (1, 16):
        for name, (alloc, sm, dt) in configs.items():
            if b == 1 and name == "old fp32 StepLinear":
                continue
            G.DecodeState._allocate = alloc
            E.step_model = sm
            r = decode_cycle(m, b, dt, bw)
            print(
                rnd,
                b,
                name,
                f"{r['tokens_per_s']:.1f} tok/s, with refill {r['tokens_per_s_with_refill']:.1f}",
                flush=True,
            )
