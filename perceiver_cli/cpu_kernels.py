"""Building and loading our C kernels (cpu_attention.c, cpu_decode.c, cpu_loss.c) at first use, with the system
C compiler.

Each kernel is plain C with AVX-512 intrinsics and no PyTorch headers. It is compiled once per source version and
flags into the user's cache folder (~2 s) and loaded through ctypes, which releases the GIL during a call. With
-fopenmp the library binds to the libgomp PyTorch already loaded (same soname), so a kernel's threads are the
ones PyTorch's last op left spinning, not new ones competing for the cores. Where the CPU lacks the
instructions, there is no working compiler, the cache folder is not writable, or `PERCEIVER_CPU_KERNELS=0`,
`load` returns None and the callers keep PyTorch's paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

from .device import cpu_flags

AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-fopenmp", "-fPIC", "-shared"]


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "perceiver" / "kernels"


def build(source: Path, flags: list[str] = FLAGS) -> Path:
    """Compile a kernel once per source version and flags into the user's cache folder; the .so is written to a
    temporary name and renamed into place, so concurrent first uses never load a partial file."""
    compiler = os.environ.get("CC", "cc")
    headers = b"".join(path.read_bytes() for path in sorted(source.parent.glob("*.h")))  # what it may include
    digest = hashlib.sha256(source.read_bytes() + headers + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        subprocess.run([compiler, *flags, "-o", partial, str(source), "-lm"], check=True, capture_output=True)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def load(source: Path, needs: tuple[str, ...], flags: list[str] = FLAGS) -> ctypes.CDLL | None:
    """The compiled library, or None where the CPU lacks one of the flags `needs`, there is no working compiler,
    or PERCEIVER_CPU_KERNELS=0 turns our kernels off."""
    if os.environ.get("PERCEIVER_CPU_KERNELS", "1") == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64") or not set(needs) <= cpu_flags():
        return None
    try:
        return ctypes.CDLL(str(build(source, flags)))
    except (OSError, subprocess.CalledProcessError):
        return None  # no compiler, or one too old for these instructions: PyTorch's kernels remain
