"""torch.compile against eager MoELayer: train (forward+backward) and eval (forward) steps, with a
fixed capacity and dropless, per expert kernel, as the ratio compiled / eager measured in one run;
then decode-sized eval steps (``--decode-tokens`` tokens), where routing, dispatch and combine
are most of the step and fusing them matters most.

Eager and compiled calls of one case are interleaved per repeat (the median is reported), after
warm-up calls that include compilation. Train steps set gradients to None first (as
``optimizer.zero_grad()`` does) and backpropagate a dense random upstream gradient. Default mode
(``torch.compile(layer)``): graph breaks that remain are part of what is measured.

    python benchmarks/compile.py [--tokens 512] [--decode-tokens 8] [--model-dim 256] [--experts 8]
        [--repeats 7] [--quick]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from flexmoe import MoELayer

KERNELS = ("padded", "per_expert", "grouped")
CAPACITIES = {"fixed 1.25": 1.25, "dropless": 0.0}


def step_fn(module, x: torch.Tensor, upstream: torch.Tensor, train: bool):
    """One timed call: eval forward under no_grad, or a training forward+backward."""
    if not train:

        def eval_step() -> None:
            with torch.no_grad():
                module(x)

        return eval_step

    parameters = [p for p in module.parameters()]

    def train_step() -> None:
        for p in parameters:
            p.grad = None
        module(x).backward(upstream)

    return train_step


def time_pair(eager, compiled, repeats: int) -> tuple[float, float]:
    """Median seconds of the eager and the compiled step, interleaved per repeat."""
    for fn in (eager, compiled, eager, compiled):  # warm-up (and compilation)
        fn()
    samples: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(repeats):
        for name, fn in (("eager", eager), ("compiled", compiled)):
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return statistics.median(samples["eager"]), statistics.median(samples["compiled"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=8, help="tokens of the decode rows (0: none)")
    parser.add_argument("--model-dim", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats: a correctness run")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.decode_tokens, args.model_dim, args.experts, args.repeats = 64, 4, 32, 4, 2
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"model_dim {args.model_dim}, hidden {2 * args.model_dim}, experts {args.experts}, top-2")
    print("| kernel | capacity | tokens | step | eager ms | compiled / eager |")
    print("|---|---|---:|---|---:|---:|")
    cases = [(args.tokens, train) for train in (True, False)]
    if args.decode_tokens:
        cases.append((args.decode_tokens, False))
    for tokens, train in cases:
        for kernel in KERNELS:
            for capacity_name, capacity_factor in CAPACITIES.items():
                eager_s, compiled_s = measure(args, kernel, capacity_factor, tokens, train)
                step = "train" if train else "eval"
                print(
                    f"| {kernel} | {capacity_name} | {tokens} | {step} | {eager_s * 1e3:.2f} "
                    f"| {compiled_s / eager_s:.2f}x |",
                    flush=True,
                )


def measure(args: argparse.Namespace, kernel: str, capacity_factor: float, tokens: int, train: bool):
    """(eager, compiled) median seconds of one layer's step."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MoELayer(
        model_dim=args.model_dim,
        num_experts=args.experts,
        hidden_dim=2 * args.model_dim,
        gated=True,
        expert_kernel=kernel,
        capacity_factor=capacity_factor,
    ).train(train)
    x = torch.randn(tokens, args.model_dim, requires_grad=train)
    upstream = torch.randn(tokens, args.model_dim)
    compiled = torch.compile(layer)
    return time_pair(step_fn(layer, x, upstream, train), step_fn(compiled, x, upstream, train), args.repeats)


if __name__ == "__main__":
    main()
