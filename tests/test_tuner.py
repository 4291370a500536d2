import json
import time

import pytest
import torch

from flexmoe.tuner import CACHE_FORMAT, CACHE_VERSION, Choice, Tuner, TuningKey, capacity_bucket, measure_layer_call

A, B, C = Choice(0, 1, "linear"), Choice(1, 2, "linear"), Choice(1, 1, "2dh")


def make_key(capacity: int = 100, **changes) -> TuningKey:
    options = dict(
        world_size=2,
        capacity=capacity,
        model_dim=8,
        hidden_dim=16,
        local_experts=2,
        top_k=2,
        dtype=torch.float32,
        device="cpu",
    )
    options.update(changes)
    return TuningKey.for_call(**options)


def tune(tuner: Tuner, key: TuningKey, seconds: dict[Choice, list[float]]) -> list[Choice]:
    """Drive the choose/record protocol with scripted timings; returns the choices handed out."""
    handed_out, used = [], {choice: 0 for choice in seconds}
    while tuner.is_tuning(key):
        choice = tuner.choose(key, list(seconds))
        handed_out.append(choice)
        tuner.record(key, choice, seconds[choice][used[choice]])
        used[choice] += 1
    return handed_out


def test_round_robin_then_fastest_median():
    tuner, key = Tuner(trials_per_candidate=3), make_key()
    # B has the smallest median (2) though A has the smallest single time and C the smallest mean.
    seconds = {A: [0.5, 9.0, 9.0], B: [2.0, 2.0, 8.0], C: [2.5, 2.5, 2.5]}
    handed_out = tune(tuner, key, seconds)
    assert handed_out == [A, C, B] * 3  # sorted order: (0,1,linear) < (1,1,2dh) < (1,2,linear)
    assert tuner.decision(key) == B
    assert [tuner.choose(key, [C, B, A]) for _ in range(3)] == [B] * 3
    tuner.record(key, A, 0.0)  # ignored once decided
    assert tuner.decision(key) == B


def test_tie_goes_to_smallest_choice():
    tuner, key = Tuner(trials_per_candidate=1), make_key()
    tune(tuner, key, {C: [1.0], B: [1.0], A: [3.0]})
    assert tuner.decision(key) == C == min(B, C)


def test_single_candidate_is_decided_at_once():
    tuner, key = Tuner(), make_key()
    assert tuner.choose(key, [B]) == B and not tuner.is_tuning(key)


def test_capacity_buckets_and_keys():
    assert [capacity_bucket(c) for c in (0, 1, 2, 3, 5, 8, 9, 1000)] == [0, 1, 2, 4, 8, 8, 16, 1024]
    assert make_key(5) == make_key(8) != make_key(9)
    assert make_key(dtype=torch.bfloat16).dtype == "bfloat16"
    tuner = Tuner(trials_per_candidate=1)
    tune(tuner, make_key(5), {A: [1.0], B: [2.0]})
    assert not tuner.is_tuning(make_key(7)) and tuner.is_tuning(make_key(9))


def test_key_reads_no_tensor_values():
    # Meta tensors have shapes, dtypes and devices but no values: the whole protocol runs on them.
    x = torch.empty(4, 8, device="meta")
    key = make_key(dtype=x.dtype, device=x.device)
    tuner = Tuner(trials_per_candidate=1)
    tune(tuner, key, {A: [2.0], B: [1.0]})
    assert key.device_type == "meta" and tuner.decision(key) == B
    with pytest.raises(TypeError, match="seconds"):
        Tuner().record(key, A, torch.tensor(1.0))


