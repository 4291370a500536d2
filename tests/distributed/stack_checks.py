"""Rank-side checks of flexmoe inside PyTorch's distributed stack: DTensor experts, DCP
checkpoints resharded between 1, 2 and 4 ranks (with Adam's state), FSDP2 on a (dp, ep) mesh
and DDP, each against the single-process model on the same global batch."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from flexmoe import MoELayer, load_checkpoint, save_checkpoint
from flexmoe.distributed import apply_fsdp, exclude_experts_from_ddp, local_tensor, parameter_groups
from flexmoe.distributed.experts import plain_shard_placements
from flexmoe.parallel import HIDDEN_AXIS, SINGLE_PROCESS, allreduce_non_expert_grads, clip_grad_norm_
from tests.distributed.helpers import reference_grads, twin_layers

MODEL_DIM = 4
TOKENS_PER_RANK = 3


class Net(nn.Module):
    """Linear -> residual MoE layers (one per entry of ``num_experts``) -> Linear."""

    # No balance loss: each rank's would cover its own tokens only, not the global batch's, so
    # the gradients would differ from the single-process model's by design.
    OPTIONS: ClassVar[dict] = dict(model_dim=MODEL_DIM, hidden_dim=8, top_k=1, capacity_factor=0.0, aux_loss=None)

    def __init__(self, group, num_experts: tuple[int, ...] = (4, 2)) -> None:
        super().__init__()
        self.inp = nn.Linear(MODEL_DIM, MODEL_DIM)
        self.moe = nn.ModuleList(MoELayer(num_experts=e, group=group, **self.OPTIONS) for e in num_experts)
        self.out = nn.Linear(MODEL_DIM, MODEL_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for layer in self.moe:
            h = h + layer(h)
        return self.out(h)


def reference_net(num_experts: tuple[int, ...] = (4, 2)) -> Net:
    """The single-process model every rank builds alike (seeded), biases non-zero."""
    torch.manual_seed(0)
    net = Net(SINGLE_PROCESS, num_experts).double()
    with torch.no_grad():
        for name, param in net.named_parameters():
            if ".experts.b" in name:
                param.normal_(std=0.1)
    return net


def twin(reference: Net, group, num_experts: tuple[int, ...] = (4, 2)) -> Net:
    """A model on ``group`` holding the reference's weights (this rank's shard of each expert)."""
    net = Net(group, num_experts).double()
    with torch.no_grad():
        for name, param in net.named_parameters():
            full = reference.get_parameter(name)
            if ".experts." in name:
                layer = net.get_submodule(name.split(".experts.")[0])
                full = layer.layout.shard(full, HIDDEN_AXIS[name.rsplit(".", 1)[1]])
            local_tensor(param).copy_(full)
    return net


def global_batch(world_size: int) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(TOKENS_PER_RANK * world_size, MODEL_DIM, dtype=torch.float64)


def mine(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x[TOKENS_PER_RANK * rank : TOKENS_PER_RANK * (rank + 1)]


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def assert_matches_reference(net: nn.Module, reference: Net, what: str) -> None:
    """Every parameter and gradient of ``net`` (global view) equals the reference's."""
    for name, param in net.named_parameters():
        expected = reference.get_parameter(name)
        value, grad = expected.detach(), expected.grad
        if ".experts." in name and not isinstance(param, DTensor):  # a plain local shard
            layout = net.get_submodule(name.split(".experts.")[0]).layout
            axis = HIDDEN_AXIS[name.rsplit(".", 1)[1]]
            value, grad = layout.shard(value, axis), layout.shard(grad, axis)
        torch.testing.assert_close(full(param.detach()), value, msg=f"{what}: {name}")
        torch.testing.assert_close(full(param.grad), grad, msg=f"{what}: gradient of {name}")


# --- DTensor experts --------------------------------------------------------------------------------


def check_dtensor_experts(rank: int, world_size: int) -> None:
    """Built on a process group or a DeviceMesh, the experts are DTensors (global shapes and
    placements in the state dict) and outputs and gradients equal the single-process model's."""
    reference = reference_net()
    x = global_batch(world_size)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))
    for group in (dist.group.WORLD, mesh):
        net = twin(reference, group)
        for name, param in net.named_parameters():
            assert isinstance(param, DTensor) == (".experts." in name), name
            assert param.shape == reference.get_parameter(name).shape, name
            if group is mesh and ".experts." in name:
                assert param.device_mesh == mesh, name  # E >= W: the ep mesh itself
        state = net.state_dict()
        assert state["moe.1.experts.w1"].shape == (2, MODEL_DIM, 8)
        assert state["moe.1.experts.w1"].placements == (Shard(0),)
        reference.zero_grad(set_to_none=True)
        loss_of(net(mine(x, rank))).backward()
        allreduce_non_expert_grads(net)
        loss_of(reference(x)).backward()
        assert_matches_reference(net, reference, f"DTensor experts on {type(group).__name__}")


