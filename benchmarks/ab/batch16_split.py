"""Where a batch-16 fp32 step of the fused C step goes: the same cached steps after a 2-token prompt (the
products, their weights and tiny caches) and after a 4,096-token prompt (the same plus 536 MB more of caches a
step), medians, with the median of five matvecs of the bench's ceiling kernel before each round
(BENCHMARKS.md "Stop 28").

    python benchmarks/ab/batch16_split.py
"""

import statistics
import time

import torch

from perceiver_cli.bench.core import VOCAB, bench_config
from perceiver_cli.bench.efficiency import paired_matvec
from perceiver_cli.generate import SamplingOptions, generate_stream, step_model
from perceiver_cli.model import PerceiverAR

torch.set_num_threads(2)
torch.manual_seed(0)
model = PerceiverAR(bench_config(16384)).eval()
c = model.config
stepper = step_model(model, torch.float32, 16)
pair = paired_matvec(model.num_parameters())


def cache_bytes(window) -> int:
    """Bytes of caches one step reads: 16 rows x (the cross-attention window + each layer's latents) x K and V."""
    return 16 * ((window.end - window.start) + c.num_layers * window.num_latents) * 2 * c.d_model * 4


def median_step(prompt_length: int, new_tokens: int = 80):
    """The median cached step after a prompt of `prompt_length` tokens, and the last window."""
    prompt = torch.randint(0, VOCAB, (16, prompt_length))
    stamps = []
    for step in generate_stream(model, prompt, new_tokens, SamplingOptions(0), stepper=stepper):
        stamps.append((time.perf_counter(), step.window))
    durations = [b[0] - a[0] for a, b in zip(stamps[1:], stamps[2:], strict=False) if not b[1].refill]
    return statistics.median(durations), stamps[-1][1]


for _ in range(3):
    bandwidth = statistics.median([pair() for _ in range(5)])
    short, short_window = median_step(2)
    long, long_window = median_step(4096)
    extra = cache_bytes(long_window) - cache_bytes(short_window)
    print(
        f"matvec {bandwidth / 1e9:.1f} GB/s | short-prompt step {short * 1e3:.2f} ms | 4096 step {long * 1e3:.2f} ms: "
        f"+{(long - short) * 1e3:.2f} ms for +{extra / 1e6:.0f} MB of caches = {extra / (long - short) / 1e9:.1f} GB/s",
        flush=True,
    )
