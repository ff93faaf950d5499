"""Checkpoints: save/load round trip without pickle, bf16 export, and clear errors for bad directories."""

import json

import pytest
import torch

from perceiver_cli import PerceiverAR, PerceiverARConfig
from perceiver_cli.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, save_checkpoint
from perceiver_cli.codecs import MusicCodec


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    codec = MusicCodec()
    model = PerceiverAR(
        PerceiverARConfig(
            vocab_size=codec.vocab_size, max_context=32, num_latents=8, d_model=16, num_heads=2, num_layers=1
        )
    )
    path = save_checkpoint(tmp_path / "ck", model, codec, {"step": 3})
    return path, model


def test_round_trip_rebuilds_model_and_codec(saved):
    path, model = saved
    loaded = load_checkpoint(path)
    assert loaded.codec == MusicCodec() and loaded.meta["training"]["step"] == 3
    tokens = torch.randint(0, 390, (1, 20))
    torch.testing.assert_close(loaded.model(tokens), model.eval()(tokens))
    assert loaded.model.head.weight is loaded.model.embedding.weight  # tying survives the round trip


def test_bf16_copy_is_half_the_size_and_close(saved, tmp_path):
    path, model = saved
    small = save_checkpoint(tmp_path / "small", load_checkpoint(path).model, MusicCodec(), dtype=torch.bfloat16)
    assert (small / "model.safetensors").stat().st_size < 0.6 * (path / "model.safetensors").stat().st_size
    tokens = torch.randint(0, 390, (1, 20))
    torch.testing.assert_close(load_checkpoint(small).model(tokens), model.eval()(tokens), atol=0.05, rtol=0)


def test_replacing_a_checkpoint_is_atomic_and_leaves_no_temporaries(saved):
    path, model = saved
    save_checkpoint(path, model, MusicCodec(), {"step": 4})
    assert load_checkpoint(path).meta["training"]["step"] == 4
    assert [p.name for p in path.parent.iterdir()] == ["ck"]


def test_tampered_weights_fail_the_hash(saved):
    path, _ = saved
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        load_checkpoint(path)


def test_non_finite_weights_are_refused(saved, tmp_path):
    _, model = saved
    with torch.no_grad():
        model.layers[0].mlp.up.weight[0, 0] = float("nan")
    path = save_checkpoint(tmp_path / "nan", model, MusicCodec())  # its hash matches: only the values are wrong
    with pytest.raises(CheckpointError, match=r"non-finite weights .* layers\.0\.mlp\.up\.weight"):
        load_checkpoint(path)


def test_missing_weights_and_unknown_format(saved):
    path, _ = saved
    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(path)
    (path / "config.json").write_text(json.dumps(meta))
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        load_checkpoint(path)


def test_unknown_names_list_what_exists(tmp_path, monkeypatch, saved):
    monkeypatch.setenv("PERCEIVER_CHECKPOINTS", str(saved[0].parent))
    assert resolve_checkpoint("ck") == saved[0]
    with pytest.raises(CheckpointError, match=r"unknown checkpoint 'nope' \(available: .*ck"):
        resolve_checkpoint("nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        resolve_checkpoint(tmp_path / "plain")
