"""`perceiver generate music|image|text` through typer's CliRunner against tiny checkpoints (conftest.py)."""

from __future__ import annotations

import json

import numpy as np
import pretty_midi
import pytest
import soundfile
from PIL import Image

from perceiver_cli.codecs import ImageCodec


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _one_line_error(result, code: int, match: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr
    assert "Traceback" not in result.output


# -- music ---------------------------------------------------------------------------------------------------


def test_music_writes_a_midi_of_the_requested_length(cli, checkpoints, tmp_path):
    out = tmp_path / "song.mid"
    result = _ok(
        cli(
            "generate",
            "music",
            "-c",
            checkpoints["music"],
            "--seconds",
            3,
            "--no-audio",
            "--no-plot",
            "--out",
            out,
            "--seed",
            1,
        )
    )
    assert str(out) in result.stdout
    assert abs(pretty_midi.PrettyMIDI(str(out)).get_end_time() - 3.0) <= 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["song.mid"]


def test_music_with_prompt_audio_and_plot(cli, checkpoints, prompt_midi, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default output names land in the current directory
    args = ["generate", "music", "-c", checkpoints["music"], "--seconds", 2, "--prompt", prompt_midi]
    result = _ok(cli(*args, "--prompt-seconds", 1, "--prompt-from", "last", "--json", "--seed", 2))
    summary = json.loads(result.stdout)
    assert summary["files"] == ["music.mid", "music.continuation.mid", "music.wav", "music.png"]
    assert summary["music_seconds"] == pytest.approx(2.0) and summary["seed"] == 2
    assert (
        summary["settings"]["prompt_seconds"] == 1.0 and summary["tokens"] > 0 and summary["tokens_per_second"] > 0
    )
    assert abs(pretty_midi.PrettyMIDI("music.mid").get_end_time() - 3.0) <= 1.0
    assert abs(soundfile.info("music.wav").duration - 3.0) <= 1.0
    with Image.open("music.png") as roll:
        assert roll.format == "PNG"


def test_music_same_seed_same_bytes(cli, checkpoints, tmp_path):
    for name in ("a.mid", "b.mid", "c.mid"):
        seed = 9 if name != "c.mid" else 10
        _ok(
            cli(
                "generate",
                "music",
                "-c",
                checkpoints["music"],
                "-s",
                3,
                "--no-audio",
                "--no-plot",
                "-o",
                tmp_path / name,
                "--seed",
                seed,
                "-q",
            )
        )
    assert (tmp_path / "a.mid").read_bytes() == (tmp_path / "b.mid").read_bytes()
    assert (tmp_path / "a.mid").read_bytes() != (tmp_path / "c.mid").read_bytes()


# -- image ---------------------------------------------------------------------------------------------------


def test_image_unconditional_and_upscaled(cli, checkpoints, tmp_path):
    out = tmp_path / "face.png"
    _ok(cli("generate", "image", "-c", checkpoints["image"], "--out", out, "--seed", 3, "--quiet"))
    with Image.open(out) as small, Image.open(tmp_path / "face.x8.png") as big:
        assert small.size == (8, 8) and big.size == (64, 64)
        assert big.resize((8, 8), Image.Resampling.NEAREST).tobytes() == small.convert("RGB").tobytes()


def test_image_completion_keeps_rows_byte_identical(cli, checkpoints, prompt_image, tmp_path):
    out = tmp_path / "done.png"
    result = _ok(
        cli(
            "generate",
            "image",
            "-c",
            checkpoints["image"],
            "--prompt",
            prompt_image,
            "--keep-rows",
            3,
            "-o",
            out,
            "--seed",
            0,
        )
    )
    assert "resized 20x12 to 8x8" in result.stderr  # the notice
    expected = ImageCodec(8, 8).load_rgb(prompt_image)
    with Image.open(out) as done:
        np.testing.assert_array_equal(np.asarray(done.convert("RGB"))[:3], expected[:3])


def test_image_same_seed_same_bytes(cli, checkpoints, tmp_path):
    for name in ("a.png", "b.png"):
        _ok(
            cli(
                "generate",
                "image",
                "-c",
                checkpoints["image"],
                "-o",
                tmp_path / name,
                "--seed",
                4,
                "--top-k",
                20,
                "-q",
            )
        )
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


# -- text ----------------------------------------------------------------------------------------------------


def test_text_streams_to_stdout_and_writes_prompt_plus_continuation(cli, checkpoints, tmp_path):
    out = tmp_path / "story.txt"
    result = _ok(
        cli(
            "generate",
            "text",
            "-c",
            checkpoints["text"],
            "--prompt",
            "Call me",
            "--tokens",
            20,
            "-o",
            out,
            "--seed",
            1,
        )
    )
    written = out.read_bytes().decode("utf-8")  # valid UTF-8
    assert written.startswith("Call me") and len(written) > len("Call me")
    assert written[len("Call me") :] in result.stdout  # the continuation was streamed
    assert f"wrote {out}" in result.stderr


def test_text_from_a_prompt_file_with_json(cli, checkpoints, tmp_path):
    prompt = tmp_path / "start.txt"
    prompt.write_text("Happy families are all alike", encoding="utf-8")
    out = tmp_path / "more.txt"
    result = _ok(
        cli(
            "generate",
            "text",
            "-c",
            checkpoints["text"],
            "--prompt-file",
            prompt,
            "--tokens",
            10,
            "-o",
            out,
            "--json",
            "--seed",
            2,
        )
    )
    summary = json.loads(result.stdout)  # no streamed text mixed into the JSON
    assert summary["tokens"] == 10 and summary["files"] == [str(out)]
    assert out.read_text(encoding="utf-8").startswith("Happy families are all alike")


# -- batches ---------------------------------------------------------------------------------------------------


def test_num_samples_then_more_continues_the_folder(cli, checkpoints, tmp_path):
    out_dir = tmp_path / "samples"
    args = [
        "generate",
        "music",
        "-c",
        checkpoints["music"],
        "-s",
        2,
        "--no-audio",
        "--no-plot",
        "--out-dir",
        out_dir,
        "--seed",
        50,
        "-q",
    ]
    _ok(cli(*args, "--num-samples", 2))
    assert sorted(p.name for p in out_dir.iterdir()) == ["index.jsonl", "sample_0000.mid", "sample_0001.mid"]
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out_dir.glob("sample_*")}
    result = _ok(cli(*args, "--num-samples", 4, "--batch-size", 2, "--json"))
    summary = json.loads(result.stdout)
    assert summary["skipped"] == 2 and summary["samples"] == 2
    for name, (mtime, data) in before.items():
        assert (out_dir / name).stat().st_mtime_ns == mtime and (out_dir / name).read_bytes() == data
    records = [json.loads(line) for line in (out_dir / "index.jsonl").read_text().splitlines()]
    assert [r["sample"] for r in records] == [0, 1, 2, 3]
    assert [r["seed"] for r in records] == [50, 51, 52, 53] and [r["batch_seed"] for r in records] == [
        50,
        51,
        52,
        52,
    ]
    for record in records:
        assert {"file", "seed", "settings", "tokens", "seconds", "music_seconds"} <= set(record)
        assert abs(pretty_midi.PrettyMIDI(str(out_dir / record["file"])).get_end_time() - 2.0) <= 1.0


def test_image_batch_has_a_grid(cli, checkpoints, tmp_path):
    out_dir = tmp_path / "images"
    _ok(
        cli("generate", "image", "-c", checkpoints["image"], "-n", 3, "--batch-size", 3, "--out-dir", out_dir, "-q")
    )
    assert (out_dir / "grid.png").is_file()
    assert sorted(p.name for p in out_dir.glob("sample_*.png")) == [
        "sample_0000.png", "sample_0000.x8.png", "sample_0001.png", "sample_0001.x8.png", "sample_0002.png", "sample_0002.x8.png",
    ]  # fmt: skip


# -- errors ----------------------------------------------------------------------------------------------------


def test_refuses_to_overwrite_without_force(cli, checkpoints, tmp_path):
    out = tmp_path / "x.png"
    out.write_bytes(b"keep me")
    result = cli("generate", "image", "-c", checkpoints["image"], "-o", out)
    _one_line_error(result, 6, f"{out} exists (use --force to overwrite)")
    assert out.read_bytes() == b"keep me"
    _ok(cli("generate", "image", "-c", checkpoints["image"], "-o", out, "--force", "-q"))
    assert out.read_bytes() != b"keep me"


def test_bad_prompts(cli, checkpoints, tmp_path):
    corrupt = tmp_path / "bad.mid"
    corrupt.write_bytes(b"RIFF not a midi file")
    result = cli("generate", "music", "-c", checkpoints["music"], "--prompt", corrupt, "-o", tmp_path / "o.mid")
    _one_line_error(result, 3, "bad.mid: not a MIDI file")
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    result = cli("generate", "image", "-c", checkpoints["image"], "--prompt", not_image, "-o", tmp_path / "o.png")
    _one_line_error(result, 3, "notes.txt: not an image file")
    result = cli(
        "generate",
        "music",
        "-c",
        checkpoints["music"],
        "--prompt",
        tmp_path / "missing.mid",
        "-o",
        tmp_path / "o.mid",
    )
    _one_line_error(result, 3, "missing.mid: no such file")
    assert not (tmp_path / "o.mid").exists() and not (tmp_path / "o.png").exists()


def test_checkpoint_errors(cli, checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("PERCEIVER_CHECKPOINTS", str(tmp_path))
    result = cli("generate", "music", "-c", checkpoints["text"], "-o", tmp_path / "o.mid")
    _one_line_error(result, 4, "is a text checkpoint, not music")
    result = cli("generate", "text", "-c", "no-such-model", "-o", tmp_path / "o.txt")
    _one_line_error(result, 4, "unknown checkpoint 'no-such-model'")


def test_usage_errors(cli, checkpoints, prompt_image, tmp_path):
    image = ["generate", "image", "-c", checkpoints["image"]]
    _one_line_error(cli(*image, "--prompt", prompt_image, "--keep-rows", 2, "--keep", 0.5), 2, "not both")
    _one_line_error(cli(*image, "--num-samples", 2), 2, "needs --out-dir")
    _one_line_error(cli(*image, "--out-dir", tmp_path, "-o", tmp_path / "x.png"), 2, "use --out-dir")
    _one_line_error(cli(*image, "-o", tmp_path / "x.png", "--latents", 0), 2, "num_latents=0")
    _one_line_error(
        cli("generate", "music", "-c", checkpoints["music"], "--prompt-seconds", 3), 2, "needs --prompt"
    )
    music = ["generate", "music", "-c", checkpoints["music"], "-o", tmp_path / "m.mid"]
    _one_line_error(cli(*music, "--dtype", "int4"), 2, "unknown dtype 'int4' (choose from auto, fp32, bf16, int8)")
    # int8 takes d_model and MLP widths in blocks of 64 (and the C step); the tiny checkpoints are 16 wide
    _one_line_error(cli(*music, "--dtype", "int8"), 2, "--dtype int8")


def test_ctrl_c_keeps_finished_samples_and_writes_the_current_one_as_partial(
    cli, checkpoints, tmp_path, monkeypatch
):
    from perceiver_cli import runner

    real_stream, calls = runner.generate_stream, []

    def interrupted_second_call(*args, **kwargs):
        calls.append(1)
        for index, step in enumerate(real_stream(*args, **kwargs)):
            if len(calls) == 2 and index == 5:
                raise KeyboardInterrupt
            yield step

    monkeypatch.setattr(runner, "generate_stream", interrupted_second_call)
    out_dir = tmp_path / "texts"
    result = cli("generate", "text", "-c", checkpoints["text"], "--tokens", 8, "-n", 3, "--out-dir", out_dir)
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert "kept partial output" in result.stderr and "sample_0001.partial.txt" in result.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "index.jsonl",
        "sample_0000.txt",
        "sample_0001.partial.txt",
    ]
