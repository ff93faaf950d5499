"""Classic baselines for the model cards: general-purpose compressors and count-based token models.

Each baseline is scored on the same held-out streams as `perceiver eval` and reported in the same units
(``evaluate.UNITS``): bits/event and bits/second for music, bits/byte of UTF-8 text for text, bits/dim for images.

* Compressors (gzip -9, xz -9e, bzip2 -9): the whole compressed output in bits, container headers and checksums
  included; nothing is subtracted. Music tokens (ids up to 389) do not fit a byte, so a music stream is serialised
  as uint16 little-endian, two bytes per token; text is the UTF-8 of the decoded documents; images are compressed
  one by one as PNG (Pillow optimize=True) and lossless WebP (method 6, quality 100), whole files.
* Token models are fit on the training split and score every token of each evaluation document after its first
  (BOS), as the model is scored: additive (add-1/2, Krichevsky–Trofimov) unigram, and interpolated Kneser–Ney
  (Chen & Goodman 1998, section 3, one discount per order, D = n1 / (n1 + 2 n2)) for the bigram and 5-gram,
  over 64-bit hashes of the context tuples. The lowest order interpolates with the uniform distribution, so every
  token of the vocabulary has a probability.
* Images also get a per-channel unigram: one 256-bin histogram each for R, G and B over the training images.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..codecs import Codec
from .evaluate import UNITS
from .prepare import PreparedData

LOG2 = math.log(2)
KT_ALPHA = 0.5  # additive smoothing of the unigram models (Krichevsky–Trofimov)


# ---------------------------------------------------------------------------------------------------------------
# Compressors


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip-9": lambda data: gzip.compress(data, compresslevel=9, mtime=0),
    "xz-9e": lambda data: lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME),
    "bzip2-9": lambda data: bz2.compress(data, compresslevel=9),
}


def compressor_bits(data: bytes) -> dict[str, float]:
    """Compressed size in bits of ``data`` per compressor, headers and checksums included (nothing subtracted)."""
    return {name: 8.0 * len(compress(data)) for name, compress in COMPRESSORS.items()}


def uint16_bytes(documents: Sequence[np.ndarray]) -> bytes:
    """Token documents back to back as uint16 little-endian, the serialisation the music compressors see."""
    if not documents:
        return b""
    stream = np.concatenate([np.asarray(d, dtype=np.int64) for d in documents])
    if len(stream) and (stream.min() < 0 or stream.max() >= 1 << 16):
        raise ValueError("uint16_bytes: token ids must lie in [0, 65536)")
    return stream.astype("<u2").tobytes()


def png_bits(image: np.ndarray) -> float:
    """Size in bits of an (H, W, 3) uint8 image as an optimised PNG file."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(buffer, format="PNG", optimize=True)
    return 8.0 * buffer.tell()


def webp_bits(image: np.ndarray) -> float:
    """Size in bits of an (H, W, 3) uint8 image as a lossless WebP file (slowest, strongest settings)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(
        buffer, format="WEBP", lossless=True, method=6, quality=100
    )
    return 8.0 * buffer.tell()


def channel_unigram_bits(train_pixels: np.ndarray, eval_pixels: np.ndarray) -> float:
    """Total bits of ``eval_pixels`` (..., 3) under one add-1/2 smoothed 256-bin histogram per channel."""
    train = np.asarray(train_pixels).reshape(-1, 3)
    evaluate = np.asarray(eval_pixels).reshape(-1, 3)
    total = 0.0
    for channel in range(3):
        counts = np.bincount(train[:, channel].astype(np.int64), minlength=256)[:256] + KT_ALPHA
        bits = -np.log2(counts / counts.sum())
        total += float(bits[evaluate[:, channel].astype(np.int64)].sum())
    return total


# ---------------------------------------------------------------------------------------------------------------
# Token models: fit on a training stream, score evaluation documents (each one's first token is context only)


def _targets(eval_documents: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation documents back to back, and each token's position inside its document."""
    docs = [np.asarray(d, dtype=np.int64).reshape(-1) for d in eval_documents]
    if not docs:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    stream = np.concatenate(docs)
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return stream, np.arange(len(stream), dtype=np.int64) - starts


