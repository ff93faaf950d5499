"""The AVX512-BF16 attention kernels (perceiver_cli/cpu_attention.c), forward and backward, against dense fp32."""

import pytest
import torch

from perceiver_cli import cpu_attention
from perceiver_cli.model import (
    PerceiverAR,
    PerceiverARConfig,
    apply_rotary,
    causal_attention,
    rotary_tables,
    rotate_projection,
)

needs_kernel = pytest.mark.skipif(not cpu_attention.available(), reason="needs AVX512-BF16 and a C compiler")


@pytest.fixture(params=["vdpbf16ps", "amx"])
def products(request):
    """Runs a test with the bf16 products on vdpbf16ps and again on AMX tiles (where the CPU has AMX)."""
    on = cpu_attention.amx_on()
    if cpu_attention.use_amx(request.param == "amx") != (request.param == "amx"):
        cpu_attention.use_amx(on)
        pytest.skip("needs AMX")
    yield request.param
    cpu_attention.use_amx(on)


def dense_reference(q, k, v, causal):
    n, num_keys = q.shape[-2], k.shape[-2]
    scores = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        visible = torch.arange(num_keys)[None, :] <= torch.arange(n)[:, None] + num_keys - n
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores.softmax(-1) @ v.float(), scores.logsumexp(-1)


def bf16_heads(batch, heads, length, head_dim, heads_outer=True, dtype=torch.bfloat16):
    """(B, H, T, Dh), either contiguous or a view of (B, T, H, Dh) as the model's projections give."""
    if heads_outer:
        return torch.randn(batch, heads, length, head_dim).to(dtype)
    return torch.randn(batch, length, heads, head_dim).to(dtype).transpose(1, 2)


