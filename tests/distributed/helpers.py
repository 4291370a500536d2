"""Build a distributed layer and its single-process twin holding the same global weights."""

from __future__ import annotations

import torch
import torch.distributed as dist

from flexmoe import MoELayer
from flexmoe.distributed import local_tensor
from flexmoe.parallel import HIDDEN_AXIS, SINGLE_PROCESS


def twin_layers(seed: int = 0, dtype: torch.dtype = torch.float64, **options) -> tuple[MoELayer, MoELayer]:
    """(single-process reference, distributed layer) in ``dtype``, eval, non-zero biases."""
    torch.manual_seed(seed)
    reference = MoELayer(group=SINGLE_PROCESS, **options).to(dtype).eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name.startswith("experts.b"):
                param.normal_(std=0.1)
    layer = MoELayer(group=dist.group.WORLD, **options).to(dtype).eval()
    load_global_weights(layer, reference)
    return reference, layer


def load_global_weights(layer: MoELayer, reference: MoELayer) -> None:
    """Copy the reference's router and this rank's shard of each global expert tensor (into the
    local shard of the layer's DTensor expert parameters)."""
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if not name.startswith("experts."):
                param.copy_(reference.get_parameter(name))
        for name, param in layer.experts.expert_parameters().items():
            local_tensor(param).copy_(layer.layout.shard(getattr(reference.experts, name), HIDDEN_AXIS[name]))


def local_slice(counts: list[int], rank: int) -> slice:
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


def reference_grads(reference: MoELayer, x: torch.Tensor, upstream: torch.Tensor, counts: list[int], **call):
    """Per-rank outputs and input grads, per-rank router grads, and the expert grads of the
    mean over ranks of ``(out_rank * upstream_rank).sum()`` (the layer's gradient convention)."""
    outputs, input_grads, router_grads = [], [], []
    reference.zero_grad(set_to_none=True)
    expert_sum = {name: torch.zeros_like(p) for name, p in reference.experts.expert_parameters().items()}
    for rank in range(len(counts)):
        part = x[local_slice(counts, rank)].clone().requires_grad_(True)
        out = reference(part, **call)
        (out * upstream[local_slice(counts, rank)]).sum().backward()
        outputs.append(out.detach())
        input_grads.append(part.grad)
        router_grads.append({n: p.grad.clone() for n, p in reference.router.named_parameters()})
        for name, param in reference.experts.expert_parameters().items():
            expert_sum[name] += param.grad
        reference.zero_grad(set_to_none=True)
    expert_mean = {name: grad / len(counts) for name, grad in expert_sum.items()}
    return outputs, input_grads, router_grads, expert_mean
