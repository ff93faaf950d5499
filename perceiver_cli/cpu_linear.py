"""Linear layers for inference on CPUs: bf16 on AMX tiles (Intel Sapphire Rapids and later) from cpu_linear.c, and
fp32 through PyTorch's oneDNN on weights prepacked once (`linear_fp32`, at the end).

Under bf16 autocast PyTorch casts every weight to bf16 again on every call, and oneDNN runs the MLP's down
projection (K = 4 d > N = d) at about a third of its square-GEMM speed (BENCHMARKS.md "Stop 34"). `linear`
computes the same product (bf16 operands, fp32 sums, a bf16 result) over weights packed once into the AMX
layout and kept beside the weight until the weight changes, and folds in what the model does around it: the
LayerNorm before, the GELU (to ~1e-4), the residual add and rotary position on the fp32 sums, an embedding
lookup of its input rows. model.Linear and model.Attention use it for inference (no gradient) under bf16 autocast
wherever `supports` says so; training and every other case keep PyTorch's.
"""

from __future__ import annotations

import ctypes
import platform
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .cpu_kernels import AVX512, FLAGS, load

SOURCE = Path(__file__).with_name("cpu_linear.c")
ACTIVATIONS = {None: 0, "gelu": 1}


class _Linear(ctypes.Structure):
    """cpu_linear.c's struct Linear: one call's operands."""

    _fields_ = [
        ("M", ctypes.c_long),
        ("N", ctypes.c_int),
        ("K", ctypes.c_int),
        ("x", ctypes.c_void_p),
        ("x_is_bf16", ctypes.c_int),
        ("x_row_stride", ctypes.c_long),
        ("rows", ctypes.c_void_p),
        ("norm_weight", ctypes.c_void_p),
        ("norm_bias", ctypes.c_void_p),
        ("norm_eps", ctypes.c_float),
        ("packed", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("out_is_bf16", ctypes.c_int),
        ("out_row_stride", ctypes.c_long),
        ("residual", ctypes.c_void_p),
        ("residual_row_stride", ctypes.c_long),
        ("rotary_cos", ctypes.c_void_p),
        ("rotary_sin", ctypes.c_void_p),
        ("rotary_rows", ctypes.c_long),
        ("rotary_columns", ctypes.c_long),
        ("head_dim", ctypes.c_int),
        ("activation", ctypes.c_int),
        ("threads", ctypes.c_int),
    ]


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
    library.linear_forward.argtypes, library.linear_forward.restype = [ctypes.POINTER(_Linear)], ctypes.c_int
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


def packed_weight(weight: Tensor | tuple[Tensor, ...]) -> Tensor:
    """pack(weight), kept on the weight itself and made again after any in-place change (an optimizer step) or
    when the storage is swapped (load_state_dict). A tuple of weights (N_i, K) packs their rows one after another,
    one product's columns for all of them (kept on the first)."""
    parts = weight if isinstance(weight, tuple) else (weight,)
    key = tuple((part.data_ptr(), part._version, part.dtype, tuple(part.shape)) for part in parts)
    kept = parts[0].__dict__.setdefault("_perceiver_packed", {})  # by how many weights it heads
    if kept.get(len(parts), (None,))[0] != key:
        kept[len(parts)] = (key, pack(torch.cat([part.detach() for part in parts]) if len(parts) > 1 else parts[0]))
    return kept[len(parts)][1]


def _bump_versions(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """After every optimizer step: its parameters' version counters moved on, which the packed copies above and
    below are keyed on. PyTorch's fused optimizers (AdamW(fused=True), what training uses) change the weights in
    place without moving them, and in-training validation then ran on the weights packed at its first evaluation
    (found in stop 38: a tiny run's validation loss 2.967 against 2.830 for its actual weights)."""
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    torch.autograd.graph.increment_version(parameters)


register_optimizer_step_post_hook(_bump_versions)


def supports_norm(norm: nn.Module) -> bool:
    """Whether `linear` can apply this LayerNorm to its input rows: affine, fp32, over the last dimension."""
    return (
        isinstance(norm, nn.LayerNorm)
        and len(norm.normalized_shape) == 1
        and norm.weight is not None
        and norm.bias is not None
        and norm.weight.dtype == norm.bias.dtype == torch.float32
    )


def supports_rotary(rope: tuple[Tensor, Tensor], head_dim: int) -> bool:
    """Whether `linear` can apply these rotary tables (cos, sin), each (1|B, T, R/2), in its epilogue: R = 32
    rotated dimensions per head (the rotated pairs then lie in one 32-column block), head_dim a multiple of 32."""
    cos, sin = rope
    return cos.dim() == 3 and cos.shape == sin.shape and cos.shape[-1] == 16 and head_dim % 32 == 0


def linear(
    x: Tensor,
    weight: Tensor | tuple[Tensor, ...],
    activation: str | None = None,
    norm: nn.LayerNorm | None = None,
    residual: Tensor | None = None,
    rows: Tensor | None = None,
    rope: tuple[Tensor, Tensor] | None = None,
    rotary_columns: int = 0,
    head_dim: int = 0,
    fp32_out: bool = False,
) -> Tensor:
    """activation(norm(x) @ weight.T) (+ residual), as F.linear under bf16 autocast computes it (see `supports`):
    bf16, or fp32 where a residual (fp32, the output's shape) is added to the fp32 sums or `fp32_out` asks for
    the sums themselves. `norm` (see
    `supports_norm`) is applied to each row of x as the kernel reads it. With `rows` (any shape, integer), x is
    a table (V, K) and the input is x[rows] (F.embedding's), read from the table row by row. With `rope` (see
    `supports_rotary`), the first `rotary_columns` of the output are heads of `head_dim` columns rotated as
    model.apply_rotary rotates them, output row r (of B x T) at the position of the tables' row r % their rows.
    A tuple of weights is one product over all of them, their outputs side by side (see `packed_weight`)."""
    parts = weight if isinstance(weight, tuple) else (weight,)
    out_features, in_features = sum(part.shape[0] for part in parts), parts[0].shape[1]
    lead = x.shape[:-1] if rows is None else rows.shape
    table = x.reshape(-1, in_features)
    if table.stride(-1) != 1:
        table = table.contiguous()
    count = table.shape[0]
    if rows is not None:
        rows = rows.reshape(-1).to(torch.int64).contiguous()
        count = rows.shape[0]
        if count and not (0 <= int(rows.min()) and int(rows.max()) < table.shape[0]):
            raise IndexError(f"a row index is outside [0, {table.shape[0]})")
        if norm is not None and table.shape[0] < count:
            # the norm is per row: norming the table's rows once (388 for the bench's 16,384 positions) spares
            # the kernel norming every position's copy of them
            with torch.autocast("cpu", enabled=False):
                table = norm(table.float()).detach().to(torch.bfloat16)
            norm = None
    out_is_bf16 = residual is None and not fp32_out
    out = torch.empty(count, out_features, dtype=torch.bfloat16 if out_is_bf16 else torch.float32)
    job = _Linear(
        M=count, N=out_features, K=in_features, x=table.data_ptr(), x_is_bf16=int(table.dtype == torch.bfloat16),
        x_row_stride=table.stride(0), rows=None if rows is None else rows.data_ptr(),
        packed=packed_weight(weight).data_ptr(), out=out.data_ptr(), out_is_bf16=int(out_is_bf16),
        out_row_stride=out.stride(0), activation=ACTIVATIONS[activation], threads=torch.get_num_threads(),
    )  # fmt: skip
    if norm is not None:
        norm_weight, norm_bias = norm.weight.detach().contiguous(), norm.bias.detach().contiguous()
        job.norm_weight, job.norm_bias, job.norm_eps = norm_weight.data_ptr(), norm_bias.data_ptr(), norm.eps
    if residual is not None:
        residual_rows = residual.detach().float().reshape(-1, out_features)
        if residual_rows.stride(-1) != 1:
            residual_rows = residual_rows.contiguous()
        job.residual, job.residual_row_stride = residual_rows.data_ptr(), residual_rows.stride(0)
    if rope is not None:
        cos, sin = (angles.detach().to(torch.float32).reshape(-1, 16).contiguous() for angles in rope)
        job.rotary_cos, job.rotary_sin, job.rotary_rows = cos.data_ptr(), sin.data_ptr(), cos.shape[0]
        job.rotary_columns, job.head_dim = rotary_columns, head_dim
    status = _kernel().linear_forward(ctypes.byref(job))
    if status:
        raise RuntimeError(f"cpu_linear kernel failed with status {status}")
    return out.view(*lead, out_features)


# ----------------------------------------------------------------------------------------------------------
# fp32 through oneDNN
#
# An fp32 prefill (`--dtype fp32`, every CPU without fast bf16) and fp32 evaluation run every product through
# F.linear (MKL) with the GELU and the residual add as separate passes over the output. oneDNN's product on a
# weight reordered once into its blocked layout, with the GELU or the add applied to each output block while it
# is in cache (what inductor's CPU freezing pass does), ran the bench MLP (1,024 rows) 14.2 -> 13.5 ms and the
# 16k-row key/value projection 54.8 -> 52.1 ms (BENCHMARKS.md "Stop 38"). fp32 arithmetic throughout: only
# the order of the sums differs from MKL's, as between any two BLAS kernels.


@cache
def onednn_available() -> bool:
    """Whether PyTorch's oneDNN linear ops are here, on x86 (the only CPUs they were measured on)."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (
        platform.machine().lower() in {"x86_64", "amd64", "i386", "i686"}
        and torch.backends.mkldnn.is_available()
        and hasattr(mkldnn, "_reorder_linear_weight")
        and hasattr(mkldnn, "_linear_pointwise")
    )


def supports_fp32(x: Tensor, weight: Tensor) -> bool:
    """Whether `linear_fp32` takes x (..., K) and weight (N, K): fp32 inference (no autocast, no gradient) on a CPU
    with oneDNN."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and weight.dim() == 2
        and x.shape[-1] == weight.shape[1]
        and not torch.compiler.is_compiling()
        and onednn_available()
    )


def onednn_weight(weight: Tensor) -> Tensor:
    """weight (N, K) reordered for oneDNN's product, kept on the weight and made again after any in-place change
    or storage swap (as `packed_weight`). Reordered for 1,024 rows: a prefill's latents; 16,384 rows ran the
    same (67.1 against 67.5 ms) and so did 1-7 rows' products (which decoding takes elsewhere, StepLinear)."""
    key = (weight.data_ptr(), weight._version, tuple(weight.shape))
    kept = weight.__dict__.get("_perceiver_onednn")
    if kept is None or kept[0] != key:
        kept = weight.__dict__["_perceiver_onednn"] = (
            key,
            torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1024),
        )
    return kept[1]


