"""Why per-token Python costs more than it does in a loop of its own: after a cached step has streamed ~80-160 MB
of weights and caches through the caches of the CPU, the interpreter's and PyTorch's own code and data are cold.
Times a few small PyTorch ops (a clone, ten softmaxes over 388 logits, an argmax) and a short Python loop, hot
(back to back) and right after one matvec over a 109 MB matrix (BENCHMARKS.md "Per-token overhead").

    python benchmarks/ab/cold_cache.py
"""

import statistics
import time

import torch

from perceiver_cli import cpu_decode

torch.set_num_threads(2)
weight = cpu_decode.PackedWeight(torch.randn(4096, 6656))
vector = torch.randn(1, 6656)
logits = torch.randn(1, 388)


def torch_ops():
    x = logits.clone()
    for _ in range(10):
        x = x.softmax(-1)
    return x.argmax(-1)


def python_loop():
    total = 0
    for i in range(200):
        total += i
    return total


for name, work in (("12 small PyTorch ops", torch_ops), ("a 200-iteration Python loop", python_loop)):
    hot, cold = [], []
    for _ in range(200):
        start = time.perf_counter()
        work()
        hot.append(time.perf_counter() - start)
    for _ in range(100):
        cpu_decode.linear(vector, weight)
        start = time.perf_counter()
        work()
        cold.append(time.perf_counter() - start)
    print(
        f"{name}: {statistics.median(hot) * 1e6:.1f} us back to back, "
        f"{statistics.median(cold) * 1e6:.1f} us right after a 109 MB matvec (medians)"
    )
