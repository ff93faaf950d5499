"""bf16 flash attention, forward and backward, on x86 CPUs with AVX512-BF16, compiled from cpu_attention.c.

PyTorch's CPU flash kernel runs bf16 at about its fp32 speed on CPUs without AMX, which kept a bf16 prefill far
from the bf16 GEMM peak (BENCHMARKS.md "bf16 prefill on the CPU"). The C kernel next to this file computes the
same attention (FlashAttention's online softmax, Dao et al. 2022) with AVX512-BF16 dot products; cpu_kernels.py
builds and loads it at first use. PyTorch's bf16 backward is as slow, so the C file also holds FlashAttention-2's
backward pass (Dao 2023): `trainable_attention` is the pair as an autograd function, which bf16 training uses
(BENCHMARKS.md "bf16 training attention"). Where building fails, `available()` is False and the model keeps
PyTorch's kernels.

On CPUs with AMX (Intel Sapphire Rapids and later) the bf16 products run on AMX tiles instead (`use_amx`): 3.9x
the vdpbf16ps loops forward and backward, 2.2x PyTorch's flash kernels (which use AMX too) at 1,024 queries over
16k keys (BENCHMARKS.md "Stop 31"). Where Linux refuses the process AMX's tile state, it refuses oneDNN too, so
PyTorch's kernels get no AMX either and ours keep vdpbf16ps.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from .cpu_kernels import AVX512, FLAGS, load
from .device import cpu_flags

SOURCE = Path(__file__).with_name("cpu_attention.c")
HEAD_DIMS = (32, 64, 96, 128)


@cache
def _kernel():
    library = load(SOURCE, (*AVX512, "avx512_bf16"), [*FLAGS, "-mavx512bf16"])
    if library is None:
        return None
    function = library.bf16_flash_attention
    strides = ctypes.POINTER(ctypes.c_long)
    function.argtypes = [ctypes.c_int] * 7 + [ctypes.c_void_p, strides] * 4 + [ctypes.c_void_p, ctypes.c_float]
    function.argtypes += [ctypes.c_void_p]
    function.restype = ctypes.c_int
    workspace = library.bf16_flash_attention_workspace
    workspace.argtypes, workspace.restype = [ctypes.c_int] * 4, ctypes.c_long
    backward = library.bf16_flash_attention_backward
    backward.argtypes = [ctypes.c_int] * 7 + [ctypes.c_void_p, strides] * 5 + [ctypes.c_void_p]
    backward.argtypes += [ctypes.c_void_p, strides] * 3 + [ctypes.c_float, ctypes.c_void_p]
    backward.restype = ctypes.c_int
    backward_workspace = library.bf16_flash_attention_backward_workspace
    backward_workspace.argtypes, backward_workspace.restype = [ctypes.c_int] * 6, ctypes.c_long
    f32_function = library.f32_flash_attention
    f32_function.argtypes, f32_function.restype = function.argtypes, ctypes.c_int
    library.attention_use_amx.argtypes, library.attention_use_amx.restype = [ctypes.c_int], ctypes.c_int
    library.attention_use_amx(int({"amx_tile", "amx_bf16"} <= cpu_flags()))
    library.attention_amx.argtypes, library.attention_amx.restype = [], ctypes.c_int
    rotary = library.rotary
    rotary.argtypes = (
        [ctypes.c_int] * 7 + [ctypes.c_void_p, strides] * 2 + [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2
    )
    rotary.restype = ctypes.c_int
    gather = library.gather_rotary
    gather.argtypes = [ctypes.c_int] * 7 + [ctypes.c_void_p, ctypes.c_long] + [ctypes.c_void_p] * 4 + [ctypes.c_int]
    gather.restype = ctypes.c_int
    gather_backward = library.gather_rotary_backward
    gather_backward.argtypes = (
        [ctypes.c_int] * 7 + [ctypes.c_void_p, strides] * 2 + [ctypes.c_void_p, ctypes.c_long]
    )
    gather_backward.argtypes += [ctypes.c_void_p] * 2 + [ctypes.c_int, ctypes.c_void_p]
    gather_backward.restype = ctypes.c_int
    return {
        "rotary": rotary,
        "gather_rotary": gather,
        "gather_rotary_backward": gather_backward,
        torch.bfloat16: function,
        torch.float32: f32_function,
        "workspace": workspace,
        "backward": backward,
        "backward_workspace": backward_workspace,
        "use_amx": library.attention_use_amx,
        "amx": library.attention_amx,
    }


def use_amx(on: bool = True) -> bool:
    """Runs the bf16 products (forward and backward) on AMX tiles (on) or on vdpbf16ps (off); returns whether AMX
    is on. It is on from the first use wherever the CPU has AMX and Linux grants the process its tile state."""
    kernels = _kernel()
    return bool(kernels and kernels["use_amx"](int(on and {"amx_tile", "amx_bf16"} <= cpu_flags())))


def amx_on() -> bool:
    kernels = _kernel()
    return bool(kernels and kernels["amx"]())


def available() -> bool:
    """True where the kernel is built and usable: x86 with AVX512-BF16, a C compiler, not disabled."""
    return _kernel() is not None


def supports(q: Tensor, k: Tensor, v: Tensor, training: bool = False) -> bool:
    """Whether `attention` (`trainable_attention` with `training`) takes these tensors: CPU tensors of a
    supported head size with unit stride on it, bf16 or fp32 (bf16 only in training: no fp32 backward here)."""
    return (
        q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype
        and q.dtype in ((torch.bfloat16,) if training else (torch.bfloat16, torch.float32))
        and q.dim() == 4
        and q.shape[-1] in HEAD_DIMS
        and all(t.stride(-1) == 1 for t in (q, k, v))
        and available()
    )


def rotates(x: Tensor) -> bool:
    """Whether `rotary_in_place` and `trainable_rotary` take x: a (B, H, T, Dh) fp32 or bf16 CPU tensor with unit
    stride along Dh, outside torch.compile's tracing."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.dim() == 4
        and x.stride(-1) == 1
        and not torch.compiler.is_compiling()
        and available()
    )


