"""The fused steps of a batch of one prompt with the shared cache slots read from row 0 (on) or from each row's
own copy (off), alternated in blocks of 20 steps in one process (so that the VM's slow and fast phases fall on
both): the bench model after a 4,096-token prompt (fp32 and `auto`) and text-v1 after a 3,000-token prompt
(`auto`, whose cross-attention reads its caches), batch 16, the first 480 steps after the prompt (text-v1's
refill after 256 untimed: from there on only its cross-attention slots are shared); median tokens/s of each
side's blocks (BENCHMARKS.md "Stop 37").

    python benchmarks/ab/shared_slots_toggle.py
"""

import time

import torch

from perceiver_cli import runner
from perceiver_cli.bench.core import bench_config
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

BATCH, BLOCK, STEPS = 16, 20, 480


def toggled(model, length, stepper, paths) -> tuple[float, float]:
    c, cpu = model.config, torch.device("cpu")
    prompt = torch.randint(1, 250, (1, length), generator=torch.Generator().manual_seed(1)).repeat(BATCH, 1)
    state = DecodeState(model, BATCH, length + STEPS + 1, cpu, stepper, **paths)
    state.shared_rows = True
    window = prompt_window(length, c.max_context, c.num_latents, None)
    state.append_inputs(prompt)
    state.latent_pass(window)
    shared = (state.shared_end, state.shared_latents)
    rates = {True: [], False: []}
    for block in range(STEPS // BLOCK):
        on = block % 2 == 1
        seconds = 0.0
        for _ in range(BLOCK):
            window = next_window(window, c.max_context, c.num_latents, None)
            state.append_inputs(torch.randint(1, 250, (BATCH, 1)))
            if window.refill:  # untimed; the latent slots are each row's own from here on
                state.latent_pass(window)
                shared = (shared[0], 0)
                continue
            state.shared_end, state.shared_latents = shared if on else (0, 0)
            start = time.perf_counter()
            state.step(window)
            seconds += time.perf_counter() - start
        rates[on].append(BATCH * BLOCK / seconds)
    return tuple(sorted(rates[on])[len(rates[on]) // 2] for on in (False, True))


def main() -> None:
    keep_freed_memory()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    bench = PerceiverAR(bench_config(16384)).eval()
    auto = step_weights_dtype(cpu, BATCH, torch.float32)
    text = runner.load("text-v1", "text")
    cases = [
        ("bench model fp32", bench, 4096, step_model(bench, torch.float32, BATCH), {}),
        ("bench model auto", bench, 4096, step_model(bench, auto, BATCH), auto_decode_dtypes(cpu)),
        ("text-v1 auto", text.model, 3000, text.stepper(BATCH), text.decode_dtypes),
    ]
    for name, model, length, stepper, paths in cases:
        with torch.no_grad():
            off, on = toggled(model, length, stepper, paths)
        print(f"{name:17} batch {BATCH}, prompt {length}: own copies {off:7.1f}, shared slots from row 0 {on:7.1f} "
              f"tokens/s ({on / off:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
