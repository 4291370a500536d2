"""What wrapping the grouped expert kernel as the ``flexmoe::exact_count_ffn`` custom op (and as
``exact_count_ffn_no_grad``, used when no backward follows) costs per call, as the ratio op / the
kernel called directly (eager, no_grad, one thread, decode-sized rows:
where a fixed per-call cost shows). The compiled layer calls the op, the eager layer calls the
kernel directly, so this overhead is part of compiled / eager in benchmarks/compile.py.

    python benchmarks/op_overhead.py [--rows 16] [--experts 8] [--model-dim 128] [--hidden 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from flexmoe.ops import exact_count as ec


def per_call_us(fn, calls: int) -> float:
    for _ in range(50):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--model-dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    experts, rows = args.experts, args.rows
    x = torch.randn(rows, args.model_dim)
    counts = torch.full((experts,), rows // experts)
    counts[: rows % experts] += 1
    w1 = torch.randn(experts, args.model_dim, args.hidden)
    w2 = torch.randn(experts, args.hidden, args.model_dim)
    gelu = ec.ACTIVATION_FUNCTIONS["gelu"]

    def direct() -> None:
        ec.grouped_ffn(x, counts, gelu, w1, None, None, w2, None)

    def op() -> None:  # the op a training step calls (an autograd kernel)
        torch.ops.flexmoe.exact_count_ffn("grouped", x, counts, None, None, w1, None, None, w2, None, "gelu", False)

    def op_no_grad() -> None:  # the op with no backward to follow (no autograd kernel)
        torch.ops.flexmoe.exact_count_ffn_no_grad("grouped", x, counts, None, None, w1, None, None, w2, None, "gelu")

    timings: dict[str, list[float]] = {"direct": [], "op": [], "op_no_grad": []}
    calls = {"direct": direct, "op": op, "op_no_grad": op_no_grad}
    with torch.no_grad():
        for _ in range(args.repeats):  # interleaved
            for name, fn in calls.items():
                timings[name].append(per_call_us(fn, args.calls))
    median = {name: statistics.median(values) for name, values in timings.items()}
    d = median["direct"]
    print(f"torch {torch.__version__}, 1 thread, {rows} rows, {experts} experts, M={args.model_dim}, H={args.hidden}")
    print(f"kernel called directly: {d:.0f} us")
    for name in ("op", "op_no_grad"):
        print(f"as flexmoe::exact_count_ffn{'' if name == 'op' else '_no_grad'}: {median[name]:.0f} us; "
              f"{name} / direct {median[name] / d:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
