"""Train one MoE layer on synthetic data: the smallest end-to-end use of flexmoe.

The data has ``--clusters`` token clusters, each with its own random linear map as the
target, so experts have something to specialise on. Prints loss, step time and routing
telemetry; every layer option is a flag.

    python -m flexmoe.examples.helloworld --steps 200 --num-experts 8 --top-k 2
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from flexmoe import MoELayer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--model-dim", type=int, default=64)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=0.0, help=">0 fixed, 0 dropless, <0 capped dropless")
    p.add_argument("--router", choices=["linear", "cosine"], default="linear")
    p.add_argument("--aux-loss", choices=["gshard", "load_importance", "none"], default="gshard")
    p.add_argument("--batch-prioritized-routing", action="store_true")
    p.add_argument("--gated", action="store_true")
    p.add_argument("--clusters", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


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


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    centres, maps = make_task(args.clusters, args.model_dim, generator)
    layer = MoELayer(
        model_dim=args.model_dim,
        num_experts=args.num_experts,
        hidden_dim=args.hidden_dim,
        top_k=args.top_k,
        capacity_factor=args.capacity_factor,
        router=args.router,
        aux_loss=None if args.aux_loss == "none" else args.aux_loss,
        batch_prioritized_routing=args.batch_prioritized_routing,
        gated=args.gated,
    ).to(args.device)
    optimizer = torch.optim.Adam(layer.parameters(), lr=args.lr)
    print(layer)
    progress = tqdm(range(args.steps), desc="train", unit="step")
    loss_value = float("nan")
    for _ in progress:
        x, target = sample_batch(centres, maps, args.batch_tokens, generator)
        x, target = x.to(args.device), target.to(args.device)
        start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(layer(x), target)
        optimizer.zero_grad(set_to_none=True)
        (loss + layer.aux_loss).backward()
        optimizer.step()
        step_ms = (time.perf_counter() - start) * 1e3
        loss_value = loss.item()
        stats = layer.stats
        progress.set_postfix(
            loss=f"{loss_value:.4f}",
            step_ms=f"{step_ms:.1f}",
            dropped=f"{stats.dropped_fraction:.1%}",
            entropy=f"{float(stats.router_entropy):.2f}",
        )
    stats = layer.stats
    print(
        f"final loss {loss_value:.4f}; tokens per expert {stats.tokens_per_expert.tolist()}; "
        f"capacity {stats.capacity}; dropped {stats.dropped_fraction:.1%}"
    )
    return loss_value


if __name__ == "__main__":
    main()
