"""cpu_linear.c's kernel against F.linear under bf16 autocast (oneDNN, casting the fp32 weight on every call as
autocast does), shape by shape: the bench model's layers at 16k tokens and a 2048^3 GEMM, best of 30 calls after
a warm-up, freed memory kept (BENCHMARKS.md "Stop 34"). Each call repeats on the same weight and input, so both
run warm; in a prefill the layers run ~1.5x slower.

    python benchmarks/ab/linear_kernel.py
"""

import torch
import torch.nn.functional as F

from perceiver_cli import cpu_linear
from perceiver_cli.bench.core import best_time
from perceiver_cli.device import cpu_name, keep_freed_memory

SHAPES = [  # rows, in, out, activation, what
    (1024, 2048, 512, None, "MLP down"),
    (1024, 512, 2048, None, "MLP up"),
    (1024, 512, 2048, "gelu", "MLP up + GELU"),
    (1024, 512, 512, None, "query / output"),
    (1024, 512, 1536, None, "query + key/value"),
    (16384, 512, 1024, None, "key/value of 16k inputs"),
    (1024, 512, 388, None, "head"),
    (2048, 2048, 2048, None, "2048^3"),
]


def main() -> None:
    if not cpu_linear.available():
        raise SystemExit("cpu_linear's kernel needs AMX, AVX512-BF16 and a C compiler")
    keep_freed_memory()
    torch.manual_seed(0)
    print(f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'layer':26s} {'shape':22s} {'oneDNN':>16s} {'cpu_linear':>16s}")
    for rows, k, n, activation, what in SHAPES:
        x, weight = torch.randn(rows, k).bfloat16(), torch.randn(n, k) * 0.05
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            theirs = best_time(
                lambda x=x, w=weight, a=activation: F.gelu(F.linear(x, w)) if a else F.linear(x, w), 30
            )
            ours = best_time(lambda x=x, w=weight, a=activation: cpu_linear.linear(x, w, a), 30)
        flops = 2 * rows * k * n
        cells = [f"{s * 1e3:6.3f} ms {flops / s / 1e12:4.2f} TF" for s in (theirs, ours)]
        print(f"{what:26s} {f'{rows} x {k} -> {n}':22s} {cells[0]:>16s} {cells[1]:>16s}")


if __name__ == "__main__":
    main()
