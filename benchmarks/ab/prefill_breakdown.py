"""Where a 16k bf16 prefill of the bench model spends its time among our kernels: each call of cpu_linear's and
cpu_attention's kernels timed in the model (the per-call minimum over 7 prefills), summed by shape, and the time
between calls (BENCHMARKS.md "Stop 34"). With `fp32`: an fp32 prefill that projects every position's keys and
values (the issue's count, `perceiver bench --efficiency`'s prefill_fp32 row), its products (F.linear; oneDNN's linear_fp32 from stop 38) timed too (BENCHMARKS.md "Stop 37", "Stop 38").

    python benchmarks/ab/prefill_breakdown.py [fp32]
"""

import collections
import sys
import time

import torch

from perceiver_cli import cpu_attention, cpu_linear
from perceiver_cli.bench.core import VOCAB, bench_config
from perceiver_cli.device import autocast, keep_freed_memory
from perceiver_cli.model import PerceiverAR


def main(fp32: bool = False) -> None:
    keep_freed_memory()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = PerceiverAR(bench_config(16384)).eval()
    model.project_vocabulary = not fp32
    tokens = torch.randint(0, VOCAB, (1, 16384))
    log: list = []

    def timed(module, name, label):
        function = getattr(module, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            log.append((label(args), time.perf_counter() - start, start))
            return result

        setattr(module, name, wrapper)

    timed(
        cpu_linear,
        "linear",
        lambda a: (
            f"linear {tuple(a[0].shape[-2:])} -> {sum(w.shape[0] for w in a[1]) if isinstance(a[1], tuple) else a[1].shape[0]}"
        ),
    )
    timed(cpu_attention, "attention", lambda a: f"attention over {a[1].shape[-2]} keys")
    timed(cpu_attention, "rotary_in_place", lambda a: f"rotary of {a[0].shape[-2]} rows")
    if fp32:  # the products: oneDNN's since stop 38 (norm, GELU and add included), F.linear's where it is not here
        timed(torch.nn.functional, "linear", lambda a: f"F.linear {tuple(a[0].shape[-2:])} -> {a[1].shape[0]}")
        timed(
            cpu_linear,
            "linear_fp32",
            lambda a: (
                f"oneDNN {tuple(a[0].shape[-2:])}{' rows' if len(a) > 5 and a[5] is not None else ''} -> {a[1].shape[0]}"
            ),
        )

    def prefill():
        with torch.no_grad(), autocast(torch.device("cpu"), torch.float32 if fp32 else torch.bfloat16):
            model(tokens)

    for _ in range(3):
        prefill()
    runs = []
    for _ in range(7):
        log.clear()
        start = time.perf_counter()
        prefill()
        runs.append((time.perf_counter() - start, list(log), start))
    minima = [min(run[1][i][1] for run in runs) for i in range(len(runs[0][1]))]
    totals: dict = collections.defaultdict(float)
    for (label, _, _), seconds in zip(runs[0][1], minima, strict=True):
        totals[label] += seconds
    wall, calls, start = min(runs, key=lambda run: run[0])
    print(f"prefill walls (ms): {' '.join(f'{w * 1e3:.1f}' for w, _, _ in runs)}")
    for label, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"{seconds * 1e3:8.2f} ms  {label}")
    inside = sum(seconds for _, seconds, _ in calls)
    print(
        f"best prefill {wall * 1e3:.1f} ms: {inside * 1e3:.1f} ms in these kernels, {(wall - inside) * 1e3:.1f} between"
    )


if __name__ == "__main__":
    main(sys.argv[1:] == ["fp32"])
