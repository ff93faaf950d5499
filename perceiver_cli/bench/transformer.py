"""The baseline the core benchmark compares against: a plain decoder-only Transformer with a KV cache.

GPT-2 shape (pre-LayerNorm, GELU MLP, tied head), rotary positions like ours, all attention through
scaled_dot_product_attention with is_causal: the strongest simple baseline, not a strawman.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model import MLP, PerceiverARConfig, apply_rotary, rotary_tables


class Block(nn.Module):
    def __init__(self, config: PerceiverARConfig):
        super().__init__()
        self.heads, self.head_dim = config.num_heads, config.head_dim
        self.norm = nn.LayerNorm(config.d_model)
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)
        self.norm_mlp = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, rope, cache: dict | None = None) -> Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).view(batch, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            end = cache["length"] + length
            cache["k"][:, :, cache["length"] : end] = k
            cache["v"][:, :, cache["length"] : end] = v
            k, v = cache["k"][:, :, :end], cache["v"][:, :, :end]
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1)
        x = x + self.out(mixed.transpose(1, 2).reshape(batch, length, -1))
        return x + self.mlp(self.norm_mlp(x))


class Transformer(nn.Module):
    def __init__(self, config: PerceiverARConfig, num_layers: int):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(config.d_model)

    def forward(
        self, tokens: Tensor, last_only: bool = False, caches: list | None = None, offset: int = 0
    ) -> Tensor:
        c = self.config
        positions = torch.arange(offset, offset + tokens.shape[1])[None]
        rope = rotary_tables(positions, c.rotary_dim, c.rotary_base, torch.float32)
        x = self.embedding(tokens)
        for index, block in enumerate(self.blocks):
            x = block(x, rope, caches[index] if caches else None)
        if caches:
            for cache in caches:
                cache["length"] += tokens.shape[1]
        x = self.final_norm(x[:, -1:] if last_only else x)
        return x @ self.embedding.weight.T

    def new_caches(self, batch: int, capacity: int) -> list[dict]:
        c = self.config
        shape = (batch, c.num_heads, capacity, c.head_dim)
        return [{"k": torch.empty(shape), "v": torch.empty(shape), "length": 0} for _ in self.blocks]

    @torch.no_grad()
    def decode(self, prompt: Tensor, new_tokens: int) -> Tensor:
        caches = self.new_caches(prompt.shape[0], prompt.shape[1] + new_tokens)
        logits = self(prompt, last_only=True, caches=caches)
        token = logits[:, -1].argmax(-1, keepdim=True)
        for step in range(new_tokens - 1):
            logits = self(token, caches=caches, offset=prompt.shape[1] + step)
            token = logits[:, -1].argmax(-1, keepdim=True)
        return token
