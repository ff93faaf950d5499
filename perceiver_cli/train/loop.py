"""`perceiver train`: the training loop, single process or DistributedDataParallel under torchrun.

Windows of `context` tokens are drawn at random from the prepared training stream (short equal-length
documents such as images are drawn as prefixes starting at their BOS, so the model always knows where in
the image it is); the loss covers the latent positions only, as in Perceiver AR. AdamW with linear warmup then
cosine decay, gradient clipping and accumulation, autocast in bf16 where it is fast (see device.py).

Reproducibility and resume: the data sampler and torch's RNG (prefix dropout, dropout) are re-seeded every
step from (seed, rank, step), so a resumed run draws exactly the batches an uninterrupted run would have;
the optimiser state is saved as safetensors and the rest as JSON, never pickle.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..checkpoint import CONFIG_FILE, load_checkpoint, save_checkpoint
from ..codecs import Codec
from ..codecs.music import stretch_tokens, transpose_tokens
from ..device import adamw, autocast, resolve_device, resolve_dtype
from ..model import PerceiverAR, PerceiverARConfig, latent_loss
from .config import TrainConfig
from .prepare import PreparedData

OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_FILE = "trainer.json"


# ----------------------------------------------------------------------------------------------------------
# Batches


def _music_augment(window: np.ndarray, rng: np.random.Generator, config: TrainConfig, codec: Codec) -> np.ndarray:
    if config.transpose:
        window = transpose_tokens(window, int(rng.integers(-config.transpose, config.transpose + 1)), codec)
    if config.stretch:
        window = stretch_tokens(window, float(rng.uniform(1 - config.stretch, 1 + config.stretch)), codec)
    return window


# on-the-fly augmentation per codec (Music Transformer: pitch transposition and time stretch)
AUGMENTERS: dict[str, Callable[[np.ndarray, np.random.Generator, TrainConfig, Codec], np.ndarray]] = {
    "music": _music_augment
}


class WindowSampler:
    """Draws (inputs, targets) batches of shape (B, T) from one split of a prepared data directory."""

    def __init__(self, data: PreparedData, split: str, config: TrainConfig, augment: bool):
        self.stream = data.tokens(split)
        self.offsets = data.offsets(split)
        self.codec = data.codec
        self.config = config
        if len(self.stream) < 2:
            raise ValueError(f"{data.directory}: the {split} split is empty ({len(self.stream)} tokens)")
        lengths = np.diff(self.offsets)
        # equal-length documents that fit the context (images): draw prefixes of whole documents
        self.documents = bool(data.manifest.get("document_windows")) and len(lengths) > 0
        self.window = int(lengths.max()) if self.documents else config.context + 1
        if not self.documents and len(self.stream) < self.window:
            raise ValueError(
                f"{data.directory}: the {split} split has {len(self.stream)} tokens, fewer than one window "
                f"of {self.window} (lower --context)"
            )
        self.augment = AUGMENTERS.get(self.codec.name) if augment else None

    def _raw(self, rng: np.random.Generator, length: int) -> np.ndarray:
        start = int(rng.integers(0, len(self.stream) - length + 1))
        return np.asarray(self.stream[start : start + length], dtype=np.int64)

    def _one(self, rng: np.random.Generator) -> np.ndarray:
        if self.augment is None:
            return self._raw(rng, self.window)
        margin = int(self.window * (1 + 2 * self.config.stretch)) + 64
        for _ in range(16):
            window = self.augment(self._raw(rng, min(margin, len(self.stream))), rng, self.config, self.codec)
            if len(window) >= self.window:
                return window[: self.window]
        return self._raw(rng, self.window)

    def batch(self, rng: np.random.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.documents:
            # a prefix [BOS .. end) of whole documents, one end per batch, so every position gets trained
            length = int(rng.integers(min(self.config.latents + 1, self.window), self.window + 1))
            starts = self.offsets[rng.integers(0, len(self.offsets) - 1, size=batch_size)]
            rows = np.stack([np.asarray(self.stream[s : s + length], dtype=np.int64) for s in starts])
        else:
            rows = np.stack([self._one(rng) for _ in range(batch_size)])
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def fixed_batches(self, count: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Deterministic validation batches: evenly spaced windows (or the first whole documents)."""
        batches = []
        if self.documents:
            starts = self.offsets[:-1][: count * batch_size]
            for i in range(0, len(starts), batch_size):
                rows = np.stack(
                    [
                        np.asarray(self.stream[s : s + self.window], dtype=np.int64)
                        for s in starts[i : i + batch_size]
                    ]
                )
                batches.append((torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])))
            return batches
        total = count * batch_size
        starts = np.linspace(0, len(self.stream) - self.window, num=total).astype(np.int64)
        for i in range(0, total, batch_size):
            rows = np.stack(
                [np.asarray(self.stream[s : s + self.window], dtype=np.int64) for s in starts[i : i + batch_size]]
            )
            batches.append((torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])))
        return batches


