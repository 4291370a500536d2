"""Run transformers' MoE models on flexmoe layers, and put them back.

``to_flexmoe(model)`` replaces, in place, every sparse MoE block of a transformers model
(Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, Switch Transformers) with a
:class:`FlexMoEBlock` whose :class:`~flexmoe.MoELayer` holds the same weights: the router
weight is the same tensor; the fused ``gate_up_proj`` / ``down_proj`` expert weights are
viewed as flexmoe's ``w1``/``w3``/``w2`` and, by default, copied once into flexmoe's
contiguous layout, which runs faster (``share_storage=True`` keeps the views); Switch's
per-expert modules are stacked. ``from_flexmoe(model)`` rebuilds the original blocks from
the (possibly trained) flexmoe weights, so ``save_pretrained`` / ``from_pretrained`` keep
the original format.

Expert parallelism: under ``torch.distributed`` with ``group=`` a process group or a
``DeviceMesh`` (as for :class:`~flexmoe.MoELayer`), every rank converts the same model (built
from the same seed or checkpoint) and keeps only its shard of each layer's experts
(``layer.layout``); ``from_flexmoe`` gathers them back on every rank.

Routing semantics matched per family (read from transformers 5.x):
  * Mixtral: softmax, top-k, renormalised; training jitter multiplies the block input.
  * Qwen2-MoE / Qwen3-MoE / OLMoE: softmax, top-k, renormalised when ``norm_topk_prob``;
    Qwen2-MoE adds one shared expert scaled by ``sigmoid(shared_expert_gate(x))``.
  * DeepSeek-V3: sigmoid scores, ``e_score_correction_bias`` for the choice only (flexmoe's
    loss-free balance bias), group-limited top-k (``n_group``, ``topk_group``), renormalised
    when ``norm_topk_prob``, times ``routed_scaling_factor``, plus ``n_shared_experts``.
  * Switch Transformers: top-1 softmax probability (not renormalised), a fixed
    ``expert_capacity`` per expert and per sequence, first-come; dropped tokens output 0.

Known differences: flexmoe computes router scores in float32 (float64 for float64 models)
where some families round the scores to float32 or to the model dtype first; Switch's router
jitter and expert dropout (training only) are not reproduced.

Balance losses: a converted block reports its router logits where transformers' output recorder
looks for them (a ``router_logits`` child of the original router's class), so
``output_router_logits=True`` gives the family's own ``aux_loss`` and adds it to the loss as the
original model does (Trainer included); Switch blocks, routed per sequence, do not report them.
Alternatively set flexmoe's own loss (``to_flexmoe(model, aux_loss="gshard")``): its gradient
then flows through the block output (``MoEConfig.aux_loss_in_backward``) and
:func:`flexmoe_aux_loss` reads its value. Enabling both adds both.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from flexmoe.config import MoEConfig
from flexmoe.distributed.ddp import exclude_experts_from_ddp
from flexmoe.distributed.placements import expert_hidden_axes, shard_like
from flexmoe.integrations.task_routing import layer_granularities, task_embedding_state
from flexmoe.layer import MoELayer
from flexmoe.parallel import HIDDEN_AXIS, SINGLE_PROCESS, ParallelConfig, ParallelGroups
from flexmoe.parallel.config import check_parallel_config
from flexmoe.parallel.data_parallel import non_expert_parameters
from flexmoe.parallel.expert_parallel import gather_shards
from flexmoe.parallel.groups import resolve_groups

SUPPORTED_BLOCKS = (
    "MixtralSparseMoeBlock",
    "Qwen2MoeSparseMoeBlock",
    "Qwen3MoeSparseMoeBlock",
    "OlmoeSparseMoeBlock",
    "DeepseekV3MoE",
    "SwitchTransformersSparseMLP",
)
_BUILTIN_ACTIVATIONS = ("silu", "gelu", "relu")


@dataclass
class Conversion:
    """How one transformers block maps to a MoELayer: its config, the layer's state (views of the
    block's tensors), and what the wrapper does around the layer."""

    config: MoEConfig
    state: dict[str, torch.Tensor]
    input_jitter: float = 0.0
    per_sequence: bool = False


