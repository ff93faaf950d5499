"""perceiver eval: every token scored once with sliding windows; a uniform model gives log2(V) bits/token."""

import math

import numpy as np
import pytest
import torch

from perceiver_cli import PerceiverAR, PerceiverARConfig, cpu_linear
from perceiver_cli.codecs import MusicCodec
from perceiver_cli.train.evaluate import evaluate_documents, score_document


def uniform_model(vocab: int, context: int = 32, latents: int = 8) -> PerceiverAR:
    model = PerceiverAR(
        PerceiverARConfig(
            vocab_size=vocab, max_context=context, num_latents=latents, d_model=16, num_heads=2, num_layers=1
        )
    )
    with torch.no_grad():
        model.head.weight.zero_()  # tied: zero embeddings and zero logits, so every token has p = 1/V
    return model.eval()


def test_uniform_model_gives_log2_vocab_bits_per_token():
    codec = MusicCodec()
    model = uniform_model(codec.vocab_size)
    rng = np.random.default_rng(0)
    documents = [np.concatenate([[codec.bos_id], rng.integers(0, 388, size=n)]) for n in (5, 77, 150)]
    result = evaluate_documents(model, codec, documents)
    assert result.tokens == 5 + 77 + 150
    assert result.bits_per_token == pytest.approx(math.log2(codec.vocab_size), rel=1e-5)
    assert result.summary()["bits_per_event"] == pytest.approx(result.bits / result.units["event"])


def test_sliding_windows_score_each_token_once_with_the_full_context():
    torch.manual_seed(0)
    model = PerceiverAR(
        PerceiverARConfig(vocab_size=11, max_context=24, num_latents=6, d_model=16, num_heads=2, num_layers=1)
    ).eval()
    document = np.random.default_rng(1).integers(0, 11, size=70)
    bits = score_document(model, document)
    assert bits.shape == (69,)
    # target t (predicted from position t-1) must equal a direct forward over its own context window
    tokens = torch.as_tensor(document)[None]
    for target in (1, 6, 7, 23, 24, 40, 69):
        stride_end = min(((target - 1) // 6 + 1) * 6, 69)
        start = max(0, stride_end - 24)
        logits = model(
            tokens[:, start:stride_end], num_latents=stride_end - ((target - 1) // 6) * 6, position_offset=start
        )
        position = (target - 1) - (stride_end - logits.shape[1])
        expected = -torch.log_softmax(logits[0, position], -1)[document[target]].item() / math.log(2)
        assert bits[target - 1] == pytest.approx(expected, abs=1e-4), target


def test_bf16_evaluation_casts_the_weights_once_and_scores_as_window_by_window(monkeypatch):
    packed = []  # on CPUs with AMX each weight is packed for cpu_linear's kernel instead of cast (once as well)
    pack = cpu_linear.pack
    monkeypatch.setattr(cpu_linear, "pack", lambda weight: packed.append(tuple(weight.shape)) or pack(weight))
    torch.manual_seed(0)
    codec = MusicCodec()
    model = PerceiverAR(
        PerceiverARConfig(
            vocab_size=codec.vocab_size, max_context=24, num_latents=6, d_model=32, num_heads=2, num_layers=1
        )
    ).eval()
    rng = np.random.default_rng(1)
    documents = [np.concatenate([[codec.bos_id], rng.integers(0, 388, size=n)]) for n in (40, 61)]  # 17 windows
    with torch.profiler.profile(record_shapes=True) as profile:
        together = evaluate_documents(model, codec, documents, dtype=torch.bfloat16)
    window_by_window = sum(score_document(model, d, dtype=torch.bfloat16).sum() for d in documents)
    assert together.bits == pytest.approx(window_by_window, rel=1e-9)  # the same bf16 weights either way
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights = sorted(tuple(m.weight.shape) for m in linears)
    casts = [tuple(e.input_shapes[0]) for e in profile.events() if e.name == "aten::_to_copy" and e.input_shapes]
    converted = sorted([shape for shape in casts if shape in weights] + packed)
    assert converted == weights  # each cast (or packed) once for all 17 windows