def _check_tokens(tokens: np.ndarray, vocab_size: int, what: str) -> None:
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"{what}: token ids must lie in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}]")


def unigram_bits(train_tokens: np.ndarray, eval_documents: Sequence[np.ndarray], vocab_size: int) -> float:
    """Total bits of the evaluation documents (after each first token) under an add-1/2 unigram of the train split."""
    train = np.asarray(train_tokens, dtype=np.int64).reshape(-1)
    stream, position = _targets(eval_documents)
    _check_tokens(train, vocab_size, "unigram_bits train_tokens")
    _check_tokens(stream, vocab_size, "unigram_bits eval_documents")
    counts = np.bincount(train, minlength=vocab_size) + KT_ALPHA
    bits = -np.log2(counts / counts.sum())
    return float(bits[stream[position >= 1]].sum())


# 64-bit hashes of token windows: h(t_1..t_k) = mix(h(t_1..t_{k-1}) * P + t_k + 1), with mix the splitmix64
# finaliser (a bijection of uint64). Each order has its own table, so only windows of one length can collide;
# with n distinct windows that happens with probability about n^2 / 2^65 (1e-6 for 5M).
_P = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def _extend(previous: np.ndarray | None, tokens: np.ndarray) -> np.ndarray:
    """Hashes of the windows ending at each position, one token longer than those in ``previous``.

    ``previous[i]`` hashes the k-1 tokens ending at i (None for k = 1); entries whose window would start before
    position 0 hold garbage and must be masked by the caller.
    """
    with np.errstate(over="ignore"):
        symbols = tokens.astype(np.uint64) + np.uint64(1)
        if previous is None:
            return _mix(symbols)
        out = np.zeros(len(tokens), dtype=np.uint64)
        out[1:] = _mix(previous[:-1] * _P + symbols[1:])
        return out


@dataclass
class _OrderTable:
    """Kneser–Ney statistics of one order: per k-gram count, per context total and number of distinct follow-ups."""

    gram_keys: np.ndarray
    gram_counts: np.ndarray
    context_keys: np.ndarray
    context_totals: np.ndarray
    context_types: np.ndarray
    discount: float


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """values[key == query], 0 where the query is not a key (``keys`` sorted)."""
    if len(keys) == 0:
        return np.zeros(len(query), dtype=values.dtype)
    index = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return np.where(keys[index] == query, values[index], 0)


def _discount(counts: np.ndarray) -> float:
    """D = n1 / (n1 + 2 n2), kept inside [0.05, 0.95] so that every order leaves mass for the lower one."""
    n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
    return 0.5 if n1 + 2 * n2 == 0 else min(0.95, max(0.05, n1 / (n1 + 2 * n2)))


def _order_table(grams: np.ndarray, contexts: np.ndarray, counts: np.ndarray) -> _OrderTable:
    """Group distinct k-grams (hash, context hash, count) by context."""
    context_keys, inverse = np.unique(contexts, return_inverse=True)
    order = np.argsort(grams)
    return _OrderTable(
        gram_keys=grams[order],
        gram_counts=counts[order],
        context_keys=context_keys,
        context_totals=np.bincount(inverse, weights=counts, minlength=len(context_keys)),
        context_types=np.bincount(inverse, minlength=len(context_keys)).astype(np.float64),
        discount=_discount(counts),
    )


def _fit_kneser_ney(train: np.ndarray, order: int) -> list[_OrderTable]:
    """Tables for orders 1 … order: raw counts at the top order, continuation counts N1+(• g) below it."""
    # hashes[k]: windows of length k ending at each position, made one order ahead and dropped when done
    hashes: dict[int, np.ndarray | None] = {0: None, 1: _extend(None, train)}
    tables = []
    for k in range(1, order + 1):
        if k == order:
            # distinct k-grams with their raw counts, located at their first occurrence
            _, first, counts = np.unique(hashes[k][k - 1 :], return_index=True, return_counts=True)
            at = first + k - 1
        else:
            # distinct (k+1)-grams, then the k-grams they end with: a k-gram's count is its number of left extensions
            hashes[k + 1] = _extend(hashes[k], train)
            _, first = np.unique(hashes[k + 1][k:], return_index=True)
            _, suffix_first, counts = np.unique(hashes[k][first + k], return_index=True, return_counts=True)
            at = first[suffix_first] + k
        grams = hashes[k][at]
        contexts = hashes[k - 1][at - 1] if k > 1 else np.zeros(len(at), dtype=np.uint64)
        tables.append(_order_table(grams, contexts, counts.astype(np.float64)))
        del hashes[k - 1]
    return tables


