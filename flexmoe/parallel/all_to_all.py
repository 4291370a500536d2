"""Autograd-aware all-to-all on torch.distributed: linear and 2D-hierarchical, async for overlap.

An all-to-all maps ``x: [group_size, ...]`` (block i goes to rank i) to ``[group_size, ...]``
(block j came from rank j). It is its own adjoint, so the backward is the same exchange of the
gradient. Pipelining splits an exchange in two autograd nodes sharing one :class:`Exchange`:
``start`` issues the collective without waiting, ``finish`` waits; backward mirrors it (the
gradient exchange is issued by ``finish``'s backward and awaited by ``start``'s), so compute
recorded between the two overlaps the transfer in both directions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.autograd import Function

from flexmoe.parallel.config import A2AAlgorithm


@dataclass
class Exchange:
    """One all-to-all: where it runs and, while in flight, its handle and output buffer.

    group: the ranks exchanging (linear). node_group / cross_node_group: the two stages of
    ``"2dh"`` (ranks of one node; ranks of one local rank across nodes).
    """

    algorithm: A2AAlgorithm
    group: dist.ProcessGroup | None = None
    node_group: dist.ProcessGroup | None = None
    cross_node_group: dist.ProcessGroup | None = None
    _work: object | None = field(default=None, repr=False)
    _pending: torch.Tensor | None = field(default=None, repr=False)

    def issue(self, x: torch.Tensor) -> None:
        """Start exchanging x: [group_size, ...] (2dh runs to completion here)."""
        x = x.contiguous()
        if self.algorithm == "linear":
            self._pending = torch.empty_like(x)
            self._work = dist.all_to_all_single(self._pending, x, group=self.group, async_op=True)
        else:
            self._pending, self._work = _all_to_all_2dh(x, self.node_group, self.cross_node_group), None

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
        out, self._work, self._pending = self._pending, None, None
        return out


def _all_to_all_2dh(
    x: torch.Tensor, node_group: dist.ProcessGroup, cross_node_group: dist.ProcessGroup
) -> torch.Tensor:
    """x: [world, ...] -> [world, ...], same result as one linear all-to-all over the world.

    Stage 1 regroups by destination local rank and exchanges inside the node; stage 2 regroups
    by destination node and exchanges among the ranks of the same local rank, so each
    cross-node message carries a whole node's data for one rank.
    """
    local = dist.get_world_size(node_group)
    nodes = dist.get_world_size(cross_node_group)
    rest = x.shape[1:]
    by_local = x.reshape(nodes, local, *rest).transpose(0, 1).contiguous()  # [local_dst, node_dst, ...]
    inside = torch.empty_like(by_local)
    dist.all_to_all_single(inside, by_local, group=node_group)  # [local_src, node_dst, ...]
    by_node = inside.transpose(0, 1).contiguous()  # [node_dst, local_src, ...]
    across = torch.empty_like(by_node)
    dist.all_to_all_single(across, by_node, group=cross_node_group)  # [node_src, local_src, ...]
    return across.reshape(nodes * local, *rest)


class _Start(Function):
    @staticmethod
    def forward(ctx, x, exchange):
        ctx.exchange = exchange
        exchange.issue(x)
        # A placeholder that links the graph; finish returns the real buffer.
        return x.new_empty(0)

    @staticmethod
    def backward(ctx, _grad_placeholder):
        return ctx.exchange.wait(), None


class _Finish(Function):
    @staticmethod
    def forward(ctx, _placeholder, exchange):
        ctx.exchange = exchange
        return exchange.wait()

    @staticmethod
    def backward(ctx, grad):
        ctx.exchange.issue(grad)
        return grad.new_empty(0), None


def start_all_to_all(x: torch.Tensor, exchange: Exchange) -> torch.Tensor:
    """Issue the exchange of x: [group_size, ...]; returns a placeholder for :func:`finish_all_to_all`."""
    return _Start.apply(x, exchange)


def finish_all_to_all(placeholder: torch.Tensor, exchange: Exchange) -> torch.Tensor:
    """Wait for the exchange started with :func:`start_all_to_all`; returns ``[group_size, ...]``."""
    return _Finish.apply(placeholder, exchange)


def all_to_all(x: torch.Tensor, exchange: Exchange) -> torch.Tensor:
    """Blocking, differentiable all-to-all. x: [group_size, ...] -> [group_size, ...]."""
    return finish_all_to_all(start_all_to_all(x, exchange), exchange)
