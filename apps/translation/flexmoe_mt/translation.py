"""The multilingual translation model: a pre-LN Transformer encoder-decoder with MoE FFNs.

Every ``moe_every``-th FFN of each stack is a :class:`~flexmoe.MoELayer` whose routing
granularity is chosen per stack (token / sentence / target language / language pair); the
others are dense. Embeddings are shared between encoder, decoder and output layer. The
target-language (or language-pair) id of each sentence is the ``task_ids`` of the MoE layers,
so a target-routed decoder reduces to a dense network per language with ``extract_task``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flexmoe.layer import MoELayer
from flexmoe.routing.granularity import sentence_means
from flexmoe_mt.config import ModelConfig, Routing

# Cache of one decoder layer: self-attention keys/values so far and the encoder's keys/values.
LayerCache = dict[str, torch.Tensor]


class FeedForward(nn.Module):
    """Dense FFN, call-compatible with MoELayer. x: [..., model_dim] -> same shape."""

    def __init__(self, model_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(model_dim, hidden_dim), nn.Linear(hidden_dim, model_dim)

    def forward(self, x: torch.Tensor, **_routing: object) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head attention. query: [B, Tq, D], key_value: [B, Tk, D]; keep: bool, broadcastable
    to [B, heads, Tq, Tk], True where attention is allowed."""

    def __init__(self, model_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.query, self.key, self.value = (nn.Linear(model_dim, model_dim) for _ in range(3))
        self.out = nn.Linear(model_dim, model_dim)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, heads, T, D / heads]."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def keys_values(self, key_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_heads(self.key(key_value)), self.split_heads(self.value(key_value))

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor | None):
        q = self.split_heads(self.query(query))
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=keep, dropout_p=dropout)
        return self.out(out.transpose(1, 2).flatten(2))

    def forward(self, query: torch.Tensor, key_value: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        return self.attend(query, *self.keys_values(key_value), keep)


def make_ffn(config: ModelConfig, index: int, routing: Routing, group: Any = None) -> nn.Module:
    """The FFN of layer ``index`` of a stack routed by ``routing``: MoE or dense. ``group``: the
    MoE layers' process group (``MoELayer``'s rule: None = local, every expert in this process)."""
    if not config.is_moe_layer(index):
        return FeedForward(config.model_dim, config.ffn_dim)
    num_tasks = {"target": config.num_target_langs, "langpair": config.num_lang_pairs}.get(routing)
    return MoELayer(
        model_dim=config.model_dim,
        num_experts=config.num_experts,
        hidden_dim=config.ffn_dim,
        top_k=config.top_k,
        capacity_factor=config.capacity_factor,
        aux_loss_weight=config.aux_loss_weight,
        granularity="task" if num_tasks else routing,
        num_tasks=num_tasks,
        group=group,
    )


class EncoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int, group: Any = None) -> None:
        super().__init__()
        self.attn_norm, self.ffn_norm = nn.LayerNorm(config.model_dim), nn.LayerNorm(config.model_dim)
        self.attn = Attention(config.model_dim, config.num_heads, config.dropout)
        self.ffn = make_ffn(config, index, config.encoder_routing, group)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """x: [B, S, D]; padding: [B, S] bool (True = pad); task_ids: [B]."""
        h = self.attn_norm(x)
        x = x + self.drop(self.attn(h, h, ~padding[:, None, None, :]))
        return x + self.drop(self.ffn(self.ffn_norm(x), padding_mask=padding, task_ids=task_ids))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int, group: Any = None) -> None:
        super().__init__()
        dim = config.model_dim
        self.self_norm, self.cross_norm, self.ffn_norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, config.num_heads, config.dropout)
        self.cross_attn = Attention(dim, config.num_heads, config.dropout)
        self.ffn = make_ffn(config, index, config.decoder_routing, group)
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self,
        y: torch.Tensor,
        memory: torch.Tensor,
        source_keep: torch.Tensor,
        padding: torch.Tensor | None,
        task_ids: torch.Tensor,
        sentence: torch.Tensor,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """y: [B, T, D] new target positions; memory: [B, S, D]; source_keep: [B, 1, 1, S];
        padding: [B, T] or None; sentence: [B, D] the source sentence (router input of a
        sentence-routed FFN). With ``cache``, y holds only the positions after those cached
        (decoding step by step) and the cache is extended in place."""
        h = self.self_norm(y)
        keys, values = self.self_attn.keys_values(h)
        if cache is not None and "self_keys" in cache:
            keys = torch.cat([cache["self_keys"], keys], dim=2)
            values = torch.cat([cache["self_values"], values], dim=2)
        if cache is not None:
            cache["self_keys"], cache["self_values"] = keys, values
        new, total = y.shape[1], keys.shape[2]
        causal = torch.ones(new, total, dtype=torch.bool, device=y.device).tril(total - new)
        y = y + self.drop(self.self_attn.attend(h, keys, values, causal))
        h = self.cross_norm(y)
        if cache is not None and "cross_keys" not in cache:
            cache["cross_keys"], cache["cross_values"] = self.cross_attn.keys_values(memory)
        if cache is not None:
            cross = self.cross_attn.attend(h, cache["cross_keys"], cache["cross_values"], source_keep)
        else:
            cross = self.cross_attn(h, memory, source_keep)
        y = y + self.drop(cross)
        ffn_out = self.ffn(self.ffn_norm(y), padding_mask=padding, task_ids=task_ids, sentence_inputs=sentence)
        return y + self.drop(ffn_out)


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """[length, dim] fixed sine/cosine position codes (Vaswani et al.)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    codes = torch.zeros(length, dim)
    codes[:, 0::2] = torch.sin(position * rate)
    codes[:, 1::2] = torch.cos(position * rate[: dim // 2])
    return codes


class TranslationModel(nn.Module):
    """Encoder-decoder translation model. See :class:`ModelConfig` for its shape and routing.

    Token ids: source ``[B, S]`` (``<2xx>`` tag first, ``eos`` last, ``pad_id`` after), target
    input ``[B, T]`` (``bos`` first). ``target_lang``/``lang_pair``: ``[B]`` task ids.
    After a forward, :meth:`aux_loss` is the sum of the MoE layers' balance losses.
    ``group``: the MoE layers' process group (``MoELayer``'s rule: a process group shards the
    experts over it; None keeps them all in this process).
    """

    def __init__(self, config: ModelConfig, group: Any = None) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.model_dim, padding_idx=config.pad_id)
        nn.init.normal_(self.embedding.weight, std=config.model_dim**-0.5)
        self.register_buffer("positions", sinusoidal_positions(config.max_len, config.model_dim))
        self.encoder = nn.ModuleList(EncoderLayer(config, i, group) for i in range(config.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(config, i, group) for i in range(config.decoder_layers))
        self.encoder_norm, self.decoder_norm = nn.LayerNorm(config.model_dim), nn.LayerNorm(config.model_dim)
        self.drop = nn.Dropout(config.dropout)

    def moe_layers(self) -> list[nn.Module]:
        """The MoE FFNs (or the dense blocks extraction left in their place)."""
        return [layer.ffn for layer in [*self.encoder, *self.decoder] if not isinstance(layer.ffn, FeedForward)]

    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE layers' aux losses from the last forward (scalar)."""
        losses = [layer.aux_loss for layer in self.moe_layers() if isinstance(layer, MoELayer)]
        return torch.stack(losses).sum() if losses else self.embedding.weight.new_zeros(())

    def task_ids(self, routing: Routing, target_lang: torch.Tensor, lang_pair: torch.Tensor) -> torch.Tensor:
        return lang_pair if routing == "langpair" else target_lang

    def embed(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """tokens: [B, T] -> [B, T, D], scaled embedding plus positions offset..offset+T-1."""
        length = tokens.shape[1]
        if offset + length > self.config.max_len:
            raise ValueError(f"sequence of {offset + length} tokens exceeds max_len={self.config.max_len}")
        x = self.embedding(tokens) * math.sqrt(self.config.model_dim)
        return self.drop(x + self.positions[offset : offset + length].to(x.dtype))

    def encode(self, source: torch.Tensor, target_lang: torch.Tensor, lang_pair: torch.Tensor) -> torch.Tensor:
        """source: [B, S] -> memory [B, S, D]."""
        padding = source == self.config.pad_id
        task_ids = self.task_ids(self.config.encoder_routing, target_lang, lang_pair)
        x = self.embed(source)
        for layer in self.encoder:
            x = layer(x, padding, task_ids)
        return self.encoder_norm(x)

    def decode(
        self,
        target_in: torch.Tensor,
        memory: torch.Tensor,
        source: torch.Tensor,
        target_lang: torch.Tensor,
        lang_pair: torch.Tensor,
        cache: list[LayerCache] | None = None,
        offset: int = 0,
    ) -> torch.Tensor:
        """target_in: [B, T] (positions offset..offset+T-1) -> logits [B, T, vocab]."""
        source_keep = (source != self.config.pad_id)[:, None, None, :]
        # Step-by-step decoding has no padding yet; in training, pad positions are masked.
        padding = None if cache is not None else target_in == self.config.pad_id
        task_ids = self.task_ids(self.config.decoder_routing, target_lang, lang_pair)
        # Sentence routing in the decoder goes by the source sentence (the mean of the encoder
        # output over its tokens): the target's own mean would, under teacher forcing, include
        # tokens that step-by-step decoding has not produced yet.
        sentence = sentence_means(memory, source == self.config.pad_id)
        y = self.embed(target_in, offset)
        for i, layer in enumerate(self.decoder):
            y = layer(y, memory, source_keep, padding, task_ids, sentence, None if cache is None else cache[i])
        return self.decoder_norm(y) @ self.embedding.weight.T

    def forward(
        self, source: torch.Tensor, target_in: torch.Tensor, target_lang: torch.Tensor, lang_pair: torch.Tensor
    ) -> torch.Tensor:
        """source [B, S], target_in [B, T], target_lang [B], lang_pair [B] -> logits [B, T, vocab]."""
        memory = self.encode(source, target_lang, lang_pair)
        return self.decode(target_in, memory, source, target_lang, lang_pair)

    @torch.no_grad()
    def generate(
        self,
        source: torch.Tensor,
        target_lang: torch.Tensor,
        lang_pair: torch.Tensor,
        max_new_tokens: int = 64,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Greedy decoding. source: [B, S] -> [B, <= max_new_tokens] token ids (no ``bos``;
        ``pad_id`` after each sentence's ``eos``)."""
        config = self.config
        max_new_tokens = min(max_new_tokens, config.max_len - 1)
        memory = self.encode(source, target_lang, lang_pair)
        cache: list[LayerCache] | None = [{} for _ in self.decoder] if use_cache else None
        generated = source.new_full((source.shape[0], 1), config.bos_id)
        finished = torch.zeros(source.shape[0], dtype=torch.bool, device=source.device)
        for step in range(max_new_tokens):
            if use_cache:
                logits = self.decode(generated[:, -1:], memory, source, target_lang, lang_pair, cache, offset=step)
            else:
                logits = self.decode(generated, memory, source, target_lang, lang_pair)
            next_token = logits[:, -1].argmax(-1).masked_fill(finished, config.pad_id)
            generated = torch.cat([generated, next_token[:, None]], dim=1)
            finished |= next_token == config.eos_id
            if bool(finished.all()):
                break
        return generated[:, 1:]

    @torch.no_grad()
    def beam_search(
        self,
        source: torch.Tensor,
        target_lang: torch.Tensor,
        lang_pair: torch.Tensor,
        beam_size: int = 4,
        max_new_tokens: int = 64,
        length_penalty: float = 1.0,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Beam search. source: [B, S] -> [B, <= max_new_tokens] ids of each sentence's best
        hypothesis by ``log p / length ** length_penalty`` (``pad_id`` after ``eos``).
        ``beam_size = 1`` is greedy decoding."""
        if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
            raise ValueError(f"beam_size must be an int >= 1, got {beam_size!r}")
        config = self.config
        batch, vocab = source.shape[0], config.vocab_size
        max_new_tokens = min(max_new_tokens, config.max_len - 1)
        # Every sentence becomes beam_size rows: [B * beam, ...], beams of a sentence adjacent.
        source, target_lang, lang_pair = (t.repeat_interleave(beam_size, 0) for t in (source, target_lang, lang_pair))
        memory = self.encode(source, target_lang, lang_pair)
        cache: list[LayerCache] | None = [{} for _ in self.decoder] if use_cache else None
        generated = source.new_full((batch * beam_size, 1), config.bos_id)
        scores = torch.full((batch, beam_size), -math.inf, device=source.device)
        scores[:, 0] = 0.0  # one live hypothesis per sentence at the start
        finished = torch.zeros(batch * beam_size, dtype=torch.bool, device=source.device)
        for step in range(max_new_tokens):
            if cache is not None:
                logits = self.decode(generated[:, -1:], memory, source, target_lang, lang_pair, cache, offset=step)
            else:
                logits = self.decode(generated, memory, source, target_lang, lang_pair)
            log_probs = F.log_softmax(logits[:, -1].float(), dim=-1)
            # A finished hypothesis only extends with pad, at no cost.
            log_probs[finished] = -math.inf
            log_probs[finished, config.pad_id] = 0.0
            candidates = (scores.unsqueeze(-1) + log_probs.view(batch, beam_size, vocab)).view(batch, -1)
            scores, index = candidates.topk(beam_size, dim=-1)
            rows = (torch.arange(batch, device=source.device)[:, None] * beam_size + index // vocab).view(-1)
            tokens = (index % vocab).view(-1)
            generated = torch.cat([generated[rows], tokens[:, None]], dim=1)
            finished = finished[rows] | (tokens == config.eos_id)
            if cache is not None:  # each surviving hypothesis takes its parent's keys and values
                for layer_cache in cache:
                    for key in ("self_keys", "self_values"):
                        layer_cache[key] = layer_cache[key][rows]
            if bool(finished.all()):
                break
        lengths = (generated[:, 1:] != config.pad_id).sum(-1).clamp_min(1).view(batch, beam_size)
        best = (scores / lengths.float() ** length_penalty).argmax(-1)
        rows = torch.arange(batch, device=source.device) * beam_size + best
        return generated[rows, 1:]
