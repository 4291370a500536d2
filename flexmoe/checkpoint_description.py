"""What a checkpoint holds, in ``flexmoe.json`` beside it: each MoE layer's options, the
optimizer's class, and the size and SHA-256 of every file.

Weights and optimizer state fit a model of the same shapes whatever its routing options, so a
checkpoint would load into a model with another top-k, activation or granularity without a shape
error: a wrong model and no error. DCP checks no checksums either, so flipped bytes, or a rank
file copied in from another save, would load silently. :func:`describe` records what changes the
computation and :func:`file_digests` the files; on load :func:`check_files` and
:func:`check_description` compare them.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from flexmoe.config import MoEConfig
from flexmoe.files import sha256_of

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


def file_digests(directory: Path) -> dict[str, dict[str, Any]]:
    """``{file name: {"bytes": size, "sha256": hex}}`` of every file in ``directory`` but the
    description itself."""
    return {
        path.name: {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != DESCRIPTION_FILE
    }


def read_description(directory: Path) -> dict[str, Any] | None:
    """The description of the checkpoint in ``directory``; None for one saved without."""
    path = directory / DESCRIPTION_FILE
    if not path.is_file():
        return None
    try:
        description = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        description = error
    if not isinstance(description, dict):
        raise ValueError(
            f"{path} is damaged (not a JSON object: {description}); restore the checkpoint from a copy or save it again"
        )
    return description


def check_files(directory: Path, files: dict[str, dict[str, Any]]) -> None:
    """ValueError naming the first file of ``files`` (:func:`file_digests` at save time) that is
    missing, of another size or of another SHA-256 in ``directory``."""
    fix = "restore the checkpoint from a copy or save it again"
    for name, saved in files.items():
        path = directory / name
        if not path.is_file():
            raise ValueError(f"checkpoint {directory}: {name} is missing; {fix}")
        size = path.stat().st_size
        if size != saved["bytes"]:
            raise ValueError(
                f"checkpoint {directory}: {name} is truncated or corrupted ({size} bytes, {saved['bytes']} "
                f"saved); {fix}"
            )
        if sha256_of(path) != saved["sha256"]:
            raise ValueError(
                f"checkpoint {directory}: {name} is corrupted (its SHA-256 differs from the one saved: damaged bytes, "
                f"or a file of another save); {fix}"
            )


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
