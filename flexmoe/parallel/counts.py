"""The per-call count exchange of an expert-parallel layer: settings, capacity and counts in one
``all_to_all_single``, read on the host once.

Every distributed forward starts with this exchange, whatever the parallel choice, so a rank
that runs different settings (another choice, top-k, dtype, gradient needs) meets the same
first collective as its peers and finds the difference in what it receives: every rank then
raises the same ``ValueError`` instead of hanging in mismatched collectives.

Rank i sends rank j one row ``[settings..., capacity, counts of j's local experts...]``:

* settings: the ints every rank must agree on (:func:`flexmoe.parallel.checks.check_settings_rows`);
* capacity: the slots per expert this rank's plan needs (the padded path and the tuning key
  take the largest over the ranks);
* counts: how many of this rank's kept rows go to each expert rank j holds (a hidden slice of
  it when experts are sharded). The counts are the same for every parallel degree, so a tuner
  may pick the choice after the exchange.

The result is read to the host in one transfer (the exact-count exchange needs its split sizes
there): the one host synchronisation of a distributed forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from flexmoe.parallel.checks import check_settings_rows
from flexmoe.parallel.groups import ParallelGroups
from flexmoe.parallel.layout import ExpertLayout
from flexmoe.routing import RoutingPlan


@dataclass(frozen=True)
class CountTable:
    """Host-side counts of one call, agreed by the exchange (group positions, not global ranks).

    sent: ``sent[j][e]`` rows this rank routes to local expert e of rank j (its kept count of
        that expert).
    received: ``received[j][e]`` rows rank j routes to this rank's local expert e.
    capacity: the largest slots per expert any rank's plan needs.
    """

    sent: list[list[int]]
    received: list[list[int]]
    capacity: int

    def own_counts(self, layout: ExpertLayout) -> list[int]:
        """This rank's kept rows per global expert, [num_experts]."""
        shards = layout.shards_per_expert
        return [count for j in range(0, layout.world_size, shards) for count in self.sent[j]]


def host_ints(values: list[int], device: torch.device) -> torch.Tensor:
    """[len(values)] int64 on ``device``, copied without waiting for the device's queued work
    (``torch.tensor(..., device=cuda)`` would synchronise the stream)."""
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)


def experts_of_ranks(layout: ExpertLayout, device: torch.device) -> torch.Tensor:
    """[world_size, local_experts] the global expert each rank holds (whole or a slice of)."""
    ranks = torch.arange(layout.world_size, device=device)
    first = ranks // layout.shards_per_expert * layout.local_experts
    return first.unsqueeze(1) + torch.arange(layout.local_experts, device=device)


def exchange_counts(
    settings: dict[str, int],
    plan: RoutingPlan | None,
    layout: ExpertLayout,
    groups: ParallelGroups,
    device: torch.device,
) -> CountTable:
    """Exchange ``settings``, this rank's capacity and its per-expert kept counts over the
    layer's group; check the settings agree (ValueError on every rank otherwise). ``plan`` None:
    a refused call (nothing routed, zero counts)."""
    names = list(settings)
    world = layout.world_size
    if plan is None:
        counts, capacity = torch.zeros(layout.num_experts, dtype=torch.int64, device=device), host_ints([0], device)
    else:
        counts = plan.kept_per_expert.to(device=device, dtype=torch.int64)
        # Fixed capacity is a host int; dropless capacity is the largest load, left on the device.
        capacity = counts.max().reshape(1) if plan._capacity is None else host_ints([plan._capacity], device)
    head = host_ints(list(settings.values()), device)
    send = torch.cat(
        [head.expand(world, -1), capacity.expand(world, 1), counts[experts_of_ranks(layout, device)]], dim=1
    )
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=groups.group)
    sent_rows, received_rows = torch.stack([send, received]).tolist()  # the host read
    check_settings_rows(names, [row[: len(names)] for row in received_rows])
    width = len(names) + 1
    return CountTable(
        sent=[row[width:] for row in sent_rows],
        received=[row[width:] for row in received_rows],
        capacity=max(row[len(names)] for row in received_rows),
    )
