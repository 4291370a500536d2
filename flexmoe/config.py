"""Typed configuration of an MoE layer, validated at construction."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import InitVar, dataclass, fields
from typing import Literal

import torch

Activation = Literal["gelu", "relu", "silu"] | Callable[[torch.Tensor], torch.Tensor]
RouterKind = Literal["linear", "cosine"]
AuxLossKind = Literal["gshard", "load_importance"]
ExpertKernel = Literal["auto", "padded", "grouped", "per_expert"]

ACTIVATIONS = ("gelu", "relu", "silu")
ROUTERS = ("linear", "cosine")
AUX_LOSSES = ("gshard", "load_importance", None)
EXPERT_KERNELS = ("auto", "padded", "grouped", "per_expert")
GRANULARITIES = ("token", "sentence", "task")
Granularity = Literal["token", "sentence", "task"]
ScoreFunction = Literal["softmax", "sigmoid"]
SCORE_FUNCTIONS = ("softmax", "sigmoid")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_finite_nonneg(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


def check_top_k(top_k: object, num_experts: int, limit: str = "num_experts") -> int:
    """Validate a top-k value against the number of experts a token may choose from; returns it."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in 1..{limit} ({num_experts}), got {top_k!r}")
    return top_k


# A fixed capacity factor fits every token's choices at num_experts; padding studies go beyond
# it, up to this many times num_experts. Larger values are typos that would fail in the forward.
CAPACITY_FACTOR_LIMIT = 4


def check_capacity_factor(capacity_factor: object, num_experts: int | None = None) -> float:
    """Validate a capacity factor: finite, ``> 0`` fixed, ``0`` dropless, ``< 0`` capped dropless,
    and ``|capacity_factor| <= 4 * num_experts`` when ``num_experts`` is given (at
    ``num_experts`` every choice of every token fits; beyond, a factor only adds padding, and an
    absurd one such as ``1e300`` fails in the forward)."""
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
        raise TypeError(f"capacity_factor must be a float, got {type(capacity_factor).__name__}")
    if not math.isfinite(capacity_factor):
        raise ValueError(
            f"capacity_factor must be finite (> 0 fixed, 0 dropless, < 0 capped dropless), got {capacity_factor!r}"
        )
    limit = None if num_experts is None else CAPACITY_FACTOR_LIMIT * num_experts
    if limit is not None and abs(capacity_factor) > limit:
        raise ValueError(
            f"capacity_factor must be in -{limit}..{limit} ({CAPACITY_FACTOR_LIMIT} x num_experts): at num_experts "
            f"({num_experts}) every token's choices fit and a larger factor only adds padding; use 0 for dropless "
            f"routing, got {capacity_factor!r}"
        )
    return float(capacity_factor)


def check_activation(activation: object) -> None:
    """Validate an activation: a built-in name, or a callable that maps a tensor to one of the
    same shape (checked on a small tensor: a shape-changing one would fail deep in a forward)."""
    if not callable(activation):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS} or a callable, got {activation!r}")
        return
    probe = torch.linspace(-2.0, 2.0, 6).reshape(2, 3)
    try:
        with torch.no_grad():
            result = activation(probe)
    except Exception as error:
        raise ValueError(
            f"activation raised {type(error).__name__}: {error} (on a float32 tensor of shape (2, 3)); "
            f"pass one of {ACTIVATIONS} or an elementwise callable"
        ) from error
    shape = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
    if shape != (2, 3):
        raise ValueError(
            f"activation must be elementwise (a tensor in, a tensor of the same shape out), but it maps shape "
            f"(2, 3) to {shape}; pass one of {ACTIVATIONS} or a callable such as torch.nn.functional.silu"
        )


