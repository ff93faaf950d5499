"""`perceiver encode / decode / inspect / tokenizer train` through typer's CliRunner on files made here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pretty_midi
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from perceiver_cli.cli import codec as codec_cli
from perceiver_cli.codecs import MusicCodec, TextCodec
from perceiver_cli.codecs.music import load_midi

TEXT = (
    "It was a bright cold day in April, and the clocks were striking thirteen.\n"
    "Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about.\n"
    "Happy families are all alike; every unhappy family is unhappy in its own way. Café, naïve!\n"
) * 8


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    codec_cli.register(app)
    return app


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def run(app, runner, *args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result) -> None:
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr  # progress may come before it
    assert "Traceback" not in result.output


@pytest.fixture
def midi_file(tmp_path) -> Path:
    pm = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(program=0)
    for i, pitch in enumerate([60, 64, 67, 72]):
        piano.notes.append(pretty_midi.Note(velocity=90, pitch=pitch, start=0.5 * i, end=0.5 * i + 0.4))
    pm.instruments.append(piano)
    path = tmp_path / "arpeggio.mid"
    pm.write(str(path))
    return path


@pytest.fixture
def png_file(tmp_path) -> Path:
    y, x = np.mgrid[0:8, 0:8]
    rgb = np.stack([x * 30, y * 30, (x + y) * 15], axis=-1).astype(np.uint8)
    path = tmp_path / "gradient.png"
    Image.fromarray(rgb, "RGB").save(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, app) -> Path:
    """A tiny tokenizer trained through the CLI itself (also the `tokenizer train` test)."""
    folder = tmp_path_factory.mktemp("tok")
    corpus = folder / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = folder / "tokenizers" / "tiny.model"
    result = CliRunner().invoke(
        app, ["tokenizer", "train", "--input", str(corpus), "--vocab-size", "320", "--out", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["out"] == str(out) and summary["vocab_size"] == 320
    assert out.is_file() and out.with_suffix(".vocab").is_file()
    return out


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "book.txt"
    path.write_text("Call me Ishmael.\nA naïve café, 1234!\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------
# Round trips


def test_music_round_trip(app, runner, midi_file, tmp_path):
    tokens = tmp_path / "tokens.npy"
    result = run(app, runner, "encode", "music", midi_file, "--out", tokens, "--show", "4")
    assert result.exit_code == 0, result.output
    expected = MusicCodec().encode(midi_file)
    assert f"{len(expected):,} music tokens" in result.stdout
    assert "VELOCITY(bin 22) NOTE_ON(60) TIME_SHIFT(400ms) NOTE_OFF(60)" in result.stdout
    saved = np.load(tokens)
    assert saved.dtype == np.int64 and np.array_equal(saved, expected)

    out = tmp_path / "back.mid"
    result = run(app, runner, "decode", "music", tokens, "--out", out)
    assert result.exit_code == 0, result.output
    assert np.array_equal(MusicCodec().encode(out), expected)
    pitches = [n.pitch for n in load_midi(out).instruments[0].notes]
    assert pitches == [60, 64, 67, 72]


def test_image_round_trip(app, runner, png_file, tmp_path):
    tokens = tmp_path / "pixels.npy"
    result = run(app, runner, "encode", "image", png_file, "--image-size", "8", "--out", tokens, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tokens"] == 8 * 8 * 3 and summary["names"][:3] == ["R=0", "G=0", "B=0"]

    out = tmp_path / "back.png"
    result = run(app, runner, "decode", "image", tokens, "--out", out)  # the size is inferred from 192 tokens
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(png_file)))


def test_text_round_trip(app, runner, tokenizer, text_file, tmp_path):
    tokens = tmp_path / "text.npy"
    result = run(app, runner, "encode", "text", text_file, "--tokenizer", tokenizer, "--out", tokens)
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.load(tokens), TextCodec(tokenizer).encode(text_file))
    assert "PIECE(" in result.stdout

    out = tmp_path / "back.txt"
    result = run(app, runner, "decode", "text", tokens, "--tokenizer", tokenizer, "--out", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == text_file.read_bytes()


def test_outputs_are_not_overwritten_without_force(app, runner, midi_file, tmp_path):
    tokens = tmp_path / "tokens.npy"
    tokens.write_bytes(b"keep me")
    result = run(app, runner, "encode", "music", midi_file, "--out", tokens)
    assert_one_line_error(result)
    assert "--force" in result.stderr and tokens.read_bytes() == b"keep me"
    assert run(app, runner, "encode", "music", midi_file, "--out", tokens, "--force").exit_code == 0
    assert np.load(tokens).dtype == np.int64


def test_text_without_a_tokenizer_is_a_clear_error(app, runner, text_file, tmp_path):
    result = run(app, runner, "encode", "text", text_file, "--tokenizer", tmp_path / "missing.model")
    assert_one_line_error(result)
    assert "missing.model" in result.stderr and "tokenizer" in result.stderr


# ----------------------------------------------------------------------------------------------------------
# inspect


def test_inspect_each_modality(app, runner, midi_file, png_file, text_file, tokenizer):
    music = json.loads(run(app, runner, "inspect", midi_file, "--json").stdout)
    assert music["modality"] == "music" and music["notes"] == 4 and music["events"]["NOTE_ON"] == 4

    image = json.loads(run(app, runner, "inspect", png_file, "--json").stdout)
    assert image["modality"] == "image" and image["width"] == 8 and image["tokens"] == 32 * 32 * 3
    assert "resized 8x8 to 32x32" in image["notice"]

    text = json.loads(run(app, runner, "inspect", text_file, "--tokenizer", tokenizer, "--json").stdout)
    assert text["modality"] == "text" and text["bytes"] == len(text_file.read_bytes()) and text["tokens"] > 0

    table = run(app, runner, "inspect", midi_file)
    assert table.exit_code == 0 and "duration seconds" in table.stdout and "NOTE_ON 4" in table.stdout


def test_inspect_with_an_explicit_modality(app, runner, midi_file, tmp_path):
    renamed = tmp_path / "piece.bin"
    renamed.write_bytes(midi_file.read_bytes())
    assert_one_line_error(run(app, runner, "inspect", renamed))  # no extension to go by
    result = run(app, runner, "inspect", renamed, "--modality", "music", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["notes"] == 4


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line, `error: …`, non-zero exit, no traceback


def test_corrupt_midi(app, runner, tmp_path):
    bad = tmp_path / "bad.mid"
    bad.write_bytes(b"MThd\x00\x00\x00\x06\x00\x01\x00")  # a header cut short
    for args in (("encode", "music", bad), ("inspect", bad)):
        result = run(app, runner, *args)
        assert_one_line_error(result)
        assert "bad.mid" in result.stderr


def test_text_file_given_as_image(app, runner, text_file):
    result = run(app, runner, "encode", "image", text_file)
    assert_one_line_error(result)
    assert "not an image" in result.stderr


@pytest.mark.parametrize("modality", ["music", "image", "text"])
def test_empty_missing_and_directory(app, runner, tokenizer, tmp_path, modality):
    empty = tmp_path / "empty.dat"
    empty.write_bytes(b"")
    extra = ["--tokenizer", tokenizer] if modality == "text" else []
    for path, message in ((empty, "empty"), (tmp_path / "nope.dat", "no such file"), (tmp_path, "directory")):
        for args in (("encode", modality, path), ("inspect", path, "--modality", modality)):
            result = run(app, runner, *args, *extra)
            assert_one_line_error(result)
            assert message in result.stderr


def test_bad_token_files(app, runner, tmp_path, midi_file):
    not_npy = tmp_path / "tokens.npy"
    not_npy.write_bytes(b"not numpy at all")
    out = tmp_path / "out.mid"
    assert_one_line_error(run(app, runner, "decode", "music", not_npy, "--out", out))
    floats = tmp_path / "floats.npy"
    np.save(floats, np.ones(4))
    assert_one_line_error(run(app, runner, "decode", "music", floats, "--out", out))
    too_big = tmp_path / "big.npy"
    np.save(too_big, np.array([0, 10_000]))
    result = run(app, runner, "decode", "music", too_big, "--out", out)
    assert_one_line_error(result)
    assert "10000" in result.stderr and not out.exists()


def test_unknown_modality(app, runner, midi_file):
    result = run(app, runner, "encode", "video", midi_file)
    assert_one_line_error(result)
    assert "music, image, text" in result.stderr


def test_tokenizer_train_bad_input(app, runner, tmp_path):
    out = tmp_path / "t.model"
    assert_one_line_error(run(app, runner, "tokenizer", "train", "--input", tmp_path / "none.txt", "--out", out))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    result = run(app, runner, "tokenizer", "train", "--input", binary, "--out", out)
    assert_one_line_error(result)
    assert "UTF-8" in result.stderr
