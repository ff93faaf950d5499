"""Generation: the window schedule (pure), cache exactness against full forwards, sampling filters, seeding."""

import sys

import pytest
import torch
import torch.nn.functional as F

from perceiver_cli import PerceiverAR, PerceiverARConfig, generate, generate_stream, window_schedule
from perceiver_cli.generate import (
    SamplingOptions,
    StepLinear,
    Window,
    next_window,
    onednn_linear_available,
    prompt_window,
    sample_next,
    step_model,
    step_weights_dtype,
)

MAX_CONTEXT, LATENTS = 40, 8


@pytest.fixture(scope="module")
def model() -> PerceiverAR:
    torch.manual_seed(0)
    config = PerceiverARConfig(
        vocab_size=29, max_context=MAX_CONTEXT, num_latents=LATENTS, d_model=32, num_heads=4, num_layers=3
    )
    return PerceiverAR(config).eval()


# ---------------------------------------------------------------------------------------------------------
# the window schedule


def test_short_prompt_grows_the_latent_window_then_refills_at_half():
    windows = window_schedule(prompt_length=1, max_new_tokens=12, max_context=100, num_latents=8)
    assert [w.num_latents for w in windows] == [1, 2, 3, 4, 5, 6, 7, 8, 4, 5, 6, 7]
    assert [w.refill for w in windows] == [True] + [False] * 7 + [True] + [False] * 3
    assert all(w.start == 0 and w.end == 1 + i for i, w in enumerate(windows))


def test_long_prompt_starts_at_refill_size_so_the_next_steps_are_cached():
    first = prompt_window(prompt_length=30, max_context=100, num_latents=8)
    assert first == Window(start=0, end=30, num_latents=4, refill=True)
    assert next_window(first, 100, 8) == Window(0, 31, 5, refill=False)


def test_prompt_longer_than_context_keeps_its_last_tokens():
    assert prompt_window(prompt_length=130, max_context=100, num_latents=8).start == 30


def test_window_slides_only_at_refills_and_stays_within_context():
    windows = window_schedule(prompt_length=5, max_new_tokens=300, max_context=40, num_latents=8)
    for previous, current in zip(windows, windows[1:], strict=False):
        assert current.end - current.start <= 40
        assert 1 <= current.num_latents <= 8
        if current.start != previous.start:
            assert current.refill
        if not current.refill:
            assert current.num_latents == previous.num_latents + 1
    # once the sequence is long the model always sees at least max_context - (N - N/2) tokens
    assert min(w.end - w.start for w in windows if w.end > 40) >= 40 - 4


def test_refill_latents_is_configurable():
    windows = window_schedule(1, 20, 100, 8, refill_latents=6)
    assert [w.num_latents for w in windows][7:12] == [8, 6, 7, 8, 6]


def test_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="at least one token"):
        prompt_window(0, 10, 4)


# ---------------------------------------------------------------------------------------------------------
# cache exactness


@pytest.mark.parametrize("prompt_length, num_latents", [(1, None), (5, None), (37, None), (45, 6)])
def test_cached_logits_equal_full_forward_at_every_step(model, prompt_length, num_latents):
    """Greedy decoding long enough to cross several refills and run past max_context."""
    torch.manual_seed(prompt_length)
    prompt = torch.randint(0, 29, (2, prompt_length))
    options = SamplingOptions(temperature=0)
    cached = list(generate_stream(model, prompt, 120, options, num_latents=num_latents, use_cache=True))
    reference = list(generate_stream(model, prompt, 120, options, num_latents=num_latents, use_cache=False))
    assert sum(step.window.refill for step in cached) >= 3
    assert cached[-1].window.end > MAX_CONTEXT
    for index, (a, b) in enumerate(zip(cached, reference, strict=True)):
        assert a.window == b.window
        torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=0, msg=f"step {index}")
        assert torch.equal(a.tokens, b.tokens), f"step {index}"


