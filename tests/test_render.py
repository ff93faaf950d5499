"""Tests for perceiver_cli.render: the built-in synth, WAV writing, piano rolls, image grids and plots."""

import math

import numpy as np
import pretty_midi
import pytest
import soundfile
from PIL import Image, ImageFont

from perceiver_cli import render

SR = 8000  # low rate keeps the synth tests fast; nothing here depends on the rate


def _midi(with_pedal: bool = True) -> pretty_midi.PrettyMIDI:
    pm = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(program=0)
    for i, (pitch, velocity) in enumerate([(60, 100), (64, 80), (67, 60), (72, 120), (36, 90)]):
        piano.notes.append(pretty_midi.Note(velocity=velocity, pitch=pitch, start=0.25 * i, end=0.25 * i + 0.3))
    piano.notes.append(pretty_midi.Note(velocity=70, pitch=60, start=1.2, end=1.4))  # repeated pitch
    if with_pedal:
        piano.control_changes += [
            pretty_midi.ControlChange(number=64, value=127, time=0.5),
            pretty_midi.ControlChange(number=64, value=0, time=1.6),
        ]
    pm.instruments.append(piano)
    return pm


def _no_temp_files(directory) -> bool:
    return not [p for p in directory.iterdir() if ".tmp" in p.name]


def _png(path) -> Image.Image:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im


# --- audio ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_pedal", [False, True])
def test_builtin_synth_is_finite_normalised_and_about_as_long_as_the_midi(with_pedal):
    pm = _midi(with_pedal)
    audio = render.synthesize(pm, SR, backend="builtin")
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert np.isfinite(audio).all()
    assert abs(len(audio) - pm.get_end_time() * SR) <= 0.5 * SR
    peak = np.abs(audio).max()
    assert 0.5 < peak <= 1.0
    assert peak == pytest.approx(render.PEAK, abs=1e-3)


def test_builtin_synth_sounds_where_the_notes_are_and_pedal_sustains():
    pm = pretty_midi.PrettyMIDI()
    piano = pretty_midi.Instrument(program=0)
    piano.notes.append(pretty_midi.Note(velocity=100, pitch=48, start=0.5, end=0.6))
    piano.notes.append(pretty_midi.Note(velocity=100, pitch=48, start=2.0, end=2.1))  # keeps the file going
    piano.control_changes.append(pretty_midi.ControlChange(number=64, value=127, time=0.0))
    piano.control_changes.append(pretty_midi.ControlChange(number=64, value=0, time=1.5))
    pm.instruments.append(piano)
    audio = render.synthesize(pm, SR, backend="builtin")
    rms = lambda a, b: float(np.sqrt(np.mean(audio[int(a * SR) : int(b * SR)] ** 2)))  # noqa: E731
    assert rms(0.0, 0.49) == 0.0  # silence before the note
    assert rms(1.0, 1.4) > 0.01  # still ringing after note-off because the pedal is down
    assert rms(1.7, 1.9) == 0.0  # damped after pedal-up + release


def test_synthesize_empty_midi_is_silent_not_nan():
    audio = render.synthesize(pretty_midi.PrettyMIDI(), SR, backend="builtin")
    assert audio.dtype == np.float32 and np.isfinite(audio).all() and not audio.any()


def test_synthesize_rejects_unknown_backend_with_the_valid_names():
    with pytest.raises(ValueError, match=r"'nope'.*\['builtin', 'fluidsynth'\]"):
        render.synthesize(_midi(), SR, backend="nope")


def test_synth_backend_reports_builtin_without_fluidsynth(monkeypatch):
    monkeypatch.setattr(render.shutil, "which", lambda name: None)
    assert render.synth_backend() == "builtin"


def test_missing_soundfont_named_in_env_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv(render.SOUNDFONT_ENV, str(tmp_path / "missing.sf2"))
    monkeypatch.setattr(render.shutil, "which", lambda name: "/usr/bin/fluidsynth")
    with pytest.raises(FileNotFoundError, match="missing.sf2"):
        render.synth_backend()


