"""The attention kernel alone, one cpu_attention.c against another, alternated in one process: inference at the
bench config's two shapes (8 heads of 64, 1,024 queries over 16,384 keys bottom-right causal, and 1,024 x 1,024
causal), fp32 and bf16, best of 3 calls per round (BENCHMARKS.md "Stop 33"). Each source needs the cpu_simd.h it
was written with beside it, e.g. for the start of stop 33:

    mkdir /tmp/before && git show 1e70649:perceiver_cli/cpu_attention.c > /tmp/before/cpu_attention.c
    git show 1e70649:perceiver_cli/cpu_simd.h > /tmp/before/cpu_simd.h
    python benchmarks/ab/attention_kernel.py /tmp/before/cpu_attention.c perceiver_cli/cpu_attention.c
"""

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402

from perceiver_cli import cpu_attention  # noqa: E402
from perceiver_cli.cpu_kernels import AVX512, FLAGS, load  # noqa: E402
from perceiver_cli.device import keep_freed_memory  # noqa: E402

SHAPES = [(1024, 16384), (1024, 1024)]  # (queries, keys)


def kernels_of(source: Path) -> dict:
    """cpu_attention._kernel()'s forward entries, bound from another version of the source."""
    library = load(source, (*AVX512, "avx512_bf16"), [*FLAGS, "-mavx512bf16"])
    current = cpu_attention._kernel()
    bound = {}
    for key, name in ((torch.bfloat16, "bf16_flash_attention"), (torch.float32, "f32_flash_attention")):
        function = getattr(library, name)
        function.argtypes, function.restype = current[key].argtypes, current[key].restype
        bound[key] = function
    workspace = library.bf16_flash_attention_workspace
    workspace.argtypes, workspace.restype = current["workspace"].argtypes, current["workspace"].restype
    library.attention_use_amx(cpu_attention.amx_on())
    return {**bound, "workspace": workspace}


def main(sources: list[str], rounds: int = 3) -> None:
    keep_freed_memory()
    torch.set_num_threads(2)
    versions = {source: kernels_of(Path(source).resolve()) for source in sources}
    original = cpu_attention._kernel
    inputs = {}
    for dtype in (torch.float32, torch.bfloat16):
        for n, keys in SHAPES:
            torch.manual_seed(0)
            inputs[dtype, n, keys] = [torch.randn(1, t, 8, 64).to(dtype).transpose(1, 2) for t in (n, keys, keys)]
    best: dict = {}
    for _ in range(rounds):
        for source, kernels in versions.items():
            cpu_attention._kernel = lambda kernels=kernels: kernels
            for (dtype, n, keys), (q, k, v) in inputs.items():
                cpu_attention.attention(q, k, v, causal=True)
                for _ in range(3):
                    start = time.perf_counter()
                    cpu_attention.attention(q, k, v, causal=True)
                    seconds = time.perf_counter() - start
                    key = (source, dtype, n, keys)
                    best[key] = min(best.get(key, seconds), seconds)
    cpu_attention._kernel = original
    for (source, dtype, n, keys), seconds in best.items():
        flops = 4 * 8 * 64 * sum(keys - n + i + 1 for i in range(n))
        print(
            f"{source}  {str(dtype)[6:]:8s} {n} x {keys:5d}: {seconds * 1e3:6.1f} ms, {flops / seconds / 1e9:5.0f} GFLOP/s"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
