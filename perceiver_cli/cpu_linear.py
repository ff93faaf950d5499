"""bf16 linear layers on AMX tiles (Intel Sapphire Rapids and later) for inference, from cpu_linear.c.

Under bf16 autocast PyTorch casts every weight to bf16 again on every call, and oneDNN runs the MLP's down
projection (K = 4 d > N = d) at about a third of its square-GEMM speed (BENCHMARKS.md "Stop 34"). `linear`
computes the same product (bf16 operands, fp32 sums, a bf16 result) over weights packed once into the AMX
layout and kept beside the weight until the weight changes; an optional exact GELU runs on the fp32 sums before
the rounding. model.Linear uses it for inference (no gradient) under bf16 autocast wherever `supports` says so;
training and every other case keep PyTorch's.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from .cpu_kernels import AVX512, FLAGS, load

SOURCE = Path(__file__).with_name("cpu_linear.c")
ACTIVATIONS = {None: 0, "gelu": 1}


@cache
def _kernel():
    needs = (*AVX512, "avx512_bf16", "amx_tile", "amx_bf16")
    library = load(SOURCE, needs, [*FLAGS, "-mavx512bf16", "-mamx-tile", "-mamx-bf16"])
    if library is None or not library.linear_available():
        return None
    library.linear_packed_size.argtypes, library.linear_packed_size.restype = [ctypes.c_int] * 2, ctypes.c_long
    pack = library.linear_pack
    pack.argtypes = [ctypes.c_int] * 2 + [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_long,
        ctypes.c_void_p,
        ctypes.c_int,
    ]
    pack.restype = ctypes.c_int
    forward = library.linear_forward
    forward.argtypes = [ctypes.c_long] + [ctypes.c_int] * 2 + [ctypes.c_void_p, ctypes.c_int, ctypes.c_long]
    forward.argtypes += [ctypes.c_void_p] * 2 + [ctypes.c_int, ctypes.c_long] + [ctypes.c_int] * 2
    forward.restype = ctypes.c_int
    return library


def available() -> bool:
    return _kernel() is not None


def supports(x: Tensor, weight: Tensor) -> bool:
    """Whether `linear` takes x (..., K) and weight (N, K): bf16 autocast inference on an AMX CPU, K % 32 == 0."""
    return (
        x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype in (torch.float32, torch.bfloat16)
        and weight.dim() == 2
        and weight.shape[1] % 32 == 0
        and x.shape[-1] == weight.shape[1]
        and not torch.compiler.is_compiling()
        and available()
    )


def pack(weight: Tensor) -> Tensor:
    """The packed bf16 copy of weight (N, K) that `linear` reads."""
    kernel = _kernel()
    out_features, in_features = weight.shape
    weight = weight.detach()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    packed = torch.empty(kernel.linear_packed_size(out_features, in_features), dtype=torch.bfloat16)
    status = kernel.linear_pack(
        out_features, in_features, weight.data_ptr(), int(weight.dtype == torch.bfloat16), weight.stride(0),
        packed.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise RuntimeError(f"cpu_linear pack failed with status {status}")
    return packed


def packed_weight(weight: Tensor) -> Tensor:
    """pack(weight), kept on the weight itself and made again after any in-place change (an optimizer step) or
    when the storage is swapped (load_state_dict)."""
    key = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
    cached = getattr(weight, "_perceiver_packed", None)
    if cached is None or cached[0] != key:
        cached = (key, pack(weight))
        weight._perceiver_packed = cached
    return cached[1]


def linear(x: Tensor, weight: Tensor, activation: str | None = None) -> Tensor:
    """activation(x @ weight.T) in bf16, as F.linear under bf16 autocast computes it (see `supports`)."""
    out_features, in_features = weight.shape
    rows = x.reshape(-1, in_features)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], out_features, dtype=torch.bfloat16)
    status = _kernel().linear_forward(
        rows.shape[0], out_features, in_features, rows.data_ptr(), int(rows.dtype == torch.bfloat16),
        rows.stride(0), packed_weight(weight).data_ptr(), out.data_ptr(), 1, out.stride(0), ACTIVATIONS[activation],
        torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise RuntimeError(f"cpu_linear kernel failed with status {status}")
    return out.view(*x.shape[:-1], out_features)