# ----------------------------------------------------------------------------------------------------------
# Optimiser, schedule, state


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to config.lr, then cosine decay to lr * min_lr_ratio at config.steps."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: PerceiverAR, config: TrainConfig) -> torch.optim.AdamW:
    # no weight decay on norms and the embedding: decaying them only fights the model
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    keep = [p for n, p in model.named_parameters() if p.dim() < 2 or "embedding" in n]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return adamw(groups, lr=config.lr, betas=(config.beta1, config.beta2))


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"state.{index}.{key}"] = (
                (value if torch.is_tensor(value) else torch.tensor(value)).cpu().contiguous()
            )
    return tensors


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state_dict = optimizer.state_dict()
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)


def model_config_for(config: TrainConfig, codec: Codec, context: int) -> PerceiverARConfig:
    return PerceiverARConfig(
        vocab_size=codec.vocab_size,
        max_context=context,
        num_latents=min(config.latents, context),
        d_model=config.d_model,
        num_heads=config.heads,
        num_layers=config.layers,
        mlp_ratio=config.mlp_ratio,
        dropout=config.dropout,
        prefix_dropout=config.prefix_dropout,
        rotary_fraction=config.rotary_fraction,
        tie_embeddings=config.tie_embeddings,
    )


def _codec_identity(config: dict) -> dict:
    # a tokenizer's file name differs between a checkpoint and a prepared folder; its sha256 is what counts
    return {key: value for key, value in config.items() if key != "tokenizer"}


def initial_weights(
    source: str | Path, config: TrainConfig, codec: Codec, device
) -> tuple[PerceiverAR, TrainConfig, dict]:
    """A model initialised from a trained checkpoint (fine-tuning, or more training of a shipped model).

    The architecture is the checkpoint's, so the run's config takes its shape fields; dropout and prefix
    dropout are the run's own. The checkpoint must use the same codec as the prepared data, or its token ids
    would mean something else."""
    checkpoint = load_checkpoint(source, device=device, verify=True)
    if _codec_identity(checkpoint.codec.config) != _codec_identity(codec.config):
        raise ValueError(
            f"--init-from {source}: its codec {checkpoint.codec.config} differs from the prepared data's "
            f"{codec.config} (prepare the data with the checkpoint's codec/tokenizer)"
        )
    shape = checkpoint.model.config
    config = replace(
        config,
        context=shape.max_context,
        latents=shape.num_latents,
        d_model=shape.d_model,
        heads=shape.num_heads,
        layers=shape.num_layers,
        mlp_ratio=shape.mlp_ratio,
        rotary_fraction=shape.rotary_fraction,
        tie_embeddings=shape.tie_embeddings,
    )
    model = PerceiverAR(replace(shape, dropout=config.dropout, prefix_dropout=config.prefix_dropout))
    model.load_state_dict(checkpoint.model.state_dict())
    trained = checkpoint.meta.get("training", {})
    # what the source had seen, so a model card can count the whole training, chained through earlier sources
    origin = {key: trained.get(key) for key in ("step", "tokens_seen", "targets_seen", "init_from")}
    return model.to(device), config, {"checkpoint": str(source), **origin}


