"""`perceiver bench --generate` and `--train-speed`: what a user waits for, measured end to end.

--generate: wall time of `perceiver generate music --seconds 60` (load, sample, decode, .mid + .wav + piano roll)
and of `perceiver generate image --prompt PHOTO --keep 0.5` with the shipped checkpoints, a few seeds each.
--train-speed: training targets/s (trained latent positions per second) of a preset on prepared data.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _timed(arguments: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "perceiver_cli", *arguments], check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def generate_times(photo: Path, seeds: tuple[int, ...] = (1, 2, 3)) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in seeds:
            out = Path(scratch) / f"music{seed}.mid"
            seconds = _timed(
                ["generate", "music", "--seconds", "60", "--seed", str(seed), "--out", str(out), "--quiet"]
            )
            rows.append({"command": "generate music --seconds 60", "seed": seed, "wall_s": seconds, "target_s": 60})
        for seed in seeds:
            out = Path(scratch) / f"image{seed}.png"
            seconds = _timed(
                [
                    "generate",
                    "image",
                    "--prompt",
                    str(photo),
                    "--keep",
                    "0.5",
                    "--seed",
                    str(seed),
                    "--out",
                    str(out),
                    "--quiet",
                ]
            )
            rows.append(
                {
                    "command": f"generate image --prompt {photo.name} --keep 0.5",
                    "seed": seed,
                    "wall_s": seconds,
                    "target_s": 30,
                }
            )
    return rows


def train_speed(data: Path, preset: str = "small", steps: int = 14, warm_up: int = 4) -> dict:
    from ..train.config import load_train_config
    from ..train.loop import train

    config = load_train_config(
        preset, {"steps": steps, "eval_every": 10_000, "save_every": 10_000, "log_every": 1, "warmup": 1}
    )
    with tempfile.TemporaryDirectory() as scratch:
        result = train(data, Path(scratch) / "run", config)
    # the first steps are slow while the allocator's heap and huge pages fill in (two to three of them at text-v1's
    # shape): drop `warm_up` steps, and take the median step so that one slow moment of a VM moves nothing
    elapsed = [r["elapsed_s"] for r in result.history if "elapsed_s" in r][warm_up:]
    seconds_per_step = float(np.median(np.diff(elapsed)))
    targets_per_step = config.batch_size * config.grad_accum * min(config.latents, config.context)
    return {
        "preset": preset,
        "context": config.context,
        "latents": config.latents,
        "batch_size": config.batch_size,
        "seconds_per_step": seconds_per_step,
        "targets_per_s": targets_per_step / seconds_per_step,
        "input_tokens_per_s": config.batch_size * config.context / seconds_per_step,
        "dtype": config.dtype,
    }