@dataclass(frozen=True)
class MoEConfig:
    """Everything that defines an :class:`~flexmoe.MoELayer`.

    Shapes: ``model_dim`` is the token width (input and output), ``hidden_dim`` the
    width inside each built-in FFN expert (optional when custom experts are given).

    Routing:
        top_k: experts per token, 1..num_experts (changeable per call).
        capacity_factor: ``> 0`` fixed capacity per expert
            ``top_k * ceil(factor * tokens / num_experts)``, overflowing choices are
            dropped (counted in ``layer.stats``); ``0`` dropless (capacity = the largest
            load any expert has this step); ``< 0`` dropless but capped at the capacity
            ``|factor|`` would give. Default 0: nothing is dropped unless asked for.
        router: ``"linear"`` (softmax over a linear gate, ``router.weight`` is
            ``[num_experts, model_dim]``) or ``"cosine"`` (SwinV2-MoE: projection,
            L2-normalised, cosine similarity with learned temperature).
        gate_noise: std of Gaussian noise added to the router logits in training.
        normalize_gate: renormalise the top-k gate weights to sum to 1.
        batch_prioritized_routing: on overflow keep the tokens with the highest
            top-1 score first instead of first-come.
        expert_capacity: a fixed number of slots per expert (Switch Transformers'
            ``expert_capacity``); overrides ``capacity_factor`` unless a call passes one.
        score_function: ``"softmax"`` over the experts, or ``"sigmoid"`` (DeepSeek-V3):
            independent scores, top-k on them, gates renormalised over the chosen k when
            ``normalize_gate``.
        route_scale: constant multiplying the gate weights (DeepSeek-V3's routed scaling factor).
        num_groups, top_groups: group-limited routing. The experts form ``num_groups`` equal
            contiguous groups; each token keeps its ``top_groups`` best groups (by the sum of
            each group's top-2 scores) and picks top-k inside them. With one group per node
            under expert parallelism a token reaches at most ``top_groups`` nodes.
            ``top_groups=None``: all groups.
        loss_free_balance: a per-expert bias buffer (``load_balancer.bias``) added to the
            scores for the top-k choice only (never to the gates); the training loop calls
            ``layer.update_load_balance_bias()`` after ``optimizer.step()``, which applies
            ``bias += balance_update_rate * sign(mean_load - load_e)`` with the loads counted
            in training forwards since the last update. Works with ``aux_loss=None``.
        balance_update_rate: the bias step per update (DeepSeek-V3 used 0.001).

    Losses (``layer.aux_loss`` = ``aux_loss_weight * balance + z_loss * z``):
        aux_loss: ``"gshard"``, ``"load_importance"`` or ``None``.
        aux_loss_weight: coefficient of the balance loss.
        z_loss: coefficient of the ST-MoE router z-loss (0 = off).
        aux_loss_in_backward: ``True``: the loss is attached to the layer output
            (:func:`flexmoe.ops.attach_aux_loss`), so any backward through the output adds its
            gradient (also under reentrant activation checkpointing) and ``layer.aux_loss`` is
            a detached value for logging (adding it to your loss changes the logged value,
            not the gradient). ``False``: ``layer.aux_loss`` carries the graph; add it to the
            loss yourself.

    Granularity (what one routing decision covers; see ``flexmoe.routing.granularity``):
        granularity: ``"token"`` (each token), ``"sentence"`` (one decision per sequence, from
            the mean of its non-padding tokens; input ``[batch, seq, model_dim]``) or
            ``"task"`` (one decision per task id, from a learned task embedding; pass
            ``task_ids`` to forward). Task layers usually want ``capacity_factor=0``:
            a single-task batch sends every token to the same k experts.
        num_tasks: size of the task embedding (required for ``"task"``).
        task_embedding_dim: width of the task embedding (default ``model_dim``).

    Shared experts (every token passes through them; output added to the routed output):
        num_shared_experts: dense FFN experts (same activation/bias/gated as the routed
            ones), stored merged as one FFN of width ``num_shared_experts * shared_hidden_dim``
            (their sum). Ordinary replicated parameters, never all-to-all'd.
        shared_hidden_dim: width of each shared expert (default ``hidden_dim``).
        shared_expert_gate: scale the shared output by ``sigmoid(x @ gate)`` per token
            (Qwen2-MoE's ``shared_expert_gate``).

    Experts:
        activation: ``"gelu"``, ``"relu"``, ``"silu"`` or a callable.
        bias: biases in the expert FFNs. gated: SwiGLU-style experts (``w3``).
        expert_kernel: ``"grouped"`` runs the built-in experts on exact token counts
            (tokens sorted by expert, ``grouped_mm``; no padded slots); ``"per_expert"`` on
            exact counts too, one plain GEMM pair per expert (any dtype); ``"padded"`` on the
            ``[experts, capacity, model_dim]`` buffer (``bmm``). ``"auto"``: on CPU,
            per_expert when the experts that got rows average at least ``PER_EXPERT_MIN_ROWS`` (where
            plain GEMMs beat CPU ``grouped_mm``), else grouped; on other devices grouped;
            per_expert where grouped cannot run (float64), padded for custom experts without a
            per-expert kernel. Under expert parallelism
            the exact-count path runs grouped or per_expert by the same rule (per_expert where
            grouped cannot run), and ``"padded"`` makes the padded blocks the default there.
            (``expert_layout``, its former name, is still accepted with a DeprecationWarning.)

    Checks:
        check_finite: raise on NaN/inf in the input (off by default: costs a sync).
    """

    model_dim: int
    num_experts: int
    hidden_dim: int | None = None
    top_k: int = 2
    capacity_factor: float = 0.0
    router: RouterKind = "linear"
    gate_noise: float = 0.0
    normalize_gate: bool = True
    batch_prioritized_routing: bool = False
    aux_loss: AuxLossKind | None = "gshard"
    aux_loss_weight: float = 0.01
    z_loss: float = 0.0
    aux_loss_in_backward: bool = True
    activation: Activation = "gelu"
    bias: bool = True
    gated: bool = False
    expert_kernel: ExpertKernel = "auto"
    cosine_proj_dim: int = 256
    granularity: Granularity = "token"
    num_tasks: int | None = None
    task_embedding_dim: int | None = None
    check_finite: bool = False
    expert_capacity: int | None = None
    score_function: ScoreFunction = "softmax"
    route_scale: float = 1.0
    num_groups: int = 1
    top_groups: int | None = None
    loss_free_balance: bool = False
    balance_update_rate: float = 1e-3
    num_shared_experts: int = 0
    shared_hidden_dim: int | None = None
    shared_expert_gate: bool = False

    @property
    def selectable_experts(self) -> int:
        """How many experts one token can choose from (all, or those of its ``top_groups`` groups)."""
        if self.top_groups is None:
            return self.num_experts
        return self.top_groups * (self.num_experts // self.num_groups)

    @property
    def router_input_dim(self) -> int:
        """Width of what the router sees: the task embedding for task routing, else tokens."""
        if self.granularity == "task":
            return self.task_embedding_dim or self.model_dim
        return self.model_dim

    @property
    def routing_config(self) -> RoutingConfig:
        """The routing options as a :class:`RoutingConfig`."""
        return _section_of(self, RoutingConfig)

    @property
    def experts_config(self) -> ExpertsConfig:
        """The routed experts' options as an :class:`ExpertsConfig`."""
        return _section_of(self, ExpertsConfig)

    @property
    def shared_experts_config(self) -> SharedExpertsConfig:
        """The shared experts' options as a :class:`SharedExpertsConfig`."""
        return _section_of(self, SharedExpertsConfig)

    # The former name of ``expert_kernel``: accepted at construction, with a DeprecationWarning.
    expert_layout: InitVar[ExpertKernel | None] = None

    def __post_init__(self, expert_layout: ExpertKernel | None) -> None:
        if expert_layout is not None:
            warnings.warn(
                "MoEConfig(expert_layout=...) is deprecated: pass expert_kernel=... (same values)",
                DeprecationWarning,
                stacklevel=3,
            )
            object.__setattr__(self, "expert_kernel", expert_layout)
        _check_positive_int("model_dim", self.model_dim)
        _check_positive_int("num_experts", self.num_experts)
        if self.hidden_dim is not None:
            _check_positive_int("hidden_dim", self.hidden_dim)
        check_top_k(self.top_k, self.num_experts)
        check_capacity_factor(self.capacity_factor, self.num_experts)
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
        _check_finite_nonneg("gate_noise", self.gate_noise)
        _check_finite_nonneg("aux_loss_weight", self.aux_loss_weight)
        _check_finite_nonneg("z_loss", self.z_loss)
        if self.aux_loss not in AUX_LOSSES:
            raise ValueError(f"aux_loss must be one of {AUX_LOSSES}, got {self.aux_loss!r}")
        check_activation(self.activation)
        if self.expert_kernel not in EXPERT_KERNELS:
            raise ValueError(f"expert_kernel must be one of {EXPERT_KERNELS}, got {self.expert_kernel!r}")
        _check_positive_int("cosine_proj_dim", self.cosine_proj_dim)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "task" and self.num_tasks is None:
            raise ValueError("num_tasks is required for granularity='task'")
        for name in ("num_tasks", "task_embedding_dim"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        self._check_routing_options()
        for name in (
            "normalize_gate",
            "batch_prioritized_routing",
            "bias",
            "gated",
            "check_finite",
            "loss_free_balance",
            "shared_expert_gate",
            "aux_loss_in_backward",
        ):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def _check_routing_options(self) -> None:
        if self.expert_capacity is not None:
            _check_positive_int("expert_capacity", self.expert_capacity)
        if self.score_function not in SCORE_FUNCTIONS:
            raise ValueError(f"score_function must be one of {SCORE_FUNCTIONS}, got {self.score_function!r}")
        _check_finite_nonneg("route_scale", self.route_scale)
        if self.route_scale == 0:  # every gate times 0: zero outputs, a router that learns nothing
            raise ValueError(f"route_scale must be finite and > 0 (1.0: gates as routed), got {self.route_scale!r}")
        _check_finite_nonneg("balance_update_rate", self.balance_update_rate)
        _check_positive_int("num_groups", self.num_groups)
        if self.num_experts % self.num_groups:
            raise ValueError(
                f"num_groups must divide num_experts ({self.num_experts}) into equal groups, got {self.num_groups}"
            )
        if self.top_groups is not None:
            _check_positive_int("top_groups", self.top_groups)
            if self.top_groups > self.num_groups:
                raise ValueError(f"top_groups must be in 1..num_groups ({self.num_groups}), got {self.top_groups}")
        check_top_k(self.top_k, self.selectable_experts, "experts in top_groups groups")
        if isinstance(self.num_shared_experts, bool) or not isinstance(self.num_shared_experts, int):
            raise ValueError(f"num_shared_experts must be an int >= 0, got {self.num_shared_experts!r}")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be an int >= 0, got {self.num_shared_experts!r}")
        if self.shared_hidden_dim is not None:
            _check_positive_int("shared_hidden_dim", self.shared_hidden_dim)
        if self.num_shared_experts and (self.shared_hidden_dim or self.hidden_dim) is None:
            raise ValueError("num_shared_experts > 0 needs shared_hidden_dim (or hidden_dim)")
        if self.shared_expert_gate is True and not self.num_shared_experts:
            raise ValueError("shared_expert_gate=True needs num_shared_experts > 0")


# --- the same configuration in sections --------------------------------------------------------
# MoEConfig is flat (one keyword per option, as MoELayer takes them); these sections group the
# same options by the part of the layer they configure. Field names and defaults are
# MoEConfig's (tests/test_config_sections.py checks they stay equal); values are validated when
# the sections are combined into a MoEConfig.


@dataclass(frozen=True)
class RoutingConfig:
    """The router's options (see :class:`MoEConfig` for each)."""

    top_k: int = 2
    capacity_factor: float = 0.0
    router: RouterKind = "linear"
    gate_noise: float = 0.0
    normalize_gate: bool = True
    batch_prioritized_routing: bool = False
    aux_loss: AuxLossKind | None = "gshard"
    aux_loss_weight: float = 0.01
    z_loss: float = 0.0
    aux_loss_in_backward: bool = True
    cosine_proj_dim: int = 256
    granularity: Granularity = "token"
    num_tasks: int | None = None
    task_embedding_dim: int | None = None
    expert_capacity: int | None = None
    score_function: ScoreFunction = "softmax"
    route_scale: float = 1.0
    num_groups: int = 1
    top_groups: int | None = None
    loss_free_balance: bool = False
    balance_update_rate: float = 1e-3


@dataclass(frozen=True)
class ExpertsConfig:
    """The routed experts' options (see :class:`MoEConfig` for each)."""

    hidden_dim: int | None = None
    activation: Activation = "gelu"
    bias: bool = True
    gated: bool = False
    expert_kernel: ExpertKernel = "auto"


@dataclass(frozen=True)
class SharedExpertsConfig:
    """The shared experts' options (see :class:`MoEConfig` for each)."""

    num_shared_experts: int = 0
    shared_hidden_dim: int | None = None
    shared_expert_gate: bool = False


SECTIONS: dict[str, type] = {"routing": RoutingConfig, "experts": ExpertsConfig, "shared_experts": SharedExpertsConfig}


def _section_fields(section: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(section))


def config_from_sections(
    model_dim: int,
    num_experts: int,
    *,
    routing: RoutingConfig | None = None,
    experts: ExpertsConfig | None = None,
    shared_experts: SharedExpertsConfig | None = None,
    **flat: object,
) -> MoEConfig:
    """A :class:`MoEConfig` from sections, plus any flat options the sections do not set
    (``check_finite``, or options of a section not given). An option given twice is a ValueError."""
    options: dict[str, object] = {}
    for name, value in (("routing", routing), ("experts", experts), ("shared_experts", shared_experts)):
        if value is None:
            continue
        if not isinstance(value, SECTIONS[name]):
            raise TypeError(f"{name} must be a {SECTIONS[name].__name__}, got {type(value).__name__}")
        section = {field: getattr(value, field) for field in _section_fields(SECTIONS[name])}
        twice = sorted(set(section) & set(flat))
        if twice:
            raise ValueError(f"{twice} given both flat and in {name}={SECTIONS[name].__name__}(...): give each once")
        options.update(section)
    return MoEConfig(model_dim=model_dim, num_experts=num_experts, **options, **flat)


def _section_of(config: MoEConfig, section: type):
    return section(**{name: getattr(config, name) for name in _section_fields(section)})