# ----------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    elapsed: float
    tokens_per_second: float
    interrupted: bool
    history: list[dict]
    model: PerceiverAR | None = None


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves at the end of the current step and returns."""

    def __init__(self):
        self.raised = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners)
                pass
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if world > 1 else 0
    return rank, world


def _step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63 - 1)


@torch.no_grad()
def evaluate_batches(model: PerceiverAR, batches, device, dtype) -> float:
    model.eval()
    total, count = 0.0, 0
    with autocast(device, dtype):  # one context: autocast casts the weights to bf16 once, not once per batch
        for inputs, targets in batches:
            logits = model(inputs.to(device))
            loss = latent_loss(logits, targets.to(device), reduction="sum")
            total += loss.item()
            count += logits.shape[0] * logits.shape[1]
    model.train()
    return total / max(1, count)


class RunInUseError(FileExistsError):
    """Another process is training into the same run directory."""


LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on run_dir for a whole training.

    Two trainings writing one run directory replace each other's checkpoints mid-save (seen here when a resume
    was started before the stopped run had finished saving), so the second one is refused up front. The lock is
    an OS file lock: it goes away with the process, even on SIGKILL, so a crashed run never blocks its resume.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks in the standard library; run unguarded
        yield
        return
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / LOCK_FILE
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunInUseError(
                f"{run_dir}: another training (pid {holder}) is writing to it; wait for it to finish or use "
                "another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            if created and [path.name for path in run_dir.iterdir()] == [LOCK_FILE]:
                lock_path.unlink()  # a run that failed before writing anything leaves no directory behind
                run_dir.rmdir()


def train(
    data_dir: Path,
    run_dir: Path,
    config: TrainConfig,
    *,
    resume: bool = False,
    init_from: str | Path | None = None,
    on_progress: Callable[[dict], None] | None = None,
    max_minutes: float | None = None,
    resume_steps: int | None = None,
) -> TrainResult:
    """Train on prepared data into run_dir. With resume=True the run's saved settings win over `config`, except
    device and dtype; it trains to `resume_steps` if given, else to the run's own total. One training at a time
    per run_dir (rank 0 holds its lock; under torchrun the other ranks write nothing there)."""
    rank, _ = _distributed()
    guard = run_lock(Path(run_dir)) if rank == 0 else contextlib.nullcontext()
    with guard:
        return _train(data_dir, run_dir, config, resume, init_from, on_progress, max_minutes, resume_steps)


def _train(
    data_dir: Path,
    run_dir: Path,
    config: TrainConfig,
    resume: bool,
    init_from: str | Path | None,
    on_progress: Callable[[dict], None] | None,
    max_minutes: float | None,
    resume_steps: int | None,
) -> TrainResult:
    """The body of `train`, run while rank 0 holds the run directory's lock."""
    rank, world = _distributed()
    device = resolve_device(config.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dtype = resolve_dtype(config.dtype, device)
    data = PreparedData(data_dir)
    run_dir = Path(run_dir)
    last_dir = run_dir / "last"

    start_step, best_val, history, origin = 0, None, [], None
    if resume:
        if not (last_dir / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{last_dir}: nothing to resume (no checkpoint)")
        trainer = json.loads((last_dir / TRAINER_FILE).read_text())
        saved = TrainConfig(**trainer["config"])
        # the run's own settings win, except where to run and, when asked, how long to train (a resume without
        # --steps once fell back to the default 2,000 and re-warmed a run that was near the end of its cosine)
        steps = saved.steps if resume_steps is None else resume_steps
        config = TrainConfig(**{**saved.to_dict(), "steps": steps, "device": config.device, "dtype": config.dtype})
        start_step, best_val, origin = trainer["step"], trainer.get("best_val_loss"), trainer.get("init_from")
        checkpoint = load_checkpoint(last_dir, device=device, verify=True)
        model = checkpoint.model.train()
    elif (last_dir / CONFIG_FILE).is_file():
        raise FileExistsError(f"{run_dir}: already holds a run (use --resume to continue it, or another --out)")
    elif init_from is not None:
        model, config, origin = initial_weights(init_from, config, data.codec, device)
        model.train()

    train_sampler = WindowSampler(data, "train", config, augment=True)
    context = train_sampler.window - 1
    if not resume and origin is None:
        torch.manual_seed(config.seed)  # the same initial weights on every rank and for every rerun
        model = PerceiverAR(model_config_for(config, data.codec, context)).to(device).train()
    val_batches = None
    if data.tokens("val").size > 1:
        try:
            val_batches = WindowSampler(data, "val", config, augment=False).fixed_batches(
                config.eval_batches, config.batch_size
            )
        except ValueError:
            val_batches = None

    optimizer = make_optimizer(model, config)
    if resume:
        load_optimizer_tensors(optimizer, load_file(str(last_dir / OPTIMIZER_FILE)))
    step_model = model
    if config.compile:
        step_model = torch.compile(model)
    if world > 1:
        step_model = torch.nn.parallel.DistributedDataParallel(
            step_model, device_ids=[device.index] if device.type == "cuda" else None
        )
    metrics_path = run_dir / "metrics.jsonl"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)

    def run_meta(step: int, train_loss: float | None, val_loss: float | None) -> dict:
        return {
            "step": step,
            "tokens_seen": step * config.batch_size * config.grad_accum * world * context,
            "targets_seen": step * config.batch_size * config.grad_accum * world * model.config.num_latents,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "data": data.manifest.get("inputs"),
            "train_config": config.to_dict(),
            "world_size": world,
            "dtype": str(dtype).replace("torch.", ""),
            "device": device.type,
            "init_from": origin,
        }

    def save(step: int, train_loss: float | None, val_loss: float | None) -> None:
        if rank != 0:
            return
        meta = run_meta(step, train_loss, val_loss)
        tmp_opt = run_dir / f".{OPTIMIZER_FILE}.tmp"
        save_file(optimizer_tensors(optimizer), str(tmp_opt))
        tmp_trainer = run_dir / f".{TRAINER_FILE}.tmp"
        tmp_trainer.write_text(
            json.dumps(
                {"step": step, "config": config.to_dict(), "best_val_loss": best_val, "init_from": origin}, indent=1
            )
        )
        save_checkpoint(
            last_dir, model, data.codec, meta, extra_files={OPTIMIZER_FILE: tmp_opt, TRAINER_FILE: tmp_trainer}
        )
        tmp_opt.unlink()
        tmp_trainer.unlink()

    started = time.perf_counter()
    tokens_done, train_loss, val_loss, interrupted = 0, None, None, False
    window_losses: list[float] = []
    step = start_step
    with _StopFlag() as stop:
        while step < config.steps:
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(_step_seed(config.seed, rank, step))
            rng = np.random.default_rng(_step_seed(config.seed, rank, step))
            step_loss = 0.0
            for micro in range(config.grad_accum):
                inputs, targets = train_sampler.batch(rng, config.batch_size)
                inputs, targets = inputs.to(device), targets.to(device)
                sync = micro == config.grad_accum - 1 or world == 1
                context_manager = step_model.no_sync() if (world > 1 and not sync) else _null()
                with context_manager:
                    with autocast(device, dtype):
                        logits = step_model(inputs)
                    loss = latent_loss(logits, targets) / config.grad_accum
                    loss.backward()
                step_loss += loss.item()
                tokens_done += logits.shape[0] * logits.shape[1]
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if world > 1:  # log the mean loss over ranks, not rank 0's own
                mean_loss = torch.tensor([step_loss], device=device)
                dist.all_reduce(mean_loss)
                step_loss = mean_loss.item() / world
            step += 1
            window_losses.append(step_loss)
            elapsed = time.perf_counter() - started
            record = None
            if step % config.log_every == 0 or step == config.steps:
                train_loss = float(np.mean(window_losses))
                window_losses = []
                record = {
                    "step": step,
                    "train_loss": train_loss,
                    "lr": lr,
                    "targets_per_s": tokens_done * world / elapsed,
                    "elapsed_s": elapsed,
                }
            if val_batches and (step % config.eval_every == 0 or step == config.steps):
                val_loss = evaluate_batches(model, val_batches, device, dtype)
                record = {**(record or {"step": step}), "val_loss": val_loss, "val_bits": val_loss / math.log(2)}
                if best_val is None or val_loss < best_val:
                    best_val = val_loss
                    if rank == 0:
                        save_checkpoint(run_dir / "best", model, data.codec, run_meta(step, train_loss, val_loss))
            if record and rank == 0:
                history.append(record)
                with open(metrics_path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                if on_progress:
                    on_progress({**record, "total_steps": config.steps})
            out_of_time = max_minutes is not None and elapsed > max_minutes * 60
            if step % config.save_every == 0 or step == config.steps or stop.raised or out_of_time:
                save(step, train_loss, val_loss)
            if stop.raised or out_of_time:
                interrupted = stop.raised
                break
    if rank == 0 and history:
        try:
            from ..render import plot_loss_curve

            records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            plot_loss_curve(records, run_dir / "loss.png", title=f"{data.codec.name}: {run_dir.name}")
        except Exception:  # a plot must never cost a training run
            pass
    elapsed = time.perf_counter() - started
    return TrainResult(
        run_dir,
        step,
        train_loss,
        val_loss,
        best_val,
        elapsed,
        tokens_done * world / max(elapsed, 1e-9),
        interrupted,
        history,
        model,
    )


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
