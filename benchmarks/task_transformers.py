"""A transformers Mixtral trained with token routing, converted to task routing, fine-tuned, and
exported per task as a dense Mistral: loss, parameters and generation throughput in one run.

    python benchmarks/task_transformers.py [--quick] [--threads 1] [--repeats 2]

Data: a synthetic multi-task language-modelling mix. Each task is its own first-order Markov chain
over a shared vocabulary (every token has a few likely successors, different per task), and every
sequence starts with its task's tag token (like the ``<2xx>`` target-language token of multilingual
translation), so token routing can tell the tasks apart too. Steps:

  1. a random Mixtral trained with token routing on the mix (flexmoe layers, GShard balance loss),
     put back into transformers' own blocks (``from_flexmoe``): the token-routed model;
  2. task embeddings from the token router (``initial_task_embeddings``, both methods: the mean
     scores of the task's tokens, or their mean router input) -> ``to_flexmoe(...,
     granularity="task")`` -> ``set_task_embeddings``: the task-routed model as converted, before
     any training (and, for reference, with zero task embeddings: uniform scores);
  3. the task-routed model fine-tuned briefly (task ids through ``route_tasks``), and, for
     comparison, the token-routed model trained for the same number of steps;
  4. ``export_task_model`` per task: dense ``MistralForCausalLM`` models, saved and reloaded with
     ``AutoModelForCausalLM.from_pretrained``.

Printed: held-out loss per task of each model, parameters, and generation tokens/s (greedy, KV
cache, one task per batch) over a batch sweep that doubles the batch until a model's tokens/s
stops rising; each model's peak as a ratio to the token-routed model's peak measured in the same
run (its faster form: transformers' own blocks or flexmoe's). Timing: process CPU time on one
thread (robust to other load on the machine), best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import transformers
from torch import nn

import flexmoe
from flexmoe.integrations.export import export_task_model
from flexmoe.integrations.task_routing import (
    INIT_METHODS,
    initial_task_embeddings,
    route_tasks,
    set_task_embeddings,
)
from flexmoe.integrations.transformers import flexmoe_aux_loss, from_flexmoe, to_flexmoe


@dataclass(frozen=True)
class Setup:
    """Model, data and training sizes."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    expert_width: int = 256
    experts: int = 8
    top_k: int = 2
    vocab: int = 256
    tasks: int = 4
    successors: int = 4
    seq: int = 48
    batch: int = 32
    pretrain_steps: int = 200
    finetune_steps: int = 100
    eval_batches: int = 4
    prompt: int = 8
    new_tokens: int = 16
    max_batch: int = 4096


QUICK = Setup(hidden=32, layers=2, heads=2, expert_width=32, vocab=64, seq=16, batch=8, pretrain_steps=4,
              finetune_steps=2, eval_batches=1, prompt=4, new_tokens=4, max_batch=4)  # fmt: skip


class TaskMix:
    """Sequences of several tasks: tag token, then a walk on the task's Markov chain."""

    def __init__(self, setup: Setup, seed: int) -> None:
        self.setup = setup
        generator = torch.Generator().manual_seed(seed)
        vocab, tasks = setup.vocab, setup.tasks
        # transitions[t, a]: a distribution over `successors` next tokens of a (tags never follow).
        self.transitions = torch.zeros(tasks, vocab, vocab)
        for task in range(tasks):
            for token in range(vocab):
                successors = tasks + torch.randperm(vocab - tasks, generator=generator)[: setup.successors]
                weights = torch.distributions.Dirichlet(torch.ones(setup.successors)).sample()
                self.transitions[task, token, successors] = weights

    def batch(self, generator: torch.Generator, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [rows, seq], task_ids [rows]): tasks drawn uniformly."""
        setup = self.setup
        rows = rows or setup.batch
        task_ids = torch.randint(setup.tasks, (rows,), generator=generator)
        ids = torch.empty(rows, setup.seq, dtype=torch.long)
        ids[:, 0] = task_ids  # the task's tag token
        ids[:, 1] = torch.randint(setup.tasks, setup.vocab, (rows,), generator=generator)
        for position in range(2, setup.seq):
            probs = self.transitions[task_ids, ids[:, position - 1]]
            ids[:, position] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return ids, task_ids

    def entropy_rate(self) -> float:
        """Mean entropy (nats) of the next token given the previous one: the best loss reachable."""
        p = self.transitions[:, self.setup.tasks :]
        return float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())


def build_mixtral(setup: Setup) -> nn.Module:
    config = transformers.MixtralConfig(
        vocab_size=setup.vocab,
        hidden_size=setup.hidden,
        intermediate_size=setup.expert_width,
        num_hidden_layers=setup.layers,
        num_attention_heads=setup.heads,
        num_key_value_heads=setup.heads // 2,
        num_local_experts=setup.experts,
        num_experts_per_tok=setup.top_k,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


def train(model: nn.Module, mix: TaskMix, steps: int, lr: float, seed: int, task_routed: bool) -> None:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids, task_ids = mix.batch(generator)
        with route_tasks(model, task_ids) if task_routed else nullcontext():
            loss = model(input_ids=ids, labels=ids).loss + flexmoe_aux_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@torch.no_grad()
def task_losses(model: nn.Module, eval_set: list[tuple[torch.Tensor, torch.Tensor]], setup: Setup,
                task_routed: bool = False, only_task: int | None = None) -> list[float]:  # fmt: skip
    """Held-out next-token loss per task (mean over the task's predicted tokens)."""
    totals, counts = torch.zeros(setup.tasks, dtype=torch.float64), torch.zeros(setup.tasks, dtype=torch.float64)
    for ids, task_ids in eval_set:
        with route_tasks(model, task_ids) if task_routed else nullcontext():
            logits = model(input_ids=ids).logits[:, :-1]
        per_token = nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        totals.index_add_(0, task_ids, per_token.sum(1).double())
        counts.index_add_(0, task_ids, torch.full((len(ids),), float(ids.shape[1] - 1), dtype=torch.float64))
    losses = (totals / counts).tolist()
    return losses if only_task is None else [losses[t] if t == only_task else math.nan for t in range(setup.tasks)]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def tokens_per_second(model: nn.Module, setup: Setup, batch: int, task_routed: bool, repeats: int) -> float:
    """Generated tokens per CPU second: greedy, KV cache, ``batch`` rows of task 0, best of repeats."""
    generator = torch.Generator().manual_seed(batch)
    prompt = torch.randint(setup.tasks, setup.vocab, (batch, setup.prompt), generator=generator)
    prompt[:, 0] = 0  # task 0's tag
    options = dict(max_new_tokens=setup.new_tokens, min_new_tokens=setup.new_tokens, do_sample=False)
    warm_up = {**options, "max_new_tokens": 2, "min_new_tokens": 2}
    best = math.inf
    with route_tasks(model, 0) if task_routed else nullcontext():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), **warm_up)
        for _ in range(repeats):
            start = time.process_time()
            model.generate(prompt, attention_mask=torch.ones_like(prompt), **options)
            best = min(best, time.process_time() - start)
    return batch * setup.new_tokens / best


