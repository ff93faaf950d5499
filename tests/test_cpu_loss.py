"""The cross-entropy kernels (perceiver_cli/cpu_loss.c), forward and backward, against PyTorch's."""

import pytest
import torch
import torch.nn.functional as F

from perceiver_cli import cpu_loss
from perceiver_cli.model import latent_loss

needs_kernel = pytest.mark.skipif(not cpu_loss.available(), reason="needs AVX512-BF16 and a C compiler")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, vocab, row_stride", [(300, 8192, 8192), (7, 37, 40), (64, 388, 388), (5, 16, 16)])
def test_cross_entropy_matches_pytorch(dtype, rows, vocab, row_stride):
    torch.manual_seed(vocab)
    wide = (torch.randn(rows, row_stride) * 5).to(dtype)
    logits = wide[:, :vocab].requires_grad_()  # rows `row_stride` apart where it is wider than the vocabulary
    targets = torch.randint(0, vocab, (rows,))
    weights = torch.rand(rows)  # a gradient that differs row by row
    assert cpu_loss.supports(logits)
    losses = cpu_loss.cross_entropy(logits, targets)
    (grad,) = torch.autograd.grad(losses, logits, weights)
    exact = logits.detach().float().requires_grad_()
    expected = F.cross_entropy(exact, targets, reduction="none")
    (expected_grad,) = torch.autograd.grad(expected, exact, weights)
    assert losses.dtype == torch.float32 and grad.dtype == dtype and grad.shape == (rows, vocab)
    torch.testing.assert_close(losses, expected, atol=1e-5, rtol=1e-6)
    tolerance = dict(atol=1e-7, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=8e-3)
    torch.testing.assert_close(grad.float(), expected_grad, **tolerance)


@needs_kernel
def test_cross_entropy_refuses_a_target_outside_the_vocabulary():
    with pytest.raises(ValueError, match="outside"):
        cpu_loss.cross_entropy(torch.randn(3, 10), torch.tensor([1, 10, 2]))


@needs_kernel
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_latent_loss_with_and_without_the_kernel(monkeypatch, reduction):
    torch.manual_seed(1)
    logits, targets = torch.randn(2, 30, 50).bfloat16(), torch.randint(0, 50, (2, 40))
    with_kernel = latent_loss(logits, targets, reduction)
    monkeypatch.setattr(cpu_loss, "_kernel", lambda: None)
    assert not cpu_loss.supports(logits.flatten(0, 1))
    without_kernel = latent_loss(logits, targets, reduction)
    assert with_kernel.shape == without_kernel.shape == ((60,) if reduction == "none" else ())
    torch.testing.assert_close(with_kernel, without_kernel, atol=1e-5, rtol=1e-6)
