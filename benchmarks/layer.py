"""Forward+backward time of MoELayer and baselines, as ratios to the expert-GEMM floor.

One run measures, per config: the floor (the fastest of bmm on the padded [E, C, M] buffer,
one addmm per expert on exact counts, and grouped_mm on exact counts: the expert FFN alone on
exactly the rows the layer routed, no router, no dispatch), MoELayer, a per-expert Python loop
(HuggingFace-Mixtral style, no capacity), the router's GEMM alone (part of every MoE row, not of
the floor), the token movement alone (gathering each routed row for its expert and
scatter-adding the gate-weighted outputs back, fwd+bwd: also part of every MoE row, not of the
floor), a bound no MoE layer can beat (the floor plus those two rows: routing itself, the softmax
and top-k, is left out, so the true bound is higher), the one-hot/einsum reference, and DeepSpeed-MoE when
``deepspeed`` is importable (``make bench-venv``; same weights, CPU accelerator, a world-1 gloo group). Candidates are
interleaved per repeat and the median is reported. Upstream gradients are dense random
tensors (``out.sum().backward()`` would hand back a stride-0 gradient that sends CPU bmm
backward onto a slow path). Gradients are set to None before each timed call, as a training
step's ``optimizer.zero_grad()`` does, so no row pays (or skips) accumulating into old ones. The
per-expert floor holds one weight tensor per expert (HF's ``nn.Linear`` per expert), so its
gradients are never stacked into ``[E, ...]``. ``--memory`` adds the peak RSS of each row, one subprocess per row.

    python benchmarks/layer.py [--threads 1] [--repeats 5] [--quick] [--memory] [--only 'E64 k1']
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flexmoe import MoELayer
from flexmoe.reference import reference_moe


@dataclass(frozen=True)
class Config:
    tokens: int
    model_dim: int
    hidden_dim: int
    experts: int
    top_k: int
    capacity_factor: float
    skewed: bool = False

    def label(self) -> str:
        skew = " skewed" if self.skewed else ""
        return (
            f"T{self.tokens} M{self.model_dim} H{self.hidden_dim} E{self.experts} "
            f"k{self.top_k} f{self.capacity_factor:g}{skew}"
        )


CONFIGS = [
    Config(4096, 512, 2048, 8, 2, 1.0),
    Config(8192, 1024, 4096, 16, 2, 1.25),
    Config(16384, 256, 1024, 64, 1, 1.0),
    Config(2048, 1024, 4096, 4, 1, 1.0),
    Config(4096, 512, 2048, 8, 2, 0.0, skewed=True),
]
QUICK = [Config(512, 64, 128, 8, 2, 1.0), Config(1024, 64, 128, 16, 2, 1.25), Config(512, 64, 128, 8, 2, 0.0, True)]
ROWS = [
    "floor:bmm",
    "floor:addmm-per-expert",
    "floor:grouped_mm",
    "MoELayer",
    "  of which: router GEMM",
    "  of which: token movement",
    "loop (HF-style)",
    "einsum reference",
    "DeepSpeed-MoE",
]


def deepspeed_available() -> str | None:
    """None when DeepSpeed-MoE can run here, else why not. Initialises a world-1 gloo group."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    try:
        import deepspeed.moe.layer  # noqa: F401
    except ImportError as error:
        return f"deepspeed not importable ({error}); run `make bench-venv` and `.venv-bench/bin/python {__file__}`"
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    return None


def deepspeed_moe(layer: MoELayer, capacity_factor: float | None = None):
    """A DeepSpeed-MoE layer holding ``layer``'s router and expert weights (same routing semantics:
    GShard capacity, no second-expert sampling, no random token selection, no minimum capacity)."""
    from deepspeed.moe.layer import MoE
    from torch import nn

    config, experts = layer.config, layer.experts
    template = nn.Sequential(
        nn.Linear(config.model_dim, config.hidden_dim), nn.GELU(), nn.Linear(config.hidden_dim, config.model_dim)
    )
    factor = config.capacity_factor if capacity_factor is None else capacity_factor
    moe = MoE(
        config.model_dim,
        template,
        config.num_experts,
        ep_size=1,
        k=config.top_k,
        capacity_factor=factor,
        eval_capacity_factor=factor,
        min_capacity=0,
        drop_tokens=factor > 0,
        use_rts=False,
        top2_2nd_expert_sampling=False,
    )
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(layer.router.weight)
        for e, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            expert[0].weight.copy_(experts.w1[e].T)
            expert[0].bias.copy_(experts.b1[e])
            expert[2].weight.copy_(experts.w2[e].T)
            expert[2].bias.copy_(experts.b2[e])
    return moe


