"""The fused C decoding step (perceiver_cli/cpu_decode.c) against DecodeState's PyTorch step."""

import copy

import pytest
import torch

from perceiver_cli import PerceiverAR, PerceiverARConfig, cpu_decode, generate_stream
from perceiver_cli.device import cpu_flags
from perceiver_cli.generate import DecodeState, SamplingOptions, next_window, prompt_window, step_model

needs_kernel = pytest.mark.skipif(not cpu_decode.available(), reason="needs AVX-512 and a C compiler")


def random_model(seed: int, **overrides) -> PerceiverAR:
    torch.manual_seed(seed)
    settings = dict(vocab_size=51, max_context=96, num_latents=24, d_model=64, num_heads=2, num_layers=2)
    model = PerceiverAR(PerceiverARConfig(**{**settings, **overrides})).eval()
    with torch.no_grad():  # LayerNorms away from the identity, so that a swapped weight and bias would show
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.3), module.bias.normal_(0.0, 0.3)
    return model


def prefilled_state(model, batch, prompt_length, stepper, cache_dtype=None):
    c = model.config
    prompt = torch.randint(0, c.vocab_size, (batch, prompt_length), generator=torch.Generator().manual_seed(1))
    state = DecodeState(model, batch, prompt_length + 64, torch.device("cpu"), stepper, cache_dtype=cache_dtype)
    window = prompt_window(prompt_length, c.max_context, c.num_latents, None)
    state.tokens[:, : window.start] = prompt[:, : window.start]
    state.length = state.cross_start = window.start
    state.append_inputs(prompt[:, window.start :])
    state.latent_pass(window)
    return state, window


@needs_kernel
@pytest.mark.parametrize(
    "batch, overrides",
    [
        (1, {}),
        (3, {"rotary_fraction": 1.0}),  # rows not a multiple of the kernel's groups of four
        (5, {"rotary_fraction": 0.0, "vocab_size": 50, "mlp_ratio": 2.0}),  # no rotary; 50 = 12 groups of 4 + 2
        (2, {"d_model": 128, "num_heads": 4, "num_layers": 3, "tie_embeddings": False}),
        (6, {"mlp_ratio": 10.0}),  # batches take groups in chunks: the down-projection's 640 inputs are 512 + 128
    ],
)
def test_fused_step_matches_the_pytorch_step(batch, overrides):
    model = random_model(batch, **overrides)
    c = model.config
    with torch.no_grad():
        state, window = prefilled_state(model, batch, 50, step_model(model, torch.float32, batch))
        fused = cpu_decode.FusedStep(model, state)
        state.fused = False  # state.step() stays on PyTorch: the reference
        for _ in range(6):
            window = next_window(window, c.max_context, c.num_latents, None)
            assert not window.refill
            state.append_inputs(torch.randint(0, c.vocab_size, (batch, 1)))
            caches = [t.clone() for t in state.latent_keys + state.latent_values]
            expected = state.step(window)
            filled = state.num_latents  # slots [0, filled) hold keys and values; the rest is unwritten memory
            written = [t[:, :, :filled].clone() for t in state.latent_keys + state.latent_values]
            for cache, before in zip(state.latent_keys + state.latent_values, caches, strict=True):
                cache.copy_(before)
            position = window.end - 1
            got = fused(state.tokens, position, state.cross_length, state.num_latents - 1)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
            for cache, reference in zip(state.latent_keys + state.latent_values, written, strict=True):
                torch.testing.assert_close(cache[:, :, :filled], reference, rtol=1e-4, atol=1e-5)  # its own k, v


