"""Each static (parallel degree, overlap degree, all-to-all, exact counts) choice over a changing
workload, as a ratio to the per-step best choice, all measured in one run; the tuned layer beside them.

Traces (``--traces``, each run for E = 2W experts, and E = W/2 where that is >= 1 with ``--sharded``):

* ``skewed``: dropless routing, top-1 by default; on most steps one expert takes a set share
  (50% to 90%) of the rows, on the others routing is as the random router gives it;
* ``balanced``: dropless, no skew;
* ``mixed``: a capacity factor in 0.5..4 and a router skew in 0..3 drawn per step.

Per step every valid choice runs forward+backward ``--repeats`` times, interleaved in a new
random order per repeat; a choice's time is the median over repeats of the slowest rank. The
step table prints: the busiest expert's share of the rows, rows exchanged one way (routed: the
kept rows of all ranks; exact and padded: the rows the r = 1, d = 1 exact and padded paths put
into their token all-to-all, counted at the exchange), the per-step best exact and padded
choices and the tuned layer's time over the per-step best, and the peak memory of the r = 1,
d = 1 exact and padded steps (CUDA only: ``max_memory_allocated``; CPU has no allocator
statistics). The summary table gives, per choice, the sum over steps of its time over the sum
of the per-step best.

The tuned run (``MoELayer(tuner=Tuner(...))``, same weights, trace and batches) first passes
over the trace until the tuner has decided every capacity bucket it met (tuning: each call one
candidate, timed once), then joins the interleaved repeats as one more entry (steady state).

    torchrun --nproc-per-node 2 benchmarks/distributed.py [--threads 1] [--steps 8] [--repeats 3]
    torchrun --nproc-per-node 4 benchmarks/distributed.py --local-world-size 2   # 2dh: 2 "nodes"
    torchrun --nproc-per-node 1 benchmarks/distributed.py --steps 4   # one GPU: NCCL, world 1

gloo on CPU, NCCL when CUDA is available.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flexmoe import MoELayer, Tuner
from flexmoe.parallel import ParallelChoice, ParallelConfig
from flexmoe.parallel.all_to_all import Exchange

MAX_TUNING_PASSES = 64
TRACES = ("skewed", "balanced", "mixed")
# Skewed trace: the busiest expert's share of the rows, step by step (None: the router's own).
SKEWED_SHARES = (0.5, None, 0.9, 0.7, None, 0.8, 0.6, 0.9)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    p.add_argument("--model-dim", type=int, default=128)
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--top-k", type=int, default=None, help="default: 1 for skewed and balanced, 2 for mixed")
    p.add_argument("--traces", default="skewed,balanced", help=f"comma-separated, of {TRACES}")
    p.add_argument("--sharded", action="store_true", help="also E = W/2 (experts split over ranks)")
    p.add_argument("--local-world-size", type=int, default=None, help="ranks per simulated node (2dh)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trials", type=int, default=3, help="tuner: timed calls per candidate and capacity bucket")
    args = p.parse_args()
    args.traces = args.traces.split(",")
    unknown = set(args.traces) - set(TRACES)
    if unknown:
        p.error(f"--traces must name some of {TRACES}, got {sorted(unknown)}")
    return args


@dataclass(frozen=True)
class Step:
    """One step of a trace: capacity factor (0: dropless), the share of tokens pushed to expert 0
    (None: none), the router skew of the mixed trace."""

    capacity_factor: float
    share: float | None = None
    skew: float = 0.0


def make_trace(name: str, steps: int, seed: int) -> list[Step]:
    """The steps of trace ``name``, identical on every rank."""
    if name == "skewed":
        return [Step(0.0, SKEWED_SHARES[i % len(SKEWED_SHARES)]) for i in range(steps)]
    if name == "balanced":
        return [Step(0.0) for _ in range(steps)]
    generator = torch.Generator().manual_seed(seed)
    factors = 0.5 + 3.5 * torch.rand(steps, generator=generator)
    skews = 3.0 * torch.rand(steps, generator=generator)
    return [Step(f, None, s) for f, s in zip(factors.tolist(), skews.tolist())]


def make_batch(layer: MoELayer, step: Step, tokens: int, generator: torch.Generator) -> torch.Tensor:
    """[tokens, model_dim]: random rows; the first ``share`` of them point along expert 0's router
    row (so they pick it first); the mixed trace shifts every row by ``skew`` along it."""
    weight = layer.router.weight.detach().cpu()
    direction = weight[0] / weight[0].norm()
    x = torch.randn(tokens, layer.config.model_dim, generator=generator) + step.skew * direction
    if step.share is not None:
        busy = round(step.share * tokens)
        # Far enough along expert 0's row to beat every other expert's logit.
        x[:busy] += 8.0 * direction * (1 + weight.norm(dim=1).max() / weight[0].norm())
    return x


def fixed_choice(choice: ParallelChoice | None) -> dict:
    if choice is None:
        return {}
    return dict(
        parallel_degree=choice.parallel_degree,
        overlap_degree=choice.overlap_degree,
        a2a_algorithm=choice.a2a_algorithm,
        exact=choice.exact,
    )


def time_choice(
    layer: MoELayer, x: torch.Tensor, upstream: torch.Tensor, factor: float, choice: ParallelChoice | None
) -> tuple[float, int | None]:
    """(seconds of one forward+backward with ``choice``, the slowest rank's; its peak memory in
    bytes above the start on CUDA, else None). ``choice`` None: the layer's tuner picks."""
    dist.barrier()
    if x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    out = layer(x, capacity_factor=factor, **fixed_choice(choice))
    out.backward(upstream)
    peak = None
    if x.is_cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    elapsed = torch.tensor([time.perf_counter() - start], device=x.device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed), peak


