"""`perceiver checkpoints` lists what PERCEIVER_CHECKPOINTS (and the shipped folder) hold."""

from __future__ import annotations

import json


def test_table_lists_the_fixture_checkpoints(cli, checkpoints, checkpoint_root, monkeypatch):
    monkeypatch.setenv("PERCEIVER_CHECKPOINTS", str(checkpoint_root))
    monkeypatch.setenv("COLUMNS", "160")
    result = cli("checkpoints")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "modality" in line)
    for column in ("name", "parameters", "context", "latents", "data", "held-out"):
        assert column in header
    music = next(line for line in lines if "tiny-music" in line)
    assert "music" in music and "64" in music and "16" in music and "8.6 bits/event" in music
    assert any("tiny-image" in line and "image" in line and "192" in line for line in lines)
    assert any("tiny-text" in line and "text" in line for line in lines)


def test_json_and_an_unreadable_checkpoint(cli, checkpoints, checkpoint_root, tmp_path, monkeypatch):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    monkeypatch.setenv("PERCEIVER_CHECKPOINTS", f"{checkpoint_root}:{tmp_path}")
    result = cli("checkpoints", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["tiny-music"]["heldout"] == {"metric": "bits/event", "value": 8.6}
    assert rows["tiny-image"]["context"] == 192 and rows["tiny-text"]["modality"] == "text"
    assert rows["tiny-music"]["parameters"] > 0 and rows["tiny-music"]["data"] == "random init (test fixture)"
    assert "unreadable" in rows["broken"]["error"]
    table = cli("checkpoints")
    assert table.exit_code == 0 and "broken" in table.stdout


def test_a_training_run_checkpoint_lists_its_data_folders(cli, tmp_path, monkeypatch):
    """A checkpoint straight from `perceiver train` records its data as a list of folders, not a description."""
    from perceiver_cli.checkpoint import save_checkpoint
    from perceiver_cli.codecs import MusicCodec
    from perceiver_cli.model import PerceiverAR, PerceiverARConfig

    codec = MusicCodec()
    model = PerceiverAR(PerceiverARConfig(codec.vocab_size, max_context=32, num_latents=8, d_model=16, num_heads=2))
    save_checkpoint(tmp_path / "from-a-run", model, codec, {"data": ["data/mine", "data/more"]})
    monkeypatch.setenv("PERCEIVER_CHECKPOINTS", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "200")
    result = cli("checkpoints")
    assert result.exit_code == 0, result.output
    assert any("from-a-run" in line and "data/mine, data/more" in line for line in result.stdout.splitlines())
