"""Rank-side checks of a layer with a run-time tuner: tuning tries every valid choice, never
changes outputs or gradients, every rank decides alike, and a rerun on the cache starts tuned."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from flexmoe import MoELayer, Tuner
from flexmoe.distributed import local_tensor
from flexmoe.parallel import ParallelChoice
from tests.distributed.parity_checks import TIGHT


def _logging_choices(layer: MoELayer) -> list[ParallelChoice]:
    """Make ``layer`` log the choice of every expert step it runs; returns the log."""
    log: list[ParallelChoice] = []
    run = layer.executor.expert_step

    def logged(tokens: torch.Tensor, plan, table, choice: ParallelChoice) -> torch.Tensor:
        log.append(choice)
        return run(tokens, plan, table, choice)

    layer.executor.expert_step = logged
    return log


def _step(layer: MoELayer, x: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Output, input grad and expert grads of one forward + backward."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * upstream).sum().backward()
    return (out.detach(), x.grad, *(local_tensor(p.grad) for p in layer.experts.parameters()))


def _same_over_ranks(values: list) -> bool:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    return all(other == gathered[0] for other in gathered)


def check_tuned_layer(rank: int, world_size: int, options: dict, cache_dir: str) -> None:
    """Over the tuning steps and after, a tuned layer equals the default-choice layer on the
    same weights and inputs; then a new tuner on the same cache runs the decision untimed."""
    torch.manual_seed(3)
    layer = MoELayer(**options, group=dist.group.WORLD).double()
    cache = f"{cache_dir}/tuned-{options['num_experts']}.json"
    tuned = copy.deepcopy(layer)  # same weights, same groups
    tuned.tuner = Tuner(trials_per_candidate=1, cache_path=cache)
    log = _logging_choices(tuned)
    candidates = layer.valid_parallel_choices()
    generator = torch.Generator().manual_seed(10 + rank)
    steps = len(candidates) + 2  # every candidate once, then the decided one
    for step in range(steps):
        # Ragged: ranks hold different token counts; capacity_factor fixes the capacity bucket.
        x = torch.randn(6 + 2 * rank, options["model_dim"], generator=generator, dtype=torch.float64)
        upstream = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        for got, expected in zip(_step(tuned, x, upstream), _step(layer, x, upstream)):
            torch.testing.assert_close(got, expected, **TIGHT, msg=lambda m, s=step, c=log[-1]: f"step {s} {c}: {m}")
    (key,) = tuned.tuner.decisions
    decided = tuned.tuner.decision(key)
    assert sorted(log[: len(candidates)]) == sorted(candidates)
    assert log[len(candidates) :] == [decided, decided]
    assert _same_over_ranks([decided, key])

    rerun = copy.deepcopy(layer)
    rerun.tuner = Tuner(trials_per_candidate=1, cache_path=cache)
    rerun_log = _logging_choices(rerun)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr("flexmoe.executors.expert_parallel.measure_layer_call", _no_measuring)
        _step(rerun, x, upstream)
    assert rerun_log == [decided] and not rerun.tuner.is_tuning(key)


def _no_measuring(*args, **kwargs):
    raise AssertionError("a layer whose tuner loaded a decision must not measure")


def check_tuner_group(rank: int, world_size: int) -> None:
    """A layer on a sub-group needs a tuner over that sub-group (decisions are agreed on it)."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    pair = pairs[rank // 2]
    options = dict(model_dim=6, hidden_dim=8, num_experts=2, group=pair)
    with pytest.raises(ValueError, match="the tuner's group"):
        MoELayer(**options, tuner=Tuner())
    layer = MoELayer(**options, tuner=Tuner(group=pair))
    assert layer(torch.randn(4, 6)).shape == (4, 6)
