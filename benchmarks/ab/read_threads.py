"""How the memory's read bandwidth scales with the cores that read: a plain sum over 1 GiB of fp32 (no cache holds
it) with 1 and 2 threads, alternated twice, best of 6 each (BENCHMARKS.md "Stop 38": why the batch-16 step's
streaming and its products cannot be given a core each).

    python benchmarks/ab/read_threads.py
"""

import time

import torch


def main() -> None:
    values = torch.ones(256 * 1024 * 1024)
    for threads in (1, 2, 1, 2):
        torch.set_num_threads(threads)
        best = min(_timed(values.sum) for _ in range(6))
        print(
            f"{threads} thread{'s' if threads > 1 else ''}: {values.numel() * 4 / best / 1e9:.1f} GB/s", flush=True
        )


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
