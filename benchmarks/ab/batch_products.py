"""The fused step's product (cpu_decode.c's f32_matvec) at 16 rows, GFLOP/s, for builds of cpu_decode.c side by
side (BENCHMARKS.md "Stop 29"). "cold": ~96 MB of distinct packed matrices of each decode shape, one product
each in turn, so that the weights come from memory as in a step; "hot": one matrix 200 times (it stays in
L2/L3): what the arithmetic alone reaches. Best (worst) of 4 rounds, the builds alternated within each round.

    git show COMMIT:perceiver_cli/cpu_decode.c > /tmp/before.c; cp perceiver_cli/cpu_simd.h /tmp/
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/ab/batch_products.py /tmp/before.c perceiver_cli/cpu_decode.c
"""

import ctypes
import sys
import time
from pathlib import Path

import torch

from perceiver_cli import cpu_decode, cpu_kernels

ROWS = 16
SHAPES = [(2048, 512), (512, 2048), (512, 512)]  # the MLP's up and down, the attention's query/out


def main() -> None:
    torch.set_num_threads(2)
    builds = {}
    for source in sys.argv[1:]:
        library = cpu_kernels.load(Path(source), cpu_kernels.AVX512)
        if library is None:
            sys.exit(f"could not build {source}")
        library.f32_matvec.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p] + [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
        ]  # fmt: skip
        builds[Path(source).name] = library.f32_matvec
    for out, size in SHAPES:
        x, y = torch.randn(ROWS, size), torch.empty(ROWS, out)
        matrices = [cpu_decode.pack(torch.randn(out, size)) for _ in range(96 * 2**20 // (out * size * 4))]
        for label, pool, repeats in (("cold", matrices, 1), ("hot", matrices[:1], 200)):
            rates = {name: [] for name in builds}
            for _ in range(4):
                for name, matvec in builds.items():
                    start = time.perf_counter()
                    for _ in range(repeats):
                        for w in pool:
                            matvec(w.data_ptr(), out, size, x.data_ptr(), ROWS, y.data_ptr(), 2)
                    seconds = time.perf_counter() - start
                    rates[name].append(2 * out * size * ROWS * len(pool) * repeats / seconds / 1e9)
            print(
                f"{out}x{size} {label}: "
                + " | ".join(f"{name} {max(r):.0f} ({min(r):.0f}) GFLOP/s" for name, r in rates.items()),
                flush=True,
            )


if __name__ == "__main__":
    main()
