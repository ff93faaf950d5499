"""`perceiver bench --step-weights -c CHECKPOINT --data PREPARED`: what the decode step weights cost and give.

`generate` runs a CPU's cached steps on bf16 copies of the weights when it makes one sample
(`generate.step_weights_dtype`). This measures, on held-out documents of a prepared data directory, both sides:
the bits/token of a known continuation scored by the very path that samples (teacher-forced cached decoding:
a prompt, then every later token fed in and scored from the step's logits), and the tokens/s of those steps,
once with the model's own fp32 weights (exact), once with the step weights, and (where the fused C step runs)
with bf16 key/value caches as well, and with the prefill and refills in bf16 autocast too (as `auto` decodes
where bf16 is fast); and as `--dtype int8` decodes one sample (C step only): int8 step weights with bf16
caches, and with int8 caches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import cpu_decode
from ..checkpoint import load_checkpoint
from ..device import cpu_has_fast_bf16
from ..generate import SamplingOptions, generate_stream, step_model
from ..train.prepare import PreparedData


@torch.no_grad()
def forced_decode(
    model,
    document: torch.Tensor,
    prompt_length: int,
    stepper,
    cache_dtype: torch.dtype | None = None,
    refill_dtype: torch.dtype | None = None,
) -> tuple[float, int, float]:
    """(bits, tokens scored, seconds) for document[prompt_length:] given document[:prompt_length]."""
    prompt, continuation = document[None, :prompt_length], document[None, prompt_length:]
    bits, start = 0.0, time.perf_counter()
    stream = generate_stream(
        model,
        prompt,
        continuation.shape[1],
        SamplingOptions(temperature=0),
        stepper=stepper,
        forced_tokens=continuation,
        cache_dtype=cache_dtype,
        refill_dtype=refill_dtype,
    )
    for index, step in enumerate(stream):
        bits += F.cross_entropy(step.logits, continuation[:, index]).item() / math.log(2)
    return bits, continuation.shape[1], time.perf_counter() - start


def run(
    checkpoint: str,
    data: Path,
    *,
    documents: int = 4,
    prompt: int = 2048,
    tokens: int = 512,
    threads: int = 2,
    log: Callable[[str], None] = print,
) -> dict:
    torch.set_num_threads(threads)
    model = load_checkpoint(checkpoint).model.eval()
    prepared = PreparedData(data)
    chosen = []
    for document in prepared.documents("val"):
        # a prompt of at most `prompt` tokens (half the document if shorter), then up to `tokens` scored tokens
        length = min(len(document) // 2, prompt)
        if length >= 1 and len(document) > length:
            chosen.append((torch.as_tensor(document[: length + tokens].astype("int64")), length))
        if len(chosen) == documents:
            break
    if not chosen:
        raise ValueError(f"{data}: no validation documents")
    rows = []
    bf16_weights = step_model(model, torch.bfloat16)
    int8_weights = step_model(model, torch.int8) if cpu_decode.supports_int8(model) else None
    bf16 = torch.bfloat16
    auto_refills = bf16 if cpu_has_fast_bf16() else None  # generate.auto_decode_dtypes
    for label, stepper, cache_dtype, refill_dtype in (
        ("fp32 (exact)", None, None, None),
        ("bf16 step weights", bf16_weights, None, None),
        ("bf16 step weights, bf16 caches", bf16_weights, bf16, None),
        ("bf16 step weights, bf16 caches, bf16 refills", bf16_weights, bf16, bf16),
        ("int8 step weights, bf16 caches, auto refills", int8_weights, bf16, auto_refills),
        ("int8 step weights, int8 caches, auto refills", int8_weights, torch.int8, auto_refills),
    ):
        if cache_dtype is not None and not cpu_decode.available() or "int8" in label and int8_weights is None:
            continue  # only the fused C step reads bf16 caches and int8 weights
        if refill_dtype is not None and not cpu_has_fast_bf16() and "int8" not in label:
            continue  # bf16 refills only where bf16 matmuls are fast (generate.auto_decode_dtypes)
        bits = scored = seconds = 0.0
        for document, prompt_length in chosen:
            b, n, s = forced_decode(model, document, prompt_length, stepper, cache_dtype, refill_dtype)
            bits, scored, seconds = bits + b, scored + n, seconds + s
        rows.append({"weights": label, "bits_per_token": bits / scored, "tokens_per_s": scored / seconds})
        log(f"{label}: {rows[-1]['bits_per_token']:.5f} bits/token, {rows[-1]['tokens_per_s']:.1f} tokens/s")
    change = {row["weights"]: row["bits_per_token"] - rows[0]["bits_per_token"] for row in rows}
    changes = {  # each later row's change against the exact one, where it ran
        "bits_change_bf16_caches": "bf16 step weights, bf16 caches",
        "bits_change_bf16_refills": "bf16 step weights, bf16 caches, bf16 refills",
        "bits_change_int8_weights": "int8 step weights, bf16 caches, auto refills",
        "bits_change_int8": "int8 step weights, int8 caches, auto refills",
    }
    return {
        "checkpoint": checkpoint,
        "documents": len(chosen),
        "scored_tokens": int(scored),
        "rows": rows,
        "bits_change": rows[1]["bits_per_token"] - rows[0]["bits_per_token"],
        "speedup": rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"],
    } | {key: change[label] for key, label in changes.items() if label in change}
