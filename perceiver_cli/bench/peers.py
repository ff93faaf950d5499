"""Other Perceiver AR implementations, built with the bench config of core.py, for `perceiver bench --peers`.

- krasserm/perceiver-io 0.11.0 (`perceiver.model.core.CausalSequenceModel`): rotary positions, a key/value
  cache for decoding, prefix dropout ("cross_attention_dropout"). Its wheel declares Python < 3.11 and pulls in
  Lightning and more; only its model classes are used here, so install it without its dependencies:
      pip install --no-deps --ignore-requires-python perceiver-io==0.11.0
      pip install 'einops>=0.4,<0.5' 'fairscale>=0.4,<0.5'
- lucidrains/perceiver-ar-pytorch 0.0.10 (`perceiver_ar_pytorch.PerceiverAR`): learned absolute + rotary
  positions, no cache (its decoding re-runs the whole window per token).

Both get the same width (512), heads (8), latent layers (8), N = 1,024 latents, vocabulary and MLP ratio as
ours, and no prefix dropout unless the case asks for it. Their logits cover the same N latent positions.
"""

from __future__ import annotations

import torch

from .core import D_MODEL, HEADS, LATENT_LAYERS, LATENTS, VOCAB, plot_time_and_memory

PEERS = ("krasserm", "lucidrains")
INSTALL_HINT = (
    "pip install --no-deps --ignore-requires-python perceiver-io==0.11.0 && "
    "pip install 'einops>=0.4,<0.5' 'fairscale>=0.4,<0.5' perceiver-ar-pytorch==0.0.10"
)


def available(impl: str) -> bool:
    try:
        if impl == "krasserm":
            import perceiver.model.core  # noqa: F401
        else:
            import perceiver_ar_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