def test_tuning_never_changes_results():
    # Two equivalent candidate implementations (same math, different association); the tuned
    # run's output equals the fixed-choice run's output whatever the tuner picks.
    torch.manual_seed(0)
    weight = torch.randn(8, 8, dtype=torch.float64)
    implementations = {A: lambda x: x @ weight, B: lambda x: (x.unsqueeze(1) @ weight).squeeze(1)}
    tuner, key, clock = Tuner(trials_per_candidate=2), make_key(), FakeClock()
    for _ in range(6):
        # x needs a gradient: the measured (hooked) path, forward and backward, is what is checked.
        x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
        choice = tuner.choose(key, list(implementations))
        out = measure_layer_call(implementations[choice], x, lambda s, c=choice: tuner.record(key, c, s), clock=clock)
        torch.testing.assert_close(out, x.detach() @ weight)
        upstream = torch.randn(5, 8, dtype=torch.float64)
        out.backward(upstream)
        torch.testing.assert_close(x.grad, upstream @ weight.T)
    assert not tuner.is_tuning(key)


def test_cache_round_trip(tmp_path):
    path = tmp_path / "sub" / "tuned.json"
    tuner = Tuner(trials_per_candidate=1, cache_path=path)
    tune(tuner, make_key(), {A: [3.0], B: [2.0], C: [1.0]})
    tune(tuner, make_key(1000), {A: [1.0], B: [2.0]})
    data = json.loads(path.read_text())
    assert data["format"] == CACHE_FORMAT and data["version"] == CACHE_VERSION and len(data["entries"]) == 2
    assert [p.name for p in path.parent.iterdir()] == ["tuned.json"]  # no temporary left behind
    rerun = Tuner(trials_per_candidate=1, cache_path=path)
    assert rerun.decisions == {make_key(): C, make_key(1000): A}
    assert rerun.choose(make_key(), [A, B, C]) == C and not rerun.is_tuning(make_key())


def test_cached_choice_outside_candidates_is_tuned_again(tmp_path):
    path = tmp_path / "tuned.json"
    tune(Tuner(trials_per_candidate=1, cache_path=path), make_key(), {A: [2.0], C: [1.0]})
    rerun = Tuner(trials_per_candidate=1, cache_path=path)
    with pytest.warns(UserWarning, match="not among the candidates"):
        assert rerun.choose(make_key(), [A, B]) == A
    assert rerun.is_tuning(make_key())


@pytest.mark.parametrize(
    "text,match",
    [
        ("{not json", "not valid JSON"),
        ('{"entries": []}', "not a flexmoe tuner cache"),
        (json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, "entries": [{"key": {}}]}), "malformed"),
    ],
)
def test_corrupt_cache_raises(tmp_path, text, match):
    path = tmp_path / "tuned.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        Tuner(cache_path=path)


def test_other_cache_version_is_ignored_with_warning(tmp_path):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION + 1, "entries": "?"}))
    with pytest.warns(UserWarning, match="version"):
        tuner = Tuner(trials_per_candidate=1, cache_path=path)
    assert tuner.decisions == {}
    tune(tuner, make_key(), {A: [1.0], B: [2.0]})
    assert json.loads(path.read_text())["version"] == CACHE_VERSION