@needs_kernel
@pytest.mark.parametrize(
    "batch, heads, n, num_keys, head_dim, causal",
    [
        (1, 2, 7, 7, 64, True),  # fewer keys than one block
        (2, 3, 100, 300, 64, True),  # queries span two query blocks, keys a partial last block
        (1, 2, 200, 1000, 32, False),
        (1, 1, 97, 97, 128, True),
        (2, 2, 130, 170, 96, True),
        (1, 4, 1, 50, 64, True),  # one query sees every key
        (1, 2, 300, 4096, 64, True),  # full key blocks only: the vectorised packing
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_matches_dense_attention(batch, heads, n, num_keys, head_dim, causal, dtype, products):
    torch.manual_seed(n + num_keys)
    q = bf16_heads(batch, heads, n, head_dim, heads_outer=False, dtype=dtype)
    k, v = (bf16_heads(batch, heads, num_keys, head_dim, heads_outer=n % 2 == 0, dtype=dtype) for _ in range(2))
    if dtype == torch.float32:  # keys with a row stride that is not their width, as the model's k/v views have
        k = torch.cat((k, torch.randn_like(k)), dim=-1)[..., :head_dim]
    out, lse = cpu_attention.attention(q, k, v, causal, with_lse=True)
    expected_out, expected_lse = dense_reference(q, k, v, causal)
    assert out.dtype == dtype and out.shape == (batch, heads, n, head_dim)
    if dtype == torch.float32:  # fp32 throughout: within float rounding of the dense reference
        torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=1e-5)
        return
    # bf16 inputs and bf16 probabilities in the value product: within a few bf16 roundings of fp32 math
    torch.testing.assert_close(out.float(), expected_out, atol=1e-2, rtol=2e-2)
    torch.testing.assert_close(lse, expected_lse, atol=2e-3, rtol=1e-3)


@needs_kernel
@pytest.mark.parametrize("growth", [0.5, 4.0, 40.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_when_the_running_maximum_moves(growth, dtype, products):
    """Scores that rise along the keys, so each row's running maximum moves block after block: by less than the
    kernel's slack (kept, probabilities above 1), by more (moved, the sums rescaled), and by hundreds."""
    torch.manual_seed(5)
    batch, heads, n, num_keys, head_dim = 1, 2, 50, 700, 64
    q = bf16_heads(batch, heads, n, head_dim, dtype=dtype).abs()
    keys = torch.rand(batch, heads, num_keys, head_dim) * torch.linspace(0, growth, num_keys)[:, None]
    k, v = keys.to(dtype), bf16_heads(batch, heads, num_keys, head_dim, dtype=dtype)
    out, lse = cpu_attention.attention(q, k, v, causal=True, with_lse=True)
    expected_out, expected_lse = dense_reference(q, k, v, causal=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, expected_lse, atol=1e-5, rtol=1e-5)
        return
    torch.testing.assert_close(out.float(), expected_out, atol=1e-2, rtol=2e-2)
    torch.testing.assert_close(lse, expected_lse, atol=2e-3 * expected_lse.abs().max(), rtol=1e-3)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "batch, length, heads, head_dim, rotary_dim, table_batch",
    [(1, 100, 8, 64, 32, 1), (2, 37, 4, 64, 20, 2), (3, 5, 2, 32, 32, 1), (1, 9, 2, 128, 128, 1)],
)
def test_rotary_in_place_matches_apply_rotary(dtype, batch, length, heads, head_dim, rotary_dim, table_batch):
    torch.manual_seed(length)
    projection = torch.randn(batch, length, 2 * heads * head_dim).to(dtype)  # keys and values, as key_value gives
    key = projection[..., : heads * head_dim].view(batch, length, heads, head_dim).transpose(1, 2)
    values_before = projection[..., heads * head_dim :].clone()
    positions = torch.arange(length)[None].expand(table_batch, length) * 3 + 7
    cos, sin = rotary_tables(positions, rotary_dim, 10_000.0, torch.float32)
    expected = apply_rotary(key.float(), cos, sin)  # in fp32 from the same inputs
    with torch.no_grad():
        rotated = rotate_projection(key, cos, sin)
    assert rotated.data_ptr() == key.data_ptr() and rotated.dtype == dtype  # in place, the view kept
    assert torch.equal(projection[..., heads * head_dim :], values_before)  # the values untouched
    if dtype == torch.float32:
        torch.testing.assert_close(rotated, expected, atol=1e-6, rtol=1e-6)
    else:  # rounded once to bf16, where apply_rotary's bf16 ops round each product and sum
        assert (rotated.float() - expected).abs().max() <= (
            apply_rotary(key, cos, sin).float() - expected
        ).abs().max()
        torch.testing.assert_close(rotated.float(), expected, atol=2e-2, rtol=8e-3)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "batch, length, heads, head_dim, rotary_dim, table_batch",
    [(1, 100, 8, 64, 32, 1), (2, 37, 4, 64, 20, 2), (3, 5, 2, 32, 0, 1), (1, 9, 2, 128, 128, 1)],
)
def test_gather_rotary_is_embedding_then_rotary_rounded_once(
    dtype, batch, length, heads, head_dim, rotary_dim, table_batch
):
    torch.manual_seed(length)
    table = torch.randn(11, 2 * heads * head_dim)  # a projected vocabulary: key heads, then value heads
    rows = torch.randint(0, 11, (batch, length))
    positions = torch.arange(length)[None].expand(table_batch, length) * 3 + 7
    cos, sin = rotary_tables(positions, rotary_dim, 10_000.0, torch.float32)
    expected = torch.nn.functional.embedding(rows, table)  # fp32
    key = expected[..., : heads * head_dim].view(batch, length, heads, head_dim).transpose(1, 2)
    key.copy_(apply_rotary(key, cos, sin))
    out = cpu_attention.gather_rotary(table, rows, cos, sin, heads, dtype)
    assert out.shape == (batch, length, 2 * heads * head_dim) and out.dtype == dtype and out.is_contiguous()
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
        assert torch.equal(out[..., heads * head_dim :], expected[..., heads * head_dim :])  # values copied
    else:  # the fp32 rotation rounded once
        torch.testing.assert_close(out, expected.to(dtype), atol=0, rtol=2**-8)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, rotary_dim, table_batch", [(2, 20, 2), (1, 32, 1), (3, 0, 1)])
def test_trainable_gather_rotary_gradient_is_every_positions_added_into_its_row(
    dtype, batch, rotary_dim, table_batch
):
    torch.manual_seed(rotary_dim)
    heads, head_dim, length = 4, 64, 50
    table = torch.randn(7, 2 * heads * head_dim, requires_grad=True)
    rows = torch.randint(0, 7, (batch, length + 1))[:, 1:]  # a slice, as the model's often are
    positions = torch.arange(length)[None].expand(table_batch, length) + 3
    cos, sin = rotary_tables(positions, rotary_dim, 10_000.0, torch.float32)
    key, value = cpu_attention.trainable_gather_rotary(table, rows, cos, sin, heads, dtype)
    assert key.shape == value.shape == (batch, length, heads * head_dim) and key.dtype == value.dtype == dtype
    grad_key, grad_value = (
        torch.randn(batch, length, heads * head_dim),
        torch.randn(batch, length, heads * head_dim),
    )
    # the model's path: key heads viewed (B, H, T, Dh), gradients arriving in the attention's dtype
    heads_of = lambda x: x.view(batch, length, heads, head_dim).transpose(1, 2)  # noqa: E731
    loss = (heads_of(key).float() * heads_of(grad_key.to(dtype)).float()).sum() + (
        value.float() * grad_value.to(dtype).float()
    ).sum()
    (grad,) = torch.autograd.grad(loss, table)
    reference_table = table.detach().clone().requires_grad_()
    gathered = torch.nn.functional.embedding(rows, reference_table)
    ref_key = apply_rotary(heads_of(gathered[..., : heads * head_dim]), cos, sin)
    ref_loss = (ref_key * heads_of(grad_key.to(dtype).float())).sum() + (
        gathered[..., heads * head_dim :] * grad_value.to(dtype).float()
    ).sum()
    (expected,) = torch.autograd.grad(ref_loss, reference_table)
    torch.testing.assert_close(grad, expected, atol=1e-4, rtol=1e-5)  # fp32 sums either way


@needs_kernel
@pytest.mark.parametrize("bad", [-1, 11])
def test_gather_rotary_refuses_a_row_outside_the_table(bad):
    cos, sin = rotary_tables(torch.arange(4)[None], 8, 10_000.0, torch.float32)
    rows = torch.tensor([[0, 3, bad, 1]])
    with pytest.raises(IndexError, match="outside the embedding table's 11 rows"):
        cpu_attention.gather_rotary(torch.randn(11, 64), rows, cos, sin, 2, torch.float32)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim, table_batch", [(32, 1), (20, 2)])
def test_trainable_rotary_matches_apply_rotary_forward_and_backward(dtype, rotary_dim, table_batch):
    torch.manual_seed(rotary_dim)
    batch, length, heads, head_dim = 2, 70, 3, 64
    projection = torch.randn(batch, length, 2 * heads * head_dim).to(dtype).requires_grad_()
    key = projection[..., : heads * head_dim].view(batch, length, heads, head_dim).transpose(1, 2)
    cos, sin = rotary_tables(
        torch.arange(length)[None].expand(table_batch, length) + 5, rotary_dim, 1e4, torch.float32
    )
    grad_out = torch.randn(batch, heads, head_dim, length).to(dtype).transpose(-1, -2)  # not unit stride on Dh
    rotated = rotate_projection(key, cos, sin)
    assert rotated.grad_fn is not None and rotated.data_ptr() != key.data_ptr()  # a new tensor under autograd
    (ours,) = torch.autograd.grad(rotated, projection, grad_out)
    exact = projection.detach().float().requires_grad_()
    exact_key = exact[..., : heads * head_dim].view(batch, length, heads, head_dim).transpose(1, 2)
    expected = apply_rotary(exact_key, cos, sin)
    (expected_grad,) = torch.autograd.grad(expected, exact, grad_out.float())
    assert ours.dtype == dtype and ours[..., heads * head_dim :].abs().max() == 0  # the values get no gradient
    tolerance = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=2e-2, rtol=8e-3)
    torch.testing.assert_close(rotated.float(), expected.detach(), **tolerance)
    torch.testing.assert_close(ours.float(), expected_grad, **tolerance)


