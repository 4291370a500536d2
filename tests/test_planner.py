"""The planner: configs, the cost model's terms, choice enumeration, calibration, tuner pruning, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from flexmoe.cli import COMMANDS
from flexmoe.parallel import ParallelChoice
from flexmoe.parallel.layout import ExpertLayout
from flexmoe.planner import (
    ClusterConfig,
    LayerShape,
    Measurement,
    PlanChoice,
    Workload,
    candidates_to_measure,
    fit_cluster,
    load_measurements,
    make_plan,
    predict,
    preset,
    skewed_load,
    tuner_predictor,
    valid_plan_choices,
    validate,
)
from flexmoe.planner.calibrate import LOOPBACK_START, RECORDS_FORMAT
from flexmoe.planner.cli import main as plan_main
from flexmoe.planner.model import _Exchange, linear_all_to_all, pipeline_backward, pipeline_forward, two_dh_all_to_all
from flexmoe.planner.plan import plot_sweep, sweep
from flexmoe.routing.capacity import capacity_bound
from flexmoe.tuner import Tuner, TuningKey

A100 = preset("a100-hdr")
SHAPE = LayerShape(model_dim=256, hidden_dim=512, num_experts=16, top_k=2, tokens_per_rank=1024)


# --- configs ----------------------------------------------------------------------------------------


def test_presets_and_errors_name_the_fix():
    assert preset("h100-ndr").gpus_per_node == 8
    with pytest.raises(ValueError, match="a100-hdr"):
        preset("tpu")
    with pytest.raises(ValueError, match="top_k"):
        LayerShape(8, 8, num_experts=2, top_k=3, tokens_per_rank=4)
    with pytest.raises(ValueError, match="dtype"):
        LayerShape(8, 8, 2, 1, 4, dtype="int8")
    with pytest.raises(ValueError, match="float64"):
        A100.throughput("float64")
    with pytest.raises(ValueError, match="inter_node_bandwidth"):
        A100.replace(inter_node_bandwidth=0)


@pytest.mark.parametrize("factor", [0.5, 1.0, 1.3, 4.0])
def test_capacity_is_the_routers(factor):
    shape = SHAPE.replace(capacity_factor=factor, tokens_per_rank=1000)
    assert shape.capacity() == capacity_bound(factor, 1000, 16, 2)


def test_skewed_load_and_dropless_capacity():
    load = skewed_load(8, 3.0)
    assert math.isclose(sum(load), 1.0) and math.isclose(load[0] * 8, 3.0)
    assert len(set(load[1:])) == 1
    shape = SHAPE.replace(num_experts=8, capacity_factor=0.0, expert_load=load)
    assert shape.capacity() == math.ceil(1024 * 2 * load[0])
    with pytest.raises(ValueError, match="skew"):
        skewed_load(8, 9.0)


def test_cluster_json_round_trip():
    assert ClusterConfig.from_json(json.loads(json.dumps(A100.to_json()))) == A100


# --- choices ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("experts,world", [(16, 16), (32, 8), (4, 64), (8, 2048)])
def test_choices_mirror_the_executors(experts, world):
    shape = SHAPE.replace(num_experts=experts, hidden_dim=1024, top_k=1)
    layout = ExpertLayout(experts, world)
    choices = valid_plan_choices(shape, A100, world, overlap_degrees=(1, 2))
    assert sorted({c.parallel_degree for c in choices}) == layout.valid_degrees()
    for choice in choices:
        if choice.parallel_degree == 0:
            assert (choice.overlap_degree, choice.a2a_algorithm) == (1, "linear")
        if choice.a2a_algorithm == "2dh":  # whole world in the exchange, at least two nodes
            assert choice.parallel_degree == layout.shards_per_expert and world > A100.gpus_per_node
    per_rows = len(choices) // 2
    assert per_rows == 1 + sum(
        2 * (1 + (r == layout.shards_per_expert and world > 8)) for r in layout.valid_degrees()[1:]
    )


def test_choices_reject_a_bad_layout():
    with pytest.raises(ValueError, match="divide"):
        valid_plan_choices(SHAPE, A100, 24)


# --- the model's terms ------------------------------------------------------------------------------

FLAT = ClusterConfig(
    "flat",
    gpus_per_node=4,
    intra_node_latency=1e-6,
    intra_node_bandwidth=1e9,
    inter_node_latency=1e-5,
    inter_node_bandwidth=1e8,
    gemm_throughput={"bfloat16": 1e12},
    memory_bandwidth=1e10,
    op_overhead=1e-6,
)


def test_linear_all_to_all_is_alpha_beta_per_peer():
    # 16 ranks, 4 per node: 3 intra peers, 12 inter peers, each message nbytes / 16.
    nbytes = 1.6e6
    expected = 1e-6 + 3 * 1e-6 + 12 * 1e-5 + max(nbytes * 3 / 16 / 1e9, nbytes * 12 / 16 / 1e8)
    assert math.isclose(linear_all_to_all(FLAT, 16, nbytes), expected)
    intra, inter = two_dh_all_to_all(FLAT, 16, nbytes)
    regroup = 2 * nbytes / 1e10
    assert math.isclose(intra, regroup + 3 * (1e-6 + nbytes / 4 / 1e9) + 1e-6)
    assert math.isclose(inter, regroup + 3 * (1e-5 + nbytes / 4 / 1e8) + 1e-6)


def test_latency_bound_2dh_gain_is_the_peer_count_ratio():
    # Tiny messages: linear pays W-1 peer latencies, 2dh (P-1) + (W/P-1) of them.
    world, tiny = 2048, 8.0
    linear = linear_all_to_all(A100, world, tiny)
    two_dh = sum(two_dh_all_to_all(A100, world, tiny))
    peers = 7 * A100.intra_node_latency + 2040 * A100.inter_node_latency
    hierarchical = 7 * A100.intra_node_latency + 255 * A100.inter_node_latency
    assert math.isclose(linear / two_dh, peers / hierarchical, rel_tol=0.02)


def test_pipeline_fill_and_drain():
    comm = _Exchange(1.0)
    assert pipeline_forward(1, comm, 3.0, comm) == 5.0  # there, compute, back: no overlap
    # Compute-bound (compute 2, each direction's exchange 0.5 in all): the first arrival and the last
    # return stick out of the computes (fill and drain), 0.5 / d each.
    for d in (2, 4, 8):
        chunk = _Exchange(0.5 / d)
        assert math.isclose(pipeline_forward(d, chunk, 2.0 / d, chunk), 2 + 1 / d)
        assert math.isclose(pipeline_backward(d, chunk, 2.0 / d, chunk), 2 + 1 / d)
    # Network-bound (each direction 1, compute 1): the network never idles, the compute is hidden.
    assert math.isclose(pipeline_forward(4, _Exchange(0.25), 0.25, _Exchange(0.25)), 2.0)
    # No communication: chunks only add nothing.
    assert pipeline_forward(4, _Exchange(0.0), 0.25, _Exchange(0.0)) == 1.0
    # A blocking stage (2dh's inter-node) cannot overlap compute.
    blocking = _Exchange(0.0, 0.5)
    assert pipeline_forward(2, blocking, 1.0, blocking) == 2 * 0.5 + 2 * 1.0 + 2 * 0.5


def test_gemm_flops_are_the_same_for_every_degree():
    # Tutel's identical layout: every r computes the same FLOPs per rank (padded rows).
    shape = SHAPE.replace(num_experts=4, hidden_dim=1024)
    gemms = {round(p.gemm, 12) for p in make_plan(shape, A100, 32).predictions if p.choice.token_rows == "padded"}
    assert len(gemms) == 1


def _brute_received(rows, experts, world, degree):
    """Rows each rank receives, from the layout's own placement (no shortcut formulas)."""
    received = []
    for rank in range(world):
        layout = ExpertLayout(experts, world, rank)
        if experts >= world:
            received.append(sum(sum(src[layout.expert_slice]) for src in rows))
        else:
            block = layout.shards_per_expert // degree
            senders = [s for s in range(world) if s % block == rank % block]
            received.append(sum(rows[s][layout.first_expert] for s in senders))
    return max(received)


