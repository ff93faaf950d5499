"""`perceiver prepare`: files -> token shards (uint16 memmaps) with a deterministic train/validation split.

Layout of a prepared data directory:
    train.bin / val.bin          every document as [BOS] + content (+ EOS), back to back, uint16 (uint32 if needed)
    train.idx.npy / val.idx.npy  int64 document start offsets, plus the end offset
    manifest.json                codec config, split rule, per-file token counts, skipped files
    tokenizer.model              (text) when the tokenizer is trained here on the training split

Splits are by file, never inside one: MAESTRO files follow the `split` column of a maestro-v*.csv found in the
input (its test split is left out entirely), everything else goes to validation when sha1(relative path) falls
below `val_fraction`. Images become several training crops per photo (largest centred square, random squares
at several scales, horizontal flips); validation photos get only the centred crop, as a user's photo would.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..codecs import Codec, CodecError, ImageCodec, MusicCodec, TextCodec, codec_from_config
from ..codecs.image import prepare_image
from ..codecs.text import normalise_newlines, read_text, strip_gutenberg, train_tokenizer

MANIFEST = "manifest.json"
SPLITS = ("train", "val")


@dataclass
class PrepareOptions:
    val_fraction: float = 0.05
    workers: int = 1
    image_size: int = 32
    crops_per_image: int = 8  # training crops per photo (the centred one included), each also flipped
    seed: int = 0


@dataclass
class PrepareReport:
    out_dir: Path
    files: dict[str, int] = field(default_factory=dict)  # split -> number of files
    tokens: dict[str, int] = field(default_factory=dict)  # split -> number of tokens
    documents: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    held_out: int = 0  # files deliberately left out (e.g. MAESTRO test split)


# ----------------------------------------------------------------------------------------------------------
# Which files, and which split


EXTENSIONS = {
    "music": (".mid", ".midi"),
    "image": (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"),
    "text": (".txt", ".txt.xz", ".md"),
}


def find_files(inputs: list[Path], modality: str) -> list[tuple[Path, str]]:
    """(file, name relative to its input root) for every matching file, sorted for determinism."""
    found = []
    for root in inputs:
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such file or directory")
        if root.is_file():
            found.append((root, root.name))
            continue
        for path in sorted(root.rglob("*")):
            documentation = path.name.upper().startswith(("README", "LICENSE", "INDEX"))  # a dataset's own notes
            if path.is_file() and path.name.lower().endswith(EXTENSIONS[modality]) and not documentation:
                found.append((path, f"{root.name}/{path.relative_to(root)}"))
    if not found:
        raise FileNotFoundError(
            f"no {modality} files ({', '.join(EXTENSIONS[modality])}) under {', '.join(map(str, inputs))}"
        )
    return found


def maestro_splits(inputs: list[Path]) -> dict[Path, str]:
    """Absolute file path -> MAESTRO split, from every maestro-v*.csv under the inputs."""
    splits = {}
    for root in inputs:
        if not root.is_dir():
            continue
        for table in root.rglob("maestro-v*.csv"):
            with open(table, newline="", encoding="utf-8") as handle:
                for row in csv.DictReader(handle):
                    splits[(table.parent / row["midi_filename"]).resolve()] = row["split"]
    return splits


def assign_split(path: Path, name: str, val_fraction: float, maestro: dict[Path, str]) -> str | None:
    """'train', 'val', or None for files held out of both (MAESTRO test split)."""
    official = maestro.get(path.resolve())
    if official is not None:
        return {"train": "train", "validation": "val"}.get(official)
    digest = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if digest < val_fraction else "train"


# ----------------------------------------------------------------------------------------------------------
# Documents per file, one function per modality (run in worker processes)


def _music_documents(codec: Codec, path: Path, split: str, options: PrepareOptions) -> list[np.ndarray]:
    return [codec.encode(path)]


def _random_square_crops(image: Image.Image, count: int, rng: np.random.Generator) -> list[Image.Image]:
    width, height = image.size
    side_max = min(width, height)
    crops = []
    for _ in range(count):
        side = max(1, int(side_max * rng.uniform(0.4, 1.0)))  # several scales, down to 40% of the short side
        left = int(rng.integers(0, width - side + 1))
        top = int(rng.integers(0, height - side + 1))
        crops.append(image.crop((left, top, left + side, top + side)))
    return crops


def _image_documents(codec: Codec, path: Path, split: str, options: PrepareOptions) -> list[np.ndarray]:
    assert isinstance(codec, ImageCodec)
    centred, _ = prepare_image(path, codec.height, codec.width)
    if split == "val":
        return [codec.encode(centred)]
    with Image.open(path) as opened:
        from ..codecs.image import to_rgb

        photo = to_rgb(opened)
        photo.load()
    seed = int(hashlib.sha1(f"{options.seed}:{path.name}".encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    arrays = [centred] + [
        prepare_image(crop, codec.height, codec.width)[0]
        for crop in _random_square_crops(photo, options.crops_per_image - 1, rng)
    ]
    documents = []
    for array in arrays:
        documents.append(codec.encode(array))
        documents.append(codec.encode(np.ascontiguousarray(array[:, ::-1])))  # horizontal flip
    return documents


def clean_book(path: Path) -> str:
    return strip_gutenberg(normalise_newlines(read_text(path)))


def _text_documents(codec: Codec, path: Path, split: str, options: PrepareOptions) -> list[np.ndarray]:
    return [codec.encode(clean_book(path))]


DOCUMENT_MAKERS: dict[str, Callable[[Codec, Path, str, PrepareOptions], list[np.ndarray]]] = {
    "music": _music_documents,
    "image": _image_documents,
    "text": _text_documents,
}

_worker_codec: Codec | None = None


def _init_worker(codec_config: dict, base_dir: str | None) -> None:
    global _worker_codec
    _worker_codec = codec_from_config(codec_config, base_dir=Path(base_dir) if base_dir else None)


def _encode_file(job: tuple[str, str, str, PrepareOptions]) -> tuple[str, list[np.ndarray] | str]:
    path, split, modality, options = job
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pretty_midi warns about odd meta events in real files
            return path, DOCUMENT_MAKERS[modality](_worker_codec, Path(path), split, options)
    except (CodecError, OSError, ValueError) as error:
        return path, str(error).splitlines()[0] if str(error) else type(error).__name__


# ----------------------------------------------------------------------------------------------------------
# The whole step


def _build_codec(modality: str, options: PrepareOptions, tokenizer: Path | None) -> Codec:
    if modality == "music":
        return MusicCodec()
    if modality == "image":
        return ImageCodec(options.image_size, options.image_size)
    if tokenizer is None:
        raise ValueError("text needs a tokenizer: --tokenizer PATH, or --tokenizer-vocab N to train one here")
    return TextCodec(tokenizer)


def prepare(
    modality: str,
    inputs: list[Path],
    out_dir: Path,
    options: PrepareOptions = PrepareOptions(),
    *,
    tokenizer: Path | None = None,
    tokenizer_vocab: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> PrepareReport:
    if modality not in DOCUMENT_MAKERS:
        raise ValueError(f"unknown modality {modality!r} (choose from {', '.join(DOCUMENT_MAKERS)})")
    if not 0.0 <= options.val_fraction <= 1.0:
        raise ValueError(f"val_fraction={options.val_fraction} is outside [0, 1]")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = PrepareReport(out_dir)
    maestro = maestro_splits(inputs) if modality == "music" else {}
    jobs = []
    for path, name in find_files(inputs, modality):
        split = assign_split(path, name, options.val_fraction, maestro)
        if split is None:
            report.held_out += 1
        else:
            jobs.append((path, name, split))

    if modality == "text" and tokenizer is None and tokenizer_vocab:
        # the tokenizer sees the training split only, after the same cleaning the shards get
        corpus = out_dir / "tokenizer_corpus.txt"
        with open(corpus, "w", encoding="utf-8") as handle:
            for path, _, split in jobs:
                if split == "train":
                    try:
                        handle.write(clean_book(path) + "\n")
                    except CodecError:
                        pass
        tokenizer = out_dir / "tokenizer.model"
        train_tokenizer([corpus], tokenizer, vocab_size=tokenizer_vocab, input_sentence_size=500_000)
        corpus.unlink()
    codec = _build_codec(modality, options, tokenizer)
    codec_config = codec.config
    if tokenizer is not None and Path(tokenizer).resolve() != (out_dir / "tokenizer.model").resolve():
        import shutil

        shutil.copyfile(tokenizer, out_dir / "tokenizer.model")
    if modality == "text":
        codec_config = {**codec_config, "tokenizer": "tokenizer.model"}

    names = {str(path): (name, split) for path, name, split in jobs}
    outputs: dict[str, list[np.ndarray]] = {}
    work = [(str(path), split, modality, options) for path, _, split in jobs]
    done = 0
    if options.workers > 1:
        with ProcessPoolExecutor(
            options.workers, initializer=_init_worker, initargs=(codec_config, str(out_dir))
        ) as pool:
            results = pool.map(_encode_file, work, chunksize=4)
            for path, result in results:
                done += 1
                _collect(path, result, outputs, report)
                if on_progress:
                    on_progress(done, len(work))
    else:
        _init_worker(codec_config, str(out_dir))
        for job in work:
            path, result = _encode_file(job)
            done += 1
            _collect(path, result, outputs, report)
            if on_progress:
                on_progress(done, len(work))

    dtype = np.uint16 if codec.vocab_size <= 1 << 16 else np.uint32
    manifest_files = []
    for split in SPLITS:
        offsets, total = [0], 0
        tmp_bin = out_dir / f".{split}.bin.tmp"
        with open(tmp_bin, "wb") as handle:
            for path in sorted(p for p in outputs if names[p][1] == split):
                file_tokens = 0
                for document in outputs[path]:
                    pieces = [[codec.bos_id], document] + ([[codec.eos_id]] if codec.eos_id is not None else [])
                    array = np.concatenate([np.asarray(p, dtype=np.int64) for p in pieces]).astype(dtype)
                    handle.write(array.tobytes())
                    total += len(array)
                    file_tokens += len(array)
                    offsets.append(total)
                manifest_files.append(
                    {"file": names[path][0], "split": split, "tokens": file_tokens, "documents": len(outputs[path])}
                )
        os.replace(tmp_bin, out_dir / f"{split}.bin")
        np.save(out_dir / f"{split}.idx.npy", np.asarray(offsets, dtype=np.int64))
        report.tokens[split] = total
        report.documents[split] = len(offsets) - 1
        report.files[split] = sum(1 for p in outputs if names[p][1] == split)

    manifest = {
        "modality": modality,
        "codec": codec_config,
        "dtype": np.dtype(dtype).name,
        # images are whole fixed-length documents: training draws prefixes that start at their BOS
        "document_windows": modality == "image",
        "split_rule": "MAESTRO csv split column (test left out); otherwise sha1(name) < val_fraction -> val",
        "options": {**options.__dict__},
        "inputs": [str(p) for p in inputs],
        "counts": {
            "files": report.files,
            "tokens": report.tokens,
            "documents": report.documents,
            "held_out": report.held_out,
            "skipped": len(report.skipped),
        },
        "skipped": [{"file": f, "reason": r} for f, r in report.skipped],
        "files": manifest_files,
    }
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out_dir / MANIFEST)
    return report


def _collect(path: str, result: list[np.ndarray] | str, outputs: dict, report: PrepareReport) -> None:
    if isinstance(result, str):
        report.skipped.append((path, result))
    elif result and sum(len(d) for d in result):
        outputs[path] = result
    else:
        report.skipped.append((path, "no tokens (empty file or no notes)"))


# ----------------------------------------------------------------------------------------------------------
# Reading prepared data


class PreparedData:
    """A prepared data directory: its manifest, its codec and memory-mapped token streams per split."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{self.directory}: not a prepared data directory (no {MANIFEST}; run perceiver prepare)"
            )
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{manifest_path}: invalid JSON ({error})") from None
        self.codec = codec_from_config(self.manifest["codec"], base_dir=self.directory)
        self.dtype = np.dtype(self.manifest["dtype"])

    def tokens(self, split: str) -> np.ndarray:
        path = self.directory / f"{split}.bin"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing shard")
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r")

    def offsets(self, split: str) -> np.ndarray:
        return np.load(self.directory / f"{split}.idx.npy")

    def documents(self, split: str) -> list[np.ndarray]:
        stream, offsets = self.tokens(split), self.offsets(split)
        return [stream[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
