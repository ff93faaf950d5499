"""Cross-entropy over a large vocabulary on x86 CPUs with AVX512-BF16, forward and backward, from cpu_loss.c.

`cross_entropy` is F.cross_entropy(logits.float(), targets, reduction="none") with its backward, computed from
the logits in their own dtype (bf16 under autocast) in one pass over each row backward and two forward, where
PyTorch makes four over an fp32 copy each way (BENCHMARKS.md "Stop 33"). model.latent_loss
uses it wherever `supports` says so; elsewhere PyTorch's.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from .cpu_kernels import AVX512, FLAGS, load

SOURCE = Path(__file__).with_name("cpu_loss.c")


@cache
def _kernel():
    library = load(SOURCE, (*AVX512, "avx512_bf16"), [*FLAGS, "-mavx512bf16"])
    if library is None:
        return None
    forward, backward = library.cross_entropy_forward, library.cross_entropy_backward
    forward.argtypes = (
        [ctypes.c_long] + [ctypes.c_int] * 3 + [ctypes.c_void_p, ctypes.c_long] + [ctypes.c_void_p] * 3
    )
    backward.argtypes = [ctypes.c_long] + [ctypes.c_int] * 3 + [ctypes.c_void_p, ctypes.c_long]
    backward.argtypes += [ctypes.c_void_p] * 4 + [ctypes.c_long]
    forward.restype = backward.restype = ctypes.c_int
    return forward, backward


def available() -> bool:
    return _kernel() is not None


def supports(logits: Tensor) -> bool:
    """Whether `cross_entropy` takes these (rows, V) logits: fp32 or bf16 on the CPU, unit stride along V."""
    return (
        logits.device.type == "cpu"
        and logits.dtype in (torch.float32, torch.bfloat16)
        and logits.dim() == 2
        and logits.stride(-1) == 1
        and not torch.compiler.is_compiling()
        and available()
    )


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets):
        rows, vocab = logits.shape
        targets = targets.to(torch.int64).contiguous()
        loss, lse = torch.empty(rows), torch.empty(rows)
        status = _kernel()[0](
            rows, vocab, int(logits.dtype == torch.bfloat16), torch.get_num_threads(), logits.data_ptr(),
            logits.stride(0), targets.data_ptr(), loss.data_ptr(), lse.data_ptr(),
        )  # fmt: skip
        if status == 2:
            raise ValueError(f"a target is outside [0, {vocab})")
        if status:
            raise RuntimeError(f"cpu_loss kernel failed with status {status}")
        ctx.save_for_backward(logits, targets, lse)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        rows, vocab = logits.shape
        grad_loss = grad_loss.to(torch.float32).contiguous()
        grad = torch.empty(rows, vocab, dtype=logits.dtype)
        status = _kernel()[1](
            rows, vocab, int(logits.dtype == torch.bfloat16), torch.get_num_threads(), logits.data_ptr(),
            logits.stride(0), targets.data_ptr(), lse.data_ptr(), grad_loss.data_ptr(), grad.data_ptr(), vocab,
        )  # fmt: skip
        if status:
            raise RuntimeError(f"cpu_loss backward kernel failed with status {status}")
        return grad, None


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-row losses (rows,) in fp32 of logits (rows, V) against int targets (rows,): see `supports`."""
    return _CrossEntropy.apply(logits, targets)
