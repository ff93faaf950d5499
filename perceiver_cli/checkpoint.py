"""The checkpoint layout, and the only module that knows it.

A checkpoint is a directory:
    config.json        format version, model config, codec config, training metadata, sha256 of the weights
    model.safetensors  the weights (no pickle anywhere: safetensors + JSON, as whisper's ModelDimensions idea
                       of "the checkpoint alone rebuilds its model" but without torch.load)
    tokenizer.model    (text) and any other file the codec names in `codec.files()`
    README.md          the model card (shipped checkpoints)
Directories are written to a temporary sibling and renamed into place, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .codecs import Codec, codec_from_config
from .model import PerceiverAR, PerceiverARConfig

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Shipped checkpoints live beside the package in a source checkout / editable install (see README).
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
DEFAULT_CHECKPOINTS = {"music": "music-v1", "image": "image-v1", "text": "text-v1"}


class CheckpointError(Exception):
    """A checkpoint that cannot be found, read or trusted; the message names the path and the problem."""


@dataclass
class Checkpoint:
    model: PerceiverAR
    codec: Codec
    path: Path
    meta: dict = field(default_factory=dict)  # the whole config.json

    @property
    def name(self) -> str:
        return self.path.name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _state_dict_for_saving(model: PerceiverAR, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    state = {}
    for key, tensor in model.state_dict().items():
        if key == "head.weight" and model.config.tie_embeddings:
            continue  # tied to embedding.weight; safetensors refuses shared storage and it would double the size
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[key] = tensor.contiguous()
    return state


def save_checkpoint(
    directory: str | Path,
    model: PerceiverAR,
    codec: Codec,
    training: dict | None = None,
    *,
    dtype: torch.dtype | None = None,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write model + codec (+ training metadata) as a checkpoint directory, atomically replacing any old one."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(_state_dict_for_saving(model, dtype), str(staging / WEIGHTS_FILE))
        for name, source in {**codec.files(), **(extra_files or {})}.items():
            shutil.copyfile(source, staging / name)
        meta = {
            "format_version": FORMAT_VERSION,
            "model": model.config.to_dict(),
            "codec": codec.config,
            "training": training or {},
            "weights_sha256": sha256_file(staging / WEIGHTS_FILE),
            "weights_dtype": str(dtype or model.embedding.weight.dtype).replace("torch.", ""),
            "num_parameters": model.num_parameters(),
        }
        (staging / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, old / directory.name)
            os.replace(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def search_dirs() -> list[Path]:
    """Where checkpoint names are looked up: $PERCEIVER_CHECKPOINTS (os.pathsep-separated), then shipped."""
    extra = [Path(p).expanduser() for p in os.environ.get("PERCEIVER_CHECKPOINTS", "").split(os.pathsep) if p]
    return [*extra, SHIPPED_DIR]


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A path to a checkpoint directory, or a name found in search_dirs()."""
    candidate = Path(name_or_path).expanduser()
    if (candidate / CONFIG_FILE).is_file():
        return candidate
    if candidate.exists():
        raise CheckpointError(f"{candidate}: not a checkpoint directory (no {CONFIG_FILE})")
    for directory in search_dirs():
        if (directory / str(name_or_path) / CONFIG_FILE).is_file():
            return directory / str(name_or_path)
    names = ", ".join(sorted(p.name for p in list_checkpoints())) or "none found"
    raise CheckpointError(f"unknown checkpoint {str(name_or_path)!r} (available: {names})")


def list_checkpoints() -> list[Path]:
    seen, found = set(), []
    for directory in search_dirs():
        if not directory.is_dir():
            continue
        for child in sorted(directory.iterdir()):
            if (child / CONFIG_FILE).is_file() and child.name not in seen:
                seen.add(child.name)
                found.append(child)
    return found


def read_meta(path: str | Path) -> dict:
    path = resolve_checkpoint(path)
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path / CONFIG_FILE}: unreadable ({error})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {meta.get('format_version')!r}, this version reads {FORMAT_VERSION}"
        )
    return meta


def load_checkpoint(
    name_or_path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
) -> Checkpoint:
    """Rebuild model and codec from a checkpoint directory (or name). Weights are loaded without pickle."""
    path = resolve_checkpoint(name_or_path)
    meta = read_meta(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path}: missing {WEIGHTS_FILE}")
    if verify and meta.get("weights_sha256") and sha256_file(weights) != meta["weights_sha256"]:
        raise CheckpointError(f"{weights}: sha256 does not match config.json (corrupt or replaced weights)")
    try:
        config = PerceiverARConfig.from_dict(meta["model"])
        codec = codec_from_config(meta["codec"], base_dir=path)
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path / CONFIG_FILE}: invalid ({error})") from None
    model = PerceiverAR(config)
    try:
        state = load_file(str(weights))
    except Exception as error:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{weights}: unreadable safetensors file ({error})") from None
    state = {key: tensor.to(dtype) if tensor.is_floating_point() else tensor for key, tensor in state.items()}
    # NaN or inf weights give NaN logits, which sampling (an argmax of probabilities over noise) does not refuse
    broken = [key for key, tensor in state.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if broken:
        raise CheckpointError(f"{weights}: non-finite weights (NaN or inf) in {', '.join(broken[:3])}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not (key == "head.weight" and config.tie_embeddings)]
    if missing or unexpected:
        raise CheckpointError(
            f"{weights}: weights do not fit the config (missing {missing}, unexpected {unexpected})"
        )
    model.to(device=device, dtype=dtype).eval()
    return Checkpoint(model=model, codec=codec, path=path, meta=meta)
