"""flexmoe.ops.per_expert: the hand-written per-expert FFN against plain autograd per expert."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flexmoe.ops import exact_count, per_expert
from flexmoe.ops.buffers import BufferCache
from flexmoe.ops.per_expert import per_expert_ffn

E, M, H = 5, 6, 7
COUNTS = [3, 0, 4, 1, 0]


def weights(gated: bool, bias: bool) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(1)

    def make(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_()

    return {
        "w1": make(E, M, H),
        "b1": make(E, H) if bias else None,
        "w3": make(E, M, H) if gated else None,
        "w2": make(E, H, M),
        "b2": make(E, M) if bias else None,
    }


def loop_reference(x, counts, activation, w):
    """Plain autograd, one expert at a time (slices of x and of the weights)."""
    outs, start = [], 0
    for e, count in enumerate(counts):
        piece = x[start : start + count]
        start += count
        pre = piece @ w["w1"][e] + (0 if w["b1"] is None else w["b1"][e])
        hidden = activation(pre) * (1 if w["w3"] is None else piece @ w["w3"][e])
        outs.append(hidden @ w["w2"][e] + (0 if w["b2"] is None else w["b2"][e]))
    return torch.cat(outs)


@pytest.fixture
def reuse_all_rows(monkeypatch):
    """Every row buffer comes from the cache (the sizes here are far below the real threshold)."""
    monkeypatch.setattr(per_expert, "REUSE_MIN_BYTES", 0)


def cached_pointers(cache: BufferCache) -> dict:
    return {name: buffer.data_ptr() for name, (buffer, _) in cache._buffers.items()}


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", [F.gelu, F.relu, F.silu, lambda t: torch.tanh(t) * t])
@pytest.mark.parametrize("reuse", [False, True])
def test_matches_plain_autograd_forward_and_backward(gated, bias, activation, reuse, monkeypatch):
    w = weights(gated, bias)
    x = torch.randn(sum(COUNTS), M, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(sum(COUNTS), M, dtype=torch.float64)
    present = {k: v for k, v in w.items() if v is not None}
    cache = None
    if reuse:  # a first step fills the cache; the checked step runs on its reused buffers
        monkeypatch.setattr(per_expert, "REUSE_MIN_BYTES", 0)
        cache = BufferCache()
        x0 = torch.randn_like(x).requires_grad_()
        torch.autograd.grad(per_expert_ffn(x0, COUNTS, activation, **w, cache=cache), [x0, *present.values()], upstream)
        pointers = cached_pointers(cache)

    out = per_expert_ffn(x, COUNTS, activation, **w, cache=cache)
    got = torch.autograd.grad(out, [x, *present.values()], upstream)
    if reuse:
        assert cached_pointers(cache) == pointers  # every buffer reused, none reallocated
    expected_out = loop_reference(x, COUNTS, activation, w)
    expected = torch.autograd.grad(expected_out, [x, *present.values()], upstream)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(["x", *present], got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert torch.count_nonzero(got[1][1]) == 0  # w1 of expert 1 (no rows): a zero gradient


def test_frozen_inputs_get_no_gradient_and_second_derivative_refuses():
    w = weights(gated=True, bias=True)
    w["w1"].requires_grad_(False)
    x = torch.randn(sum(COUNTS), M, dtype=torch.float64)  # no grad wanted for the input
    out = per_expert_ffn(x, COUNTS, torch.nn.functional.silu, **w)
    out.sum().backward()
    assert w["w1"].grad is None and w["w2"].grad is not None and w["w3"].grad is not None

    x.requires_grad_()
    out = per_expert_ffn(x, COUNTS, torch.nn.functional.silu, **w)
    (grad_x,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad_x.sum().backward()


def test_counts_must_cover_the_rows_and_empty_input_works():
    w = weights(gated=False, bias=True)
    with pytest.raises(ValueError, match="counts must sum"):
        per_expert_ffn(torch.randn(3, M, dtype=torch.float64), COUNTS, torch.relu, **w)
    out = per_expert_ffn(torch.randn(0, M, dtype=torch.float64), [0] * E, torch.relu, **w)
    assert out.shape == (0, M)


def run_backward(w, buffers, counts, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), M, dtype=torch.float64, generator=g)
    per_expert_ffn(x, counts, F.gelu, **w, cache=buffers).backward(torch.randn(x.shape, dtype=x.dtype, generator=g))
    return x


def expected_grads(w, counts, x, seed):
    g = torch.Generator().manual_seed(seed)
    torch.randn(x.shape, dtype=x.dtype, generator=g)  # same upstream gradient as run_backward
    upstream = torch.randn(x.shape, dtype=x.dtype, generator=g)
    present = [v for v in w.values() if v is not None]
    return torch.autograd.grad(loop_reference(x, counts, F.gelu, w), present, upstream)


def test_gradient_buffers_are_reused_once_the_gradient_is_dropped():
    w = weights(gated=True, bias=True)
    buffers = BufferCache()
    run_backward(w, buffers, [2, 3, 1, 4, 1], seed=0)
    first = w["w1"].grad.data_ptr()
    for v in w.values():
        v.grad = None  # optimizer.zero_grad()
    x = run_backward(w, buffers, COUNTS, seed=1)  # experts 1 and 4 now empty: their slices must be zeroed
    assert w["w1"].grad.data_ptr() == first  # the same memory, no new allocation
    present = {k: v for k, v in w.items() if v is not None}
    for (name, param), expected in zip(present.items(), expected_grads(w, COUNTS, x, seed=1)):
        torch.testing.assert_close(param.grad, expected, rtol=1e-12, atol=1e-12, msg=name)
    assert len(buffers) == 5
    buffers.clear()
    assert len(buffers) == 0


def test_gradient_buffers_never_overwrite_a_gradient_still_held():
    w = weights(gated=False, bias=True)
    buffers = BufferCache()
    run_backward(w, buffers, COUNTS, seed=0)
    held = w["w1"].grad  # e.g. kept for logging
    kept = held.clone()
    for v in w.values():
        if v is not None:
            v.grad = None
    run_backward(w, buffers, COUNTS, seed=1)
    assert w["w1"].grad.data_ptr() != held.data_ptr()
    torch.testing.assert_close(held, kept, rtol=0, atol=0)

    # No zero_grad between two backward passes: the gradients add up (accumulation).
    before = w["w2"].grad.clone()
    x = run_backward(w, buffers, COUNTS, seed=2)
    second = expected_grads(w, COUNTS, x, seed=2)[2]  # w1, b1, w2, b2
    torch.testing.assert_close(w["w2"].grad, before + second, rtol=1e-12, atol=1e-12)


def test_buffer_cache_is_not_copied_with_the_module():
    from flexmoe.experts import FFNExperts

    experts = FFNExperts(4, 16, 32)
    x = torch.randn(8, 16)
    experts.forward_per_expert(x, torch.tensor([2, 2, 4, 0])).sum().backward()
    assert len(experts.buffer_cache) == 4
    assert len(copy.deepcopy(experts).buffer_cache) == 0
    assert len(pickle.loads(pickle.dumps(experts)).buffer_cache) == 0
    experts.train()
    assert len(experts.buffer_cache) == 4
    experts.eval()  # inference ahead: the training buffers go
    assert len(experts.buffer_cache) == 0


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("gates_need_grad", [False, True])
@pytest.mark.parametrize("reuse", [False, True])
def test_routed_matches_dispatch_experts_combine(gated, gates_need_grad, reuse, monkeypatch):
    """With token_index and gates: gather, experts and gate-weighted scatter-add in one op.
    Tokens appear under several experts (top-2), some under none (dropped), experts 1 and 4 idle."""
    w = weights(gated, bias=True)
    g = torch.Generator().manual_seed(3)
    tokens = 6
    token_index = torch.tensor([0, 2, 5, 1, 2, 3, 4, 0])  # sorted by expert: counts 3, 0, 4, 1, 0
    x = torch.randn(tokens, M, dtype=torch.float64, generator=g, requires_grad=True)
    gates = torch.rand(token_index.numel(), dtype=torch.float64, generator=g).requires_grad_(gates_need_grad)
    upstream = torch.randn(tokens, M, dtype=torch.float64, generator=g)
    present = [v for v in w.values() if v is not None]
    wanted = [x, *present] + ([gates] if gates_need_grad else [])

    cache = None
    if reuse:  # a first step fills the cache; the checked step runs on its reused buffers
        monkeypatch.setattr(per_expert, "REUSE_MIN_BYTES", 0)
        cache = BufferCache()
        x0 = torch.randn_like(x).requires_grad_()
        first = per_expert_ffn(x0, COUNTS, F.silu, **w, token_index=token_index, gates=gates, cache=cache)
        torch.autograd.grad(first, [x0, *wanted[1:]], upstream)
        pointers = cached_pointers(cache)

    out = per_expert_ffn(x, COUNTS, F.silu, **w, token_index=token_index, gates=gates, cache=cache)
    got = torch.autograd.grad(out, wanted, upstream)
    if reuse:
        assert cached_pointers(cache) == pointers
    expert_out = loop_reference(x[token_index], COUNTS, F.silu, w) * gates.unsqueeze(1)
    expected_out = torch.zeros(tokens, M, dtype=torch.float64).index_add(0, token_index, expert_out)
    expected = torch.autograd.grad(expected_out, wanted, upstream)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_routed_arguments_are_checked():
    w = weights(gated=False, bias=False)
    x = torch.randn(4, M, dtype=torch.float64)
    with pytest.raises(ValueError, match="token_index and gates go together"):
        per_expert_ffn(x, COUNTS, F.relu, **w, token_index=torch.arange(8) % 4)
    with pytest.raises(ValueError, match="entries of token_index"):
        per_expert_ffn(x, COUNTS, F.relu, **w, token_index=torch.arange(3), gates=torch.ones(3, dtype=torch.float64))


def test_reused_buffers_never_overwrite_what_a_pending_backward_needs(reuse_all_rows):
    """Two forwards before their backwards (micro-batches), and a graph kept with retain_graph:
    the activations saved by one call must survive the next call's allocations."""
    w = weights(gated=True, bias=True)
    present = [v for v in w.values() if v is not None]
    cache = BufferCache()
    token_index = torch.tensor([0, 2, 5, 1, 2, 3, 4, 0])
    gates = torch.rand(token_index.numel(), dtype=torch.float64, requires_grad=True)
    xs = [torch.randn(6, M, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    upstream = torch.randn(6, M, dtype=torch.float64)

    def reference(x):
        expert_out = loop_reference(x[token_index], COUNTS, F.gelu, w) * gates.unsqueeze(1)
        out = torch.zeros(6, M, dtype=torch.float64).index_add(0, token_index, expert_out)
        return torch.autograd.grad(out, [x, gates, *present], upstream)

    def run(x, **kwargs):
        return per_expert_ffn(x, COUNTS, F.gelu, **w, token_index=token_index, gates=gates, cache=cache, **kwargs)

    outs = [run(x) for x in xs[:2]]  # both graphs pending
    kept = torch.autograd.grad(outs[0], [xs[0], gates, *present], upstream, retain_graph=True)
    again = run(xs[2])  # may reuse only what no pending graph holds
    for out, x in ((outs[1], xs[1]), (again, xs[2]), (outs[0], xs[0])):
        for a, b in zip(torch.autograd.grad(out, [x, gates, *present], upstream), reference(x)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(kept, reference(xs[0])):  # gradients handed out earlier are not overwritten
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_buffer_cache_shrinks_after_a_large_step(reuse_all_rows):
    """One long batch must not keep its memory for the short ones after it: the cache holds about
    what the last step used (buffers more than twice too large or unused are dropped)."""
    from flexmoe.experts import FFNExperts

    experts = FFNExperts(4, 16, 32)

    def step(rows_per_expert: list[int]) -> int:
        x = torch.randn(sum(rows_per_expert), 16)
        experts.forward_per_expert(x, torch.tensor(rows_per_expert)).sum().backward()
        experts.zero_grad(set_to_none=True)
        return experts.buffer_cache.nbytes()

    small = step([4, 4, 4, 4])
    large = step([400, 4, 4, 0])
    assert large > 10 * small
    step([4, 4, 4, 4])
    assert step([4, 4, 4, 4]) <= 2 * small


# --- the torch.compile form: the flexmoe::exact_count_ffn custom op --------------------------


@pytest.mark.parametrize("kernel", ["per_expert", "grouped"])
@pytest.mark.parametrize("routed", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_exact_count_op_matches_float64_reference_without_recompute(kernel, routed, gated, monkeypatch):
    """The op's forward and its backward against plain float64 autograd (float32 for grouped_mm,
    which has no float64); backward reads what the forward saved: the kernel runs once."""
    if kernel == "grouped" and routed:
        pytest.skip("the grouped kernel takes dispatched rows")
    dtype = torch.float64 if kernel == "per_expert" else torch.float32
    g = torch.Generator().manual_seed(5)
    model_dim, hidden_dim = 8, 12  # rows of 16-byte multiples: grouped_mm's alignment

    def make(*shape):
        return (torch.randn(*shape, dtype=dtype, generator=g) / 3).requires_grad_()

    w = {
        "w1": make(E, model_dim, hidden_dim),
        "b1": make(E, hidden_dim),
        "w3": make(E, model_dim, hidden_dim) if gated else None,
        "w2": make(E, hidden_dim, model_dim),
        "b2": make(E, model_dim),
    }
    token_index = torch.tensor([0, 2, 5, 1, 2, 3, 4, 0])  # sorted by expert: COUNTS
    x = torch.randn(6 if routed else sum(COUNTS), model_dim, dtype=dtype, generator=g, requires_grad=True)
    gates = torch.rand(token_index.numel(), dtype=dtype, generator=g, requires_grad=True) if routed else None
    upstream = torch.randn(x.shape, dtype=dtype, generator=g)
    present = [v for v in w.values() if v is not None]
    wanted = [x, *present] + ([gates] if routed else [])

    calls = []
    forward = exact_count._forward
    monkeypatch.setattr(exact_count, "_forward", lambda *args: calls.append(1) or forward(*args))
    routing = {"token_index": token_index, "gates": gates} if routed else {}
    out = exact_count.exact_count_ffn(kernel, x, torch.tensor(COUNTS), F.silu, *w.values(), **routing)
    got = torch.autograd.grad(out, wanted, upstream)
    assert len(calls) == 1

    if routed:
        expert_out = loop_reference(x[token_index], COUNTS, F.silu, w) * gates.unsqueeze(1)
        expected_out = torch.zeros_like(x).index_add(0, token_index, expert_out)
    else:
        expected_out = loop_reference(x, COUNTS, F.silu, w)
    expected = torch.autograd.grad(expected_out, wanted, upstream)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(out, expected_out, **tol)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **tol)


def test_exact_count_op_registration_passes_opcheck():
    w = weights(gated=True, bias=True)
    x = torch.randn(sum(COUNTS), M, dtype=torch.float64, requires_grad=True)
    args = ("per_expert", x, torch.tensor(COUNTS), None, None, *w.values(), "gelu", True)
    torch.library.opcheck(torch.ops.flexmoe.exact_count_ffn.default, args)


def test_forward_kernels_use_no_private_torch_api():
    """Only public torch calls in the kernels (a private one may change without notice)."""
    for path in (per_expert.__file__, exact_count.__file__, Path(per_expert.__file__).parent / "buffers.py"):
        source = Path(path).read_text()
        assert "torch._" not in source, path


@pytest.mark.parametrize("kernel", ["per_expert", "grouped"])
def test_no_grad_op_matches_the_kernel_and_passes_opcheck(kernel):
    """Without a backward the wrapper calls ``flexmoe::exact_count_ffn_no_grad`` (no autograd
    kernel: cheaper per call); it computes what the kernel computes."""
    # grouped_mm: float32 and 16-byte-aligned rows (8 floats)
    dtype, dim = (torch.float64, M) if kernel == "per_expert" else (torch.float32, 8)
    g = torch.Generator().manual_seed(2)
    w = [
        torch.randn(*shape, dtype=dtype, generator=g)
        for shape in ((E, dim, 8), (E, 8), (E, dim, 8), (E, 8, dim), (E, dim))
    ]
    x = torch.randn(sum(COUNTS), dim, dtype=dtype, generator=g)
    counts = torch.tensor(COUNTS)
    torch.library.opcheck(
        torch.ops.flexmoe.exact_count_ffn_no_grad.default, (kernel, x, counts, None, None, *w, "gelu")
    )
    with torch.no_grad():
        got = exact_count.exact_count_ffn(kernel, x, counts, F.gelu, *w)
    if kernel == "grouped":
        expected = exact_count.grouped_ffn(x, counts, F.gelu, *w)
    else:
        expected = per_expert.per_expert_ffn(x, COUNTS, F.gelu, *w)
    torch.testing.assert_close(got, expected)