def exchanged_rows(layer: MoELayer, x: torch.Tensor, factor: float, choice: ParallelChoice) -> int:
    """Rows the forward of ``choice`` puts into its token all-to-all one way, summed over ranks."""
    sent = [0]
    issue = Exchange.issue

    def counting(exchange: Exchange, tensor: torch.Tensor) -> None:
        sent[0] += tensor.numel() // tensor.shape[-1]
        issue(exchange, tensor)

    Exchange.issue = counting
    try:
        with torch.no_grad():
            layer(x, capacity_factor=factor, **fixed_choice(choice))
    finally:
        Exchange.issue = issue
    total = torch.tensor([sent[0]], device=x.device)
    dist.all_reduce(total)
    return int(total) // 2  # there and back: the same rows over all ranks


def routed_rows(layer: MoELayer, x: torch.Tensor, factor: float) -> tuple[int, float]:
    """(kept rows of all ranks, the busiest expert's share of them) of one forward."""
    with torch.no_grad():
        layer(x, capacity_factor=factor, parallel_degree=1, exact=True)
    kept = layer.stats.kept_per_expert.to(x.device, torch.int64).clone()
    dist.all_reduce(kept)
    total = int(kept.sum())
    return total, int(kept.max()) / max(total, 1)


def tuning_passes(tuned: MoELayer, trace: list[Step], batches) -> list[float]:
    """Per-pass seconds of the tuned layer over the trace until every capacity bucket met is decided."""
    passes = []
    while len(passes) < MAX_TUNING_PASSES:
        passes.append(sum(time_choice(tuned, x, up, s.capacity_factor, None)[0] for s, (x, up) in zip(trace, batches)))
        # Every rank meets and decides the same keys in the same order: a local check suffices.
        if not tuned.tuner.pending:
            break
    return passes


def label(choice: ParallelChoice) -> str:
    kind = "exact" if choice.exact else "padded"
    return f"r={choice.parallel_degree} d={choice.overlap_degree} {choice.a2a_algorithm} {kind}"


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def run_config(num_experts: int, trace_name: str, args: argparse.Namespace, device: torch.device) -> None:
    rank = dist.get_rank()
    top_k = args.top_k or (2 if trace_name == "mixed" else 1)
    torch.manual_seed(args.seed)
    layer = MoELayer(
        model_dim=args.model_dim,
        hidden_dim=args.hidden_dim,
        num_experts=num_experts,
        top_k=min(top_k, num_experts),
        parallel=ParallelConfig(local_world_size=args.local_world_size),
        group=dist.group.WORLD,
    ).to(device)
    choices = layer.valid_parallel_choices()
    trace = make_trace(trace_name, args.steps, args.seed)
    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)
    batches = []
    for step in trace:
        x = make_batch(layer, step, args.tokens, generator)
        upstream = torch.randn(args.tokens, args.model_dim, generator=generator)
        batches.append((x.to(device).requires_grad_(True), upstream.to(device)))

    tuned = copy.deepcopy(layer)  # same weights, shares the process groups
    tuned.tuner = Tuner(trials_per_candidate=args.trials)
    for choice in choices:  # sub-groups are created on first use: not part of tuning's cost
        time_choice(layer, *batches[0], trace[0].capacity_factor, choice)
    passes = tuning_passes(tuned, trace, batches)
    # None: the tuned layer, now in its steady state (decided choices, untimed by the tuner).
    entries: list[ParallelChoice | None] = [*choices, None]
    layers = {entry: tuned if entry is None else layer for entry in entries}
    seconds: dict[ParallelChoice | None, list[float]] = {entry: [] for entry in entries}
    peaks: dict[ParallelChoice | None, list[int | None]] = {entry: [] for entry in entries}
    exact_1, padded_1 = ParallelChoice(1, exact=True), ParallelChoice(1)
    rows = []
    for index, (step, (x, upstream)) in enumerate(zip(trace, batches)):
        factor = step.capacity_factor
        routed, share = routed_rows(layer, x, factor)
        sent = [exchanged_rows(layer, x, factor, choice) for choice in (exact_1, padded_1)]
        rows.append((share, routed, *sent))
        for entry in entries:  # warm-up
            time_choice(layers[entry], x, upstream, factor, entry)
        samples: dict[ParallelChoice | None, list[float]] = {entry: [] for entry in entries}
        for repeat in range(args.repeats):
            # A new order per repeat (the same on every rank): no entry always runs after the same one.
            order = random.Random(args.seed + 1000 * index + repeat).sample(entries, len(entries))
            for entry in order:
                elapsed, peak = time_choice(layers[entry], x, upstream, factor, entry)
                samples[entry].append(elapsed)
                if repeat == 0:
                    peaks[entry].append(peak)
        for entry in entries:
            seconds[entry].append(statistics.median(samples[entry]))
    if rank == 0:
        report(layer, trace_name, choices, trace, seconds, peaks, rows, passes, tuned, args)


