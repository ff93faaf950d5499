"""The training loop: overfitting, exact resume, bad data directories, and DDP through torchrun."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perceiver_cli.checkpoint import load_checkpoint, save_checkpoint
from perceiver_cli.model import PerceiverAR, PerceiverARConfig
from perceiver_cli.train.config import TrainConfig, load_train_config
from perceiver_cli.train.loop import RunInUseError, learning_rate, run_lock, train

TINY = dict(
    context=64,
    latents=16,
    d_model=32,
    layers=1,
    heads=2,
    batch_size=4,
    warmup=5,
    lr=3e-3,
    eval_every=10,
    eval_batches=2,
    save_every=10,
    log_every=1,
    transpose=0,
    stretch=0.0,
    device="cpu",
    dtype="fp32",
)


def tiny(**overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, **overrides})


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def test_tiny_model_overfits_tiny_data(music_data, tmp_path):
    # The scales repeat every 12 notes with fixed timing and velocity, so after a few dozen steps the model
    # should be far below the 8.6 bits/token (ln 390 = 5.97 nats) of a uniform guess; 1.5 nats is < 1/4 of it.
    result = train(music_data, tmp_path / "run", tiny(steps=150, lr=1e-2, d_model=64))
    assert result.train_loss < 1.5
    assert result.val_loss < 1.5
    checkpoint = load_checkpoint(tmp_path / "run" / "best")
    assert checkpoint.codec.name == "music"
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_validation_sees_the_weights_of_its_step(music_data, tmp_path, dtype):
    """In-training validation (inference: the CPU kernels' packed weights) scores the weights of the step it runs
    at, after fused AdamW steps that change them in place without bumping their version counters."""
    from perceiver_cli.train.loop import WindowSampler, evaluate_batches
    from perceiver_cli.train.prepare import PreparedData

    config = tiny(steps=30, eval_every=10, lr=1e-2, d_model=64, dtype=dtype)
    result = train(music_data, tmp_path / "run", config)
    fresh = PerceiverAR(result.model.config)
    fresh.load_state_dict(result.model.state_dict())
    batches = WindowSampler(PreparedData(music_data), "val", config, augment=False).fixed_batches(
        config.eval_batches, config.batch_size
    )
    dtype_ = torch.float32 if dtype == "fp32" else torch.bfloat16
    expected = evaluate_batches(fresh, batches, torch.device("cpu"), dtype_)
    assert result.val_loss == pytest.approx(expected, rel=1e-4)


def test_resume_equals_uninterrupted_training(music_data, tmp_path):
    straight = tmp_path / "straight"
    train(music_data, straight, tiny(steps=20, prefix_dropout=0.3))

    interrupted = tmp_path / "interrupted"

    def interrupt_at_step_8(record):
        if record["step"] == 8:
            os.kill(os.getpid(), 2)  # a real SIGINT: the loop saves and returns

    first = train(music_data, interrupted, tiny(steps=20, prefix_dropout=0.3), on_progress=interrupt_at_step_8)
    assert first.interrupted and first.step == 8
    second = train(music_data, interrupted, tiny(steps=20, prefix_dropout=0.3), resume=True)
    assert second.step == 20
    a, b = losses(straight), losses(interrupted)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for step in range(1, 21):
        assert a[step] == pytest.approx(b[step], abs=1e-6), step


def test_resume_keeps_the_runs_own_length_unless_asked(music_data, tmp_path):
    run = tmp_path / "run"
    train(music_data, run, tiny(steps=4))
    # a config with another length (the CLI's default when --steps is not given) does not change the run's
    again = train(music_data, run, tiny(steps=2000), resume=True)
    assert again.step == 4
    assert json.loads((run / "last" / "trainer.json").read_text())["config"]["steps"] == 4
    longer = train(music_data, run, tiny(steps=2000), resume=True, resume_steps=6)
    assert longer.step == 6
    assert json.loads((run / "last" / "trainer.json").read_text())["config"]["steps"] == 6


def test_a_second_run_into_the_same_folder_needs_resume(music_data, tmp_path):
    train(music_data, tmp_path / "run", tiny(steps=2))
    with pytest.raises(FileExistsError, match="--resume"):
        train(music_data, tmp_path / "run", tiny(steps=2))


def test_resume_without_a_checkpoint_is_a_clear_error(music_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(music_data, tmp_path / "empty", tiny(steps=2), resume=True)
    assert not (tmp_path / "empty").exists()  # the failed start leaves no directory (nor its lock file) behind


@pytest.mark.skipif(sys.platform == "win32", reason="run directories are locked with fcntl")
def test_a_second_training_into_a_busy_run_directory_is_refused(music_data, tmp_path):
    import fcntl

    run = tmp_path / "run"
    train(music_data, run, tiny(steps=2))
    before = (run / "last" / "trainer.json").read_text()
    # another holder of the run (a stopped run still saving, say): a lock taken through a second open file
    # conflicts with flock even within one process, so no helper process is needed
    with open(run / ".lock", "a+") as other:
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(RunInUseError, match="another training"):
            train(music_data, run, tiny(steps=4), resume=True, resume_steps=4)
        assert (run / "last" / "trainer.json").read_text() == before
    assert train(music_data, run, tiny(steps=4), resume=True, resume_steps=4).step == 4  # the lock went with it
    with run_lock(run):  # and the run released its own lock when it finished
        pass


def test_init_from_a_checkpoint_continues_from_its_weights(music_data, tmp_path):
    """--init-from starts where the source model stopped (its loss, not a fresh model's) with its shape."""
    source = train(music_data, tmp_path / "source", tiny(steps=60, lr=1e-2, d_model=64))
    fresh = train(music_data, tmp_path / "fresh", tiny(steps=1, d_model=64))
    # the command line asks for a different width: the checkpoint's architecture must win
    tuned = train(
        music_data, tmp_path / "tuned", tiny(steps=1, d_model=32, lr=1e-9), init_from=tmp_path / "source/last"
    )
    assert tuned.model.config.d_model == 64
    assert tuned.train_loss < 0.5 * fresh.train_loss
    assert tuned.train_loss == pytest.approx(source.train_loss, rel=0.5)
    meta = load_checkpoint(tmp_path / "tuned" / "last").meta["training"]
    assert meta["init_from"]["step"] == 60 and meta["train_config"]["d_model"] == 64


def test_init_from_a_checkpoint_of_another_codec_is_refused(music_data, tmp_path):
    from perceiver_cli.codecs import ImageCodec

    model = PerceiverAR(
        PerceiverARConfig(
            vocab_size=ImageCodec(4, 4).vocab_size,
            max_context=64,
            num_latents=16,
            d_model=32,
            num_heads=2,
            num_layers=1,
        )
    )
    save_checkpoint(tmp_path / "image", model, ImageCodec(4, 4))
    with pytest.raises(ValueError, match="codec"):
        train(music_data, tmp_path / "run", tiny(steps=1), init_from=tmp_path / "image")


def test_not_a_data_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a prepared data directory"):
        train(tmp_path, tmp_path / "run", tiny(steps=2))


def test_context_larger_than_the_data_is_a_clear_error(music_data, tmp_path):
    with pytest.raises(ValueError, match="fewer than one window"):
        train(music_data, tmp_path / "run", tiny(steps=2, context=1_000_000, latents=16))


def test_learning_rate_warms_up_then_decays_to_the_floor():
    config = tiny(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert learning_rate(0, config) == pytest.approx(0.1)
    assert learning_rate(9, config) == pytest.approx(1.0)
    assert learning_rate(100, config) == pytest.approx(0.1)
    assert learning_rate(55, config) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))


def test_presets_and_unknown_keys(tmp_path):
    assert load_train_config("small").context == 4096
    assert load_train_config("tiny", {"steps": 7}).steps == 7
    with pytest.raises(ValueError, match="unknown config preset"):
        load_train_config("huge")
    bad = tmp_path / "bad.toml"
    bad.write_text("colour = 3\n")
    with pytest.raises(ValueError, match="unknown training config keys: colour"):
        load_train_config(str(bad))


def test_ddp_two_cpu_processes_through_torchrun(music_data, tmp_path):
    """Two gloo ranks train a few steps; their weights stay identical and rank 0's checkpoint loads."""
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        str(worker),
        str(music_data),
        str(tmp_path / "run"),
        str(tmp_path),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    checkpoint = load_checkpoint(tmp_path / "run" / "last")
    assert checkpoint.meta["training"]["world_size"] == 2
    for name, tensor in checkpoint.model.state_dict().items():
        assert torch.equal(tensor, rank0[name]), name