def check_dtensor_input(rank: int, world_size: int) -> None:
    """A DTensor input sharded over tokens: a DTensor output of the same placements, values and
    gradients those of the single-process layer; a feature-sharded input is refused."""
    counts = [3] * world_size
    reference, layer = twin_layers(seed=3, model_dim=MODEL_DIM, hidden_dim=8, num_experts=4, top_k=2)
    torch.manual_seed(4)
    x = torch.randn(sum(counts), MODEL_DIM, dtype=torch.float64)
    upstream = torch.randn_like(x)
    outputs, input_grads, router_grads, expert_grads = reference_grads(reference, x, upstream, counts)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
    sharded = distribute_tensor(x, mesh, [Shard(0)]).requires_grad_(True)
    out = layer(sharded)
    assert isinstance(out, DTensor) and out.placements == (Shard(0),) and out.shape == x.shape
    (out * distribute_tensor(upstream, mesh, [Shard(0)])).sum().backward()
    torch.testing.assert_close(out.to_local(), outputs[rank])
    torch.testing.assert_close(sharded.grad.to_local(), input_grads[rank])
    for name, param in layer.router.named_parameters():
        torch.testing.assert_close(param.grad, router_grads[rank][name])
    for name, param in layer.experts.expert_parameters().items():
        expected = layer.layout.shard(expert_grads[name], HIDDEN_AXIS[name])
        torch.testing.assert_close(local_tensor(param.grad), expected, msg=name)
    # Replicated: every rank computes every token, the output is replicated.
    replicated = layer(distribute_tensor(x, mesh, [Replicate()]))
    assert replicated.placements == (Replicate(),)
    torch.testing.assert_close(replicated.to_local(), torch.cat(outputs))
    with pytest.raises(TypeError, match="token dimensions"):
        layer(distribute_tensor(x, mesh, [Shard(1)]))


def check_optimizer_groups(rank: int, world_size: int) -> None:
    """Multi-tensor optimizers (foreach, CUDA's default, and fused) over DTensor experts and plain
    parameters: parameter_groups steps as the plain per-parameter loop does."""
    reference = reference_net()
    x = global_batch(world_size)
    steps = {}
    for kind in ("loop", "foreach", "fused"):
        net = twin(reference, dist.group.WORLD).float()
        loss_of(net(mine(x, rank).float())).backward()
        flags = {"foreach": kind == "foreach", "fused": kind == "fused"}
        if kind != "loop":
            with pytest.raises(RuntimeError, match=r"mixed torch\.Tensor and DTensor"):
                torch.optim.AdamW(net.parameters(), lr=0.1, **flags).step()
        torch.optim.AdamW(parameter_groups(net), lr=0.1, **flags).step()
        steps[kind] = [local_tensor(param).detach() for param in net.parameters()]
    for kind in ("foreach", "fused"):
        torch.testing.assert_close(steps[kind], steps["loop"])


# --- DCP -----------------------------------------------------------------------------------------


def _trained(group, num_experts, rank: int, ranks: int, distribute: bool = True):
    """A model on ``group`` (``ranks`` ranks; SINGLE_PROCESS for 1) after one Adam step on its
    batch; its experts DTensors or (``distribute=False``) plain local shards."""
    reference = reference_net(num_experts)
    net = twin(reference, group, num_experts)
    if not distribute:
        _as_plain_shards(net)
    optimizer = torch.optim.Adam(parameter_groups(net), lr=0.01)
    loss_of(net(mine(global_batch(ranks), rank))).backward()
    if ranks > 1:
        allreduce_non_expert_grads(net, group)
    optimizer.step()
    return net, optimizer


def _as_plain_shards(net: nn.Module) -> nn.Module:
    """Replace every DTensor expert parameter by a plain one holding its local shard (as a
    ``load_state_dict(..., assign=True)`` of local shards would)."""
    for module in list(net.modules()):
        for name, param in list(module._parameters.items()):
            if isinstance(param, DTensor):
                setattr(module, name, nn.Parameter(param.to_local().detach().clone()))
    return net