@needs_kernel
def test_causal_attention_routes_to_the_kernels(monkeypatch):
    q, k, v = (bf16_heads(1, 2, 64, 64) for _ in range(3))
    calls = []
    monkeypatch.setattr(cpu_attention, "attention", lambda *args, **kwargs: calls.append(args) or q)
    with torch.no_grad():
        causal_attention(q, k, v)  # square causal: a latent layer
        causal_attention(q, torch.cat((k, k), 2), torch.cat((v, v), 2))  # the cross-attention
        causal_attention(q.float(), k.float(), v.float())  # fp32 inference too
        causal_attention(q[..., :1, :], k, v)  # one query (a cached step): the two-matmul path
    assert len(calls) == 3
    monkeypatch.setattr(cpu_attention, "trainable_attention", lambda *args, **kwargs: calls.append(args) or q)
    causal_attention(q.requires_grad_(), k, v)  # bf16 training: the kernels with a backward pass
    causal_attention(q, k, v, dropout_p=0.1)  # attention dropout stays with PyTorch
    causal_attention(q.float(), k.float(), v.float())  # fp32 training too: no fp32 backward here
    assert len(calls) == 4


def small_model_and_tokens(length: int):
    torch.manual_seed(0)
    config = PerceiverARConfig(
        vocab_size=50, max_context=512, num_latents=128, d_model=128, num_heads=2, num_layers=2
    )
    return PerceiverAR(config), torch.randint(0, config.vocab_size, (2, length))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_model_with_and_without_the_kernel(monkeypatch, dtype):
    model, tokens = small_model_and_tokens(512)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        with_kernel = model(tokens).float()
        monkeypatch.setattr(cpu_attention, "_kernel", lambda: None)
        without_kernel = model(tokens).float()
    assert with_kernel.shape == without_kernel.shape == (2, 128, model.config.vocab_size)
    tolerance = 0.05 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(with_kernel, without_kernel, atol=tolerance, rtol=tolerance)


