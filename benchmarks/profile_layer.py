"""Where one training step's time goes: MoELayer against the HF-style loop and the floor, per op.

Each implementation runs in its own fresh process (as ``benchmarks/layer.py --fresh``): built,
warmed up for ``--warmup`` steps, then ``--steps`` forward+backward steps (float32, dense upstream
gradient, gradients set to None before each step, 1 thread) under ``torch.profiler``. Printed:
the ops with the most self CPU time, then a breakdown into the pieces of an MoE step (router
GEMM, routing: softmax/top-k/sort/plan, gathers, expert GEMMs, activation, scatter-add, the rest),
each per step, with the step's process CPU time and minor page faults beside them. "outside ops"
is the step's CPU time that no aten op accounts for: Python, autograd bookkeeping, page faults.

    python benchmarks/profile_layer.py [--only 'E8 k2 f1'] [--rows MoELayer 'loop (HF-style)'] [--top 15]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).parent))
import layer as bench

# aten op -> piece of the step (ops not named here are "other").
ROUTING_OPS = {
    "aten::softmax", "aten::_softmax", "aten::_softmax_backward_data", "aten::topk", "aten::sort", "aten::bincount",
    "aten::cumsum", "aten::nonzero", "aten::one_hot", "aten::where", "aten::remainder", "aten::lt", "aten::clamp",
    "aten::div", "aten::div_", "aten::arange", "aten::greater", "aten::gt", "aten::eq", "aten::permute",
    "aten::clamp_min", "aten::reciprocal", "aten::scatter", "aten::scatter_", "aten::gather",
    "aten::count_nonzero", "aten::max", "aten::item", "aten::_local_scalar_dense", "aten::stack",
}  # fmt: skip
GATHER_OPS = {"aten::index_select", "aten::index"}
SCATTER_OPS = {
    "aten::index_add_", "aten::index_add", "aten::index_put_", "aten::_index_put_impl_", "aten::scatter_add_",
    "aten::index_put",
}  # fmt: skip
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm", "aten::linear"}
ACTIVATION_OPS = {"aten::gelu", "aten::gelu_backward", "aten::silu", "aten::silu_backward"}
ELEMENTWISE_OPS = {
    "aten::mul", "aten::mul_", "aten::linalg_vecdot", "aten::add", "aten::add_", "aten::sub", "aten::sum",
}  # fmt: skip
MEMORY_OPS = {
    "aten::empty", "aten::empty_like", "aten::zeros", "aten::zeros_like", "aten::zero_", "aten::fill_",
    "aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::new_zeros", "aten::new_empty",
    "aten::empty_strided", "aten::resize_",
}  # fmt: skip
PIECES = [
    "router GEMM",
    "routing (softmax, top-k, sort, plan)",
    "gathers",
    "expert GEMMs",
    "activation",
    "gate products, bias sums, adds",
    "scatter-add",
    "allocation, zeroing, copies",
    "other ops",
    "outside ops (Python, autograd, faults)",
]


def piece_of(name: str, shapes: list, num_experts: int) -> str:
    if name in GEMM_OPS:
        # The router's GEMMs (forward and both backward ones) have the expert count as a dimension.
        matrices = [shape for shape in shapes if isinstance(shape, list) and len(shape) == 2]
        is_router = name in ("aten::mm", "aten::addmm") and any(num_experts in shape for shape in matrices)
        return "router GEMM" if is_router else "expert GEMMs"
    for piece, ops in (
        ("routing (softmax, top-k, sort, plan)", ROUTING_OPS),
        ("gathers", GATHER_OPS),
        ("scatter-add", SCATTER_OPS),
        ("activation", ACTIVATION_OPS),
        ("gate products, bias sums, adds", ELEMENTWISE_OPS),
        ("allocation, zeroing, copies", MEMORY_OPS),
    ):
        if name in ops:
            return piece
    return "other ops"


class OpClock(TorchDispatchMode):
    """The calling thread's CPU time spent in each aten op (as autograd dispatches them, forward
    and backward), by op and by piece of the step. Unlike the profiler's wall times these do not
    grow when other processes share the cores."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.per_op: dict[str, float] = defaultdict(float)
        self.per_piece: dict[str, float] = defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.thread_time()
        out = func(*args, **(kwargs or {}))
        spent = time.thread_time() - start
        name = func._schema.name
        shapes = [list(t.shape) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self.per_op[name] += spent
        self.per_piece[piece_of(name, shapes, self.num_experts)] += spent
        return out


def profile_row(request: dict) -> dict:
    """In the child: profile ``request['steps']`` steps of one row after its warm-up."""
    torch.set_num_threads(1)
    config = bench.Config(**request["config"])
    layer, x = bench.build(config)
    runs, leaves = bench.candidates(layer, x, only={request["row"]})
    fn = runs[request["row"]]
    for _ in range(request["warmup"]):
        bench.timed_step(fn, leaves)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(request["steps"]):
            for leaf in leaves:
                leaf.grad = None
            fn()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    steps = request["steps"]
    per_op: dict[str, float] = defaultdict(float)
    per_piece: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        self_ms = event.self_cpu_time_total / 1e3 / steps
        per_op[event.name] += self_ms
        per_piece[piece_of(event.name, event.input_shapes, config.experts)] += self_ms
    # The same steps again, each op timed on the thread's CPU clock.
    clock = OpClock(config.experts)
    thread_cpu = time.thread_time()
    for _ in range(steps):
        for leaf in leaves:
            leaf.grad = None
        with clock:
            fn()
    thread_cpu = (time.thread_time() - thread_cpu) * 1e3 / steps
    cpu_pieces = {piece: seconds * 1e3 / steps for piece, seconds in clock.per_piece.items()}
    cpu_pieces["outside ops (Python, autograd, faults)"] = thread_cpu - sum(cpu_pieces.values())
    # Profiling itself slows the step a little; timed separately, unprofiled, for the totals.
    samples = [bench.timed_step(fn, leaves) for _ in range(request["steps"])]
    step = bench.medians(samples)
    # The profiler's op times are wall times: the rest of the profiled wall time is outside any op.
    per_piece["outside ops (Python, autograd, faults)"] = max(wall / steps * 1e3 - sum(per_piece.values()), 0.0)
    return {
        "ops": per_op,
        "cpu_ops": {op: seconds * 1e3 / steps for op, seconds in clock.per_op.items()},
        "pieces": per_piece,
        "cpu_pieces": cpu_pieces,
        "clocked_cpu_ms": thread_cpu,
        "profiled_wall_ms": wall / steps * 1e3,
        "profiled_cpu_ms": cpu / steps * 1e3,
        "cpu_ms": step.cpu * 1e3,
        "faults": faults / steps,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="E8 k2 f1", metavar="SUBSTRING", help="the config whose label contains this")
    parser.add_argument("--rows", nargs="+", default=["floor:addmm-per-expert", "MoELayer", "loop (HF-style)"])
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=15, help="how many ops to list")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(profile_row(json.loads(args.worker))))
        return
    configs = [c for c in bench.CONFIGS + bench.QUICK if args.only in c.label()]
    if not configs:
        parser.error(f"--only {args.only!r} matches no config label of benchmarks/layer.py")
    config = configs[0]
    unknown = [row for row in args.rows if row not in bench.ROWS]
    if unknown:
        parser.error(f"--rows {unknown} are not rows of benchmarks/layer.py; choose from {bench.ROWS}")
    results = {}
    for row in args.rows:
        request = dict(config=config.__dict__, row=row, warmup=args.warmup, steps=args.steps)
        out = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(request)], capture_output=True, text=True
        )
        if out.returncode != 0:
            raise RuntimeError(f"profiling {row} failed:\n{out.stderr}")
        results[row] = json.loads(out.stdout.splitlines()[-1])
    print_report(config, args, results)


