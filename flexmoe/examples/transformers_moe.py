"""A transformers MoE model on flexmoe layers: convert, train, prune experts, convert back, save.

    python -m flexmoe.examples.transformers_moe [--steps 20] [--keep 2] [--save DIR]
    torchrun --nproc_per_node 2 -m flexmoe.examples.transformers_moe --expert-parallel

1. builds a small random Mixtral (--family qwen3_moe etc. for the others, or
   --pretrained DIR for a local checkpoint) and checks the converted model's logits;
2. to_flexmoe(model, aux_loss="gshard"): trains a few steps on a toy corpus
   (repeated random token sequences), adding flexmoe_aux_loss(model) to the loss;
3. counts expert usage on the corpus and prunes every layer to its --keep most used
   experts (flexmoe.prune_experts), printing the loss before/after;
4. from_flexmoe: back to transformers' own blocks, save_pretrained and reload, with
   the same logits.

--expert-parallel (under torchrun; gloo on CPU, NCCL on CUDA): every rank builds the same
model and converts it with the world group, so each rank holds 1 / world of every layer's
experts; each rank trains on its own batches, averaging the replicated parameters' gradients
with allreduce_non_expert_grads; from_flexmoe gathers the experts back on every rank,
then rank 0 saves and reloads, converts again single-process and prunes (steps 4, then 3).
Losses are printed by rank 0 (the training loss: the mean over ranks).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable

import torch
import torch.distributed as dist

from flexmoe import expert_usage, prune_experts
from flexmoe.distributed import parameter_groups
from flexmoe.integrations.transformers import flexmoe_aux_loss, flexmoe_layers, from_flexmoe, to_flexmoe
from flexmoe.parallel import SINGLE_PROCESS, allreduce_non_expert_grads

FAMILIES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=64, moe_intermediate_size=32, num_experts=8)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2)),
}
AUX_LOSS = dict(aux_loss="gshard", aux_loss_weight=0.01)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(FAMILIES), default="mixtral")
    p.add_argument("--pretrained", default=None, help="a local transformers checkpoint instead of a random model")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--keep", type=int, default=4, help="experts kept per layer by pruning")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--save", default=None, help="directory for save_pretrained (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--expert-parallel",
        action="store_true",
        help="shard the experts over the torchrun world (run under torchrun; every rank builds the same model)",
    )
    return p.parse_args(argv)


def build_model(args) -> torch.nn.Module:
    import transformers

    if args.pretrained:
        return transformers.AutoModelForCausalLM.from_pretrained(args.pretrained)
    name, options = FAMILIES[args.family]
    config = getattr(transformers, name)(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **options
    )
    return transformers.AutoModelForCausalLM.from_config(config)


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


def convert(model: torch.nn.Module, batch: torch.Tensor, **options) -> float:
    """to_flexmoe(model, **options) in eval mode; returns the max |logit difference| on ``batch``."""
    model.eval()
    with torch.no_grad():
        before = model(input_ids=batch).logits
        to_flexmoe(model, **options)
        after = model(input_ids=batch).logits
    return float((before - after).abs().max())


def train(
    model: torch.nn.Module, batches: Callable[[int], torch.Tensor], args, after_backward: Callable[[], None]
) -> float:
    """``args.steps`` AdamW steps on ``batches(step)``; returns the first step's loss (this process's)."""
    # After converting (new Parameter objects); DTensor experts in groups of their own.
    optimizer = torch.optim.AdamW(parameter_groups(model), lr=args.lr)
    model.train()
    first = None
    for step in range(args.steps):
        loss = lm_loss(model, batches(step))
        (loss + flexmoe_aux_loss(model)).backward()
        after_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        first = float(loss.detach()) if first is None else first
    model.eval()
    return first


def mean_loss(model: torch.nn.Module, corpus: torch.Tensor) -> float:
    with torch.no_grad():
        return sum(float(lm_loss(model, b)) for b in corpus) / len(corpus)


def prune(model: torch.nn.Module, corpus: torch.Tensor, keep: int) -> float:
    """Prune a copy of the (flexmoe) model to its ``keep`` most used experts per layer; its mean loss."""
    usage = expert_usage(model, [{"input_ids": b} for b in corpus])
    pruned = prune_experts(model, usage.top_experts(keep))
    loss = mean_loss(pruned, corpus)
    print(f"pruned to {keep} experts per layer {pruned.pruning_report}: loss {loss:.3f}")
    return loss


def save_and_reload(model: torch.nn.Module, batch: torch.Tensor, directory: str | None) -> float:
    """save_pretrained + from_pretrained of a transformers model; the max |logit difference|."""
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        directory = directory or tmp
        model.save_pretrained(directory)
        reloaded = type(model).from_pretrained(directory).to(batch.device).eval()
        difference = float((reloaded(input_ids=batch).logits - model(input_ids=batch).logits).abs().max())
    print(f"saved in transformers' format and reloaded: max |logit difference| {difference:.2e}")
    return difference


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Returns the losses along the way (with --expert-parallel: rank 0 has them all)."""
    args = parse_args(argv)
    if args.expert_parallel:
        return main_expert_parallel(args)
    torch.manual_seed(args.seed)
    model = build_model(args).float()
    corpus = torch.randint(0, model.config.vocab_size, (8, 4, 24))  # 8 batches of 4 sequences; repeated
    difference = convert(model, corpus[0], **AUX_LOSS)
    print(f"converted {len(flexmoe_layers(model))} MoE blocks; max |logit difference| {difference:.2e}")
    losses = {"first": train(model, lambda step: corpus[step % len(corpus)], args, lambda: None)}
    losses["trained"] = mean_loss(model, corpus)
    print(f"train loss {losses['first']:.3f} -> {losses['trained']:.3f} after {args.steps} steps")
    losses["pruned"] = prune(model, corpus, args.keep)
    from_flexmoe(model)
    losses["reload_difference"] = save_and_reload(model, corpus[0], args.save)
    return losses


