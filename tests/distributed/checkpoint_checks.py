"""Rank-side check: checkpoints of a model of real distributed MoE layers, saved at world 4
and at world 2 (a sub-group of the 4 ranks), load at world 1 (single process), 2 and 4 with
the same outputs, and one more Adam step from the loaded state gives the same parameters and
optimizer state as the step taken by the saving model."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from flexmoe import MoELayer, load_checkpoint, save_checkpoint
from flexmoe.checkpoint import CheckpointReader
from flexmoe.parallel import SINGLE_PROCESS, allreduce_non_expert_grads

MODEL_DIM = 6
TIGHT = dict(rtol=1e-9, atol=1e-12)
# Dropless: a token's output does not depend on the other tokens, so any split of a batch over
# ranks gives the outputs and (mean-loss) gradients of the whole batch in one process. No balance
# loss: its gradient flows with the output, and a batch share's loss is not a share of the batch's.
MOE = dict(model_dim=MODEL_DIM, hidden_dim=8, capacity_factor=0.0, aux_loss=None)


class TwoMoE(nn.Module):
    """4 whole experts (E >= W) and 2 gated experts (sharded at W = 4), around a Linear."""

    def __init__(self, group):
        super().__init__()
        self.moe1 = MoELayer(**MOE, num_experts=4, group=group)
        self.proj = nn.Linear(MODEL_DIM, MODEL_DIM)
        self.moe2 = MoELayer(**MOE, num_experts=2, gated=True, group=group)

    def forward(self, x):
        x = x + self.moe1(x)
        return x + self.moe2(torch.tanh(self.proj(x)))


class Member:
    """This process's place in a world of ``world_size`` ranks (1: single process)."""

    def __init__(self, rank: int, world_size: int, groups: dict[int, object]):
        self.world_size = world_size
        self.group = groups[world_size]
        self.rank = rank % world_size  # sub-groups are consecutive blocks of ranks
        self.index = rank // world_size  # which block: blocks save to separate directories

    def build(self, seed: int) -> tuple[TwoMoE, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = TwoMoE(SINGLE_PROCESS if self.world_size == 1 else self.group).double()
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    def step(self, model: TwoMoE, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> None:
        """One Adam step on this rank's equal share of the global ``batch`` [tokens, model_dim]."""
        optimizer.zero_grad(set_to_none=True)
        model(batch.chunk(self.world_size)[self.rank]).pow(2).mean().backward()
        if self.world_size > 1:
            allreduce_non_expert_grads(model, self.group)
        optimizer.step()


def _batch(seed: int, tokens: int = 8) -> torch.Tensor:
    return torch.randn(tokens, MODEL_DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def check_checkpoints(rank: int, world_size: int, directory: str) -> None:
    assert world_size == 4
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    groups = {4: dist.group.WORLD, 2: pairs[rank // 2], 1: None}
    probe, next_batch = _batch(1), _batch(2)
    for saved_world in (4, 2):
        saver = Member(rank, saved_world, groups)
        model, optimizer = saver.build(seed=0)
        for step in range(2):
            saver.step(model, optimizer, _batch(10 + step))
        with torch.no_grad():
            probe_out = model(probe).tolist()  # every rank evaluates the whole probe
        # Each block of ranks saves its own copy; all loads below read block 0's.
        saved = f"{directory}/w{saved_world}-{saver.index}"
        save_checkpoint(saved, model, optimizer, extra={"probe_out": probe_out})
        saver.step(model, optimizer, next_batch)
        save_checkpoint(f"{saved}-next", model, optimizer)
        dist.barrier()
        source = f"{directory}/w{saved_world}-0"
        for loaded_world in (1, 2, 4):
            loader = Member(rank, loaded_world, groups)
            fresh, fresh_optimizer = loader.build(seed=1)
            extra = load_checkpoint(source, fresh, fresh_optimizer)
            context = f"saved at world {saved_world}, loaded at {loaded_world}"
            with torch.no_grad():
                expected = torch.tensor(extra["probe_out"], dtype=torch.float64)
                torch.testing.assert_close(fresh(probe), expected, **TIGHT, msg=lambda m, c=context: f"{c}: {m}")
            loader.step(fresh, fresh_optimizer, next_batch)
            stepped = f"{source}-next-at-w{loaded_world}-{loader.index}"
            save_checkpoint(stepped, fresh, fresh_optimizer)
            dist.barrier()
            _assert_same_checkpoints(CheckpointReader(f"{source}-next"), CheckpointReader(stepped), context)


def _assert_same_checkpoints(expected: CheckpointReader, actual: CheckpointReader, context: str) -> None:
    """Every tensor (parameters and Adam state) equal once unsharded, at any saved world size."""
    assert expected.layouts.keys() == actual.layouts.keys()
    for key in expected.layouts:
        torch.testing.assert_close(
            actual.global_tensor(key), expected.global_tensor(key), **TIGHT, msg=lambda m, k=key: f"{context} {k}: {m}"
        )
