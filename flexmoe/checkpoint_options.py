"""What a checkpoint was saved with: each MoE layer's options and the optimizer's class.

Weights and optimizer state fit a model of the same shapes whatever its routing options, so a
checkpoint loads into a model with another top-k, activation or granularity without a shape
error, and Adam's state into SGD (which has none to receive) without any: a wrong model, or a
wrong optimizer, and no error. :func:`describe` records what changes the computation in
``flexmoe.json`` beside the checkpoint; :func:`check_description` compares it on load.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Literal

import torch
from torch import nn

from flexmoe.config import MoEConfig

DESCRIPTION_FILE = "flexmoe.json"
OptionsMismatch = Literal["error", "warn"]
OPTIONS_MISMATCH = ("error", "warn")

# Options that change neither the layer's outputs nor what its weights mean: a fine-tune or an
# evaluation may change them freely.
_FREE_OPTIONS = frozenset(
    {"check_finite", "expert_kernel", "aux_loss", "aux_loss_weight", "z_loss", "aux_loss_in_backward", "gate_noise"}
    | {"balance_update_rate"}
)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile


def _json_value(value: Any) -> Any:
    """A JSON value for an option (a callable activation: its qualified name)."""
    if callable(value):
        return f"callable {getattr(value, '__qualname__', type(value).__qualname__)}"
    return value


def _layer_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def describe(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """``{"layers": {layer name: {option: value}}, "optimizer": class name or None}`` for every
    MoE layer of ``model`` (names without DDP's or torch.compile's wrapper prefixes)."""
    layers = {}
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if isinstance(config, MoEConfig):
            layers[_layer_name(name)] = {
                field.name: _json_value(getattr(config, field.name))
                for field in dataclasses.fields(config)
                if field.name not in _FREE_OPTIONS
            }
    return {"layers": layers, "optimizer": None if optimizer is None else _algorithm(optimizer)}


def _algorithm(optimizer: torch.optim.Optimizer) -> str:
    """The class name of the optimizer that holds the state, inside wrappers (accelerate's
    ``AcceleratedOptimizer`` holds an ``AdamW`` as ``.optimizer``)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return type(optimizer).__name__


def check_options_mismatch(options_mismatch: object) -> OptionsMismatch:
    if options_mismatch not in OPTIONS_MISMATCH:
        raise ValueError(f"options_mismatch must be one of {OPTIONS_MISMATCH}, got {options_mismatch!r}")
    return options_mismatch


def check_description(
    directory: object, saved: dict[str, Any], current: dict[str, Any], options_mismatch: OptionsMismatch
) -> None:
    """Raise ValueError (``options_mismatch="error"``) or warn (``"warn"``) when the MoE layers
    of ``current`` (:func:`describe` of the model loaded into) have other options than
    ``saved``; raise ValueError when the optimizer is of another class. Layers present on one side only are the
    state-dict key check's to report."""
    differences = [
        f"{layer}.{option}: {value!r} (saved) vs {current['layers'][layer].get(option)!r} (model)"
        for layer, options in saved.get("layers", {}).items()
        if layer in current["layers"]
        for option, value in options.items()
        if current["layers"][layer].get(option, value) != value
    ]
    saved_optimizer, optimizer = saved.get("optimizer"), current["optimizer"]
    if optimizer is not None and saved_optimizer is not None and optimizer != saved_optimizer:
        # One optimizer's state cannot fill another's: refused whatever options_mismatch says.
        raise ValueError(
            f"checkpoint {directory} holds the optimizer state of {saved_optimizer}; the optimizer is a {optimizer}: "
            f"pass a {saved_optimizer}, or optimizer=None to load the model alone"
        )
    if not differences:
        return
    problem = (
        f"checkpoint {directory} does not fit the model: it was saved with other MoE layer options: "
        f"{'; '.join(differences)}: build the model with the saved options, or pass options_mismatch='warn' to load "
        "the weights anyway"
    )
    if options_mismatch == "error":
        raise ValueError(problem)
    warnings.warn(problem, stacklevel=3)