def test_write_wav_round_trips_and_leaves_no_temp_files(tmp_path):
    audio = render.synthesize(_midi(), SR, backend="builtin")
    path = tmp_path / "out.wav"
    render.write_wav(audio, SR, path)
    back, sr = soundfile.read(path, dtype="float32")
    info = soundfile.info(path)
    assert sr == SR and len(back) == len(audio) and info.subtype == "PCM_16"
    assert np.abs(back - audio).max() < 1e-3
    assert _no_temp_files(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~render._umask()  # not mkstemp's private 0600


def test_write_wav_clips_instead_of_wrapping(tmp_path):
    path = tmp_path / "loud.wav"
    render.write_wav(np.array([2.0, -2.0, 0.5], dtype=np.float32), SR, path)
    back, _ = soundfile.read(path)
    assert back[0] > 0.99 and back[1] < -0.99


def test_failed_write_keeps_the_old_file_and_no_temp_files(tmp_path):
    path = tmp_path / "out.wav"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match="out.wav"):
        render.write_wav(np.zeros((2, 2, 2)), SR, path)
    with pytest.raises(RuntimeError):
        with render._atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer crashed")
    assert path.read_bytes() == b"old"
    assert _no_temp_files(tmp_path)


# --- pictures ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pm, prompt_seconds",
    [(_midi(), None), (_midi(), 0.6), (_midi(with_pedal=False), 0.6), (pretty_midi.PrettyMIDI(), None)],
    ids=["pedal", "pedal+prompt", "prompt", "empty"],
)
def test_plot_piano_roll_writes_a_png(tmp_path, pm, prompt_seconds):
    path = tmp_path / "roll.png"
    render.plot_piano_roll(pm, path, title="test", prompt_seconds=prompt_seconds)
    im = _png(path)
    assert im.width > 0 and im.height > 0
    assert _no_temp_files(tmp_path)


def test_upscale_is_nearest_neighbour():
    im = Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8))
    big = np.asarray(render.upscale(im, 3))
    assert big.shape == (6, 6)
    assert (big[:3, :3] == 0).all() and (big[:3, 3:] == 255).all()
    with pytest.raises(ValueError, match="scale=0"):
        render.upscale(im, 0)


@pytest.mark.parametrize("labels", [None, ["a", "b", "c", "d", "e"]])
def test_image_grid_size_is_tiles_times_scale_plus_padding(tmp_path, labels):
    tiles = [Image.new("L", (8, 6), color=40 * i) for i in range(5)]
    path = tmp_path / "grid.png"
    render.image_grid(tiles, path, columns=3, scale=4, padding=2, labels=labels)
    label_h = render._label_height(ImageFont.load_default()) if labels else 0
    rows = math.ceil(5 / 3)
    assert _png(path).size == (3 * 8 * 4 + 4 * 2, rows * (6 * 4 + label_h) + (rows + 1) * 2)
    assert _no_temp_files(tmp_path)


def test_image_grid_default_columns_and_errors(tmp_path):
    tiles = [Image.new("RGB", (2, 2)) for _ in range(4)]
    render.image_grid(tiles, tmp_path / "g.png", scale=1, padding=0)
    assert _png(tmp_path / "g.png").size == (4, 4)  # 2 × 2
    with pytest.raises(ValueError, match="2 labels for 4 images"):
        render.image_grid(tiles, tmp_path / "g.png", labels=["a", "b"])
    with pytest.raises(ValueError, match="at least one image"):
        render.image_grid([], tmp_path / "g.png")


def test_plot_loss_curve_writes_a_png(tmp_path):
    records = [{"step": s, "train_loss": 5.0 / (1 + s / 10)} for s in range(0, 200, 10)]
    records += [{"step": s, "val_loss": 5.5 / (1 + s / 10)} for s in (50, 100, 150)]
    render.plot_loss_curve(records, tmp_path / "loss.png", title="loss")
    render.plot_loss_curve([], tmp_path / "empty.png")
    assert _png(tmp_path / "loss.png").width > 0 and _png(tmp_path / "empty.png").width > 0
    assert _no_temp_files(tmp_path)


def test_plot_xy_writes_a_png_and_checks_lengths(tmp_path):
    series = {"cached": ([1024, 2048, 4096], [0.1, 0.2, 0.4]), "full": ([1024, 2048, 4096], [0.5, 2.0, 8.0])}
    render.plot_xy(series, tmp_path / "xy.png", xlabel="context", ylabel="s/token", logx=True, logy=True)
    assert _png(tmp_path / "xy.png").width > 0
    with pytest.raises(ValueError, match="'bad' has 2 x values and 1 y values"):
        render.plot_xy({"bad": ([1, 2], [1])}, tmp_path / "bad.png", xlabel="x", ylabel="y")
    assert _no_temp_files(tmp_path)
