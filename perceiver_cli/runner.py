"""The library behind `perceiver generate`: load a checkpoint, encode a prompt, sample, decode, write files.

One pipeline serves every modality: a modality object (music, image, text; a registry, not an if/elif chain)
turns a request into a *plan* (the prompt tokens, how many tokens at most, which tokens are banned and when a
sequence is finished), the shared loop drives `generate.generate_stream` for B sequences at once, and the modality
decodes each sequence and writes its files. Nothing here prints: progress and streamed text go to callbacks.

Seeds. A generation with seed s seeds one torch.Generator (on the model's device) with s and draws every token of
the B sequences of its batch from it. `sample_batch` gives sample i the seed base_seed + i and runs consecutive
pending samples in batches of B; a batch's generator is seeded with its first sample's seed (`batch_seed` in
index.jsonl). With batch_size 1 every sample is therefore reproducible alone (`--seed base_seed+i`); with B > 1
it is reproducible by rerunning its batch (same batch_seed, batch_size and position, all in index.jsonl).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import cpu_decode
from .checkpoint import DEFAULT_CHECKPOINTS, CheckpointError, list_checkpoints, load_checkpoint, read_meta
from .checkpoint import resolve_checkpoint as _resolve_checkpoint
from .codecs import Codec, CodecError
from .codecs.music import PerformanceGuard, cut_midi, duration_seconds, load_midi
from .codecs.text import read_text
from .device import DTYPES, autocast, decode_threads, resolve_device, resolve_dtype
from .generate import (
    SamplingOptions,
    auto_decode_dtypes,
    generate_stream,
    int8_step_weights_dtype,
    step_model,
    step_weights_dtype,
)
from .model import PerceiverAR

MODALITIES = ("music", "image", "text")
MAX_MUSIC_TOKENS_PER_SECOND = 200  # safety cap: dense MAESTRO passages stay well under this
INDEX_FILE = "index.jsonl"
GRID_FILE = "grid.png"
IMAGE_UPSCALE = 8
_SUFFIXES = {"music": ".mid", "image": ".png", "text": ".txt"}


# ----------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class Loaded:
    """A checkpoint ready to sample from: fp32 weights on `device`, `dtype` the autocast compute dtype;
    `exact`: fp32 was asked for, so cached CPU steps keep fp32 weights and caches too (no bf16 step weights,
    no bf16 key/value caches); `int8` (--dtype int8): cached CPU steps read int8 key/value caches and, for batches
    under cpu_decode.INT8_MAX_ROWS, int8 copies of the weight matrices."""

    model: PerceiverAR
    codec: Codec
    device: torch.device
    dtype: torch.dtype
    path: Path
    meta: dict = field(default_factory=dict)
    exact: bool = False
    int8: bool = False
    steppers: dict = field(default_factory=dict)  # (step dtype, rows) -> generate.step_model, built once

    def stepper(self, batch: int) -> PerceiverAR | None:
        """The model cached decode steps run on (generate.step_weights_dtype), None for the model itself."""
        dtype = step_weights_dtype(self.device, batch, self.dtype)
        if dtype is None:
            return None
        dtype = torch.float32 if self.exact else int8_step_weights_dtype(batch, dtype) if self.int8 else dtype
        if (dtype, batch) not in self.steppers:
            self.steppers[dtype, batch] = step_model(self.model, dtype, batch)
        return self.steppers[dtype, batch]

    @property
    def decode_dtypes(self) -> dict:
        """generate_stream's cache_dtype and refill_dtype: `auto`'s (generate.auto_decode_dtypes), none with fp32,
        int8 caches with int8."""
        if self.exact:
            return {"cache_dtype": None, "refill_dtype": None}
        return auto_decode_dtypes(self.device) | ({"cache_dtype": torch.int8} if self.int8 else {})

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def modality(self) -> str:
        return self.codec.name


def _a(word: str | None) -> str:
    return f"an {word}" if word and word[0] in "aeiou" else f"a {word}"


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r} (choose from {', '.join(MODALITIES)})")


def load(checkpoint: str | Path | None, modality: str, device: str = "auto", dtype: str = "auto") -> Loaded:
    """Load a checkpoint (None: the shipped default for `modality`) and check that it is a `modality` model."""
    _check_modality(modality)
    path = _resolve_checkpoint(DEFAULT_CHECKPOINTS[modality] if checkpoint is None else checkpoint)
    meta = read_meta(path)
    kind = (meta.get("codec") or {}).get("name")
    if kind != modality:
        raise CheckpointError(f"{path}: is {_a(kind)} checkpoint, not {modality}")
    torch_device = resolve_device(device)
    if dtype not in (*DTYPES, "int8"):
        raise ValueError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)}, int8)")
    int8 = dtype == "int8"  # `auto`, with int8 caches and step weights: only the C step reads them
    if int8 and (torch_device.type != "cpu" or not cpu_decode.available()):
        raise ValueError("--dtype int8 needs CPU decoding through the C step (x86 with AVX-512 and a C compiler)")
    compute = resolve_dtype("auto" if int8 else dtype, torch_device, purpose="decode")
    loaded = load_checkpoint(path, device=torch_device, dtype=torch.float32)
    if int8 and not cpu_decode.supports_int8(loaded.model):
        raise ValueError(f"--dtype int8: the C step does not take {path.name}'s sizes (d_model, MLP width / 64)")
    if torch_device.type == "cpu":
        torch.set_num_threads(decode_threads())
    return Loaded(
        loaded.model, loaded.codec, torch_device, compute, loaded.path, loaded.meta, dtype == "fp32", int8=int8
    )


def describe_checkpoints() -> list[dict[str, Any]]:
    """One dict per checkpoint found (see checkpoint.search_dirs), for `perceiver checkpoints`."""
    rows = []
    for path in list_checkpoints():
        row: dict[str, Any] = {"name": path.name, "path": str(path)}
        try:
            meta = read_meta(path)
        except CheckpointError as error:
            rows.append({**row, "error": str(error)})
            continue
        model, training = meta.get("model") or {}, meta.get("training") or {}
        heldout = training.get("heldout") if isinstance(training.get("heldout"), dict) else None
        data = training.get("data")  # export --data gives a description; a training run records its folders
        rows.append(
            {
                **row,
                "modality": (meta.get("codec") or {}).get("name"),
                "parameters": meta.get("num_parameters"),
                "context": model.get("max_context"),
                "latents": model.get("num_latents"),
                "data": ", ".join(map(str, data)) if isinstance(data, list) else data,
                "heldout": heldout,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------------------
# Options, requests and results


@dataclass(frozen=True)
class GenerateOptions:
    """How to sample; the same for every modality. seed=None draws a fresh seed (reported in the result)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    num_latents: int | None = None  # None: the checkpoint's training value
    batch_size: int = 1

    def __post_init__(self) -> None:
        SamplingOptions(self.temperature, self.top_k, self.top_p)  # validates the three
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.num_latents is not None and self.num_latents < 1:
            raise ValueError(f"num_latents={self.num_latents} must be >= 1")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed} is outside [0, 2**63)")


