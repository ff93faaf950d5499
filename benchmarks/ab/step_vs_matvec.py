"""The fused decoding step against the streaming limit of its own minute: each round times one big matvec (the
kernel `perceiver bench --efficiency` takes its ceiling from), then the step matrices as 46 separate calls, then
a cycle of cached steps, so that all three see the same state of this VM's memory bandwidth (which moved between
30 and 59 GB/s within single efficiency runs). Statistics as in the bench: best of 20 for the matvecs, the median
cached step (BENCHMARKS.md "Stop 27").

    THP_MEM_ALLOC_ENABLE=1 python benchmarks/ab/step_vs_matvec.py
"""

import time

import torch

from perceiver_cli import cpu_decode
from perceiver_cli.bench.core import VOCAB, bench_config, best_time
from perceiver_cli.bench.efficiency import _step_weight_bytes
from perceiver_cli.generate import SamplingOptions, generate_stream, step_model
from perceiver_cli.model import PerceiverAR

torch.set_num_threads(2)
torch.manual_seed(0)
model = PerceiverAR(bench_config(16384)).eval()
c = model.config
parameters = model.num_parameters()
weight = torch.randn(4096, parameters // 4096 // 16 * 16)  # as efficiency.streaming_bandwidth
vector = torch.randn(1, weight.shape[1])
packed_weight = cpu_decode.PackedWeight(weight)
matrices = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
inputs = {m.shape[1]: torch.randn(1, m.shape[1]) for m in matrices}
matrix_bytes = sum(m.numel() for m in matrices) * 4
matrices = [cpu_decode.PackedWeight(m) for m in matrices]  # packed once, as the C step's are


def each_matrix():
    for m in matrices:
        cpu_decode.linear(inputs[m.in_features], m)


for round in range(3):
    for batch in (1, 16):
        big = weight.numel() * 4 / best_time(lambda: cpu_decode.linear(vector, packed_weight), repeats=20)
        separate = matrix_bytes / best_time(each_matrix, repeats=20)
        prompt = torch.randint(0, VOCAB, (batch, 4096))
        stepper = step_model(model, torch.float32, batch)
        stamps = [
            time.perf_counter() for _ in generate_stream(model, prompt, 66, SamplingOptions(0), stepper=stepper)
        ]
        steps = sorted(
            b - a for a, b in zip(stamps[2:], stamps[3:], strict=False)
        )  # cached steps after the prefill
        step = steps[len(steps) // 2]
        step_bytes = (
            _step_weight_bytes(model, torch.float32) + batch * (4096 + 32 + c.num_layers * 1024) * 2 * c.d_model * 4
        )
        print(
            f"round {round} batch {batch:2d}: big matvec {big / 1e9:5.1f} GB/s | the 46 step matrices one call each "
            f"{separate / 1e9:5.1f} GB/s | fused step {step * 1e3:6.2f} ms = {step_bytes / step / 1e9:5.1f} GB/s "
            f"= {step_bytes / step / big:.0%} of the big matvec",
            flush=True,
        )
