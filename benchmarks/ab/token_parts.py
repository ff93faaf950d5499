"""Where a batch-1 token of the bench config goes around the fused C step (greedy, after a 4,096-token prompt, fp32
step weights): generate_stream's loop written out with a timer around each part, medians of the cached steps
(BENCHMARKS.md "Stop 29"). Each part runs right after the step or the part before it, i.e. cold.

    THP_MEM_ALLOC_ENABLE=1 python benchmarks/ab/token_parts.py
"""

import statistics
import time

import torch
from step_overhead import timed  # benchmarks/ab/, the script's own folder

from perceiver_cli.bench.core import VOCAB, bench_config
from perceiver_cli.generate import (
    DecodeState,
    SamplingOptions,
    Step,
    next_window,
    prompt_window,
    sample_next,
    step_model,
)
from perceiver_cli.model import PerceiverAR


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = PerceiverAR(bench_config(16384)).eval()
    c = model.config
    options = SamplingOptions(temperature=0)
    with torch.no_grad():
        state = DecodeState(model, 1, 4096 + 300, torch.device("cpu"), step_model(model, torch.float32, 1))
        window = prompt_window(4096, c.max_context, c.num_latents, None)
        state.append_inputs(torch.randint(0, VOCAB, (1, 4096)))
        logits = state.latent_pass(window)
        calls: list[float] = []
        state.fused.step = timed(state.fused.step, calls)
        parts = {
            name: [] for name in ("next_window", "sampling", "append_token", "DecodeState.step", "Step record")
        }
        for _ in range(250):
            t0 = time.perf_counter()
            window = next_window(window, c.max_context, c.num_latents, None)
            t1 = time.perf_counter()
            new_tokens = sample_next(logits, options)
            t2 = time.perf_counter()
            state.append_token(new_tokens)
            t3 = time.perf_counter()
            logits = state.latent_pass(window) if window.refill else state.step(window)
            t4 = time.perf_counter()
            Step(new_tokens, logits if logits.dtype == torch.float32 else logits.float(), window)
            t5 = time.perf_counter()
            if not window.refill:
                for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                    parts[name].append(seconds)
    medians = {name: statistics.median(values) * 1e6 for name, values in parts.items()}
    medians["of which the C call"] = statistics.median(calls) * 1e6
    print(" | ".join(f"{name} {us:.1f} us" for name, us in medians.items()))


if __name__ == "__main__":
    main()
