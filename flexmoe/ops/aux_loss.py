"""Attach an auxiliary loss to a layer's output so that its gradient flows in the output's backward.

A balance loss kept as a side attribute reaches the router only if every training loop adds it
to the loss, and not at all under reentrant activation checkpointing (the checkpointed forward
runs without grad; only its outputs are recomputed with a graph). Attaching it to the output,
as Megatron-Core's ``MoEAuxLossAutoScaler`` does, makes any backward through the output also
backpropagate ``d(aux_loss)`` with gradient 1: no change to the training loop, and the loss
survives checkpointing because it is recomputed with the output.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd import Function


class AttachAuxLoss(Function):
    """forward: ``(output, aux_loss) -> output`` unchanged; backward: ``grad_output`` to the output
    and ``scale`` to the (scalar) aux loss."""

    @staticmethod
    def forward(output: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # A compiled graph replays an output that aliases a graph input (``output`` coming from
            # before a graph break) as a plain view, which would drop this backward: a copy instead.
            return output.clone()
        return output.view_as(output)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        _, aux_loss, scale = inputs
        ctx.aux_shape, ctx.aux_dtype, ctx.aux_device, ctx.scale = aux_loss.shape, aux_loss.dtype, aux_loss.device, scale

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        grad_aux = torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=ctx.aux_device)
        return grad_output, grad_aux, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, output: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> tuple:
        return AttachAuxLoss.apply(output, aux_loss, scale), in_dims[0]


def attach_aux_loss(output: torch.Tensor, aux_loss: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``output`` (any shape) with ``aux_loss`` (a scalar) attached: returns a tensor equal to
    ``output``; a backward through it also adds ``scale * d(aux_loss)`` to the gradients of what
    ``aux_loss`` depends on (the router). Returns ``output`` itself when nothing needs a gradient."""
    if not (torch.is_grad_enabled() and aux_loss.requires_grad):
        return output
    return AttachAuxLoss.apply(output, aux_loss, scale)
