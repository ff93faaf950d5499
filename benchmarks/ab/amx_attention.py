"""cpu_attention.c against PyTorch's bf16 attention at Perceiver AR's shapes, inference and training.

On CPUs with AMX PyTorch's flash kernels multiply on AMX tiles; ours use vdpbf16ps. This script is what the
dispatch in cpu_attention.supports rests on (BENCHMARKS.md "AMX: PyTorch's bf16 attention").

    python benchmarks/ab/amx_attention.py      # 2 threads, 8 heads of 64, 1,024 queries
"""

import time

import torch

from perceiver_cli import cpu_attention
from perceiver_cli import model as perceiver_model


def best_time(function, repeats: int = 3) -> float:
    function()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    torch.set_num_threads(2)
    print(
        f"AMX: {'amx_bf16' in cpu_attention.cpu_flags()}; bf16, 8 heads of 64, 1,024 queries, bottom-right causal"
    )
    print("| keys | inference: ours | PyTorch | training (fwd+bwd): ours | PyTorch |")
    print("|---:|---:|---:|---:|---:|")
    for num_keys in (1024, 4096, 16384):
        times = measure(num_keys)
        print(f"| {num_keys:,} | " + " | ".join(f"{t * 1e3:.1f} ms" for t in times) + " |")


def measure(num_keys: int) -> list[float]:
    """Best times of ours and PyTorch's attention over `num_keys` keys: inference, then forward and backward."""
    q, k, v = (torch.randn(1, 8, n, 64, dtype=torch.bfloat16) for n in (1024, num_keys, num_keys))
    grad = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def ours_inference():
        cpu_attention.attention(q, k, v, causal=True)

    def ours_training():
        cpu_attention.trainable_attention(*leaves, causal=True).backward(grad)

    def pytorch(training: bool):
        supports = cpu_attention.supports
        cpu_attention.supports = lambda *args, **kwargs: False  # what causal_attention does without ours
        try:
            if training:
                perceiver_model.causal_attention(*leaves).backward(grad)
            else:
                with torch.no_grad():
                    perceiver_model.causal_attention(q, k, v)
        finally:
            cpu_attention.supports = supports

    return [best_time(f) for f in (ours_inference, lambda: pytorch(False), ours_training, lambda: pytorch(True))]


if __name__ == "__main__":
    main()
