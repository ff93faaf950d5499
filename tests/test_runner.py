"""Tests for perceiver_cli.runner against tiny random checkpoints (see conftest.py)."""

from __future__ import annotations

import json

import numpy as np
import pretty_midi
import pytest
import torch
from PIL import Image

from perceiver_cli import cpu_decode, runner
from perceiver_cli.checkpoint import CheckpointError, save_checkpoint
from perceiver_cli.codecs import CodecError, MusicCodec
from perceiver_cli.codecs.music import duration_seconds
from perceiver_cli.device import cpu_has_fast_bf16
from perceiver_cli.generate import StepLinear
from perceiver_cli.model import PerceiverAR, PerceiverARConfig


@pytest.fixture(scope="module")
def music(music_checkpoint):
    return runner.load(music_checkpoint, "music", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def image(image_checkpoint):
    return runner.load(image_checkpoint, "image", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def text(text_checkpoint):
    return runner.load(text_checkpoint, "text", device="cpu", dtype="fp32")


def _long_midi(path, notes: int = 60):
    pm = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(program=0)
    for i in range(notes):
        piano.notes.append(
            pretty_midi.Note(velocity=40 + i % 80, pitch=48 + i % 30, start=0.1 * i, end=0.1 * i + 0.25)
        )
    pm.instruments.append(piano)
    pm.write(str(path))
    return path


# -- load ----------------------------------------------------------------------------------------------------


def test_load_keeps_fp32_weights_and_reports_compute_dtype(music_checkpoint):
    loaded = runner.load(music_checkpoint, "music", device="cpu", dtype="bf16")
    assert loaded.model.embedding.weight.dtype.is_floating_point
    assert str(loaded.model.embedding.weight.dtype) == "torch.float32"
    assert str(loaded.dtype) == "torch.bfloat16"
    assert loaded.name == "tiny-music" and loaded.modality == "music"


def test_fp32_keeps_fp32_step_weights_and_auto_may_use_bf16(music_checkpoint):
    """--dtype fp32 decodes with fp32 StepLinears (fp32 arithmetic, a faster kernel); auto may round to bf16."""
    exact = runner.load(music_checkpoint, "music", device="cpu", dtype="fp32")
    for batch in (1, 4):
        stepper = exact.stepper(batch)
        linears = [m for m in stepper.modules() if isinstance(m, StepLinear)]
        assert linears and all(m.weight.dtype == torch.float32 for m in linears)
        assert exact.stepper(batch) is stepper  # built once per batch size
    auto = runner.load(music_checkpoint, "music", device="cpu", dtype="auto")
    assert {m.weight.dtype for m in auto.stepper(1).modules() if isinstance(m, StepLinear)} == {torch.bfloat16}


def test_load_refuses_a_checkpoint_of_another_modality(text_checkpoint):
    with pytest.raises(CheckpointError, match=r"tiny-text: is a text checkpoint, not music"):
        runner.load(text_checkpoint, "music")


def test_load_default_and_unknown_names(monkeypatch, tmp_path):
    monkeypatch.setenv("PERCEIVER_CHECKPOINTS", str(tmp_path))
    monkeypatch.setattr(runner, "DEFAULT_CHECKPOINTS", {"music": "no-such-default", "image": "x", "text": "y"})
    with pytest.raises(CheckpointError, match="unknown checkpoint 'no-such-default'"):
        runner.load(None, "music")
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        runner.load(None, "video")


def test_options_are_validated():
    with pytest.raises(ValueError, match="top_p"):
        runner.GenerateOptions(top_p=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        runner.GenerateOptions(batch_size=0)
    with pytest.raises(ValueError, match="seconds"):
        runner.MusicRequest(seconds=0)
    with pytest.raises(ValueError, match="not both"):
        runner.ImageRequest(prompt="x.png", keep_rows=2, keep_fraction=0.5)


# -- music ---------------------------------------------------------------------------------------------------


def test_music_lasts_exactly_the_requested_seconds_for_every_batch_row(music):
    reports = []
    generation = runner.generate_music(
        music, runner.MusicRequest(seconds=3), runner.GenerateOptions(seed=3, batch_size=3), reports.append
    )
    assert len(generation.samples) == 3
    for sample in generation.samples:
        assert sample.music_seconds == pytest.approx(3.0)
        assert duration_seconds(sample.tokens, music.codec) == pytest.approx(3.0)
        assert not set(sample.tokens.tolist()) & music.codec.special_ids  # BOS and EOS banned
        assert abs(sample.midi.get_end_time() - 3.0) <= 1.0
    assert reports[-1].completed == pytest.approx(3.0) and reports[-1].total == pytest.approx(3.0)
    assert reports[-1].unit == "s" and reports[-1].tokens == 3 * max(len(s.tokens) for s in generation.samples)
    assert [r.completed for r in reports] == sorted(r.completed for r in reports)
    assert generation.tokens == sum(len(s.tokens) for s in generation.samples)


def test_music_continues_a_prompt_cut_to_its_first_seconds(music, prompt_midi):
    request = runner.MusicRequest(seconds=2, prompt=prompt_midi, prompt_seconds=1.0, prompt_from="first")
    sample = runner.generate_music(music, request, runner.GenerateOptions(seed=0)).samples[0]
    assert 0.5 < sample.prompt_seconds <= 1.0
    prompt_notes = [n for n in sample.midi.instruments[0].notes if n.start < sample.prompt_seconds - 1e-6]
    assert [n.pitch for n in prompt_notes][:4] == [60, 64, 67, 72]
    assert sample.music_seconds == pytest.approx(2.0)
    assert all(n.start >= -1e-9 for n in sample.continuation.instruments[0].notes)


def test_music_prompt_longer_than_the_context_keeps_its_end(music, tmp_path):
    prompt = _long_midi(tmp_path / "long.mid")
    generation = runner.generate_music(
        music, runner.MusicRequest(seconds=1, prompt=prompt), runner.GenerateOptions(seed=0)
    )
    assert any("sees the last 64" in n for n in generation.notices)
    sample = generation.samples[0]
    assert len(sample.midi.instruments[0].notes) >= 60  # the whole prompt is still in the output
    assert sample.prompt_seconds == pytest.approx(0.1 * 59 + 0.25, abs=0.011)


def test_music_files_with_audio_and_piano_roll(music, prompt_midi, tmp_path):
    out = tmp_path / "song.mid"
    summary = runner.generate_file(
        music, runner.MusicRequest(seconds=2, prompt=prompt_midi), runner.GenerateOptions(seed=1), out
    )
    names = sorted(p.split("/")[-1] for p in summary.files)
    assert names == ["song.continuation.mid", "song.mid", "song.png", "song.wav"]
    assert pretty_midi.PrettyMIDI(str(out)).get_end_time() == pytest.approx(2.05 + 2.0, abs=1.0)
    import soundfile

    info = soundfile.info(str(tmp_path / "song.wav"))
    assert info.duration == pytest.approx(4.05, abs=1.0)
    with Image.open(tmp_path / "song.png") as roll:
        assert roll.format == "PNG"
    assert summary.music_seconds == pytest.approx(2.0)


# -- image ---------------------------------------------------------------------------------------------------


def test_unconditional_image(image):
    sample = runner.generate_image(image, runner.ImageRequest(), runner.GenerateOptions(seed=0)).samples[0]
    assert sample.image.size == (8, 8) and len(sample.tokens) == 192 and sample.kept_rows == 0


@pytest.mark.parametrize(
    ("keep_rows", "keep_fraction", "kept"), [(3, None, 3), (None, 0.5, 4), (None, None, 4), (8, None, 8)]
)
def test_image_completion_keeps_the_prompt_rows_exactly(image, prompt_image, keep_rows, keep_fraction, kept):
    request = runner.ImageRequest(prompt_image, keep_rows, keep_fraction)
    generation = runner.generate_image(image, request, runner.GenerateOptions(seed=0, batch_size=2))
    expected = image.codec.load_rgb(prompt_image)
    assert any("resized 20x12 to 8x8" in n for n in generation.notices)
    for sample in generation.samples:
        pixels = np.asarray(sample.image)
        assert sample.kept_rows == kept
        np.testing.assert_array_equal(pixels[:kept], expected[:kept])
        assert len(sample.tokens) == (8 - kept) * 8 * 3


def test_image_prompt_errors(image, tmp_path, prompt_image):
    with pytest.raises(CodecError, match="keep_rows=9 is outside"):
        runner.generate_image(image, runner.ImageRequest(prompt_image, keep_rows=9), runner.GenerateOptions())
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    with pytest.raises(CodecError, match="not an image file"):
        runner.generate_image(image, runner.ImageRequest(not_image), runner.GenerateOptions())


# -- text ----------------------------------------------------------------------------------------------------


def test_text_streams_exactly_the_continuation(text):
    pieces = []
    generation = runner.generate_text(
        text, runner.TextRequest(tokens=40, prompt="Call me"), runner.GenerateOptions(seed=5), on_text=pieces.append
    )
    sample = generation.samples[0]
    assert len(sample.tokens) == 40 and generation.tokens == 40
    assert "".join(pieces) == sample.continuation
    assert sample.text == "Call me" + sample.continuation
    sample.text.encode("utf-8")  # valid UTF-8 (incomplete byte pieces become U+FFFD)


def test_text_streamer_holds_back_incomplete_byte_pieces(text):
    source = "Café ☃ snow 😀 and 𝄞 music"
    tokens = text.codec.encode(source).tolist()
    assert any(text.codec.sp.is_byte(t) for t in tokens)  # the emoji are not in the tiny vocabulary
    streamer = runner.TextStreamer(text.codec)
    pieces = [streamer.push([t]) for t in tokens] + [streamer.flush()]
    assert "".join(pieces) == source
    assert all("\ufffd" not in p for p in pieces)


def test_text_prompt_longer_than_the_context_keeps_its_end(text, tmp_path):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("Call me Ishmael. " * 30, encoding="utf-8")
    generation = runner.generate_text(
        text, runner.TextRequest(tokens=5, prompt_file=prompt_file), runner.GenerateOptions(seed=0)
    )
    assert any("the model's context is 48" in n for n in generation.notices)
    assert generation.samples[0].text.startswith("Call me Ishmael. " * 30)


# -- seeds, files, batches ------------------------------------------------------------------------------------


def test_same_seed_same_tokens_other_seed_other_tokens(image):
    request = runner.ImageRequest()
    first, again, other = (
        runner.generate_image(image, request, runner.GenerateOptions(seed=s)).samples[0].tokens for s in (7, 7, 8)
    )
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_generate_file_refuses_to_overwrite_without_force(text, tmp_path):
    out = tmp_path / "story.txt"
    out.write_text("precious")
    with pytest.raises(FileExistsError, match=r"story.txt exists \(use --force to overwrite\)"):
        runner.generate_file(text, runner.TextRequest(tokens=3), runner.GenerateOptions(seed=0), out)
    assert out.read_text() == "precious"
    runner.generate_file(text, runner.TextRequest(tokens=3), runner.GenerateOptions(seed=0), out, force=True)
    assert out.read_text() != "precious"


def test_generate_file_checks_the_suffix(music, tmp_path):
    with pytest.raises(ValueError, match="must end in .mid"):
        runner.generate_file(music, runner.MusicRequest(seconds=1), runner.GenerateOptions(), tmp_path / "x.wav")


def test_interrupt_writes_a_partial_output(text, tmp_path):
    def stop_after_ten(progress):
        if progress.tokens == 10:
            raise KeyboardInterrupt

    out = tmp_path / "story.txt"
    with pytest.raises(runner.Interrupted) as caught:
        runner.generate_file(
            text, runner.TextRequest(tokens=50), runner.GenerateOptions(seed=0), out, on_progress=stop_after_ten
        )
    assert caught.value.files == [tmp_path / "story.partial.txt"]
    assert not out.exists() and (tmp_path / "story.partial.txt").is_file()


def _snapshot(folder):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def test_sample_batch_resumes_after_an_interrupt(image, tmp_path):
    out_dir = tmp_path / "samples"
    request, options = runner.ImageRequest(), runner.GenerateOptions(seed=100, batch_size=2)
    seen_batches = []

    def interrupt_second_batch(progress):
        seen_batches.append(progress.samples_done)
        if progress.samples_done == 2 and progress.tokens >= 2 * 20:
            raise KeyboardInterrupt

    with pytest.raises(runner.Interrupted) as caught:
        runner.sample_batch(image, request, options, 4, out_dir, on_progress=interrupt_second_batch)
    assert [p.name for p in caught.value.files] == ["sample_0002.partial.png", "sample_0003.partial.png"]
    records = [json.loads(line) for line in (out_dir / "index.jsonl").read_text().splitlines()]
    assert [r["sample"] for r in records] == [0, 1]
    first = records[0]
    assert first["file"] == "sample_0000.png" and first["files"] == ["sample_0000.png", "sample_0000.x8.png"]
    assert (first["seed"], first["batch_seed"], first["batch_size"], first["batch_position"]) == (100, 100, 2, 0)
    assert records[1]["seed"] == 101 and records[1]["batch_seed"] == 100
    assert first["tokens"] == 192 and first["seconds"] >= 0 and first["settings"]["temperature"] == 1.0
    assert (out_dir / "grid.png").is_file()
    before = {k: v for k, v in _snapshot(out_dir).items() if k.startswith(("sample_0000", "sample_0001"))}

    summary = runner.sample_batch(image, request, runner.GenerateOptions(batch_size=2), 4, out_dir)  # seed reused
    assert summary.skipped == 2 and summary.samples == 2 and summary.seed == 100
    after = _snapshot(out_dir)
    assert {k: after[k] for k in before} == before  # finished samples untouched
    assert not [name for name in after if ".partial." in name]
    assert sorted(json.loads(line)["sample"] for line in (out_dir / "index.jsonl").read_text().splitlines()) == [
        0,
        1,
        2,
        3,
    ]
    with Image.open(out_dir / "grid.png") as grid:
        assert grid.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)
    with Image.open(out_dir / "sample_0003.x8.png") as big:
        assert big.size == (64, 64)

    with pytest.raises(ValueError, match="other settings or seed"):
        runner.sample_batch(image, request, runner.GenerateOptions(seed=5, batch_size=2), 4, out_dir)


def test_batch_sample_is_reproducible_alone_with_batch_size_one(text, tmp_path):
    request = runner.TextRequest(tokens=12, prompt="The quick")
    runner.sample_batch(text, request, runner.GenerateOptions(seed=40), 3, tmp_path / "batch")
    runner.generate_file(text, request, runner.GenerateOptions(seed=42), tmp_path / "alone.txt")
    assert (tmp_path / "batch" / "sample_0002.txt").read_bytes() == (tmp_path / "alone.txt").read_bytes()


def test_sample_batch_refuses_unlisted_existing_files(music, tmp_path):
    out_dir = tmp_path / "music"
    out_dir.mkdir()
    (out_dir / "sample_0000.mid").write_bytes(b"mine")
    request = runner.MusicRequest(seconds=1, audio=False, plot=False)
    with pytest.raises(FileExistsError, match="sample_0000.mid exists"):
        runner.sample_batch(music, request, runner.GenerateOptions(seed=0), 2, out_dir)
    summary = runner.sample_batch(music, request, runner.GenerateOptions(seed=0), 2, out_dir, force=True)
    assert summary.samples == 2 and pretty_midi.PrettyMIDI(str(out_dir / "sample_0000.mid"))


def test_describe_checkpoints(monkeypatch, checkpoints, checkpoint_root):
    monkeypatch.setenv("PERCEIVER_CHECKPOINTS", str(checkpoint_root))
    rows = {row["name"]: row for row in runner.describe_checkpoints()}
    music = rows["tiny-music"]
    assert (music["modality"], music["context"], music["latents"]) == ("music", 64, 16)
    assert music["heldout"] == {"metric": "bits/event", "value": 8.6} and music["parameters"] > 0
    assert rows["tiny-text"]["modality"] == "text" and rows["tiny-image"]["data"] == "random init"


def test_int8_steps_one_sample_on_int8_weights_and_refuses_sizes_it_cannot_take(tmp_path, music_checkpoint):
    if not cpu_decode.available():
        with pytest.raises(ValueError, match="--dtype int8 needs CPU decoding through the C step"):
            runner.load(music_checkpoint, "music", device="cpu", dtype="int8")
        return
    with pytest.raises(ValueError, match="does not take tiny-music's sizes"):  # d_model 16: not blocks of 64
        runner.load(music_checkpoint, "music", device="cpu", dtype="int8")
    torch.manual_seed(0)
    config = PerceiverARConfig(
        vocab_size=390, max_context=64, num_latents=16, d_model=64, num_heads=2, num_layers=1
    )
    path = save_checkpoint(tmp_path / "music-64", PerceiverAR(config).eval(), MusicCodec())
    loaded = runner.load(path, "music", device="cpu", dtype="int8")
    assert loaded.int8 and not loaded.exact and loaded.decode_dtypes["cache_dtype"] == torch.int8
    dtypes = {m.weight.dtype for m in loaded.stepper(1).modules() if isinstance(m, StepLinear)}
    assert dtypes == {torch.int8}
    batch = {
        m.weight.dtype for m in loaded.stepper(cpu_decode.INT8_MAX_ROWS).modules() if isinstance(m, StepLinear)
    }
    assert batch == ({torch.bfloat16} if cpu_has_fast_bf16() else {torch.int8})  # bf16 products are faster there
    options = runner.GenerateOptions(seed=3)
    summary = runner.generate_file(
        loaded, runner.MusicRequest(2.0, audio=False, plot=False), options, tmp_path / "a.mid"
    )
    assert pretty_midi.PrettyMIDI(str(tmp_path / "a.mid")).get_end_time() > 0 and summary.tokens > 0
    with pytest.raises(ValueError, match=r"unknown dtype 'int4' \(choose from auto, fp32, bf16, int8\)"):
        runner.load(path, "music", device="cpu", dtype="int4")