@dataclass(frozen=True)
class MusicRequest:
    """`seconds` of new music (the prompt not counted), optionally continuing the first/last `prompt_seconds`
    of a MIDI file."""

    seconds: float = 60.0
    prompt: Path | None = None
    prompt_seconds: float | None = None
    prompt_from: str = "first"
    audio: bool = True
    plot: bool = True
    max_note: float = 6.0  # seconds a note may ring before its NOTE_OFF is forced (0: no limit)
    max_silence: float = 2.0  # seconds of silence before the next event must start a note (0: no limit)

    def __post_init__(self) -> None:
        if not 0 < self.seconds <= 3600:
            raise ValueError(f"seconds={self.seconds} is outside (0, 3600]")
        if self.prompt is None and self.prompt_seconds is not None:
            raise ValueError("prompt_seconds needs a prompt MIDI file")
        if self.prompt_from not in ("first", "last"):
            raise ValueError(f"prompt_from={self.prompt_from!r} is not one of first, last")
        if self.max_note < 0 or self.max_silence < 0:
            raise ValueError(f"max_note={self.max_note} and max_silence={self.max_silence} must be >= 0")


@dataclass(frozen=True)
class ImageRequest:
    """Unconditional (no prompt), or complete the top `keep_rows` rows (or `keep_fraction`) of an image."""

    prompt: Path | None = None
    keep_rows: int | None = None
    keep_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.keep_rows is not None and self.keep_fraction is not None:
            raise ValueError("give keep_rows or keep_fraction, not both")
        if self.prompt is None and (self.keep_rows is not None or self.keep_fraction is not None):
            raise ValueError("keep_rows/keep_fraction need a prompt image")


@dataclass(frozen=True)
class TextRequest:
    """`tokens` new tokens (BOS and EOS are banned, so exactly that many) after a prompt string or file."""

    tokens: int = 1000
    prompt: str | None = None
    prompt_file: Path | None = None

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"tokens={self.tokens} must be >= 1")
        if self.prompt is not None and self.prompt_file is not None:
            raise ValueError("give a prompt string or a prompt file, not both")