def build(config: Config, seed: int = 0):
    torch.manual_seed(seed)
    layer = MoELayer(
        model_dim=config.model_dim,
        num_experts=config.experts,
        hidden_dim=config.hidden_dim,
        top_k=config.top_k,
        capacity_factor=config.capacity_factor,
        normalize_gate=config.top_k > 1,  # Switch/DeepSpeed convention: a top-1 gate keeps its probability
        aux_loss=None,
    )
    if config.skewed:  # a router bias towards expert 0 so it receives about half of the tokens
        with torch.no_grad():
            layer.router.weight[0] = layer.router.weight[1:].mean(0)
    x = torch.randn(config.tokens, config.model_dim)
    with torch.no_grad():
        direction = layer.router.weight[0] / layer.router.weight[0].norm()
        if config.skewed:
            x = x + 0.9 * direction * config.model_dim**0.5 * (torch.rand(config.tokens, 1) < 0.5)
        layer(x)
    return layer, x


def candidates(layer: MoELayer, x: torch.Tensor) -> tuple[dict, list[torch.Tensor]]:
    """(name -> zero-argument callable running fwd+bwd once, the leaf tensors whose gradients
    the callables fill: cleared before each timed call, as ``optimizer.zero_grad()`` does)."""
    stats = layer.stats
    experts = layer.experts
    w1, b1, w2, b2 = experts.w1, experts.b1, experts.w2, experts.b2
    counts = stats.kept_per_expert
    rows, capacity, num_experts = int(counts.sum()), stats.capacity, counts.numel()
    exact = torch.randn(rows, x.shape[1], requires_grad=True)
    padded = torch.randn(num_experts, capacity, x.shape[1], requires_grad=True)
    grad_exact, grad_padded = torch.randn(rows, x.shape[1]), torch.randn(num_experts, capacity, x.shape[1])
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    grad_x = torch.randn_like(x)

    def floor_bmm():
        h = F.gelu(torch.baddbmm(b1.unsqueeze(1), padded, w1))
        torch.baddbmm(b2.unsqueeze(1), h, w2).backward(grad_padded)

    # One weight tensor per expert (nn.Linear per expert, as HF's Mixtral): each gradient lands in
    # its own tensor, with no stacking into [E, ...] (unbind's backward would add one cat per weight).
    w1s, b1s, w2s, b2s = ([t.detach().clone().requires_grad_() for t in w] for w in (w1, b1, w2, b2))

    def floor_addmm():
        pieces = exact.split(counts.tolist())
        outs = [torch.addmm(b2s[e], F.gelu(torch.addmm(b1s[e], pieces[e], w1s[e])), w2s[e]) for e in range(num_experts)]
        torch.cat(outs).backward(grad_exact)

    def floor_grouped():
        per_row = torch.repeat_interleave(torch.arange(num_experts), counts, output_size=rows)
        h = F.gelu(F.grouped_mm(exact, w1, offs=offsets) + b1[per_row])
        (F.grouped_mm(h, w2, offs=offsets) + b2[per_row]).backward(grad_exact)

    def moe_layer():
        layer(x_leaf).backward(grad_x)

    # The router's linear layer alone (fwd+bwd): work MoELayer, the loop and DeepSpeed all do and
    # the floor leaves out by definition, so MoELayer's ratio cannot go below 1 + this row's.
    grad_logits = torch.randn(x.shape[0], num_experts)

    def router_gemm():
        F.linear(x_leaf, layer.router.weight).backward(grad_logits)

    # Moving the tokens alone (fwd+bwd): each kept (token, expert) row gathered from x, its
    # gate-weighted copy scatter-added back (what dispatch + combine must do around the GEMMs).
    layer.record_plan = True
    with torch.no_grad():
        layer(x)
    plan = layer.last_plan
    layer.record_plan = False
    token_index, gates = plan.token_index, plan.gates.detach().unsqueeze(1)

    def token_movement():
        rows = x_leaf.index_select(0, token_index) * gates
        torch.zeros_like(x_leaf).index_add_(0, token_index, rows).backward(grad_x)

    def loop():
        logits = layer.router(x_leaf)
        gates, chosen = torch.softmax(logits, -1).topk(layer.config.top_k, dim=-1)
        gates = gates / gates.sum(-1, keepdim=True)
        out = torch.zeros_like(x_leaf)
        for e in range(num_experts):
            token, slot = torch.where(chosen == e)
            h = F.gelu(torch.addmm(b1s[e], x_leaf[token], w1s[e]))
            y = torch.addmm(b2s[e], h, w2s[e]) * gates[token, slot, None]
            out = out.index_add(0, token, y)
        out.backward(grad_x)

    params = dict(layer.named_parameters())

    def einsum():
        reference_moe(params, layer.config, x_leaf)[0].backward(grad_x)

    x_leaf = x.clone().requires_grad_()
    runs = dict(
        zip(ROWS, [floor_bmm, floor_addmm, floor_grouped, moe_layer, router_gemm, token_movement, loop, einsum])
    )
    leaves = [exact, padded, x_leaf, *w1s, *b1s, *w2s, *b2s, *layer.parameters()]
    if deepspeed_available() is None:
        ds_layer = deepspeed_moe(layer)

        def deepspeed():
            ds_layer(x_leaf)[0].backward(grad_x)

        runs["DeepSpeed-MoE"] = deepspeed
        # Same weights: dropless outputs must agree. (Under a capacity cut they differ by design:
        # DeepSpeed renormalises the gates of a token after a drop, and top-1 picks the kept tokens by
        # torch.topk over a 0/1 mask, not first-come.)
        with torch.no_grad():
            difference = (deepspeed_moe(layer, 0.0)(x)[0] - layer(x, capacity_factor=0)).abs().max().item()
        if difference > 1e-3:
            raise RuntimeError(f"DeepSpeed-MoE and MoELayer disagree by {difference:.3g}: the comparison is unfair")
        leaves += list(ds_layer.parameters())
    return runs, leaves


