"""Cached steps alone: the bench model after a 4,096-token prompt (prefill and first refill untimed), then STEPS
cached steps of the fused C step, as `--dtype fp32` or `auto` runs them; prints tokens/s and ms per step. One
fresh process per measurement (run it alternated with a worktree's copy for an A/B; BENCHMARKS.md "Stop 36").

    python benchmarks/ab/cached_steps.py BATCH fp32|auto [STEPS]
"""

import sys
import time

import torch

from perceiver_cli.bench.core import VOCAB, bench_config
from perceiver_cli.device import keep_freed_memory
from perceiver_cli.generate import (
    DecodeState,
    auto_decode_dtypes,
    next_window,
    prompt_window,
    step_model,
    step_weights_dtype,
)
from perceiver_cli.model import PerceiverAR


def main(batch: int, mode: str, steps: int = 300) -> None:
    keep_freed_memory()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = PerceiverAR(bench_config(16384)).eval()
    c, cpu = model.config, torch.device("cpu")
    auto = mode == "auto"
    stepper = step_model(model, step_weights_dtype(cpu, batch, torch.float32) if auto else torch.float32, batch)
    prompt = torch.randint(0, VOCAB, (batch, 4096))
    with torch.no_grad():
        state = DecodeState(
            model, batch, 4096 + steps + 1, cpu, stepper, **(auto_decode_dtypes(cpu) if auto else {})
        )
        window = prompt_window(4096, c.max_context, c.num_latents, None)
        state.tokens[:, : window.start] = prompt[:, : window.start]
        state.length = state.cross_start = window.start
        state.append_inputs(prompt[:, window.start :])
        state.latent_pass(window)
        start = time.perf_counter()
        for _ in range(steps):
            window = next_window(window, c.max_context, c.num_latents, None)
            assert not window.refill, "STEPS must stay within one refill cycle (N - R = 512 for the bench model)"
            state.append_inputs(torch.randint(0, VOCAB, (batch, 1)))
            state.step(window)
        seconds = time.perf_counter() - start
    print(f"batch {batch} {mode}: {steps * batch / seconds:.1f} tokens/s, {seconds / steps * 1e3:.2f} ms/step")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], *(int(a) for a in sys.argv[3:]))
