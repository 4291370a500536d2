"""Autograd-aware all-to-all on torch.distributed: linear and 2D-hierarchical, async for overlap.

An all-to-all maps ``x: [group_size, ...]`` (block i goes to rank i) to ``[group_size, ...]``
(block j came from rank j). It is its own adjoint, so the backward is the same exchange of the
gradient. Pipelining splits an exchange in two autograd nodes sharing one :class:`Exchange`:
``start`` issues the collective without waiting, ``finish`` waits; backward mirrors it (the
gradient exchange is issued by ``finish``'s backward and awaited by ``start``'s), so compute
recorded between the two overlaps the transfer in both directions.

Variable splits (exact token counts): ``x: [rows, ...]`` sends ``send_splits[i]`` rows to rank i
and receives ``recv_splits[j]`` rows from rank j; the gradient goes back with the splits swapped.
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

    send_splits / recv_splits: rows to / from each rank of ``group`` (linear only); None for
    equal blocks ``x: [group_size, ...]``.

    One Exchange carries one transfer at a time: forward, then the gradient in backward (with
    the splits swapped once the forward transfer is done).
    """

    algorithm: A2AAlgorithm
    group: dist.ProcessGroup | None = None
    node_group: dist.ProcessGroup | None = None
    cross_node_group: dist.ProcessGroup | None = None
    send_splits: list[int] | None = None
    recv_splits: list[int] | None = None
    _work: object | None = field(default=None, repr=False)
    _pending: torch.Tensor | None = field(default=None, repr=False)

    def issue(self, x: torch.Tensor) -> None:
        """Start exchanging x: [group_size, ...] (or [sum(send_splits), ...]). For 2dh only the
        intra-node stage runs asynchronously; the cross-node stage runs in :meth:`wait`."""
        if self.send_splits is not None:
            send = x.contiguous()
            self._pending = send.new_empty(sum(self.recv_splits), *send.shape[1:])
            self._work = dist.all_to_all_single(
                self._pending, send, self.recv_splits, self.send_splits, group=self.group, async_op=True
            )
            return
        if self.algorithm == "linear":
            send = x.contiguous()
            group = self.group
        else:
            send = _by_destination_local_rank(x, self.node_group, self.cross_node_group)
            group = self.node_group
        self._pending = torch.empty_like(send)
        self._work = dist.all_to_all_single(self._pending, send, group=group, async_op=True)

    def wait(self) -> torch.Tensor:
        """The exchanged tensor ``[group_size, ...]`` (block j from rank j)."""
        self._work.wait()
        out, self._work, self._pending = self._pending, None, None
        if self.send_splits is not None:  # the next transfer is the gradient: the reverse way
            self.send_splits, self.recv_splits = self.recv_splits, self.send_splits
        if self.algorithm == "2dh":
            out = _across_nodes(out, self.cross_node_group)
        return out


# 2dh: the same result as one linear all-to-all over the world, in two stages. Stage 1 regroups by
# destination local rank and exchanges inside the node; stage 2 regroups by destination node and
# exchanges among the ranks of the same local rank, so each cross-node message carries a whole
# node's data for one rank.


def _by_destination_local_rank(
    x: torch.Tensor, node_group: dist.ProcessGroup, cross_node_group: dist.ProcessGroup
) -> torch.Tensor:
    """x: [world = nodes * local, ...] -> [local_dst, node_dst, ...], the intra-node send buffer."""
    local, nodes = dist.get_world_size(node_group), dist.get_world_size(cross_node_group)
    return x.reshape(nodes, local, *x.shape[1:]).transpose(0, 1).contiguous()


def _across_nodes(inside: torch.Tensor, cross_node_group: dist.ProcessGroup) -> torch.Tensor:
    """Received in-node [local_src, node_dst, ...] -> [world, ...] ordered by source rank."""
    by_node = inside.transpose(0, 1).contiguous()  # [node_dst, local_src, ...]
    across = torch.empty_like(by_node)
    dist.all_to_all_single(across, by_node, group=cross_node_group)  # [node_src, local_src, ...]
    return across.reshape(-1, *across.shape[2:])


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
