"""Baselines on synthetic streams whose answers are known, and the per-modality table on tiny prepared dirs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pretty_midi
import pytest
from PIL import Image

from perceiver_cli.codecs.text import train_tokenizer
from perceiver_cli.train.baselines import (
    baseline_table,
    bigram_bits,
    channel_unigram_bits,
    compressor_bits,
    ngram_bits,
    png_bits,
    uint16_bytes,
    unigram_bits,
    webp_bits,
)
from perceiver_cli.train.prepare import PreparedData, PrepareOptions, assign_split, prepare


def targets(documents) -> int:
    return sum(len(d) - 1 for d in documents)


def test_random_bytes_do_not_compress():
    data = np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    for name, bits in compressor_bits(data).items():
        assert 7.99 < bits / len(data) < 8.2, name


def test_a_constant_stream_compresses_far_below():
    data = b"\x07" * 50_000
    assert set(compressor_bits(data)) == {"gzip-9", "xz-9e", "bzip2-9"}
    for name, bits in compressor_bits(data).items():
        assert bits / len(data) < 0.1, name


def test_uint16_serialisation_is_little_endian():
    assert uint16_bytes([np.array([1, 389]), np.array([258])]) == b"\x01\x00\x85\x01\x02\x01"


def test_unigram_on_uniform_tokens_is_log2_vocab():
    rng = np.random.default_rng(1)
    vocab = 64
    train = rng.integers(0, vocab, 100_000)
    documents = [rng.integers(0, vocab, 1000) for _ in range(10)]
    for bits in (unigram_bits(train, documents, vocab), bigram_bits(train, documents, vocab)):
        assert bits / targets(documents) == pytest.approx(math.log2(vocab), abs=0.05)


def test_unseen_tokens_get_a_probability():
    documents = [np.array([0, 1, 9, 9, 1])]
    for bits in (unigram_bits(np.zeros(100, int), documents, 10), ngram_bits(np.zeros(100, int), documents, 5, 10)):
        assert math.isfinite(bits) and bits > 0


def test_bigram_beats_unigram_on_a_cycle():
    train = np.tile(np.arange(7), 500)
    documents = [np.tile(np.arange(7), 30)]
    unigram = unigram_bits(train, documents, 16) / targets(documents)
    bigram = bigram_bits(train, documents, 16) / targets(documents)
    assert unigram == pytest.approx(math.log2(7), abs=0.05)
    assert bigram < 0.05


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_kneser_ney_probabilities_sum_to_one(order):
    """2^-(bits of prefix+w − bits of prefix) over every w of the vocabulary is a distribution."""
    rng = np.random.default_rng(2)
    vocab = 6
    train = rng.integers(0, vocab, 400)
    train[::3] = 2
    for prefix in ([0], [0, 2, 3], [5, 5, 5, 5, 5, 5], [1, 2, 2, 1, 4, 3]):
        base = ngram_bits(train, [np.array(prefix)], order, vocab)
        mass = sum(2 ** -(ngram_bits(train, [np.array([*prefix, w])], order, vocab) - base) for w in range(vocab))
        assert mass == pytest.approx(1.0, abs=1e-9)


def test_higher_orders_use_longer_contexts():
    # the token after (a, b) depends on a: a bigram cannot see it, a trigram can
    rng = np.random.default_rng(3)
    a = rng.integers(0, 2, 5000)
    b = rng.integers(2, 4, 5000)
    stream = np.stack([a, b, a + 4], axis=1).reshape(-1)
    documents = [stream[:3000]]
    assert ngram_bits(stream, documents, 3, 6) < 0.8 * bigram_bits(stream, documents, 6)


def test_flat_images_are_tiny_files():
    flat = np.full((32, 32, 3), 77, dtype=np.uint8)
    noise = np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    dims = flat.size
    assert webp_bits(flat) / dims < 0.2 and png_bits(flat) / dims < 0.5
    assert webp_bits(noise) / dims > 7.5 and png_bits(noise) / dims > 7.5


def test_channel_unigram():
    rng = np.random.default_rng(5)
    train = np.stack([np.full(1000, 3), rng.integers(0, 256, 1000), rng.integers(0, 2, 1000)], axis=1)
    bits = channel_unigram_bits(train, train[:100]) / 300
    assert bits == pytest.approx((0.0 + 8.0 + 1.0) / 3, abs=0.15)


# ----------------------------------------------------------------------------------------------------------
# The table on tiny prepared directories


def names_in_both_splits(stem: str, suffix: str, count: int, val_fraction: float) -> list[str]:
    """File names whose deterministic split puts some in train and at least one in val."""
    names = [f"{stem}{i}{suffix}" for i in range(count)]
    splits = {assign_split(Path(n), f"in/{n}", val_fraction, {}) for n in names}
    assert splits == {"train", "val"}
    return names


def check_table(table: dict, names: set[str], units: set[str]) -> None:
    assert set(table) == names
    for name, row in table.items():
        assert row["bits"] > 0 and set(row["per_unit"]) == units, name
        assert all(v > 0 and math.isfinite(v) for v in row["per_unit"].values()), name


def test_table_music(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(6)
    for name in names_in_both_splits("piece", ".mid", 6, 0.4):
        pm = pretty_midi.PrettyMIDI()
        piano = pretty_midi.Instrument(program=0)
        for i in range(40):
            start = 0.25 * i
            piano.notes.append(
                pretty_midi.Note(int(rng.integers(40, 110)), int(rng.integers(48, 72)), start, start + 0.2)
            )
        pm.instruments.append(piano)
        pm.write(str(folder / name))
    prepare("music", [folder], tmp_path / "prepared", PrepareOptions(val_fraction=0.4))
    prepared = PreparedData(tmp_path / "prepared")
    table = baseline_table(prepared)
    check_table(table, {"unigram", "bigram", "5-gram", "gzip-9", "xz-9e", "bzip2-9"}, {"event", "second"})
    documents = prepared.documents("val")
    assert table["gzip-9"]["bits"] == compressor_bits(uint16_bytes(documents))["gzip-9"]
    events = sum(int(np.isin(d, list(prepared.codec.special_ids), invert=True).sum()) for d in documents)
    assert table["unigram"]["per_unit"]["event"] == pytest.approx(table["unigram"]["bits"] / events)


def test_table_image(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    y, x = np.mgrid[0:16, 0:16]
    for i, name in enumerate(names_in_both_splits("photo", ".png", 6, 0.4)):
        rgb = np.stack([x * 16, y * 16, np.full_like(x, 40 * i)], axis=-1).astype(np.uint8)
        Image.fromarray(rgb, "RGB").save(folder / name)
    options = PrepareOptions(val_fraction=0.4, image_size=8, crops_per_image=2)
    prepare("image", [folder], tmp_path / "prepared", options)
    table = baseline_table(PreparedData(tmp_path / "prepared"))
    check_table(table, {"png", "webp", "channel_unigram"}, {"dim"})
    assert table["channel_unigram"]["per_unit"]["dim"] < 8.0


def test_table_text(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    sentences = [
        "The quick brown fox jumps over the lazy dog, and the dog sleeps on.",
        "Call me Ishmael. Some years ago, never mind how long precisely, I went to sea.",
        "Happy families are all alike; every unhappy family is unhappy in its own way.",
        "It was a bright cold day in April, and the clocks were striking thirteen.",
    ]
    for i, name in enumerate(names_in_both_splits("book", ".txt", 6, 0.4)):
        text = "\n".join(sentences[(i + j) % 4] for j in range(12))
        (folder / name).write_text(f"Chapter {i}\n{text}\n", encoding="utf-8")
    tokenizer = train_tokenizer(list(folder.iterdir()), tmp_path / "tok", vocab_size=320)
    prepare("text", [folder], tmp_path / "prepared", PrepareOptions(val_fraction=0.4), tokenizer=tokenizer)
    table = baseline_table(PreparedData(tmp_path / "prepared"))
    check_table(table, {"5-gram", "gzip-9", "xz-9e", "bzip2-9"}, {"byte"})
    assert table["5-gram"]["per_unit"]["byte"] < 2.0  # a repeated sentence is very predictable
