"""Typed configuration of the translation model, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from flexmoe.config import check_top_k

# What one routing decision covers in a stack: a token, a sentence, the target language
# (task = target language) or the language pair (task = source-target direction).
Routing = Literal["token", "sentence", "target", "langpair"]
ROUTINGS: tuple[str, ...] = get_args(Routing)


def check_int(name: str, value: object, minimum: int) -> None:
    """ValueError naming ``name`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_fraction(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """A pre-LN Transformer encoder-decoder with MoE FFNs every ``moe_every``-th layer.

    vocab_size: shared source/target vocabulary (one embedding, tied to the output layer).
    ffn_dim: hidden width of a dense FFN and of each expert.
    num_experts: 0 builds the dense variant (same shapes, every FFN dense).
    moe_every: layer ``i`` (0-based) of each stack is MoE when ``i % moe_every == moe_every - 1``
        (2: every other FFN, the second one first, as in GShard).
    encoder_routing, decoder_routing: ``"token"``, ``"sentence"``, ``"target"`` (task = target
        language) or ``"langpair"`` (task = direction), chosen separately per stack.
    num_target_langs, num_lang_pairs: sizes of the task tables of target/langpair routing.
    capacity_factor: 0 (dropless, default) keeps an extracted sub-network exactly equal to its parent.
    """

    vocab_size: int
    model_dim: int = 128
    num_heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    ffn_dim: int = 256
    num_experts: int = 8
    top_k: int = 2
    moe_every: int = 2
    encoder_routing: Routing = "token"
    decoder_routing: Routing = "target"
    num_target_langs: int = 1
    num_lang_pairs: int = 1
    capacity_factor: float = 0.0
    aux_loss_weight: float = 0.01
    dropout: float = 0.1
    max_len: int = 256
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3

    def __post_init__(self) -> None:
        for name, minimum in (
            ("vocab_size", 4),
            ("model_dim", 1),
            ("num_heads", 1),
            ("encoder_layers", 1),
            ("decoder_layers", 1),
            ("ffn_dim", 1),
            ("num_experts", 0),
            ("moe_every", 1),
            ("num_target_langs", 1),
            ("num_lang_pairs", 1),
            ("max_len", 2),
        ):
            check_int(name, getattr(self, name), minimum)
        if self.model_dim % self.num_heads:
            raise ValueError(f"model_dim ({self.model_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.num_experts == 1:
            raise ValueError("num_experts must be 0 (dense) or >= 2, got 1")
        if self.num_experts:
            check_top_k(self.top_k, self.num_experts)
        for name in ("encoder_routing", "decoder_routing"):
            if getattr(self, name) not in ROUTINGS:
                raise ValueError(f"{name} must be one of {ROUTINGS}, got {getattr(self, name)!r}")
        _check_fraction("dropout", self.dropout)
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name} must be in 0..vocab_size-1, got {getattr(self, name)!r}")

    @property
    def is_dense(self) -> bool:
        return self.num_experts == 0

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer ``index`` (0-based) of a stack has an MoE FFN."""
        return not self.is_dense and index % self.moe_every == self.moe_every - 1
