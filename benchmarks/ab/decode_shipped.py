"""Decode of a shipped checkpoint (argument: music-v1, text-v1, ...), before/after the oneDNN step weights and
transposed caches, alternated in one process; "old-model" is the model's own layers (`--dtype fp32` before).
"""

import sys
import time

import torch
from _before import generation as G
from _before import step_model, use_caches

from perceiver_cli import runner

torch.set_num_threads(2)


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
                use_caches(before=label == "old")
                st = step_model(m, dt, batch, before=label == "old")
                out.append(f"{label} {run(m, st, batch):.0f}")
            if dt == torch.float32:
                use_caches(before=True)
                out.append(f"old-model {run(m, None, batch):.0f}")
            print(name, rnd, "batch", batch, dt, " ".join(out), flush=True)