@needs_kernel
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_step_appends_the_newest_inputs_keys_and_values(batch):
    model = random_model(7, rotary_fraction=1.0)
    c = model.config
    with torch.no_grad():
        state, window = prefilled_state(model, batch, 50, step_model(model, torch.float32, batch))
        fused = cpu_decode.FusedStep(model, state)
        state.fused = False
        window = next_window(window, c.max_context, c.num_latents, None)
        state.append_inputs(torch.randint(0, c.vocab_size, (batch, 1)))  # PyTorch writes slot cross_length - 1
        slot = state.cross_length - 1
        cache_key, cache_value = state.cross_key[:, :, slot].clone(), state.cross_value[:, :, slot].clone()
        latents = [t.clone() for t in state.latent_keys + state.latent_values]
        expected = state.step(window)
        state.cross_key[:, :, slot], state.cross_value[:, :, slot] = -1.0, -1.0  # the kernel must write them
        for cache, before in zip(state.latent_keys + state.latent_values, latents, strict=True):
            cache.copy_(before)
        position = window.end - 1
        got = fused(state.tokens, position, state.cross_length, state.num_latents - 1, append=True)
        torch.testing.assert_close(state.cross_key[:, :, slot], cache_key, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(state.cross_value[:, :, slot], cache_value, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize(
    "batch, overrides",
    [
        (1, {}),
        (3, {"rotary_fraction": 1.0}),  # every dim rotated: no unrotated part
        (5, {"rotary_fraction": 0.0, "vocab_size": 50, "mlp_ratio": 2.0}),  # nothing rotated
        (2, {"d_model": 96, "num_heads": 1, "rotary_fraction": 0.4}),  # 19 pairs: a vector of 16 and 3 more
        (2, {"d_model": 128, "num_heads": 4, "num_layers": 3, "tie_embeddings": False}),
    ],
)
def test_fused_step_from_the_vocabulary_is_the_step_over_the_caches(batch, overrides):
    """attend_vocabulary: every window position's key and value from the projected vocabulary and its position's
    rotary tables, and the newest token's cache rows copied from the table and rotated: the PyTorch step over the
    caches, which the C step does not read (zeroed before it runs)."""
    model = random_model(batch, **overrides)
    c = model.config
    with torch.no_grad():
        state, window = prefilled_state(model, batch, 50, step_model(model, torch.float32, batch))
        fused = cpu_decode.FusedStep(model, state, vocabulary_from=1)
        assert fused.vocabulary_from == 1
        state.fused = False
        for _ in range(4):
            window = next_window(window, c.max_context, c.num_latents, None)
            state.append_inputs(torch.randint(0, c.vocab_size, (batch, 1)))  # PyTorch writes slot cross_length - 1
            slot = state.cross_length - 1
            key, value = state.cross_key[:, :, : slot + 1].clone(), state.cross_value[:, :, : slot + 1].clone()
            expected = pytorch_step_keeping_caches(state, window)
            state.cross_key[:, :, : slot + 1], state.cross_value[:, :, : slot + 1] = 0.0, 0.0
            got = fused(state.tokens, window.end - 1, state.cross_length, state.num_latents - 1, append=True)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(state.cross_key[:, :, slot], key[:, :, slot], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(state.cross_value[:, :, slot], value[:, :, slot], rtol=1e-4, atol=1e-5)
            state.cross_key[:, :, :slot], state.cross_value[:, :, :slot] = key[:, :, :slot], value[:, :, :slot]


@needs_kernel
def test_the_step_attends_from_the_vocabulary_once_the_window_holds_as_many_positions(monkeypatch):
    """By default from as many window positions as the vocabulary has tokens (below that the table costs more
    to read than the caches), never where the window cannot grow that long or vocabulary_attention is off."""
    model = random_model(0)  # 51 tokens, windows of up to 97 positions
    with torch.no_grad():
        state, window = prefilled_state(model, 1, 50, step_model(model, torch.float32))
        assert state.fused.vocabulary_from == 51
        state.fused = False  # the PyTorch steps: the reference
        state.append_inputs(torch.randint(0, 51, (1, 1)))
        window = next_window(window, 96, 24, None)
        expected = pytorch_step_keeping_caches(state, window)
        state.cross_key.zero_(), state.cross_value.zero_()  # so that a step that reads them is told apart
        latents = [t.clone() for t in state.latent_keys + state.latent_values]
        for vocabulary_from, reads_the_caches in ((state.cross_length + 1, True), (state.cross_length, False)):
            for cache, before in zip(state.latent_keys + state.latent_values, latents, strict=True):
                cache.copy_(before)
            step = cpu_decode.FusedStep(model, state, vocabulary_from=vocabulary_from)
            got = step(state.tokens, window.end - 1, state.cross_length, state.num_latents - 1)
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5) != reads_the_caches
        assert cpu_decode.FusedStep(random_model(0, vocab_size=98), state).vocabulary_from is None  # > 97
        monkeypatch.setattr(cpu_decode, "vocabulary_attention", False)
        assert cpu_decode.FusedStep(model, state).vocabulary_from is None


@needs_kernel
def test_generation_with_a_stepper_runs_fused_and_keeps_the_tokens():
    """Greedy tokens with the fused steps equal the exact path's over several refills; logits to 1e-4."""
    model = random_model(0)
    prompt = torch.randint(0, 51, (2, 40), generator=torch.Generator().manual_seed(3))
    options = SamplingOptions(temperature=0)
    exact = list(generate_stream(model, prompt, 80, options))
    fast = list(generate_stream(model, prompt, 80, options, stepper=step_model(model, torch.float32, 2)))
    assert sum(step.window.refill for step in fast) >= 3
    for a, b in zip(exact, fast, strict=True):
        assert torch.equal(a.tokens, b.tokens)
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize(
    "cache_dtype, prompt_length, vocabulary",
    [
        (None, 60, True),
        (torch.int8, 60, True),
        # longer than the context (96): the window starts inside the prompt and slides past it at the refills,
        # with the cross-attention read from its caches, whose prompt slots are shared until they leave the window
        (None, 150, False),
        (torch.bfloat16, 150, False),
    ],
)
def test_one_prompt_for_a_batch_fills_every_rows_caches_for_the_fused_steps(
    monkeypatch, cache_dtype, prompt_length, vocabulary
):
    """A batch of one prompt (`perceiver generate -n`) is prefilled on one row and its caches copied to all
    (int8 ones with their scales), and the fused steps read the shared slots from row 0: each row still gets
    what a batch of one gives it alone."""
    monkeypatch.setattr(cpu_decode, "vocabulary_attention", vocabulary)
    model = random_model(4)
    prompt = torch.randint(0, 51, (1, prompt_length), generator=torch.Generator().manual_seed(8))
    forced = torch.randint(0, 51, (4, 60), generator=torch.Generator().manual_seed(9))
    paths = dict(cache_dtype=cache_dtype)

    def run(rows: slice, stepper_rows: int) -> torch.Tensor:
        stepper = step_model(model, torch.float32, stepper_rows)
        prompts = prompt.repeat(len(range(4)[rows]), 1)
        stream = generate_stream(model, prompts, 60, forced_tokens=forced[rows], stepper=stepper, **paths)
        return torch.stack([step.logits for step in stream], dim=1)

    together = run(slice(None), 4)
    # (with bf16 caches and a prompt that fills the context, the first refill is a pass over all but the newest
    # position and one cached step, which reads the pass's latents from the caches, rounded to bf16)
    tolerance = dict(rtol=1e-2, atol=1e-3) if cache_dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    for row in range(4):
        alone = run(slice(row, row + 1), 1)
        torch.testing.assert_close(together[row : row + 1], alone, **tolerance)


@needs_kernel
@pytest.mark.parametrize(
    "batch, cache_dtype, overrides",
    [
        (3, None, {}),  # one group of three rows (head_dim 32)
        (6, torch.bfloat16, {}),  # groups of four and two
        (5, torch.int8, {}),
        (3, None, {"d_model": 256}),  # head_dim 128: groups of two
    ],
)
def test_rows_read_the_shared_prompts_cache_slots_from_row_0(monkeypatch, batch, cache_dtype, overrides):
    """With one prompt for the batch, the fused step reads the prompt's cross-attention slots and the prompt
    pass's latent slots from row 0 only (once for each group of rows of a head): the other rows' copies, spoiled
    here, are never read; the logits are those of the same state without sharing. The latent slots stop being
    shared at the next refill."""
    monkeypatch.setattr(cpu_decode, "vocabulary_attention", False)  # so that the cross-attention reads its caches
    model = random_model(6, **overrides)
    c = model.config
    prompt = torch.randint(0, 51, (1, 50), generator=torch.Generator().manual_seed(2)).repeat(batch, 1)
    stepper = step_model(model, torch.float32, batch)

    def prefilled(shared: bool) -> tuple[DecodeState, object]:
        state = DecodeState(model, batch, 200, torch.device("cpu"), stepper, cache_dtype=cache_dtype)
        state.shared_rows = shared
        window = prompt_window(50, c.max_context, c.num_latents, None)
        state.append_inputs(prompt)
        state.latent_pass(window)
        return state, window

    with torch.no_grad():
        shared, window = prefilled(True)
        plain, _ = prefilled(False)
        assert (shared.shared_end, shared.shared_latents) == (50, window.num_latents) and plain.shared_end == 0
        caches = [shared.cross_key, shared.cross_value, *shared.latent_keys, *shared.latent_values]
        kept = [cache.clone() for cache in caches]
        slots = [50 if cache.shape[2] == shared.cross_capacity else window.num_latents for cache in caches]
        for cache, count in zip(caches, slots, strict=True):
            cache[1:, :, :count] = 127 if cache.dtype == torch.int8 else float("nan")
        new_tokens = torch.randint(0, 51, (batch, 30), generator=torch.Generator().manual_seed(3))
        for index in range(30):
            window = next_window(window, c.max_context, c.num_latents, None)
            if window.refill:  # which reads every row's own copy (restored), and computes each row's latents
                for cache, before, count in zip(caches, kept, slots, strict=True):
                    cache[1:, :, :count] = before[1:, :, :count]
            results = []
            for state in (shared, plain):
                state.append_inputs(new_tokens[:, index : index + 1])
                results.append(state.latent_pass(window) if window.refill else state.step(window))
            got, expected = results
            # (the shared prefill ran at batch 1, the plain one at batch 3: sums in another order at most)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"step {index}")
            assert got.isfinite().all()
            if window.refill:
                assert shared.shared_latents == 0 and shared.shared_end == 50
                break
        assert window.refill and index > 4


@needs_kernel
def test_fused_step_checks_each_tokens_tensor_it_is_given_and_every_position():
    model = random_model(0)
    with torch.no_grad():
        state, window = prefilled_state(model, 2, 40, step_model(model, torch.float32, 2))
        fused, n = state.fused, state.num_latents
        fused(state.tokens, window.end - 1, state.cross_length, n)  # DecodeState's tokens: checked once
        with pytest.raises(ValueError, match="position 104 is outside"):
            fused(state.tokens, state.tokens.shape[1], state.cross_length, n)
        for wrong in (state.tokens.int(), state.tokens[:1], state.tokens[0]):
            with pytest.raises(ValueError, match="int64 CPU tensor"):
                fused(wrong, 0, state.cross_length, n)


@needs_kernel
def test_appending_one_token_per_row_is_append_inputs_bookkeeping():
    """append_token (generate_stream's path) writes the tokens and leaves their keys/values to the fused step,
    as append_inputs does; past the cross-attention cache's capacity both raise the same error."""
    model = random_model(0)
    with torch.no_grad():
        a, _ = prefilled_state(model, 2, 40, step_model(model, torch.float32, 2))
        b, _ = prefilled_state(model, 2, 40, step_model(model, torch.float32, 2))
        new = torch.tensor([7, 9])
        a.append_token(new)
        b.append_inputs(new[:, None])
        assert torch.equal(a.tokens, b.tokens) and a.tokens[:, 40].tolist() == [7, 9]
        assert (a.length, a.cross_length, a.pending_append) == (b.length, b.cross_length, b.pending_append)
        a.cross_capacity = b.cross_capacity = a.cross_length  # full
        for append in (a.append_token, lambda t: b.append_inputs(t[:, None])):
            with pytest.raises(RuntimeError, match="cross-attention cache full"):
                append(new)


@needs_kernel
def test_the_state_picks_the_fused_step_only_where_it_applies():
    model = random_model(0)
    with torch.no_grad():
        state, window = prefilled_state(model, 1, 50, step_model(model, torch.float32))
        state.append_inputs(torch.zeros(1, 1, dtype=torch.long))
        state.step(next_window(window, 96, 24, None))
        assert isinstance(state.fused, cpu_decode.FusedStep)
        assert state.cross_key.stride(-1) == 1  # rows, which the C step reads fastest
        exact, window = prefilled_state(model, 1, 50, None)  # no stepper: the reference path stays PyTorch
        exact.append_inputs(torch.zeros(1, 1, dtype=torch.long))
        exact.step(next_window(window, 96, 24, None))
        assert exact.fused is False
        assert exact.cross_key.stride(-2) == 1 and not cpu_decode.supports(model, exact)  # transposed for bmm
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 refill's bf16 caches, as rows: the C step too
            bf16_state, _ = prefilled_state(model, 1, 50, step_model(model, torch.float32))
        assert bf16_state.cross_key.dtype == torch.bfloat16 and isinstance(bf16_state.fused, cpu_decode.FusedStep)
        # bf16 caches asked for where no C step runs (no stepper): the PyTorch steps' own dtype instead
        exact_bf16, _ = prefilled_state(model, 1, 50, None, cache_dtype=torch.bfloat16)
        assert exact_bf16.cross_key.dtype == torch.float32 and exact_bf16.fused is False
    assert not cpu_decode.supports(random_model(0, d_model=48, num_heads=2), state)  # head_dim 24


@needs_kernel
@pytest.mark.parametrize("rows, out, size", [(1, 4096, 6960), (16, 50, 64), (3, 7, 32)])
def test_the_steps_product_is_a_linear_layer(rows, out, size):
    torch.manual_seed(rows)
    x, weight = torch.randn(rows, size), torch.randn(out, size)
    torch.testing.assert_close(cpu_decode.linear(x, weight), x @ weight.T, rtol=1e-4, atol=1e-3)


@needs_kernel
@pytest.mark.parametrize("rows, out", [(16, 10), (6, 9), (12, 64)])
def test_a_batchs_product_sums_as_each_row_alone_does(rows, out):
    """Batches take each group of weight rows in chunks, keeping their sums between them: the same additions in
    the same order as one row's single pass, so batching never changes a row's result, not even by rounding."""
    torch.manual_seed(rows)
    x, weight = torch.randn(rows, 1600), cpu_decode.PackedWeight(torch.randn(out, 1600))  # 3 chunks + 64
    alone = torch.cat([cpu_decode.linear(x[r : r + 1], weight) for r in range(rows)])
    assert torch.equal(cpu_decode.linear(x, weight), alone)


@needs_kernel
def test_fused_steps_with_more_latents_than_trained():
    model = random_model(2)  # trained with 24 latents
    prompt = torch.randint(0, 51, (1, 60), generator=torch.Generator().manual_seed(4))
    options = SamplingOptions(temperature=0)
    fast = list(
        generate_stream(model, prompt, 50, options, num_latents=48, stepper=step_model(model, torch.float32))
    )
    exact = list(generate_stream(model, prompt, 50, options, num_latents=48, use_cache=False))
    assert max(step.window.num_latents for step in fast) == 48
    for a, b in zip(exact, fast, strict=True):
        assert torch.equal(a.tokens, b.tokens)


def pytorch_step_keeping_caches(state, window):
    """The PyTorch step's logits, its latent cache writes undone, so that the C step then writes the same slot."""
    latents = [t.clone() for t in state.latent_keys + state.latent_values]
    logits = state.step(window)
    for cache, before in zip(state.latent_keys + state.latent_values, latents, strict=True):
        cache.copy_(before)
    return logits


@needs_kernel
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_step_with_bf16_weights_is_the_model_with_bf16_rounded_weights(batch):
    """bf16 matrices (a bf16 step_model, what `--dtype auto` gives) are only widened: the step equals fp32
    arithmetic on the rounded weights, which the PyTorch step on such a copy computes."""
    model = random_model(batch, d_model=128, num_heads=4, tie_embeddings=False)
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for module in rounded.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(module.weight.bfloat16().float())
    c = model.config
    with torch.no_grad():
        state, window = prefilled_state(rounded, batch, 50, step_model(rounded, torch.float32, batch))
        state.fused = False
        fused = cpu_decode.FusedStep(model, state, step_model(model, torch.bfloat16, batch))
        assert fused.weights_bf16
        window = next_window(window, c.max_context, c.num_latents, None)
        state.append_inputs(torch.randint(0, c.vocab_size, (batch, 1)))
        expected = pytorch_step_keeping_caches(state, window)
        position = window.end - 1
        got = fused(state.tokens, position, state.cross_length, state.num_latents - 1)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        assert not cpu_decode.FusedStep(model, state, step_model(model, torch.float32, batch)).weights_bf16


def round_to_bf16_(tensors):
    for t in tensors:
        t.copy_(t.bfloat16().float())


@needs_kernel
def test_bf16_refills_run_only_where_the_c_step_runs():
    """refill_dtype: the prompt's prefill and the refills under bf16 autocast (fp32 logits out, bf16 caches in),
    close to fp32 refills; with no stepper (the exact path, PyTorch steps) it is ignored."""
    model = random_model(5)
    prompt = torch.randint(0, 51, (2, 40), generator=torch.Generator().manual_seed(6))
    options = SamplingOptions(temperature=0)
    stepper, bf16 = step_model(model, torch.float32, 2), torch.bfloat16
    fp32_refills = list(generate_stream(model, prompt, 60, options, stepper=stepper, cache_dtype=bf16))
    bf16_refills = list(
        generate_stream(model, prompt, 60, options, stepper=stepper, cache_dtype=bf16, refill_dtype=bf16)
    )
    assert sum(step.window.refill for step in bf16_refills) >= 3
    for a, b in zip(fp32_refills, bf16_refills, strict=True):
        assert b.logits.dtype == torch.float32
        torch.testing.assert_close(b.logits, a.logits, atol=0.1, rtol=0.05)  # bf16 activations in the refills
    exact = DecodeState(model, 2, 100, torch.device("cpu"), None, refill_dtype=bf16)
    assert exact.refill_dtype is None
    assert DecodeState(model, 2, 100, torch.device("cpu"), stepper, refill_dtype=bf16).refill_dtype == bf16


@needs_kernel
@pytest.mark.skipif("avx512_bf16" not in cpu_flags(), reason="needs AVX512-BF16")
def test_bf16_products_for_batches_round_only_the_product_inputs():
    """From BF16_PRODUCTS_ROWS rows on, bf16 weights multiply bf16-rounded inputs (vdpbf16ps): the logits stay
    within bf16 rounding of the fp32-input step on the same weights and caches."""
    model = random_model(8, d_model=128, num_heads=4, mlp_ratio=12.0)  # down-projection: 1,536 = 1,024 + 512
    c = model.config
    batch = cpu_decode.BF16_PRODUCTS_ROWS + 1
    with torch.no_grad():
        state, window = prefilled_state(model, batch, 50, step_model(model, torch.float32, batch))
        weights = step_model(model, torch.bfloat16, batch)
        paired = cpu_decode.FusedStep(model, state, weights)
        assert paired.products_bf16
        plain = cpu_decode.FusedStep(model, state, weights)
        plain.spec.products_bf16 = plain.products_bf16 = plain.spec.products_amx = plain.products_amx = False
        window = next_window(window, c.max_context, c.num_latents, None)
        state.append_inputs(torch.randint(0, c.vocab_size, (batch, 1)))
        caches = [t.clone() for t in state.latent_keys + state.latent_values]
        position, n = window.end - 1, state.num_latents
        expected = plain(state.tokens, position, state.cross_length, n, append=True)
        for cache, before in zip(state.latent_keys + state.latent_values, caches, strict=True):
            cache.copy_(before)
        got = paired(state.tokens, position, state.cross_length, n, append=True)
        assert not torch.equal(got, expected)  # the inputs were rounded
        torch.testing.assert_close(got, expected, rtol=0.05, atol=0.02)
        single = cpu_decode.FusedStep(
            model, prefilled_state(model, 1, 50, step_model(model, torch.float32))[0], weights
        )
        assert not single.products_bf16  # one row stays fp32: memory-bound, nothing to gain


@needs_kernel
@pytest.mark.skipif(not cpu_decode.amx_available(), reason="needs AMX")
@pytest.mark.parametrize("batch", [5, 18])  # 18: a second pass of two rows
def test_amx_products_sum_what_vdpbf16ps_sums(monkeypatch, batch):
    """On AMX tiles the bf16 products add the same bf16 products in another order, across more groups than the
    tiles take at once (51 outputs: 12 groups of 4 and a padded one): the logits are as close to the step on
    fp32 inputs as vdpbf16ps's (an order's last-bit difference can flip the bf16 rounding of a later product's
    input, hence a few rows ~1e-3 apart, not 1e-6)."""
    model = random_model(9, d_model=128, num_heads=4, mlp_ratio=12.0)
    c = model.config
    a, b = torch.randn(300, 320).bfloat16(), torch.randn(320, 960).bfloat16()
    onednn_product = a @ b  # oneDNN's own AMX products, which must not see our tile configuration
    with torch.no_grad():
        state, window = prefilled_state(model, batch, 50, step_model(model, torch.float32, batch))
        weights = step_model(model, torch.bfloat16, batch)
        on_tiles = cpu_decode.FusedStep(model, state, weights)
        monkeypatch.setattr(cpu_decode, "amx_products", False)
        on_vectors = cpu_decode.FusedStep(model, state, weights)
        fp32_inputs = cpu_decode.FusedStep(model, state, weights)
        fp32_inputs.spec.products_bf16 = fp32_inputs.spec.products_amx = 0
        assert on_tiles.products_amx and on_vectors.products_bf16 and not on_vectors.products_amx
        window = next_window(window, c.max_context, c.num_latents, None)
        state.append_inputs(torch.randint(0, c.vocab_size, (batch, 1)))
        caches = [t.clone() for t in state.latent_keys + state.latent_values]
        logits = []
        for step in (fp32_inputs, on_vectors, on_tiles):  # each from the same caches
            for cache, before in zip(state.latent_keys + state.latent_values, caches, strict=True):
                cache.copy_(before)
            logits.append(step(state.tokens, window.end - 1, state.cross_length, state.num_latents, append=True))
        exact, vectors, tiles = logits
        assert (tiles - exact).abs().max() <= 1.2 * (vectors - exact).abs().max()
        torch.testing.assert_close(tiles, vectors, rtol=0.01, atol=2e-3)
    assert torch.equal(a @ b, onednn_product)


def test_pack_lays_out_groups_of_four_rows_in_64_byte_blocks():
    weight = torch.arange(7 * 64, dtype=torch.float32).reshape(7, 64)  # 7 rows: the second group padded
    packed = cpu_decode.pack(weight).reshape(-1)
    group, block, row = 1, 2, 2  # row 6, elements 32..47
    start = (group * 4 * 64) + block * 4 * 16 + row * 16
    assert torch.equal(packed[start : start + 16], weight[6, 32:48])
    assert torch.equal(packed[(4 * 64) + 3 * 16 : (4 * 64) + 4 * 16], torch.zeros(16))  # the padding row
    rounded = weight.to(torch.bfloat16)
    halves = cpu_decode.pack(rounded).reshape(-1)  # bf16: 32 a block, pairs (k, 16 + k)
    start = (group * 4 * 64) + 1 * 4 * 32 + row * 32  # row 6, block 1: elements 32..63
    pairs = halves[start : start + 32].reshape(16, 2)
    assert torch.equal(pairs[:, 0], rounded[6, 32:48]) and torch.equal(pairs[:, 1], rounded[6, 48:64])
    with pytest.raises(ValueError, match="cannot pack"):
        cpu_decode.pack(torch.zeros(4, 48, dtype=torch.bfloat16))


def test_quantize_int8_maps_each_rows_largest_magnitude_to_127():
    weight = torch.tensor([[0.5, -1.0, 0.25, 0.0], [3.0, 1.0, -2.0, 0.01], [0.0, 0.0, 0.0, 0.0]])
    values, scale = cpu_decode.quantize_int8(weight)
    assert values.dtype == torch.int8 and values.abs().max() == 127
    torch.testing.assert_close(scale[:2], torch.tensor([1.0, 3.0]) / 127)
    assert torch.equal(values[2], torch.zeros(4, dtype=torch.int8))  # an all-zero row stays zero
    assert (values.float() * scale[:, None] - weight).abs().max() <= scale.max() / 2 + 1e-7  # half a step


def test_pack_int8_puts_the_scales_first_then_blocks_of_64():
    weight = torch.arange(7 * 128).reshape(7, 128).remainder(251).sub(125).to(torch.int8)  # two groups, 2 blocks
    scale = torch.arange(1, 8, dtype=torch.float32)
    packed = cpu_decode.pack_int8(weight, scale)
    scales = packed[:64].view(torch.float32)  # 8 padded rows of fp32: 32 bytes, padded to 64
    assert torch.equal(scales[:7], scale) and torch.equal(scales[7:], torch.zeros(9))
    blocks = packed[64:].view(torch.int8).reshape(2, 2, 4, 64)  # [group][block][row][64 values]
    assert torch.equal(blocks[1, 1, 2], weight[6, 64:128])
    assert torch.equal(blocks[1, 0, 3], torch.zeros(64, dtype=torch.int8))  # the padding row
    with pytest.raises(ValueError, match="cannot pack"):
        cpu_decode.pack_int8(weight[:, :96], scale)


@needs_kernel
@pytest.mark.parametrize("batch", [1, 3, 6])
def test_fused_step_with_int8_weights_is_the_model_with_dequantized_weights(batch):
    """int8 matrices with a scale per row (an int8 step_model) are widened and their sums scaled: the step equals
    fp32 arithmetic on the dequantized weights, which the PyTorch step on such a copy computes. Batches of more
    than four rows take the chunked path (mlp_ratio 17: the down-projection's 2,176 inputs are a chunk of 2,048
    int8 values and 128 more); a vocabulary of 50 leaves the head's last group of four rows two short."""
    model = random_model(batch, d_model=128, num_heads=4, tie_embeddings=False, vocab_size=50, mlp_ratio=17.0)
    dequantized = copy.deepcopy(model)
    with torch.no_grad():
        for module in dequantized.modules():
            if isinstance(module, torch.nn.Linear):
                values, scale = cpu_decode.quantize_int8(module.weight)
                module.weight.copy_(values.float() * scale[:, None])
    c = model.config
    with torch.no_grad():
        state, window = prefilled_state(dequantized, batch, 50, step_model(dequantized, torch.float32, batch))
        state.fused = False
        fused = cpu_decode.FusedStep(model, state, step_model(model, torch.int8, batch))
        assert fused.weights_int8 and not fused.weights_bf16
        for round_ in range(4):
            if round_ == 3:  # the PyTorch step on the int8 step_model (the fallback without the C step) agrees too
                state.stepper = step_model(model, torch.int8, batch)
            window = next_window(window, c.max_context, c.num_latents, None)
            state.append_inputs(torch.randint(0, c.vocab_size, (batch, 1)))
            expected = pytorch_step_keeping_caches(state, window)
            got = fused(state.tokens, window.end - 1, state.cross_length, state.num_latents - 1)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def round_to_int8_(caches):
    """Each row of each fp32 cache as int8 caches hold it: quantized with its own scale, then dequantized."""
    for t in caches:
        values, scale = cpu_decode.quantize_int8(t)
        t.copy_(values.float() * scale[..., None])


def test_int8_cache_rows_hold_their_scale_in_their_last_four_bytes():
    x = torch.randn(2, 3, 5, 16) * torch.tensor([1e-3, 1.0, 40.0])[None, :, None, None]
    cache = torch.zeros(2, 3, 7, 20, dtype=torch.int8)
    cpu_decode.store_int8_rows(cache[:, :, 1:6], x)
    values, scale = cpu_decode.quantize_int8(x)
    assert torch.equal(cache[:, :, 1:6, :16], values) and torch.equal(cache[:, :, 0], torch.zeros(2, 3, 20).char())
    assert torch.equal(cache[:, :, 1:6, 16:].contiguous().view(torch.float32)[..., 0], scale)
    back = cpu_decode.load_int8_rows(cache[:, :, 1:6], torch.float32)
    assert ((back - x).abs() <= scale[..., None] / 2 * 1.0001).all()  # within half a step of each row


@needs_kernel
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_step_with_bf16_or_int8_caches_is_fp32_arithmetic_on_the_cached_values(
    monkeypatch, batch, cache_dtype
):
    """bf16 caches (cache_dtype) are only widened as they are read, int8 ones (each row with its own scale)
    widened and scaled; the step's own keys and values are rounded (bf16) or quantized (int8: the C step's
    quantization is quantize_int8's) as they are written. The PyTorch step on fp32 caches holding the same values
    agrees. (The cross-attention's caches are read only with vocabulary_attention off: by default the step takes
    that attention's exact keys and values from the projected vocabulary and only writes its caches.)"""
    monkeypatch.setattr(cpu_decode, "vocabulary_attention", False)
    model = random_model(batch, rotary_fraction=1.0)
    c = model.config
    stepper = step_model(model, torch.float32, batch)
    int8 = cache_dtype == torch.int8
    with torch.no_grad():
        reference, window = prefilled_state(model, batch, 50, stepper)
        reference.fused = False
        state, _ = prefilled_state(model, batch, 50, stepper, cache_dtype=cache_dtype)
        assert isinstance(state.fused, cpu_decode.FusedStep) and state.cross_key.dtype == cache_dtype
        assert state.cross_key.shape[-1] == c.head_dim + (4 if int8 else 0)  # int8: each row's scale after it
        caches = lambda s: [s.cross_key, s.cross_value, *s.latent_keys, *s.latent_values]  # noqa: E731

        def held(cache: torch.Tensor, filled: int) -> torch.Tensor:  # the values a cache holds, in fp32
            part = cache[:, :, :filled]
            return cpu_decode.load_int8_rows(part, torch.float32) if int8 else part.float()

        for theirs, ours in zip(
            caches(reference), caches(state), strict=True
        ):  # the prompt's, as the state holds them
            filled = state.cross_length if ours.shape[2] == state.cross_capacity else state.num_latents
            theirs[:, :, :filled] = held(ours, filled)
        for _ in range(4):
            window = next_window(window, c.max_context, c.num_latents, None)
            new_tokens = torch.randint(0, c.vocab_size, (batch, 1))
            reference.append_inputs(new_tokens)  # in PyTorch, fp32: rounded below like the C step's write
            (round_to_int8_ if int8 else round_to_bf16_)(caches(reference))
            state.append_inputs(new_tokens)  # left to the C step, which writes it rounded
            expected, got = reference.step(window), state.step(window)
            # the one difference: the C step attends to its own new latent key/value as written (rounded), the
            # reference to its exact ones (bf16: a relative change ~1e-3 in one of ~25 keys; int8: ~1e-2)
            tolerance = dict(rtol=1e-2, atol=3e-3) if int8 else dict(rtol=1e-3, atol=3e-4)
            torch.testing.assert_close(got, expected, **tolerance)
            for ours, theirs in zip(caches(state), caches(reference), strict=True):
                filled = state.cross_length if ours.shape[2] == state.cross_capacity else state.num_latents
                ours, theirs = held(ours, filled), theirs[:, :, :filled]
                # the same values up to one rounding step of the row's largest (the C step's fp32 sums in another
                # order differ by ~1e-7 of the row, and the rounding can go the other way)
                step = theirs.abs().amax(dim=-1, keepdim=True) / (127 if int8 else 128)
                assert ((ours - theirs).abs() <= step * 1.01 + 1e-6).all()
            (round_to_int8_ if int8 else round_to_bf16_)(caches(reference))
