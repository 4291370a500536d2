"""Train one MoE layer on synthetic data: the smallest end-to-end use of flexmoe.

The data has --clusters token clusters, each with its own random linear map as the
target, so experts have something to specialise on. Prints loss, step time and routing
telemetry; every layer option is a flag.

    python -m flexmoe.examples.helloworld --steps 200 --num-experts 8 --top-k 2

Under torchrun (its RANK/WORLD_SIZE variables set) it initialises torch.distributed (NCCL on
CUDA, else gloo), spreads the experts over the ranks and trains on a different batch per rank:

    torchrun --nproc-per-node 2 -m flexmoe.examples.helloworld --parallel-degree 1 --overlap-degree 2

--tune lets a run-time tuner pick the parallel degree, overlap degree and all-to-all per
capacity bucket instead (--tune-cache tuned.json keeps its decisions for the next run):

    torchrun --nproc-per-node 2 -m flexmoe.examples.helloworld --tune --tune-cache tuned.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist

from flexmoe import MoELayer, Tuner
from flexmoe.cli import CommandParser, int_at_least
from flexmoe.distributed import parameter_groups
from flexmoe.parallel import A2A_ALGORITHMS, ParallelConfig, allreduce_non_expert_grads


def build_parser() -> CommandParser:
    p = CommandParser("flexmoe helloworld", description=__doc__)
    p.add_argument("--steps", type=int_at_least(1), default=200)
    p.add_argument("--batch-tokens", type=int_at_least(1), default=1024)
    p.add_argument("--model-dim", type=int_at_least(1), default=64)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=0.0, help=">0 fixed, 0 dropless, <0 capped dropless")
    p.add_argument("--router", choices=["linear", "cosine"], default="linear")
    p.add_argument("--aux-loss", choices=["gshard", "load_importance", "none"], default="gshard")
    p.add_argument("--batch-prioritized-routing", action="store_true")
    p.add_argument("--gated", action="store_true")
    p.add_argument("--clusters", type=int_at_least(1), default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--parallel-degree", type=int, default=1, help="r: 0 data parallel, 1 expert parallel, ...")
    p.add_argument("--overlap-degree", type=int, default=1, help="d: capacity chunks pipelined with all-to-all")
    p.add_argument("--a2a", choices=A2A_ALGORITHMS, default="linear", help="all-to-all algorithm")
    p.add_argument("--local-world-size", type=int, default=None, help="ranks per node for 2dh (default torchrun's)")
    p.add_argument("--tune", action="store_true", help="pick r, d and a2a per capacity bucket with a run-time tuner")
    p.add_argument("--tune-cache", default=None, help="JSON file of tuner decisions, read and written (with --tune)")
    p.add_argument(
        "--tune-trials", type=int_at_least(1), default=2, help="timed steps per candidate and capacity bucket"
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a collective fails (torchrun)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def init_distributed(args: argparse.Namespace) -> bool:
    """Initialise torch.distributed when started by torchrun; returns whether it did."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return dist.is_initialized()
    use_nccl = args.device.startswith("cuda")
    if use_nccl:
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if use_nccl else "gloo", timeout=datetime.timedelta(seconds=args.timeout))
    return True


def make_task(clusters: int, model_dim: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster centres [clusters, M] and one target map per cluster [clusters, M, M]."""
    centres = torch.randn(clusters, model_dim, generator=generator) * 2
    maps = torch.randn(clusters, model_dim, model_dim, generator=generator) / model_dim**0.5
    return centres, maps


def sample_batch(centres, maps, batch_tokens: int, generator: torch.Generator):
    cluster = torch.randint(len(centres), (batch_tokens,), generator=generator)
    x = centres[cluster] + 0.5 * torch.randn(batch_tokens, centres.shape[1], generator=generator)
    target = torch.bmm(x.unsqueeze(1), maps[cluster]).squeeze(1)
    return x, target


def build_layer(args: argparse.Namespace, tuner: Tuner | None, distributed: bool) -> MoELayer:
    """The layer the options describe (expert parallel over every rank under torchrun)."""
    return MoELayer(
        model_dim=args.model_dim,
        num_experts=args.num_experts,
        hidden_dim=args.hidden_dim,
        top_k=args.top_k,
        capacity_factor=args.capacity_factor,
        router=args.router,
        aux_loss=None if args.aux_loss == "none" else args.aux_loss,
        batch_prioritized_routing=args.batch_prioritized_routing,
        gated=args.gated,
        parallel=ParallelConfig(args.parallel_degree, args.overlap_degree, args.a2a, args.local_world_size),
        tuner=tuner,
        group=dist.group.WORLD if distributed else None,  # expert parallel over every rank
    ).to(args.device)


def main(argv: list[str] | None = None) -> float:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tune_cache and not args.tune:
        parser.error("--tune-cache needs --tune")
    distributed = init_distributed(args)
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    centres, maps = make_task(args.clusters, args.model_dim, generator)
    if distributed:
        generator.manual_seed(args.seed + 1000 * (rank + 1))  # same task, a different batch per rank
    tuner = Tuner(args.tune_trials, args.tune_cache) if args.tune else None
    try:
        layer = build_layer(args, tuner, distributed)
    except (ValueError, TypeError) as error:  # an option the layer refuses: one line, exit status 2
        parser.error(str(error))
    optimizer = torch.optim.Adam(parameter_groups(layer), lr=args.lr)  # DTensor experts in a group of their own
    if rank == 0:
        print(layer, f"layout: {layer.layout}", sep="\n")
    loss_value = float("nan")
    report_every = max(1, args.steps // 10)  # about ten progress lines, whatever the step count
    for step in range(1, args.steps + 1):
        x, target = sample_batch(centres, maps, args.batch_tokens, generator)
        x, target = x.to(args.device), target.to(args.device)
        start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(layer(x), target)
        optimizer.zero_grad(set_to_none=True)
        (loss + layer.aux_loss).backward()
        if distributed:
            allreduce_non_expert_grads(layer)  # the router is replicated; expert grads are final
        optimizer.step()
        step_ms = (time.perf_counter() - start) * 1e3
        loss_value = loss.item()
        stats = layer.stats
        if rank == 0 and (step % report_every == 0 or step == args.steps):
            print(
                f"step {step}/{args.steps}: loss {loss_value:.4f}, {step_ms:.1f} ms, "
                f"dropped {stats.dropped_fraction:.1%}, router entropy {float(stats.router_entropy):.2f}",
                flush=True,
            )
    stats = layer.stats
    if rank == 0:
        print(
            f"final loss {loss_value:.4f}; tokens per expert {stats.tokens_per_expert.tolist()}; "
            f"capacity {stats.capacity}; dropped {stats.dropped_fraction:.1%}"
        )
        if tuner is not None:
            for key, choice in tuner.decisions.items():
                print(f"tuned: capacity bucket {key.capacity_bucket} -> {choice}")
            print(f"capacity buckets still tuning: {len(tuner.pending)}")
    return loss_value


if __name__ == "__main__":
    main()
