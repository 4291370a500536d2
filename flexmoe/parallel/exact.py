"""The expert step on exact token counts: exactly the routed rows cross the wire, no padding.

After the count exchange (:mod:`flexmoe.parallel.counts`) every rank knows, on the host, how many
rows it sends to each expert of each peer and how many it receives, so one variable-split
``all_to_all_single`` moves exactly the kept rows, the local experts run on exact counts
(``grouped_mm`` or one GEMM pair per expert) and the reverse exchange brings the outputs home.
Autograd runs through both exchanges (the gradient takes the reverse splits).

Parallel degree r, as the padded path (:mod:`flexmoe.parallel.expert_parallel`) defines it:

* r = 0: every rank gathers every expert's weights and runs its own rows; no token exchange.
* r >= 1: the ranks at one position of their weight-gather block exchange; an expert's rows go
  to each of its r blocks (hidden slices ``hidden_dim / r`` wide) and the r partial outputs are
  summed by the combine (``b2`` scaled by 1 / r).

Pipelining degree d: each expert's rows (from each peer) are cut into d near-equal parts (the
cut is a function of the count, so sender and receiver agree without talking); part i + 1's
exchange is in flight while part i computes, and part i's return flies while part i + 1
computes, forward and backward (the start / finish pattern of :mod:`flexmoe.parallel.all_to_all`).

Row orders: this rank's plan holds its kept rows sorted by expert. A part is sent ordered by
(peer, peer's local expert); it arrives ordered by (source peer, local expert) and is regrouped
by local expert for the kernel, then back. Dispatch and combine index the layer's tokens
directly with the composed order, so no intermediate copy of the rows is made.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flexmoe.ops import combine, dispatch
from flexmoe.parallel.all_to_all import Exchange, finish_all_to_all, start_all_to_all
from flexmoe.parallel.counts import CountTable, host_ints
from flexmoe.parallel.groups import ParallelGroups
from flexmoe.parallel.layout import ExpertLayout
from flexmoe.routing import RoutingPlan

# rows [n, model_dim] sorted by local expert, rows per local expert (host ints) -> [n, model_dim]
ExactCompute = Callable[[torch.Tensor, list[int]], torch.Tensor]


def segment_index(starts: list[int], lengths: list[int], device: torch.device) -> torch.Tensor:
    """[sum(lengths)] int64: ``starts[k], starts[k] + 1, ...`` (``lengths[k]`` of them) for each k in turn."""
    total = sum(lengths)
    if total == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    shift = host_ints([s - b for s, b in zip(starts, _exclusive_sums(lengths))], device)
    shift = shift.repeat_interleave(host_ints(lengths, device), output_size=total)
    return torch.arange(total, device=device) + shift


def _exclusive_sums(values: list[int]) -> list[int]:
    """[0, v0, v0 + v1, ...]: where each of ``values`` starts when laid end to end."""
    return [0, *itertools.accumulate(values)][: len(values)]


def part_bounds(count: int, degree: int, part: int) -> tuple[int, int]:
    """The rows [start, end) of ``part`` (of ``degree`` near-equal parts) of ``count`` rows."""
    return count * part // degree, count * (part + 1) // degree


@dataclass(frozen=True)
class PartRoute:
    """One pipelined part, host-side. Shapes: rows of this rank's plan order and of the kernel.

    send_index: [sent] plan positions (into the plan's kept entries) in send order, or None for
        the plan order itself (r = 1, one part).
    send_splits / recv_splits: rows to / from each exchanging peer.
    to_kernel: [received] index regrouping the received rows by local expert, or None (no-op);
    from_kernel: its inverse. kernel_counts: rows per local expert for the kernel.
    """

    send_index: torch.Tensor | None
    send_splits: list[int]
    recv_splits: list[int]
    to_kernel: torch.Tensor | None
    from_kernel: torch.Tensor | None
    kernel_counts: list[int]


def route_parts(
    table: CountTable,
    members: list[int],
    layout: ExpertLayout,
    degree: int,
    overlap_degree: int,
    device: torch.device,
) -> list[PartRoute]:
    """The send / receive layout of each of the ``overlap_degree`` parts at parallel ``degree``
    (>= 1); ``members``: the exchanging ranks (group positions), in exchange order."""
    local = layout.local_experts
    own = table.own_counts(layout)
    offsets = _exclusive_sums(own)
    experts = [
        [ExpertLayout(layout.num_experts, layout.world_size, j).first_expert + e for e in range(local)] for j in members
    ]
    sent = [table.sent[j] for j in members]
    received = [table.received[j] for j in members]
    identity = degree == 1 and overlap_degree == 1  # peers in expert order: the plan order itself
    regroup = local > 1 and len(members) > 1
    parts = []
    for part in range(overlap_degree):
        starts, lengths = [], []
        for m in range(len(members)):
            for e in range(local):
                begin, end = part_bounds(sent[m][e], overlap_degree, part)
                starts.append(offsets[experts[m][e]] + begin)
                lengths.append(end - begin)
        incoming = [[_length(received[m][e], overlap_degree, part) for e in range(local)] for m in range(len(members))]
        to_kernel = from_kernel = None
        if regroup:
            to_kernel, from_kernel = _regroup(incoming, device)
        parts.append(
            PartRoute(
                send_index=None if identity else segment_index(starts, lengths, device),
                send_splits=[sum(lengths[m * local : (m + 1) * local]) for m in range(len(members))],
                recv_splits=[sum(row) for row in incoming],
                to_kernel=to_kernel,
                from_kernel=from_kernel,
                kernel_counts=[sum(row[e] for row in incoming) for e in range(local)],
            )
        )
    return parts


def _length(count: int, degree: int, part: int) -> int:
    begin, end = part_bounds(count, degree, part)
    return end - begin


def _regroup(incoming: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Received rows ordered (peer, local expert), ``incoming[m][e]`` each -> the index ordering
    them (local expert, peer) for the kernel, and its inverse."""
    peers, local = len(incoming), len(incoming[0])
    flat = [incoming[m][e] for m in range(peers) for e in range(local)]
    arrived = _exclusive_sums(flat)  # start of segment (m, e) as received
    kernel_order = [(m, e) for e in range(local) for m in range(peers)]
    kernel_starts, position = {}, 0
    for m, e in kernel_order:
        kernel_starts[m, e] = position
        position += incoming[m][e]
    to_kernel = segment_index(
        [arrived[m * local + e] for m, e in kernel_order], [incoming[m][e] for m, e in kernel_order], device
    )
    from_kernel = segment_index([kernel_starts[m, e] for m in range(peers) for e in range(local)], flat, device)
    return to_kernel, from_kernel


def run_exact(
    tokens: torch.Tensor,
    plan: RoutingPlan,
    table: CountTable,
    compute: ExactCompute,
    layout: ExpertLayout,
    groups: ParallelGroups,
    parallel_degree: int,
    overlap_degree: int,
) -> torch.Tensor:
    """tokens: [T, model_dim] -> [T, model_dim], the gate-weighted sum of each token's kept
    choices, computed by the owning ranks on exact counts. ``compute``: the expert FFN with the
    weights of ``parallel_degree`` (all experts at r = 0, the local ones at r >= 1)."""
    num_tokens = tokens.shape[0]
    if parallel_degree == 0:  # gathered weights, own rows: no token exchange
        out = compute(dispatch(tokens, plan.token_index), table.own_counts(layout))
        return combine(out, plan.gates, plan.token_index, None, num_tokens)
    members = groups.a2a_members(layout, parallel_degree)
    group = groups.a2a_group(layout, parallel_degree)
    # At most one part per row slot of the busiest expert (agreed), at least one.
    degree = max(1, min(overlap_degree, table.capacity))
    parts = route_parts(table, members, layout, parallel_degree, degree, tokens.device)
    sources = [plan.token_index if p.send_index is None else plan.token_index[p.send_index] for p in parts]
    there = [Exchange("linear", group=group, send_splits=p.send_splits, recv_splits=p.recv_splits) for p in parts]
    back = [Exchange("linear", group=group, send_splits=p.recv_splits, recv_splits=p.send_splits) for p in parts]
    sent = [start_all_to_all(dispatch(tokens, sources[0]), there[0])]
    returned = []
    for i, part in enumerate(parts):
        if i + 1 < len(parts):  # the next part flies while this one computes
            sent.append(start_all_to_all(dispatch(tokens, sources[i + 1]), there[i + 1]))
        received = finish_all_to_all(sent[i], there[i])  # [received rows, M], by (peer, local expert)
        rows = received if part.to_kernel is None else received.index_select(0, part.to_kernel)
        out = compute(rows, part.kernel_counts)
        out = out if part.from_kernel is None else out.index_select(0, part.from_kernel)
        returned.append(start_all_to_all(out, back[i]))
    outputs = [finish_all_to_all(pending, exchange) for pending, exchange in zip(returned, back)]
    if len(parts) == 1 and parts[0].send_index is None:
        return combine(outputs[0], plan.gates, plan.token_index, None, num_tokens)
    order = torch.cat([p.send_index for p in parts])
    return combine(torch.cat(outputs), plan.gates[order], plan.token_index[order], None, num_tokens)
