"""The Perceiver AR model: shapes, causality, latents, prefix dropout, gradients, config round trip."""

import json

import pytest
import torch
import torch.nn.functional as F

from perceiver_cli import PerceiverAR, PerceiverARConfig, cpu_attention
from perceiver_cli.model import causal_attention, latent_loss, rotary_tables


def tiny_config(**overrides) -> PerceiverARConfig:
    values = dict(vocab_size=37, max_context=48, num_latents=8, d_model=32, num_heads=4, num_layers=2)
    return PerceiverARConfig(**{**values, **overrides})


@pytest.fixture
def model() -> PerceiverAR:
    torch.manual_seed(0)
    return PerceiverAR(tiny_config()).eval()


def test_logits_cover_the_last_latent_positions(model):
    tokens = torch.randint(0, 37, (3, 40))
    assert model(tokens).shape == (3, 8, 37)
    assert model(tokens, num_latents=5).shape == (3, 5, 37)
    # shorter than N: every position is a latent
    assert model(tokens[:, :6]).shape == (3, 6, 37)


def test_input_longer_than_context_is_refused(model):
    with pytest.raises(ValueError, match="exceeds max_context=48"):
        model(torch.zeros(1, 49, dtype=torch.long))


@pytest.mark.parametrize("num_latents", [1, 8, 40])
def test_causality_changing_token_j_never_changes_earlier_logits(model, num_latents):
    torch.manual_seed(1)
    tokens = torch.randint(0, 37, (1, 40))
    before = model(tokens, num_latents=num_latents)
    first_latent = 40 - num_latents
    for j in range(first_latent, 40):
        changed = tokens.clone()
        changed[0, j] = (changed[0, j] + 1) % 37
        after = model(changed, num_latents=num_latents)
        k = j - first_latent  # latent index of position j
        torch.testing.assert_close(after[:, :k], before[:, :k], atol=1e-5, rtol=0)
        assert not torch.allclose(after[:, k:], before[:, k:])


def test_prefix_tokens_reach_every_latent(model):
    tokens = torch.randint(0, 37, (1, 40))
    changed = tokens.clone()
    changed[0, 0] = (changed[0, 0] + 5) % 37
    assert (model(changed) - model(tokens)).abs().amax(dim=-1).min() > 0


def test_bottom_right_causal_attention_matches_a_dense_reference():
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 12, 8), torch.randn(2, 3, 12, 8)
    scores = q @ k.transpose(-1, -2) / 8**0.5
    allowed = torch.arange(12)[None, :] <= torch.arange(5)[:, None] + 7
    expected = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(causal_attention(q, k, v), expected, atol=1e-5, rtol=1e-5)  # fast no-grad path
    q.requires_grad_(True)
    torch.testing.assert_close(causal_attention(q, k, v), expected, atol=1e-5, rtol=1e-5)  # masked path


def test_position_offset_only_changes_rounding(model):
    tokens = torch.randint(0, 37, (2, 30))
    torch.testing.assert_close(model(tokens, position_offset=12345), model(tokens), atol=1e-4, rtol=0)


def test_rotary_tables_are_accurate_far_out():
    cos, sin = rotary_tables(torch.tensor([100_000]), 8, 10_000.0, torch.float32)
    assert torch.allclose(cos**2 + sin**2, torch.ones_like(cos), atol=1e-6)
    assert abs(cos[0, 0].item() - torch.tensor(100_000.0, dtype=torch.float64).cos().item()) < 1e-6


def test_batch_rows_are_independent(model):
    tokens = torch.randint(0, 37, (4, 33))
    batched = model(tokens)
    for row in range(4):
        torch.testing.assert_close(model(tokens[row : row + 1]), batched[row : row + 1], atol=1e-5, rtol=0)


def test_gradient_reaches_every_parameter():
    torch.manual_seed(3)
    model = PerceiverAR(tiny_config(tie_embeddings=False)).train()
    tokens = torch.randint(0, 37, (2, 41))
    latent_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_prefix_dropout_only_in_training():
    torch.manual_seed(4)
    model = PerceiverAR(tiny_config(prefix_dropout=0.5))
    tokens = torch.randint(0, 37, (2, 40))
    model.eval()
    torch.testing.assert_close(model(tokens), model(tokens))
    model.train()
    torch.manual_seed(5)
    first = model(tokens)
    torch.manual_seed(6)
    second = model(tokens)
    assert not torch.allclose(first, second)  # different prefix positions dropped
    model.eval()
    assert not torch.allclose(model(tokens), first)


