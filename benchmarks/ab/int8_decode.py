"""int8 step weights and int8 key/value caches against `auto`'s bf16 ones, on the same cached step in one process,
alternated call by call: the bench config after a 4,096-token prompt with 768 latents cached (the middle of a
refill cycle), each (weights, caches) pair's median step time and the median of its per-round ratios to bf16
weights with bf16 caches (BENCHMARKS.md "Stop 30").

    THP_MEM_ALLOC_ENABLE=1 python benchmarks/ab/int8_decode.py [--batch 1 4 8 16]
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
PAIRS = [  # (weights, caches); the first is `auto`'s, the reference
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float32),
    (torch.int8, torch.bfloat16),
    (torch.bfloat16, torch.int8),
    (torch.int8, torch.int8),
]


def name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int8: "int8"}[dtype]


def main() -> None:
    batches = (
        [int(b) for b in sys.argv[sys.argv.index("--batch") + 1 :]] if "--batch" in sys.argv else [1, 4, 8, 16]
    )
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = PerceiverAR(bench_config(16384)).eval()
    for batch in batches:
        prompt = torch.randint(0, VOCAB, (batch, PROMPT))
        states = {}
        for caches in {caches for _, caches in PAIRS}:
            state = DecodeState(
                model, batch, PROMPT + 1, torch.device("cpu"), stepper=step_model(model, torch.float32, batch),
                cache_dtype=caches,
            )  # fmt: skip
            with torch.no_grad():
                state.append_inputs(prompt)
                state.latent_pass(Window(0, PROMPT, LATENTS, refill=True))
            states[caches] = state
        steppers = {weights: step_model(model, weights, batch) for weights, _ in PAIRS}
        steps = {pair: cpu_decode.FusedStep(model, states[pair[1]], steppers[pair[0]]) for pair in PAIRS}
        times = {pair: [] for pair in PAIRS}
        for round_ in range(ROUNDS):
            for pair in PAIRS if round_ % 2 == 0 else reversed(PAIRS):
                state = states[pair[1]]
                start = time.perf_counter()
                steps[pair](state.tokens, PROMPT - 1, state.cross_length, LATENTS)
                times[pair].append(time.perf_counter() - start)
        reference = times[PAIRS[0]]
        print(f"batch {batch:2d} (weights/caches):", flush=True)
        for pair, t in times.items():
            ratio = statistics.median(a / b for a, b in zip(t, reference, strict=True))
            print(
                f"  {name(pair[0])}/{name(pair[1])} {statistics.median(t) * 1e3:6.2f} ms ({ratio:.3f} of bf16/bf16)"
            )


if __name__ == "__main__":
    main()
