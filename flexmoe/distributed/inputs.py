"""A DTensor as an MoE layer's input: the layer is token-wise, so it runs on the local shard.

Every token's output depends on that token alone (and, for an expert-parallel layer, on the
experts its group holds), so an input sharded over any token dimension (``Shard(d)`` with ``d``
not the last, feature dimension) or replicated gives the output of the same global shape and
placements, computed on ``x.to_local()``; the gradient flows back through ``to_local``. A
feature-sharded or partial input would need the whole token first: refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard


def check_token_placements(x: DTensor) -> None:
    """Raise TypeError unless every placement of ``x`` is Replicate or Shard on a token dimension."""
    for placement in x.placements:
        if isinstance(placement, Replicate):
            continue
        if isinstance(placement, Shard) and placement.dim % x.ndim != x.ndim - 1:
            continue
        raise TypeError(
            f"x is a DTensor with placements {tuple(x.placements)}; an MoE layer takes a DTensor input sharded "
            "over token dimensions (Shard(d), d < x.ndim - 1) or replicated: redistribute it first "
            "(x.redistribute(placements=...)) or pass x.full_tensor() / x.to_local()"
        )


def run_on_local_shard(forward: Callable[..., torch.Tensor], x: DTensor, call: dict[str, Any]) -> DTensor:
    """``forward(x.to_local(), **call)`` (DTensor arguments in ``call`` taken as their local
    shards too) as a DTensor placed as ``x``: x [..., model_dim] -> [..., model_dim]."""
    check_token_placements(x)
    local_call = {name: value.to_local() if isinstance(value, DTensor) else value for name, value in call.items()}
    out = forward(x.to_local(), **local_call)
    stride = torch.empty(x.shape, device="meta").stride()
    return DTensor.from_local(out, x.device_mesh, x.placements, run_check=False, shape=x.shape, stride=stride)