def _fresh(group, num_experts, seed: int):
    torch.manual_seed(seed)
    net = Net(group, num_experts).double()
    return net, torch.optim.Adam(parameter_groups(net), lr=0.5)


def _global_state(net: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every parameter and Adam state tensor as a global tensor, by name (collective)."""
    plain_shards = plain_shard_placements(net)

    def global_value(name: str, value: torch.Tensor) -> torch.Tensor:
        if name in plain_shards and value.dim():
            placement, shape = plain_shards[name]
            value = placement.to_dtensor(value, shape)
        return full(value).clone()

    names = {id(p): name for name, p in net.named_parameters()}
    state = {name: global_value(name, p.detach()) for name, p in net.named_parameters()}
    for param, entries in optimizer.state.items():
        for key, value in entries.items():
            state[f"{names[id(param)]}/{key}"] = global_value(names[id(param)], value)
    state["lr"] = torch.tensor(optimizer.param_groups[0]["lr"])
    return state


def _assert_same_state(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=f"{what}: {key}")


def check_dcp_resharding(rank: int, world_size: int, directory: str) -> None:
    """Saved at 4, 2 and 1 rank(s), loaded at each: every parameter and Adam state tensor equals
    what was saved. Two layers: 4 experts (whole at every size) and 2 (split over 2 ranks at 4)."""
    assert world_size == 4
    experts = (4, 2)
    # Every rank joins one pair: flexmoe's sub-groups are named by the count of groups a rank is in.
    pair = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
    net, optimizer = _trained(dist.group.WORLD, experts, rank, 4, distribute=False)
    saved = {4: _global_state(net, optimizer)}
    save_checkpoint(f"{directory}/w4", net, optimizer, extra={"step": 4})
    # Saving viewed the plain shards' Adam state as DTensors, without touching the optimizer's own.
    assert not any(isinstance(value, DTensor) for entries in optimizer.state.values() for value in entries.values())
    if rank < 2:
        net2, optimizer2 = _trained(pair, experts, rank, 2)
        saved[2] = _global_state(net2, optimizer2)
        save_checkpoint(f"{directory}/w2", net2, optimizer2, process_group=pair)
    if rank == 0:
        net1, optimizer1 = _trained(SINGLE_PROCESS, experts, 0, 1)
        saved[1] = _global_state(net1, optimizer1)
        save_checkpoint(f"{directory}/w1", net1, optimizer1)
    dist.barrier()
    for source in (4, 2, 1):
        expected = _from_rank_0(saved.get(source))
        fresh, fresh_optimizer = _fresh(dist.group.WORLD, experts, seed=5 + rank)
        extra = load_checkpoint(f"{directory}/w{source}", fresh, fresh_optimizer)
        _assert_same_state(_global_state(fresh, fresh_optimizer), expected, f"saved at {source}, loaded at 4")
        assert extra == ({"step": 4} if source == 4 else None)
        fresh, fresh_optimizer = _fresh(pair, experts, seed=7 + rank)  # each pair loads at world 2
        load_checkpoint(f"{directory}/w{source}", fresh, fresh_optimizer, process_group=pair)
        _assert_same_state(_global_state(fresh, fresh_optimizer), expected, f"saved at {source}, loaded at 2")
        if rank == 0:
            fresh, fresh_optimizer = _fresh(SINGLE_PROCESS, experts, seed=9)
            load_checkpoint(f"{directory}/w{source}", fresh, fresh_optimizer)
            _assert_same_state(_global_state(fresh, fresh_optimizer), expected, f"saved at {source}, loaded at 1")
        dist.barrier()
    # Plain local expert shards load as well (viewed as the DTensors they are): the same local
    # tensors as a model with DTensor experts gets.
    plain = _as_plain_shards(Net(dist.group.WORLD, experts).double())
    plain_optimizer = torch.optim.Adam(parameter_groups(plain), lr=0.5)
    load_checkpoint(f"{directory}/w1", plain, plain_optimizer)
    fresh, fresh_optimizer = _fresh(dist.group.WORLD, experts, seed=11)
    load_checkpoint(f"{directory}/w1", fresh, fresh_optimizer)
    for (name, param), other in zip(plain.named_parameters(), fresh.parameters()):
        assert not isinstance(param, DTensor)
        torch.testing.assert_close(param, local_tensor(other), rtol=0, atol=0, msg=name)
        for key, value in plain_optimizer.state[param].items():
            torch.testing.assert_close(value, local_tensor(fresh_optimizer.state[other][key]), rtol=0, atol=0)


def _from_rank_0(state: dict | None) -> dict:
    """Rank 0's copy of a saved state, on every rank."""
    box = [state]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_clip_grad_norm(rank: int, world_size: int) -> None:
    """flexmoe.parallel.clip_grad_norm_ takes the single-process model's norm, also with experts
    split over ranks (2 experts at world 4: b2 replicated on both shards of an expert)."""
    reference = reference_net()
    x = global_batch(world_size)
    loss_of(reference(x)).backward()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.1)
    net = twin(reference, dist.group.WORLD)
    loss_of(net(mine(x, rank))).backward()
    allreduce_non_expert_grads(net)
    torch.testing.assert_close(clip_grad_norm_(net, 0.1).double(), expected, rtol=1e-6, atol=0)
    assert_matches_reference(net, reference, "clipped")


