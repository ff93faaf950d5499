"""Decode of a shipped checkpoint (argument: music-v1, text-v1, ...), before/after the oneDNN step weights and
transposed caches, alternated in one process; "old-model" is the model's own layers (`--dtype fp32` before).
"""

import sys
import time

import torch

from perceiver_cli import runner

G = sys.modules["perceiver_cli.generate"]
torch.set_num_threads(2)
new_alloc = G.DecodeState._allocate


def old_alloc(self, like):
    c = self.model.config
    shape = (self.batch, c.num_heads, self.cross_capacity, c.head_dim)
    self.cross_key = like.new_empty(shape)
    self.cross_value = like.new_empty(shape)
    ls = (self.batch, c.num_heads, self.latent_capacity, c.head_dim)
    self.latent_keys = [like.new_empty(ls) for _ in self.model.layers]
    self.latent_values = [like.new_empty(ls) for _ in self.model.layers]


def run(model, stepper, batch, n_new=600, prompt_len=2048):
    prompt = torch.randint(
        0, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0)
    )
    ts = []
    last = time.perf_counter()
    for step in G.generate_stream(model, prompt, n_new, G.SamplingOptions(temperature=0), stepper=stepper):
        now = time.perf_counter()
        if not step.window.refill:
            ts.append(now - last)
        last = now
    ts.sort()
    return batch / ts[len(ts) // 2]


name = sys.argv[1]
loaded = runner.load(name, name.split("-")[0], device="cpu", dtype="auto")
m = loaded.model
for rnd in range(2):
    for batch in (1, 4):
        for dt in (torch.float32, torch.bfloat16):
            out = []
            for label in ("old", "new"):
                G.DecodeState._allocate = old_alloc if label == "old" else new_alloc
                st = G.step_model(m, dt, batch)
                if label == "old":
                    for mod in st.modules():
                        if isinstance(mod, G.StepLinear):
                            mod.packed = None
                out.append(f"{label} {run(m, st, batch):.0f}")
            if dt == torch.float32:
                G.DecodeState._allocate = old_alloc
                out.append(f"old-model {run(m, None, batch):.0f}")
            print(name, rnd, "batch", batch, dt, " ".join(out), flush=True)
