"""Device and compute-dtype choice shared by generate, train, eval and bench.

`--dtype auto` uses bf16 autocast only where it is fast: on CUDA, and on CPUs whose /proc/cpuinfo lists
avx512_bf16 or amx_bf16. On AVX2-only CPUs bf16 matmuls are ~100x slower than fp32, so auto means fp32 there.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache

import torch

DTYPES = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags /proc/cpuinfo lists (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    return "avx512_bf16" in cpu_flags() or "amx_bf16" in cpu_flags()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def resolve_device(name: str = "auto") -> torch.device:
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r} (choose from {', '.join(DEVICES)})")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, purpose: str = "train") -> torch.dtype:
    """The autocast compute dtype: torch.bfloat16 or torch.float32.

    purpose="decode": token-by-token generation on a CPU is matrix-vector work, where autocast re-casts every
    fp32 weight to bf16 on each call; measured here (Xeon with AMX, music-v1, batch 1) that ran at 2.5 tokens/s
    against 37 in fp32, so `auto` decodes in fp32 on CPUs and keeps bf16 for the matmul-bound work (where the
    fused C step runs, generate.DecodeState's refill_dtype puts the prefill and refills back in bf16).
    """
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16
    if purpose == "decode":
        return torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def decode_threads() -> int:
    """Threads for token-by-token decoding on a CPU: the cores other processes leave free.

    Each decoded token is ~50 small kernels, and every one of them waits for all threads; if another process
    holds a core, 2 threads on 2 cores fell from 265 to 9 tokens/s on music-v1 while 1 thread kept 161.
    So use the cores not already busy (1-minute load average), at least one; OMP_NUM_THREADS overrides.
    """
    import os

    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, cores - int(busy + 0.5)))


def autocast(device: torch.device, dtype: torch.dtype):
    """A context manager: bf16 autocast, or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEPT_FREED_MEMORY = False


def keep_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Make glibc's malloc keep freed blocks of up to `limit_bytes` for reuse instead of returning them to the OS.

    By default glibc serves every block over 32 MB (and, until its threshold adapts, over 128 KiB) with its own
    mmap and unmaps it on free, and trims the heap's free top. A forward pass allocates and frees dozens of such
    activations, so each one comes back as fresh pages: a 16k-token fp32 prefill of the bench config took
    13,000-60,000 page faults and spent them inside GELU, LayerNorm and the embedding lookup (a GELU over
    1024 x 2048 took 3.2 ms in the model, 0.5 ms alone). With this, the second and later passes fault almost
    never and run ~10% faster (BENCHMARKS.md "Keeping freed memory"). The cost: the process keeps its peak heap
    until it exits. Returns whether it took effect (glibc on Linux only); the command line calls it once at
    start unless PERCEIVER_KEEP_FREED_MEMORY=0.
    """
    global _KEPT_FREED_MEMORY
    import ctypes
    import platform
    import sys

    if _KEPT_FREED_MEMORY:
        return True
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        limit = int(min(limit_bytes, 2**31 - 1))
        _KEPT_FREED_MEMORY = bool(libc.mallopt(_M_MMAP_THRESHOLD, limit)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, limit)
        )
    except (OSError, AttributeError):
        return False
    return _KEPT_FREED_MEMORY


def kept_freed_memory() -> bool:
    """Whether keep_freed_memory() took effect in this process."""
    return _KEPT_FREED_MEMORY


def adamw(parameters: list, **options) -> torch.optim.AdamW:
    """AdamW as one fused kernel over every parameter (CPU since torch 2.4, and CUDA): on 2 cores a step over the
    bench config's 28.5 M parameters takes 17 ms against foreach's 56 (BENCHMARKS.md "Stop 33"). Where this
    torch has no fused kernel for the device, the foreach one."""
    try:
        return torch.optim.AdamW(parameters, fused=True, **options)
    except RuntimeError:
        return torch.optim.AdamW(parameters, foreach=True, **options)
