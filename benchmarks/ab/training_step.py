"""A bf16 training step at text-v1's shape (batch 4 x 4,096, 512 latents, width 320, 5 heads, 6 layers, 8k
vocabulary) with this stop's three training changes switched on one at a time, alternated in one process
(BENCHMARKS.md "Stop 33"): the fused AdamW (device.adamw, against foreach), rotary
in one C pass each way (cpu_attention.trainable_rotary, against model.apply_rotary) and the cross-entropy kernel
(cpu_loss, against F.cross_entropy on an fp32 copy). Prints each configuration's best of 3 steps per round.

    python benchmarks/ab/training_step.py [ROUNDS]
"""

import os
import sys
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

from perceiver_cli import cpu_attention, cpu_loss  # noqa: E402
from perceiver_cli.device import adamw, autocast, keep_freed_memory  # noqa: E402
from perceiver_cli.model import PerceiverAR, PerceiverARConfig, latent_loss  # noqa: E402

CONFIGURATIONS = {  # name: (fused AdamW, rotary kernel, loss kernel)
    "none (as before)": (False, False, False),
    "fused AdamW": (True, False, False),
    "rotary kernel": (False, True, False),
    "loss kernel": (False, False, True),
    "all three": (True, True, True),
}


def main(rounds: int) -> None:
    keep_freed_memory()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = PerceiverARConfig(
        vocab_size=8192, max_context=4096, num_latents=512, d_model=320, num_heads=5, num_layers=6
    )
    model = PerceiverAR(config).train()
    tokens = torch.randint(0, config.vocab_size, (4, 4097))
    parameters = list(model.parameters())
    optimizers = {True: adamw(parameters, lr=1e-5), False: torch.optim.AdamW(parameters, lr=1e-5, foreach=True)}
    rotates, supports = cpu_attention.rotates, cpu_loss.supports

    def step(fused: bool) -> None:
        with autocast(torch.device("cpu"), torch.bfloat16):
            logits = model(tokens[:, :-1])
        latent_loss(logits, tokens[:, 1:]).backward()
        optimizers[fused].step()
        optimizers[fused].zero_grad(set_to_none=True)

    for _ in range(4):
        step(True)
        step(False)
    times: dict[str, list[float]] = {name: [] for name in CONFIGURATIONS}
    for _ in range(rounds):
        for name, (fused, rotary, loss) in CONFIGURATIONS.items():
            cpu_attention.rotates = rotates if rotary else (lambda x: False)
            cpu_loss.supports = supports if loss else (lambda logits: False)
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                step(fused)
                best = min(best, time.perf_counter() - start)
            times[name].append(best)
    for name, seconds in times.items():
        print(f"{name:18s} " + " ".join(f"{s:.3f}" for s in seconds) + " s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
