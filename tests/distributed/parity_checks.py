"""Rank-side check: every valid (parallel degree, overlap degree, all-to-all algorithm) gives the
single-process result on each rank's tokens: outputs, input / router / expert gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from flexmoe import MoELayer
from flexmoe.distributed import local_tensor
from flexmoe.parallel import HIDDEN_AXIS, SINGLE_PROCESS
from flexmoe.parallel.all_to_all import Exchange
from tests.distributed.helpers import local_slice, reference_grads, twin_layers

TIGHT = dict(rtol=1e-10, atol=1e-12)
# float32: the single-process twin runs grouped_mm, the distributed layer padded bmm.
TOLERANCE = {torch.float64: TIGHT, torch.float32: dict(rtol=1e-4, atol=1e-5)}


def check_case(rank: int, options: dict, counts: list[int], call: dict) -> int:
    """All valid choices of one layer against its twin; returns how many choices were checked.
    ``options``: MoELayer options, plus ``dtype`` (default float64) and ``skew`` (the share of
    the batch whose first choice is expert 0, default: no skew)."""
    options = dict(options)
    dtype = options.pop("dtype", torch.float64)
    skew = options.pop("skew", None)
    tolerance = TOLERANCE[dtype]
    reference, layer = twin_layers(seed=len(counts) + options["num_experts"], dtype=dtype, **options)
    torch.manual_seed(100)  # same global batch on every rank
    x = torch.randn(sum(counts), options["model_dim"], dtype=dtype)
    if skew is not None:
        skew_router(reference, layer, x, skew)
    upstream = torch.randn_like(x)
    outputs, input_grads, router_grads, expert_grads = reference_grads(reference, x, upstream, counts, **call)
    mine = local_slice(counts, rank)
    choices = layer.valid_parallel_choices()
    for choice in choices:
        layer.zero_grad(set_to_none=True)
        part = x[mine].clone().requires_grad_(True)
        out = layer(
            part,
            parallel_degree=choice.parallel_degree,
            overlap_degree=choice.overlap_degree,
            a2a_algorithm=choice.a2a_algorithm,
            exact=choice.exact,
            **call,
        )
        (out * upstream[mine]).sum().backward()
        context = f"rank {rank} {options} {choice}"
        torch.testing.assert_close(out, outputs[rank], **tolerance, msg=lambda m, c=context: f"{c} output: {m}")
        torch.testing.assert_close(part.grad, input_grads[rank], **tolerance, msg=lambda m, c=context: f"{c} dx: {m}")
        for name, param in layer.router.named_parameters():
            torch.testing.assert_close(param.grad, router_grads[rank][name], **tolerance)
        for name, param in layer.experts.expert_parameters().items():
            expected = layer.layout.shard(expert_grads[name], HIDDEN_AXIS[name])
            torch.testing.assert_close(
                local_tensor(param.grad), expected, **tolerance, msg=lambda m, c=context, n=name: f"{c} grad {n}: {m}"
            )
    return len(choices)


def skew_router(reference: MoELayer, layer: MoELayer, x: torch.Tensor, share: float) -> None:
    """Make the first ``share`` of the rows of ``x`` (and only those) pick expert 0 first, in both
    layers: feature 0 of those rows is set to 4, the others' to -4, and expert 0's router row
    reads mostly that feature."""
    busy = round(share * x.shape[0])
    x[:busy, 0], x[busy:, 0] = 4.0, -4.0
    with torch.no_grad():
        for model in (reference, layer):
            model.router.weight[0] = 0.0
            model.router.weight[0, 0] = 3.0
    first = reference.routing.plan(torch.softmax(x @ reference.router.weight.T, -1), 1, 0.0).expert_index
    assert (first == 0).sum() == busy, "the skewed router must send exactly the chosen rows to expert 0"


def check_cases(rank: int, world_size: int, cases: list[tuple[dict, list[int], dict, int]]) -> None:
    """cases: (layer options, tokens per rank, per-call options, expected number of valid choices)."""
    for options, counts, call, expected_choices in cases:
        assert check_case(rank, options, counts, call) == expected_choices, (options, world_size)


class _LinearExperts(nn.Module):
    """A custom expert module: one bias-free linear map per expert, [n, rows, M] -> [n, rows, M]."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.bmm(x, self.weight))


