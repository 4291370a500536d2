"""A group of one rank, in this process: expert parallelism is explicit (group=None stays local
under an initialised torch.distributed), a 1-D DeviceMesh or a mesh's "ep" dimension is a group,
and the expert-parallel executor (count exchange, exact and padded exchanges) equals the local
layer. The same checks run on CUDA with NCCL under the ``gpu`` marker."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from flexmoe import MoELayer
from flexmoe.executors import ExpertParallelExecutor, LocalExecutor
from tests.distributed.launcher import free_port

OPTIONS = dict(model_dim=16, hidden_dim=32, num_experts=4, top_k=2)


@pytest.fixture
def world_one(request):
    """torch.distributed initialised with one rank on ``request.param`` ("gloo" or "nccl")."""
    backend = request.param
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield backend
    finally:
        dist.destroy_process_group()


def _device(backend: str) -> torch.device:
    return torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")


def _check_world_one(backend: str, dtype: torch.dtype, tolerance: dict) -> None:
    device = _device(backend)
    torch.manual_seed(0)
    local = MoELayer(**OPTIONS).to(device, dtype)
    assert local.groups is None and isinstance(local.executor, LocalExecutor)  # None: local, even under dist
    sharded = MoELayer(**OPTIONS, group=dist.group.WORLD).to(device, dtype)
    assert isinstance(sharded.executor, ExpertParallelExecutor)
    sharded.load_state_dict(local.state_dict())
    x = torch.randn(24, OPTIONS["model_dim"], device=device, dtype=dtype)
    upstream = torch.randn_like(x)
    part = x.clone().requires_grad_(True)
    (local(part) * upstream).sum().backward()
    expected = (local(x).detach(), part.grad, {n: p.grad for n, p in local.named_parameters()})
    for choice in sharded.valid_parallel_choices():
        sharded.zero_grad(set_to_none=True)
        part = x.clone().requires_grad_(True)
        out = sharded(
            part,
            parallel_degree=choice.parallel_degree,
            overlap_degree=choice.overlap_degree,
            exact=choice.exact,
        )
        (out * upstream).sum().backward()
        torch.testing.assert_close(out, expected[0], **tolerance, msg=lambda m, c=choice: f"{c}: {m}")
        torch.testing.assert_close(part.grad, expected[1], **tolerance)
        for name, param in sharded.named_parameters():
            torch.testing.assert_close(param.grad, expected[2][name], **tolerance, msg=lambda m, n=name: f"{n}: {m}")


def _check_meshes(backend: str) -> None:
    device_type = _device(backend).type
    mesh = init_device_mesh(device_type, (1,))
    assert MoELayer(**OPTIONS, group=mesh).groups.world_size == 1
    named = init_device_mesh(device_type, (1, 1), mesh_dim_names=("dp", "ep"))
    assert MoELayer(**OPTIONS, group=named).groups.world_size == 1
    unnamed = init_device_mesh(device_type, (1, 1), mesh_dim_names=("dp", "tp"))
    with pytest.raises(ValueError, match="dimension named 'ep'"):
        MoELayer(**OPTIONS, group=unnamed)


@pytest.mark.parametrize("world_one", ["gloo"], indirect=True)
def test_world_one_gloo(world_one):
    _check_world_one(world_one, torch.float64, dict(rtol=1e-10, atol=1e-12))
    _check_meshes(world_one)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("world_one", ["nccl"], indirect=True)
def test_world_one_nccl(world_one):
    torch.cuda.set_device(0)
    # CUDA float32 runs grouped_mm on both sides; float64 runs per_expert (exact) and bmm (padded).
    _check_world_one(world_one, torch.float32, dict(rtol=1e-4, atol=1e-5))
    _check_world_one(world_one, torch.float64, dict(rtol=1e-10, atol=1e-12))
    _check_meshes(world_one)


@pytest.mark.parametrize("world_one", ["gloo"], indirect=True)
@pytest.mark.parametrize("kernel", ["grouped", "per_expert"])
def test_world_one_exact_path_compiles(world_one, kernel):
    """The expert-parallel exact path runs its experts as the registered op under torch.compile
    (grouped_mm's fake rule would refuse float32): compiled equals eager, forward and backward."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MoELayer(**OPTIONS, expert_kernel=kernel, group=dist.group.WORLD)
    x = torch.randn(24, OPTIONS["model_dim"])

    def run(call):
        part = x.clone().requires_grad_(True)
        out = call(part, exact=True)
        out.square().sum().backward()
        grads = [part.grad, *(p.grad.clone() for p in layer.parameters())]
        layer.zero_grad(set_to_none=True)
        return [out.detach(), *grads]

    for got, expected in zip(run(torch.compile(layer)), run(layer)):
        torch.testing.assert_close(got, expected)