@pytest.mark.parametrize(
    "build,error,match",
    [
        (lambda: Choice(-1), ValueError, "parallel_degree"),
        (lambda: Choice(1, 0), ValueError, "overlap_degree"),
        (lambda: Choice(1, 1, "ring"), ValueError, "a2a_algorithm"),
        (lambda: Choice(1.0), TypeError, "parallel_degree"),
        (lambda: Tuner(trials_per_candidate=0), ValueError, "trials_per_candidate"),
        (lambda: make_key(capacity=-1), ValueError, "capacity"),
        (lambda: make_key(dtype="float32"), TypeError, "dtype"),
        (lambda: Tuner().choose(make_key(), []), ValueError, "candidates"),
        (lambda: Tuner().choose(make_key(), [(0, 1, "linear")]), TypeError, "Choice"),
        (lambda: Tuner().choose("key", [A]), TypeError, "TuningKey"),
        (lambda: Tuner().record(make_key(), A, 1.0), ValueError, "before choose"),
        (lambda: Tuner().record(make_key(), A, -1.0), ValueError, "seconds"),
    ],
)
def test_bad_input(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_record_of_foreign_choice_and_changed_candidates():
    tuner, key = Tuner(), make_key()
    tuner.choose(key, [A, B])
    with pytest.raises(ValueError, match="one of the candidates"):
        tuner.record(key, C, 1.0)
    with pytest.raises(ValueError, match="changed during tuning"):
        tuner.choose(key, [A, C])


def test_choice_and_key_are_json_and_hashable():
    key = make_key()
    assert TuningKey.from_json(json.loads(json.dumps(key.to_json()))) == key
    assert Choice.from_json(json.loads(json.dumps(C.to_json()))) == C
    assert len({A, Choice(0, 1, "linear"), B}) == 2


# --- measure_layer_call ------------------------------------------------------------------------


class FakeClock:
    """A clock that moves only when a toy candidate says it spent time."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Costly(torch.autograd.Function):
    """Identity whose forward and backward advance a fake clock (or sleep on a real one)."""

    @staticmethod
    def forward(ctx, x, forward_cost, backward_cost, spend):
        ctx.backward_cost, ctx.spend = backward_cost, spend
        spend(forward_cost)
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        ctx.spend(ctx.backward_cost)
        return grad * 2, None, None, None


def advance(clock: FakeClock):
    def spend(seconds: float) -> None:
        clock.now += seconds

    return spend


def test_measures_forward_and_backward_with_fake_clock():
    clock, measured = FakeClock(), []
    x = torch.randn(3, 4, requires_grad=True)
    out = measure_layer_call(lambda t: _Costly.apply(t, 2.0, 3.0, advance(clock)), x, measured.append, clock=clock)
    assert measured == []  # the backward has not run yet
    clock.now += 50.0  # time spent between forward and backward (other layers) is not counted
    (out * 1.5).sum().backward()
    assert measured == [5.0]
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))  # gradients flow unchanged


def test_input_without_grad_still_measures_backward():
    clock, measured = FakeClock(), []
    weight = torch.ones(4, requires_grad=True)
    out = measure_layer_call(
        lambda t: _Costly.apply(t * weight, 1.0, 4.0, advance(clock)), torch.randn(2, 4), measured.append, clock=clock
    )
    out.sum().backward()
    assert measured == [5.0] and weight.grad is not None


def test_inference_reports_forward_only():
    clock, measured = FakeClock(), []
    run = lambda t: _Costly.apply(t, 2.0, 3.0, advance(clock))  # noqa: E731
    with torch.no_grad():
        measure_layer_call(run, torch.randn(3), measured.append, clock=clock)
    assert measured == [2.0]


def test_no_backward_under_grad_mode_reports_nothing():
    clock, measured = FakeClock(), []
    x = torch.randn(3, requires_grad=True)
    measure_layer_call(lambda t: _Costly.apply(t, 2.0, 3.0, advance(clock)), x, measured.append, clock=clock)
    assert measured == []


def test_tuner_decides_on_backward_cost():
    # FAST_FORWARD wins on forward time alone, but its backward makes it the slower call.
    fast_forward, fast_total = Choice(0), Choice(1)
    costs = {fast_forward: (1.0, 10.0), fast_total: (4.0, 1.0)}
    tuner, key, clock = Tuner(trials_per_candidate=2), make_key(), FakeClock()
    while tuner.is_tuning(key):
        choice = tuner.choose(key, list(costs))
        x = torch.randn(2, 3, requires_grad=True)
        run = lambda t, c=choice: _Costly.apply(t, *costs[c], advance(clock))  # noqa: E731
        measure_layer_call(run, x, lambda s, c=choice: tuner.record(key, c, s), clock=clock).sum().backward()
    assert tuner.decision(key) == fast_total


def test_real_clock_sleeping_backward_loses():
    # Real time: one candidate sleeps 0.2 s in its backward; the decision (not a threshold) is checked.
    costs = {Choice(0): (0.0, 0.2), Choice(1): (0.0, 0.0)}
    tuner, key = Tuner(trials_per_candidate=3), make_key()
    while tuner.is_tuning(key):
        choice = tuner.choose(key, list(costs))
        x = torch.randn(2, 3, requires_grad=True)
        out = measure_layer_call(
            lambda t, c=choice: _Costly.apply(t, *costs[c], time.sleep), x, lambda s, c=choice: tuner.record(key, c, s)
        )
        out.sum().backward()
    assert tuner.decision(key) == Choice(1)


def test_grad_mode_without_anything_to_differentiate_reports_forward():
    clock, measured = FakeClock(), []
    run = lambda t: _Costly.apply(t, 2.0, 3.0, advance(clock))  # noqa: E731
    measure_layer_call(run, torch.randn(3), measured.append, clock=clock)
    assert measured == [2.0]


def test_measures_a_real_moe_layer_once():
    from flexmoe import MoELayer

    layer, measured = MoELayer(model_dim=8, num_experts=4, hidden_dim=16), []
    x = torch.randn(2, 5, 8, requires_grad=True)
    out = measure_layer_call(layer, x, measured.append)
    reference = layer(x.detach().requires_grad_())
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    out.sum().backward(retain_graph=True)
    out.sum().backward()  # a second backward through the same call reports nothing more
    assert len(measured) == 1 and measured[0] > 0


def test_output_can_be_modified_in_place():
    clock, measured = FakeClock(), []
    x = torch.randn(3, requires_grad=True)
    out = measure_layer_call(lambda t: _Costly.apply(t, 1.0, 1.0, advance(clock)), x, measured.append, clock=clock)
    out.mul_(3).sum().backward()
    assert measured == [2.0]
    torch.testing.assert_close(x.grad, torch.full_like(x, 6.0))


# --- the tuner inside MoELayer (single process; the distributed cases run in tests/distributed) ----


def test_one_choice_type_shared_with_the_parallel_package():
    from flexmoe.parallel import ParallelChoice

    assert Choice is ParallelChoice
    assert sorted([C, B, A]) == [A, C, B]  # ordered by (r, d, algorithm): the tie-break


def test_single_process_layer_with_tuner_equals_the_plain_layer(tmp_path):
    from flexmoe import MoELayer
    from tests.conftest import make_layer

    plain = make_layer()
    tuner = Tuner(cache_path=tmp_path / "cache.json")
    tuned = make_layer(tuner=tuner)
    tuned.load_state_dict(plain.state_dict())
    # One candidate at world 1 (no exchange: r and d do not change the computation).
    assert tuned.valid_parallel_choices() == [Choice(1)]
    for _ in range(3):
        x = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
        outputs, grads = [], []
        for layer in (plain, tuned):
            layer.zero_grad(set_to_none=True)
            x.grad = None
            out = layer(x)
            out.pow(2).sum().backward()
            outputs.append(out)
            grads.append([x.grad, *(p.grad for p in layer.parameters())])
        torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
        for got, expected in zip(*grads):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # An explicit choice still works beside the tuner.
    torch.testing.assert_close(tuned(x, overlap_degree=2), plain(x), rtol=0, atol=0)
    with pytest.raises(TypeError, match="tuner must be"):
        MoELayer(model_dim=8, num_experts=2, hidden_dim=4, tuner="auto")


def test_layer_tuning_key_reads_the_agreed_capacity_and_layout():
    from flexmoe.executors.expert_parallel import tuning_key
    from tests.conftest import make_layer

    layer = make_layer(top_k=2)
    key = tuning_key(layer.config, layer.layout, 9, 2, torch.zeros(6, 8, dtype=torch.float64))
    assert key == TuningKey(1, 16, 8, 12, 6, 2, "float64", "cpu", shards_per_expert=1)