@pytest.mark.parametrize("experts,world,degree", [(8, 4, 1), (4, 4, 1), (2, 8, 1), (2, 8, 2), (2, 8, 4)])
def test_received_rows_follow_the_layout(experts, world, degree):
    generator = torch.Generator().manual_seed(experts * world + degree)
    rows = torch.randint(0, 50, (world, experts), generator=generator).tolist()
    workload = Workload(world, 50, tuple(tuple(float(v) for v in row) for row in rows))
    assert workload.max_received_rows(degree) == _brute_received(rows, experts, world, degree)
    alike = Workload(world, 50, (tuple(float(v) for v in rows[0]),))
    assert alike.max_received_rows(degree) == _brute_received([rows[0]] * world, experts, world, degree)


def test_exact_rows_win_when_padding_is_waste_and_not_under_one_hot_expert():
    # A large capacity factor pads every expert 4x: the exact path moves and computes 1/4 of it.
    padded_heavy = SHAPE.replace(capacity_factor=4.0, model_dim=2048, hidden_dim=2048, tokens_per_rank=8192)
    plan = make_plan(padded_heavy, A100, 16)
    assert plan.fastest(token_rows="exact").seconds < 0.5 * plan.fastest(token_rows="padded").seconds
    exact, padded = (predict(padded_heavy, A100, 16, PlanChoice(1, 2, "linear", rows)) for rows in ("exact", "padded"))
    assert math.isclose(exact.gemm, padded.gemm / 4)
    # Dropless with one hot expert per rank (E = W): the hot rank receives as much as the padded
    # buffer holds, the all-to-all waits for it, so exact only adds its count exchange.
    hot = SHAPE.replace(capacity_factor=0.0, expert_load=skewed_load(16, 3.0))
    plan = make_plan(hot, A100, 16)
    for prediction in plan.predictions:
        if prediction.choice.token_rows == "exact" and prediction.choice.parallel_degree:
            choice = prediction.choice
            padded = plan.seconds(PlanChoice(choice.parallel_degree, choice.overlap_degree, choice.a2a_algorithm))
            assert prediction.seconds >= padded