def check_custom_experts(rank: int, world_size: int) -> None:
    """Custom experts hold the local experts and run at r = 1, with the same gradient convention."""
    num_experts, model_dim, counts = 2 * world_size, 6, [5, 0, 3, 4][:world_size]
    torch.manual_seed(7)
    weight = torch.randn(num_experts, model_dim, model_dim, dtype=torch.float64)
    options = dict(model_dim=model_dim, num_experts=num_experts)
    reference = MoELayer(**options, experts=_LinearExperts(weight), group=SINGLE_PROCESS).double()
    local = slice(rank * 2, rank * 2 + 2)
    layer = MoELayer(**options, experts=_LinearExperts(weight[local]), group=dist.group.WORLD).double()
    layer.router.load_state_dict(reference.router.state_dict())
    assert [c.parallel_degree for c in layer.valid_parallel_choices()] == [1, 1, 1]
    x = torch.randn(sum(counts), model_dim, dtype=torch.float64)
    upstream = torch.randn_like(x)
    weight_grad = torch.zeros_like(weight)
    for other in range(world_size):
        reference.zero_grad()
        part = x[local_slice(counts, other)].clone().requires_grad_(True)
        out = reference(part)
        (out * upstream[local_slice(counts, other)]).sum().backward()
        weight_grad += reference.experts.weight.grad / world_size
        if other == rank:
            expected_out, expected_dx = out.detach(), part.grad
    for overlap_degree in (1, 2):
        layer.zero_grad()
        part = x[local_slice(counts, rank)].clone().requires_grad_(True)
        out = layer(part, overlap_degree=overlap_degree)
        (out * upstream[local_slice(counts, rank)]).sum().backward()
        torch.testing.assert_close(out, expected_out, **TIGHT)
        torch.testing.assert_close(part.grad, expected_dx, **TIGHT)
        torch.testing.assert_close(layer.experts.weight.grad, weight_grad[local], **TIGHT)


class _LoggedExperts(nn.Module):
    """Custom experts that log their forward and backward into ``log``."""

    def __init__(self, log: list[str]):
        super().__init__()
        self.log = log
        self.weight = nn.Parameter(torch.randn(2, 4, 4, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append("compute")
        x = x.clone()
        x.register_hook(lambda grad: self.log.append("compute_bwd"))
        return torch.bmm(x, self.weight)


def check_pipeline_order(rank: int, world_size: int, monkeypatch) -> None:
    """With d = 2 the next chunk's exchange is issued before this chunk computes, forward and
    backward (the structure that lets transfers overlap compute; no timing involved): padded
    blocks (custom experts) and exact counts (built-in experts, compute logged)."""
    log: list[str] = []
    issue, wait = Exchange.issue, Exchange.wait
    monkeypatch.setattr(Exchange, "issue", lambda self, x: (log.append("issue"), issue(self, x))[1])
    monkeypatch.setattr(Exchange, "wait", lambda self: (log.append("wait"), wait(self))[1])
    experts = _LoggedExperts(log)
    layer = MoELayer(model_dim=4, num_experts=2 * world_size, experts=experts, top_k=1, group=dist.group.WORLD).double()
    x = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    _check_order(log, layer(x, overlap_degree=2, capacity_factor=2.0))

    exact_layer = MoELayer(model_dim=4, hidden_dim=4, num_experts=2 * world_size, top_k=1, group=dist.group.WORLD)
    compute = exact_layer.experts.forward_exact_with

    def logged_compute(rows: torch.Tensor, *args) -> torch.Tensor:
        log.append("compute")
        rows = rows.clone()
        rows.register_hook(lambda grad: log.append("compute_bwd"))
        return compute(rows, *args)

    monkeypatch.setattr(exact_layer.experts, "forward_exact_with", logged_compute)
    log[:] = []
    _check_order(log, exact_layer(torch.randn(8, 4, requires_grad=True), overlap_degree=2, exact=True))


def _check_order(log: list[str], out: torch.Tensor) -> None:
    forward, log[:] = list(log), []
    out.sum().backward()
    # there_0, there_1 issued; chunk 0 computes while there_1 flies; back_0 flies while chunk 1 computes.
    assert forward == ["issue", "issue", "wait", "compute", "issue", "wait", "compute", "issue", "wait", "wait"]
    # Both return gradients issued; one chunk's input gradient flies while the other computes.
    assert log == ["issue", "issue", "wait", "compute_bwd", "issue", "wait", "compute_bwd", "issue", "wait", "wait"]