def _init_distributed() -> tuple[bool, torch.device]:
    """Joins torchrun's world unless torch.distributed already runs; (whether we did, device)."""
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.get_backend() == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        return started, torch.device("cuda", torch.cuda.current_device())
    return started, torch.device("cpu")


def main_expert_parallel(args: argparse.Namespace) -> dict[str, float]:
    started, device = _init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    say = print if rank == 0 else lambda *_: None
    torch.manual_seed(args.seed)  # the same model and corpus on every rank
    model = build_model(args).float().to(device)
    corpus = torch.randint(0, model.config.vocab_size, (8, 4, 24), device=device)
    difference = convert(model, corpus[0], group=dist.group.WORLD, **AUX_LOSS)  # every rank: the world group
    layout = flexmoe_layers(model)[0].layout
    say(
        f"converted {len(flexmoe_layers(model))} MoE blocks over {world_size} ranks ({layout.local_experts} of "
        f"{layout.num_experts} experts per rank); max |logit difference| {difference:.2e}"
    )

    def own_batch(step: int) -> torch.Tensor:  # each rank its own batches
        return corpus[(step * world_size + rank) % len(corpus)]

    first = torch.tensor(train(model, own_batch, args, lambda: allreduce_non_expert_grads(model)), device=device)
    dist.all_reduce(first)
    losses = {"first": float(first) / world_size, "trained": mean_loss(model, corpus)}
    say(f"train loss (mean over ranks) {losses['first']:.3f} -> {losses['trained']:.3f} after {args.steps} steps")

    from_flexmoe(model)  # collective: every rank gathers every expert
    if rank == 0:
        losses["reload_difference"] = save_and_reload(model, corpus[0], args.save)
        to_flexmoe(model, group=SINGLE_PROCESS, **AUX_LOSS)  # a local copy of every expert to prune
        losses["pruned"] = prune(model, corpus, args.keep)
    dist.barrier()
    if started:
        dist.destroy_process_group()
    return losses


if __name__ == "__main__":
    main()
