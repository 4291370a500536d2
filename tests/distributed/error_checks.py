"""Rank-side checks: mismatches raise the same error on every rank (no hang); the DDP recipe
gives the single-process gradient of the mean loss."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from flexmoe import MoELayer, Tuner
from flexmoe.distributed import local_tensor
from flexmoe.examples import helloworld
from flexmoe.parallel import HIDDEN_AXIS, SINGLE_PROCESS, allreduce_non_expert_grads
from tests.distributed.helpers import load_global_weights


def _raises_everywhere(match: str, build, *args, **kwargs) -> None:
    with pytest.raises(ValueError, match=match):
        build(*args, **kwargs)


def _all_equal_over_ranks(tensor: torch.Tensor) -> bool:
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, tensor.detach().contiguous())
    return all(torch.equal(piece, pieces[0]) for piece in pieces)


def check_mismatches(rank: int, world_size: int) -> None:
    base = dict(model_dim=6, hidden_dim=8, num_experts=4, group=dist.group.WORLD)
    _raises_everywhere("model_dim differs", MoELayer, **dict(base, model_dim=6 + 2 * rank))
    _raises_everywhere("num_experts differs", MoELayer, **dict(base, num_experts=4 if rank else 3))
    _raises_everywhere("hidden_dim differs", MoELayer, **dict(base, hidden_dim=8 * (rank + 1)))
    layer = MoELayer(**base).double()
    x = torch.randn(3 + rank, 6, dtype=torch.float64)
    _raises_everywhere("top_k differs", layer, x, top_k=1 + rank)
    _raises_everywhere("parallel_degree differs", layer, x, parallel_degree=rank)
    _raises_everywhere("overlap_degree differs", layer, x, overlap_degree=1 + rank)
    _raises_everywhere("exact differs", layer, x, exact=rank == 0)  # one rank exact, one padded
    _raises_everywhere("input_requires_grad differs", layer, x.clone().requires_grad_(rank == 0))
    _raises_everywhere(r"dtype differs \(torch.float64 vs torch.float32\)", layer, x.float() if rank else x)
    layer.tuner = Tuner() if rank == 0 else None  # one rank tuning, the other not
    _raises_everywhere("tuned differs", layer, x)
    layer.tuner = None
    # Invalid on every rank alike: rejected before any collective.
    _raises_everywhere("parallel_degree must be one of", layer, x, parallel_degree=2)
    _raises_everywhere("a2a_algorithm='2dh' needs", layer, x, a2a_algorithm="2dh")
    _raises_everywhere("a2a_algorithm must be one of", layer, x, a2a_algorithm="ring")
    # A kernel that cannot run (grouped_mm in float64) raises before any token exchange.
    grouped = MoELayer(**base, expert_kernel="grouped").double()
    _raises_everywhere("expert_kernel='grouped' cannot run", grouped, x)
    _raises_everywhere("exact=True runs the 'linear' all-to-all", layer, x, exact=True, a2a_algorithm="2dh")
    with pytest.raises(TypeError, match="group must be"):
        MoELayer(**dict(base, group="world"))
    # Options that change the computation are agreed at construction and on every call.
    _raises_everywhere("activation differs", MoELayer, **dict(base, activation="relu" if rank else "gelu"))
    _raises_everywhere("router differs", MoELayer, **dict(base, router="cosine" if rank else "linear"))
    _raises_everywhere("num_shared_experts differs", MoELayer, **dict(base, num_shared_experts=rank))
    _raises_everywhere("granularity differs", MoELayer, **dict(base, granularity="sentence" if rank else "token"))
    # Two layers called in another order on each rank: the count exchange names the layer.
    first, second = MoELayer(**base).double(), MoELayer(**base).double()
    _raises_everywhere("called in a different order", first if rank == 0 else second, x)
    # The group is still in step after the errors; copies share the groups.
    assert layer(x).shape == x.shape
    torch.testing.assert_close(copy.deepcopy(layer)(x), layer(x), rtol=0, atol=0)
    # Construction: the router is broadcast (different seeds per rank); experts differ across
    # ranks even with one seed (each rank initialises its own experts).
    torch.manual_seed(rank)
    assert _all_equal_over_ranks(MoELayer(**base).router.weight)
    torch.manual_seed(0)
    assert not _all_equal_over_ranks(local_tensor(MoELayer(**base).experts.w1))
    # The example trains under an initialised group (as under torchrun).
    args = ["--steps", "3", "--batch-tokens", "16", "--num-experts", "1", "--top-k", "1", "--parallel-degree", "2"]
    assert math.isfinite(helloworld.main([*args, "--overlap-degree", "2"]))
    assert math.isfinite(helloworld.main([*args, "--tune", "--tune-trials", "1"]))


class _Model(nn.Module):
    def __init__(self, group=None):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        # No balance loss: it flows with the output, and a batch share's loss is not a share of the batch's.
        self.moe = MoELayer(
            model_dim=6, hidden_dim=8, num_experts=2, top_k=2, aux_loss=None, group=group or dist.group.WORLD
        )

    def forward(self, x):
        return self.moe(torch.tanh(self.proj(x)), parallel_degree=self.degree)


def check_ddp_recipe(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    reference = _Model(SINGLE_PROCESS).double()
    with torch.no_grad():
        reference.moe.experts.b2.normal_()
    torch.manual_seed(1)
    x = torch.randn(4 * world_size, 6, dtype=torch.float64)
    target = torch.randn_like(x)
    for degree in (0, 1, 2):
        reference.degree = None
        reference.zero_grad(set_to_none=True)
        # Dropless routing: a token's output does not depend on the batch, so one global batch
        # is the single-process run of all ranks' tokens together.
        nn.functional.mse_loss(reference(x), target).backward()
        for use_ddp in (True, False):
            model = _Model().double()
            model.proj.load_state_dict(reference.proj.state_dict())
            load_global_weights(model.moe, reference.moe)
            model.degree = degree
            mine = slice(4 * rank, 4 * rank + 4)
            if use_ddp:
                ddp = nn.parallel.DistributedDataParallel(model)  # the experts are left out, no extra step
                nn.functional.mse_loss(ddp(x[mine]), target[mine]).backward()
            else:
                nn.functional.mse_loss(model(x[mine]), target[mine]).backward()
                allreduce_non_expert_grads(model)
            for name, param in model.named_parameters():
                expected = reference.get_parameter(name).grad
                if name.startswith("moe.experts."):
                    expected = model.moe.layout.shard(expected, HIDDEN_AXIS[name.rsplit(".", 1)[1]])
                torch.testing.assert_close(
                    local_tensor(param.grad),
                    expected,
                    rtol=1e-10,
                    atol=1e-12,
                    msg=lambda m, n=name, r=degree: f"{n} r={r}: {m}",
                )