def sweep(model: nn.Module, setup: Setup, task_routed: bool, repeats: int) -> dict[int, float]:
    """tokens/s per batch size: 1, 2, 4, ... until tokens/s stops rising (or ``max_batch``)."""
    results: dict[int, float] = {}
    batch = 1
    while batch <= setup.max_batch:
        results[batch] = tokens_per_second(model, setup, batch, task_routed, repeats)
        if len(results) >= 2 and results[batch] <= max(list(results.values())[:-1]):
            break
        batch *= 2
    return results


def describe_machine(threads: int) -> str:
    return (
        f"machine: {platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} cpus, "
        f"torch threads {threads}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}, flexmoe {flexmoe.__version__}"
    )


def print_losses(rows: dict[str, list[float]], reference_of: dict[str, str]) -> None:
    """Loss table; each row's last column: its mean over the mean of row ``reference_of[name]``."""
    tasks = len(next(iter(rows.values())))
    print(f"{'model':<36}" + "".join(f"{'task ' + str(t):>9}" for t in range(tasks)) + f"{'mean':>9}{'vs token':>10}")
    for name, losses in rows.items():
        baseline = rows[reference_of[name]]
        known = [loss for loss in losses if not math.isnan(loss)]
        reference = [baseline[t] for t, loss in enumerate(losses) if not math.isnan(loss)]
        cells = "".join(f"{'-' if math.isnan(loss) else f'{loss:.4f}':>9}" for loss in losses)
        mean = sum(known) / len(known)
        print(f"{name:<36}{cells}{mean:>9.4f}{mean / (sum(reference) / len(reference)):>9.3f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and steps: a smoke run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    setup = QUICK if args.quick else Setup()
    torch.manual_seed(args.seed)
    print(describe_machine(args.threads))
    print(f"setup: {setup}")
    mix = TaskMix(setup, args.seed)
    eval_generator = torch.Generator().manual_seed(args.seed + 1000)
    eval_set = [mix.batch(eval_generator) for _ in range(setup.eval_batches)]
    print(f"data: {setup.tasks} tasks; best reachable loss (entropy rate) {mix.entropy_rate():.4f} nats")

    # 1. Token routing: train on flexmoe layers, then back to transformers' own Mixtral blocks.
    started = time.perf_counter()
    token_model = build_mixtral(setup)
    to_flexmoe(token_model, aux_loss="gshard", aux_loss_weight=0.01)
    train(token_model, mix, setup.pretrain_steps, 3e-3, args.seed, task_routed=False)
    from_flexmoe(token_model)
    losses = {"token-routed (trained)": task_losses(token_model, eval_set, setup)}
    # The same fine-tuning budget with token routing: what the extra steps alone give.
    token_longer = build_mixtral(setup)
    token_longer.load_state_dict(token_model.state_dict())
    to_flexmoe(token_longer, aux_loss="gshard", aux_loss_weight=0.01)
    train(token_longer, mix, setup.finetune_steps, 1e-3, args.seed + 1, task_routed=False)
    losses[f"token-routed, +{setup.finetune_steps} steps"] = task_losses(token_longer, eval_set, setup)
    del token_longer

    # 2. Task routing, initialised from the token router (both methods; fine-tuning starts from mean_scores).
    calibration = [dict(input_ids=ids, task_ids=t) for ids, t in (mix.batch(eval_generator) for _ in range(4))]
    initial = {
        method: initial_task_embeddings(token_model, calibration, setup.tasks, method) for method in INIT_METHODS
    }
    task_model = build_mixtral(setup)
    task_model.load_state_dict(token_model.state_dict())
    to_flexmoe(task_model, granularity="task", num_tasks=setup.tasks)
    losses["task-routed, zero embeddings"] = task_losses(task_model, eval_set, setup, task_routed=True)
    for method in ("mean_input", "mean_scores"):
        set_task_embeddings(task_model, initial[method])
        losses[f"task-routed, converted ({method})"] = task_losses(task_model, eval_set, setup, task_routed=True)
    # The paper's split, for reference: token routing below, task routing in the upper half (no dense export).
    upper_half = build_mixtral(setup)
    upper_half.load_state_dict(token_model.state_dict())
    to_flexmoe(upper_half, granularity=lambda i: "task" if i >= setup.layers // 2 else "token", num_tasks=setup.tasks)
    set_task_embeddings(upper_half, initial["mean_scores"])
    losses["upper half task-routed, converted"] = task_losses(upper_half, eval_set, setup, task_routed=True)
    del upper_half

    # 3. Fine-tune with task routing.
    train(task_model, mix, setup.finetune_steps, 1e-3, args.seed + 1, task_routed=True)
    losses["task-routed, fine-tuned"] = task_losses(task_model, eval_set, setup, task_routed=True)

    # 4. Export each task as a dense Mistral; save and reload with transformers alone.
    exported: list[nn.Module] = []
    with tempfile.TemporaryDirectory() as directory:
        for task in range(setup.tasks):
            export_task_model(task_model, task).save_pretrained(f"{directory}/task{task}")
            dense = transformers.AutoModelForCausalLM.from_pretrained(f"{directory}/task{task}").eval()
            exported.append(dense)
    per_task = [task_losses(d, eval_set, setup, only_task=t)[t] for t, d in enumerate(exported)]
    losses[f"exported dense ({type(exported[0]).__name__})"] = per_task
    print(f"trained, converted, fine-tuned and exported in {time.perf_counter() - started:.0f} s")

    longer = f"token-routed, +{setup.finetune_steps} steps"
    print(
        "\nheld-out loss per task (nats/token); 'vs token': mean ratio to the token-routed model after the same "
        f"number of training steps (converted rows: the pre-trained one; fine-tuned and exported rows: '{longer}')"
    )
    trained_longer = {longer, "task-routed, fine-tuned", f"exported dense ({type(exported[0]).__name__})"}
    print_losses(losses, {name: longer if name in trained_longer else "token-routed (trained)" for name in losses})
    fine_tuned = losses["task-routed, fine-tuned"]
    worst = max(abs(e - f) / f for e, f in zip(per_task, fine_tuned))
    print(f"exported vs task-routed (fine-tuned): largest relative loss difference {worst:.2e} (target < 1e-2)")

    token_flex = build_mixtral(setup)
    token_flex.load_state_dict(token_model.state_dict())
    to_flexmoe(token_flex)
    token_model.eval()
    models = {
        "token-routed MoE (transformers)": (token_model, False),
        "token-routed MoE (flexmoe)": (token_flex.eval(), False),
        "task-routed MoE, whole (flexmoe)": (task_model, True),
        "exported dense, task 0": (exported[0], False),
    }
    print(
        f"\nparameters (dense {type(exported[0]).__name__}: intermediate_size {exported[0].config.intermediate_size})"
    )
    base_parameters = count_parameters(token_model)
    for name, (model, _) in models.items():
        print(f"  {name:<36}{count_parameters(model):>12,}{count_parameters(model) / base_parameters:>8.2f}x")

    print(f"\ngeneration: prompt {setup.prompt} + {setup.new_tokens} new tokens, greedy, KV cache, one task per batch;")
    print("tokens/s per CPU second at each batch size, the sweep doubles the batch until tokens/s stops rising")
    throughput = {name: sweep(model, setup, routed, args.repeats) for name, (model, routed) in models.items()}
    baseline = max(max(throughput[name].values()) for name in list(models)[:2])
    for name, per_batch in throughput.items():
        cells = "  ".join(f"b{b}: {rate:,.0f}" for b, rate in per_batch.items())
        peak_batch = max(per_batch, key=per_batch.get)
        peak = per_batch[peak_batch]
        print(f"  {name:<36} peak {peak:>9,.0f} at batch {peak_batch:<4} {peak / baseline:>6.2f}x   ({cells})")
    print(
        "ratios: each model's peak over the faster token-routed model's peak (target for the exported dense: >= 1.9x)"
    )


if __name__ == "__main__":
    main()
