"""Forward+backward time of MoELayer and baselines, as ratios to the expert-GEMM floor.

One run measures, per config: the floor (the fastest of bmm on the padded [E, C, M] buffer,
one addmm per expert on exact counts, and grouped_mm on exact counts: the expert FFN alone on
exactly the rows the layer routed, no router, no dispatch), MoELayer, the per-expert loop as
transformers' Mixtral sparse block writes it (``HFStyleMoE``: one-hot expert mask,
``torch.where`` and an index gather per expert, ``nn.Linear`` per expert, ``index_add_`` back, no
capacity), the router's GEMM alone (part of every MoE row, not of the floor), the token movement
alone (gathering each routed row for its expert and scatter-adding the gate-weighted outputs
back, fwd+bwd: also part of every MoE row, not of the floor), a bound no MoE layer can beat (the
floor plus those two rows: routing itself, the softmax and top-k, is left out, so the true bound
is higher), the one-hot/einsum reference, and DeepSpeed-MoE when ``deepspeed`` is importable
(``make bench-venv``; same weights, CPU accelerator, a world-1 gloo group). Upstream gradients are
dense random tensors (``out.sum().backward()`` would hand back a stride-0 gradient that sends CPU
bmm backward onto a slow path). Gradients are set to None before each timed call, as a training
step's ``optimizer.zero_grad()`` does, so no row pays (or skips) accumulating into old ones. The
per-expert floor holds one weight tensor per expert (HF's ``nn.Linear`` per expert), so its
gradients are never stacked into ``[E, ...]``.

Two modes:

* in-process (default): every row built in one process, one warm-up call each, then the rows
  interleaved per repeat, median of ``--repeats``;
* ``--fresh``: each row of each config in its own new Python process, ``--warmup`` (6) untimed
  steps, then ``--repeats`` (5) timed ones, median: what a training loop sees. In one process the
  rows warm each other's memory: freed pages stay mapped for the next row, so no row pays page
  faults; alone, a row that allocates large tensors every step gets fresh pages from the kernel
  each step (glibc trims its heap), a fault per 4 KB (see docs/benchmarks.md).

Each row is reported in wall time and in CPU time of the process (``time.process_time``: user +
system, all threads; the fairer figure while other jobs share the cores), with its minor page
faults per step. ``--memory`` adds the peak RSS of each row, one subprocess per row.

    python benchmarks/layer.py [--fresh] [--threads 1] [--repeats 5] [--quick] [--memory] [--only 'E64 k1']
                               [--rows floor:addmm MoELayer loop 'of which']
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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


class HFStyleMoE(nn.Module):
    """The per-expert loop as transformers' Mixtral sparse block writes it: a linear gate, softmax
    in float32, top-k (renormalised in place when k > 1, as MoELayer's ``normalize_gate``), a
    one-hot expert mask, then per hit expert ``torch.where`` on its mask, an index gather, its own
    ``nn.Linear`` pair (weights ``[out, in]``), the gate product and ``index_add_`` into a zeroed
    output. No capacity: every choice runs. Holds copies of ``layer``'s router and expert weights."""

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        config, experts = layer.config, layer.experts
        self.top_k, self.normalize = config.top_k, config.normalize_gate
        self.num_experts = config.num_experts
        self.gate = nn.Linear(config.model_dim, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(
                nn.Linear(config.model_dim, config.hidden_dim),
                nn.GELU(),
                nn.Linear(config.hidden_dim, config.model_dim),
            )
            for _ in range(config.num_experts)
        )
        with torch.no_grad():
            self.gate.weight.copy_(layer.router.weight)
            for e, expert in enumerate(self.experts):
                expert[0].weight.copy_(experts.w1[e].T)
                expert[0].bias.copy_(experts.b1[e])
                expert[2].weight.copy_(experts.w2[e].T)
                expert[2].bias.copy_(experts.b2[e])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states: [tokens, model_dim] -> [tokens, model_dim]."""
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        if self.normalize:
            routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[token_idx]
            current_hidden_states = self.experts[expert_idx](current_state)
            current_hidden_states = current_hidden_states * routing_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(hidden_states.dtype))
        return final_hidden_states


def candidates(layer: MoELayer, x: torch.Tensor, only: set[str] | None = None) -> tuple[dict, list[torch.Tensor]]:
    """(name -> zero-argument callable running fwd+bwd once, the leaf tensors whose gradients
    the callables fill: cleared before each timed call, as ``optimizer.zero_grad()`` does).
    only: build just these rows (a fresh process times one row and should hold nothing else)."""

    def wanted(name: str) -> bool:
        return only is None or name in only

    stats = layer.stats
    experts = layer.experts
    w1, b1, w2, b2 = experts.w1, experts.b1, experts.w2, experts.b2
    counts = stats.kept_per_expert
    rows, capacity, num_experts = int(counts.sum()), stats.capacity, counts.numel()
    x_leaf = x.clone().requires_grad_()
    grad_x = torch.randn_like(x)
    runs: dict = {}
    leaves: list[torch.Tensor] = [x_leaf]

    if wanted("floor:bmm"):
        padded = torch.randn(num_experts, capacity, x.shape[1], requires_grad=True)
        grad_padded = torch.randn(num_experts, capacity, x.shape[1])

        def floor_bmm():
            h = F.gelu(torch.baddbmm(b1.unsqueeze(1), padded, w1))
            torch.baddbmm(b2.unsqueeze(1), h, w2).backward(grad_padded)

        runs["floor:bmm"] = floor_bmm
        leaves += [padded, w1, b1, w2, b2]

    if wanted("floor:addmm-per-expert") or wanted("floor:grouped_mm"):
        exact = torch.randn(rows, x.shape[1], requires_grad=True)
        grad_exact = torch.randn(rows, x.shape[1])
        leaves.append(exact)

    if wanted("floor:addmm-per-expert"):
        # One weight tensor per expert (nn.Linear per expert, as HF's Mixtral): each gradient lands
        # in its own tensor, with no stacking into [E, ...] (unbind's backward would add one cat per
        # weight).
        w1s, b1s, w2s, b2s = ([t.detach().clone().requires_grad_() for t in w] for w in (w1, b1, w2, b2))
        split = counts.tolist()

        def floor_addmm():
            pieces = exact.split(split)
            outs = [
                torch.addmm(b2s[e], F.gelu(torch.addmm(b1s[e], pieces[e], w1s[e])), w2s[e]) for e in range(num_experts)
            ]
            torch.cat(outs).backward(grad_exact)

        runs["floor:addmm-per-expert"] = floor_addmm
        leaves += [*w1s, *b1s, *w2s, *b2s]

    if wanted("floor:grouped_mm"):
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)

        def floor_grouped():
            per_row = torch.repeat_interleave(torch.arange(num_experts), counts, output_size=rows)
            h = F.gelu(F.grouped_mm(exact, w1, offs=offsets) + b1[per_row])
            (F.grouped_mm(h, w2, offs=offsets) + b2[per_row]).backward(grad_exact)

        runs["floor:grouped_mm"] = floor_grouped
        leaves += [w1, b1, w2, b2]

    if wanted("MoELayer"):

        def moe_layer():
            layer(x_leaf).backward(grad_x)

        runs["MoELayer"] = moe_layer
        leaves += list(layer.parameters())

    if wanted("  of which: router GEMM"):
        # The router's linear layer alone (fwd+bwd): work MoELayer, the loop and DeepSpeed all do
        # and the floor leaves out by definition, so MoELayer's ratio cannot go below 1 + this row's.
        grad_logits = torch.randn(x.shape[0], num_experts)

        def router_gemm():
            F.linear(x_leaf, layer.router.weight).backward(grad_logits)

        runs["  of which: router GEMM"] = router_gemm
        leaves.append(layer.router.weight)

    if wanted("  of which: token movement"):
        # Moving the tokens alone (fwd+bwd): each kept (token, expert) row gathered from x, its
        # gate-weighted copy scatter-added back (what dispatch + combine must do around the GEMMs).
        layer.record_plan = True
        with torch.no_grad():
            layer(x)
        plan = layer.last_plan
        layer.record_plan = False
        token_index, gates = plan.token_index, plan.gates.detach().unsqueeze(1)

        def token_movement():
            moved = x_leaf.index_select(0, token_index) * gates
            torch.zeros_like(x_leaf).index_add_(0, token_index, moved).backward(grad_x)

        runs["  of which: token movement"] = token_movement

    if wanted("loop (HF-style)"):
        hf_block = HFStyleMoE(layer)

        def loop():
            hf_block(x_leaf).backward(grad_x)

        runs["loop (HF-style)"] = loop
        leaves += list(hf_block.parameters())

    if wanted("einsum reference"):
        params = dict(layer.named_parameters())

        def einsum():
            reference_moe(params, layer.config, x_leaf)[0].backward(grad_x)

        runs["einsum reference"] = einsum
        leaves += list(params.values())

    if wanted("DeepSpeed-MoE") and deepspeed_available() is None:
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


@dataclass(frozen=True)
class Timing:
    """Medians over the timed steps of one row: wall seconds, process CPU seconds (all threads;
    the fairer figure while other jobs share the cores) and minor page faults."""

    wall: float
    cpu: float
    faults: float


def timed_step(fn, leaves: list[torch.Tensor]) -> tuple[float, float, int]:
    """(wall s, process CPU s, minor page faults) of one fwd+bwd, gradients set to None before."""
    for leaf in leaves:
        leaf.grad = None
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def medians(samples: list[tuple[float, float, int]]) -> Timing:
    return Timing(*(statistics.median(column) for column in zip(*samples)))


def time_config(config: Config, repeats: int, skip: set[str]) -> tuple[dict[str, Timing], float]:
    """In-process mode: every row built in one process, one warm-up each, then the rows
    interleaved per repeat. Returns (row -> Timing, the top expert's share of tokens)."""
    layer, x = build(config)
    all_runs, leaves = candidates(layer, x)
    runs = {name: fn for name, fn in all_runs.items() if name not in skip}
    samples: dict[str, list] = {name: [] for name in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            samples[name].append(timed_step(fn, leaves))
    share = float(layer.stats.tokens_per_expert.max()) / config.tokens
    return {name: medians(v) for name, v in samples.items()}, share


def worker(request: dict) -> dict:
    """Fresh-process mode, inside the child: time one row of one config (``request``: config,
    row, threads, warmup, repeats); returns the samples and the top expert's share."""
    torch.set_num_threads(request["threads"])
    config = Config(**request["config"])
    layer, x = build(config)
    runs, leaves = candidates(layer, x, only={request["row"]})
    fn = runs[request["row"]]
    for _ in range(request["warmup"]):
        timed_step(fn, leaves)
    samples = [timed_step(fn, leaves) for _ in range(request["repeats"])]
    share = float(layer.stats.tokens_per_expert.max()) / config.tokens
    return {"samples": samples, "share": share}


def time_config_fresh(
    config: Config, rows: list[str], threads: int, warmup: int, repeats: int
) -> tuple[dict[str, Timing], float]:
    """Fresh-process mode: each row timed in its own new Python process (``warmup`` untimed steps,
    then ``repeats`` timed ones), as a training run sees the layer: nothing else allocated or
    warmed in the process. Returns (row -> Timing, the top expert's share of tokens)."""
    result, share = {}, 0.0
    for row in rows:
        request = dict(config=config.__dict__, row=row, threads=threads, warmup=warmup, repeats=repeats)
        out = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(request)], capture_output=True, text=True
        )
        if out.returncode != 0:
            raise RuntimeError(f"the fresh process for {config.label()} / {row.strip()} failed:\n{out.stderr}")
        answer = json.loads(out.stdout.splitlines()[-1])
        result[row] = medians(answer["samples"])
        share = answer["share"]
    return result, share


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


def print_table(config: Config, result: dict[str, Timing], share: float, memory: dict[str, float] | None) -> None:
    """The rows of one config: each as a ratio to the floor, in wall time and in process CPU time."""
    floor_rows = [name for name in ROWS[:3] if name in result]
    floor = Timing(*(min(getattr(result[n], f) for n in floor_rows) for f in ("wall", "cpu", "faults")))
    label = f"{config.label()} (top expert gets {share:.0%} of tokens)"

    def line(name: str, t: Timing, rss: str = "-") -> None:
        nonlocal label
        print(
            f"| {label} | {name} | {t.wall / floor.wall:.2f}x | {t.wall * 1e3:.1f} | {t.cpu / floor.cpu:.2f}x "
            f"| {t.cpu * 1e3:.1f} | {t.faults:.0f} | {rss} |"
        )
        label = ""

    for name in ROWS:
        if name in result:
            line(name, result[name], f"{memory[name]:.0f}" if memory else "-")
    parts = ("  of which: router GEMM", "  of which: token movement")
    if all(p in result for p in parts):
        bound = Timing(
            *(getattr(floor, f) + sum(getattr(result[p], f) for p in parts) for f in ("wall", "cpu", "faults"))
        )
        line("bound: floor + router GEMM + token movement", bound)
        for name in ("MoELayer", "loop (HF-style)"):
            if name in result:
                mine = result[name]
                print(f"|  | {name} / bound | {mine.wall / bound.wall:.2f}x | | {mine.cpu / bound.cpu:.2f}x | | | |")
    if "MoELayer" in result and "loop (HF-style)" in result:
        mine, loop = result["MoELayer"], result["loop (HF-style)"]
        print(f"|  | MoELayer / loop | {mine.wall / loop.wall:.2f}x | | {mine.cpu / loop.cpu:.2f}x | | | |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fresh", action="store_true", help="time each row in its own new process (see above)")
    parser.add_argument("--warmup", type=int, default=6, help="untimed steps before the timed ones (--fresh)")
    parser.add_argument("--quick", action="store_true", help="small configs, 2 repeats: a smoke run")
    parser.add_argument("--memory", action="store_true", help="peak RSS per row (one subprocess per row)")
    parser.add_argument("--no-einsum", action="store_true", help="skip the einsum reference (slow, memory-hungry)")
    parser.add_argument("--only", metavar="SUBSTRING", help="run only the configs whose label contains SUBSTRING")
    parser.add_argument(
        "--rows",
        metavar="SUBSTRING",
        nargs="+",
        help="run only the rows whose name contains one of these (at least one floor row: 'floor:addmm')",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    torch.set_num_threads(args.threads)
    configs, repeats = (QUICK, 2) if args.quick else (CONFIGS, args.repeats)
    if args.only is not None:
        configs = [c for c in configs if args.only in c.label()]
        if not configs:
            parser.error(f"--only {args.only!r} matches no config label")
    skip = {"einsum reference"} if args.no_einsum else set()
    if args.rows:
        skip |= {n for n in ROWS if not any(part in n for part in args.rows)}
        if all(n in skip for n in ROWS[:3]):
            parser.error(f"--rows {' '.join(args.rows)} names no floor row (the ratios need one): add 'floor'")
    ds_missing = deepspeed_available() if "DeepSpeed-MoE" not in skip else "not asked for (--rows)"
    if ds_missing is not None:
        skip.add("DeepSpeed-MoE")
    ds_note = "DeepSpeed-MoE row included" if ds_missing is None else f"DeepSpeed-MoE row skipped: {ds_missing}"
    mode = (
        f"fresh process per row, {args.warmup} warm-up + {repeats} timed steps"
        if args.fresh
        else f"one process, rows interleaved, 1 warm-up + {repeats} timed steps each"
    )
    print(f"# machine: {cpu_name()}, torch {torch.__version__}, {args.threads} thread(s), float32; {mode}, median")
    print(f"# {ds_note}")
    print(
        "# time of forward+backward with a dense upstream gradient, as a ratio to the floor "
        "(the fastest expert-FFN-only variant on exactly the routed rows); < 1.05 is the target for MoELayer"
    )
    print("| config | candidate | ratio (wall) | ms (wall) | ratio (CPU) | ms (CPU) | page faults | peak RSS MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for config in configs:
        rows = [name for name in ROWS if name not in skip]
        if args.fresh:
            result, share = time_config_fresh(config, rows, args.threads, args.warmup, repeats)
        else:
            result, share = time_config(config, repeats, skip)
        memory = {name: peak_rss_mb(config, name, args.threads) for name in result} if args.memory else None
        print_table(config, result, share, memory)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
