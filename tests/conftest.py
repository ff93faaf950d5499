"""Shared fixtures: tiny randomly initialised checkpoints (music, image, text) saved into temp dirs.

A random model is enough for the runner and CLI tests: they check shapes, files, seeds and errors, not taste.
Each checkpoint is built once per session; tests that write outputs do so in their own tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import pretty_midi
import pytest
import torch

from perceiver_cli.checkpoint import save_checkpoint
from perceiver_cli.codecs import ImageCodec, MusicCodec, TextCodec
from perceiver_cli.codecs.text import train_tokenizer
from perceiver_cli.model import PerceiverAR, PerceiverARConfig

# Tiny models are fastest single-threaded, and the test machine is shared: extra threads only wait on each other.
torch.set_num_threads(1)

TEXT = """\
It was a bright cold day in April, and the clocks were striking thirteen. The hallway smelt of boiled cabbage
and old rag mats. At one end of it a coloured poster, too large for indoor display, had been tacked to the wall.
Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, and
nothing particular to interest me on shore, I thought I would sail about a little and see the watery part of
the world. Happy families are all alike; every unhappy family is unhappy in its own way. Café, naïve, façade:
words with accents, numbers 1234567890, and punctuation!? The quick brown fox jumps over the lazy dog.
"""


def _tiny_model(vocab_size: int, max_context: int, num_latents: int, seed: int) -> PerceiverAR:
    torch.manual_seed(seed)
    config = PerceiverARConfig(
        vocab_size=vocab_size,
        max_context=max_context,
        num_latents=num_latents,
        d_model=16,
        num_heads=2,
        num_layers=1,
        mlp_ratio=2.0,
    )
    return PerceiverAR(config).eval()


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory) -> Path:
    """A folder holding every fixture checkpoint (point PERCEIVER_CHECKPOINTS here to find them by name)."""
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def music_checkpoint(checkpoint_root) -> Path:
    codec = MusicCodec()
    model = _tiny_model(codec.vocab_size, max_context=64, num_latents=16, seed=0)
    training = {"data": "random init (test fixture)", "heldout": {"metric": "bits/event", "value": 8.6}}
    return save_checkpoint(checkpoint_root / "tiny-music", model, codec, training)


@pytest.fixture(scope="session")
def image_checkpoint(checkpoint_root) -> Path:
    codec = ImageCodec(height=8, width=8)  # 8x8x3 = 192 tokens: the whole image fits the context
    model = _tiny_model(codec.vocab_size, max_context=192, num_latents=32, seed=1)
    return save_checkpoint(checkpoint_root / "tiny-image", model, codec, {"data": "random init"})


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    corpus = folder / "corpus.txt"
    corpus.write_text(TEXT * 4, encoding="utf-8")
    return train_tokenizer([corpus], folder / "tiny", vocab_size=400)


@pytest.fixture(scope="session")
def text_checkpoint(checkpoint_root, tokenizer_path) -> Path:
    codec = TextCodec(tokenizer_path)
    model = _tiny_model(codec.vocab_size, max_context=48, num_latents=16, seed=2)
    return save_checkpoint(checkpoint_root / "tiny-text", model, codec)


@pytest.fixture(scope="session")
def checkpoints(music_checkpoint, image_checkpoint, text_checkpoint) -> dict[str, Path]:
    return {"music": music_checkpoint, "image": image_checkpoint, "text": text_checkpoint}


@pytest.fixture
def cli():
    """A typer app with just the generate and checkpoints commands, and a CliRunner to call it."""
    import typer
    from typer.testing import CliRunner

    from perceiver_cli.cli import checkpoints, generate

    app = typer.Typer(pretty_exceptions_enable=False)

    @app.callback()
    def root() -> None:
        """perceiver (test app)"""

    generate.register(app)
    checkpoints.register(app)
    runner = CliRunner()
    return lambda *args, **kwargs: runner.invoke(app, [str(a) for a in args], **kwargs)


@pytest.fixture
def prompt_midi(tmp_path) -> Path:
    """Two seconds of a C major arpeggio."""
    pm = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(program=0)
    for i, pitch in enumerate([60, 64, 67, 72, 67, 64, 60, 55]):
        piano.notes.append(pretty_midi.Note(velocity=80, pitch=pitch, start=0.25 * i, end=0.25 * i + 0.3))
    pm.instruments.append(piano)
    path = tmp_path / "prompt.mid"
    pm.write(str(path))
    return path


@pytest.fixture
def prompt_image(tmp_path) -> Path:
    """A 20x12 gradient (not the model's size or aspect ratio, so it gets centre-cropped and resized)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:12, 0:20]
    rgb = np.stack([x * 12, y * 20, (x + y) * 8], axis=-1).astype(np.uint8)
    path = tmp_path / "prompt.png"
    Image.fromarray(rgb, "RGB").save(path)
    return path
