"""Name a model on the command line: an importable factory, its JSON kwargs, a checkpoint.

--model package.module:function   called with no arguments, or with --model-kwargs '{"k": v}'
--checkpoint weights.pt | weights.safetensors   a state_dict loaded strictly into the model
"""

from __future__ import annotations

import argparse
import importlib
import json
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

CHECKPOINT_SUFFIXES = (".pt", ".safetensors")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="importable factory, package.module:function")
    parser.add_argument("--model-kwargs", default="{}", help="JSON object of keyword arguments for the factory")
    parser.add_argument("--checkpoint", type=Path, help="state_dict file (.pt or .safetensors); else factory weights")
    parser.add_argument("--device", default="cpu", help="torch device to run on (cpu, cuda, cuda:1, ...)")


def import_factory(spec: str) -> Callable[..., nn.Module]:
    """``"package.module:function"`` -> the function (a dotted attribute path is allowed)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"--model must look like package.module:function, got {spec!r}")
    try:
        target = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--model: cannot import module {module_name!r}: {error}") from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"--model: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"--model: {spec!r} is not callable")
    return target


def parse_kwargs(text: str) -> dict:
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--model-kwargs must be a JSON object, got {text!r}: {error}") from error
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model-kwargs must be a JSON object, got {text!r}")
    return kwargs


def load_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """A state_dict from a ``.pt`` (``torch.save``; tensors only) or ``.safetensors`` file, on CPU."""
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"--checkpoint must end in one of {CHECKPOINT_SUFFIXES}, got {str(path)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
        # torch.load reports a cut-off zip as an OSError or RuntimeError, safetensors as its own error.
        raise ValueError(
            f"--checkpoint {str(path)!r} is truncated or corrupted ({type(error).__name__}: {error}); "
            "write it again or name another file"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--checkpoint {str(path)!r} must hold a state_dict (names -> tensors)")
    return state


def model_builder(args: argparse.Namespace) -> Callable[[], nn.Module]:
    """The architecture without weights: ``build()`` calls the factory (used to load sub-networks)."""
    factory, kwargs = import_factory(args.model), parse_kwargs(args.model_kwargs)

    def build() -> nn.Module:
        model = factory(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"--model {args.model!r} must return an nn.Module, got {type(model).__name__}")
        return model

    return build


def check_device(text: str) -> torch.device:
    """``--device`` as a torch device that exists on this machine, else ``ValueError`` naming it."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device must be a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"--device {text!r}: torch sees {torch.cuda.device_count()} CUDA device(s) here; use cpu or another index"
        )
    return device


def load_model(args: argparse.Namespace) -> nn.Module:
    """Build the model named by the arguments, load ``--checkpoint`` into it, move it to ``--device``."""
    check_device(args.device)  # before the model is built
    model = model_builder(args)()
    if args.checkpoint is not None:
        try:
            model.load_state_dict(load_state_dict(args.checkpoint))
        except RuntimeError as error:
            raise ValueError(
                f"--checkpoint {str(args.checkpoint)!r} does not fit --model {args.model!r}: {error}"
            ) from error
    return model.to(args.device).eval()