Request = MusicRequest | ImageRequest | TextRequest


@dataclass(frozen=True)
class Progress:
    """Reported after every token. `completed`/`total` are in `unit` ("tokens", or "s" of music); over a
    batch run they count every pending sample. `tokens` sums all sequences of the batch(es)."""

    completed: float
    total: float
    unit: str
    tokens: int
    elapsed: float
    samples_done: int = 0
    num_samples: int = 1

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0


ProgressCallback = Callable[[Progress], None]


@dataclass
class MusicSample:
    midi: Any  # pretty_midi.PrettyMIDI of prompt + continuation
    continuation: Any  # pretty_midi.PrettyMIDI of the generated part alone
    prompt_seconds: float  # where the continuation starts in `midi` (0 without a prompt)
    music_seconds: float  # length of the generated part
    tokens: np.ndarray  # the generated tokens


@dataclass
class ImageSample:
    image: Any  # PIL.Image at the model's resolution
    kept_rows: int
    tokens: np.ndarray


@dataclass
class TextSample:
    text: str  # prompt + continuation (what the .txt holds)
    prompt: str
    continuation: str
    tokens: np.ndarray


@dataclass
class Generation:
    """The decoded samples of one batch and how long they took."""

    samples: list
    seed: int
    tokens: int  # generated tokens over all samples
    seconds: float  # wall time of the sampling loop
    notices: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Summary:
    """What a run wrote: for the CLI's message and its --json."""

    files: list[str]
    tokens: int
    seconds: float
    seed: int
    settings: dict
    notices: list[str] = field(default_factory=list)
    samples: int = 1
    skipped: int = 0  # batch runs: samples already finished by an earlier run
    music_seconds: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["seconds"] = round(self.seconds, 3)
        data["tokens_per_second"] = round(self.tokens_per_second, 1)
        if self.music_seconds is None:
            del data["music_seconds"]
        return data


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during generation: finished outputs stay; `files` are the partial outputs written for the
    sequences in progress (empty when the interrupt came before any file could be written)."""

    def __init__(self, samples: list | None = None, files: Sequence[Path] = ()):
        super().__init__("interrupted")
        self.samples = samples or []
        self.files = list(files)


# ----------------------------------------------------------------------------------------------------------
# The plan a modality makes, and the shared sampling loop


@dataclass
class _Plan:
    content_prompt: np.ndarray  # the whole prompt, without BOS (decoded with the output)
    model_prompt: np.ndarray  # what the model sees: [BOS] + prompt, possibly only its last max_context tokens
    max_new_tokens: int
    banned: tuple[int, ...]
    target: int  # a sequence is finished when the sum of measure(tokens) reaches this
    unit: str = "tokens"
    unit_scale: float = 1.0  # target / unit_scale = total in `unit`
    measure: Callable[[np.ndarray], np.ndarray] | None = None  # None: every token counts 1
    notices: list[str] = field(default_factory=list)
    prompt_seconds: float = 0.0
    guard: Callable[[int], Any] | None = None  # batch size -> a logits processor with .observe (music)


def _fit_context(tokens: np.ndarray, max_context: int, what: str, notices: list[str]) -> np.ndarray:
    if len(tokens) <= max_context:
        return tokens
    notices.append(
        f"{what} is {len(tokens)} tokens; the model's context is {max_context}, so it sees the last {max_context}"
    )
    return tokens[-max_context:]


def _fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def _sample_rows(
    loaded: Loaded,
    plan: _Plan,
    options: GenerateOptions,
    seed: int,
    on_progress: ProgressCallback | None,
    on_tokens: Callable[[np.ndarray], None] | None = None,
) -> tuple[list[np.ndarray], float]:
    """Generate options.batch_size sequences; each row's generated tokens (cut where it finished) + wall time.

    KeyboardInterrupt becomes Interrupted carrying the rows generated so far in `.samples` (raw tokens).
    """
    batch = options.batch_size
    generator = torch.Generator(device=loaded.device)
    generator.manual_seed(seed)
    sampling = SamplingOptions(options.temperature, options.top_k, options.top_p, plan.banned)
    prompt = torch.as_tensor(plan.model_prompt, dtype=torch.long, device=loaded.device)[None].repeat(batch, 1)
    # the per-token bookkeeping is numpy on (B,) arrays: ~1 us an op where a PyTorch op costs ~5-15 us, at ~1 ms a
    # cached step
    amount = np.zeros(batch, dtype=np.int64)
    finished_at = np.full(batch, -1, dtype=np.int64)
    produced: list[np.ndarray] = []
    guard = plan.guard(batch) if plan.guard is not None else None
    if guard is not None:
        guard.observe_prompt(np.asarray(plan.model_prompt)[None].repeat(batch, 0))
    start = time.perf_counter()

    def rows() -> list[np.ndarray]:
        full = np.stack(produced, axis=1) if produced else np.zeros((batch, 0), dtype=np.int64)
        ends = [int(e) if e >= 0 else full.shape[1] for e in finished_at.tolist()]
        return [full[row, :end].astype(np.int64) for row, end in enumerate(ends)]

    try:
        if plan.max_new_tokens > 0 and plan.target > 0:
            stream = generate_stream(
                loaded.model,
                prompt,
                plan.max_new_tokens,
                sampling,
                generator=generator,
                num_latents=options.num_latents,
                logits_processor=guard,
                stepper=loaded.stepper(batch),
                **loaded.decode_dtypes,
            )
            with autocast(loaded.device, loaded.dtype):
                for index, step in enumerate(stream):
                    tokens = step.tokens.cpu().numpy()
                    if guard is not None:
                        guard.observe(tokens)
                    produced.append(tokens)
                    amount += 1 if plan.measure is None else plan.measure(tokens)
                    finished_at[(finished_at < 0) & (amount >= plan.target)] = index + 1
                    if on_tokens is not None:
                        on_tokens(tokens)
                    if on_progress is not None:
                        on_progress(
                            Progress(
                                completed=float(min(amount.min(), plan.target)) / plan.unit_scale,
                                total=plan.target / plan.unit_scale,
                                unit=plan.unit,
                                tokens=batch * (index + 1),
                                elapsed=time.perf_counter() - start,
                            )
                        )
                    if (finished_at >= 0).all():
                        break
    except KeyboardInterrupt:
        raise Interrupted(rows()) from None
    return rows(), time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------
# Modalities: plan, decode, outputs


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    if force:
        return
    for path in paths:
        if path.exists():
            raise FileExistsError(f"{path} exists (use --force to overwrite)")


def _sibling(path: Path, suffix: str) -> Path:
    """out.mid → out{suffix}, e.g. '.wav', '.x8.png', '.partial.mid'."""
    return path.with_name(path.stem + suffix)


def _partial_path(path: Path) -> Path:
    return _sibling(path, ".partial" + path.suffix)


class _Music:
    name = "music"
    suffix = ".mid"
    suffixes = (".mid", ".midi")

    def plan(self, loaded: Loaded, request: MusicRequest) -> _Plan:
        codec, notices = loaded.codec, []
        content = np.zeros(0, dtype=np.int64)
        if request.prompt is not None:
            pm = load_midi(Path(request.prompt))
            if request.prompt_seconds is not None:
                pm = cut_midi(pm, request.prompt_seconds, request.prompt_from)
            content = codec.encode(pm)
        steps_per_second = codec.steps_per_second
        shift = codec.time_shift
        full = np.concatenate([[codec.bos_id], content]).astype(np.int64)

        def measure(tokens: np.ndarray) -> np.ndarray:  # time-shift steps of each new token
            inside = (tokens >= shift.first) & (tokens <= shift.last)
            return np.where(inside, tokens - shift.first + 1, 0)

        return _Plan(
            content_prompt=content,
            model_prompt=_fit_context(full, loaded.model.config.max_context, "the prompt", notices),
            max_new_tokens=math.ceil(request.seconds * MAX_MUSIC_TOKENS_PER_SECOND),
            # EOS stays banned until the target is reached, which is where generation stops
            banned=tuple(sorted(codec.special_ids)),
            target=max(1, round(request.seconds * steps_per_second)),
            unit="s",
            unit_scale=steps_per_second,
            measure=measure,
            notices=notices,
            prompt_seconds=duration_seconds(content, codec),
            guard=lambda batch: PerformanceGuard(codec, batch, request.max_note, request.max_silence),
        )

    def decode(self, loaded: Loaded, plan: _Plan, tokens: np.ndarray) -> MusicSample:
        codec = loaded.codec
        tokens = tokens.copy()
        shift = codec.time_shift
        steps = np.where((tokens >= shift.first) & (tokens <= shift.last), tokens - shift.first + 1, 0)
        over = int(steps.sum()) - plan.target
        if over > 0 and steps[-1] > over:  # the last shift overshoots the target: shorten it to land on it
            tokens[-1] -= over
        # the continuation alone starts at the prompt's last velocity instead of the codec's default
        velocity = codec.velocity
        velocities = plan.content_prompt[
            (plan.content_prompt >= velocity.first) & (plan.content_prompt <= velocity.last)
        ]
        lead = velocities[-1:]
        return MusicSample(
            midi=codec.decode(np.concatenate([plan.content_prompt, tokens])),
            continuation=codec.decode(np.concatenate([lead, tokens])),
            prompt_seconds=plan.prompt_seconds,
            music_seconds=duration_seconds(tokens, codec),
            tokens=tokens,
        )

    def outputs(self, main: Path, request: MusicRequest) -> list[Path]:
        paths = [main]
        if request.prompt is not None:
            paths.append(_sibling(main, ".continuation.mid"))
        if request.audio:
            paths.append(_sibling(main, ".wav"))
        if request.plot:
            paths.append(_sibling(main, ".png"))
        return paths

    def write(self, loaded: Loaded, sample: MusicSample, main: Path, request: MusicRequest) -> list[Path]:
        from . import render

        loaded.codec.save(sample.midi, main)
        written = [main]
        if request.prompt is not None:
            path = _sibling(main, ".continuation.mid")
            loaded.codec.save(sample.continuation, path)
            written.append(path)
        if request.audio:
            path = _sibling(main, ".wav")
            sample_rate = 22050
            render.write_wav(render.synthesize(sample.midi, sample_rate), sample_rate, path)
            written.append(path)
        if request.plot:
            path = _sibling(main, ".png")
            marker = sample.prompt_seconds if request.prompt is not None else None
            render.plot_piano_roll(sample.midi, path, title=main.name, prompt_seconds=marker)
            written.append(path)
        return written

    def write_partial(self, loaded: Loaded, sample: MusicSample, main: Path) -> Path:
        path = _partial_path(main)
        loaded.codec.save(sample.midi, path)
        return path

    def record(self, sample: MusicSample) -> dict[str, Any]:
        return {"music_seconds": round(sample.music_seconds, 3), "prompt_seconds": round(sample.prompt_seconds, 3)}

    def write_overview(self, out_dir: Path, records: list[dict]) -> list[Path]:
        return []


class _Image:
    name = "image"
    suffix = ".png"
    suffixes = (".png",)

    def plan(self, loaded: Loaded, request: ImageRequest) -> _Plan:
        codec, notices = loaded.codec, []
        content = np.zeros(0, dtype=np.int64)
        if request.prompt is not None:
            keep_fraction = request.keep_fraction
            if request.keep_rows is None and keep_fraction is None:
                keep_fraction = 0.5
            content = codec.prompt_tokens(
                Path(request.prompt), keep_rows=request.keep_rows, keep_fraction=keep_fraction
            )
            if codec.last_notice:
                notices.append(codec.last_notice)
        if len(content) > codec.num_tokens:
            raise CodecError(f"prompt is {len(content)} tokens, longer than the {codec.num_tokens}-token image")
        remaining = codec.num_tokens - len(content)
        return _Plan(
            content_prompt=content,
            model_prompt=np.concatenate([[codec.bos_id], content]).astype(np.int64),
            max_new_tokens=remaining,
            banned=tuple(sorted(codec.special_ids)),
            target=remaining,
            notices=notices,
        )

    def decode(self, loaded: Loaded, plan: _Plan, tokens: np.ndarray) -> ImageSample:
        codec = loaded.codec
        kept = len(plan.content_prompt) // (codec.width * 3)
        return ImageSample(codec.decode(np.concatenate([plan.content_prompt, tokens])), kept, tokens)

    def outputs(self, main: Path, request: ImageRequest) -> list[Path]:
        return [main, _sibling(main, f".x{IMAGE_UPSCALE}.png")]

    def write(self, loaded: Loaded, sample: ImageSample, main: Path, request: ImageRequest) -> list[Path]:
        from . import render

        loaded.codec.save(sample.image, main)
        big = _sibling(main, f".x{IMAGE_UPSCALE}.png")
        loaded.codec.save(render.upscale(sample.image, IMAGE_UPSCALE), big)
        return [main, big]

    def write_partial(self, loaded: Loaded, sample: ImageSample, main: Path) -> Path:
        path = _partial_path(main)
        loaded.codec.save(sample.image, path)
        return path

    def record(self, sample: ImageSample) -> dict[str, Any]:
        return {"kept_rows": sample.kept_rows}

    def write_overview(self, out_dir: Path, records: list[dict]) -> list[Path]:
        """grid.png of every finished sample in a batch folder."""
        from PIL import Image

        from . import render

        images = []
        for record in sorted(records, key=lambda r: r["sample"]):
            with Image.open(out_dir / record["file"]) as image:
                images.append(image.convert("RGB"))
        if not images:
            return []
        render.image_grid(images, out_dir / GRID_FILE, scale=4)
        return [out_dir / GRID_FILE]


class _Text:
    name = "text"
    suffix = ".txt"
    suffixes = ()  # any name

    def prompt_text(self, request: TextRequest) -> str:
        if request.prompt_file is not None:
            return read_text(Path(request.prompt_file))
        return request.prompt or ""

    def plan(self, loaded: Loaded, request: TextRequest) -> _Plan:
        codec, notices = loaded.codec, []
        text = self.prompt_text(request)
        content = codec.encode(text)
        full = np.concatenate([[codec.bos_id], content]).astype(np.int64)
        return _Plan(
            content_prompt=content,
            model_prompt=_fit_context(full, loaded.model.config.max_context, "the prompt", notices),
            max_new_tokens=request.tokens,
            banned=tuple(sorted(codec.special_ids)),
            target=request.tokens,
            notices=notices,
        )

    def decode(self, loaded: Loaded, plan: _Plan, tokens: np.ndarray) -> TextSample:
        prompt = loaded.codec.decode(plan.content_prompt)
        continuation = loaded.codec.decode(tokens)
        return TextSample(prompt + continuation, prompt, continuation, tokens)

    def outputs(self, main: Path, request: TextRequest) -> list[Path]:
        return [main]

    def write(self, loaded: Loaded, sample: TextSample, main: Path, request: TextRequest) -> list[Path]:
        loaded.codec.save(sample.text, main)
        return [main]

    def write_partial(self, loaded: Loaded, sample: TextSample, main: Path) -> Path:
        path = _partial_path(main)
        loaded.codec.save(sample.text, path)
        return path

    def record(self, sample: TextSample) -> dict[str, Any]:
        return {}

    def write_overview(self, out_dir: Path, records: list[dict]) -> list[Path]:
        return []


_MODALITY = {MusicRequest: _Music(), ImageRequest: _Image(), TextRequest: _Text()}


def _modality_of(loaded: Loaded, request: Request):
    modality = _MODALITY.get(type(request))
    if modality is None:
        raise TypeError(f"unknown request type {type(request).__name__}")
    if modality.name != loaded.modality:
        raise CheckpointError(f"{loaded.path}: is {_a(loaded.modality)} checkpoint, not {modality.name}")
    return modality


# ----------------------------------------------------------------------------------------------------------
# Incremental text decoding


class TextStreamer:
    """Turns a growing token list into text pieces as soon as they are final.

    SentencePiece byte-fallback pieces spell a character over several tokens: until the last one arrives the
    decode ends in U+FFFD, and the codec's escape character waits for its partner. Such a tail is held back.
    Decoding restarts after each fully emitted point, so the work per token stays constant.
    """

    _PENDING = ("\ufffd", "\ue000")

    def __init__(self, codec: Codec):
        self.codec = codec
        self.tokens: list[int] = []  # since the last point where everything decoded was final
        self.emitted = 0  # characters of decode(self.tokens) already handed out

    def push(self, tokens: Sequence[int]) -> str:
        self.tokens.extend(int(t) for t in tokens)
        text = self.codec.decode(self.tokens)
        stable = len(text)
        while stable > self.emitted and text[stable - 1] in self._PENDING:
            stable -= 1
        piece = text[self.emitted : stable]
        if stable == len(text):  # nothing pending: start afresh after these tokens
            self.tokens, self.emitted = [], 0
        else:
            self.emitted = stable
        return piece

    def flush(self) -> str:
        text = self.codec.decode(self.tokens)[self.emitted :]
        self.tokens, self.emitted = [], 0
        return text


# ----------------------------------------------------------------------------------------------------------
# Generation, one function per modality


def _generate(
    loaded: Loaded,
    request: Request,
    options: GenerateOptions,
    on_progress: ProgressCallback | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    modality = _modality_of(loaded, request)
    plan = modality.plan(loaded, request)
    seed = _fresh_seed() if options.seed is None else options.seed
    on_tokens = None
    if on_text is not None and options.batch_size == 1:
        streamer = TextStreamer(loaded.codec)

        def on_tokens(tokens: np.ndarray) -> None:
            piece = streamer.push(tokens)
            if piece:
                on_text(piece)

    try:
        rows, seconds = _sample_rows(loaded, plan, options, seed, on_progress, on_tokens)
    except Interrupted as interrupted:
        raise Interrupted([modality.decode(loaded, plan, row) for row in interrupted.samples]) from None
    if on_tokens is not None:
        rest = streamer.flush()
        if rest:
            on_text(rest)
    samples = [modality.decode(loaded, plan, row) for row in rows]
    if isinstance(request, MusicRequest):
        short = [s.music_seconds for s in samples if s.music_seconds < request.seconds]
        if short:
            plan.notices.append(
                f"stopped at the safety cap of {plan.max_new_tokens} tokens after {min(short):.1f} s of music"
            )
    return Generation(samples, seed, sum(len(r) for r in rows), seconds, plan.notices)


def generate_music(
    loaded: Loaded, request: MusicRequest, options: GenerateOptions, on_progress: ProgressCallback | None = None
) -> Generation:
    """options.batch_size MusicSamples, each with >= request.seconds of new music (exactly, unless capped)."""
    return _generate(loaded, request, options, on_progress)


def generate_image(
    loaded: Loaded, request: ImageRequest, options: GenerateOptions, on_progress: ProgressCallback | None = None
) -> Generation:
    """options.batch_size ImageSamples; a completion keeps the prompt's top rows exactly."""
    return _generate(loaded, request, options, on_progress)