# --- FSDP2 -----------------------------------------------------------------------------------------


def check_fsdp_2d(rank: int, world_size: int) -> None:
    """world 4 = 2 dp x 2 ep: loss and every gradient equal the single-process model's."""
    assert world_size == 4
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    reference = reference_net()
    x = global_batch(world_size)
    loss_of(reference(x)).backward()
    net = twin(reference, mesh)  # the layers take the mesh: its "ep" dimension
    apply_fsdp(net, mesh)
    loss = loss_of(net(mine(x, rank)))
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    torch.testing.assert_close(mean_loss / world_size, loss_of(reference(x)).detach())
    assert_matches_reference(net, reference, "FSDP2 on (dp, ep)")
    # A step through the sharded parameters: a multi-tensor optimizer works on the DTensors of
    # both meshes, one group each.
    torch.optim.AdamW(parameter_groups(net), lr=0.1, foreach=True).step()

    # Experts given to FSDP2 as plain local shards: refused, not mixed up across ranks.
    with pytest.raises(ValueError, match="distribute_experts"):
        apply_fsdp(_as_plain_shards(twin(reference, mesh)), mesh)
    # Layers built on the ep process group hold their experts on a mesh of their own: refused.
    with pytest.raises(ValueError, match="group=mesh"):
        apply_fsdp(twin(reference, mesh["ep"].get_group()), mesh)
    # fully_shard over the whole world on DTensor experts fails loudly too (meshes do not combine).
    world_mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("world",))
    other = twin(reference, mesh)
    with pytest.raises((RuntimeError, AssertionError, ValueError, TypeError)):
        fully_shard(other, mesh=world_mesh)
        loss_of(other(mine(x, rank))).backward()


# --- DDP ---------------------------------------------------------------------------------------------


def check_ddp(rank: int, world_size: int) -> None:
    """``DistributedDataParallel(model)`` leaves the experts out with no extra step: every gradient
    equals the single-process model's. A layer put into a model built before reaches the root's
    exclusion list only through exclude_experts_from_ddp: without it DDP fails loudly (DTensor
    experts) or flexmoe refuses naming it (plain experts)."""
    reference = reference_net()
    x = global_batch(world_size)
    loss_of(reference(x)).backward()
    net = twin(reference, dist.group.WORLD)
    ddp = nn.parallel.DistributedDataParallel(net)
    loss_of(ddp(mine(x, rank))).backward()
    assert_matches_reference(net, reference, "DDP with no extra step")

    def late(plain: bool) -> Net:
        model = Net(SINGLE_PROCESS).double()
        layer = MoELayer(num_experts=4, group=dist.group.WORLD, **Net.OPTIONS).double()
        model.moe[1] = _as_plain_shards(layer) if plain else layer
        return model

    with pytest.raises(RuntimeError, match="DTensor"):
        nn.parallel.DistributedDataParallel(late(plain=False))
    with pytest.raises(ValueError, match="exclude_experts_from_ddp"):
        nn.parallel.DistributedDataParallel(late(plain=True))(mine(x, rank))
    for plain in (False, True):
        model = late(plain)
        before = local_tensor(model.moe[1].experts.w1).detach().clone()
        ddp = nn.parallel.DistributedDataParallel(exclude_experts_from_ddp(model))
        loss_of(ddp(mine(x, rank))).backward()
        torch.testing.assert_close(local_tensor(model.moe[1].experts.w1), before, rtol=0, atol=0)


def check_plain_fully_shard(rank: int, world_size: int) -> None:
    """Plain ``fully_shard(model)`` (no apply_fsdp) on expert-parallel layers fails loudly."""
    reference = reference_net()
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))
    for group in (dist.group.WORLD, mesh):
        with pytest.raises(TypeError):
            fully_shard(twin(reference, group))