def test_the_best_is_the_fastest_and_the_expert_step_excludes_the_layer_around_it():
    plan = make_plan(SHAPE, A100, 64)
    assert plan.best.seconds == min(p.seconds for p in plan.predictions)
    for prediction in plan.predictions:
        assert 0 < prediction.expert_step < prediction.seconds


# --- tuner pruning ----------------------------------------------------------------------------------


def test_candidates_to_measure():
    predictions = {"a": 5.0, "b": 1.0, "c": None, "d": 2.0, "e": 1.0, "f": float("nan")}
    assert candidates_to_measure(predictions, 32) == list(predictions)  # below 64 ranks: all
    assert candidates_to_measure(predictions, 64) == ["b", "d", "e"]  # 3 fastest, offered order
    assert candidates_to_measure(predictions, 2048, limit=1) == ["b"]  # tie: the earlier
    assert candidates_to_measure({"a": None, "b": 3.0}, 64, limit=2) == ["a", "b"]
    assert candidates_to_measure({"a": None, "b": None, "c": None, "d": None}, 64) == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="empty"):
        candidates_to_measure({}, 64)


def _key(world_size: int) -> TuningKey:
    return TuningKey.for_call(
        world_size=world_size,
        capacity=128,
        model_dim=256,
        hidden_dim=512,
        local_experts=1,
        top_k=2,
        dtype=torch.bfloat16,
        device="cpu",
        shards_per_expert=1,
    )


CANDIDATES = [ParallelChoice(1, d, a) for d in (1, 2, 4) for a in ("linear", "2dh")] + [ParallelChoice(0)]
PREDICTED = {c: 1.0 + i for i, c in enumerate(reversed(CANDIDATES))}  # ParallelChoice(0) fastest