class FlexMoEBlock(nn.Module):
    """A transformers MoE block running on a flexmoe :class:`~flexmoe.MoELayer` (``self.moe``).

    hidden_states: [batch, seq, hidden] -> [batch, seq, hidden]. Keeps the original block's
    structure (on the meta device, no memory) so :func:`from_flexmoe` can rebuild it.
    """

    def __init__(
        self, moe: MoELayer, original: nn.Module, input_jitter: float, per_sequence: bool, original_config: MoEConfig
    ) -> None:
        super().__init__()
        self.moe = moe
        # The config that reproduces the original block (before to_flexmoe's options): from_flexmoe
        # checks the layer still has its structure.
        self.original_config = original_config
        self.input_jitter = input_jitter
        self.per_sequence = per_sequence
        self._original = (original,)  # a tuple: not a submodule, not in the state dict
        self.router_logits = None if per_sequence else _router_logits_reporter(getattr(original, "gate", None))

    @property
    def original_class(self) -> str:
        return type(self._original[0]).__name__

    def extra_repr(self) -> str:
        return f"from={self.original_class}, per_sequence={self.per_sequence}"

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.training and self.input_jitter > 0:
            # Mixtral's jitter scales the whole block input (router and experts) in training.
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.input_jitter, 1.0 + self.input_jitter)
            hidden_states = hidden_states * noise
        if not self.per_sequence:
            out = self.moe(hidden_states)
            if self.router_logits is not None and self.router_logits._forward_hooks:
                # transformers' output recorder hooks it: give it this call's logits (the router is
                # cheap next to the experts; the layer's own are not kept).
                self.router_logits(self.moe.route_scores(hidden_states.reshape(-1, hidden_states.shape[-1]))[0])
            return out
        # Switch counts expert capacity per sequence: route each sequence on its own
        # (moe.aux_loss: the mean over sequences; moe.stats: the last sequence).
        outputs, aux_losses = [], []
        for sequence in hidden_states:
            outputs.append(self.moe(sequence))
            aux_losses.append(self.moe.aux_loss)
        self.moe.aux_loss = torch.stack(aux_losses).mean()
        return torch.stack(outputs)


