"""Measurement records for the planner's calibration: every valid static choice, every step of a
changing workload, forward+backward, with the rows each rank routed to each expert.

Same traces and timing as ``benchmarks/distributed.py`` (``--trace mixed``: capacity factor
0.5..4 and router skew 0..3 per step; ``skewed``/``balanced``: dropless); a choice's time is the
median over ``--repeats`` interleaved repeats of the slowest rank. Rank 0 writes a JSON document
of records that ``flexmoe plan --calibrate FILE`` fits the machine constants to and validates
against (format: ``flexmoe.planner.calibrate``).

    torchrun --nproc-per-node 2 benchmarks/planner_records.py --out records_w2.json
    torchrun --nproc-per-node 4 benchmarks/planner_records.py --local-world-size 2 --out records_w4.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

import torch
import torch.distributed as dist
from distributed import make_batch, make_trace, time_choice

from flexmoe import MoELayer
from flexmoe.parallel import ParallelChoice, ParallelConfig
from flexmoe.planner.calibrate import RECORDS_FORMAT


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file of measurement records (written by rank 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    p.add_argument("--model-dim", type=int, default=128)
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--local-world-size", type=int, default=None, help="ranks per simulated node (2dh)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace", default="mixed", choices=("mixed", "skewed", "balanced"), help="workload per step")
    return p.parse_args()


def rows_per_rank_and_expert(layer: MoELayer) -> tuple[list[list[int]], int]:
    """The last call's kept rows [world][experts] on every rank, and the capacity agreed (the largest)."""
    plan = layer.last_plan
    kept = plan.kept_per_expert.to(torch.int64).cpu()
    everyone = [torch.empty_like(kept) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, kept)
    capacity = torch.tensor([plan.capacity], dtype=torch.int64)
    dist.all_reduce(capacity, op=dist.ReduceOp.MAX)
    return [row.tolist() for row in everyone], int(capacity)


def measure(num_experts: int, args: argparse.Namespace) -> list[dict]:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)
    top_k = min(args.top_k, num_experts)
    layer = MoELayer(
        model_dim=args.model_dim,
        hidden_dim=args.hidden_dim,
        num_experts=num_experts,
        top_k=top_k,
        group=dist.group.WORLD,
        parallel=ParallelConfig(local_world_size=args.local_world_size),
    )
    layer.record_plan = True
    choices = layer.valid_parallel_choices()
    trace = make_trace(args.trace, args.steps, args.seed)
    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)
    local_world_size = args.local_world_size or world_size
    records = []
    for step, workload in enumerate(trace):
        factor = workload.capacity_factor
        x = make_batch(layer, workload, args.tokens, generator).requires_grad_(True)
        upstream = torch.randn(args.tokens, args.model_dim, generator=generator)
        for choice in choices:  # warm-up: sub-groups are created on first use
            time_choice(layer, x, upstream, factor, choice)
        rows, capacity = rows_per_rank_and_expert(layer)
        samples: dict[ParallelChoice, list[float]] = {choice: [] for choice in choices}
        for repeat in range(args.repeats):
            order = random.Random(args.seed + 1000 * step + repeat).sample(choices, len(choices))
            for choice in order:
                samples[choice].append(time_choice(layer, x, upstream, factor, choice)[0])
        for choice in choices:
            records.append(
                {
                    "step": step,
                    "world_size": world_size,
                    "local_world_size": local_world_size,
                    "num_experts": num_experts,
                    "model_dim": args.model_dim,
                    "hidden_dim": args.hidden_dim,
                    "top_k": top_k,
                    "dtype": "float32",
                    "tokens_per_rank": args.tokens,
                    "capacity": capacity,
                    "rows": rows,
                    "choice": {
                        "parallel_degree": choice.parallel_degree,
                        "overlap_degree": choice.overlap_degree,
                        "a2a_algorithm": choice.a2a_algorithm,
                        "token_rows": "exact" if choice.exact else "padded",
                    },
                    "seconds": statistics.median(samples[choice]),
                }
            )
    return records


def records_json(document: dict) -> str:
    """The document as JSON with one record per line (short diffs when records are rerun)."""
    head = json.dumps({k: v for k, v in document.items() if k != "records"})[:-1]
    lines = ",\n".join(json.dumps(record) for record in document["records"])
    return f'{head}, "records": [\n{lines}\n]}}\n'


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    world_size = dist.get_world_size()
    records = []
    for num_experts in (2 * world_size, max(1, world_size // 2)):
        records += measure(num_experts, args)
    if dist.get_rank() == 0:
        document = {
            "format": RECORDS_FORMAT,
            "machine": f"gloo loopback, {world_size} ranks, {args.threads} thread(s)/rank, torch {torch.__version__}",
            "records": records,
        }
        with open(args.out, "w") as f:
            f.write(records_json(document))
        print(f"wrote {len(records)} records to {args.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
