"""Loss-free load balancing (DeepSeek-V3) against no balancing and an auxiliary loss.

Trains one MoE layer on skewed synthetic data (token clusters drawn with Zipf frequencies,
each cluster with its own target map) three times from the same initialisation:

* none: no balancing (aux_loss=None);
* aux loss: the GShard balance loss (--aux-weight);
* loss-free: loss_free_balance=True and aux_loss=None; the training loop calls
  layer.update_load_balance_bias() after each optimizer.step().

Records the expert load imbalance max_e load_e / mean_e load_e (1.0 = perfectly flat) at
every step, writes a plot (--plot, matplotlib with the Agg backend) and prints the final
imbalance (mean of the last 20 steps) and loss of each run.

    python -m flexmoe.examples.loss_free_balance --plot docs/images/loss_free_balance.png
"""

from __future__ import annotations

import argparse
import copy

import torch

from flexmoe import MoELayer
from flexmoe.examples.helloworld import make_task


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-tokens", type=int, default=256)
    p.add_argument("--model-dim", type=int, default=16)
    p.add_argument("--hidden-dim", type=int, default=32)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--score-function", choices=["softmax", "sigmoid"], default="sigmoid")
    p.add_argument("--clusters", type=int, default=16)
    p.add_argument("--zipf", type=float, default=1.2, help="cluster frequency ~ 1 / rank**zipf")
    p.add_argument("--update-rate", type=float, default=0.005, help="loss-free bias step per update")
    p.add_argument("--aux-weight", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="write the load plot to this PNG path")
    return p.parse_args(argv)


def skewed_batch(centres, maps, frequencies, batch_tokens: int, generator: torch.Generator):
    """x, target: [batch_tokens, M]; clusters drawn with the given frequencies."""
    cluster = torch.multinomial(frequencies, batch_tokens, replacement=True, generator=generator)
    x = centres[cluster] + 0.5 * torch.randn(batch_tokens, centres.shape[1], generator=generator)
    return x, torch.bmm(x.unsqueeze(1), maps[cluster]).squeeze(1)


def train(layer: MoELayer, args, task, balance_bias: bool) -> tuple[list[float], float]:
    """Per-step load imbalance (max/mean) and the final loss (mean of the last 20 steps)."""
    optimizer = torch.optim.Adam(layer.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed + 1)  # the same batches for every run
    imbalance, losses = [], []
    layer.train()
    for _ in range(args.steps):
        x, target = skewed_batch(*task, args.batch_tokens, generator)
        task_loss = torch.nn.functional.mse_loss(layer(x), target)
        (task_loss + layer.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if balance_bias:
            layer.update_load_balance_bias()
        load = layer.stats.tokens_per_expert.float()
        imbalance.append(float(load.max() / load.mean()))
        losses.append(float(task_loss.detach()))
    return imbalance, sum(losses[-20:]) / len(losses[-20:])


def plot(curves: dict[str, list[float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, label=name)
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("training step")
    ax.set_ylabel("max / mean expert load")
    ax.set_title("Expert load imbalance on skewed data")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    """Returns {run: (final imbalance, final loss)}."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    centres, maps = make_task(args.clusters, args.model_dim, generator)
    frequencies = 1.0 / torch.arange(1, args.clusters + 1, dtype=torch.float) ** args.zipf
    task = (centres, maps, frequencies / frequencies.sum())
    base = MoELayer(
        model_dim=args.model_dim,
        num_experts=args.num_experts,
        hidden_dim=args.hidden_dim,
        top_k=args.top_k,
        score_function=args.score_function,
        aux_loss=None,
        loss_free_balance=True,
        balance_update_rate=args.update_rate,
    )
    runs = {
        "none": (dict(loss_free_balance=False), False),
        "aux loss": (dict(loss_free_balance=False, aux_loss="gshard", aux_loss_weight=args.aux_weight), False),
        "loss-free": ({}, True),
    }
    curves, results = {}, {}
    for name, (options, balance_bias) in runs.items():
        layer = MoELayer(base.config, **options)
        layer.load_state_dict(base.state_dict(), strict=False)  # same initial weights
        curves[name], loss = train(copy.deepcopy(layer), args, task, balance_bias)
        results[name] = (sum(curves[name][-20:]) / 20, loss)
        print(f"{name:>10}: final max/mean expert load {results[name][0]:.2f}, final loss {loss:.4f}")
    if args.plot:
        plot(curves, args.plot)
        print(f"plot written to {args.plot}")
    return results


if __name__ == "__main__":
    main()
