"""A transformers MoE model on flexmoe layers: convert, train, prune experts, convert back, save.

    python -m flexmoe.examples.transformers_moe [--steps 20] [--keep 2] [--save DIR]

1. builds a small random Mixtral (``--family qwen3_moe`` etc. for the others, or
   ``--pretrained DIR`` for a local checkpoint) and checks the converted model's logits;
2. ``to_flexmoe(model, aux_loss="gshard")``: trains a few steps on a toy corpus
   (repeated random token sequences), adding ``flexmoe_aux_loss(model)`` to the loss;
3. counts expert usage on the corpus and prunes every layer to its ``--keep`` most used
   experts (``flexmoe.prune_experts``), printing the loss before/after;
4. ``from_flexmoe``: back to transformers' own blocks, ``save_pretrained`` and reload, with
   the same logits.

Expert parallelism under torchrun needs flexmoe's distributed layer (flexmoe.parallel); a
converted model is an ordinary model of MoELayers, so it applies to it unchanged once present.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from flexmoe import expert_usage, prune_experts
from flexmoe.integrations.transformers import flexmoe_aux_loss, flexmoe_layers, from_flexmoe, to_flexmoe

FAMILIES = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=64, moe_intermediate_size=32, num_experts=8)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=32, num_experts=8, num_experts_per_tok=2)),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(FAMILIES), default="mixtral")
    p.add_argument("--pretrained", default=None, help="a local transformers checkpoint instead of a random model")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--keep", type=int, default=4, help="experts kept per layer by pruning")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--save", default=None, help="directory for save_pretrained (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0)
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


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Returns the losses along the way."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = build_model(args).float()
    vocab = model.config.vocab_size
    corpus = torch.randint(0, vocab, (8, 4, 24))  # 8 batches of 4 sequences; repeated each epoch
    model.eval()
    with torch.no_grad():
        before = model(input_ids=corpus[0]).logits
        to_flexmoe(model, aux_loss="gshard", aux_loss_weight=0.01)
        after = model(input_ids=corpus[0]).logits
    difference = float((before - after).abs().max())
    print(f"converted {len(flexmoe_layers(model))} MoE blocks; max |logit difference| {difference:.2e}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)  # after converting: new Parameter objects
    model.train()
    losses = {}
    for step in range(args.steps):
        loss = lm_loss(model, corpus[step % len(corpus)])
        (loss + flexmoe_aux_loss(model)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.setdefault("first", float(loss.detach()))
    model.eval()
    with torch.no_grad():
        losses["trained"] = sum(float(lm_loss(model, b)) for b in corpus) / len(corpus)
    print(f"train loss {losses['first']:.3f} -> {losses['trained']:.3f} after {args.steps} steps")

    usage = expert_usage(model, [{"input_ids": b} for b in corpus])
    pruned = prune_experts(model, usage.top_experts(args.keep))
    with torch.no_grad():
        losses["pruned"] = sum(float(lm_loss(pruned, b)) for b in corpus) / len(corpus)
    print(f"pruned to {args.keep} experts per layer {pruned.pruning_report}: loss {losses['pruned']:.3f}")

    from_flexmoe(model)
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        directory = args.save or tmp
        model.save_pretrained(directory)
        reloaded = type(model).from_pretrained(directory).eval()
        difference = float((reloaded(input_ids=corpus[0]).logits - model(input_ids=corpus[0]).logits).abs().max())
    print(f"saved in transformers' format and reloaded: max |logit difference| {difference:.2e}")
    losses["reload_difference"] = difference
    return losses


if __name__ == "__main__":
    main()
