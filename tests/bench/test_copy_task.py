"""The copy task learns to copy exactly at a small length (the benchmark runs it at 4,096 and beyond)."""

import torch

from perceiver_cli.bench.copy_task import copy_accuracy, copy_batch, run_copy_task


def test_copy_batch_repeats_its_first_half():
    batch = copy_batch(3, 20, 7, torch.Generator().manual_seed(0))
    assert batch.shape == (3, 20) and torch.equal(batch[:, :10], batch[:, 10:])


def test_small_perceiver_learns_to_copy_exactly():
    # seeded and deterministic on CPU: 128 tokens, 32 latents, one layer; perfect copies after ~200 steps
    result = run_copy_task(
        128,
        latents=32,
        d_model=64,
        layers=1,
        heads=4,
        batch=16,
        lr=3e-3,
        max_steps=600,
        eval_every=50,
        log=lambda line: None,
    )
    assert result["final"]["sequence_accuracy"] == 1.0
    assert result["curve"][0]["token_accuracy"] < 0.5  # it had to learn it


def test_default_model_copies_exactly_at_256():
    # the benchmark's own defaults (cross-attention only, one 64-wide head, N = L/2 latents), seeded
    result = run_copy_task(256, max_steps=400, eval_every=25, log=lambda line: None)
    assert result["config"]["num_layers"] == 0 and result["config"]["num_latents"] == 128
    assert result["final"]["sequence_accuracy"] == 1.0 and result["steps"] < 400
    assert result["curve"][0]["token_accuracy"] < 0.5


def test_untrained_model_does_not_copy():
    from perceiver_cli import PerceiverAR, PerceiverARConfig

    torch.manual_seed(0)
    model = PerceiverAR(
        PerceiverARConfig(vocab_size=64, max_context=64, num_latents=16, d_model=32, num_heads=2, num_layers=1)
    )
    assert copy_accuracy(model, 64, 64, sequences=2)["token_accuracy"] < 0.2
