"""Sampling from a Perceiver AR: options, logit filters, the window schedule and exact cached decoding.

The window schedule follows the official Perceiver AR sampler (google-research/perceiver-ar): the latent
window grows by one position per new token until it holds N latents, then it is *refilled* by one exact
pass at R = N/2 latents and grows again. A latent's self-attention output depends on every earlier latent,
so dropping the oldest latent invalidates the latent caches; refilling keeps every cached step exact.
The input window slides only at refills, and then far enough that it stays within max_context until the
next refill; the model therefore always sees at least max_context - (N - R) tokens once the sequence is long.

The cross-attention keys/values of every input position are computed once, rotated at their absolute
position, and kept in a preallocated buffer; a refill reuses them and only reruns the R latents.
`use_cache=False` recomputes every step with a full forward over exactly the same window: the reference
the cached path is tested against. Where the fused C step runs (cpu_decode.py), a cached step does not read that
buffer once the window holds as many positions as the vocabulary has tokens: it takes the same keys and values
from the projected vocabulary (one row per token) and each position's rotary angles, and only writes the newest
position's row for the refills.

A cached step is matrix-vector work: each weight and cached key/value is read once for a few rows, so its
speed is memory bandwidth. On CPUs the steps therefore run on a copy of the model whose linear layers are
`StepLinear`s (below): weights prepacked for the kernel that streams them fastest for few rows, optionally as
bf16 copies, which halve the bytes per step; and the cross-attention cache is stored transposed, the layout
one query per row reads fastest. Refills and the prompt's prefill are matrix-matrix work and use the model.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_decode
from .cpu_linear import onednn_available as onednn_linear_available
from .device import cpu_has_fast_bf16
from .model import PerceiverAR, linear_parts

# ----------------------------------------------------------------------------------------------------------
# Sampling options and logit filters


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    banned_tokens: tuple[int, ...] = ()  # e.g. BOS, or EOS while a minimum length is not reached

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} is outside (0, 1]")


def _ban(logits: Tensor, options: SamplingOptions) -> Tensor:
    if options.banned_tokens:
        logits = logits.index_fill(-1, _token_index(options.banned_tokens, logits.device), float("-inf"))
    return logits


@functools.lru_cache(maxsize=16)
def _token_index(tokens: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.tensor(tokens, dtype=torch.long, device=device)


def _top_k(logits: Tensor, options: SamplingOptions) -> Tensor:
    if options.top_k is None or options.top_k >= logits.shape[-1]:
        return logits
    kth = logits.topk(options.top_k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_p(logits: Tensor, options: SamplingOptions) -> Tensor:
    if options.top_p is None or options.top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # drop a token when the tokens before it already cover top_p; the most likely token always stays
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= options.top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


LOGIT_FILTERS: tuple[Callable[[Tensor, SamplingOptions], Tensor], ...] = (_ban, _top_k, _top_p)


def sample_next(logits: Tensor, options: SamplingOptions, generator: torch.Generator | None = None) -> Tensor:
    """One token per row from logits (B, V)."""
    if logits.dtype != torch.float32:
        logits = logits.float()
    for apply_filter in LOGIT_FILTERS:
        logits = apply_filter(logits, options)
    if options.temperature == 0:
        return logits.argmax(dim=-1)
    if options.temperature != 1:  # x / 1 == x: skipping it changes no draw
        logits = logits / options.temperature
    probs = logits.softmax(dim=-1)
    # The exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) is token i with probability p_i. It is what
    # torch.multinomial(probs, 1) computes, draw for draw from the same generator (tests/test_generate.py), without
    # its input checks: together ~100 us a token at batch 1, a visible share of a ~1 ms cached step.
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


# ----------------------------------------------------------------------------------------------------------
# The window schedule (pure)


@dataclass(frozen=True)
class Window:
    """Logits after `end` tokens come from a forward over tokens[start:end] with `num_latents` latents."""

    start: int
    end: int
    num_latents: int
    refill: bool  # True: computed by a fresh latent pass (prefill or refill); False: one cached step


def next_window(
    previous: Window | None, max_context: int, num_latents: int, refill_latents: int | None = None
) -> Window:
    """The window for one more token than `previous` (or for a prompt of length `previous.end`, see below)."""
    assert previous is not None
    refill_to = max(1, num_latents // 2) if refill_latents is None else refill_latents
    end = previous.end + 1
    grown = previous.num_latents + 1
    if grown <= num_latents and end - previous.start <= max_context:
        return Window(previous.start, end, grown, refill=False)
    # Slide far enough that the next num_latents - refill_to steps fit in max_context before the next refill.
    start = max(previous.start, end - max_context + (num_latents - refill_to), 0)
    start = min(start, end - 1)
    return Window(start, end, min(refill_to, end - start), refill=True)


def prompt_window(
    prompt_length: int, max_context: int, num_latents: int, refill_latents: int | None = None
) -> Window:
    """The first window, over the prompt: its last max_context tokens; all of them latents if they fit in N,
    otherwise R latents, so that the next N - R tokens are cheap cached steps."""
    if prompt_length < 1:
        raise ValueError("the prompt needs at least one token (e.g. the codec's BOS)")
    refill_to = max(1, num_latents // 2) if refill_latents is None else refill_latents
    if not 1 <= refill_to <= num_latents:
        raise ValueError(f"refill_latents={refill_to} is outside [1, {num_latents}]")
    start = max(0, prompt_length - max_context)
    length = prompt_length - start
    latents = length if length <= num_latents else refill_to
    return Window(start, prompt_length, latents, refill=True)


def window_schedule(
    prompt_length: int, max_new_tokens: int, max_context: int, num_latents: int, refill_latents: int | None = None
) -> list[Window]:
    """The windows whose last logits produce new tokens 1..max_new_tokens."""
    windows = [prompt_window(prompt_length, max_context, num_latents, refill_latents)]
    while len(windows) < max_new_tokens:
        windows.append(next_window(windows[-1], max_context, num_latents, refill_latents))
    return windows[:max_new_tokens]


# ----------------------------------------------------------------------------------------------------------
# Cached decoding


class StepLinear(nn.Module):
    """nn.Linear (no bias) for cached steps on a CPU: the same weights, read the way few rows read them fastest.

    A step multiplies 1-16 rows by every weight matrix once, so its speed is how fast the kernel streams the
    weights. MKL's gemv behind F.linear streams the bench config's 512-wide layer matrices at only ~13 GB/s
    where one matvec over a single wide matrix reaches ~24 GB/s on the same Zen 4, so on x86 with oneDNN
    the weights are prepacked once for `rows` rows into oneDNN's blocked layout (what inductor's CPU freezing
    pass does): the 113 MB of layer weights took 4.8 ms for 1 row and 5.7 ms for 16 in fp32 against 8.1 and
    12.3 ms before, 2.1 / 3.0 ms in bf16 (see BENCHMARKS.md "Decode per-token overhead"). fp32 weights stay
    fp32 arithmetic: only the order of the sums changes, as between any two BLAS kernels. Without oneDNN the
    older forms remain: F.linear for one row, weight @ x.T for several (1.5-2x faster than F.linear there).
    """

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, rows: int = 1):
        super().__init__()
        assert linear.bias is None
        self.rows = max(1, rows)
        self.scale: Tensor | None = None
        if dtype == torch.int8:  # for the fused C step (cpu_decode.py), which reads them with their scales
            weight, self.scale = cpu_decode.quantize_int8(linear.weight)
            self.prepack, self.packed = False, None
            self.weight = nn.Parameter(weight, requires_grad=False)
            return
        weight = linear.weight.detach().to(dtype)
        # packed at the first call, as an opaque oneDNN tensor (not a parameter: it is never saved, trained or
        # copied); where the fused C step runs the steps (cpu_decode.py), no call comes and no copy is made
        self.packed: Tensor | None = None
        self.prepack = weight.device.type == "cpu" and onednn_linear_available()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(
        self,
        x: Tensor,
        activation: str | None = None,
        norm: nn.Module | None = None,
        residual: Tensor | None = None,
        rows: Tensor | None = None,
    ) -> Tensor:
        """model.Linear's interface: activation(norm(x[rows] or x) W^T) + residual."""
        return linear_parts(self._linear, x, activation, norm, residual, rows)

    def _linear(self, x: Tensor) -> Tensor:
        if self.scale is not None:  # int8 outside the C step: exact, and slow (it widens every weight each call)
            return F.linear(x.float(), self.weight.float() * self.scale[:, None]).to(x.dtype)
        rows = x.reshape(-1, x.shape[-1]).to(self.weight.dtype)
        if self.prepack and self.packed is None:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), self.rows)
        if self.packed is not None:
            out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, None, "none", [], "")
        else:
            out = F.linear(rows, self.weight) if rows.shape[0] == 1 else (self.weight @ rows.T).T
        return out.reshape(*x.shape[:-1], -1).to(x.dtype)