@pytest.mark.parametrize("world_size,measured", [(16, 7), (64, 3), (2048, 3)])
def test_tuner_measures_only_the_predicted_fastest_at_scale(tmp_path, world_size, measured):
    cache = tmp_path / "tuner.json"
    tuner = Tuner(trials_per_candidate=1, cache_path=cache, predictor=lambda key, cands: dict(PREDICTED))
    key = _key(world_size)
    handed_out = []
    while tuner.is_tuning(key):
        choice = tuner.choose(key, CANDIDATES)
        handed_out.append(choice)
        tuner.record(key, choice, 0.5 if choice == ParallelChoice(1, 2, "2dh") else 1.0)
    fastest = sorted(CANDIDATES, key=PREDICTED.get)[:measured]
    assert sorted(handed_out) == sorted(fastest)
    entry = json.loads(cache.read_text())["entries"][0]
    timings = {ParallelChoice.from_json(t["choice"]): t for t in entry["timings"]}
    assert set(timings) == set(CANDIDATES)  # every candidate: predicted beside measured (None: pruned)
    for choice, record in timings.items():
        assert record["predicted_seconds"] == PREDICTED[choice]
        assert (record["measured_seconds"] is not None) == (choice in fastest)
    # A reload keeps the side-by-side record.
    assert Tuner(cache_path=cache).timings_records[key] == entry["timings"]


def test_tuner_predictor_from_a_tuning_key():
    predictor = tuner_predictor(A100)
    key = TuningKey.for_call(
        world_size=64,
        capacity=64,
        model_dim=256,
        hidden_dim=512,
        local_experts=1,
        top_k=2,
        dtype=torch.bfloat16,
        device="cuda",
        shards_per_expert=4,  # 16 experts on 64 ranks
    )
    candidates = [ParallelChoice(r, 1) for r in (0, 1, 2, 4)] + [ParallelChoice(4, 2, "2dh")]
    predicted = predictor(key, candidates)
    assert set(predicted) == set(candidates) and all(v > 0 for v in predicted.values())
    shape = LayerShape(256, 512, 16, 2, 512, dtype="bfloat16")
    assert shape.capacity() == 64
    assert predicted[ParallelChoice(4, 2, "2dh")] == predict(shape, A100, 64, PlanChoice(4, 2, "2dh")).expert_step
    # No throughput for the key's dtype: no predictions, so a tuner measures every candidate.
    assert predictor(dataclasses.replace(key, dtype="float64"), candidates) == {}
    tuner = Tuner(predictor=predictor)
    float64_key = dataclasses.replace(key, dtype="float64")
    handed_out = set()
    while tuner.is_tuning(float64_key):
        choice = tuner.choose(float64_key, candidates)
        handed_out.add(choice)
        tuner.record(float64_key, choice, 1.0)
    assert handed_out == set(candidates)


# --- calibration ------------------------------------------------------------------------------------

TRUE = LOOPBACK_START.replace(
    intra_node_latency=2e-4,
    inter_node_latency=2e-4,
    intra_node_bandwidth=8e8,
    inter_node_bandwidth=8e8,
    gemm_throughput={"float32": 3e10},
    op_overhead=5e-5,
)


def _records(cluster: ClusterConfig) -> list[dict]:
    """Records whose seconds are the model's own on ``cluster`` (the fit must find it again)."""
    records = []
    for experts in (4, 1):
        shape = LayerShape(128, 512, experts, min(2, experts), 512, dtype="float32")
        for step, factor in enumerate((0.5, 2.0, 4.0)):
            shape = shape.replace(capacity_factor=factor)
            workload = Workload.from_shape(shape, 2)
            rows = [list(workload.rows[0])] * 2
            for choice in valid_plan_choices(shape, cluster, 2, overlap_degrees=(1, 4), token_rows=("padded",)):
                seconds = predict(shape, cluster.replace(gpus_per_node=2), 2, choice, workload).seconds
                records.append(
                    dict(
                        world_size=2,
                        local_world_size=2,
                        num_experts=experts,
                        model_dim=128,
                        hidden_dim=512,
                        top_k=shape.top_k,
                        dtype="float32",
                        tokens_per_rank=512,
                        step=step,
                        capacity=workload.capacity,
                        rows=rows,
                        choice=dict(
                            parallel_degree=choice.parallel_degree,
                            overlap_degree=choice.overlap_degree,
                            a2a_algorithm=choice.a2a_algorithm,
                            token_rows=choice.token_rows,
                        ),
                        seconds=seconds,
                    )
                )
    return records