def test_prefix_dropout_removes_positions_physically():
    model = PerceiverAR(tiny_config(prefix_dropout=0.75)).train()
    seen = {}
    handle = model.cross_attention.attention.key_value.register_forward_hook(
        lambda module, args, output: seen.__setitem__("positions", output.shape[1])
    )
    model(torch.randint(0, 37, (1, 40)))
    handle.remove()
    assert seen["positions"] == 8 + round(32 * 0.25)  # latents + kept quarter of the prefix


def test_seeded_initialisation_is_deterministic():
    torch.manual_seed(7)
    a = PerceiverAR(tiny_config())
    torch.manual_seed(7)
    b = PerceiverAR(tiny_config())
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


def test_config_json_round_trip():
    config = tiny_config(prefix_dropout=0.25, rotary_fraction=0.25, tie_embeddings=False)
    assert PerceiverARConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["num_latents"] == 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_latents=0), "num_latents=0 is outside"),
        (dict(d_model=30, num_heads=4), "not divisible"),
        (dict(prefix_dropout=1.0), "prefix_dropout"),
    ],
)
def test_invalid_configs_say_what_is_wrong(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_unknown_config_fields_are_refused():
    with pytest.raises(ValueError, match="unknown PerceiverARConfig fields: colour"):
        PerceiverARConfig.from_dict({**tiny_config().to_dict(), "colour": 1})


def test_num_latents_out_of_range_at_call_time(model):
    with pytest.raises(ValueError, match="num_latents=0 is outside"):
        model(torch.zeros(1, 4, dtype=torch.long), num_latents=0)


def test_latent_loss_of_uniform_logits_is_log_vocab():
    logits = torch.zeros(2, 5, 37)
    targets = torch.randint(0, 37, (2, 9))
    assert latent_loss(logits, targets).item() == pytest.approx(torch.log(torch.tensor(37.0)).item())


def _loss_and_grads(model: PerceiverAR, tokens: torch.Tensor, seed: int = 0):
    torch.manual_seed(seed)  # the same prefix-dropout draw for both paths
    model.zero_grad(set_to_none=True)
    loss = latent_loss(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("prefix_dropout", [0.0, 0.4])
@pytest.mark.parametrize("chunk", [7, 64])
def test_recomputed_cross_attention_matches_the_ordinary_path(prefix_dropout, chunk):
    """Long-context training path: same loss and same gradient for every parameter, to float32 rounding."""
    torch.manual_seed(0)
    config = PerceiverARConfig(
        vocab_size=50,
        max_context=96,
        num_latents=16,
        d_model=32,
        num_heads=4,
        num_layers=2,
        prefix_dropout=prefix_dropout,
    )
    model = PerceiverAR(config).train()
    tokens = torch.randint(0, 50, (2, 97))
    model.recompute_prefix_above = 10**9
    reference_loss, reference = _loss_and_grads(model, tokens)
    model.recompute_prefix_above, model.prefix_chunk = 0, chunk
    loss, grads = _loss_and_grads(model, tokens)
    assert loss == pytest.approx(reference_loss.item(), rel=1e-5)
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _counting_vocabulary_calls(model: PerceiverAR) -> list:
    calls = []
    project = model.cross_attention.vocabulary_key_value
    model.cross_attention.vocabulary_key_value = lambda *args: calls.append(1) or project(*args)
    return calls


@pytest.mark.parametrize("prefix_dropout, recompute", [(0.0, False), (0.4, False), (0.0, True)])
@pytest.mark.parametrize("c_passes", [True, False])
def test_projected_vocabulary_matches_projecting_every_position(monkeypatch, prefix_dropout, recompute, c_passes):
    """Keys and values from the vocabulary's 50 projected rows instead of 194 positions' projections: the same loss
    and gradients in training (also with prefix dropout and in the recomputing path), the same logits in eval;
    through cpu_attention's gather passes and through PyTorch's ops (every other device, CPUs without AVX-512)."""
    if not c_passes:
        monkeypatch.setattr(cpu_attention, "gathers", lambda *args: False)
    elif not cpu_attention.available():
        pytest.skip("needs AVX512-BF16 and a C compiler")
    torch.manual_seed(0)
    config = PerceiverARConfig(
        vocab_size=50, max_context=96, num_latents=16, d_model=32, num_heads=4, num_layers=2,
        prefix_dropout=prefix_dropout,
    )  # fmt: skip
    model = PerceiverAR(config).train()
    if recompute:
        model.recompute_prefix_above, model.prefix_chunk = 0, 64
    tokens = torch.randint(0, 50, (2, 97))
    calls = _counting_vocabulary_calls(model)
    model.project_vocabulary = False
    reference_loss, reference = _loss_and_grads(model, tokens)
    assert not calls
    model.project_vocabulary = True
    loss, grads = _loss_and_grads(model, tokens)
    assert calls  # the vocabulary's path ran
    assert loss == pytest.approx(reference_loss.item(), rel=1e-6)
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    model.eval()
    with torch.no_grad():
        projected = model(tokens[:, :-1])
        model.project_vocabulary = False
        torch.testing.assert_close(projected, model(tokens[:, :-1]), rtol=1e-5, atol=1e-6)


def test_projected_vocabulary_only_where_it_projects_fewer_rows_and_without_embedding_dropout():
    torch.manual_seed(0)
    model = PerceiverAR(tiny_config(dropout=0.1)).train()  # vocabulary 37
    calls = _counting_vocabulary_calls(model)
    model(torch.randint(0, 37, (1, 40)))  # dropout draws per position: no
    model.eval()
    model(torch.randint(0, 37, (1, 30)))  # 30 positions, fewer than the 37 rows: no
    assert not calls
    model(torch.randint(0, 37, (1, 40)))
    assert len(calls) == 1
    # under bf16 autocast a table projected in fp32 (in training; in inference without cpu_linear's AMX kernel)
    # costs 8x its rows: 40 positions no, 8 x 37 + 1 yes; with the kernel's bf16 products, its rows
    long_model = PerceiverAR(tiny_config(max_context=400))
    calls = _counting_vocabulary_calls(long_model)
    for training in (True, False):
        long_model.train(training)
        with torch.set_grad_enabled(training), torch.autocast("cpu", dtype=torch.bfloat16):
            table = long_model.embedding.weight
            in_bf16 = long_model.cross_attention.projects_table_in_bf16(table)
            assert not (training and in_bf16)
            calls.clear()
            long_model(torch.randint(0, 37, (1, 40)))
            assert len(calls) == int(in_bf16)
            long_model(torch.randint(0, 37, (1, 8 * 37 + 1)))
            assert len(calls) == 1 + int(in_bf16)


def test_projected_vocabulary_under_bf16_autocast_rounds_toward_fp32():
    torch.manual_seed(0)
    model = PerceiverAR(tiny_config(max_context=200)).eval()
    tokens = torch.randint(0, 37, (2, 200))  # 400 positions: more than 8x the 37 rows (_vocabulary_cost)
    calls = _counting_vocabulary_calls(model)
    with torch.no_grad():
        exact = model(tokens)
        rounded = {}
        for projected in (False, True):
            model.project_vocabulary = projected
            with torch.autocast("cpu", dtype=torch.bfloat16):
                rounded[projected] = model(tokens).float()
    assert len(calls) == 2  # fp32 and the projected bf16 run
    error = {projected: (logits - exact).abs().max().item() for projected, logits in rounded.items()}
    assert error[True] <= 1.5 * error[False] + 1e-3, error  # keys rotated in fp32 and rounded once
    assert error[True] < 0.05, error


def test_recomputed_cross_attention_holds_no_per_position_activations():
    """The autograd graph keeps token ids, not (T, d_model) tensors: saved bytes grow ~16 per extra token."""
    config = PerceiverARConfig(
        vocab_size=50, max_context=8192, num_latents=16, d_model=64, num_heads=4, num_layers=1
    )
    model = PerceiverAR(config).train()
    model.recompute_prefix_above, model.prefix_chunk = 0, 512

    def saved_bytes(length: int) -> int:
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        tokens = torch.randint(0, 50, (1, length))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            latent_loss(model(tokens[:, :-1]), tokens[:, 1:])
        return total

    per_token = (saved_bytes(8192) - saved_bytes(4096)) / 4096
    assert per_token <= 32, per_token  # the ordinary path saves ~1 KiB per token at d_model 64


@pytest.mark.parametrize("is_causal", [False, True])
def test_portable_chunk_attention_math_matches_the_cpu_kernels(is_causal):
    """The non-CPU path of the recomputing cross-attention, checked against the fused CPU kernels."""
    from perceiver_cli.model import attention_backward_math, attention_with_lse_math

    torch.manual_seed(0)
    q, k, v, grad = (torch.randn(2, 3, 9, 8) for _ in range(4))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=is_causal)[:2]
    out_math, lse_math = attention_with_lse_math(q, k, v, is_causal)
    torch.testing.assert_close(out_math, out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse_math, lse, rtol=1e-4, atol=1e-5)
    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, q, k, v, out, lse, 0.0, is_causal
    )
    for got, expected in zip(attention_backward_math(grad, q, k, v, out, lse, is_causal), kernel, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("queries", [1, 5, 40])
def test_attention_over_keys_stored_transposed(queries):
    """Decoding caches are (B, H, Dh, T) storage seen as (B, H, T, Dh): every attention path must read them
    right (the CPU flash kernel assumes a unit stride along Dh and returned NaN before it was given a copy)."""
    generator = torch.Generator().manual_seed(queries)
    q = torch.randn(2, 3, queries, 16, generator=generator)
    k_storage, v_storage = (torch.randn(2, 3, 16, 70, generator=generator) for _ in range(2))
    k, v = k_storage[..., :60].transpose(-1, -2), v_storage[..., :60].transpose(-1, -2)
    assert k.stride(-1) != 1
    with torch.no_grad():
        got = causal_attention(q, k, v)
        expected = causal_attention(q, k.contiguous(), v.contiguous())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_one_query_per_row_of_a_batch_matches_the_fused_kernel(dtype, tolerance):
    """Cached steps of a batch attend by two batched matmuls; the result is the fused kernel's."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, length, 16, generator=generator).to(dtype) for length in (1, 300, 300))
    with torch.no_grad():
        batched = causal_attention(q, k, v)
        fused = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert batched.dtype == dtype
    torch.testing.assert_close(batched.float(), fused, atol=tolerance, rtol=0)


def test_rope_of_consecutive_positions_is_the_kept_table_sliced():
    torch.manual_seed(0)
    model = PerceiverAR(PerceiverARConfig(vocab_size=16, max_context=32, num_latents=8, d_model=32, num_heads=2))
    config = model.config
    for first, length in [(0, 32), (5, 20), (100, 40), (0, 1)]:  # 100..139: past max_context, the table grows
        positions = torch.arange(first, first + length)[None]
        cos, sin = model.rope(positions)
        exact_cos, exact_sin = rotary_tables(positions, config.rotary_dim, config.rotary_base, torch.float32)
        assert torch.equal(cos, exact_cos) and torch.equal(sin, exact_sin)
    assert model._rope_tables[(torch.device("cpu"), torch.float32)][0].shape[0] >= 140
    scattered = torch.tensor([[3, 1, 7]])  # not a run: computed directly
    assert torch.equal(
        model.rope(scattered)[0], rotary_tables(scattered, config.rotary_dim, 10_000.0, torch.float32)[0]
    )
    model.rope_table_positions = 150  # a run reaching past the kept table's cap: computed directly, no growth
    far = torch.arange(140, 200)[None]
    assert torch.equal(model.rope(far)[1], rotary_tables(far, config.rotary_dim, 10_000.0, torch.float32)[1])
    model.rope(torch.arange(145, 150)[None])  # within the cap: the table grows to the cap at most
    assert 140 <= model._rope_tables[(torch.device("cpu"), torch.float32)][0].shape[0] <= 150