def step_model(model: PerceiverAR, dtype: torch.dtype, rows: int = 1) -> PerceiverAR:
    """A copy of `model` for cached steps of `rows` rows: every parameter shared, except each nn.Linear becomes
    a StepLinear with `dtype` weights (packed for oneDNN where available; a copy of the weights either way
    when `dtype` differs from the model's)."""
    shared = {id(parameter): parameter for parameter in model.parameters()}
    clone = copy.deepcopy(model, memo=shared)
    for module in list(clone.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, StepLinear(child, dtype, rows))
    return clone


def step_weights_dtype(device: torch.device, batch: int, compute: torch.dtype) -> torch.dtype | None:
    """The weights the cached steps use, or None for the model itself (CUDA: autocast already does well).

    A CPU step streams bf16 weights about twice as fast as fp32 ones (the cost is memory, not arithmetic), at
    a quality cost measured at <0.01% of held-out bits (BENCHMARKS.md). One row uses them on every x86 CPU
    measured here; several rows only where bf16 arithmetic is fast (avx512_bf16/AMX: 16 rows 422-444 vs
    347-372 tokens/s on a Zen 4), since on an AVX2-only CPU several bf16 rows were slower than fp32.
    """
    if device.type != "cpu":
        return None
    fast = batch == 1 or compute == torch.bfloat16 or cpu_has_fast_bf16()
    return torch.bfloat16 if fast else torch.float32