def linear_fp32(
    x: Tensor,
    weight: Tensor,
    activation: str | None = None,
    norm: nn.Module | None = None,
    residual: Tensor | None = None,
    rows: Tensor | None = None,
) -> Tensor:
    """model.Linear's activation(norm(x[rows] or x) @ weight.T) (+ residual) in fp32 through oneDNN (see
    `supports_fp32`): the GELU or the add inside the product, the norm before it (on the table's rows rather
    than on every position's copy of them where `rows` index a table with fewer rows)."""
    if rows is not None:
        if norm is not None and x.shape[0] < rows.numel():  # the norm is per row: the same values, fewer rows
            x, norm = norm(x), None
        x = F.embedding(rows, x)
    if norm is not None:
        x = norm(x)
    out_features = weight.shape[0]
    lead, flat = x.shape[:-1], x.reshape(-1, x.shape[-1])
    packed = onednn_weight(weight)
    if residual is not None and activation is None:
        other = residual.reshape(-1, out_features)
        out = torch.ops.mkldnn._linear_pointwise.binary(flat, other.contiguous(), packed, None, "add")
    else:
        attr, algorithm = ("gelu", "none") if activation == "gelu" else ("none", "")
        out = torch.ops.mkldnn._linear_pointwise(flat, packed, None, attr, [], algorithm)
        if residual is not None:
            out = out + residual.reshape(-1, out_features)
    return out.view(*lead, out_features)
