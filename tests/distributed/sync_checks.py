"""Rank-side check: one distributed forward makes one host read (the count exchange's) and only
the collectives its choice needs; the settings check rides in the count exchange."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.distributed as dist

from flexmoe import MoELayer

COLLECTIVES = ("all_to_all_single", "all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "barrier")
HOST_READS = ("tolist", "item", "__int__", "__bool__", "__float__", "nonzero")


def _count_calls(monkeypatch, calls: Counter) -> None:
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(dist, name, counted)
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def read(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)


def check_host_syncs(rank: int, world_size: int) -> None:
    """Dropless routing, exact counts: forward = count exchange + exchange there + back, one
    host read; at d = 2, two exchanges each way; at r = 0 the weights are gathered instead.
    Backward: the gradients' exchanges only, no host read."""
    torch.manual_seed(0)
    layer = MoELayer(model_dim=8, hidden_dim=8, num_experts=2 * world_size, group=dist.group.WORLD)
    x = torch.randn(6 + rank, 8, requires_grad=True)
    layer(x).sum().backward()  # first call: nothing is different on later calls, but warm up anyway
    expected = {
        (1, 1): {"all_to_all_single": 3},
        (1, 2): {"all_to_all_single": 5},
        (0, 1): {"all_to_all_single": 1, "all_gather": 4},  # w1, b1, w2, b2
    }
    for (degree, overlap), collectives in expected.items():
        calls: Counter = Counter()
        with pytest.MonkeyPatch.context() as monkeypatch:
            _count_calls(monkeypatch, calls)
            out = layer(x, parallel_degree=degree, overlap_degree=overlap, exact=True)
            forward = dict(calls)
            calls.clear()
            out.sum().backward()
            backward = dict(calls)
        assert forward == {**collectives, "tolist": 1}, (degree, overlap, forward)
        assert not set(backward) & set(HOST_READS), (degree, overlap, backward)