def int8_step_weights_dtype(batch: int, auto: torch.dtype) -> torch.dtype:
    """The step weights `--dtype int8` uses, given those `auto` would (step_weights_dtype): int8, except for
    batches of cpu_decode.INT8_MAX_ROWS or more where `auto` takes bf16 weights on fast bf16 products, which
    outrun int8 weights widened to fp32 there (BENCHMARKS.md "Stop 30")."""
    if batch >= cpu_decode.INT8_MAX_ROWS and auto == torch.bfloat16 and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.int8


def auto_decode_dtypes(device: torch.device) -> dict:
    """The key/value cache and refill dtypes `--dtype auto` decodes with (DecodeState's cache_dtype, refill_dtype):
    on a CPU, bf16 caches (half the bytes the fused C step reads; ±0.0003 bits/token on the shipped checkpoints,
    BENCHMARKS.md "bf16 caches") and, where bf16 matmuls are fast, bf16 prompt prefill and refills ("bf16
    refills"). DecodeState applies them only where the C step runs."""
    if device.type != "cpu":
        return {"cache_dtype": None, "refill_dtype": None}
    return {"cache_dtype": torch.bfloat16, "refill_dtype": torch.bfloat16 if cpu_has_fast_bf16() else None}


class DecodeState:
    """Preallocated caches for one batch: cross-attention keys/values of the input window, and each latent
    layer's keys/values of the current latents."""

    def __init__(
        self,
        model: PerceiverAR,
        batch: int,
        total_length: int,
        device: torch.device,
        stepper: PerceiverAR | None = None,
        num_latents: int | None = None,
        cache_dtype: torch.dtype | None = None,
        refill_dtype: torch.dtype | None = None,
    ):
        c = model.config
        self.model = model
        # the model cached steps run on: a `step_model(model, dtype)`, or the model itself for None
        self.stepper = model if stepper is None else stepper
        self.tokens = torch.zeros(batch, total_length, dtype=torch.long, device=device)
        self.length = 0
        # one slot more than max_context: the newest token is appended before the refill that slides the window
        self.cross_capacity = min(c.max_context + 1, total_length)
        self.cross_start = 0  # absolute position of cross_key[:, :, 0]
        self.cross_length = 0
        self.cross_key: Tensor | None = None
        self.cross_value: Tensor | None = None
        self.latent_keys: list[Tensor] = []
        self.latent_values: list[Tensor] = []
        self.num_latents = 0
        # the most latents a window will hold: more than the training value when --latents asks for more
        self.latent_capacity = max(c.num_latents, num_latents or 0)
        self.batch, self.device = batch, device
        self.fused: cpu_decode.FusedStep | bool | None = None  # decided with the caches (_allocate)
        self.pending_append = False  # the newest token's cross-attention keys/values are left to the fused step
        self.tokens_numpy = None  # a numpy view of `tokens` (append_token)
        # Every row holds the same tokens (one prompt for a batch of samples, as `perceiver generate -n` runs it):
        # the prompt's keys/values and its latent pass are computed for row 0 alone and copied to every row, a
        # batch-16 prefill in a 16th of the time. Set by generate_stream; off once the rows sample their own tokens.
        self.shared_rows = False
        # Then the fused C step reads those rows' shared cache slots from row 0 (the caches serve row 0's copy to
        # every row instead of memory streaming each row's): the cross-attention cache's positions before
        # `shared_end` while they stay in the window, and the latent caches' first `shared_latents` slots until
        # the first refill recomputes them for each row
        self.shared_end = self.shared_latents = 0
        # bf16 caches halve the bytes a cached step reads from them (at batch 16, 84% of its bytes), int8 ones
        # (--dtype int8: a scale per row) nearly halve them again; only the fused C step reads them, so they are
        # kept only where it runs (None: the dtype the model computes in)
        # The prompt's prefill and the refills are matmul-bound: with refill_dtype bf16 they run under bf16 autocast
        # (~2x on a CPU with AVX512-BF16) while the cached steps stay the C step's. Both only where that C step will
        # run: the PyTorch steps must read caches in the dtype they compute in.
        self.fused_possible = (
            self.stepper is not model and cpu_decode.supports_model(model) and device.type == "cpu"
        )
        self.cache_dtype = cache_dtype if self.fused_possible else None
        self.refill_dtype = refill_dtype if self.fused_possible and refill_dtype != torch.float32 else None

    def _allocate(self, like: Tensor) -> None:
        c = self.model.config
        dtype = self.cache_dtype or like.dtype
        # Every cache is zeroed now rather than left to be touched by the steps: a step writes one new slot per
        # row, head and layer, a fresh page every 16 steps for each, and those page faults inside the C step's
        # parallel region cost a batch-16 cycle of the bench model 570-632 against 653-658 tokens/s zeroed (fresh
        # processes; zeroing its 537 MB of latent caches takes ~0.1 s; BENCHMARKS.md "Stop 36")

        def transposed(capacity: int) -> Tensor:
            # Stored (B, H, Dh, capacity) and handed out as a (B, H, capacity, Dh) view: a cached step's
            # attention is one query per row, and q @ K^T and p @ V stream this layout ~1.3x faster than the
            # (T, Dh) one, whose 64-float rows make the BLAS do a short reduction per key.
            return like.new_zeros(self.batch, c.num_heads, c.head_dim, capacity, dtype=dtype).transpose(-1, -2)

        # Only the cross-attention cache (~4,100 keys, one write per step) is transposed. Each step also writes
        # one key and value into every latent layer's cache, one float per cache line in the transposed layout:
        # with the latent caches transposed too, batch-16 steps were level in fp32 and 5-26% slower with bf16
        # step weights (four alternated rounds; BENCHMARKS.md "Decode per-token overhead"). The fused C step
        # reads rows faster than the transposed layout (batch 16: its cross-attention 216-236 vs 294-483 ms
        # per 30 steps), so where it will run, the cross-attention cache is rows too.
        # int8 caches (only where the C step runs): each row of head_dim values followed by its fp32 scale
        width = c.head_dim + 4 if dtype == torch.int8 else c.head_dim
        rows = (self.batch, c.num_heads, self.cross_capacity, width)
        if self.fused_possible and dtype in (torch.float32, torch.bfloat16, torch.int8):
            self.cross_key, self.cross_value = like.new_zeros(rows, dtype=dtype), like.new_zeros(rows, dtype=dtype)
        else:
            self.cross_key, self.cross_value = transposed(self.cross_capacity), transposed(self.cross_capacity)
        latent_shape = (self.batch, c.num_heads, self.latent_capacity, width)
        self.latent_keys = [like.new_zeros(latent_shape, dtype=dtype) for _ in self.model.layers]
        self.latent_values = [like.new_zeros(latent_shape, dtype=dtype) for _ in self.model.layers]
        # With a stepper (anything but the exact reference path), every cached step is one C call where the
        # kernel is available: fp32 arithmetic, faster than any stepper's PyTorch ops (cpu_decode.py)
        fused = self.stepper is not self.model and cpu_decode.supports(self.model, self)
        self.fused = cpu_decode.FusedStep(self.model, self, self.stepper) if fused else False

    def _positions(self, start: int, end: int) -> Tensor:
        return torch.arange(start, end, device=self.device)[None]  # (1, T)

    def _refill_autocast(self):
        if self.refill_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.refill_dtype)

    def append_token(self, tokens: Tensor) -> None:
        """append_inputs for one new token per row (B,): where the fused step runs, only the bookkeeping, in numpy
        (a PyTorch op costs ~5-15 us, more right after a step has streamed the weights through the caches)."""
        if not self.fused:
            self.append_inputs(tokens[:, None])
            return
        if self.length + 1 - self.cross_start > self.cross_capacity:  # the C step writes there unchecked
            raise RuntimeError(f"cross-attention cache full ({self.cross_capacity} positions)")
        if self.tokens_numpy is None:
            self.tokens_numpy = self.tokens.numpy()  # the same memory
        self.tokens_numpy[:, self.length] = tokens.numpy()
        self.length += 1
        # the fused step computes their keys/values with the rest of the step, in the same call (a refill first
        # calls _append_pending); the slot is taken now
        self.pending_append = True
        self.cross_length = self.length - self.cross_start

    def append_inputs(self, tokens: Tensor) -> None:
        """Embed new tokens (B, t) and append their cross-attention keys/values (rotated once)."""
        if self.fused and tokens.shape[1] == 1:
            self.append_token(tokens[:, 0])
            return
        start = self.length
        self.tokens[:, start : start + tokens.shape[1]] = tokens
        self.length += tokens.shape[1]
        with self._refill_autocast():
            self._append_key_values(tokens, start)

    def _append_pending(self) -> None:
        if self.pending_append:
            self.pending_append = False
            self._append_key_values(self.tokens[:, self.length - 1 : self.length], self.length - 1)

    def _append_key_values(self, tokens: Tensor, start: int) -> None:
        if self.shared_rows:
            tokens = tokens[:1]  # stored into every row below (a broadcasting copy)
            self.shared_end = start + tokens.shape[1]
        positions = self._positions(start, start + tokens.shape[1])
        if tokens.shape[1] == 1:  # one new token is matrix-vector work, for the stepper's weights
            model = self.stepper
            key, value = model.cross_attention.input_key_value(model.embedding(tokens), model.rope(positions))
        else:
            key, value = self.model.input_key_value(tokens, positions)
        if self.cross_key is None:
            self._allocate(key)
        offset = start - self.cross_start
        _store(self.cross_key[:, :, offset : offset + tokens.shape[1]], key)
        _store(self.cross_value[:, :, offset : offset + tokens.shape[1]], value)
        self.cross_length = offset + tokens.shape[1]

    def slide_to(self, start: int) -> None:
        """Drop cached inputs before absolute position `start` (one copy per refill, never per token)."""
        shift = start - self.cross_start
        if shift <= 0:
            return
        keep = self.cross_length - shift
        for buffer in (self.cross_key, self.cross_value):
            buffer[:, :, :keep] = buffer[:, :, shift : shift + keep].clone()
        self.cross_start, self.cross_length = start, keep

    def latent_pass(self, window: Window) -> Tensor:
        """Fresh pass over the window's last n positions: fills the latent caches, returns last logits (B, V)."""
        with self._refill_autocast():
            logits = self._latent_pass(window)
        return logits if self.refill_dtype is None else logits.float()

    def _latent_pass(self, window: Window) -> Tensor:
        assert window.end == self.length
        self._append_pending()
        self.slide_to(window.start)
        n = window.num_latents
        rows = slice(0, 1) if self.shared_rows else slice(None)  # row 0's pass, stored into every row
        positions = self._positions(window.end - n, window.end)
        rope = self.model.rope(positions)
        latents = self.model.embedding(self.tokens[rows, window.end - n : window.end])  # (B, n, D)
        key, value = self.cross_key[rows, :, : self.cross_length], self.cross_value[rows, :, : self.cross_length]
        if key.dtype == torch.int8:  # int8 caches: dequantized for the refill, in the dtype it computes in
            dtype = self.refill_dtype or latents.dtype
            key, value = cpu_decode.load_int8_rows(key, dtype), cpu_decode.load_int8_rows(value, dtype)
        elif key.dtype != latents.dtype and not torch.is_autocast_enabled(latents.device.type):
            key, value = key.to(latents.dtype), value.to(latents.dtype)  # bf16 caches (cache_dtype), fp32 refills
        hidden = self.model.cross_attention.attend(latents, key, value, rope)
        for index, layer in enumerate(self.model.layers):
            query, key, value = layer.query_key_value(hidden, rope)
            _store(self.latent_keys[index][:, :, :n], key)
            _store(self.latent_values[index][:, :, :n], value)
            hidden = layer.finish(hidden, query, key, value)
        self.num_latents, self.shared_latents = n, n if self.shared_rows else 0
        logits = self.model.head(self.model.final_norm(hidden[:, -1]))
        if self.shared_rows:  # the rows sample their own next tokens from here on
            self.shared_rows = False
            logits = logits.expand(self.batch, -1).clone()
        return logits

    def refill(self, window: Window) -> Tensor:
        """latent_pass for a refill. Where the rows hold the same tokens but the newest (a prompt that fills the
        context refills at the first new token), the pass over all but the newest position runs on row 0
        (shared_rows) and the newest is one cached step per row: the same latents, the pass at a batch of one,
        and the next steps then share its latent slots too."""
        if not (self.batch > 1 and self.shared_end == window.end - 1 and window.num_latents > 1):
            return self.latent_pass(window)
        self.slide_to(window.start)  # with the newest position's slot, which append_inputs may have filled
        # the pass over the window without its newest position: it must not see that position's keys/values,
        # and its pending append (the fused step's) waits for the step
        pending, self.pending_append = self.pending_append, False
        self.length, self.cross_length, self.shared_rows = self.length - 1, self.cross_length - 1, True
        self.latent_pass(Window(window.start, window.end - 1, window.num_latents - 1, refill=True))
        self.length, self.cross_length, self.pending_append = self.length + 1, self.cross_length + 1, pending
        return self.step(Window(window.start, window.end, window.num_latents, refill=False))

    def step(self, window: Window) -> Tensor:
        """One cached step: the newest position becomes one more latent. Returns its logits (B, V)."""
        assert window.end == self.length and window.num_latents == self.num_latents + 1
        model = self.stepper
        position = window.end - 1
        if self.fused:
            if self.num_latents >= self.latent_capacity:  # the C step writes slot num_latents unchecked
                raise RuntimeError(f"latent caches full ({self.latent_capacity} positions)")
            shared_cross = max(0, self.shared_end - self.cross_start)
            logits = self.fused(
                self.tokens, position, self.cross_length, self.num_latents, self.pending_append, shared_cross,
                self.shared_latents,
            )  # fmt: skip
            self.num_latents, self.pending_append = self.num_latents + 1, False
            return logits
        rope = model.rope(self._positions(position, position + 1))
        latent = model.embedding(self.tokens[:, position : position + 1])  # (B, 1, D)
        key, value = self.cross_key[:, :, : self.cross_length], self.cross_value[:, :, : self.cross_length]
        hidden = model.cross_attention.attend(latent, key, value, rope)
        n = self.num_latents
        for index, layer in enumerate(model.layers):
            query, key, value = layer.query_key_value(hidden, rope)
            self.latent_keys[index][:, :, n : n + 1] = key
            self.latent_values[index][:, :, n : n + 1] = value
            hidden = layer.finish(
                hidden, query, self.latent_keys[index][:, :, : n + 1], self.latent_values[index][:, :, : n + 1]
            )
        self.num_latents = n + 1
        return model.head(model.final_norm(hidden[:, -1]))