def time_config(config: Config, repeats: int, skip: set[str]) -> dict[str, float]:
    layer, x = build(config)
    all_runs, leaves = candidates(layer, x)
    runs = {name: fn for name, fn in all_runs.items() if name not in skip}
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            for leaf in leaves:
                leaf.grad = None
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    share = float(layer.stats.tokens_per_expert.max()) / config.tokens  # share of tokens
    result = {name: statistics.median(v) for name, v in samples.items()}
    result["_top_share"] = share
    return result


def peak_rss_mb(config: Config, row: str, threads: int) -> float:
    """Peak resident memory (MB) of a fresh process while it runs one row's fwd+bwd twice.

    The kernel's high-water mark (VmHWM) is reset after set-up (``/proc/self/clear_refs``), so set-up
    transients (building every candidate, the DeepSpeed agreement check) do not count; what is
    resident anyway (weights, inputs) does, the same for every row of a config.
    """
    code = (
        "import sys, torch; sys.path.insert(0, 'benchmarks'); import layer as b; "
        f"torch.set_num_threads({threads}); c = b.Config(**{config.__dict__!r}); "
        f"l, x = b.build(c); f = b.candidates(l, x)[0][{row!r}]; "
        "open('/proc/self/clear_refs', 'w').write('5'); f(); f(); "
        "print([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')][0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small configs, 2 repeats: a smoke run")
    parser.add_argument("--memory", action="store_true", help="peak RSS per row (one subprocess per row)")
    parser.add_argument("--no-einsum", action="store_true", help="skip the einsum reference (slow, memory-hungry)")
    parser.add_argument("--only", metavar="SUBSTRING", help="run only the configs whose label contains SUBSTRING")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs, repeats = (QUICK, 2) if args.quick else (CONFIGS, args.repeats)
    if args.only is not None:
        configs = [c for c in configs if args.only in c.label()]
        if not configs:
            parser.error(f"--only {args.only!r} matches no config label")
    skip = {"einsum reference"} if args.no_einsum else set()
    ds_missing = deepspeed_available()
    ds_note = "DeepSpeed-MoE row included" if ds_missing is None else f"DeepSpeed-MoE row skipped: {ds_missing}"
    print(
        f"# machine: {cpu_name()}, torch {torch.__version__}, {args.threads} thread(s), float32, "
        f"median of {repeats}; {ds_note}"
    )
    print(
        "# time of forward+backward with a dense upstream gradient, as a ratio to the floor "
        "(the fastest expert-FFN-only variant on exactly the routed rows); < 1.05 is the target for MoELayer"
    )
    print("| config | candidate | ratio to floor | ms | peak RSS MB |")
    print("|---|---|---:|---:|---:|")
    for config in configs:
        result = time_config(config, repeats, skip)
        floor = min(result[n] for n in ROWS[:3])
        label = f"{config.label()} (top expert gets {result['_top_share']:.0%} of tokens)"
        for name in ROWS:
            if name not in result:
                continue
            memory = f"{peak_rss_mb(config, name, args.threads):.0f}" if args.memory else "-"
            print(f"| {label} | {name} | {result[name] / floor:.2f}x | {result[name] * 1e3:.1f} | {memory} |")
            label = ""
        bound = floor + result["  of which: router GEMM"] + result["  of which: token movement"]
        print(f"|  | bound: floor + router GEMM + token movement | {bound / floor:.2f}x | {bound * 1e3:.1f} | - |")
        print(f"|  | MoELayer / bound | {result['MoELayer'] / bound:.2f}x | | |")


if __name__ == "__main__":
    main()
