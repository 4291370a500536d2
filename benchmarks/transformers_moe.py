"""A small random Mixtral-style model: transformers' experts implementations vs flexmoe layers.

One run builds one model (random weights, float32) and measures, interleaved per repeat
(median reported), with the same weights:

* train step: forward + backward of the causal-LM loss on ``[batch, seq]`` tokens;
* greedy generation: ``generate(max_new_tokens=N, do_sample=False)`` tokens/s;

for each experts implementation transformers offers (``model.set_experts_implementation``:
eager, batched_mm, grouped_mm) and for the model converted with ``to_flexmoe`` (weights copied
into flexmoe's contiguous layout, the default) and with ``to_flexmoe(share_storage=True)``
(views of transformers' tensors, no copy). Ratios are
time relative to transformers' fastest implementation (< 1 = flexmoe faster). Then a
``torch.profiler`` summary of one train step of transformers' fastest and of flexmoe says
where the time goes.

    python benchmarks/transformers_moe.py [--quick] [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer import cpu_name

from flexmoe.integrations.transformers import to_flexmoe

IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller model and fewer repeats: a smoke run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per row (default 5; 2 with --quick)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--profile-rows", type=int, default=8)
    p.add_argument(
        "--max-gathered-gb", type=float, default=1.0, help="skip batched_mm where its gathered weights exceed this"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.seq, args.new_tokens = 128, 256, 2, 64, 8
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    return args


def build_model(args) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=1024,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        router_jitter_noise=0.0,
    )
    return transformers.AutoModelForCausalLM.from_config(config).float()


def variants(args) -> dict[str, tuple[torch.nn.Module, str | None]]:
    """name -> (model, experts implementation to set before each run or None)."""
    model = build_model(args)
    flex = to_flexmoe(copy.deepcopy(model))
    shared = to_flexmoe(copy.deepcopy(model), share_storage=True)
    runs = {f"transformers {impl}": (model, impl) for impl in IMPLEMENTATIONS}
    runs["flexmoe"] = (flex, None)
    runs["flexmoe share_storage"] = (shared, None)
    return runs


def train_step(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()


def generate(model, prompt, new_tokens: int):
    model.eval()
    with torch.no_grad():
        model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            pad_token_id=0,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )


def batched_mm_gigabytes(args, tokens: int) -> float:
    """batched_mm gathers one copy of the chosen experts' weights per (token, choice)."""
    return tokens * args.top_k * 3 * args.intermediate * args.hidden * 4 / 1e9


def measure(args, runs) -> dict[str, dict[str, float]]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1024, (args.batch, args.seq), generator=generator)
    prompt = ids[:, :16]
    tasks = {
        "train step": lambda m: train_step(m, ids),
        "generate": lambda m: generate(m, prompt, args.new_tokens),
    }
    skipped = {
        task: {"transformers batched_mm"} if batched_mm_gigabytes(args, tokens) > args.max_gathered_gb else set()
        for task, tokens in (("train step", ids.numel()), ("generate", prompt.numel()))
    }
    samples = {task: {name: [] for name in runs if name not in skipped[task]} for task in tasks}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for task, fn in tasks.items():
            for name, (model, impl) in runs.items():
                if name in skipped[task]:
                    continue
                if impl is not None:
                    model.set_experts_implementation(impl)
                start = time.perf_counter()
                fn(model)
                if repeat:
                    samples[task][name].append(time.perf_counter() - start)
    return {task: {name: statistics.median(v) for name, v in by_name.items()} for task, by_name in samples.items()}


GEMM_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm", "aten::linear")


def profile_step(model, ids, rows: int) -> str:
    """A one-line split of one train step's self CPU time (GEMMs, attention, the rest) and the top ops."""
    train_step(model, ids)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(model, ids)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
    attention = sum(e.self_cpu_time_total for e in events if "attention" in e.key)
    split = (
        f"self CPU {total / 1e3:.0f} ms: GEMMs {gemm / total:.0%}, attention kernels {attention / total:.0%}, "
        f"everything else (routing, dispatch, norms, elementwise, autograd) {(total - gemm - attention) / total:.0%}"
    )
    return split + "\n" + events.table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = variants(args)
    print(
        f"# machine: {cpu_name()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{args.threads} thread(s), float32, median of {args.repeats}"
    )
    print(
        f"# Mixtral-style: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"{args.experts} experts top-{args.top_k}; train step batch {args.batch}x{args.seq}; "
        f"greedy generation of {args.new_tokens} tokens x {args.batch} sequences from a 16-token prompt"
    )
    results = measure(args, runs)
    for task, tokens in (("train step", args.batch * args.seq), ("generate", args.batch * 16)):
        if "transformers batched_mm" not in results[task]:
            gathered = batched_mm_gigabytes(args, tokens)
            print(f"# {task}: transformers batched_mm skipped: it would gather {gathered:.1f} GB of expert weights")
    print("| task | candidate | time ratio to transformers' fastest | ms | tokens/s |")
    print("|---|---|---:|---:|---:|")
    fastest = {}
    for task, by_name in results.items():
        fastest[task] = min((t, n) for n, t in by_name.items() if n.startswith("transformers"))
        tokens = args.batch * (args.seq if task == "train step" else args.new_tokens)
        for name, seconds in by_name.items():
            ratio = seconds / fastest[task][0]
            print(f"| {task} | {name} | {ratio:.2f}x | {seconds * 1e3:.1f} | {tokens / seconds:.0f} |")
    ids = torch.randint(0, 1024, (args.batch, args.seq), generator=torch.Generator().manual_seed(2))
    best_model, best_impl = runs[fastest["train step"][1]]
    best_model.set_experts_implementation(best_impl)
    for name, model in ((fastest["train step"][1], best_model), ("flexmoe", runs["flexmoe"][0])):
        print(f"\n# one train step, {name}: top ops by self CPU time")
        print(profile_step(model, ids, args.profile_rows))


if __name__ == "__main__":
    main()