def generate_text(
    loaded: Loaded,
    request: TextRequest,
    options: GenerateOptions,
    on_progress: ProgressCallback | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """options.batch_size TextSamples of request.tokens new tokens; with batch_size 1, `on_text` receives the
    continuation piece by piece as it is generated."""
    return _generate(loaded, request, options, on_progress, on_text)


# ----------------------------------------------------------------------------------------------------------
# Writing files: one output, or a folder of samples


def _settings(loaded: Loaded, request: Request, options: GenerateOptions) -> dict[str, Any]:
    request_settings = {
        key: (str(value) if isinstance(value, Path) else value)
        for key, value in dataclasses.asdict(request).items()
    }
    return {
        "checkpoint": loaded.name,
        "modality": loaded.modality,
        "temperature": options.temperature,
        "top_k": options.top_k,
        "top_p": options.top_p,
        "num_latents": options.num_latents or loaded.model.config.num_latents,
        **request_settings,
    }


def default_out(modality: str) -> Path:
    """music.mid / image.png / text.txt in the current directory."""
    _check_modality(modality)
    return Path(modality + _SUFFIXES[modality])


def generate_file(
    loaded: Loaded,
    request: Request,
    options: GenerateOptions,
    out: str | Path | None = None,
    *,
    force: bool = False,
    on_progress: ProgressCallback | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Summary:
    """One sample to `out` (default music.mid / image.png / text.txt) and its siblings (.wav, .png, .x8.png,
    .continuation.mid). Refuses to overwrite without `force`; Ctrl-C writes `out.partial.*` and raises Interrupted."""
    modality = _modality_of(loaded, request)
    out = default_out(modality.name) if out is None else Path(out)
    if modality.suffixes and out.suffix.lower() not in modality.suffixes:
        raise ValueError(f"{out}: a {modality.name} output must end in {' or '.join(modality.suffixes)}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out}: folder {out.parent} does not exist")
    _refuse_existing(modality.outputs(out, request), force)
    options = dataclasses.replace(options, batch_size=1)
    try:
        generation = _generate(loaded, request, options, on_progress, on_text)
    except Interrupted as interrupted:
        files = [modality.write_partial(loaded, s, out) for s in interrupted.samples if len(s.tokens)]
        raise Interrupted(interrupted.samples, files) from None
    sample = generation.samples[0]
    files = modality.write(loaded, sample, out, request)
    _partial_path(out).unlink(missing_ok=True)
    return Summary(
        files=[str(p) for p in files],
        tokens=generation.tokens,
        seconds=generation.seconds,
        seed=generation.seed,
        settings=_settings(loaded, request, options),
        notices=generation.notices,
        music_seconds=round(sample.music_seconds, 3) if isinstance(sample, MusicSample) else None,
    )


def sample_name(index: int, suffix: str) -> str:
    return f"sample_{index:04d}{suffix}"


def _read_index(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{number}: not a JSON line (fix or delete it, or use --force)") from None
    return records


def _write_index(path: Path, records: list[dict]) -> None:
    from .codecs.base import atomic_write

    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in sorted(records, key=lambda r: r["sample"]))
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def sample_batch(
    loaded: Loaded,
    request: Request,
    options: GenerateOptions,
    num_samples: int,
    out_dir: str | Path,
    *,
    force: bool = False,
    on_progress: ProgressCallback | None = None,
) -> Summary:
    """`num_samples` samples into `out_dir` as sample_0000.EXT …, options.batch_size at a time.

    index.jsonl gets one line per finished sample (file, files, seed, batch_seed, batch_size, batch_position,
    tokens, seconds, settings, …). Rerunning with the same folder continues: samples listed there whose files
    exist are skipped, and without an explicit seed the recorded base seed is reused; `force` starts over.
    Images also get grid.png. Ctrl-C keeps finished samples and writes the current batch as sample_NNNN.partial.EXT.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    modality = _modality_of(loaded, request)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / INDEX_FILE
    settings = _settings(loaded, request, options)
    records = [] if force else _read_index(index_path)
    if records:
        recorded = records[0]
        if recorded.get("settings") != settings or (
            options.seed is not None and options.seed != recorded.get("base_seed")
        ):
            raise ValueError(
                f"{index_path}: written with other settings or seed; use another --out-dir or --force to start over"
            )
        base_seed = int(recorded["base_seed"])
    else:
        base_seed = _fresh_seed() if options.seed is None else options.seed
    done = {r["sample"]: r for r in records if all((out_dir / f).exists() for f in r.get("files", [r["file"]]))}
    records = list(done.values())
    pending = [i for i in range(num_samples) if i not in done]
    mains = {i: out_dir / sample_name(i, modality.suffix) for i in pending}
    _refuse_existing([p for i in pending for p in modality.outputs(mains[i], request)], force)

    batches = [pending[k : k + options.batch_size] for k in range(0, len(pending), options.batch_size)]
    total_tokens, total_seconds, notices = 0, 0.0, []
    files: list[str] = []
    start = time.perf_counter()
    finished_now = 0
    for batch in batches:
        batch_seed = base_seed + batch[0]
        batch_options = dataclasses.replace(options, seed=batch_seed, batch_size=len(batch))

        def progress(
            p: Progress, finished: int = finished_now, rows: int = len(batch), before: int = total_tokens
        ) -> None:
            if on_progress is not None:
                on_progress(
                    Progress(
                        completed=(finished + rows * p.completed / p.total) * p.total if p.total else 0.0,
                        total=len(pending) * p.total,
                        unit=p.unit,
                        tokens=before + p.tokens,
                        elapsed=time.perf_counter() - start,
                        samples_done=len(done) + finished,
                        num_samples=num_samples,
                    )
                )

        try:
            generation = _generate(loaded, request, batch_options, progress)
        except Interrupted as interrupted:
            partial = [
                modality.write_partial(loaded, s, mains[i])
                for i, s in zip(batch, interrupted.samples, strict=False)
                if len(s.tokens)
            ]
            raise Interrupted(interrupted.samples, partial) from None
        total_tokens += generation.tokens
        total_seconds += generation.seconds
        notices.extend(n for n in generation.notices if n not in notices)
        for position, (i, sample) in enumerate(zip(batch, generation.samples, strict=True)):
            written = modality.write(loaded, sample, mains[i], request)
            _partial_path(mains[i]).unlink(missing_ok=True)
            records.append(
                {
                    "sample": i,
                    "file": mains[i].name,
                    "files": [p.name for p in written],
                    "seed": base_seed + i,
                    "base_seed": base_seed,
                    "batch_seed": batch_seed,
                    "batch_size": len(batch),
                    "batch_position": position,
                    "tokens": int(len(sample.tokens)),
                    "seconds": round(generation.seconds, 3),
                    "settings": settings,
                    **modality.record(sample),
                }
            )
            files.extend(str(p) for p in written)
            finished_now += 1
        _write_index(index_path, records)
        overview = modality.write_overview(out_dir, records)  # after every batch: an interrupt keeps it current
    if not batches:
        overview = modality.write_overview(out_dir, records)
    files.extend(str(p) for p in [*overview, index_path])
    music = [r["music_seconds"] for r in records if "music_seconds" in r and r["sample"] in mains]
    return Summary(
        files=files,
        tokens=total_tokens,
        seconds=total_seconds,
        seed=base_seed,
        settings={**settings, "batch_size": options.batch_size, "num_samples": num_samples},
        notices=notices,
        samples=finished_now,
        skipped=len(done),
        music_seconds=round(sum(music), 3) if music else None,
    )


__all__ = [
    "GenerateOptions",
    "Generation",
    "ImageRequest",
    "ImageSample",
    "Interrupted",
    "Loaded",
    "MusicRequest",
    "MusicSample",
    "Progress",
    "Summary",
    "TextRequest",
    "TextSample",
    "TextStreamer",
    "default_out",
    "describe_checkpoints",
    "generate_file",
    "generate_image",
    "generate_music",
    "generate_text",
    "load",
    "sample_batch",
]
