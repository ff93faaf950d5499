"""Device and dtype choice: auto means bf16 only where it is fast."""

import pytest
import torch

from perceiver_cli import device


def test_explicit_dtypes():
    cpu = torch.device("cpu")
    assert device.resolve_dtype("fp32", cpu) == torch.float32
    assert device.resolve_dtype("bf16", cpu) == torch.bfloat16


def test_auto_follows_the_cpu_flags(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    assert device.resolve_dtype("auto", cpu) == torch.bfloat16
    assert device.resolve_dtype("auto", cpu, purpose="decode") == torch.float32  # matvec-bound: fp32 is faster
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    assert device.resolve_dtype("auto", cpu) == torch.float32


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        device.resolve_dtype("fp8", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        device.resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA device"):
        device.resolve_device("cuda")


def test_decode_threads_leave_busy_cores_alone(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("os.getloadavg", lambda: (0.1, 0.0, 0.0))
    assert device.decode_threads() == 2
    monkeypatch.setattr("os.getloadavg", lambda: (1.2, 0.0, 0.0))
    assert device.decode_threads() == 1
    monkeypatch.setattr("os.getloadavg", lambda: (7.0, 0.0, 0.0))
    assert device.decode_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert device.decode_threads() == 3


def test_adamw_is_fused_and_steps_as_foreach_does():
    torch.manual_seed(0)
    weights = [torch.randn(64, 32, requires_grad=True), torch.randn(32, requires_grad=True)]
    twins = [w.detach().clone().requires_grad_() for w in weights]
    fused = device.adamw(
        [{"params": weights[:1], "weight_decay": 0.1}, {"params": weights[1:], "weight_decay": 0.0}], lr=1e-2
    )
    foreach = torch.optim.AdamW(
        [{"params": twins[:1], "weight_decay": 0.1}, {"params": twins[1:], "weight_decay": 0.0}],
        lr=1e-2,
        foreach=True,
    )
    assert fused.defaults["fused"]  # this torch (2.4 and later) has the CPU kernel
    for _ in range(5):
        gradients = [torch.randn_like(w) for w in weights]
        for group, optimizer in ((weights, fused), (twins, foreach)):
            for w, g in zip(group, gradients, strict=True):
                w.grad = g.clone()
            optimizer.step()
    for ours, theirs in zip(weights, twins, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
