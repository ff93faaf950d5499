"""The AMX linear kernel (perceiver_cli/cpu_linear.c) against F.linear under bf16 autocast."""

import pytest
import torch
import torch.nn.functional as F

from perceiver_cli import cpu_linear
from perceiver_cli.bench.core import bench_config
from perceiver_cli.model import PerceiverAR

needs_kernel = pytest.mark.skipif(not cpu_linear.available(), reason="needs AMX, AVX512-BF16 and a C compiler")


def autocast_reference(x, weight, activation=None):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = F.linear(x, weight)
    return F.gelu(y.float()) if activation == "gelu" else y.float()


@needs_kernel
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "rows, in_features, out_features", [(1024, 2048, 512), (37, 64, 20), (1, 512, 388), (70, 96, 1100)]
)
def test_linear_matches_autocast(rows, in_features, out_features, input_dtype, activation):
    torch.manual_seed(rows + out_features)
    x = torch.randn(2, rows, in_features).to(input_dtype)
    weight = torch.randn(out_features, in_features) / in_features**0.5
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_linear.supports(x, weight)
        y = cpu_linear.linear(x, weight, activation)
    assert y.shape == (2, rows, out_features) and y.dtype == torch.bfloat16
    # the same bf16 operands and fp32 sums in another order, one rounding of the result (GELU on the fp32 sums)
    torch.testing.assert_close(y.float(), autocast_reference(x, weight, activation), atol=2e-2, rtol=1.6e-2)


@needs_kernel
def test_linear_takes_rows_with_a_stride():
    x = torch.randn(40, 128)[:, :64]  # rows 128 apart
    weight = torch.randn(48, 64) / 8
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = cpu_linear.linear(x, weight)
    torch.testing.assert_close(y.float(), autocast_reference(x, weight), atol=2e-2, rtol=1.6e-2)