@pytest.mark.parametrize("batch", [1, 3])
def test_fp32_step_model_gives_the_exact_logits(model, batch):
    """fp32 StepLinears only change the kernel that reads the weights, not the arithmetic."""
    prompt = torch.randint(0, 29, (batch, 20), generator=torch.Generator().manual_seed(batch))
    options = SamplingOptions(temperature=0)
    exact = list(generate_stream(model, prompt, 60, options))
    stepped = list(generate_stream(model, prompt, 60, options, stepper=step_model(model, torch.float32)))
    assert any(not step.window.refill for step in stepped)
    for a, b in zip(exact, stepped, strict=True):
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0)])
def test_step_linear_computes_the_linear_layer(monkeypatch, onednn, rows, dtype, tolerance):
    """Prepacked for oneDNN where PyTorch has it, BLAS forms elsewhere: the product F.linear computes."""
    if onednn and not onednn_linear_available():
        pytest.skip("this PyTorch has no oneDNN linear (or this is not an x86 CPU)")
    if not onednn:
        monkeypatch.setattr(sys.modules[StepLinear.__module__], "onednn_linear_available", lambda: False)
    torch.manual_seed(rows)
    linear = torch.nn.Linear(96, 200, bias=False)
    step = StepLinear(linear, dtype, rows)
    assert step.packed is None  # packed at the first call: never, where the fused C step runs the steps
    x = torch.randn(rows, 1, 96)
    expected = F.linear(x.to(dtype).float(), linear.weight.to(dtype).float())
    got = step(x)
    assert (step.packed is not None) == onednn
    assert got.shape == (rows, 1, 200) and got.dtype == torch.float32
    # bf16: products of bf16 values are exact in fp32; only the order and precision of the sums differ
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=tolerance or 2e-2)


def test_bf16_step_weights_stay_close_and_leave_the_model_alone(model):
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    stepper = step_model(model, torch.bfloat16)
    linears = [m for m in stepper.modules() if isinstance(m, StepLinear)]
    assert len(linears) == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert stepper.embedding.weight is model.embedding.weight  # everything but the linear weights is shared
    prompt = torch.randint(0, 29, (1, 20), generator=torch.Generator().manual_seed(7))
    options = SamplingOptions(temperature=0)
    exact = torch.stack([s.logits for s in generate_stream(model, prompt, 30, options)])
    fast = torch.stack([s.logits for s in generate_stream(model, prompt, 30, options, stepper=stepper)])
    assert 0 < (fast - exact).abs().max() < 0.05  # bf16 rounding of weights and step activations, no more
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[name]), name


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_step_weights_policy(monkeypatch, fast_bf16):
    module = sys.modules[step_weights_dtype.__module__]  # perceiver_cli.generate is also a function's name
    monkeypatch.setattr(module, "cpu_has_fast_bf16", lambda: fast_bf16)
    cpu = torch.device("cpu")
    assert step_weights_dtype(cpu, 1, torch.float32) == torch.bfloat16
    assert step_weights_dtype(cpu, 16, torch.float32) == (torch.bfloat16 if fast_bf16 else torch.float32)
    assert step_weights_dtype(cpu, 16, torch.bfloat16) == torch.bfloat16
    assert step_weights_dtype(torch.device("cuda"), 1, torch.float32) is None


def test_greedy_tokens_identical_with_and_without_cache(model):
    prompt = torch.randint(0, 29, (1, 3))
    with_cache = generate(model, prompt, 90, temperature=0)
    without = generate(model, prompt, 90, temperature=0, use_cache=False)
    assert with_cache.shape == (1, 93)
    assert torch.equal(with_cache, without)
    assert torch.equal(with_cache[:, :3], prompt)


def test_batched_generation_matches_rows_generated_alone(model):
    prompt = torch.randint(0, 29, (3, 4))
    batched = generate(model, prompt, 50, temperature=0)
    for row in range(3):
        assert torch.equal(generate(model, prompt[row : row + 1], 50, temperature=0), batched[row : row + 1])


@pytest.mark.parametrize("prompt_length", [30, 45])
def test_one_prompt_for_a_batch_is_prefilled_once_and_every_row_keeps_its_logits(model, monkeypatch, prompt_length):
    """`perceiver generate -n` gives every row the same prompt: its latent pass runs on one row and is copied to
    all, then the rows go their own ways (forced tokens here) and each still gets the full forward's logits. A
    prompt longer than the context (40) refills at the first new token, where the rows differ only in that
    token: that refill's pass runs on one row too, and the new token is a cached step."""
    prompt = torch.randint(0, 29, (1, prompt_length), generator=torch.Generator().manual_seed(5)).repeat(3, 1)
    forced = torch.randint(0, 29, (3, 60), generator=torch.Generator().manual_seed(6))
    attended_rows = []
    attend = model.cross_attention.attend

    def counting_attend(latents, *args, **kwargs):
        attended_rows.append(latents.shape[0])
        return attend(latents, *args, **kwargs)

    monkeypatch.setattr(model.cross_attention, "attend", counting_attend)
    cached = list(generate_stream(model, prompt, 60, forced_tokens=forced))
    refills = sum(step.window.refill for step in cached)
    one_row = 2 if prompt_length > MAX_CONTEXT else 1  # the prompt's pass (and the refill right after it)
    assert cached[1].window.refill == (prompt_length > MAX_CONTEXT)
    assert refills >= 3 and attended_rows[:refills] == [1] * one_row + [3] * (refills - one_row)
    monkeypatch.undo()
    reference = list(generate_stream(model, prompt, 60, forced_tokens=forced, use_cache=False))
    for index, (a, b) in enumerate(zip(cached, reference, strict=True)):
        torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=0, msg=f"step {index}")
    assert torch.equal(cached[0].logits[0], cached[0].logits[2])