def test_fit_recovers_the_constants_behind_the_records(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps({"format": RECORDS_FORMAT, "records": _records(TRUE)}))
    measurements = load_measurements(path)
    fitted = fit_cluster(measurements, iterations=150)
    for validation in validate(measurements, fitted):
        assert all(abs(row.error) < 0.03 for row in validation.rows)
        assert all(validation.same_best)
    # Starting constants are off by 4x to 16x: the fit is what makes them agree.
    before = validate(measurements, LOOPBACK_START)
    assert any(abs(row.error) > 0.25 for v in before for row in v.rows)


def test_records_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match=r"bad\.json"):
        load_measurements(path)
    record = _records(TRUE)[0]
    record["rows"] = [[1, 2]]
    with pytest.raises(ValueError, match="rows"):
        Measurement.from_json(record)


# --- the command ------------------------------------------------------------------------------------


def test_plan_command_prints_the_table(capsys):
    assert "plan" in COMMANDS
    assert plan_main(["--world", "64", "--experts", "16", "--tokens", "1024", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "a100-hdr: world 64" in out and "best: r=" in out
    assert len([line for line in out.splitlines() if line.startswith("r=")]) == 3


def test_plan_command_bad_input_is_one_line_and_status_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan_main(["--world", "48"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("flexmoe plan:") and "divide" in err


def test_plan_command_trace_and_paper(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps([list(skewed_load(16, s)) for s in (1.0, 4.0)]))
    plan_main(["--world", "16", "--experts", "16", "--capacity-factor", "0", "--load-trace", str(trace)])
    out = capsys.readouterr().out
    assert "step 1: best" in out and "trace / per-step best" in out
    plan_main(["--paper"])
    assert "20.70x" in capsys.readouterr().out


def test_sweep_plot(tmp_path, capsys):
    out = tmp_path / "sweep.png"
    plan_main(["--sweep", str(out), "--experts", "16", "--tokens", "512"])
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "world  2048: best" in capsys.readouterr().out


def test_sweep_plot_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    plans = sweep(SHAPE, A100, (16, 32))
    with pytest.raises(ValueError, match=r"pip install 'flexmoe\[plot\]'"):
        plot_sweep(plans, tmp_path / "x.png")


DOC = Path(__file__).resolve().parent.parent / "docs" / "planner.md"


@pytest.mark.parametrize("index", range(2))
def test_doc_snippets_run(index, tmp_path, monkeypatch):
    snippets = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(snippets) == 2
    monkeypatch.chdir(tmp_path)  # the tuner snippet names a cache file
    exec(compile(snippets[index], f"docs/planner.md snippet {index}", "exec"), {"__name__": "doc"})


def test_plan_command_calibrates_saves_and_predicts_with_the_fit(tmp_path, capsys):
    records, fitted = tmp_path / "records.json", tmp_path / "fitted.json"
    records.write_text(json.dumps({"format": RECORDS_FORMAT, "records": _records(TRUE)[:8]}))
    plan_main(["--calibrate", str(records), "--holdout", "--check", str(records), "--save-cluster", str(fitted)])
    out = capsys.readouterr().out
    assert "held out" in out and "checked on" in out and "within 25%" in out
    plan_main(["--cluster", str(fitted), "--world", "2", "--experts", "4", "--dtype", "float32", "--tokens", "64"])
    assert "gloo-loopback (fitted): world 2" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the fit knows float32 only
        plan_main(["--cluster", str(fitted), "--world", "2", "--experts", "4"])
    assert "float32" in capsys.readouterr().err
