"""Each static (parallel degree, overlap degree, all-to-all) choice over a changing workload,
as a ratio to the per-step best choice, all measured in one run.

The trace: every step draws a capacity factor in 0.5..4 and a router skew (same draws on every
rank), so the routed load, hence the capacity and the message sizes, change step by step.
Per step every valid choice of the layer runs forward+backward ``--repeats`` times,
interleaved; a choice's time is the median over repeats of the slowest rank. The table gives,
per choice, the sum over steps of its time divided by the sum over steps of the per-step best.

    torchrun --nproc-per-node 2 benchmarks/distributed.py [--threads 1] [--steps 8] [--repeats 3]
    torchrun --nproc-per-node 4 benchmarks/distributed.py --local-world-size 2   # 2dh: 2 "nodes"

gloo on CPU, NCCL when CUDA is available.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist

from flexmoe import MoELayer
from flexmoe.parallel import ParallelChoice, ParallelConfig


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
    return p.parse_args()


def make_trace(steps: int, seed: int) -> list[tuple[float, float]]:
    """(capacity factor, router skew) per step, identical on every rank."""
    generator = torch.Generator().manual_seed(seed)
    factors = 0.5 + 3.5 * torch.rand(steps, generator=generator)
    skews = 3.0 * torch.rand(steps, generator=generator)
    return list(zip(factors.tolist(), skews.tolist()))


def time_choice(
    layer: MoELayer, x: torch.Tensor, upstream: torch.Tensor, factor: float, choice: ParallelChoice
) -> float:
    """Seconds of one forward+backward with ``choice``, the slowest rank's."""
    dist.barrier()
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = layer(
        x,
        capacity_factor=factor,
        parallel_degree=choice.parallel_degree,
        overlap_degree=choice.overlap_degree,
        a2a_algorithm=choice.a2a_algorithm,
    )
    out.backward(upstream)
    if x.is_cuda:
        torch.cuda.synchronize()
    elapsed = torch.tensor([time.perf_counter() - start], device=x.device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def tuned_run(layer: MoELayer, trace, batches) -> list[float] | None:
    """HOOK for the run-time tuner (flexmoe.tuner): per-step seconds of the tuned layer over
    the same trace and batches, or None while the tuner is not wired into MoELayer."""
    return None


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

    seconds: dict[ParallelChoice, list[float]] = {choice: [] for choice in choices}
    for (factor, _), (x, upstream) in zip(trace, batches):
        for choice in choices:  # warm-up: sub-groups are created on first use
            time_choice(layer, x, upstream, factor, choice)
        samples: dict[ParallelChoice, list[float]] = {choice: [] for choice in choices}
        for _ in range(args.repeats):
            for choice in choices:
                samples[choice].append(time_choice(layer, x, upstream, factor, choice))
        for choice in choices:
            seconds[choice].append(statistics.median(samples[choice]))
    best = [min(seconds[c][step] for c in choices) for step in range(len(trace))]
    tuned = tuned_run(layer, trace, batches)
    if rank:
        return
    layout = layer.layout
    print(
        f"\nE={num_experts} on world {world_size} (shards per expert S={layout.shards_per_expert}, "
        f"local experts {layout.local_experts}); T={args.tokens}/rank M={args.model_dim} H={args.hidden_dim} "
        f"k={layer.config.top_k}; {len(trace)} steps, capacity factor 0.5..4, skew 0..3"
    )
    print(f"{'choice (r, d, a2a)':<24} {'time / per-step best':>22} {'steps it was best':>18}")
    total_best = sum(best)
    for choice in choices:
        wins = sum(seconds[choice][s] == best[s] for s in range(len(trace)))
        label = f"r={choice.parallel_degree} d={choice.overlap_degree} {choice.a2a_algorithm}"
        print(f"{label:<24} {sum(seconds[choice]) / total_best:>22.2f} {wins:>18}")
    print(f"{'per-step best (oracle)':<24} {1.0:>22.2f} {len(trace):>18}")
    tuned_text = "not wired yet (tuned_run hook)" if tuned is None else f"{sum(tuned) / total_best:.2f}"
    print(f"{'tuned':<24} {tuned_text:>22}")


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
