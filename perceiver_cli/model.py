"""The Perceiver AR model: one causal cross-attention onto N latents, then a stack of latent self-attention.

Based on Hawthorne et al. 2022, "General-purpose, long-context autoregressive modeling with Perceiver AR"
(arXiv:2202.07765), sections 3.1-3.3: the latents are the last N input positions, the cross-attention is
causally masked so that the latent at position p sees only inputs <= p, and prefix dropout removes input
positions from the cross-attention during training. Positions are rotary (Su et al. 2021) on a fraction of
each head's dimensions, as in the official code.

Read top to bottom: config, rotary helpers, attention, the two block kinds, the model, the loss.
This module has no I/O, no sampling and no modality code; cached decoding lives in generate.py and uses
the same pieces the forward pass uses, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_attention, cpu_linear, cpu_loss


@dataclass
class PerceiverARConfig:
    vocab_size: int
    max_context: int = 4096  # M: the longest input the model attends to
    num_latents: int = 512  # N: latents used in training (and by default at inference)
    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 8  # latent self-attention layers after the one cross-attention
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    prefix_dropout: float = 0.0  # fraction of prefix positions removed from cross-attention in training
    rotary_fraction: float = 0.5  # fraction of each head's dimensions that carry rotary position
    rotary_base: float = 10_000.0
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        checks = [
            ("vocab_size", self.vocab_size, 2, 1 << 20),
            ("max_context", self.max_context, 1, 1 << 24),
            ("num_latents", self.num_latents, 1, self.max_context),
            ("d_model", self.d_model, 8, 1 << 16),
            ("num_heads", self.num_heads, 1, self.d_model),
            ("num_layers", self.num_layers, 0, 1024),
        ]
        for name, value, low, high in checks:
            if not low <= value <= high:
                raise ValueError(f"{name}={value} is outside [{low}, {high}]")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        if not 0.0 <= self.prefix_dropout < 1.0:
            raise ValueError(f"prefix_dropout={self.prefix_dropout} is outside [0, 1)")
        if not 0.0 <= self.rotary_fraction <= 1.0:
            raise ValueError(f"rotary_fraction={self.rotary_fraction} is outside [0, 1]")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def rotary_dim(self) -> int:
        # an even number of rotated dimensions per head (rotation acts on pairs)
        return int(self.head_dim * self.rotary_fraction) // 2 * 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> PerceiverARConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown PerceiverARConfig fields: {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> PerceiverARConfig:
        return cls.from_dict(json.loads(text))


# ----------------------------------------------------------------------------------------------------------
# Rotary position encoding


def rotary_tables(positions: Tensor, rotary_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin for absolute `positions` (any shape P), each of shape (*P, rotary_dim // 2).

    Angles are computed in float64: cached decoding rotates each key once at its absolute position, possibly
    far beyond the training length, and float32 angles at position ~1e5 would be off by ~1e-2 radians.
    """
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=positions.device) / rotary_dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first 2 * cos.shape[-1] dims of x (B, H, T, Dh) in half-split pairs; cos/sin (B|1, T, R/2)."""
    half = cos.shape[-1]
    if half == 0:
        return x
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B|1, 1, T, R/2) broadcast over heads
    # split, not three slices: its backward is one cat, where each slice's would zero a tensor of x's size
    x1, x2, rest = x.split((half, half, x.shape[-1] - 2 * half), dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


def rotate_projection(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """apply_rotary for a projection's fresh output, which nothing else holds. On CPUs with our kernels it is one
    pass of C (cpu_attention.py): in place in inference (9.0 -> 0.8 ms for the keys of a 16k prefill, where
    apply_rotary's ops and cat each pass over memory), and a pass each way in training."""
    if cos.shape[-1] and cpu_attention.rotates(x):
        if torch.is_grad_enabled() and x.requires_grad:
            return cpu_attention.trainable_rotary(x, cos, sin)
        return cpu_attention.rotary_in_place(x, cos, sin)
    return apply_rotary(x, cos, sin)


# ----------------------------------------------------------------------------------------------------------
# Attention


def _cpu_flash_with_lse(q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> tuple[Tensor, Tensor]:
    # the CPU kernel assumes unit stride along the head dimension (generate.DecodeState's cross-attention cache
    # is stored transposed)
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=is_causal)[:2]
    return out, lse  # (B, H, n, Dh), (B, H, n)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """Attention where query i of n sees keys [0, Tk - n + i]: queries are the *last* n key positions.

    This is the bottom-right causal alignment Perceiver AR needs (SDPA's is_causal is top-left when n != Tk).
    The (n, Tk) boolean mask is only built when needed; no (Tk, Tk) tensor ever exists.
    """
    n, num_keys = q.shape[-2], k.shape[-2]
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if n > 1 and dropout_p == 0.0 and cpu_attention.supports(q, k, v, training=needs_grad):
        # A CPU with AVX512-BF16: our kernels take the bottom-right mask directly and are ~2x PyTorch's in bf16,
        # forward and backward, and faster in fp32 inference (cpu_attention.py; BENCHMARKS.md "bf16 prefill on
        # the CPU", "bf16 training attention", "fp32 attention"). torch.compile traces PyTorch's kernels instead.
        if needs_grad and not torch.compiler.is_compiling():
            return cpu_attention.trainable_attention(q, k, v, causal=True)
        if not needs_grad:
            return cpu_attention.attention(q, k, v, causal=True)
    if n == num_keys:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    if n == 1 and q.device.type == "cpu" and not needs_grad and dropout_p == 0.0:
        # A cached decoding step: one query per row reads its whole cache once. Two batched matmuls read it
        # faster than the CPU flash kernel, built for blocks of queries (16 rows over 4,100 cached keys on a
        # Zen 4: 8.9 vs 12.4 ms), the more so from the transposed cross-attention cache of generate.DecodeState. See
        # BENCHMARKS.md "Decode per-token overhead".
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
        return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)  # bf16: fp32 sums
    if n == 1:  # the newest position sees everything
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    num_prefix = num_keys - n
    if q.device.type == "cpu" and not needs_grad and dropout_p == 0.0 and q.dtype == k.dtype == v.dtype:
        # Inference on CPU: the prefix needs no mask and the latent block is square-causal, so run two flash
        # kernels and merge them by their log-sum-exp. About 2x faster than the masked kernel at 16k.
        out_prefix, lse_prefix = _cpu_flash_with_lse(q, k[..., :num_prefix, :], v[..., :num_prefix, :], False)
        out_latent, lse_latent = _cpu_flash_with_lse(q, k[..., num_prefix:, :], v[..., num_prefix:, :], True)
        lse_max = torch.maximum(lse_prefix, lse_latent)
        w_prefix, w_latent = (lse_prefix - lse_max).exp(), (lse_latent - lse_max).exp()  # (B, H, n)
        mixed = out_prefix * w_prefix[..., None] + out_latent * w_latent[..., None]
        return (mixed / (w_prefix + w_latent)[..., None]).to(q.dtype)
    if q.device.type == "cuda":
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(n, num_keys)  # dispatches to flash/mem-efficient kernels without a mask tensor
    else:
        row = torch.arange(n, device=q.device)[:, None]
        mask = torch.arange(num_keys, device=q.device)[None, :] <= row + num_prefix  # (n, Tk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class Linear(nn.Linear):
    """nn.Linear without bias, with the LayerNorm before it, the GELU after it and the residual add after that as
    optional parts of the call: activation(norm(x) W^T) + residual, where x may also be a table (an embedding)
    and `rows` the indices of the rows to read from it.

    Why the parts: bf16 inference on CPUs with AMX runs all of them in one pass of cpu_linear.py's kernel, over
    the weight packed once rather than cast on every call (BENCHMARKS.md "Stop 34"): the norm applied to each row
    as it is read, the GELU and the add on the fp32 sums. Everywhere else they are PyTorch's ops in that order.
    The kernel can also rotate output heads (`rope`, `rotary_columns`, `head_dim`), which has no PyTorch
    fallback here: Attention passes them only where rotary_inside says the kernel runs, and rotates otherwise.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(
        self,
        x: Tensor,
        activation: str | None = None,
        norm: nn.LayerNorm | None = None,
        residual: Tensor | None = None,
        rows: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        rotary_columns: int = 0,
        head_dim: int = 0,
    ) -> Tensor:
        if norm_inside(self, x, norm) or (norm is None and cpu_linear.supports(x, self.weight)):
            return cpu_linear.linear(
                x, self.weight, activation, norm, residual, rows, rope, rotary_columns, head_dim
            )
        if rope is not None:  # Attention passes rope only where rotary_inside said the kernel takes it
            raise ValueError("rotary inside Linear needs cpu_linear's kernel (see rotary_inside)")
        if cpu_linear.supports_fp32(x, self.weight):  # fp32 inference: oneDNN, the GELU or the add inside
            return cpu_linear.linear_fp32(x, self.weight, activation, norm, residual, rows)
        return linear_parts(super().forward, x, activation, norm, residual, rows)


def linear_parts(
    product: Callable[[Tensor], Tensor],
    x: Tensor,
    activation: str | None = None,
    norm: nn.Module | None = None,
    residual: Tensor | None = None,
    rows: Tensor | None = None,
) -> Tensor:
    """Linear's optional parts as PyTorch's ops around `product` (x -> x W^T): activation(norm(x[rows] or x) W^T)
    + residual. Also the interface of generate.StepLinear, which cached decoding puts in Linear's place."""
    x = x if rows is None else F.embedding(rows, x)
    y = product(x if norm is None else norm(x))
    y = F.gelu(y) if activation == "gelu" else y
    return y if residual is None else residual + y


def norm_inside(linear: nn.Module, x: Tensor, norm: nn.LayerNorm | None) -> bool:
    """Whether `linear` applies `norm` to x's rows inside its kernel, where two projections of one normed input
    then each take the raw input (elsewhere one normed copy serves both)."""
    return (
        norm is not None
        and isinstance(linear, Linear)
        and cpu_linear.supports(x, linear.weight)
        and cpu_linear.supports_norm(norm)
    )


def rotary_inside(
    linear: nn.Module, x: Tensor, norm: nn.LayerNorm | None, rope: tuple[Tensor, Tensor], head_dim: int
) -> bool:
    """Whether `linear`'s kernel rotates its output heads itself (on the fp32 sums, in the pass that writes them)
    instead of rotate_projection's pass over the projection after it."""
    if not (isinstance(linear, Linear) and cpu_linear.supports(x, linear.weight)):
        return False
    return (norm is None or cpu_linear.supports_norm(norm)) and cpu_linear.supports_rotary(rope, head_dim)


def residual_add(residual: Tensor, dropout: nn.Dropout, project: nn.Module, x: Tensor) -> Tensor:
    """residual + dropout(project(x)), the add made inside the projection where the dropout does nothing."""
    if dropout.p == 0 or not dropout.training:
        return project(x, residual=residual)
    return residual + dropout(project(x))


class Attention(nn.Module):
    """Multi-head attention split into its stages so that cached decoding can reuse each one."""

    def __init__(self, config: PerceiverARConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.query = Linear(config.d_model, config.d_model)
        self.key_value = Linear(config.d_model, 2 * config.d_model)
        self.out = Linear(config.d_model, config.d_model)
        self.dropout = config.dropout

    def _heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def project_query(self, x: Tensor, rope: tuple[Tensor, Tensor], norm: nn.LayerNorm | None = None) -> Tensor:
        if rotary_inside(self.query, x, norm, rope, self.head_dim):
            rotated = self.query.out_features  # every column: the query heads
            return self._heads(self.query(x, norm=norm, rope=rope, rotary_columns=rotated, head_dim=self.head_dim))
        return rotate_projection(self._heads(self.query(x, norm=norm)), *rope)  # (B, H, n, Dh)

    def project_key_value(
        self, x: Tensor, rope: tuple[Tensor, Tensor], norm: nn.LayerNorm | None = None, rows: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        if rotary_inside(self.key_value, x, norm, rope, self.head_dim):
            rotated = self.query.out_features  # the first half: the key heads
            both = self.key_value(
                x, norm=norm, rows=rows, rope=rope, rotary_columns=rotated, head_dim=self.head_dim
            )
            key, value = both.chunk(2, dim=-1)
            return self._heads(key), self._heads(value)
        key, value = self.key_value(x, norm=norm, rows=rows).chunk(2, dim=-1)
        return rotate_projection(self._heads(key), *rope), self._heads(value)  # (B, H, T, Dh) each

    def project_query_key_value(
        self, x: Tensor, rope: tuple[Tensor, Tensor], norm: nn.LayerNorm
    ) -> tuple[Tensor, Tensor, Tensor]:
        """project_query and project_key_value of one input as one product of cpu_linear's kernel over both
        weights (one pass over the rows, each normed once), for where rotary_inside holds for both."""
        both = cpu_linear.linear(
            x, (self.query.weight, self.key_value.weight), norm=norm, rope=rope,
            rotary_columns=2 * self.query.out_features, head_dim=self.head_dim,
        )  # fmt: skip
        query, key, value = both.split(self.query.out_features, dim=-1)
        return self._heads(query), self._heads(key), self._heads(value)  # (B, H, n, Dh) each

    def attend(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """The heads' outputs (B, H, n, Dh), before the output projection (`self.out` over `merge_heads`)."""
        dropout = self.dropout if self.training else 0.0
        return causal_attention(query, key, value, dropout)

    def merge_heads(self, mixed: Tensor) -> Tensor:
        batch, _, n, _ = mixed.shape  # (B, H, n, Dh)
        return mixed.transpose(1, 2).reshape(batch, n, -1)  # (B, n, D)


# Long inputs in training. The ordinary path keeps, for every input position, its keys and values and what the
# attention's backward pass needs, and without the projected vocabulary (CrossAttentionBlock.vocabulary_key_value)
# also its embedding, its normed copy and the rotary copies of the keys: 15-18 KiB per token at d_model 512,
# which is what limits the context (BENCHMARKS.md "Very long contexts"). The cross-attention is the only place the
# prefix is used, and its keys and values are a cheap function of the token ids (embedding -> LayerNorm ->
# projection -> rotary), so the function below computes them chunk by chunk, keeps nothing per position but
# the token id and position, and recomputes each chunk in the backward pass (as FlashAttention does for the
# attention matrix). Exact: the chunks are merged by their log-sum-exp, and each chunk's gradient uses the
# softmax over all keys.


def _attention_with_lse(q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> tuple[Tensor, Tensor]:
    """Output and log-sum-exp (B, H, n) of attention; a fused kernel on CPU, plain math elsewhere."""
    if q.device.type == "cpu":
        return _cpu_flash_with_lse(q, k, v, is_causal)
    return attention_with_lse_math(q, k, v, is_causal)


def _attention_backward(grad_out, q, k, v, out, lse, is_causal) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one key chunk's share of an attention whose softmax normaliser over all keys is `lse`."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, is_causal
        )
    return attention_backward_math(grad_out, q, k, v, out, lse, is_causal)


def _chunk_scores(q: Tensor, k: Tensor, is_causal: bool) -> Tensor:
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if is_causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    return scores


def attention_with_lse_math(q: Tensor, k: Tensor, v: Tensor, is_causal: bool) -> tuple[Tensor, Tensor]:
    scores = _chunk_scores(q, k, is_causal)
    lse = scores.logsumexp(-1)
    return ((scores - lse[..., None]).exp() @ v.float()).to(q.dtype), lse


def attention_backward_math(grad_out, q, k, v, out, lse, is_causal) -> tuple[Tensor, Tensor, Tensor]:
    probs = (_chunk_scores(q, k, is_causal) - lse[..., None]).exp()  # this chunk's columns of the full softmax
    grad = grad_out.float()
    grad_scores = probs * (grad @ v.float().transpose(-1, -2) - (grad * out.float()).sum(-1, keepdim=True))
    scale = 1 / math.sqrt(q.shape[-1])
    return (
        (grad_scores @ k.float() * scale).to(q.dtype),
        (grad_scores.transpose(-1, -2) @ q.float() * scale).to(k.dtype),
        (probs.transpose(-1, -2) @ grad).to(v.dtype),
    )


def _key_chunks(num_keys: int, num_latents: int, chunk: int) -> list[tuple[int, int, bool]]:
    """(start, end, causal) spans: the prefix in chunks of `chunk`, then the latents' own square-causal block."""
    num_prefix = num_keys - num_latents
    spans = [(start, min(start + chunk, num_prefix), False) for start in range(0, num_prefix, chunk)]
    return spans + [(num_prefix, num_keys, True)]


class _RecomputedCrossAttention(torch.autograd.Function):
    """Causal cross-attention of the latents' queries over keys/values computed from token ids chunk by chunk."""

    @staticmethod
    def forward(ctx, query, tokens, positions, key_value, chunk, *parameters):
        spans = _key_chunks(tokens.shape[1], query.shape[2], chunk)
        merged, lse = None, None
        for start, end, causal in spans:
            key, value = key_value(tokens[:, start:end], positions[:, start:end])
            out_chunk, lse_chunk = _attention_with_lse(query, key, value, causal)
            if merged is None:
                merged, lse = out_chunk.float(), lse_chunk
                continue
            new_lse = torch.logaddexp(lse, lse_chunk)
            merged = (
                merged * (lse - new_lse).exp()[..., None]
                + out_chunk.float() * (lse_chunk - new_lse).exp()[..., None]
            )
            lse = new_lse
        out = merged.to(query.dtype)
        ctx.save_for_backward(query, tokens, positions, out, lse)
        ctx.key_value, ctx.chunk, ctx.parameters = key_value, chunk, parameters
        # the backward pass recomputes keys and values, so it must run under the forward's autocast state
        device = query.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, tokens, positions, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_query = torch.zeros_like(query, dtype=torch.float32)
        parameters = [p for p in ctx.parameters if p.requires_grad]
        grad_parameters = [torch.zeros_like(p) for p in parameters]
        device, dtype, enabled = ctx.autocast
        for start, end, causal in _key_chunks(tokens.shape[1], query.shape[2], ctx.chunk):
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                key, value = ctx.key_value(tokens[:, start:end], positions[:, start:end])
            dq, dk, dv = _attention_backward(grad_out, query, key.detach(), value.detach(), out, lse, causal)
            grad_query += dq.float()
            if parameters:
                for total, grad in zip(
                    grad_parameters, torch.autograd.grad((key, value), parameters, (dk, dv)), strict=True
                ):
                    total += grad
        by_parameter = iter(grad_parameters)
        grads = [next(by_parameter) if p.requires_grad else None for p in ctx.parameters]
        return (grad_query.to(query.dtype), None, None, None, None, *grads)


def recomputed_cross_attention(query, tokens, positions, key_value, parameters, chunk: int = 8192) -> Tensor:
    """Attention of queries (B, H, n, Dh) over keys/values `key_value(tokens, positions)` of every position of
    tokens (B, T) (the last n are the latents: bottom-right causal), holding O(chunk) keys at a time.
    `parameters` are the tensors key_value reads (their gradients are returned through them)."""
    return _RecomputedCrossAttention.apply(query, tokens, positions, key_value, chunk, *parameters)


class MLP(nn.Module):
    def __init__(self, config: PerceiverARConfig):
        super().__init__()
        hidden = int(config.d_model * config.mlp_ratio)
        self.up = Linear(config.d_model, hidden)
        self.down = Linear(hidden, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, norm: nn.LayerNorm | None = None, residual: Tensor | None = None) -> Tensor:
        """dropout(down(gelu(up(norm(x))))) (+ residual)"""
        hidden = self.up(x, activation="gelu", norm=norm)
        if residual is None:
            return self.dropout(self.down(hidden))
        return residual_add(residual, self.dropout, self.down, hidden)


class CrossAttentionBlock(nn.Module):
    """Latents (the last n positions' own embeddings) attend causally to every input position."""

    def __init__(self, config: PerceiverARConfig):
        super().__init__()
        self.norm_query = nn.LayerNorm(config.d_model)
        self.norm_inputs = nn.LayerNorm(config.d_model)
        self.attention = Attention(config)
        self.norm_mlp = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def input_key_value(
        self, inputs: Tensor, rope: tuple[Tensor, Tensor], rows: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Keys and values (B, H, T, Dh) of inputs (B, T, D), or of the rows `rows` (B, T) of a table inputs (V, D)."""
        return self.attention.project_key_value(inputs, rope, norm=self.norm_inputs, rows=rows)

    def vocabulary_key_value(
        self, table: Tensor, tokens: Tensor, rope: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """input_key_value of the rows `tokens` (B, T) of the fp32 embedding table (V, D), from the keys and values
        of every row of the table, projected once.

        Before the rotary, a position's key and value depend on its token alone (embedding -> LayerNorm ->
        projection), so V projected rows serve B*T positions: the same sums per row, and at 16k positions of a
        388-token vocabulary 0.4 GFLOP where projecting every position took 17 (BENCHMARKS.md "Stop 35"). The
        projected rows are fp32 sums even under autocast: each position's key is rotated in fp32 and rounded once,
        and in training the positions' gradients add up into the table's rows in fp32."""
        attention = self.attention
        device = table.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else table.dtype
        if self.projects_table_in_bf16(table):
            # bf16 products with fp32 sums, as cpu_linear would project the positions
            projected = cpu_linear.linear(table, attention.key_value.weight, norm=self.norm_inputs, fp32_out=True)
        else:  # an fp32 product: a 16-bit one would round the sums before the rotation and the gradients' sums
            with torch.autocast(device, enabled=False):
                projected = attention.key_value(table, norm=self.norm_inputs)  # (V, 2D)
        if cpu_attention.gathers(projected, tokens):  # gather, rotate and round in one pass (and one back)
            heads = attention.num_heads
            if torch.is_grad_enabled() and projected.requires_grad:
                key, value = cpu_attention.trainable_gather_rotary(projected, tokens, *rope, heads, dtype)
            else:
                key, value = cpu_attention.gather_rotary(projected, tokens, *rope, heads, dtype).chunk(2, -1)
            return attention._heads(key), attention._heads(value)
        key, value = F.embedding(tokens, projected).chunk(2, dim=-1)
        key = rotate_projection(attention._heads(key), *rope)
        return key.to(dtype), attention._heads(value).to(dtype)  # (B, H, T, Dh) each

    def projects_table_in_bf16(self, table: Tensor) -> bool:
        """Whether vocabulary_key_value projects the table with cpu_linear's bf16 products (bf16 autocast inference
        on an AMX CPU), at a position's cost per row; elsewhere under 16-bit autocast its fp32 product costs more."""
        weight = self.attention.key_value.weight
        return cpu_linear.supports(table, weight) and cpu_linear.supports_norm(self.norm_inputs)

    def query(self, latents: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        return self.attention.project_query(latents, rope, norm=self.norm_query)  # (B, H, n, Dh)

    def attend(self, latents: Tensor, key: Tensor, value: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        return self.finish(latents, self.attention.attend(self.query(latents, rope), key, value))

    def finish(self, latents: Tensor, mixed: Tensor) -> Tensor:
        """latents + the heads' outputs `mixed` (B, H, n, Dh) projected, then + the MLP of that: (B, n, D)."""
        hidden = residual_add(latents, self.dropout, self.attention.out, self.attention.merge_heads(mixed))
        return self.mlp(hidden, norm=self.norm_mlp, residual=hidden)


class SelfAttentionBlock(nn.Module):
    """Pre-LayerNorm causal self-attention over the latents only."""

    def __init__(self, config: PerceiverARConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model)
        self.attention = Attention(config)
        self.norm_mlp = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def query_key_value(self, hidden: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        if rotary_inside(self.attention.query, hidden, self.norm, rope, self.attention.head_dim):
            return self.attention.project_query_key_value(hidden, rope, self.norm)
        if norm_inside(self.attention.query, hidden, self.norm):  # each projection norms the rows it reads
            x, norm = hidden, self.norm
        else:
            x, norm = self.norm(hidden), None
        query = self.attention.project_query(x, rope, norm)
        return (query, *self.attention.project_key_value(x, rope, norm))

    def finish(self, hidden: Tensor, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        mixed = self.attention.merge_heads(self.attention.attend(query, key, value))
        hidden = residual_add(hidden, self.dropout, self.attention.out, mixed)
        return self.mlp(hidden, norm=self.norm_mlp, residual=hidden)

    def forward(self, hidden: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        return self.finish(hidden, *self.query_key_value(hidden, rope))


# ----------------------------------------------------------------------------------------------------------
# The model


class PerceiverAR(nn.Module):
    def __init__(self, config: PerceiverARConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.cross_attention = CrossAttentionBlock(config)
        self.layers = nn.ModuleList(SelfAttentionBlock(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.d_model)
        self.head = Linear(config.d_model, config.vocab_size)
        if config.tie_embeddings:
            self.head.weight = self.embedding.weight
        self._rope_tables: dict = {}  # (device, dtype) -> cos, sin of positions 0.. (see `rope`)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream keeps deep stacks stable
        for name, parameter in self.named_parameters():
            if name.endswith(("attention.out.weight", "mlp.down.weight")):
                nn.init.normal_(parameter, std=0.02 / math.sqrt(2 * (config.num_layers + 1)))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # The kept rotary table covers positions below this (8 MiB at 32 rotary dimensions): past it, a run's tables
    # are computed for it alone, since a table up to a 2M-token context held 256 MiB (BENCHMARKS.md "Stop 35").
    rope_table_positions: int = 1 << 16

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rotary tables for positions (B|1, T), in the parameters' dtype. A run of consecutive positions (every
        forward pass but prefix dropout's) is a slice of one table kept per device and dtype: the same values, where
        computing them took a 16k prefill 2 ms of float64 cos and sin."""
        c = self.config
        dtype = self.embedding.weight.dtype
        if positions.dim() == 2 and positions.shape[0] == 1 and not torch.compiler.is_compiling():
            first, length = int(positions[0, 0]), positions.shape[1]
            if (
                0 <= first
                and first + length <= self.rope_table_positions
                and torch.equal(positions[0], torch.arange(first, first + length, device=positions.device))
            ):
                key = (positions.device, dtype)
                cos, sin = self._rope_tables.get(key, (torch.empty(0), torch.empty(0)))
                if cos.shape[0] < first + length:  # grown by doubling: cached decoding walks past max_context
                    size = min(max(first + length, 2 * cos.shape[0], c.max_context), self.rope_table_positions)
                    every = torch.arange(size, device=positions.device)
                    cos, sin = self._rope_tables[key] = rotary_tables(every, c.rotary_dim, c.rotary_base, dtype)
                return cos[None, first : first + length], sin[None, first : first + length]
        return rotary_tables(positions, c.rotary_dim, c.rotary_base, dtype)

    def resolve_latents(self, length: int, num_latents: int | None) -> int:
        n = self.config.num_latents if num_latents is None else num_latents
        if not 1 <= n <= self.config.max_context:
            raise ValueError(f"num_latents={n} is outside [1, {self.config.max_context}]")
        return min(length, n)

    def latent_stack(self, hidden: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        for layer in self.layers:
            hidden = layer(hidden, rope)
        return self.head(hidden, norm=self.final_norm)  # (B, n, V)

    def forward(self, tokens: Tensor, num_latents: int | None = None, position_offset: int = 0) -> Tensor:
        """Logits (B, n, V) for the last n = min(T, num_latents) positions of tokens (B, T).

        `position_offset` is the absolute position of tokens[:, 0]; rotary attention depends only on position
        differences, so it changes nothing but rounding, and lets cached decoding keep absolute positions.
        """
        batch, length = tokens.shape
        if length > self.config.max_context:
            raise ValueError(f"input length {length} exceeds max_context={self.config.max_context}")
        n = self.resolve_latents(length, num_latents)
        num_prefix = length - n
        positions = torch.arange(position_offset, position_offset + length, device=tokens.device)[None]  # (1, T)
        latent_positions = positions[:, num_prefix:]
        latent_rope = self.rope(latent_positions)
        kept = None
        if self.training and self.config.prefix_dropout > 0 and num_prefix > 0:
            # Physically remove a random subset of the prefix (the official code only masks it, which saves
            # nothing): the kept positions keep their true rotary positions, order is irrelevant to attention.
            keep = max(1, round(num_prefix * (1.0 - self.config.prefix_dropout)))
            scores = torch.rand(batch, num_prefix, device=tokens.device)
            kept = scores.topk(keep, dim=1).indices.sort(dim=1).values  # (B, K)
            positions = torch.cat((kept + position_offset, latent_positions.expand(batch, -1)), dim=1)
        num_keys = positions.shape[1]

        key_tokens = tokens if kept is None else torch.cat((tokens.gather(1, kept), tokens[:, num_prefix:]), 1)
        if self._recompute_prefix(num_keys):
            latents = self.embedding_dropout(self.embedding(tokens[:, num_prefix:]))  # (B, n, D)
            block = self.cross_attention
            parameters = (self.embedding.weight, block.norm_inputs.weight, block.norm_inputs.bias)
            mixed = recomputed_cross_attention(
                block.query(latents, latent_rope),
                key_tokens,
                positions,
                self.input_key_value,
                (*parameters, block.attention.key_value.weight),
                self.prefix_chunk,
            )
            hidden = block.finish(latents, mixed)
            return self.latent_stack(hidden, latent_rope)

        if not (self.training and self.config.dropout > 0):
            # no embedding dropout: the keys' inputs are the tokens' embeddings alone (see input_key_value)
            latents = self.embedding(tokens[:, num_prefix:])  # (B, n, D): latents start as their own embeddings
            key, value = self.input_key_value(key_tokens, positions)
        else:  # the latents and the keys' inputs share one dropout sample of the embeddings
            inputs = self.embedding_dropout(self.embedding(tokens))  # (B, T, D)
            latents = inputs[:, num_prefix:]
            if kept is not None:
                prefix = inputs[:, :num_prefix].gather(1, kept[..., None].expand(-1, -1, inputs.shape[-1]))
                inputs = torch.cat((prefix, latents), dim=1)  # (B, K + n, D)
            key, value = self.cross_attention.input_key_value(inputs, self.rope(positions))  # (B, H, T', Dh)
        hidden = self.cross_attention.attend(latents, key, value, latent_rope)  # (B, n, D)
        return self.latent_stack(hidden, latent_rope)

    # Training inputs with more keys than this take the recomputing cross-attention (see above); below it the
    # ordinary path is as fast and its memory is small. Set to 0 to always recompute, or a huge value to never.
    recompute_prefix_above: int = 32768
    prefix_chunk: int = 8192

    def _recompute_prefix(self, num_keys: int) -> bool:
        grad = torch.is_grad_enabled() and self.embedding.weight.requires_grad
        no_dropout = not (self.training and self.config.dropout > 0)  # embedding dropout needs the full inputs
        return grad and no_dropout and num_keys > self.recompute_prefix_above

    # Whether the cross-attention's keys and values come from the projected vocabulary (vocabulary_key_value) where
    # that costs less than projecting the positions (_vocabulary_cost); False: every position is projected
    # (BENCHMARKS.md "Stop 35").
    project_vocabulary: bool = True

    def _vocabulary_cost(self, table: Tensor) -> int:
        """How many positions' projections projecting the table costs: its rows, in the positions' precision; 8x
        them under 16-bit autocast where the table's product stays fp32 (training, CPUs without AMX, GPUs), whose
        positions' products run several times faster (at d_model 512 on an AMX CPU, 8,000 rows in fp32 cost about
        as much as 7x as many positions in bf16; BENCHMARKS.md "Stop 35", benchmarks/ab/vocabulary_size.py)."""
        device = table.device.type
        sixteen_bit = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != torch.float32
        fp32_table = sixteen_bit and not self.cross_attention.projects_table_in_bf16(table)
        return table.shape[0] * (8 if fp32_table else 1)

    def input_key_value(self, tokens: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """The cross-attention's keys and values (B, H, T, Dh) of tokens (B, T) at positions (B|1, T), with no
        embedding dropout (which would make them more than a function of each token)."""
        rope, table = self.rope(positions), self.embedding.weight
        if (
            self.project_vocabulary
            and table.dtype == torch.float32
            and tokens.numel() > self._vocabulary_cost(table)
        ):
            return self.cross_attention.vocabulary_key_value(table, tokens, rope)
        # the projection reads each position's row from the table itself: with cpu_linear's kernel no (B, T, D)
        # copy of the embeddings is made (a 16k prefill wrote and read 32 MB for it)
        return self.cross_attention.input_key_value(table, rope, rows=tokens)

    def flops_per_token(
        self, context: int, num_latents: int | None = None, projected_vocabulary: bool = False
    ) -> dict[str, float]:
        """Forward FLOPs per trained (latent) position of one sequence, counted analytically (2 per multiply-add).

        Cross-attention: key/value projections for every input position (with `projected_vocabulary`, for the
        vocabulary's rows where they are fewer, as input_key_value projects them where that costs less) plus the
        queries' attention over on average (context - n/2) keys; latent layers: projections + MLP + causal
        attention over n/2 keys.
        """
        c = self.config
        n = min(context, c.num_latents if num_latents is None else num_latents)
        d, hidden = c.d_model, int(c.d_model * c.mlp_ratio)
        projected_rows = min(context, c.vocab_size) if projected_vocabulary else context
        kv_all_inputs = 2 * projected_rows * 2 * d * d
        cross = n * (2 * (2 * d * d) + 2 * 2 * d * hidden) + kv_all_inputs + 2 * 2 * n * (context - n / 2) * d
        layer = n * (2 * 4 * d * d + 2 * 2 * d * hidden) + 2 * 2 * n * (n / 2) * d
        head = n * 2 * d * c.vocab_size
        total = cross + c.num_layers * layer + head
        return {"total": total, "per_latent": total / n}


def token_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy in nats of each row of logits (R, V) against targets (R,), in fp32 whatever the logits'
    dtype: on CPUs with our kernels in one pass over each row each way (cpu_loss.py), else PyTorch's over an
    fp32 copy."""
    if cpu_loss.supports(logits):
        return cpu_loss.cross_entropy(logits, targets)
    return F.cross_entropy(logits.float(), targets, reduction="none")


def latent_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy over the latent positions.

    `targets` (B, T) are the inputs shifted by one (targets[:, t] is the token after inputs[:, t]); logits
    (B, n, V) cover the last n input positions, so they are scored against targets[:, -n:].
    """
    n = logits.shape[1]
    losses = token_losses(logits.flatten(0, 1), targets[:, -n:].flatten())
    return {"mean": losses.mean, "sum": losses.sum, "none": lambda: losses}[reduction]()
