"""One task of a task-routed transformers MoE model as a dense transformers model of the matching family.

A task-routed MoE block sends every token of a task to the same top-k experts with the same gate
weights, so for that task it is one gated MLP of width ``k * expert width``: the k experts' gate and
up projections side by side, their down projections scaled by the task's gates
(:func:`flexmoe.task.extract.dense_block_for_task`). For a Mixtral that is exactly a Mistral MLP,
for a Qwen3-MoE a Qwen3 MLP; attention, norms and embeddings are copied. The result is a plain
transformers model: ``save_pretrained`` writes a checkpoint that ``AutoModelForCausalLM.from_pretrained``
loads without flexmoe.

    dense = export_task_model(model, task_id=1)   # model: to_flexmoe(..., granularity="task")
    dense.save_pretrained("task1")                # a MistralForCausalLM checkpoint
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from flexmoe.integrations.transformers import FlexMoEBlock
from flexmoe.layer import MoELayer
from flexmoe.task.extract import dense_block_for_task

# MoE block -> transformers' dense config class whose decoder layer is the same but for the MLP.
DENSE_FAMILIES = {
    "MixtralSparseMoeBlock": "MistralConfig",
    "Qwen3MoeSparseMoeBlock": "Qwen3Config",
}
# Why the other converted families have no dense export.
NOT_EXPORTABLE = {
    "Qwen2MoeSparseMoeBlock": (
        "its shared expert is scaled per token by sigmoid(shared_expert_gate(x)), which is not a constant and "
        "does not fold into a dense Qwen2 MLP"
    ),
    "OlmoeSparseMoeBlock": (
        "OLMoE normalises before attention and MLP (pre-norm) with q/k norms over all heads; transformers' dense "
        "OLMo2 normalises their outputs (post-norm), so no dense family computes the same function"
    ),
    "DeepseekV3MoE": "a dense DeepSeek-V3 export (first_k_dense_replace = every layer) is not implemented",
    "SwitchTransformersSparseMLP": "Switch routes with a per-sequence capacity; a dense T5 export is not implemented",
}


def _check_block(name: str, flex: FlexMoEBlock) -> None:
    """Raise ValueError naming what of this converted block does not fold into a dense MLP."""
    kind, layer = flex.original_class, flex.moe
    if kind in NOT_EXPORTABLE:
        raise ValueError(f"{name} ({kind}) cannot be exported as a dense model: {NOT_EXPORTABLE[kind]}")
    if not isinstance(layer, MoELayer):
        raise ValueError(f"{name} holds a {type(layer).__name__}, not a MoELayer: export the task-routed model itself")
    if layer.config.granularity != "task":
        raise ValueError(
            f"{name} is {layer.config.granularity}-routed: its experts depend on the input, so it does not fold into "
            "one dense MLP; export needs every MoE block task-routed (to_flexmoe(model, granularity='task', ...)), "
            "or use flexmoe.extract_task for a model that keeps token-routed blocks"
        )
    if layer.layout.world_size > 1:
        raise ValueError(f"{name} holds an expert-parallel shard: gather it (from_flexmoe, to_flexmoe) first")
    if layer.shared_experts is not None:
        raise ValueError(f"{name} has shared experts, which the {DENSE_FAMILIES[kind]} MLP does not hold")


def _dense_mlp_widths(model: nn.Module) -> dict[str, int]:
    """Width of every dense gate/up/down MLP outside the MoE blocks (e.g. Qwen3-MoE's ``mlp_only_layers``)."""
    return {
        name: module.gate_proj.out_features
        for name, module in model.named_modules()
        if not isinstance(module, FlexMoEBlock) and isinstance(getattr(module, "gate_proj", None), nn.Linear)
    }


def dense_config(moe_config: object, block_class: str, intermediate_size: int) -> object:
    """transformers' dense config matching ``moe_config`` (a Mixtral / Qwen3-MoE config) with MLPs of
    ``intermediate_size``: every field the dense config has is copied, the MoE fields are dropped."""
    import transformers

    config_class = getattr(transformers, DENSE_FAMILIES[block_class])
    skip = {"architectures", "transformers_version", "intermediate_size"}
    kwargs = {
        f.name: copy.deepcopy(getattr(moe_config, f.name))
        for f in dataclasses.fields(config_class)
        if f.name not in skip and hasattr(moe_config, f.name)
    }
    if block_class == "Qwen3MoeSparseMoeBlock":
        # Qwen3-MoE applies its sliding window (if any) to every layer; dense Qwen3 asks per layer.
        kwargs["head_dim"] = getattr(moe_config, "head_dim", None) or (
            moe_config.hidden_size // moe_config.num_attention_heads
        )
        layer_type = "full_attention" if moe_config.sliding_window is None else "sliding_attention"
        kwargs["layer_types"] = [layer_type] * moe_config.num_hidden_layers
    return config_class(intermediate_size=intermediate_size, **kwargs)


@torch.no_grad()
def export_task_model(model: nn.Module, task_id: int) -> nn.Module:
    """The dense transformers model computing ``model`` for task ``task_id``.

    model: a transformers causal LM converted with ``to_flexmoe(model, granularity="task",
    num_tasks=N)`` (every MoE block task-routed). Returns a new model of the dense family
    (Mixtral -> ``MistralForCausalLM``, Qwen3-MoE -> ``Qwen3ForCausalLM``) whose MLPs have
    ``intermediate_size = top_k * expert width``, in ``model``'s dtype and device, in eval mode,
    sharing no tensor with ``model``. Its logits equal ``model``'s under
    ``route_tasks(model, task_id)`` (up to float rounding of the folded gates).

    Raises ValueError naming the block that does not fold: token-routed blocks, families without a
    matching dense model (Qwen2-MoE's sigmoid-gated shared expert, OLMoE's pre-norm attention),
    dense MLP layers of another width than the folded blocks, expert-parallel shards.
    """
    import transformers
    from transformers.initialization import no_init_weights

    if isinstance(task_id, bool) or not isinstance(task_id, int):
        raise TypeError(f"task_id must be an int, got {task_id!r}")
    blocks = {name: module for name, module in model.named_modules() if isinstance(module, FlexMoEBlock)}
    if not blocks:
        raise ValueError(f"model {type(model).__name__} has no FlexMoEBlock: convert it with to_flexmoe first")
    for name, flex in blocks.items():
        _check_block(name, flex)
    kinds = {flex.original_class for flex in blocks.values()}
    if len(kinds) > 1:
        raise ValueError(f"model mixes MoE block types {sorted(kinds)}; export needs one family")
    folded = {name: dense_block_for_task(flex.moe, task_id) for name, flex in blocks.items()}
    widths = {name: block.hidden_dim for name, block in folded.items()} | _dense_mlp_widths(model)
    if len(set(widths.values())) > 1:
        listing = ", ".join(f"{name}: {width}" for name, width in widths.items())
        raise ValueError(
            "a dense transformers model has one MLP width (intermediate_size), but the folded task blocks "
            f"(top_k x expert width) and the dense MLP layers differ: {listing}"
        )
    (kind,) = kinds
    config = dense_config(model.config, kind, next(iter(widths.values())))
    reference = next(iter(folded.values())).w1
    state = {
        key: value
        for key, value in model.state_dict().items()
        if not any(key.startswith(f"{name}.") for name in blocks)
    }
    for name, block in folded.items():
        state[f"{name}.gate_proj.weight"] = block.w1.T
        state[f"{name}.up_proj.weight"] = block.w3.T
        state[f"{name}.down_proj.weight"] = block.w2.T
    # Every parameter is loaded below (strict): no random initialisation, built in place.
    with no_init_weights(), torch.device(reference.device):
        dense = transformers.AutoModelForCausalLM.from_config(config, dtype=reference.dtype)
    dense.load_state_dict(state, strict=True)
    dense.generation_config = copy.deepcopy(model.generation_config)
    return dense.eval()
