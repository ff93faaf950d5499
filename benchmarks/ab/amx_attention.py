"""cpu_attention.c on AMX tiles, on vdpbf16ps, and PyTorch's bf16 attention, at Perceiver AR's shapes.

On CPUs with AMX PyTorch's flash kernels multiply on AMX tiles too; this script is what the dispatch in
cpu_attention.supports rests on (BENCHMARKS.md "Stop 31").

    python benchmarks/ab/amx_attention.py      # 2 threads, 8 heads of 64, 1,024 queries, bottom-right causal
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
    amx = cpu_attention.amx_on()
    print(f"AMX: {amx}; bf16, 8 heads of 64, 1,024 queries, bottom-right causal; best of 3")
    print(
        "| keys | inference: ours, AMX | ours, vdpbf16ps | PyTorch | training (fwd + bwd): ours, AMX | ours, vdpbf16ps | PyTorch |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for num_keys in (1024, 4096, 16384):
        inference, training = measure(num_keys, amx)
        print(f"| {num_keys:,} | " + " | ".join(f"{t * 1e3:.1f} ms" for t in inference + training) + " |")
    cpu_attention.use_amx(amx)


def measure(num_keys: int, amx: bool) -> tuple[list[float], list[float]]:
    """Best times over `num_keys` keys of ours on AMX (nan without it), ours on vdpbf16ps and PyTorch's
    attention: inference, then forward and backward."""
    q, k, v = (torch.randn(1, 8, n, 64, dtype=torch.bfloat16) for n in (1024, num_keys, num_keys))
    grad = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def ours(on_amx: bool, training: bool) -> float:
        if on_amx and not amx:
            return float("nan")
        cpu_attention.use_amx(on_amx)
        if training:
            return best_time(lambda: cpu_attention.trainable_attention(*leaves, causal=True).backward(grad))
        return best_time(lambda: cpu_attention.attention(q, k, v, causal=True))

    def pytorch(training: bool) -> float:
        supports = cpu_attention.supports
        cpu_attention.supports = lambda *args, **kwargs: False  # what causal_attention does without ours
        try:
            if training:
                return best_time(lambda: perceiver_model.causal_attention(*leaves).backward(grad))
            with torch.no_grad():
                return best_time(lambda: perceiver_model.causal_attention(q, k, v))
        finally:
            cpu_attention.supports = supports

    return [ours(True, False), ours(False, False), pytorch(False)], [
        ours(True, True),
        ours(False, True),
        pytorch(True),
    ]


if __name__ == "__main__":
    main()