@needs_kernel
def test_packed_weights_follow_the_weight():
    x = torch.randn(64, 64)
    weight = torch.nn.Parameter(torch.randn(32, 64) / 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = cpu_linear.linear(x, weight)
        assert cpu_linear.packed_weight(weight) is cpu_linear.packed_weight(weight)  # packed once
        weight.mul_(-2)  # an optimizer step changes it in place
        after = cpu_linear.linear(x, weight)
    torch.testing.assert_close(after.float(), autocast_reference(x, weight), atol=2e-2, rtol=1.6e-2)
    torch.testing.assert_close(after.float(), -2 * before.float(), atol=4e-2, rtol=1.6e-2)


@needs_kernel
def test_supports_only_bf16_autocast_inference():
    x, weight = torch.randn(4, 64), torch.nn.Parameter(torch.randn(32, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not cpu_linear.supports(x, weight)  # the weight needs a gradient: PyTorch's path trains
        with torch.no_grad():
            assert cpu_linear.supports(x, weight)
            assert not cpu_linear.supports(torch.randn(4, 48), torch.randn(32, 48))  # K not a multiple of 32
    with torch.no_grad():
        assert not cpu_linear.supports(x, weight)  # fp32 inference stays fp32


@needs_kernel
def test_model_prefill_matches_pytorch_linear(monkeypatch):
    torch.manual_seed(0)
    config = bench_config(2048)
    model = PerceiverAR(config).eval()
    tokens = torch.randint(0, config.vocab_size, (1, 2048))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = model(tokens).float()
        monkeypatch.setattr(cpu_linear, "supports", lambda *args: False)
        theirs = model(tokens).float()
    with torch.no_grad():
        exact = model(tokens)
    # both bf16 computations sit as close to the fp32 one as each other
    ours_error, theirs_error = (ours - exact).abs().max(), (theirs - exact).abs().max()
    assert ours_error < 1.5 * theirs_error + 1e-3
    torch.testing.assert_close(ours, theirs, atol=3e-2, rtol=3e-2)


@needs_kernel
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_linear_applies_the_norm_and_adds_the_residual(input_dtype):
    torch.manual_seed(3)
    norm = torch.nn.LayerNorm(96)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(3, 45, 96) * 4 + 2).to(input_dtype)  # a mean and spread the norm must remove
    weight = torch.randn(70, 96) / 10
    residual = torch.randn(3, 45, 70)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        normed_only = cpu_linear.linear(x, weight, norm=norm)
        both = cpu_linear.linear(x, weight, "gelu", norm=norm, residual=residual)
        expected = autocast_reference(norm(x.float()), weight)
    assert normed_only.dtype == torch.bfloat16 and both.dtype == torch.float32  # the residual stream stays fp32
    torch.testing.assert_close(normed_only.float(), expected, atol=2e-2, rtol=1.6e-2)
    torch.testing.assert_close(both, residual + F.gelu(expected), atol=2e-2, rtol=1.6e-2)


def test_model_linear_parts_match_their_pytorch_ops():
    """model.Linear's optional norm, GELU and residual (PyTorch's path: fp32, or with a gradient)."""
    from perceiver_cli.model import Linear

    torch.manual_seed(4)
    layer, norm = Linear(32, 24), torch.nn.LayerNorm(32)
    x, residual = torch.randn(2, 5, 32, requires_grad=True), torch.randn(2, 5, 24)
    y = layer(x, activation="gelu", norm=norm, residual=residual)
    torch.testing.assert_close(y, residual + F.gelu(F.linear(norm(x), layer.weight)))
    y.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


@needs_kernel
def test_linear_reads_rows_of_a_table():
    torch.manual_seed(5)
    table, weight, norm = torch.randn(50, 64), torch.randn(40, 64) / 8, torch.nn.LayerNorm(64)
    rows = torch.randint(0, 50, (2, 33))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = cpu_linear.linear(table, weight, norm=norm, rows=rows)
        expected = autocast_reference(norm(F.embedding(rows, table)), weight)
        assert y.shape == (2, 33, 40)
        torch.testing.assert_close(y.float(), expected, atol=2e-2, rtol=1.6e-2)
        with pytest.raises(IndexError, match="outside"):
            cpu_linear.linear(table, weight, rows=torch.tensor([3, 50]))


@needs_kernel
@pytest.mark.parametrize("table_batch", [1, 2])
def test_linear_rotates_the_heads_it_writes(table_batch):
    from perceiver_cli.model import apply_rotary, rotary_tables

    torch.manual_seed(6)
    batch, length, heads, head_dim = 2, 37, 3, 64
    x, weight = torch.randn(batch, length, 96), torch.randn(2 * heads * head_dim, 96) / 10
    positions = torch.arange(length)[None] + 5 + 100 * torch.arange(table_batch)[:, None]  # (1|B, T)
    cos, sin = rotary_tables(positions, 32, 10_000.0, torch.float32)
    rotated = heads * head_dim  # the first half, as the key/value projection's keys
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_linear.supports_rotary((cos, sin), head_dim)
        y = cpu_linear.linear(x, weight, rope=(cos, sin), rotary_columns=rotated, head_dim=head_dim)
    plain = autocast_reference(x, weight)  # (B, T, 2 H Dh)
    keys = plain[..., :rotated].view(batch, length, heads, head_dim).transpose(1, 2)
    expected_keys = apply_rotary(keys, cos, sin).transpose(1, 2).reshape(batch, length, rotated)
    torch.testing.assert_close(y[..., :rotated].float(), expected_keys, atol=3e-2, rtol=1.6e-2)
    torch.testing.assert_close(y[..., rotated:].float(), plain[..., rotated:], atol=2e-2, rtol=1.6e-2)


@needs_kernel
def test_linear_over_two_weights_is_their_outputs_side_by_side():
    torch.manual_seed(7)
    x, first, second = torch.randn(3, 40, 64), torch.randn(24, 64) / 8, torch.nn.Parameter(torch.randn(40, 64) / 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        both = cpu_linear.linear(x, (first, second))
        second.mul_(2)  # a change to either weight makes the joint pack again
        again = cpu_linear.linear(x, (first, second))
    torch.testing.assert_close(
        both.float(), autocast_reference(x, torch.cat((first, second / 2))), atol=2e-2, rtol=1.6e-2
    )
    torch.testing.assert_close(again[..., 24:].float(), autocast_reference(x, second), atol=4e-2, rtol=1.6e-2)


@needs_kernel
def test_linear_gives_its_fp32_sums():
    """fp32_out: the sums the bf16 output rounds (the projected vocabulary's table keeps them for its rotation)."""
    torch.manual_seed(3)
    table, weight = torch.randn(37, 64), torch.randn(96, 64) / 8
    norm = torch.nn.LayerNorm(64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        sums = cpu_linear.linear(table, weight, norm=norm, fp32_out=True)
        rounded = cpu_linear.linear(table, weight, norm=norm)
        added = cpu_linear.linear(table, weight, norm=norm, residual=torch.zeros(37, 96))
    assert sums.dtype == torch.float32 and rounded.dtype == torch.bfloat16
    assert torch.equal(sums, added) and torch.equal(sums.to(torch.bfloat16), rounded)
    torch.testing.assert_close(sums, autocast_reference(norm(table), weight), atol=2e-2, rtol=1.6e-2)


needs_onednn = pytest.mark.skipif(not cpu_linear.onednn_available(), reason="needs PyTorch's oneDNN on x86")


@needs_onednn
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_linear_fp32_matches_pytorch_ops(activation, with_residual):
    torch.manual_seed(6)
    norm = torch.nn.LayerNorm(96)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 45, 96) * 4 + 2
    weight = torch.randn(70, 96) / 10
    residual = torch.randn(3, 45, 70) if with_residual else None
    with torch.no_grad():
        assert cpu_linear.supports_fp32(x, weight)
        ours = cpu_linear.linear_fp32(x, weight, activation, norm, residual)
        expected = F.linear(norm(x), weight)
        expected = F.gelu(expected) if activation == "gelu" else expected
        expected = expected + residual if with_residual else expected
    assert ours.shape == (3, 45, 70) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize("positions", [20, 300])  # fewer and more positions than the table has rows
def test_linear_fp32_reads_rows_of_a_table(positions):
    torch.manual_seed(7)
    table, weight, norm = torch.randn(50, 64) * 3 + 1, torch.randn(40, 64) / 8, torch.nn.LayerNorm(64)
    rows = torch.randint(0, 50, (2, positions))
    with torch.no_grad():
        ours = cpu_linear.linear_fp32(table, weight, norm=norm, rows=rows)
        expected = F.linear(norm(F.embedding(rows, table)), weight)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_onednn_weights_follow_the_weight():
    x = torch.randn(64, 64)
    weight = torch.nn.Parameter(torch.randn(32, 64) / 8)
    with torch.no_grad():
        before = cpu_linear.linear_fp32(x, weight)
        assert cpu_linear.onednn_weight(weight) is cpu_linear.onednn_weight(weight)  # reordered once
        weight.mul_(-2)  # an optimizer step changes it in place
        after = cpu_linear.linear_fp32(x, weight)
    torch.testing.assert_close(after, F.linear(x, weight), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after, -2 * before, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_supports_fp32_only_for_fp32_inference():
    x, weight = torch.randn(4, 64), torch.nn.Parameter(torch.randn(32, 64))
    assert not cpu_linear.supports_fp32(x, weight)  # the weight needs a gradient: PyTorch's path trains
    with torch.no_grad():
        assert cpu_linear.supports_fp32(x, weight)
        assert not cpu_linear.supports_fp32(x.bfloat16(), weight)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not cpu_linear.supports_fp32(x, weight)  # autocast's products are bf16


@needs_onednn
def test_model_fp32_forward_matches_pytorch_linear(monkeypatch):
    """The whole model in fp32 inference, oneDNN's products against F.linear's: the same sums in another order."""
    torch.manual_seed(0)
    config = bench_config(2048)
    model = PerceiverAR(config).eval()
    tokens = torch.randint(0, config.vocab_size, (1, 2048))
    with torch.no_grad():
        ours = model(tokens)
        monkeypatch.setattr(cpu_linear, "supports_fp32", lambda *args: False)
        theirs = model(tokens)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@needs_onednn
def test_onednn_weights_follow_a_fused_optimizer_step():
    """AdamW(fused=True) changes the weight in place without moving its version counter: the step hook moves it."""
    x = torch.randn(16, 64)
    weight = torch.nn.Parameter(torch.randn(32, 64) / 8)
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    with torch.no_grad():
        cpu_linear.linear_fp32(x, weight)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    with torch.no_grad():
        torch.testing.assert_close(cpu_linear.linear_fp32(x, weight), F.linear(x, weight), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_packed_weights_follow_a_fused_optimizer_step():
    x = torch.randn(16, 64)
    weight = torch.nn.Parameter(torch.randn(32, 64) / 8)
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cpu_linear.linear(x, weight)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        after = cpu_linear.linear(x, weight)
    torch.testing.assert_close(after.float(), autocast_reference(x, weight), atol=2e-2, rtol=1.6e-2)