# ---------------------------------------------------------------------------------------------------------
# sampling


def test_same_seed_same_tokens_different_seed_different_tokens(model):
    prompt = torch.zeros(2, 1, dtype=torch.long)

    def run(seed):
        return generate(model, prompt, 60, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_top_k_one_is_greedy():
    logits = torch.randn(4, 50)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, SamplingOptions(top_k=1), generator), logits.argmax(-1))


def test_top_p_keeps_the_smallest_set_covering_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    drawn = {int(sample_next(logits, SamplingOptions(top_p=0.7), generator)) for _ in range(200)}
    assert drawn == {0, 1}


def test_banned_tokens_are_never_drawn():
    logits = torch.zeros(1, 5)
    logits[0, 2] = 100.0
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        assert int(sample_next(logits, SamplingOptions(banned_tokens=(2,)), generator)) != 2


def test_sampling_draws_what_torch_multinomial_draws_from_the_same_generator():
    # seeds given before the exponential race replaced torch.multinomial keep producing the same samples
    for seed in range(40):
        logits = torch.randn(3 if seed % 2 else 1, 97, generator=torch.Generator().manual_seed(seed)) * 3
        for temperature in (1.0, 0.7):
            ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            options = SamplingOptions(temperature=temperature, banned_tokens=(5,))
            drawn = sample_next(logits, options, ours)
            masked = logits.clone()
            masked[:, 5] = float("-inf")
            expected = torch.multinomial((masked / temperature).softmax(-1), 1, generator=theirs).squeeze(-1)
            assert torch.equal(drawn, expected)
            assert torch.equal(torch.rand(2, generator=ours), torch.rand(2, generator=theirs))  # same draws used


def test_sampling_frequencies_follow_the_probabilities():
    probabilities = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probabilities.log().expand(20_000, 4)
    drawn = sample_next(logits, SamplingOptions(), torch.Generator().manual_seed(0))
    frequencies = torch.bincount(drawn, minlength=4) / drawn.numel()
    # binomial standard error at 20,000 draws is <= 0.0036: five of them
    assert torch.allclose(frequencies, probabilities, atol=0.018)


def test_invalid_sampling_options_are_refused():
    with pytest.raises(ValueError, match="top_p"):
        SamplingOptions(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingOptions(temperature=-1)


def test_stream_can_stop_early_and_reports_windows(model):
    steps = []
    for step in generate_stream(model, torch.zeros(1, 1, dtype=torch.long), 1000, SamplingOptions()):
        steps.append(step)
        if len(steps) == 7:
            break
    assert [s.window.end for s in steps] == list(range(1, 8))
    assert steps[0].logits.shape == (1, 29)


@pytest.mark.parametrize("fp32_stepper", [False, True])
def test_more_latents_than_trained_at_inference(model, fp32_stepper):
    """--latents above the training value: the caches grow to hold the larger windows (they were sized by the
    config and the first refill past it failed), and cached tokens still equal uncached ones."""
    prompt = torch.randint(0, 29, (2, 30), generator=torch.Generator().manual_seed(5))
    options = SamplingOptions(temperature=0)
    stepper = step_model(model, torch.float32, 2) if fp32_stepper else None
    cached = list(generate_stream(model, prompt, 40, options, num_latents=2 * LATENTS, stepper=stepper))
    uncached = list(generate_stream(model, prompt, 40, options, num_latents=2 * LATENTS, use_cache=False))
    assert max(step.window.num_latents for step in cached) == 2 * LATENTS
    for a, b in zip(cached, uncached, strict=True):
        assert torch.equal(a.tokens, b.tokens)
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)
