"""`perceiver eval`: held-out negative log-likelihood in bits, per token and in each modality's own unit.

Every token of a document after its BOS is scored exactly once. Perceiver AR gives logits only at its n latent
positions, so a document is scored in strides of n: the stride ending at position e is predicted by a
forward over inputs [max(0, e - M), e) with n latents. Each token thus sees between M - n + 1 and M tokens of
context once the document is long (the standard strided sliding-window evaluation, stride = n).

Units (a table per codec, not an if/elif chain): bits/dim for images (one dim = one subpixel), bits/byte of the
UTF-8 text for text, bits/event and bits/second for music.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..codecs import Codec
from ..codecs.music import duration_seconds
from ..device import autocast
from ..model import PerceiverAR, token_losses


@torch.no_grad()
def score_document(
    model: PerceiverAR,
    document: np.ndarray,
    *,
    num_latents: int | None = None,
    device=None,
    dtype=torch.float32,
    max_context: int | None = None,
) -> np.ndarray:
    """Bits for each of document[1:], predicted from everything before it (within the context)."""
    model.eval()
    device = device or next(model.parameters()).device
    tokens = torch.as_tensor(np.asarray(document, dtype=np.int64), device=device)[None]
    length = tokens.shape[1]
    context = min(max_context or model.config.max_context, model.config.max_context)
    n = min(num_latents or model.config.num_latents, context)
    bits = np.zeros(length - 1, dtype=np.float64)
    position = 0  # targets scored so far; the next stride scores targets (position, stride_end]
    while position < length - 1:
        stride_end = min(position + n, length - 1)
        start = max(0, stride_end - context)
        inputs = tokens[:, start:stride_end]
        latents = stride_end - position  # score exactly the targets (position, stride_end]
        with autocast(device, dtype):
            logits = model(inputs, num_latents=latents, position_offset=start)
        targets = tokens[0, position + 1 : stride_end + 1]
        nats = token_losses(logits[0], targets)
        bits[position:stride_end] = (nats / math.log(2)).cpu().numpy()
        position = stride_end
    return bits


def _music_units(codec: Codec, content: np.ndarray) -> dict[str, float]:
    return {
        "event": float(np.isin(content, list(codec.special_ids), invert=True).sum()),
        "second": duration_seconds(content, codec),
    }


def _image_units(codec: Codec, content: np.ndarray) -> dict[str, float]:
    return {"dim": float(np.isin(content, list(codec.special_ids), invert=True).sum())}


def _text_units(codec: Codec, content: np.ndarray) -> dict[str, float]:
    return {"byte": float(len(codec.decode(content).encode("utf-8")))}


UNITS: dict[str, Callable[[Codec, np.ndarray], dict[str, float]]] = {
    "music": _music_units,
    "image": _image_units,
    "text": _text_units,
}


@dataclass
class EvalResult:
    documents: int = 0
    tokens: int = 0
    bits: float = 0.0
    units: dict[str, float] = field(default_factory=dict)  # unit -> count

    @property
    def bits_per_token(self) -> float:
        return self.bits / max(1, self.tokens)

    def summary(self) -> dict:
        out = {"documents": self.documents, "tokens": self.tokens, "bits_per_token": self.bits_per_token}
        for unit, count in self.units.items():
            out[f"bits_per_{unit}"] = self.bits / count if count else None
            out[f"{unit}s"] = count
        return out


def evaluate_documents(
    model: PerceiverAR,
    codec: Codec,
    documents: list[np.ndarray],
    *,
    num_latents: int | None = None,
    device=None,
    dtype=torch.float32,
    max_context: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Documents are [BOS] + content (+ EOS), as prepared shards store them."""
    result = EvalResult()
    units = UNITS[codec.name]
    # One autocast context around every window (score_document's own nest inside it): autocast keeps the bf16
    # copies of the weights it makes until its outermost context ends, so they are made once, not per window
    # (perceiver eval --dtype bf16 of text-v1 over 16 books: BENCHMARKS.md "Stop 33").
    with autocast(device or next(model.parameters()).device, dtype):
        for index, document in enumerate(documents):
            document = np.asarray(document, dtype=np.int64)
            if len(document) < 2:
                continue
            bits = score_document(
                model, document, num_latents=num_latents, device=device, dtype=dtype, max_context=max_context
            )
            result.documents += 1
            result.tokens += len(bits)
            result.bits += float(bits.sum())
            for unit, count in units(codec, document).items():
                result.units[unit] = result.units.get(unit, 0.0) + count
            if on_progress:
                on_progress(index + 1, len(documents))
    return result
