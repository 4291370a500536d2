"""Each static (parallel degree, overlap degree, all-to-all) choice over a changing workload,
as a ratio to the per-step best choice, all measured in one run.

The trace: every step draws a capacity factor in 0.5..4 and a router skew (same draws on every
rank), so the routed load, hence the capacity and the message sizes, change step by step.
Per step every valid choice of the layer runs forward+backward ``--repeats`` times,
interleaved in a new random order per repeat; a choice's time is the median over repeats of
the slowest rank. The table gives, per choice, the sum over steps of its time divided by the
sum over steps of the per-step best.

The tuned run (``MoELayer(tuner=Tuner(...))``, same weights, same trace and batches) first
passes over the trace until the tuner has decided every capacity bucket it met (the tuning
phase: each call one candidate, timed once), then joins the interleaved repeats above as one
more entry (the steady state). Rows: the steady state, and the tuning passes (their total time
over that many passes of the per-step best).

    torchrun --nproc-per-node 2 benchmarks/distributed.py [--threads 1] [--steps 8] [--repeats 3] [--trials 3]
    torchrun --nproc-per-node 4 benchmarks/distributed.py --local-world-size 2   # 2dh: 2 "nodes"

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

import torch
import torch.distributed as dist

from flexmoe import MoELayer, Tuner
from flexmoe.parallel import ParallelChoice, ParallelConfig

MAX_TUNING_PASSES = 64


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    p.add_argument("--model-dim", type=int, default=128)
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--local-world-size", type=int, default=None, help="ranks per simulated node (2dh)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trials", type=int, default=3, help="tuner: timed calls per candidate and capacity bucket")
    return p.parse_args()


def make_trace(steps: int, seed: int) -> list[tuple[float, float]]:
    """(capacity factor, router skew) per step, identical on every rank."""
    generator = torch.Generator().manual_seed(seed)
    factors = 0.5 + 3.5 * torch.rand(steps, generator=generator)
    skews = 3.0 * torch.rand(steps, generator=generator)
    return list(zip(factors.tolist(), skews.tolist()))


def time_choice(
    layer: MoELayer, x: torch.Tensor, upstream: torch.Tensor, factor: float, choice: ParallelChoice | None
) -> float:
    """Seconds of one forward+backward with ``choice`` (None: the layer's tuner picks), the slowest rank's."""
    dist.barrier()
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fixed = (
        {}
        if choice is None
        else dict(
            parallel_degree=choice.parallel_degree,
            overlap_degree=choice.overlap_degree,
            a2a_algorithm=choice.a2a_algorithm,
        )
    )
    out = layer(x, capacity_factor=factor, **fixed)
    out.backward(upstream)
    if x.is_cuda:
        torch.cuda.synchronize()
    elapsed = torch.tensor([time.perf_counter() - start], device=x.device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def tuning_passes(tuned: MoELayer, trace, batches) -> list[float]:
    """Per-pass seconds of the tuned layer over the trace until every capacity bucket met is decided."""
    passes = []
    while len(passes) < MAX_TUNING_PASSES:
        passes.append(sum(time_choice(tuned, x, up, factor, None) for (factor, _), (x, up) in zip(trace, batches)))
        # Every rank meets and decides the same keys in the same order: a local check suffices.
        if not tuned.tuner.pending:
            break
    return passes


def run_config(num_experts: int, args: argparse.Namespace, device: torch.device) -> None:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)
    layer = MoELayer(
        model_dim=args.model_dim,
        hidden_dim=args.hidden_dim,
        num_experts=num_experts,
        top_k=min(args.top_k, num_experts),
        parallel=ParallelConfig(local_world_size=args.local_world_size),
    ).to(device)
    choices = layer.valid_parallel_choices()
    trace = make_trace(args.steps, args.seed)
    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)
    direction = layer.router.weight[0].detach().cpu()
    direction = direction / direction.norm()
    batches = []
    for _, skew in trace:
        # Skew pushes tokens toward expert 0's router direction, so loads become uneven.
        x = torch.randn(args.tokens, args.model_dim, generator=generator) + skew * direction
        upstream = torch.randn(args.tokens, args.model_dim, generator=generator)
        batches.append((x.to(device).requires_grad_(True), upstream.to(device)))

    tuned = copy.deepcopy(layer)  # same weights, shares the process groups
    tuned.tuner = Tuner(trials_per_candidate=args.trials)
    for choice in choices:  # sub-groups are created on first use: not part of tuning's cost
        time_choice(layer, *batches[0], trace[0][0], choice)
    passes = tuning_passes(tuned, trace, batches)
    # None: the tuned layer, now in its steady state (decided choices, untimed by the tuner).
    entries: list[ParallelChoice | None] = [*choices, None]
    layers = {entry: tuned if entry is None else layer for entry in entries}
    seconds: dict[ParallelChoice | None, list[float]] = {entry: [] for entry in entries}
    for step, ((factor, _), (x, upstream)) in enumerate(zip(trace, batches)):
        for entry in entries:  # warm-up: sub-groups are created on first use
            time_choice(layers[entry], x, upstream, factor, entry)
        samples: dict[ParallelChoice | None, list[float]] = {entry: [] for entry in entries}
        for repeat in range(args.repeats):
            # A new order per repeat (the same on every rank): no entry always runs after the same one.
            order = random.Random(args.seed + 1000 * step + repeat).sample(entries, len(entries))
            for entry in order:
                samples[entry].append(time_choice(layers[entry], x, upstream, factor, entry))
        for entry in entries:
            seconds[entry].append(statistics.median(samples[entry]))
    best = [min(seconds[c][step] for c in choices) for step in range(len(trace))]
    if rank:
        return
    layout = layer.layout
    print(
        f"\nE={num_experts} on world {world_size} (shards per expert S={layout.shards_per_expert}, "
        f"local experts {layout.local_experts}); T={args.tokens}/rank M={args.model_dim} H={args.hidden_dim} "
        f"k={layer.config.top_k}; {len(trace)} steps, capacity factor 0.5..4, skew 0..3"
    )
    print(f"{'choice (r, d, a2a)':<32} {'time / per-step best':>22} {'steps it was best':>18}")
    total_best = sum(best)
    for choice in choices:
        wins = sum(seconds[choice][s] == best[s] for s in range(len(trace)))
        label = f"r={choice.parallel_degree} d={choice.overlap_degree} {choice.a2a_algorithm}"
        print(f"{label:<32} {sum(seconds[choice]) / total_best:>22.2f} {wins:>18}")
    print(f"{'per-step best (oracle)':<32} {1.0:>22.2f} {len(trace):>18}")
    print(f"{'tuned, steady state':<32} {sum(seconds[None]) / total_best:>22.2f}")
    tuning_label = f"tuned, tuning ({len(passes)} passes)"
    print(f"{tuning_label:<32} {sum(passes) / (len(passes) * total_best):>22.2f}")
    decided = sorted((key.capacity_bucket, choice) for key, choice in tuned.tuner.decisions.items())
    print(
        "tuner decisions (capacity bucket: r d a2a): "
        + ", ".join(f"{bucket}: {c.parallel_degree} {c.overlap_degree} {c.a2a_algorithm}" for bucket, c in decided)
    )


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
    for num_experts in (2 * world_size, max(1, world_size // 2)):
        run_config(num_experts, args, device)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
