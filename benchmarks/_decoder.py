"""A small pre-LN Transformer decoder with a KV cache, for benchmarks/task_inference.py (not library API).

Every ``moe_every``-th layer's FFN (layers 1, 3, ... for 2; every layer for 1) is a "sparse
position": an MoE layer routed by token or by task, or a plain dense MLP (the dense baseline).
The other layers' FFNs are dense.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from flexmoe import MoELayer

SparseFFN = Literal["token", "task", "dense"]


@dataclass(frozen=True)
class DecoderSize:
    vocab: int
    model_dim: int
    heads: int
    layers: int
    hidden_dim: int  # dense FFN width and each expert's width
    num_experts: int
    top_k: int
    num_tasks: int
    max_len: int
    moe_every: int = 2  # 2: MoE FFN in every other layer (the paper's models); 1: in every layer

    def is_sparse(self, layer: int) -> bool:
        """Whether layer ``layer``'s FFN is a sparse position (MoE, or its dense stand-in)."""
        return layer % self.moe_every == self.moe_every - 1

    @property
    def sparse_layers(self) -> int:
        return sum(self.is_sparse(i) for i in range(self.layers))


class KVCache:
    """Keys and values of the positions decoded so far: [batch, heads, max_len, head_dim] each."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, like: torch.Tensor) -> None:
        self.keys = like.new_empty(batch, heads, max_len, head_dim)
        self.values = like.new_empty(batch, heads, max_len, head_dim)
        self.length = 0

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values: [batch, heads, new, head_dim] -> all cached [batch, heads, length, head_dim]."""
        end = self.length + keys.shape[2]
        self.keys[:, :, self.length : end] = keys
        self.values[:, :, self.length : end] = values
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, model_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(model_dim, 3 * model_dim)
        self.out = nn.Linear(model_dim, model_dim)

    def forward(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """x: [batch, new, model_dim]; the new positions follow the cached ones."""
        batch, new, dim = x.shape
        q, k, v = self.qkv(x).view(batch, new, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.append(k, v)
        # A single new token sees everything cached; a chunk from an empty cache is causal.
        if past and new > 1:
            raise ValueError("chunks after the first must be one token long")
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=new > 1)
        return self.out(attended.transpose(1, 2).reshape(batch, new, dim))


class DenseMLP(nn.Module):
    def __init__(self, model_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(model_dim, hidden_dim), nn.Linear(hidden_dim, model_dim)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, size: DecoderSize, ffn: nn.Module) -> None:
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.LayerNorm(size.model_dim), nn.LayerNorm(size.model_dim)
        self.attention = CausalSelfAttention(size.model_dim, size.heads)
        self.ffn = ffn

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cache)
        return x + self.ffn(self.ffn_norm(x), task_ids=task_ids)


def sparse_ffn(size: DecoderSize, kind: SparseFFN) -> nn.Module:
    """The FFN of a sparse position: MoE routed by token or task, or dense of the sub-network's width."""
    if kind == "dense":
        return DenseMLP(size.model_dim, size.top_k * size.hidden_dim)
    task = dict(granularity="task", num_tasks=size.num_tasks) if kind == "task" else {}
    options = dict(num_experts=size.num_experts, hidden_dim=size.hidden_dim, top_k=size.top_k, capacity_factor=0.0)
    return MoELayer(model_dim=size.model_dim, aux_loss=None, **options, **task)


class Decoder(nn.Module):
    """tokens [batch, seq] (int64), task_ids [batch] -> logits [batch, seq, vocab]."""

    def __init__(self, size: DecoderSize, kind: SparseFFN) -> None:
        super().__init__()
        self.size = size
        self.embedding = nn.Embedding(size.vocab, size.model_dim)
        self.position = nn.Embedding(size.max_len, size.model_dim)
        # Small positions (GPT-2 style): with N(0, 1) positions as large as the tokens, the rows of a
        # decoding step (all at one position) look alike to a router at initialisation, and a
        # token-routed layer sends them to a few experts (about 16 of 32 at batch 128). A trained
        # token-MoE with a balance loss spreads them; with small positions this one does too.
        nn.init.normal_(self.position.weight, std=0.02)
        self.blocks = nn.ModuleList(
            Block(size, sparse_ffn(size, kind) if size.is_sparse(i) else DenseMLP(size.model_dim, size.hidden_dim))
            for i in range(size.layers)
        )
        self.norm = nn.LayerNorm(size.model_dim)
        self.head = nn.Linear(size.model_dim, size.vocab, bias=False)

    def forward(
        self, tokens: torch.Tensor, task_ids: torch.Tensor, caches: list[KVCache] | None = None
    ) -> torch.Tensor:
        start = 0 if caches is None else caches[0].length
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        x = self.embedding(tokens) + self.position(positions)
        for i, block in enumerate(self.blocks):
            x = block(x, task_ids, None if caches is None else caches[i])
        return self.head(self.norm(x))

    def new_caches(self, batch: int, like: torch.Tensor) -> list[KVCache]:
        size = self.size
        return [
            KVCache(batch, size.heads, size.max_len, size.model_dim // size.heads, like) for _ in range(size.layers)
        ]


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    task_ids: torch.Tensor,
    new_tokens: int,
    after_prefill: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Greedy decoding with a KV cache. prompt: [batch, prompt_len] -> new tokens [batch, new_tokens].

    ``model`` is a :class:`Decoder` or a sub-network extracted from one (same forward).
    ``after_prefill`` is called once the prompt is processed, before the first decoding step
    (a timer's mark)."""
    if prompt.shape[1] + new_tokens > model.size.max_len:
        raise ValueError(f"prompt + new_tokens must be <= max_len={model.size.max_len}")
    caches = model.new_caches(prompt.shape[0], model.embedding.weight)
    logits = model(prompt, task_ids, caches)
    if after_prefill is not None:
        after_prefill()
    generated = []
    for _ in range(new_tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)
        generated.append(token)
        logits = model(token, task_ids, caches)
    return torch.cat(generated, dim=1)


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
