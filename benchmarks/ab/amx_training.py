"""A bf16 training step and a bf16 prefill at 16k tokens (bench config) with the attention on AMX tiles, on
vdpbf16ps and in PyTorch's kernels, alternated call by call in one process (BENCHMARKS.md "Stop 31").

    THP_MEM_ALLOC_ENABLE=1 python benchmarks/ab/amx_training.py
"""

import time

import torch

from perceiver_cli import cpu_attention
from perceiver_cli.bench.core import VOCAB, bench_config
from perceiver_cli.device import autocast
from perceiver_cli.model import PerceiverAR, latent_loss

ROUNDS = 4


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    context = 16384
    model = PerceiverAR(bench_config(context))
    tokens = torch.randint(0, VOCAB, (1, context + 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    cpu = torch.device("cpu")

    def train_step():
        model.train()
        with autocast(cpu, torch.bfloat16):
            logits = model(tokens[:, :context])
        latent_loss(logits, tokens[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def prefill():
        model.eval()
        with torch.no_grad(), autocast(cpu, torch.bfloat16):
            model(tokens[:, :context])

    amx = cpu_attention.amx_on()
    supports = cpu_attention.supports
    settings = {
        "ours, AMX": lambda: cpu_attention.use_amx(True),
        "ours, vdpbf16ps": lambda: cpu_attention.use_amx(False),
        "PyTorch": lambda: setattr(cpu_attention, "supports", lambda *args, **kwargs: False),
    }
    if not amx:
        del settings["ours, AMX"]
    times = {(name, work): [] for name in settings for work in ("train", "prefill")}
    for round_index in range(ROUNDS + 1):  # the first round warms up
        for name, apply in settings.items():
            cpu_attention.supports = supports
            apply()
            for work, function in (("train", train_step), ("prefill", prefill)):
                start = time.perf_counter()
                function()
                if round_index:
                    times[name, work].append(time.perf_counter() - start)
    cpu_attention.supports = supports
    cpu_attention.use_amx(amx)
    print(f"bf16, bench config, 16,384 tokens, 2 threads; seconds of {ROUNDS} alternated rounds (best first)")
    print("| attention | training step | prefill |")
    print("|---|---|---|")
    for name in settings:
        cells = [", ".join(f"{t:.3f}" for t in sorted(times[name, work])) for work in ("train", "prefill")]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