def _store(cache: Tensor, x: Tensor) -> None:
    """x into a cache view: converted to its dtype, or quantized with per-row scales for an int8 cache."""
    if cache.dtype == torch.int8:
        cpu_decode.store_int8_rows(cache, x)
    else:
        cache.copy_(x)


def window_logits(model: PerceiverAR, tokens: Tensor, window: Window) -> Tensor:
    """Reference: a full forward over exactly the window, last position's logits (B, V)."""
    return model(
        tokens[:, window.start : window.end], num_latents=window.num_latents, position_offset=window.start
    )[:, -1]


@dataclass
class Step:
    """What the stream yields per new token: the tokens (B,), the logits they were drawn from, the window."""

    tokens: Tensor
    logits: Tensor
    window: Window


@torch.no_grad()
def generate_stream(
    model: PerceiverAR,
    prompt: Tensor,
    max_new_tokens: int,
    options: SamplingOptions = SamplingOptions(),
    *,
    generator: torch.Generator | None = None,
    num_latents: int | None = None,
    refill_latents: int | None = None,
    use_cache: bool = True,
    logits_processor: Callable[[Tensor], Tensor] | None = None,
    stepper: PerceiverAR | None = None,
    forced_tokens: Tensor | None = None,
    cache_dtype: torch.dtype | None = None,
    refill_dtype: torch.dtype | None = None,
) -> Iterator[Step]:
    """Yield one Step per new token; stop consuming to stop generating (e.g. at a duration in seconds).

    `logits_processor` (B, V) -> (B, V) runs before sampling (e.g. music.PerformanceGuard); Step.logits stay the
    model's own. `stepper`: run cached steps on this `step_model(model, dtype)` (CPU speed; None = exact, the
    model itself; `step_weights_dtype` picks the dtype; build it once per model, it copies weights). `forced_tokens` (B, max_new_tokens): yield these
    instead of sampling (teacher forcing: scores a known continuation by the very path that samples).
    `cache_dtype`: keep the key/value caches in this dtype where the fused C step reads them; `refill_dtype`: run
    the prompt's prefill and the refills under this autocast dtype where it does (DecodeState).
    """
    if prompt.dim() != 2:
        raise ValueError(f"prompt must be (batch, length), got shape {tuple(prompt.shape)}")
    c = model.config
    n = c.num_latents if num_latents is None else num_latents
    if not 1 <= n <= c.max_context:
        raise ValueError(f"num_latents={n} is outside [1, {c.max_context}]")
    batch, prompt_length = prompt.shape
    total = prompt_length + max_new_tokens
    window = prompt_window(prompt_length, c.max_context, n, refill_latents)
    if use_cache:
        state = DecodeState(
            model,
            batch,
            total,
            prompt.device,
            stepper,
            num_latents=n,
            cache_dtype=cache_dtype,
            refill_dtype=refill_dtype,
        )
        state.shared_rows = batch > 1 and bool((prompt == prompt[:1]).all())
        state.tokens[:, : window.start] = prompt[:, : window.start]
        state.length = state.cross_start = window.start  # inputs before the window are never attended to
        state.append_inputs(prompt[:, window.start :])
    else:
        tokens = torch.zeros(batch, total, dtype=torch.long, device=prompt.device)
        tokens[:, :prompt_length] = prompt
    for produced in range(max_new_tokens):
        if produced:
            window = next_window(window, c.max_context, n, refill_latents)
        if use_cache:
            logits = state.refill(window) if window.refill else state.step(window)
        else:
            logits = window_logits(model, tokens, window)
        filtered = logits if logits_processor is None else logits_processor(logits)
        new_tokens = (
            sample_next(filtered, options, generator) if forced_tokens is None else forced_tokens[:, produced]
        )
        if use_cache:
            if produced + 1 < max_new_tokens:
                state.append_token(new_tokens)
        else:
            tokens[:, window.end] = new_tokens
        yield Step(new_tokens, logits if logits.dtype == torch.float32 else logits.float(), window)


def generate(
    model: PerceiverAR,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    num_latents: int | None = None,
    use_cache: bool = True,
    banned_tokens: tuple[int, ...] = (),
    on_token: Callable[[Step], None] | None = None,
    stepper: PerceiverAR | None = None,
    cache_dtype: torch.dtype | None = None,
    refill_dtype: torch.dtype | None = None,
) -> Tensor:
    """Prompt (B, T) -> (B, T + max_new_tokens). temperature=0 is greedy; a seeded generator is reproducible.
    `stepper`, `cache_dtype`, `refill_dtype`: as generate_stream's (None: the exact fp32 path)."""
    options = SamplingOptions(temperature, top_k, top_p, tuple(banned_tokens))
    was_training = model.training
    model.eval()
    pieces = [prompt]
    try:
        for step in generate_stream(
            model,
            prompt,
            max_new_tokens,
            options,
            generator=generator,
            num_latents=num_latents,
            use_cache=use_cache,
            stepper=stepper,
            cache_dtype=cache_dtype,
            refill_dtype=refill_dtype,
        ):
            pieces.append(step.tokens[:, None])
            if on_token is not None:
                on_token(step)
    finally:
        model.train(was_training)
    return torch.cat(pieces, dim=1)