def print_report(config: bench.Config, args: argparse.Namespace, results: dict[str, dict]) -> None:
    rows = args.rows
    names = [row.strip() for row in rows]
    header = "| piece | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names)

    def line(label: str, values: list[float], digits: int = 1) -> None:
        print(f"| {label} | " + " | ".join(f"{v:.{digits}f}" for v in values) + " |")

    print(f"# {config.label()}; {bench.cpu_name()}, torch {torch.__version__}, 1 thread, fresh process per row,")
    print(f"# {args.warmup} warm-up steps, then the mean of {args.steps} steps, in ms per step")
    print("\n## Where the time went (thread CPU time per op: fair on a loaded machine)\n")
    print(header)
    for piece in PIECES:
        line(piece, [results[r]["cpu_pieces"].get(piece, 0.0) for r in rows])
    line("**step (thread CPU)**", [results[r]["clocked_cpu_ms"] for r in rows])
    line("step, unclocked (process CPU)", [results[r]["cpu_ms"] for r in rows])
    line("minor page faults", [results[r]["faults"] for r in rows], 0)
    print("\n## torch.profiler: self time per piece (wall clock: grows with the machine's load)\n")
    print(header)
    for piece in PIECES:
        line(piece, [results[r]["pieces"].get(piece, 0.0) for r in rows])
    line("**step, profiled (wall)**", [results[r]["profiled_wall_ms"] for r in rows])
    line("step, profiled (process CPU)", [results[r]["profiled_cpu_ms"] for r in rows])
    ops = sorted(
        {op for r in rows for op in results[r]["cpu_ops"]},
        key=lambda op: -max(results[r]["cpu_ops"].get(op, 0.0) for r in rows),
    )
    print(f"\n## Top {args.top} aten ops (thread CPU time; torch.profiler's wall self time in brackets)\n")
    print("| op | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
    for op in ops[: args.top]:
        cells = [f"{results[r]['cpu_ops'].get(op, 0.0):.1f} ({results[r]['ops'].get(op, 0.0):.1f})" for r in rows]
        print(f"| {op} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