class Krasserm(torch.nn.Module):
    """krasserm's CausalSequenceModel behind our calling convention: tokens (B, T) -> logits (B, N, V)."""

    def __init__(self, context: int, prefix_dropout: float = 0.0, extra_positions: int = 0):
        super().__init__()
        from perceiver.model.core import CausalSequenceModel, CausalSequenceModelConfig

        config = CausalSequenceModelConfig(
            vocab_size=VOCAB,
            max_seq_len=max(context, LATENTS + 1) + extra_positions,
            max_latents=LATENTS,
            num_channels=D_MODEL,
            num_heads=HEADS,
            num_self_attention_layers=LATENT_LAYERS,
            cross_attention_dropout=prefix_dropout,
            abs_pos_emb=False,  # rotary only, as ours
            output_bias=False,
        )
        self.model = CausalSequenceModel(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, prefix_len=max(0, tokens.shape[1] - LATENTS)).logits

    @torch.no_grad()
    def decode(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy cached decoding the way its Hugging Face wrapper does it: once N latents are reached the prefix
        grows by one per token and the oldest self-attention cache row is dropped."""
        prefix_len = max(0, prompt.shape[1] - LATENTS)
        output = self.model(prompt, prefix_len=prefix_len, kv_cache=[])
        cache, token = output.kv_cache, output.logits[:, -1:].argmax(-1)
        out = [token]
        for _ in range(new_tokens - 1):
            prefix_len += 1
            cross, *latent = cache
            latent = [(k[:, -(LATENTS - 1) :], v[:, -(LATENTS - 1) :]) for k, v in latent]
            output = self.model(token, prefix_len=prefix_len, kv_cache=[cross, *latent])
            cache, token = output.kv_cache, output.logits[:, -1:].argmax(-1)
            out.append(token)
        return torch.cat(out, dim=1)


class Lucidrains(torch.nn.Module):
    """lucidrains' PerceiverAR: its prefix length is fixed at construction (T - N), as its API requires."""

    def __init__(self, context: int, prefix_dropout: float = 0.0):
        super().__init__()
        from perceiver_ar_pytorch import PerceiverAR

        self.model = PerceiverAR(
            num_tokens=VOCAB,
            dim=D_MODEL,
            depth=LATENT_LAYERS,
            max_seq_len=context,
            cross_attn_seq_len=context - LATENTS,
            dim_head=D_MODEL // HEADS,
            heads=HEADS,
            cross_attn_dropout=prefix_dropout,
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)


def build(impl: str, context: int, prefix_dropout: float = 0.0, extra_positions: int = 0) -> torch.nn.Module:
    if not available(impl):
        raise ImportError(f"{impl} is not installed ({INSTALL_HINT})")
    if impl == "krasserm":
        return Krasserm(context, prefix_dropout, extra_positions)
    return Lucidrains(context, prefix_dropout)


IMPLS = ("perceiver", "krasserm", "lucidrains", "transformer")
NAMES = {"perceiver": "ours", "krasserm": "krasserm", "lucidrains": "lucidrains", "transformer": "Transformer"}


def peer_cases(dtype: str = "fp32", threads: int = 2, quick: bool = False, impls=IMPLS) -> list[dict]:
    """The rows of issue #9, for every implementation: prefill, cached decode, training step."""
    base = {"dtype": dtype, "threads": threads}
    prefill = [2048, 4096] if quick else [2048, 4096, 16384]  # 2,048: every model needs a non-empty prefix
    train = [4096] if quick else [4096, 16384]
    cases = []
    for impl in impls:
        cases += [{**base, "kind": "prefill", "impl": impl, "context": t} for t in prefill]
        if impl in ("perceiver", "krasserm", "transformer"):  # lucidrains has no cache
            new = 32 if quick else 256
            cases.append(
                {**base, "kind": "decode", "impl": impl, "context": 4096, "cached": True, "new_tokens": new}
            )
        cases += [
            {**base, "kind": "train", "impl": impl, "context": t, "repeats": 1 if t > 4096 else 2} for t in train
        ]
    return cases


def _value(results: list[dict], impl: str, kind: str, context: int, key: str) -> float | None:
    for r in results:
        if r["impl"] == impl and r["kind"] == kind and r["context"] == context and key in r:
            return r[key]
    return None


def summarise_peers(results: list[dict]) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, ratio lines) for the side-by-side table."""
    impls = [i for i in IMPLS if any(r["impl"] == i for r in results)]
    header = ["measurement", *[NAMES[i] for i in impls]]
    rows = []
    measurements = sorted(
        {(r["kind"], r["context"]) for r in results},
        key=lambda m: (["prefill", "decode", "train"].index(m[0]), m[1]),
    )
    for kind, context in measurements:
        key, unit = {"prefill": ("seconds", "s"), "decode": ("tokens_per_s", "tok/s"), "train": ("seconds", "s")}[
            kind
        ]
        label = {
            "prefill": f"prefill T={context:,}",
            "decode": f"cached decode after {context:,}",
            "train": f"train step T={context:,}",
        }[kind]
        cells, memory = [], []
        for impl in impls:
            value = _value(results, impl, kind, context, key)
            error = next(
                (
                    r["error"]
                    for r in results
                    if r["impl"] == impl and r["kind"] == kind and r["context"] == context and "error" in r
                ),
                None,
            )
            cells.append(f"{value:.3g} {unit}" if value is not None else ("failed" if error else "-"))
            rss = _value(results, impl, kind, context, "peak_rss_mib")
            memory.append(f"{rss / 1024:.2f} GiB" if rss is not None else "-")
        rows.append([label, *cells])
        rows.append(["  peak memory", *memory])
    ratios = []

    def ratio(kind, context, key, peer, faster_when_lower=True):
        ours, theirs = _value(results, "perceiver", kind, context, key), _value(results, peer, kind, context, key)
        if ours is None or theirs is None:
            return None
        return theirs / ours if faster_when_lower else ours / theirs

    for peer in ("krasserm", "lucidrains", "transformer"):
        if peer not in impls:
            continue
        for context in sorted({r["context"] for r in results if r["kind"] == "prefill"}):
            value = ratio("prefill", context, "seconds", peer)
            if value:
                ratios.append(
                    f"prefill {context:,}: ours {value:.2f}x faster than {NAMES[peer]}"
                    + (" (target >= 2x)" if context == 16384 and peer != "transformer" else "")
                )
        value = ratio("decode", 4096, "tokens_per_s", peer, faster_when_lower=False)
        if value:
            ratios.append(
                f"cached decode: ours {value:.2f}x the tokens/s of {NAMES[peer]}"
                + (" (target >= 2x)" if peer == "krasserm" else "")
            )
        for context in sorted({r["context"] for r in results if r["kind"] == "train"}):
            value = ratio("train", context, "seconds", peer)
            memory = ratio("train", context, "peak_rss_mib", peer)
            if value:
                ratios.append(
                    f"train {context:,}: ours {value:.2f}x faster than {NAMES[peer]}, {memory:.2f}x less peak memory"
                    + (" (target >= 1.5x, memory <= theirs)" if context == 16384 and peer == "krasserm" else "")
                )
    return header, rows, ratios


def plot_peers(results: list[dict], path) -> None:
    """Time and peak memory of prefill against context for every implementation (two PNGs)."""

    def series(key: str, scale: float) -> dict:
        out = {}
        for impl in IMPLS:
            points = sorted(
                (r["context"], r[key] / scale)
                for r in results
                if r["impl"] == impl and r["kind"] == "prefill" and key in r and "seconds" in r
            )
            if points:
                out[NAMES[impl]] = ([p[0] for p in points], [p[1] for p in points])
        return out

    plot_time_and_memory(series, path, "prefill (s)", "prefill, batch 1")
