"""Rotary position encoding of the bench config's keys at 16,384 positions (8 heads of 64, 32 rotated dims, a
view of the key/value projection as the model has it) and of 1,024 latents' queries: model.apply_rotary against
cpu_attention's one C pass, in place for inference and forward + backward for training, best of 10 after a
warm-up (BENCHMARKS.md "Stop 33").

    python benchmarks/ab/rotary.py
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

from perceiver_cli import cpu_attention  # noqa: E402
from perceiver_cli.bench.core import best_time  # noqa: E402
from perceiver_cli.device import keep_freed_memory  # noqa: E402
from perceiver_cli.model import apply_rotary, rotary_tables  # noqa: E402


def best_ms(function) -> float:
    return best_time(function, repeats=10) * 1e3


def measure(length: int) -> str:
    projection = torch.randn(1, length, 1024)
    key = projection[..., :512].view(1, length, 8, 64).transpose(1, 2)
    cos, sin = rotary_tables(torch.arange(length)[None], 32, 10_000.0, torch.float32)
    grad = torch.randn(1, length, 8, 64).transpose(1, 2)
    trainable = key.detach().clone().requires_grad_()
    return (
        f"{length:6d} positions: inference apply_rotary {best_ms(lambda: apply_rotary(key, cos, sin)):.2f} ms,"
        f" in place {best_ms(lambda: cpu_attention.rotary_in_place(key, cos, sin)):.2f} ms;"
        f" training apply_rotary {best_ms(lambda: apply_rotary(trainable, cos, sin).backward(grad)):.2f} ms,"
        f" C {best_ms(lambda: cpu_attention.trainable_rotary(trainable, cos, sin).backward(grad)):.2f} ms"
    )


def main() -> None:
    keep_freed_memory()
    torch.set_num_threads(2)
    for length in (16384, 1024):
        print(measure(length))


if __name__ == "__main__":
    main()