@needs_kernel
@pytest.mark.parametrize(
    "batch, heads, n, num_keys, head_dim, causal",
    [
        (1, 2, 37, 37, 64, True),  # odd query count: a query pair padded with zeros
        (2, 3, 100, 333, 32, True),  # the cross-attention shape: more keys than queries, a partial key block
        (1, 2, 65, 129, 128, False),
        (1, 1, 1, 5, 96, True),
        (1, 4, 130, 1024, 64, True),  # several query tiles and full key blocks
    ],
)
def test_backward_matches_dense_gradients(batch, heads, n, num_keys, head_dim, causal, products):
    torch.manual_seed(n + num_keys)
    q = bf16_heads(batch, heads, n, head_dim, heads_outer=False).requires_grad_()
    k, v = (bf16_heads(batch, heads, num_keys, head_dim, heads_outer=n % 2 == 0).requires_grad_() for _ in range(2))
    grad_out = torch.randn(batch, heads, head_dim, n).bfloat16().transpose(-1, -2)  # not unit stride on Dh
    cpu_attention.trainable_attention(q, k, v, causal).backward(grad_out)
    exact = [t.detach().float().requires_grad_() for t in (q, k, v)]
    dense_reference(*exact, causal)[0].backward(grad_out.float())
    pytorch_bf16 = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    mask = torch.arange(num_keys)[None, :] <= torch.arange(n)[:, None] + num_keys - n if causal else None
    torch.nn.functional.scaled_dot_product_attention(*pytorch_bf16, attn_mask=mask).backward(grad_out)
    for ours, reference, theirs in zip((q, k, v), exact, pytorch_bf16, strict=True):
        assert ours.grad.dtype == torch.bfloat16 and ours.grad.shape == ours.shape
        error = (ours.grad.float() - reference.grad).abs().max()
        assert error <= 0.01 * reference.grad.abs().max()
        # no worse than PyTorch's own bf16 backward pass by more than bf16 rounding of the result
        their_error = (theirs.grad.float() - reference.grad).abs().max()
        assert error <= 2 * their_error + 4e-3 * reference.grad.abs().max()


@needs_kernel
def test_bf16_training_gradients_with_and_without_the_kernels(monkeypatch):
    model, tokens = small_model_and_tokens(513)
    model.train()

    def gradients():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens[:, :-1]).float()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, -128:])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return loss, torch.cat([g.flatten() for g in grads])

    loss_with, with_kernels = gradients()
    monkeypatch.setattr(cpu_attention, "_kernel", lambda: None)
    loss_without, without_kernels = gradients()
    torch.testing.assert_close(loss_with, loss_without, atol=2e-3, rtol=1e-3)
    similarity = torch.nn.functional.cosine_similarity(with_kernels, without_kernels, dim=0)
    assert similarity > 0.999


@needs_kernel
def test_pytorchs_own_amx_products_are_unchanged_after_ours(products):
    """Our kernels load their own tile configuration and release it after; oneDNN's bf16 GEMMs, which use the same
    tiles on the same threads, must give the same results before and after."""
    torch.manual_seed(3)
    a, b = torch.randn(300, 320).bfloat16(), torch.randn(320, 960).bfloat16()
    before = a @ b
    q, k, v = (bf16_heads(1, 2, n, 64).requires_grad_() for n in (100, 333, 333))
    cpu_attention.trainable_attention(q, k, v, True).backward(torch.ones(1, 2, 100, 64).bfloat16())
    assert torch.equal(a @ b, before)