class _RouterLogits(nn.Module):
    """Reports router logits ``[tokens, num_experts]`` to forward hooks as ``(logits, None, None)``,
    the first output of transformers' routers (what ``OutputRecorder(..., index=0)`` records)."""

    def forward(self, logits: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return logits, None, None

    def __reduce__(self) -> tuple:
        # The class is made at run time (not importable): pickle the router class it stands for.
        return _router_logits_reporter_for, (type(self).__bases__[1],)


def _router_logits_reporter(gate: nn.Module | None) -> nn.Module | None:
    """A parameter-free :class:`_RouterLogits` that is also an instance of ``gate``'s class, so the
    output recorder of the model (which matches modules by router class) hooks it; None without
    a gate module."""
    return _router_logits_reporter_for(type(gate)) if isinstance(gate, nn.Module) else None


def _router_logits_reporter_for(gate_class: type) -> nn.Module:
    kind = type(f"RouterLogits{gate_class.__name__}", (_RouterLogits, gate_class), {})
    reporter = kind.__new__(kind)
    nn.Module.__init__(reporter)  # not the router's own __init__: no weights, no config
    return reporter


def _activation(name: object, module_act: Callable) -> str | Callable:
    return name if name in _BUILTIN_ACTIVATIONS else module_act


def _fused_experts_state(experts: nn.Module) -> dict[str, torch.Tensor]:
    """Views of transformers' fused experts (gate_up_proj [E, 2I, M], down_proj [E, M, I]) as
    flexmoe's w1/w3 [E, M, I] and w2 [E, I, M]. No copy."""
    for flag, expected in (
        ("has_bias", False),
        ("has_gate", True),
        ("is_transposed", False),
        ("is_concatenated", True),
    ):
        if getattr(experts, flag, expected) != expected:
            raise ValueError(f"{type(experts).__name__} with {flag}={not expected} is not supported")
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    hidden = gate_up.shape[1] // 2
    return {
        "experts.w1": gate_up[:, :hidden].transpose(1, 2),
        "experts.w3": gate_up[:, hidden:].transpose(1, 2),
        "experts.w2": down.transpose(1, 2),
    }


def _contiguous_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state in flexmoe's row-major layout. Gated experts' w1 and w3 become the two halves of
    one ``[E, M, 2I]`` tensor (transformers' fused gate_up_proj layout, transposed), so inference
    runs both in one GEMM (:meth:`flexmoe.experts.FFNExperts.fused_gate_up`)."""
    copied = {key: value.contiguous() for key, value in state.items() if key not in ("experts.w1", "experts.w3")}
    if "experts.w3" not in state:
        copied["experts.w1"] = state["experts.w1"].contiguous()
        return copied
    w1, w3 = state["experts.w1"], state["experts.w3"]
    gate_up = torch.cat([w1, w3], dim=2)
    copied["experts.w1"], copied["experts.w3"] = gate_up[..., : w1.shape[2]], gate_up[..., w1.shape[2] :]
    return copied


def _fused_experts_export(experts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """flexmoe's global w1/w3 [E, M, I] and w2 [E, I, M] as transformers' fused tensors."""
    gate_up = torch.cat([experts["w1"].transpose(1, 2), experts["w3"].transpose(1, 2)], dim=1)
    return {"experts.gate_up_proj": gate_up, "experts.down_proj": experts["w2"].transpose(1, 2).contiguous()}


def _mlp_state(mlp: nn.Module) -> dict[str, torch.Tensor]:
    """A gate/up/down MLP (nn.Linear weights [out, in]) as one shared FFN expert [1, in, out]."""
    return {
        f"shared_experts.ffn.{ours}": getattr(mlp, theirs).weight.detach().T.unsqueeze(0)
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))
    }


def _mlp_export(layer: MoELayer, prefix: str) -> dict[str, torch.Tensor]:
    ffn = layer.shared_experts.ffn
    return {
        f"{prefix}.{theirs}.weight": getattr(ffn, ours).detach()[0].T.contiguous()
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))
    }


def _fused_config(block: nn.Module, **options) -> dict:
    experts, gate = block.experts, block.gate
    return dict(
        model_dim=experts.hidden_dim,
        num_experts=experts.num_experts,
        hidden_dim=experts.intermediate_dim,
        top_k=gate.top_k,
        activation=_activation(experts.config.hidden_act, experts.act_fn),
        bias=False,
        gated=True,
        aux_loss=None,
        **options,
    )


def _describe(block: nn.Module) -> Conversion:
    """Conversion of one supported block (see the module docstring for the semantics)."""
    kind = type(block).__name__
    if kind == "MixtralSparseMoeBlock":
        config = MoEConfig(**_fused_config(block, normalize_gate=True))
        state = {"router.weight": block.gate.weight.detach(), **_fused_experts_state(block.experts)}
        return Conversion(config, state, input_jitter=float(block.jitter_noise))
    if kind in ("Qwen3MoeSparseMoeBlock", "OlmoeSparseMoeBlock"):
        config = MoEConfig(**_fused_config(block, normalize_gate=bool(block.gate.norm_topk_prob)))
        return Conversion(config, {"router.weight": block.gate.weight.detach(), **_fused_experts_state(block.experts)})
    if kind == "Qwen2MoeSparseMoeBlock":
        shared = block.shared_expert
        config = MoEConfig(
            **_fused_config(
                block,
                normalize_gate=bool(block.gate.norm_topk_prob),
                num_shared_experts=1,
                shared_hidden_dim=shared.gate_proj.out_features,
                shared_expert_gate=True,
            )
        )
        state = {
            "router.weight": block.gate.weight.detach(),
            **_fused_experts_state(block.experts),
            **_mlp_state(shared),
            "shared_experts.gate.weight": block.shared_expert_gate.weight.detach(),
        }
        return Conversion(config, state)
    if kind == "DeepseekV3MoE":
        gate, num_shared = block.gate, block.config.n_shared_experts
        config = MoEConfig(
            **_fused_config(
                block,
                score_function="sigmoid",
                normalize_gate=bool(gate.norm_topk_prob),
                route_scale=float(gate.routed_scaling_factor),
                num_groups=gate.num_group,
                top_groups=gate.topk_group,
                loss_free_balance=True,
                num_shared_experts=num_shared,
                shared_hidden_dim=block.shared_experts.gate_proj.out_features // num_shared,
            )
        )
        state = {
            "router.weight": gate.weight.detach(),
            "load_balancer.bias": gate.e_score_correction_bias.detach(),
            **_fused_experts_state(block.experts),
            **_mlp_state(block.shared_experts),
        }
        return Conversion(config, state)
    if kind == "SwitchTransformersSparseMLP":
        router = block.router
        if router.classifier.bias is not None:
            raise ValueError("SwitchTransformersSparseMLP with router_bias=True is not supported")
        if router.jitter_noise > 0:
            warnings.warn(
                "Switch router jitter (training only) is not reproduced on flexmoe layers", UserWarning, stacklevel=3
            )
        experts = [block.experts[f"expert_{e}"] for e in range(router.num_experts)]
        config = MoEConfig(
            model_dim=router.classifier.in_features,
            num_experts=router.num_experts,
            hidden_dim=experts[0].wi.out_features,
            top_k=1,
            normalize_gate=False,
            expert_capacity=router.expert_capacity,
            activation=experts[0].act,
            bias=False,
            aux_loss=None,
        )
        state = {
            "router.weight": router.classifier.weight.detach(),
            # Separate expert modules: stacked (a copy; from_flexmoe splits them again).
            "experts.w1": torch.stack([e.wi.weight.detach().T for e in experts]),
            "experts.w2": torch.stack([e.wo.weight.detach().T for e in experts]),
        }
        return Conversion(config, state, per_sequence=True)
    raise ValueError(f"unsupported MoE block {kind}; supported: {SUPPORTED_BLOCKS}")


def _global_expert_weights(layer: MoELayer) -> dict[str, torch.Tensor]:
    """The layer's expert weights of all ``num_experts`` experts, by name (``w1`` [E, M, I]...).

    A sharded layer all-gathers every rank's shard over its group (collective: every rank of
    the group calls it): its DTensor experts' ``full_tensor``.
    """
    local = {name: param.detach() for name, param in layer.experts.expert_parameters().items()}
    if layer.groups is None or layer.layout.world_size == 1:
        return local
    if all(isinstance(param, DTensor) for param in local.values()):
        return {name: param.full_tensor() for name, param in local.items()}
    num_experts, group = layer.config.num_experts, layer.groups.group
    return {name: gather_shards(shard, HIDDEN_AXIS[name], num_experts, group) for name, shard in local.items()}


def _export(block: FlexMoEBlock) -> dict[str, torch.Tensor]:
    """The original block's state dict, built from the flexmoe layer's current weights
    (gathered from every rank when the layer is sharded)."""
    layer, kind = block.moe, block.original_class
    experts = _global_expert_weights(layer)
    if kind == "SwitchTransformersSparseMLP":
        state = {"router.classifier.weight": layer.router.weight.detach()}
        for e in range(layer.config.num_experts):
            state[f"experts.expert_{e}.wi.weight"] = experts["w1"][e].T.contiguous()
            state[f"experts.expert_{e}.wo.weight"] = experts["w2"][e].T.contiguous()
        return state
    state = {"gate.weight": layer.router.weight.detach(), **_fused_experts_export(experts)}
    if kind == "Qwen2MoeSparseMoeBlock":
        state.update(_mlp_export(layer, "shared_expert"))
        state["shared_expert_gate.weight"] = layer.shared_experts.gate.weight.detach()
    elif kind == "DeepseekV3MoE":
        state.update(_mlp_export(layer, "shared_experts"))
        state["gate.e_score_correction_bias"] = layer.load_balancer.bias.detach()
    return state


def _materialize_meta_buffers(layer: nn.Module, like: torch.Tensor) -> None:
    # Non-persistent buffers (not in the state we assign) are still on meta: give them zeros.
    for module in layer.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.zeros(buffer.shape, dtype=like.dtype, device=like.device)


def _build_layer(conversion: Conversion, groups: ParallelGroups | None, parallel: ParallelConfig) -> MoELayer:
    """A MoELayer holding the conversion's weights: all of them (single process), or this rank's
    shard of the experts and every replicated tensor (a group)."""
    like = conversion.state["router.weight"]
    if groups is None:
        # Built on meta (no memory, no initialisation), then given the block's tensors.
        with torch.device("meta"):
            layer = MoELayer(conversion.config, group=SINGLE_PROCESS, parallel=parallel)
        layer.load_state_dict(conversion.state, strict=True, assign=True)
        _materialize_meta_buffers(layer, like)
    else:
        layer = _build_sharded_layer(conversion, groups, parallel, like)
    layer.aux_loss = torch.zeros((), dtype=like.dtype, device=like.device)
    return layer.train(False)


def _build_sharded_layer(
    conversion: Conversion, groups: ParallelGroups, parallel: ParallelConfig, like: torch.Tensor
) -> MoELayer:
    """This rank's layer of a sharded conversion (collective over ``groups``).

    A distributed MoELayer cannot be built on meta (its construction runs collectives on real
    tensors), so it is built with its own (1 / W-sized) expert initialisation, then given this
    rank's clone of each global expert tensor (the global tensor can be freed) and the replicated
    tensors, which are broadcast from the group's first rank as MoELayer's construction does.
    """
    layer = MoELayer(conversion.config, group=groups, parallel=parallel).to(device=like.device, dtype=like.dtype)
    layout = layer.layout
    axes = {f"experts.{name}": axis for name, axis in expert_hidden_axes(layer.experts).items()}
    # Expert tensors: a contiguous copy of this rank's part (nothing keeps the global tensor),
    # placed as the layer's DTensor experts.
    state = {
        key: shard_like(
            layout.shard(value, axes[key]).clone(memory_format=torch.contiguous_format), layer.get_parameter(key)
        )
        if key in axes
        else value.contiguous()
        for key, value in conversion.state.items()
    }
    layer.load_state_dict(state, strict=True, assign=True)
    replicated = [param for _, param in non_expert_parameters(layer)] + list(layer.buffers())
    groups.broadcast_from_first_rank(replicated)
    return layer


def _find_blocks(module: nn.Module, wanted: Callable[[nn.Module], bool]) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, block) for every block ``wanted`` selects, not descending into them."""
    found = []
    for name, child in module.named_children():
        if wanted(child):
            found.append((module, name, child))
        else:
            found.extend(_find_blocks(child, wanted))
    return found


def _is_moe_block(module: nn.Module) -> bool:
    if isinstance(module, (MoELayer, FlexMoEBlock)):
        return False
    return type(module).__name__ in SUPPORTED_BLOCKS or isinstance(getattr(module, "experts", None), nn.Module)


def to_flexmoe(
    model: nn.Module,
    *,
    share_storage: bool = False,
    group: dist.ProcessGroup | ParallelGroups | object | None = None,
    parallel: ParallelConfig | None = None,
    **options: object,
) -> nn.Module:
    """Replace every transformers MoE block of ``model`` in place by a :class:`FlexMoEBlock`
    holding the same weights. Returns ``model``.

    group: as :class:`~flexmoe.MoELayer`'s: a process group, a ``DeviceMesh`` (or a shared
    :class:`~flexmoe.parallel.ParallelGroups`) for expert-parallel layers, or None (or
    ``flexmoe.parallel.SINGLE_PROCESS``) for local layers holding every expert. With a group of
    W > 1 ranks the conversion is collective: every rank converts the same model (same weights;
    the layers' replicated tensors are broadcast from the group's first rank) and keeps its
    ``layout`` shard of each layer's experts (a copy, the global tensors are freed, so every
    rank stores 1 / W of the expert weights), as DTensors on the group's (or the given mesh's)
    expert-parallel dimension. ``model`` is marked for DistributedDataParallel
    (:func:`~flexmoe.distributed.exclude_experts_from_ddp`), so ``DistributedDataParallel(model)``
    and transformers' Trainer average the replicated parameters only (the gradient convention
    is in :mod:`flexmoe.parallel.expert_parallel`). Every rank must call the
    model the same number of times (Switch blocks: with the same number of sequences).
    parallel: the layers' :class:`~flexmoe.parallel.ParallelConfig` (defaults when None).

    share_storage: keep the fused expert weights as views of transformers' tensors (no copy,
    no extra memory even during conversion). By default they are copied once into flexmoe's
    contiguous ``[E, M, I]`` layout, one block at a time (the original is freed after): the
    transposed views make CPU GEMMs and gradient accumulation slower (one Mixtral block,
    hidden 512, 512 tokens, fwd+bwd, 1 thread: 1.4x the time of contiguous weights, measured once
    with an ad-hoc script).

    options: :class:`~flexmoe.MoEConfig` fields set on every converted layer after the
    family's own settings, e.g. ``aux_loss="gshard", aux_loss_weight=0.01`` or
    ``capacity_factor=1.25`` (by default the layers reproduce the original exactly: dropless,
    no aux loss; add :func:`flexmoe_aux_loss` to the loss when you enable one).
    ``granularity`` may differ per MoE block: a sequence of one per block or a callable
    ``block index -> granularity`` (e.g. token routing in the lower blocks, task routing in the
    upper ones; :func:`~flexmoe.integrations.task_routing.layer_granularities`). Task-routed
    blocks (``granularity="task", num_tasks=N``) keep the pretrained router and start with zero
    task embeddings: set them with :mod:`flexmoe.integrations.task_routing`
    (``initial_task_embeddings`` -> ``set_task_embeddings``) and pass task ids with ``route_tasks``.

    Raises ``ValueError`` naming any MoE block type that is not supported (nothing is converted
    then), when the model has no MoE block, and for ``share_storage=True`` with a process group
    (views would keep every expert alive on every rank). Build optimizers after
    converting: the flexmoe layers hold new Parameter objects (sharing storage with the old
    ones unless sharded).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    blocks = _find_blocks(model, _is_moe_block)
    unsupported = sorted({type(b).__name__ for _, _, b in blocks} - set(SUPPORTED_BLOCKS))
    if unsupported:
        raise ValueError(f"unsupported MoE block type(s) {unsupported}; supported: {SUPPORTED_BLOCKS}")
    if not blocks:
        raise ValueError(f"model {type(model).__name__} has no MoE block to convert; supported: {SUPPORTED_BLOCKS}")
    unknown = set(options) - {f.name for f in dataclasses.fields(MoEConfig)}
    if unknown:
        raise TypeError(f"options must be MoEConfig fields, got unknown {sorted(unknown)}")
    parallel = check_parallel_config(parallel)
    # One ParallelGroups for every layer: they share its sub-groups.
    groups = resolve_groups(group, parallel.local_world_size)
    if share_storage and groups is not None:
        raise ValueError(
            f"share_storage=True needs single-process layers (group=SINGLE_PROCESS): a layer on a process group "
            f"(here of {groups.world_size} ranks) keeps a copy of its shard of the experts; views would keep every "
            "expert alive on every rank"
        )
    granularities = layer_granularities(options.pop("granularity", "token"), len(blocks))
    for (parent, name, block), granularity in zip(blocks, granularities):
        conversion = _describe(block)
        original_config = conversion.config
        conversion.config = dataclasses.replace(original_config, granularity=granularity, **options)
        conversion.state.update(task_embedding_state(conversion.config, conversion.state["router.weight"]))
        if not share_storage and groups is None:  # a sharded layer copies its part only
            conversion.state = _contiguous_copy(conversion.state)
        layer = _build_layer(conversion, groups, parallel)
        flex = FlexMoEBlock(layer, block, conversion.input_jitter, conversion.per_sequence, original_config)
        flex.train(block.training)
        block.to("meta")  # the flexmoe layer holds the weights now; keep only the structure
        setattr(parent, name, flex)
    if groups is not None:
        exclude_experts_from_ddp(model)  # DDP (and the Trainer's) reads this from the root it wraps
    _reinstall_output_recorders(model)
    return model


def _reinstall_output_recorders(model: nn.Module) -> None:
    """transformers installs its output-recording hooks once per model, on the modules present at
    the first forward: let the next forward hook the converted blocks' router-logit reporters."""
    for module in model.modules():
        if getattr(module, "_output_capturing_hooks_installed", False):
            module._output_capturing_hooks_installed = False


# Fields that the original block's own config fixes: a layer that changed them (pruned by
# flexmoe.prune_experts, regrouped) no longer fits the transformers block.
_STRUCTURAL_FIELDS = ("num_experts", "num_groups", "top_groups", "num_shared_experts", "shared_expert_gate")


def _check_restorable(where: str, flex: FlexMoEBlock) -> None:
    """Raise ValueError if ``flex`` no longer holds a layer of the original block's structure."""
    layer, kind = flex.moe, flex.original_class
    if not isinstance(layer, MoELayer):
        raise ValueError(
            f"{where}: holds a {type(layer).__name__} (a sub-network from flexmoe.extract_task?), not a MoELayer; "
            f"it cannot go back into a {kind}: save it with flexmoe.save_subnetwork instead"
        )
    original = flex.original_config
    if layer.config.granularity != original.granularity:
        raise ValueError(
            f"{where}: the flexmoe layer is {layer.config.granularity}-routed, the original {kind} routes by "
            f"{original.granularity}: from_flexmoe would drop its routing; export one task as a dense model with "
            "flexmoe.integrations.export.export_task_model, or save the converted model with torch.save / safetensors"
        )
    changed = {
        field: (getattr(original, field), getattr(layer.config, field))
        for field in _STRUCTURAL_FIELDS
        if getattr(original, field) != getattr(layer.config, field)
    }
    if changed:
        details = ", ".join(f"{field} {before} -> {after}" for field, (before, after) in changed.items())
        raise ValueError(
            f"{where}: the flexmoe layer no longer fits the original {kind} ({details}; pruned with "
            "flexmoe.prune_experts?); from_flexmoe needs the converted model itself: prune a copy, and save "
            "the pruned model with torch.save / safetensors instead of save_pretrained"
        )


def from_flexmoe(model: nn.Module) -> nn.Module:
    """Put the original transformers blocks back, with the flexmoe layers' current weights
    (copied into the original layout). Returns ``model``; it saves with ``save_pretrained``.

    Layers sharded over a group (``to_flexmoe(..., group=...)``) are all-gathered: the call is
    collective, every rank of the group makes it, and every rank gets the whole model back (save
    it from one rank).

    Raises ValueError, before replacing anything, if a layer no longer fits its original block:
    pruned (``flexmoe.prune_experts``: fewer experts, groups changed) or extracted to a DenseFFN.
    """
    blocks = _find_blocks(model, lambda m: isinstance(m, FlexMoEBlock))
    if not blocks:
        raise ValueError(f"model {type(model).__name__} has no FlexMoEBlock (was to_flexmoe applied?)")
    for parent, name, flex in blocks:  # all checked before any block is replaced
        _check_restorable(f"{type(parent).__name__}.{name}", flex)
    for parent, name, flex in blocks:
        original = flex._original[0]
        original.load_state_dict(_export(flex), strict=True, assign=True)
        original.train(flex.training)
        setattr(parent, name, original)
    return model


def flexmoe_layers(model: nn.Module) -> list[MoELayer]:
    """The MoELayers of a converted model, in module order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def flexmoe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the converted layers' ``aux_loss`` from the last forward (scalar)."""
    losses = [layer.aux_loss for layer in flexmoe_layers(model)]
    return torch.stack(losses).sum() if losses else torch.zeros(())
