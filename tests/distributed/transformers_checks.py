"""A transformers model converted with expert parallelism against the same model converted
single-process, on every rank (run by tests/distributed/test_transformers_expert_parallel.py).

Each rank feeds its own batch. The single-process reference runs every rank's batch; its
parameter gradients are averaged over the batches, which is the sharded model's convention:
expert gradients of the mean of the ranks' losses, replicated gradients averaged by
``allreduce_non_expert_grads``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
import transformers

from flexmoe.distributed import local_tensor
from flexmoe.integrations.transformers import flexmoe_layers, from_flexmoe, to_flexmoe
from flexmoe.parallel import HIDDEN_AXIS, SINGLE_PROCESS, ParallelConfig, allreduce_non_expert_grads, expert_parameters
from tests.test_transformers_integration import COMMON, assert_same, build

# float64 on both sides; only the order of sums differs (padded buffers of another capacity).
TIGHT = dict(rtol=1e-9, atol=1e-12)
LR = 0.5

# name: (family, another config of it or None, the layers' ParallelConfig or None)
CASES = {
    "mixtral": ("mixtral", None, None),  # 4 experts: 2 whole experts per rank
    # 6 experts, 3 per rank, and a replicated shared expert; data parallel (all experts gathered)
    "qwen2_moe": ("qwen2_moe", None, ParallelConfig(parallel_degree=0)),
    # 1 expert over 2 ranks: each rank holds half of its hidden units; model parallel, pipelined
    "mixtral_sharded": (
        "mixtral",
        lambda: transformers.MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=1, num_experts_per_tok=1),
        ParallelConfig(parallel_degree=2, overlap_degree=2),
    ),
}


def rank_batches(world_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(token ids [2, 10], upstream gradient seed) of every rank."""
    generators = [torch.Generator().manual_seed(100 + r) for r in range(world_size)]
    return [(torch.randint(0, 64, (2, 10), generator=g), r) for r, g in enumerate(generators)]


def run(model: torch.nn.Module, ids: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and input-embedding gradient of ``(logits * upstream).sum()``; parameter grads accumulate."""
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeds).logits
    upstream = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed), dtype=logits.dtype)
    (logits * upstream).sum().backward()
    return logits.detach(), embeds.grad


def expected_grad(sharded: torch.nn.Module, name: str, reference_grad: torch.Tensor, expert_names: set[str]):
    """The part of the reference's (global) gradient that the sharded model's ``name`` holds."""
    if name not in expert_names:
        return reference_grad
    layer_name, param_name = name.rsplit(".experts.", 1)
    return sharded.get_submodule(layer_name).layout.shard(reference_grad, HIDDEN_AXIS[param_name])


def check_case(rank: int, world_size: int, case: str, tmp_dir: str) -> None:
    family, config, parallel = CASES[case]
    original = build(family, config() if config else None)
    batches = rank_batches(world_size)
    own_ids, own_seed = batches[rank]
    transformers_logits = run(copy.deepcopy(original), own_ids, own_seed)

    reference = to_flexmoe(copy.deepcopy(original), group=SINGLE_PROCESS)
    reference_runs = [run(reference, ids, seed) for ids, seed in batches]
    for param in reference.parameters():
        # The input embedding is not used (inputs_embeds): allreduce_non_expert_grads gives it zeros.
        param.grad = torch.zeros_like(param) if param.grad is None else param.grad / world_size

    sharded = to_flexmoe(copy.deepcopy(original), parallel=parallel, group=dist.group.WORLD)
    layers = flexmoe_layers(sharded)
    assert layers and all(layer.layout.world_size == world_size for layer in layers)
    assert all(layer.parallel == (parallel or ParallelConfig()) for layer in layers)
    logits, embed_grad = run(sharded, own_ids, own_seed)
    torch.testing.assert_close(logits, reference_runs[rank][0], **TIGHT)
    torch.testing.assert_close(embed_grad, reference_runs[rank][1], **TIGHT)
    assert_same((logits, [embed_grad]), (transformers_logits[0], [transformers_logits[1]]))

    allreduce_non_expert_grads(sharded)
    expert_names = {name for name, _ in expert_parameters(sharded)}
    assert expert_names
    reference_params = dict(reference.named_parameters())
    for name, param in sharded.named_parameters():
        want = expected_grad(sharded, name, reference_params[name].grad, expert_names)
        torch.testing.assert_close(local_tensor(param.grad), want, **TIGHT, msg=name)

    # One SGD step on both, then back to transformers' blocks: the same (trained) weights.
    for model in (reference, sharded):
        torch.optim.SGD(model.parameters(), lr=LR).step()
    from_flexmoe(reference)
    from_flexmoe(sharded)
    reference_state = reference.state_dict()
    for key, value in sharded.state_dict().items():
        torch.testing.assert_close(value, reference_state[key], **TIGHT, msg=key)
    if rank == 0:
        sharded.save_pretrained(f"{tmp_dir}/{case}")
        reloaded = type(sharded).from_pretrained(f"{tmp_dir}/{case}", dtype=torch.float64).eval()
        reloaded.set_experts_implementation("eager")
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=own_ids).logits, reference(input_ids=own_ids).logits)


def check_share_storage_refused(rank: int, world_size: int) -> None:
    with pytest.raises(ValueError, match="share_storage=True"):
        to_flexmoe(build("olmoe"), share_storage=True, group=dist.group.WORLD)


def check_routers_come_from_first_rank(rank: int, world_size: int) -> None:
    """The converted layers' replicated tensors are rank 0's, even if a rank's model differed."""
    model = build("olmoe")
    first_rank_routers = [block.gate.weight.detach().clone() for block in _moe_blocks(model)]
    if rank != 0:
        with torch.no_grad():
            for block in _moe_blocks(model):
                block.gate.weight.add_(1.0)
    to_flexmoe(model, group=dist.group.WORLD)
    for layer, router in zip(flexmoe_layers(model), first_rank_routers, strict=True):
        torch.testing.assert_close(layer.router.weight, router, rtol=0, atol=0)


def _moe_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "OlmoeSparseMoeBlock"]


def check_example(rank: int, world_size: int, tmp_dir: str) -> None:
    """The example's --expert-parallel run (as under torchrun) trains, saves, reloads, prunes."""
    from flexmoe.examples import transformers_moe

    losses = transformers_moe.main(["--expert-parallel", "--steps", "3", "--keep", "2", "--save", f"{tmp_dir}/ex"])
    assert losses["trained"] < losses["first"]
    if rank == 0:
        assert losses["reload_difference"] == 0.0 and math.isfinite(losses["pruned"])


def check_all(rank: int, world_size: int, tmp_dir: str) -> None:
    torch.set_num_threads(1)
    for case in CASES:
        check_case(rank, world_size, case, tmp_dir)
    check_share_storage_refused(rank, world_size)
    check_routers_come_from_first_rank(rank, world_size)
    check_example(rank, world_size, tmp_dir)