def _kneser_ney_bits(tables: list[_OrderTable], eval_documents: Sequence[np.ndarray], vocab_size: int) -> float:
    stream, position = _targets(eval_documents)
    target = position >= 1
    probability = np.full(len(stream), 1.0 / vocab_size)
    previous = None
    for k, table in enumerate(tables, start=1):
        grams = _extend(previous, stream)
        contexts = previous if k > 1 else np.zeros(len(stream), dtype=np.uint64)
        context_hash = np.zeros(len(stream), dtype=np.uint64)
        context_hash[1:] = contexts[:-1] if k > 1 else 0
        usable = target & (position >= k - 1)
        count = _lookup(table.gram_keys, table.gram_counts, grams)
        total = np.where(usable, _lookup(table.context_keys, table.context_totals, context_hash), 0.0)
        types = _lookup(table.context_keys, table.context_types, context_hash)
        seen = total > 0
        d = table.discount
        safe_total = np.where(seen, total, 1.0)
        interpolated = (np.maximum(count - d, 0.0) + d * types * probability) / safe_total
        probability = np.where(seen, interpolated, probability)  # an unseen context backs off entirely
        previous = grams
    return float(-np.log2(probability[target]).sum())


def ngram_bits(
    train_tokens: np.ndarray, eval_documents: Sequence[np.ndarray], order: int = 5, vocab_size: int | None = None
) -> float:
    """Total bits of the evaluation documents (after each first token) under an interpolated Kneser–Ney n-gram.

    The model is fit on ``train_tokens`` (one stream; windows may cross document boundaries there); evaluation
    contexts never reach before the start of their document, so a document's first tokens use lower orders.
    """
    if order < 1:
        raise ValueError(f"ngram_bits: order={order} must be >= 1")
    train = np.asarray(train_tokens, dtype=np.int64).reshape(-1)
    stream, _ = _targets(eval_documents)
    if vocab_size is None:
        vocab_size = int(max(train.max(initial=0), stream.max(initial=0))) + 1
    _check_tokens(train, vocab_size, "ngram_bits train_tokens")
    _check_tokens(stream, vocab_size, "ngram_bits eval_documents")
    return _kneser_ney_bits(_fit_kneser_ney(train, order), eval_documents, vocab_size)


def bigram_bits(train_tokens: np.ndarray, eval_documents: Sequence[np.ndarray], vocab_size: int) -> float:
    """``ngram_bits`` with order 2 (interpolated Kneser–Ney bigram)."""
    return ngram_bits(train_tokens, eval_documents, order=2, vocab_size=vocab_size)


# ---------------------------------------------------------------------------------------------------------------
# The table per modality


@dataclass
class _Streams:
    """What the baselines of one prepared directory read (the training stream is read once, on first use)."""

    prepared: PreparedData
    documents: list[np.ndarray]
    train_split: str
    max_train_tokens: int | None
    train_data: PreparedData | None = None  # where the fitted baselines learn (default: `prepared` itself)
    _train: np.ndarray | None = field(default=None, repr=False)

    @property
    def codec(self) -> Codec:
        return self.prepared.codec

    @property
    def train(self) -> np.ndarray:
        if self._train is None:
            stream = (self.train_data or self.prepared).tokens(self.train_split)
            if self.max_train_tokens is not None:
                stream = stream[: self.max_train_tokens]
            self._train = np.asarray(stream, dtype=np.int64)
        return self._train

    def images(self, documents: Sequence[np.ndarray]) -> np.ndarray:
        """Documents as (N, H, W, 3) uint8 images (the BOS dropped)."""
        codec = self.codec
        shape = (codec.height, codec.width, 3)
        pixels = [np.asarray(d, dtype=np.int64) for d in documents]
        pixels = [p[~np.isin(p, list(codec.special_ids))] for p in pixels]
        return (
            np.stack([p.reshape(shape) for p in pixels]).astype(np.uint8)
            if pixels
            else np.zeros((0, *shape), np.uint8)
        )