def report(layer, trace_name, choices, trace, seconds, peaks, rows, passes, tuned, args) -> None:
    steps = range(len(trace))
    best = [min(seconds[c][s] for c in choices) for s in steps]
    exact = [c for c in choices if c.exact]
    padded = [c for c in choices if not c.exact]
    best_exact = [min(seconds[c][s] for c in exact) for s in steps]
    best_padded = [min(seconds[c][s] for c in padded) for s in steps]
    exact_1, padded_1 = ParallelChoice(1, exact=True), ParallelChoice(1)
    layout, config = layer.layout, layer.config
    print(
        f"\n[{trace_name}] E={config.num_experts} on world {layout.world_size} (shards per expert "
        f"S={layout.shards_per_expert}, local experts {layout.local_experts}); T={args.tokens}/rank "
        f"M={config.model_dim} H={config.hidden_dim} k={config.top_k}; {len(trace)} steps"
    )
    print(
        f"{'step':>4} {'cap':>4} {'top share':>9} {'routed':>7} {'exact':>7} {'padded':>7} "
        f"{'exact/best':>10} {'padded/best':>11} {'tuned/best':>10} {'peak MiB exact':>14} {'padded':>7}"
    )
    for s in steps:
        share, routed, sent_exact, sent_padded = rows[s]
        print(
            f"{s:>4} {trace[s].capacity_factor:>4.1f} {share:>9.2f} {routed:>7} {sent_exact:>7} {sent_padded:>7} "
            f"{best_exact[s] / best[s]:>10.2f} {best_padded[s] / best[s]:>11.2f} {seconds[None][s] / best[s]:>10.2f} "
            f"{mib(peaks[exact_1][s]):>14} {mib(peaks[padded_1][s]):>7}"
        )
    print(f"{'choice (r, d, a2a, counts)':<34} {'time / per-step best':>22} {'steps it was best':>18}")
    total_best = sum(best)
    for choice in choices:
        wins = sum(seconds[choice][s] == best[s] for s in steps)
        print(f"{label(choice):<34} {sum(seconds[choice]) / total_best:>22.2f} {wins:>18}")
    print(f"{'per-step best (oracle)':<34} {1.0:>22.2f} {len(trace):>18}")
    print(f"{'tuned, steady state':<34} {sum(seconds[None]) / total_best:>22.2f}")
    tuning_label = f"tuned, tuning ({len(passes)} passes)"
    print(f"{tuning_label:<34} {sum(passes) / (len(passes) * total_best):>22.2f}")
    print(
        f"best padded / best exact over the trace: {sum(best_padded) / sum(best_exact):.2f}; "
        f"rows exchanged exact / routed: {sum(r[2] for r in rows) / max(sum(r[1] for r in rows), 1):.2f}, "
        f"padded / routed: {sum(r[3] for r in rows) / max(sum(r[1] for r in rows), 1):.2f}"
    )
    decided = sorted((key.capacity_bucket, choice) for key, choice in tuned.tuner.decisions.items())
    print("tuner decisions (capacity bucket: choice): " + ", ".join(f"{b}: {label(c)}" for b, c in decided))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    world_size = dist.get_world_size()
    if dist.get_rank() == 0:
        print(
            f"machine: {platform.machine()} {os.cpu_count()} cpus; "
            f"device {torch.cuda.get_device_name() if use_cuda else 'cpu'}; world {world_size} "
            f"({'nccl' if use_cuda else 'gloo'}); threads/rank {args.threads}; torch {torch.__version__}; "
            f"python {platform.python_version()}"
        )
    expert_counts = [2 * world_size]
    if args.sharded and world_size >= 2:
        expert_counts.append(world_size // 2)
    for trace_name in args.traces:
        for num_experts in expert_counts:
            run_config(num_experts, trace_name, args, device)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
