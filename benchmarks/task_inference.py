"""Decoding throughput and resident parameters: token-MoE vs task-MoE vs extracted sub-network vs dense.

One run builds four models of one decoder architecture (benchmarks/_decoder.py: pre-LN, causal
self-attention with a KV cache, an FFN in every layer, an MoE FFN in every other layer with
``--shape paper`` or in every layer with ``--shape moe-heavy``):

  (a) token-MoE      MoE layers routed by token
  (b) task-MoE       the same architecture routed by task, run whole (router, dispatch, all experts)
  (c) task subnet    (b) after flexmoe.extract_task: each MoE layer is one DenseFFN of k experts
  (d) dense          MoE layers replaced by a plain MLP of the sub-network's width (k * expert hidden)

and greedily decodes ``--new-tokens`` tokens after a ``--prompt``-token prompt, one task per
batch (the serving scenario), at batch sizes 1, 2, 4, ..., doubling until each model's decoding
tokens/s stops rising (by less than ``--min-gain`` over its best, at ``--patience`` batch sizes
in a row, so one noisy point does not end a sweep), memory runs out, or ``--max-batch``; a
model that has stopped is not timed further. Throughput is new tokens per second
(prefill included in the time) and, from the same runs, decoding tokens per second (the steps
after the prefill only, the paper's measure), timed by process CPU time (``--clock cpu``, one
thread: robust on a shared machine) or wall time; the best of ``--repeats`` runs, models
interleaved within a repeat. Everything is printed as a ratio to (a) measured in the same run;
"peak" is each model's best tokens/s and the batch it was reached at, and "peak ratio" compares
each model at its own peak with (a) at its own peak (as Kudugunta et al. do). The last table splits
one run at the largest batch every model reached into
time inside the FFNs of the sparse positions and the rest (attention, dense FFNs, head), per
decoding step.

Shapes (``--shape``), both 32 experts, top-2:
  paper      d = 256, experts and dense FFNs of width 1024, MoE in layers 1, 3, 5 of 6 (the
             paper's layout at a small width): half of a step is attention/dense FFN/head.
  moe-heavy  d = 512, experts of width 2048, MoE in all 6 layers: the MoE layers dominate a
             decoding step, as in the paper's deployed models (a 32-expert Transformer-Base
             decoder holds most of its parameters in the experts).

    python benchmarks/task_inference.py [--shape paper|moe-heavy] [--threads 1] [--repeats 3]
        [--clock cpu|wall] [--max-batch 1024] [--min-gain 0.03] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _decoder import Decoder, DecoderSize, generate, parameter_bytes

import flexmoe

FULL = DecoderSize(
    vocab=1024, model_dim=256, heads=4, layers=6, hidden_dim=1024, num_experts=32, top_k=2, num_tasks=8, max_len=64
)
MOE_HEAVY = DecoderSize(
    vocab=1024,
    model_dim=512,
    heads=8,
    layers=6,
    hidden_dim=2048,
    num_experts=32,
    top_k=2,
    num_tasks=8,
    max_len=64,
    moe_every=1,
)
SHAPES = {"paper": FULL, "moe-heavy": MOE_HEAVY}
QUICK = DecoderSize(
    vocab=64, model_dim=32, heads=2, layers=2, hidden_dim=32, num_experts=32, top_k=2, num_tasks=4, max_len=16
)
MAX_BATCH, QUICK_MAX_BATCH = 4096, 8
MODEL_NAMES = ("(a) token-MoE", "(b) task-MoE whole", "(c) task subnet", "(d) dense same size")
TASK = 3
Clock = Callable[[], float]
# cpu: this process's CPU time. With one thread it is the wall time an idle machine would show,
# and it does not count the time other processes on a shared machine take the core away.
CLOCKS: dict[str, Clock] = {"wall": time.perf_counter, "cpu": time.process_time}


def build_models(size: DecoderSize, seed: int) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    token_moe = Decoder(size, "token").eval()
    task_moe = Decoder(size, "task").eval()
    subnet = flexmoe.extract_task(task_moe, TASK).eval()
    dense = Decoder(size, "dense").eval()
    return dict(zip(MODEL_NAMES, (token_moe, task_moe, subnet, dense)))


def check_subnet_matches(models: dict[str, nn.Module], size: DecoderSize) -> float:
    """Largest |logit difference| of (c) vs (b) on a random prompt of the task (must be float noise)."""
    tokens = torch.randint(size.vocab, (2, 8))
    ids = torch.full((2,), TASK)
    with torch.no_grad():
        return float((models[MODEL_NAMES[2]](tokens, ids) - models[MODEL_NAMES[1]](tokens, ids)).abs().max())


def time_generation(
    model: nn.Module, prompt: torch.Tensor, task_ids: torch.Tensor, new_tokens: int, clock: Clock
) -> tuple[float, float]:
    """One generation: (seconds in all, seconds of the decoding steps after the prefill)."""
    marks = [clock()]
    generate(model, prompt, task_ids, new_tokens, after_prefill=lambda: marks.append(clock()))
    end = clock()
    return end - marks[0], end - marks[1]


def measure_batch(
    models: dict[str, nn.Module],
    size: DecoderSize,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    clock: Clock,
) -> dict[str, tuple[float, float]]:
    """(whole generation, decoding steps only) tokens/s of each model at one batch size, each the
    best of the repeats (other load on the machine only ever slows a run down), models
    interleaved, after one warm-up run each."""
    prompt = torch.randint(size.vocab, (batch, prompt_len))
    task_ids = torch.full((batch,), TASK)
    for model in models.values():
        time_generation(model, prompt, task_ids, 2, clock)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            runs[name].append(time_generation(model, prompt, task_ids, new_tokens, clock))
    return {name: tuple(batch * new_tokens / min(run[part] for run in timed) for part in (0, 1))
            for name, timed in runs.items()}  # fmt: skip


def measure_throughput(
    models: dict[str, nn.Module],
    size: DecoderSize,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    clock: Clock,
    max_batch: int = MAX_BATCH,
    min_gain: float = 0.03,
    patience: int = 2,
) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]]]:
    """(whole generation, decoding steps only): tokens/s[model][batch]. The batch doubles from 1;
    a model leaves the sweep once its decoding tokens/s has risen by less than ``min_gain`` over
    its best so far at ``patience`` batch sizes in a row (its peak is behind it; one noisy point
    does not end a sweep), when memory runs out, or past ``max_batch``."""
    whole: dict[str, dict[int, float]] = {name: {} for name in models}
    decoding: dict[str, dict[int, float]] = {name: {} for name in models}
    misses = dict.fromkeys(models, 0)
    rising, batch = dict(models), 1
    while rising and batch <= max_batch:
        try:
            speeds = measure_batch(rising, size, batch, prompt_len, new_tokens, repeats, clock)
        except torch.OutOfMemoryError:
            break
        for name, (all_steps, decode_steps) in speeds.items():
            best = max(decoding[name].values(), default=0.0)
            whole[name][batch], decoding[name][batch] = all_steps, decode_steps
            misses[name] = misses[name] + 1 if best and decode_steps < best * (1 + min_gain) else 0
            if misses[name] >= patience:
                del rising[name]
        batch *= 2
    return whole, decoding


def time_split(
    model: nn.Module, size: DecoderSize, batch: int, prompt_len: int, new_tokens: int, clock: Clock
) -> tuple[float, float]:
    """One generation: (total seconds, seconds inside the FFNs of the sparse positions)."""
    spent = [0.0]
    started: dict[int, float] = {}

    def before(module, args, kwargs):
        started[id(module)] = clock()

    def after(module, args, kwargs, output):
        spent[0] += clock() - started[id(module)]

    handles = []
    for i, block in enumerate(model.blocks):
        if size.is_sparse(i):
            handles.append(block.ffn.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(block.ffn.register_forward_hook(after, with_kwargs=True))
    try:
        prompt = torch.randint(size.vocab, (batch, prompt_len))
        total, _ = time_generation(model, prompt, torch.full((batch,), TASK), new_tokens, clock)
    finally:
        for handle in handles:
            handle.remove()
    return total, spent[0]


def active_experts(model: nn.Module, size: DecoderSize, batch: int, prompt_len: int, new_tokens: int) -> float | None:
    """Experts that receive tokens, per MoE layer and decoding step (mean over one generation);
    None for a model without MoE layers."""
    layers = [m for m in model.modules() if isinstance(m, flexmoe.MoELayer)]
    counts: list[int] = []

    def record(layer, args, output):
        if layer.stats.num_tokens == batch:  # a decoding step, not the prefill
            counts.append(int((layer.stats.kept_per_expert > 0).sum()))

    handles = [layer.register_forward_hook(record) for layer in layers]
    try:
        prompt = torch.randint(size.vocab, (batch, prompt_len))
        generate(model, prompt, torch.full((batch,), TASK), new_tokens)
    finally:
        for handle in handles:
            handle.remove()
    return sum(counts) / len(counts) if counts else None


def balanced_active_experts(size: DecoderSize, batch: int) -> float:
    """Expected experts that receive tokens when each of ``batch`` tokens picks its top-k uniformly."""
    return size.num_experts * (1 - (1 - size.top_k / size.num_experts) ** batch)


def time_one_sparse_ffn(model: nn.Module, size: DecoderSize, batch: int, clock: Clock, calls: int = 20) -> float:
    """Seconds per call of the first sparse-position FFN alone on one decoding step [batch, 1, model_dim]:
    the same layer without the rest of the model competing for the caches."""
    ffn = model.blocks[size.moe_every - 1].ffn
    x, task_ids = torch.randn(batch, 1, size.model_dim), torch.full((batch,), TASK)
    with torch.no_grad():
        ffn(x, task_ids=task_ids)
        start = clock()
        for _ in range(calls):
            ffn(x, task_ids=task_ids)
    return (clock() - start) / calls


def print_throughput(title: str, throughput: dict[str, dict[int, float]]) -> None:
    """A table of tokens/s[model][batch] with each one's ratio to (a) at the same batch size, each
    model's peak and its batch, and the ratio of its peak to (a)'s peak."""
    baseline = throughput[MODEL_NAMES[0]]
    peak_baseline = max(baseline.values())
    batch_sizes = sorted({b for per_batch in throughput.values() for b in per_batch})
    print(f"{title}: tokens/s (ratio to (a) at the same batch size; '-': the model's peak was behind it)")
    columns = "".join(f"{'batch ' + str(b):>14}" for b in batch_sizes)
    print(f"{'model':<22}{columns}{'peak (batch)':>20}{'peak ratio':>12}")
    for name, per_batch in throughput.items():
        cells = "".join(
            f"{per_batch[b]:>8.0f} {per_batch[b] / baseline[b]:>4.2f}x" if b in per_batch and b in baseline
            else f"{per_batch[b]:>14.0f}" if b in per_batch else f"{'-':>14}"
            for b in batch_sizes
        )  # fmt: skip
        peak_batch = max(per_batch, key=per_batch.__getitem__)
        peak = per_batch[peak_batch]
        print(f"{name:<22}{cells}{f'{peak:.0f} ({peak_batch})':>20}{peak / peak_baseline:>11.2f}x")


def describe_machine(threads: int) -> str:
    return (
        f"machine: {platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} cpus, "
        f"torch threads {threads}; torch {torch.__version__}, python {platform.python_version()}, "
        f"flexmoe {flexmoe.__version__}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), default="paper", help="model shape (see above)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per sequence")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH, help="largest batch of the sweep")
    parser.add_argument("--min-gain", type=float, default=0.03, help="a model's sweep stops below this rise")
    parser.add_argument(
        "--patience", type=int, default=2, help="batch sizes in a row below --min-gain before a model's sweep stops"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, batches up to 8: a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="cpu", help="cpu needs --threads 1")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu sums the CPU time of all threads: use it with --threads 1, else --clock wall")
    torch.set_num_threads(args.threads)
    if args.max_batch < 1 or not 0 <= args.min_gain < 1 or args.patience < 1:
        parser.error("--max-batch and --patience must be >= 1 and --min-gain in [0, 1)")
    size, max_batch = SHAPES[args.shape], args.max_batch
    if args.quick:
        size, max_batch = dataclasses.replace(QUICK, moe_every=size.moe_every), QUICK_MAX_BATCH
    prompt_len, new_tokens, repeats = (4, 4, 1) if args.quick else (args.prompt, args.new_tokens, args.repeats)

    print(describe_machine(args.threads) + f"; clock: {args.clock}")
    print(f"shape {args.shape}; decoder: {size}")
    print(f"decoding: prompt {prompt_len} + {new_tokens} new tokens, greedy, KV cache, one task per batch")
    models = build_models(size, args.seed)
    print(f"(c) vs (b) max |logit difference| on task {TASK}: {check_subnet_matches(models, size):.2e}")
    print(f"extraction: {models[MODEL_NAMES[2]].extraction_report}".splitlines()[0])

    clock = CLOCKS[args.clock]
    whole, decoding = measure_throughput(
        models,
        size,
        prompt_len,
        new_tokens,
        repeats,
        clock,
        max_batch,
        0.0 if args.quick else args.min_gain,
        args.patience,
    )
    print_throughput("\nwhole generation (prefill included)", whole)
    print_throughput("\ndecoding only (the steps after the prefill)", decoding)

    base_bytes = parameter_bytes(models[MODEL_NAMES[0]])
    batch = min(max(per_batch) for per_batch in decoding.values())
    steps = new_tokens + 1  # the prefill and one step per new token
    print(f"\nresident parameters, and where one generation's time goes at batch {batch} (ms per step)")
    print(
        f"{'model':<22}{'parameters':>14}{'MB':>9}{'ratio':>8}{'step':>10}{'sparse FFN':>12}{'rest':>10}"
        f"{'one sparse FFN alone':>22}{'active experts':>16}"
    )
    for name, model in models.items():
        nbytes, params = parameter_bytes(model), sum(p.numel() for p in model.parameters())
        total, sparse = time_split(model, size, batch, prompt_len, new_tokens, clock)
        alone = time_one_sparse_ffn(model, size, batch, clock)
        active = active_experts(model, size, batch, prompt_len, new_tokens)
        print(
            f"{name:<22}{params:>14,}{nbytes / 2**20:>9.1f}{nbytes / base_bytes:>7.2f}x"
            f"{1e3 * total / steps:>10.1f}{1e3 * sparse / steps:>12.1f}{1e3 * (total - sparse) / steps:>10.1f}"
            f"{1e3 * alone:>22.2f}{'-' if active is None else f'{active:.1f}':>16}"
        )
    print(
        f"sparse FFN: the MoE layers ({size.sparse_layers} of {size.layers}; the DenseFFN / MLP in (c), (d)); "
        "rest: attention, dense FFNs, norms, head; one sparse FFN alone: one such layer on one step's "
        "[batch, 1, model_dim], ms; active experts: experts that get tokens per MoE layer and decoding step "
        f"(uniform top-{size.top_k} routing of {batch} tokens: {balanced_active_experts(size, batch):.1f} "
        f"of {size.num_experts})."
    )


if __name__ == "__main__":
    main()
