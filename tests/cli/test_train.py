"""prepare → train → eval → report → export through the CLI (typer's CliRunner), on MIDI the test writes."""

import json

import pretty_midi
import pytest
import typer
from typer.testing import CliRunner

from perceiver_cli.checkpoint import load_checkpoint
from perceiver_cli.cli import train as train_cli

runner = CliRunner()


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    application = typer.Typer()
    train_cli.register(application)
    return application


@pytest.fixture(scope="module")
def midi_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("midi")
    for i in range(8):
        pm = pretty_midi.PrettyMIDI()
        piano = pretty_midi.Instrument(program=0)
        for j in range(80):
            piano.notes.append(
                pretty_midi.Note(velocity=70 + i, pitch=50 + (j * (i + 1)) % 24, start=j * 0.12, end=j * 0.12 + 0.1)
            )
        pm.instruments.append(piano)
        pm.write(str(root / f"p{i}.mid"))
    return root


def test_prepare_train_eval_report_export(app, midi_dir, tmp_path):
    data = tmp_path / "data"
    result = runner.invoke(
        app,
        [
            "prepare",
            "music",
            "--input",
            str(midi_dir),
            "--out",
            str(data),
            "--val-fraction",
            "0.3",
            "--quiet",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    val_files = json.loads(result.output)["files"]["val"]
    assert val_files >= 1

    run = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(run),
            "--config",
            "tiny",
            "--context",
            "64",
            "--latents",
            "16",
            "--steps",
            "12",
            "--eval-every",
            "6",
            "--save-every",
            "6",
            "--device",
            "cpu",
            "--dtype",
            "fp32",
            "--quiet",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["step"] == 12 and summary["val_loss"] is not None

    result = runner.invoke(
        app, ["eval", "--checkpoint", str(run / "best"), "--data", str(data), "--quiet", "--json"]
    )
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert 0 < scores["bits_per_event"] < 20 and scores["bits_per_second"] > 0

    report_dir = tmp_path / "report"
    result = runner.invoke(
        app,
        [
            "report",
            "--checkpoint",
            str(run / "best"),
            "--eval",
            f"val={data}",
            "--train-data",
            str(data),
            "--out",
            str(report_dir),
            "--latents",
            "4",
            "--latents",
            "16",
            "--max-documents",
            "2",
            "--context",
            "16",
            "--context",
            "32",
            "--bf16",  # forced: by default only CPUs with fast bf16 pay for it
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((report_dir / "report.json").read_text())
    assert "bf16" in report["sets"]["val"]
    assert {"gzip-9", "bigram", "5-gram"} <= set(report["sets"]["val"]["baselines"])
    assert [row["latents"] for row in report["latents"]] == [4, 16]
    assert (report_dir / "latents_bits.png").stat().st_size > 0
    assert [row["context"] for row in report["contexts"]] == [16, 32]
    # a second report into the same folder is refused (one line, exit code 6) unless --force
    again = ["report", "-c", str(run / "best"), "--eval", f"val={data}", "--train-data", str(data)]
    again += ["--out", str(report_dir), "--latents", "4", "--max-documents", "1", "--quiet"]
    result = runner.invoke(app, again)
    assert result.exit_code == 6 and "use --force" in result.output
    assert json.loads((report_dir / "report.json").read_text()) == report
    result = runner.invoke(app, [*again[:-3], "--max-documents", "0", "--quiet", "--force"])  # 0 = all
    assert result.exit_code == 0, result.output
    forced = json.loads((report_dir / "report.json").read_text())
    assert [row["latents"] for row in forced["latents"]] == [4]
    assert forced["sets"]["val"]["documents"] == val_files
    # decode speeds on both paths: the exact one and `perceiver generate`'s (stepper, bf16 caches)
    assert all(
        row["decode_tokens_per_s"] > 0 and row["decode_tokens_per_s_generate"] > 0 for row in forced["latents"]
    )
    assert "perceiver generate" in (report_dir / "report.md").read_text()
    # --refresh-decode measures only the speeds again, keeping the bits; it needs an existing report
    for row in forced["latents"]:
        del row["decode_tokens_per_s_generate"]  # as a report from before the generate column
    (report_dir / "report.json").write_text(json.dumps(forced))
    result = runner.invoke(app, ["report", "-c", str(run / "best"), "--out", str(report_dir), "--refresh-decode"])
    assert result.exit_code == 0, result.output
    refreshed = json.loads((report_dir / "report.json").read_text())
    assert refreshed["latents"][0]["decode_tokens_per_s_generate"] > 0
    assert refreshed["latents"][0]["bits_per_event"] == forced["latents"][0]["bits_per_event"]
    missing = runner.invoke(
        app, ["report", "-c", str(run / "best"), "--out", str(tmp_path / "none"), "--refresh-decode"]
    )
    assert missing.exit_code != 0 and "no report to refresh" in missing.output
    usage = runner.invoke(app, ["report", "-c", str(run / "best"), "--out", str(tmp_path / "none")])
    assert usage.exit_code != 0 and "--train-data" in usage.output

    shipped = tmp_path / "shipped" / "mine-v1"
    result = runner.invoke(
        app,
        [
            "export",
            "--checkpoint",
            str(run / "best"),
            "--out",
            str(shipped),
            "--report",
            str(report_dir / "report.json"),
            "--data",
            "test scales",
        ],
    )
    assert result.exit_code == 0, result.output
    checkpoint = load_checkpoint(shipped)
    assert checkpoint.meta["weights_dtype"] == "bfloat16"
    assert checkpoint.meta["training"]["heldout"]["metric"] == "bits/event"
    result = runner.invoke(app, ["export", "--checkpoint", str(run / "best"), "--out", str(shipped)])
    assert result.exit_code != 0 and "--force" in result.output

    # fine-tuning the exported (bf16) checkpoint: weights and shape from it, the run's own steps
    tuned = tmp_path / "tuned"
    result = runner.invoke(
        app,
        ["train", "--data", str(data), "--out", str(tuned), "--init-from", str(shipped), "--steps", "2"]
        + ["--d-model", "8", "--quiet", "--json"],
    )
    assert result.exit_code == 0, result.output
    meta = load_checkpoint(tuned / "last").meta
    assert meta["model"]["d_model"] == checkpoint.model.config.d_model and meta["training"]["init_from"]["step"] > 0


def test_bad_data_directory_is_one_line(app, tmp_path):
    result = runner.invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--quiet"])
    assert result.exit_code != 0
    assert "not a prepared data directory" in result.output and "Traceback" not in result.output


def test_unknown_preset_is_one_line(app, tmp_path):
    result = runner.invoke(
        app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--config", "huge"]
    )
    assert result.exit_code == 2 and "unknown config preset" in result.output


def test_run_stopped_before_its_first_validation_names_only_last(app, midi_dir, tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    prepare = ["prepare", "music", "--input", str(midi_dir), "--out", str(data), "--val-fraction", "0.3", "--quiet"]
    assert runner.invoke(app, prepare).exit_code == 0
    tiny = ["--config", "tiny", "--context", "64", "--latents", "16", "--device", "cpu", "--dtype", "fp32"]
    train = ["train", "--data", str(data), "--out", str(run), *tiny, "--steps", "50", "--eval-every", "40"]
    result = runner.invoke(app, [*train, "--max-minutes", "0", "--quiet"])  # stops after its first step
    assert result.exit_code == 0, result.output
    assert "done at step 1" in result.output and f"checkpoints in {run}/last (resume" in result.output
    assert (run / "last").is_dir() and not (run / "best").exists()
