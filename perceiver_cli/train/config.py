"""The typed training configuration: a dataclass read from TOML presets or files, overridden by CLI flags.

No exec-based configurator: every field is declared here with its type and default, and unknown keys in a
TOML file are an error.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESETS_DIR = Path(__file__).parent / "configs"


@dataclass
class TrainConfig:
    # model (the rest of PerceiverARConfig comes from the data: vocab size from the codec)
    context: int = 1024
    latents: int = 256
    d_model: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    prefix_dropout: float = 0.0
    rotary_fraction: float = 0.5
    tie_embeddings: bool = True
    # optimisation
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    warmup: int = 100
    steps: int = 2000
    # bookkeeping
    eval_every: int = 200
    eval_batches: int = 16
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    # music augmentation (ignored for other modalities): max semitones and relative time stretch
    transpose: int = 3
    stretch: float = 0.05

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_train_config(preset_or_file: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """A preset name (tiny|small|base) or a TOML file, then non-None overrides."""
    values: dict = {}
    if preset_or_file:
        path = Path(preset_or_file)
        if not path.suffix:
            path = PRESETS_DIR / f"{preset_or_file}.toml"
            if not path.is_file():
                names = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.toml")))
                raise ValueError(f"unknown config preset {preset_or_file!r} (presets: {names}; or a .toml file)")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path}: invalid TOML ({error})") from None
    values.update({key: value for key, value in (overrides or {}).items() if value is not None})
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown training config keys: {', '.join(unknown)}")
    return TrainConfig(**values)