Result = dict[str, tuple[float, str]]  # baseline name -> (total bits, what it is)


def _token_models(s: _Streams, names: Sequence[str]) -> Result:
    v = s.codec.vocab_size
    models = {
        "unigram": (lambda: unigram_bits(s.train, s.documents, v), "add-1/2 unigram over tokens, fit on train"),
        "bigram": (lambda: bigram_bits(s.train, s.documents, v), "interpolated Kneser-Ney bigram, fit on train"),
        "5-gram": (lambda: ngram_bits(s.train, s.documents, 5, v), "interpolated Kneser-Ney 5-gram, fit on train"),
    }
    return {name: (models[name][0](), models[name][1]) for name in names}


def _music_compressors(s: _Streams) -> Result:
    bits = compressor_bits(uint16_bytes(s.documents))
    return {name: (b, f"{name} of the token documents as uint16 little-endian") for name, b in bits.items()}


def _text_compressors(s: _Streams) -> Result:
    data = "".join(s.codec.decode(d) for d in s.documents).encode("utf-8")
    return {name: (b, f"{name} of the decoded documents' UTF-8 text") for name, b in compressor_bits(data).items()}


def _image_files(s: _Streams) -> Result:
    images = s.images(s.documents)
    return {
        "png": (sum(png_bits(i) for i in images), "PNG (Pillow optimize=True) file per image"),
        "webp": (sum(webp_bits(i) for i in images), "lossless WebP (method=6, quality=100) file per image"),
    }


def _channel_unigram(s: _Streams) -> Result:
    train = s.train[~np.isin(s.train, list(s.codec.special_ids))]
    train = train[: len(train) // 3 * 3]
    bits = channel_unigram_bits(train.reshape(-1, 3), s.images(s.documents))
    return {"channel_unigram": (bits, "add-1/2 256-bin histogram per R/G/B channel, fit on train images")}


BASELINES: dict[str, tuple[Callable[[_Streams], Result], ...]] = {
    "music": (lambda s: _token_models(s, ("unigram", "bigram", "5-gram")), _music_compressors),
    "text": (_text_compressors, lambda s: _token_models(s, ("5-gram",))),
    "image": (_image_files, _channel_unigram),
}


def baseline_table(
    prepared: PreparedData,
    split: str = "val",
    train_split: str = "train",
    max_train_tokens: int | None = 10_000_000,
    max_documents: int | None = None,
    *,
    max_document_tokens: int | None = None,
    train_data: PreparedData | None = None,
) -> dict[str, dict]:
    """name -> {"bits": total, "per_unit": {unit: bits per unit}, "about": ...} for the modality's baselines.

    ``split`` is scored (its first ``max_documents`` documents, as ``perceiver eval --max-documents``); token
    models and the channel histograms are fit on the first ``max_train_tokens`` tokens of ``train_split``. Units
    are those of ``perceiver eval``: bits/event and bits/second, bits/byte, bits/dim.
    """
    modality = prepared.codec.name
    if modality not in BASELINES:
        raise ValueError(f"no baselines for codec {modality!r} (known: {', '.join(BASELINES)})")
    documents = [np.asarray(d, dtype=np.int64) for d in prepared.documents(split)][:max_documents]
    if max_document_tokens:  # as perceiver eval --max-document-tokens: each document's first tokens
        documents = [d[:max_document_tokens] for d in documents]
    documents = [d for d in documents if len(d) >= 2]  # as perceiver eval: a document needs one target
    if not documents:
        raise ValueError(f"{prepared.directory}: split {split!r} has no documents to score")
    units: dict[str, float] = {}
    for document in documents:
        for unit, count in UNITS[modality](prepared.codec, document).items():
            units[unit] = units.get(unit, 0.0) + count
    streams = _Streams(prepared, documents, train_split, max_train_tokens, train_data or prepared)
    table = {}
    for group in BASELINES[modality]:
        for name, (bits, about) in group(streams).items():
            per_unit = {unit: bits / count if count else None for unit, count in units.items()}
            table[name] = {"bits": bits, "per_unit": per_unit, "about": about}
    return table