def _rotary(x: Tensor, out: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    batch, heads, length, head_dim = x.shape
    cos, sin = (table.to(torch.float32).contiguous() for table in (cos, sin))
    status = _kernel()["rotary"](
        batch, heads, length, head_dim, cos.shape[-1], int(x.dtype == torch.bfloat16), torch.get_num_threads(),
        x.data_ptr(), _strides(x), out.data_ptr(), _strides(out), cos.data_ptr(), sin.data_ptr(), cos.shape[0],
        int(inverse),
    )  # fmt: skip
    if status:
        raise RuntimeError(f"cpu_attention rotary kernel failed with status {status}")
    return out


def rotary_in_place(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """model.apply_rotary's rotation written into x itself in one pass (x: see `rotates`; cos, sin (B|1, T, R/2)).
    Returns x. For fresh projections in inference only: whoever else holds x sees it rotated."""
    return _rotary(x, x, cos, sin)


def gathers(table: Tensor, rows: Tensor) -> bool:
    """Whether `gather_rotary` and `trainable_gather_rotary` take these: an fp32 CPU table (V, W), int64 rows
    (B, T), outside torch.compile's tracing."""
    return (
        table.device.type == rows.device.type == "cpu"
        and table.dtype == torch.float32
        and table.dim() == 2
        and rows.dtype == torch.int64
        and rows.dim() == 2
        and not torch.compiler.is_compiling()
        and available()
    )


def gather_rotary(table: Tensor, rows: Tensor, cos: Tensor, sin: Tensor, heads: int, dtype: torch.dtype) -> Tensor:
    """table[rows] (B, T, W) in `dtype` (fp32 or bf16, rounded once), whose first half, `heads` key heads, is rotated
    as rotary_in_place rotates (cos, sin (B|1, T, R/2)): one pass of C where F.embedding, the rotation and the cast
    took three (see `gathers`). Raises IndexError for a row outside the table, as F.embedding does."""
    batch, length = rows.shape
    width = table.shape[1]
    table, rows = table.contiguous(), rows.contiguous()
    cos, sin = (t.to(torch.float32).contiguous() for t in (cos, sin))
    out = torch.empty(batch, length, width, dtype=dtype)
    status = _kernel()["gather_rotary"](
        batch, length, heads, width // (2 * heads), cos.shape[-1], int(dtype == torch.bfloat16),
        torch.get_num_threads(), table.data_ptr(), table.shape[0], rows.data_ptr(), out.data_ptr(), cos.data_ptr(),
        sin.data_ptr(), cos.shape[0],
    )  # fmt: skip
    if status == 2:
        raise IndexError(f"a token id is outside the embedding table's {table.shape[0]} rows")
    if status:
        raise RuntimeError(f"cpu_attention gather_rotary kernel failed with status {status}")
    return out


class _TrainableGatherRotary(torch.autograd.Function):
    """gather_rotary's key and value halves (B, T, W/2) each, and the backward pass into the table: one pass of C
    each way where F.embedding, the rotation, the casts and the halves' split and concatenation took one each."""

    @staticmethod
    def forward(ctx, table, rows, cos, sin, heads, dtype):
        rows = rows.contiguous()  # the backward kernel reads them as one run (the model's are often a slice)
        cos, sin = (t.to(torch.float32).contiguous() for t in (cos, sin))
        both = gather_rotary(table, rows, cos, sin, heads, dtype)
        ctx.save_for_backward(rows, cos, sin)
        ctx.heads, ctx.table_rows = heads, table.shape[0]
        return tuple(both.chunk(2, dim=-1))

    @staticmethod
    def backward(ctx, grad_key, grad_value):
        rows, cos, sin = ctx.saved_tensors
        batch, length = rows.shape
        width = grad_key.shape[-1]
        head_dim = width // ctx.heads
        if grad_value.dtype != grad_key.dtype:
            grad_value = grad_value.to(grad_key.dtype)
        # (B, T, W/2) -> (B, H, T, Dh) views: the kernel reads heads by strides, unit stride along Dh
        key, value = (
            (g if g.stride(-1) == 1 else g.contiguous()).view(batch, length, ctx.heads, head_dim).transpose(1, 2)
            for g in (grad_key, grad_value)
        )
        # each thread adds into its own table: as many as keep them within 64 MiB (a large vocabulary on many cores
        # would zero and sum hundreds of MB for a pass that memory bandwidth limits anyway)
        table_bytes = ctx.table_rows * 2 * width * 4
        threads = max(1, min(torch.get_num_threads(), (64 << 20) // table_bytes))
        tables = torch.zeros(threads, ctx.table_rows, 2 * width)
        status = _kernel()["gather_rotary_backward"](
            batch, length, ctx.heads, head_dim, cos.shape[-1], int(key.dtype == torch.bfloat16), threads,
            key.data_ptr(), _strides(key), value.data_ptr(), _strides(value), rows.data_ptr(), ctx.table_rows,
            cos.data_ptr(), sin.data_ptr(), cos.shape[0], tables.data_ptr(),
        )  # fmt: skip
        if status:
            raise RuntimeError(f"cpu_attention gather_rotary_backward kernel failed with status {status}")
        return tables.sum(0) if threads > 1 else tables[0], None, None, None, None, None


def trainable_gather_rotary(
    table: Tensor, rows: Tensor, cos: Tensor, sin: Tensor, heads: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """gather_rotary's output split into its key and value halves (B, T, W/2) each, differentiable with respect to
    the table (see `gathers`): its gradient is every position's gradient added into its row, in fp32."""
    return _TrainableGatherRotary.apply(table, rows, cos, sin, heads, dtype)


class _TrainableRotary(torch.autograd.Function):
    """The rotation into a new tensor, and its backward pass: the gradient rotated by the negative angles."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotary(x, _heads_last(x.shape, x), cos, sin)

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        return _rotary(grad_out, _heads_last(grad_out.shape, grad_out), cos, sin, inverse=True), None, None


def trainable_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """model.apply_rotary as one pass forward and one backward (x: see `rotates`), in the (B, T, H, Dh) memory
    layout the model's projections have."""
    return _TrainableRotary.apply(x, cos, sin)


def _strides(t: Tensor):
    return (ctypes.c_long * 3)(t.stride(0), t.stride(1), t.stride(2))


def _heads_last(shape, like: Tensor) -> Tensor:
    """An empty (B, H, T, Dh) bf16 tensor laid out as (B, T, H, Dh), the layout the model's views have."""
    batch, heads, length, head_dim = shape
    return torch.empty(batch, length, heads, head_dim, dtype=like.dtype).transpose(1, 2)


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, with_lse: bool = False):
    """softmax(q k^T / sqrt(Dh)) v for (B, H, n, Dh) q and (B, H, Tk, Dh) k, v, all bf16 or all fp32.

    causal: query i sees keys [0, i + Tk - n] (bottom-right), else all keys. Returns the output (B, H, n, Dh)
    in the inputs' dtype, a view of a (B, n, H, Dh) tensor so that merging the heads costs no copy, and with
    with_lse also the log-sum-exp of each query's scores (B, H, n) in fp32.
    """
    batch, heads, n, head_dim = q.shape
    num_keys = k.shape[-2]
    if causal and num_keys < n:
        raise ValueError(f"causal attention needs at least as many keys ({num_keys}) as queries ({n})")
    out = _heads_last(q.shape, q)
    lse = torch.empty(batch, heads, n) if with_lse else None
    kernels = _kernel()
    kernel = kernels[q.dtype]
    # from PyTorch's allocator, which asks for huge pages where the CLI enabled them (see cli/__init__.py);
    # fp32 keys and values take twice the bytes
    workspace_bytes = kernels["workspace"](batch, heads, num_keys, head_dim) * q.element_size() // 2
    workspace = torch.empty(workspace_bytes, dtype=torch.uint8)
    status = kernel(
        batch, heads, n, num_keys, head_dim, int(causal), torch.get_num_threads(),
        q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(), _strides(v),
        out.data_ptr(), _strides(out), lse.data_ptr() if with_lse else None, head_dim ** -0.5,
        workspace.data_ptr(),
    )  # fmt: skip
    if status:
        raise RuntimeError(f"cpu_attention kernel failed with status {status}")
    return (out, lse) if with_lse else out


def attention_backward(q, k, v, out, lse, grad_out, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `attention(q, k, v, causal)` with respect to q, k and v, from its output and log-sum-exp."""
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    grad_out = grad_out.to(torch.bfloat16)
    batch, heads, n, head_dim = q.shape
    num_keys = k.shape[-2]
    dq, dk, dv = _heads_last(q.shape, q), _heads_last(k.shape, k), _heads_last(v.shape, v)
    kernels = _kernel()
    kernel, workspace_bytes = kernels["backward"], kernels["backward_workspace"]
    threads = torch.get_num_threads()
    workspace = torch.empty(workspace_bytes(batch, heads, n, num_keys, head_dim, threads), dtype=torch.uint8)
    status = kernel(
        batch, heads, n, num_keys, head_dim, int(causal), threads,
        q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(), _strides(v),
        out.data_ptr(), _strides(out), grad_out.data_ptr(), _strides(grad_out), lse.data_ptr(),
        dq.data_ptr(), _strides(dq), dk.data_ptr(), _strides(dk), dv.data_ptr(), _strides(dv), head_dim ** -0.5,
        workspace.data_ptr(),
    )  # fmt: skip
    if status:
        raise RuntimeError(f"cpu_attention backward kernel failed with status {status}")
    return dq, dk, dv


class _TrainableAttention(torch.autograd.Function):
    """`attention` with its backward pass, for bf16 training (saves q, k, v, the output and the log-sum-exp)."""

    @staticmethod
    def forward(ctx, q, k, v, causal):
        out, lse = attention(q, k, v, causal, with_lse=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal = causal
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        return (*attention_backward(q, k, v, out, lse, grad_out, ctx.causal), None)


def trainable_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """`attention` that autograd can differentiate: the forward and backward kernels of cpu_attention.c."""
    return _TrainableAttention.apply(q, k, v, causal)
