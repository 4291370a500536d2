"""flexmoe plan: the predicted time of every (r, d, all-to-all, exact|padded) choice of an MoE
layer on a cluster, and the best; ``--sweep`` over world sizes with a plot; ``--calibrate`` the
constants to measured records; ``--paper`` the presets beside the Tutel paper's ratios.

    flexmoe plan --preset a100-hdr --world 2048 --experts 64 --tokens 4096
    flexmoe plan --preset h100-ndr --sweep sweep.png
    flexmoe plan --calibrate records_w2.json --holdout --check records_w4.json
    flexmoe plan --paper
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flexmoe.cli import CommandParser
from flexmoe.parallel.config import OVERLAP_CANDIDATES
from flexmoe.planner.calibrate import fit_cluster, format_validation, load_measurements, validate
from flexmoe.planner.config import PRESETS, ClusterConfig, LayerShape, preset, skewed_load
from flexmoe.planner.model import Workload
from flexmoe.planner.paper import format_paper, paper_comparison
from flexmoe.planner.plan import SWEEP_WORLD_SIZES, format_plan, make_plan, plot_sweep, sweep

PROG = "flexmoe plan"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = CommandParser(PROG, __doc__)
    cluster = p.add_argument_group("cluster")
    cluster.add_argument("--preset", default="a100-hdr", choices=sorted(PRESETS), help="published cluster")
    cluster.add_argument("--cluster", type=Path, help="JSON of a ClusterConfig (e.g. written by --save-cluster)")
    cluster.add_argument("--world", type=int, default=256, help="world size (GPUs)")
    layer = p.add_argument_group("layer")
    layer.add_argument("--model-dim", type=int, default=2048)
    layer.add_argument("--hidden-dim", type=int, default=2048)
    layer.add_argument("--experts", type=int, default=64)
    layer.add_argument("--top-k", type=int, default=2)
    layer.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    layer.add_argument("--capacity-factor", type=float, default=1.0, help="0 = dropless")
    layer.add_argument("--skew", type=float, default=1.0, help="hottest expert's load over the mean (1 = uniform)")
    layer.add_argument("--load-trace", type=Path, help="JSON list of per-expert load fractions, one list per step")
    layer.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    layer.add_argument("--gated", action="store_true", help="gated experts (three matrices)")
    layer.add_argument(
        "--overlap", default=",".join(map(str, OVERLAP_CANDIDATES)), help="pipelining degrees d to consider"
    )
    out = p.add_argument_group("what to print")
    out.add_argument("--limit", type=int, default=None, help="rows of the table (default all)")
    out.add_argument("--sweep", type=Path, metavar="PNG", help="sweep world sizes 16..2048, plot to PNG")
    out.add_argument("--calibrate", type=Path, nargs="+", metavar="RECORDS", help="fit the constants to records")
    out.add_argument("--holdout", action="store_true", help="--calibrate on even steps, validate on odd ones")
    out.add_argument("--check", type=Path, nargs="+", metavar="RECORDS", help="validate on these records too")
    out.add_argument("--save-cluster", type=Path, help="write the fitted ClusterConfig as JSON")
    out.add_argument("--paper", action="store_true", help="the preset's ratios beside the Tutel paper's")
    return p.parse_args(argv)


def _overlap_degrees(text: str) -> tuple[int, ...]:
    try:
        degrees = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--overlap must be comma-separated ints >= 1 (e.g. 1,2,4), got {text!r}") from None
    if not degrees or min(degrees) < 1:
        raise ValueError(f"--overlap must be comma-separated ints >= 1 (e.g. 1,2,4), got {text!r}")
    return degrees


def _cluster(args: argparse.Namespace) -> ClusterConfig:
    if args.cluster is None:
        return preset(args.preset)
    try:
        return ClusterConfig.from_json(json.loads(args.cluster.read_text()))
    except (json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"--cluster {args.cluster} is not a ClusterConfig JSON ({error})") from None


def _shape(args: argparse.Namespace) -> LayerShape:
    load = None if args.skew == 1 else skewed_load(args.experts, args.skew)
    return LayerShape(
        model_dim=args.model_dim,
        hidden_dim=args.hidden_dim,
        num_experts=args.experts,
        top_k=args.top_k,
        tokens_per_rank=args.tokens,
        capacity_factor=args.capacity_factor,
        expert_load=load,
        dtype=args.dtype,
        gated=args.gated,
    )


def _trace(path: Path, shape: LayerShape) -> list[LayerShape]:
    try:
        steps = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"--load-trace {path} is not JSON ({error})") from None
    if not isinstance(steps, list) or not steps:
        raise ValueError(f"--load-trace {path} must hold a non-empty list of per-expert load lists")
    return [shape.replace(expert_load=tuple(step)) for step in steps]


def print_trace(shapes: list[LayerShape], cluster: ClusterConfig, world: int, overlap: tuple[int, ...]) -> None:
    """Per step the best choice; per choice its time over the trace against the per-step best."""
    plans = [make_plan(shape, cluster, world, overlap) for shape in shapes]
    print(f"{cluster.name}: world {world}, trace of {len(plans)} steps")
    for step, plan in enumerate(plans):
        print(f"step {step}: best {plan.best.choice.label} ({plan.best.seconds * 1e3:.3f} ms)")
    oracle = sum(plan.best.seconds for plan in plans)
    totals = {p.choice: 0.0 for p in plans[0].predictions}
    for plan in plans:
        for prediction in plan.predictions:
            totals[prediction.choice] += prediction.seconds
    print(f"{'static choice (r d a2a rows)':<30} {'trace / per-step best':>22}")
    for choice, total in sorted(totals.items(), key=lambda item: item[1]):
        print(f"{choice.label:<30} {total / oracle:>22.2f}")


def run(args: argparse.Namespace) -> None:
    cluster = _cluster(args)
    if args.paper:
        print(format_paper(paper_comparison(cluster), cluster))
        return
    if args.calibrate or args.check:
        if args.calibrate:
            measurements = [m for path in args.calibrate for m in load_measurements(path)]
            if args.holdout:  # fit on the even steps, validate on the odd ones
                fitted_on = [m for m in measurements if m.step % 2 == 0]
                measurements = [m for m in measurements if m.step % 2 == 1]
                print("fitted on the even steps; the tables are the odd steps (held out)")
            else:
                fitted_on = measurements
            cluster = fit_cluster(fitted_on)
            print(format_validation(validate(measurements, cluster), cluster))
        if args.check:
            print(f"\nchecked on {', '.join(map(str, args.check))} with these constants:")
            measurements = [m for path in args.check for m in load_measurements(path)]
            print(format_validation(validate(measurements, cluster), cluster))
        if args.save_cluster:
            args.save_cluster.write_text(json.dumps(cluster.to_json(), indent=1))
            print(f"wrote {args.save_cluster}")
        return
    if args.save_cluster:
        raise ValueError("--save-cluster writes the constants --calibrate fits: pass --calibrate RECORDS too")
    overlap = _overlap_degrees(args.overlap)
    shape = _shape(args)
    if args.load_trace:
        print_trace(_trace(args.load_trace, shape), cluster, args.world, overlap)
        return
    if args.sweep:
        plans = sweep(shape, cluster, SWEEP_WORLD_SIZES, overlap)
        for plan in plans:
            print(f"world {plan.world_size:>5}: best {plan.best.choice.label:<28} {plan.best.seconds * 1e3:>9.3f} ms")
        print(f"wrote {plot_sweep(plans, args.sweep)}")
        return
    workload = Workload.from_shape(shape, args.world)
    print(format_plan(make_plan(shape, cluster, args.world, overlap, workload), args.limit))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        run(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0
