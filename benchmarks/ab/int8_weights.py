"""int8 step weights against bf16 and fp32 ones, on the same cached step in one process, alternated call by call:
the bench config after a 4,096-token prompt with 768 latents cached (the middle of a refill cycle), bf16
key/value caches (as `auto` decodes), each weight format's median step time and the median of the per-round
ratios to bf16 (BENCHMARKS.md "int8 step weights").

    THP_MEM_ALLOC_ENABLE=1 python benchmarks/ab/int8_weights.py [--batch 1 4 16]
"""

import statistics
import sys
import time

import torch

from perceiver_cli import cpu_decode
from perceiver_cli.bench.core import VOCAB, bench_config
from perceiver_cli.generate import DecodeState, Window, step_model
from perceiver_cli.model import PerceiverAR

PROMPT, LATENTS, ROUNDS = 4096, 768, 100


def main() -> None:
    batches = [int(b) for b in sys.argv[sys.argv.index("--batch") + 1 :]] if "--batch" in sys.argv else [1, 4, 16]
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = PerceiverAR(bench_config(16384)).eval()
    formats = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
    for batch in batches:
        state = DecodeState(
            model, batch, PROMPT + 1, torch.device("cpu"), stepper=step_model(model, torch.bfloat16, batch),
            cache_dtype=torch.bfloat16,
        )  # fmt: skip
        with torch.no_grad():
            state.append_inputs(torch.randint(0, VOCAB, (batch, PROMPT)))
            state.latent_pass(Window(0, PROMPT, LATENTS, refill=True))
        steps = {
            name: cpu_decode.FusedStep(model, state, step_model(model, dtype, batch))
            for name, dtype in formats.items()
        }
        times = {name: [] for name in steps}
        for round_ in range(ROUNDS):
            names = list(steps) if round_ % 2 == 0 else list(reversed(steps))
            for name in names:
                start = time.perf_counter()
                steps[name](state.tokens, PROMPT - 1, state.cross_length, LATENTS)
                times[name].append(time.perf_counter() - start)
        ratios = {n: statistics.median(a / b for a, b in zip(times[n], times["bf16"], strict=True)) for n in steps}
        print(
            f"batch {batch:2d}: "
            + " | ".join(
                f"{n} {statistics.median(t) * 1e3:.2f} ms ({ratios[n]:.3f} of bf16)" for n, t in times.items()
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
