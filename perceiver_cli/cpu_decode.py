"""A whole cached decoding step in one call to a C kernel (cpu_decode.c), fp32 arithmetic, x86 with AVX-512.

A step of the bench config in PyTorch eager is ~1,200 small ops; at batch 1 their fixed costs, not the memory,
set the speed. `FusedStep` hands the C kernel pointers to the model's weights (the matrices in fp32, or the bf16
copies of a bf16 step_model) and to a DecodeState's caches once, then each step is one ctypes call (which
releases the GIL) with the newest tokens, their position (the kernel computes its rotary tables) and the cache
lengths. Same arithmetic as DecodeState.step in fp32 on those weights, up to the order of sums and a GELU/exp
accurate to ~2e-7; bf16 caches (DecodeState's cache_dtype) are read widened and written rounded, and batches of
BF16_PRODUCTS_ROWS or more rows on bf16 weights multiply bf16-rounded inputs on AVX512-BF16 (BENCHMARKS.md
"bf16 caches", "bf16 products"). int8 weights (an int8 step_model) and int8 caches carry an fp32 scale per row
and are widened and scaled as they are read (`--dtype int8`, BENCHMARKS.md "Stop 30"). On CPUs with AMX those
bf16 products run on AMX tiles (`amx_products`; BENCHMARKS.md "Stop 31"). Where the window holds at least as
many positions as the vocabulary has tokens, the cross-attention reads no cache: its keys and values come from
the projected vocabulary and each position's rotary tables (`vocabulary_attention`; BENCHMARKS.md "Stop 36").
Built and loaded by cpu_kernels.py; `available()` is False where that fails.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch
from torch import Tensor, nn

from .cpu_kernels import AVX512, load
from .device import cpu_flags
from .model import rotary_tables

SOURCE = Path(__file__).with_name("cpu_decode.c")
BF16_PRODUCTS_ROWS = 4
# From this many rows on, int8 weights widened to fp32 are slower than bf16 ones on vdpbf16ps (the products are
# compute-bound there): `--dtype int8` keeps bf16 step weights for such batches (benchmarks/ab/int8_decode.txt)
INT8_MAX_ROWS = 8
# FusedSteps built while this is True run their bf16 products on AMX tiles where the CPU and Linux allow it
# (benchmarks and tests turn it off to compare)
amx_products = True
# FusedSteps built while this is True take the cross-attention from the projected vocabulary (cpu_decode.c's
# attend_vocabulary) whenever the window holds at least as many positions as the vocabulary has tokens, instead
# of reading the cross-attention caches (benchmarks and tests turn it off to compare)
vocabulary_attention = True
_pointer = ctypes.c_void_p


class _Block(ctypes.Structure):
    _fields_ = [
        *((name, _pointer) for name in ("norm_weight", "norm_bias", "query", "key_value", "out")),
        *((name, _pointer) for name in ("norm_mlp_weight", "norm_mlp_bias", "up", "down", "keys", "values")),
        ("cache_strides", ctypes.c_long * 4),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_int) for name in ("batch", "d_model", "heads", "head_dim", "rotary_half", "hidden")),
        ("vocab", ctypes.c_int),
        ("layers", ctypes.c_int),
        ("weights_bf16", ctypes.c_int),
        ("caches_bf16", ctypes.c_int),
        ("products_bf16", ctypes.c_int),
        ("eps", ctypes.c_float),
        *((name, _pointer) for name in ("embedding", "final_weight", "final_bias", "head")),
        *((name, _pointer) for name in ("input_norm_weight", "input_norm_bias")),
        ("blocks", ctypes.POINTER(_Block)),
        ("inverse_frequencies", ctypes.POINTER(ctypes.c_double)),
        ("weights_int8", ctypes.c_int),
        ("caches_int8", ctypes.c_int),
        ("products_amx", ctypes.c_int),
        ("vocabulary", _pointer),
        ("vocabulary_from", ctypes.c_int),
        ("rotary_cos", _pointer),
        ("rotary_sin", _pointer),
        ("rotary_positions", ctypes.c_long),
    ]


@cache
def _kernel():
    library = load(SOURCE, AVX512)
    if library is None:
        return None
    step = library.f32_decode_step
    step.argtypes = (
        [ctypes.POINTER(_Model), _pointer, ctypes.c_long, ctypes.c_long] + [ctypes.c_int] * 4 + [_pointer] * 2
        + [ctypes.c_int] * 2
    )  # fmt: skip
    step.restype = ctypes.c_int
    workspace = library.f32_decode_workspace
    workspace.argtypes, workspace.restype = [ctypes.POINTER(_Model)], ctypes.c_long
    matvec = library.f32_matvec
    matvec.argtypes = [_pointer, ctypes.c_int, ctypes.c_int, _pointer, ctypes.c_int, _pointer, ctypes.c_int]
    matvec.restype = ctypes.c_int
    request_amx = library.decode_request_amx
    request_amx.argtypes, request_amx.restype = [], ctypes.c_int
    return step, workspace, matvec, request_amx


def available() -> bool:
    return _kernel() is not None


@cache
def amx_available() -> bool:
    """Whether the step can multiply on AMX tiles: the CPU has AMX and Linux grants the process its tile state."""
    return available() and {"amx_tile", "amx_bf16"} <= cpu_flags() and bool(_kernel()[3]())


def supports_model(model: nn.Module) -> bool:
    """The model's part of `supports`: fp32 CPU weights, sizes the kernel takes (multiples of 16), one LayerNorm
    eps, and the kernel built."""
    c = model.config
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    return (
        all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
        and c.d_model % 16 == 0
        and c.head_dim % 16 == 0
        and c.head_dim <= 128
        and int(c.d_model * c.mlp_ratio) % 16 == 0
        and len({m.eps for m in norms}) == 1
        and all(m.elementwise_affine and m.bias is not None for m in norms)
        and available()
    )


def supports_int8(model: nn.Module) -> bool:
    """`supports_model`, and sizes int8 weights take: d_model and the MLP width multiples of 64 (blocks of 64)."""
    c = model.config
    return supports_model(model) and c.d_model % 64 == 0 and int(c.d_model * c.mlp_ratio) % 64 == 0


def supports(model: nn.Module, state) -> bool:
    """`supports_model`, and caches stored as rows (without the kernel the cross-attention cache is transposed),
    all fp32 or all bf16."""
    caches = [state.cross_key, state.cross_value, *state.latent_keys, *state.latent_values]
    return (
        all(t is not None and t.stride(-1) == 1 for t in caches)
        and len({t.dtype for t in caches}) == 1
        and caches[0].dtype in (torch.float32, torch.bfloat16, torch.int8)
        and supports_model(model)
    )


class FusedStep:
    """Cached steps of `model` over the caches of one DecodeState (allocated before this is built).

    `weights`: where the products' weight matrices come from: `model` (fp32), or a generate.step_model copy
    whose matrices are all bf16 (half the bytes each step streams; widened to fp32 as they are loaded, so only
    the weights are rounded). Embedding and norms are always the model's fp32 ones; the caches are the state's,
    fp32 or bf16 (half the bytes each step reads from them; written rounded to nearest even, like a refill's)."""

    def __init__(
        self, model: nn.Module, state, weights: nn.Module | None = None, vocabulary_from: int | None = None
    ) -> None:
        c = model.config
        self.model, self.batch = model, state.batch
        self.keep: list[Tensor] = []  # every tensor whose address the kernel holds
        source = model if weights is None else weights
        blocks = [source.cross_attention, *source.layers]
        matrices = [source.head.weight] + [
            product.weight
            for b in blocks
            for product in (b.attention.query, b.attention.key_value, b.attention.out, b.mlp.up, b.mlp.down)
        ]
        hidden = int(c.d_model * c.mlp_ratio)
        self.weights_bf16 = (
            all(w.dtype == torch.bfloat16 for w in matrices) and c.d_model % 32 == 0 and hidden % 32 == 0
        )
        self.weights_int8 = all(w.dtype == torch.int8 for w in matrices)
        if self.weights_int8 and not supports_int8(model):
            raise ValueError("int8 step weights need d_model and the MLP width to be multiples of 64")
        if not (self.weights_bf16 or self.weights_int8):
            source = model  # fp32 copies, a mix, or sizes bf16 blocks do not divide: the model's own fp32 matrices
        # From BF16_PRODUCTS_ROWS rows on, the products are compute-bound (0.9 GFLOP a step of the bench config at
        # batch 16): with bf16 weights and AVX512-BF16 they take their input rows rounded to bf16 and run on
        # vdpbf16ps, twice the multiply-adds an instruction (BENCHMARKS.md "bf16 products"). One row stays fp32.
        self.products_bf16 = (
            self.weights_bf16 and state.batch >= BF16_PRODUCTS_ROWS and "avx512_bf16" in cpu_flags()
        )
        # where the CPU has AMX, one tdpbf16ps does a 4 x 16 x 32 block of those multiply-adds
        self.products_amx = self.products_bf16 and amx_products and amx_available()

        address = self._hold

        def packed(linear: nn.Module) -> int:  # a copy in the layout the products stream (pack, pack_int8)
            weight = linear.weight.detach()
            return address(pack_int8(weight, linear.scale) if weight.dtype == torch.int8 else pack(weight))

        def block(module, products, keys: Tensor, values: Tensor) -> _Block:
            norm = module.norm_query if hasattr(module, "norm_query") else module.norm
            attention = products.attention
            assert keys.stride() == values.stride()
            self.keep += [keys, values]
            return _Block(
                address(norm.weight), address(norm.bias),
                packed(attention.query), packed(attention.key_value), packed(attention.out),
                address(module.norm_mlp.weight), address(module.norm_mlp.bias),
                packed(products.mlp.up), packed(products.mlp.down),
                keys.data_ptr(), values.data_ptr(), (ctypes.c_long * 4)(*keys.stride()),
            )  # fmt: skip

        blocks = [block(model.cross_attention, source.cross_attention, state.cross_key, state.cross_value)]
        caches = zip(model.layers, source.layers, state.latent_keys, state.latent_values, strict=True)
        blocks += [block(layer, products, keys, values) for layer, products, keys, values in caches]
        self.blocks = (_Block * len(blocks))(*blocks)
        # model.rotary_tables' frequencies in float64: the kernel computes each step's tables from the position
        half = c.rotary_dim // 2
        self.inverse_frequencies = (ctypes.c_double * half)(
            *(c.rotary_base ** (-(2 * i) / c.rotary_dim) for i in range(half))
        )
        vocabulary, self.vocabulary_from = self._vocabulary(model, source, state, vocabulary_from)
        self.spec = _Model(
            state.batch, c.d_model, c.num_heads, c.head_dim, half, hidden,
            c.vocab_size, c.num_layers, int(self.weights_bf16), int(state.cross_key.dtype == torch.bfloat16),
            int(self.products_bf16), model.final_norm.eps,
            address(model.embedding.weight), address(model.final_norm.weight), address(model.final_norm.bias),
            packed(source.head),
            address(model.cross_attention.norm_inputs.weight), address(model.cross_attention.norm_inputs.bias),
            ctypes.cast(self.blocks, ctypes.POINTER(_Block)),
            ctypes.cast(self.inverse_frequencies, ctypes.POINTER(ctypes.c_double)), int(self.weights_int8),
            int(state.cross_key.dtype == torch.int8), int(self.products_amx),
            *vocabulary,
        )  # fmt: skip
        self.step, workspace_bytes = _kernel()[:2]
        self.workspace = torch.empty(workspace_bytes(ctypes.byref(self.spec)) // 4)
        self.logits = torch.empty(state.batch, c.vocab_size)
        # every argument but the step's own, converted once: at ~1 ms a step, tens of microseconds of Python count
        self.spec_reference = ctypes.byref(self.spec)
        self.logits_address, self.workspace_address = self.logits.data_ptr(), self.workspace.data_ptr()
        self._checked_tokens: Tensor | None = None  # the tokens tensor last checked (DecodeState's, every step)

    def _hold(self, t: Tensor) -> int:
        """The address of `t` (contiguous), kept alive as long as this step."""
        t = t.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        self.keep.append(t)
        return t.data_ptr()

    def _vocabulary(self, model: nn.Module, source: nn.Module, state, vocabulary_from: int | None) -> tuple:
        """The spec's fields of attend_vocabulary, and from how many window positions on it runs (None: never).

        The table holds, for every token, the cross-attention's key before the rotary and its value: the input
        norm of its embedding times the key/value weight the step's products use (widened from bf16, or int8
        times its scales), in fp32, so a step on it computes what the caches' path computes from exact
        keys/values. Positions' rotary tables are model.rotary_tables' for every column of the state's tokens.
        Only where the window can hold as many positions as the vocabulary has tokens: a table of 8,000 tokens
        costs more to read per step than 4,096 cached positions."""
        c = model.config
        vocabulary_from = c.vocab_size if vocabulary_from is None else max(1, vocabulary_from)
        if not vocabulary_attention or vocabulary_from > state.cross_capacity:
            return (None, 0, None, None, 0), None
        key_value = source.cross_attention.attention.key_value
        weight = key_value.weight.detach().float()
        if getattr(key_value, "scale", None) is not None:  # int8 step weights
            weight = weight * key_value.scale[:, None]
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            normed = model.cross_attention.norm_inputs(model.embedding.weight.detach().float())
            table = normed @ weight.T  # (V, 2D)
            positions = torch.arange(state.tokens.shape[1])
            cos, sin = rotary_tables(positions, c.rotary_dim, c.rotary_base, torch.float32)
        fields = (self._hold(table), vocabulary_from, self._hold(cos), self._hold(sin), positions.numel())
        return fields, vocabulary_from

    def __call__(
        self,
        tokens: Tensor,
        position: int,
        cross_length: int,
        num_latents: int,
        append: bool = False,
        shared_cross: int = 0,
        shared_latents: int = 0,
    ) -> Tensor:
        """Logits (B, V) of the newest tokens, column `position` of `tokens` (B, T) (int64, e.g. DecodeState.tokens:
        the kernel reads the column in place); writes their latent keys/values at slot num_latents, and with
        `append` also their cross-attention keys/values at slot cross_length - 1. `shared_cross`/`shared_latents`:
        that many first slots of the cross-attention / latent caches are the same in every row (one prompt for
        the batch), so every row reads row 0's: those bytes come from memory once a step instead of once a row."""
        if tokens is not self._checked_tokens:  # checked once: after a step's memory traffic each op runs cold
            if tokens.dtype != torch.long or tokens.device.type != "cpu" or tokens.dim() != 2:
                raise ValueError(f"tokens must be a ({self.batch}, length) int64 CPU tensor")
            if tokens.shape[0] != self.batch:
                raise ValueError(f"tokens must be a ({self.batch}, length) int64 CPU tensor")
            if self.vocabulary_from is not None and tokens.stride(1) != 1:  # the C step reads the window's row
                raise ValueError("tokens must have contiguous rows where the step attends from the vocabulary")
            self._checked_tokens, self._length = tokens, tokens.shape[1]
            self._address, self._column_bytes, self._row_stride = (
                tokens.data_ptr(),
                tokens.stride(1) * 8,
                tokens.stride(0),
            )
        if not 0 <= position < self._length:
            raise ValueError(f"position {position} is outside the tokens' {self._length} columns")
        status = self.step(
            self.spec_reference, self._address + position * self._column_bytes, self._row_stride, position,
            cross_length, num_latents, int(append), torch.get_num_threads(), self.logits_address,
            self.workspace_address, shared_cross, shared_latents,
        )  # fmt: skip
        if status:
            raise RuntimeError(f"cpu_decode kernel failed with status {status}")
        return self.logits.clone()


def pack(weight: Tensor) -> Tensor:
    """An (out, in) fp32 or bf16 weight in the layout cpu_decode.c's products stream: per group of four output
    rows (the last padded with zero rows), 64-byte blocks of the four rows in turn; a bf16 block holds elements
    i..i+31 of its row as pairs (i + k, i + 16 + k). `in` must be a multiple of 16 (fp32) or 32 (bf16)."""
    out, inner = weight.shape
    per_block = 16 if weight.dtype == torch.float32 else 32
    if weight.dtype not in (torch.float32, torch.bfloat16) or inner % per_block:
        raise ValueError(f"cannot pack a {tuple(weight.shape)} {weight.dtype} weight")
    groups = -(-out // 4)
    padded = torch.nn.functional.pad(weight, (0, 0, 0, 4 * groups - out))
    if per_block == 16:  # [group][block][row of 4][16 values]
        return padded.reshape(groups, 4, inner // 16, 16).permute(0, 2, 1, 3).contiguous()
    # [group][block][row of 4][16 pairs (k, 16 + k)]
    return padded.reshape(groups, 4, inner // 32, 2, 16).permute(0, 2, 1, 4, 3).contiguous()


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 values, fp32 scale per row of the last dimension) with weight ~= values * scale[..., None]: each
    row's largest magnitude maps to 127, every value rounded to the nearest step, ties to even (symmetric, no
    zero point). cpu_decode.c's store_int8_row does the same fp32 operations for the rows a step caches."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=-1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    return torch.round(weight / scale[..., None]).clamp(-127, 127).to(torch.int8), scale


def store_int8_rows(cache: Tensor, x: Tensor) -> None:
    """x (..., D) into an int8 cache view (..., D + 4): each row quantized (quantize_int8), its fp32 scale in the
    row's last 4 bytes, where the C step reads it."""
    values, scale = quantize_int8(x)
    cache[..., : x.shape[-1]] = values
    cache[..., x.shape[-1] :] = scale[..., None].view(torch.int8)


def load_int8_rows(cache: Tensor, dtype: torch.dtype) -> Tensor:
    """The (..., D) values an int8 cache view (..., D + 4) holds, dequantized to `dtype`."""
    head_dim = cache.shape[-1] - 4
    scale = cache[..., head_dim:].contiguous().view(torch.float32)
    return (cache[..., :head_dim].float() * scale).to(dtype)


def pack_int8(weight: Tensor, scale: Tensor) -> Tensor:
    """An (out, in) int8 weight and its (out,) fp32 scales as one uint8 buffer for cpu_decode.c's products: the
    scales padded to whole groups of four rows (and to 64 bytes), then per group 64-byte blocks of 64 values of
    each of the four rows in turn (the last group padded with zero rows). `in` must be a multiple of 64."""
    out, inner = weight.shape
    if weight.dtype != torch.int8 or inner % 64 or scale.shape != (out,):
        raise ValueError(f"cannot pack a {tuple(weight.shape)} {weight.dtype} weight as int8")
    groups = -(-out // 4)
    scales = torch.zeros(-(-groups * 4 // 16) * 16)  # fp32, whole 64-byte lines (int8_scale_bytes in the C)
    scales[:out] = scale.float()
    padded = torch.nn.functional.pad(weight, (0, 0, 0, 4 * groups - out))
    blocks = padded.reshape(groups, 4, inner // 64, 64).permute(0, 2, 1, 3).contiguous()
    return torch.cat([scales.view(torch.uint8), blocks.view(torch.uint8).flatten()])


class PackedWeight:
    """An fp32 weight packed once for `linear` (pack)."""

    def __init__(self, weight: Tensor) -> None:
        self.out_features, self.in_features = weight.shape
        self.data = pack(weight.float())


def linear(x: Tensor, weight: Tensor | PackedWeight) -> Tensor:
    """x (rows, in) @ weight (out, in)^T by the fused step's own product, fp32 (for benchmarks and tests); pass a
    PackedWeight to time the product without the packing."""
    packed = weight if isinstance(weight, PackedWeight) else PackedWeight(weight)
    x = x.contiguous()
    y = torch.empty(x.shape[0], packed.out_features)
    status = _kernel()[2](
        packed.data.data_ptr(), packed.out_features, packed.in_features, x.data_ptr(), x.shape[0], y.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if status:
        raise RuntimeError(f"cpu_decode matvec failed with status {status}")
    return y
