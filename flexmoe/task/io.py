"""Save and load an extracted sub-network with safetensors and a JSON description, without
ever materialising the full MoE model's weights."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flexmoe.task.dense import DenseFFN

WEIGHTS_FILE = "model.safetensors"
DESCRIPTION_FILE = "flexmoe_subnetwork.json"


def save_subnetwork(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model.safetensors`` (all tensors) and ``flexmoe_subnetwork.json`` (which modules
    are :class:`DenseFFN` blocks, with their specs) into ``directory``; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    blocks = {name: m.spec() for name, m in model.named_modules() if isinstance(m, DenseFFN)}
    report = getattr(model, "extraction_report", None)
    description = {"format": 1, "dense_blocks": blocks, "task_id": getattr(report, "task_id", None)}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2))
    return directory


def _replace(model: nn.Module, name: str, block: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, block)


def load_subnetwork(
    directory: str | Path, build_model: Callable[[], nn.Module], device: str | torch.device = "cpu"
) -> nn.Module:
    """Rebuild a saved sub-network. ``build_model()`` constructs the original (full) architecture;
    it runs on the meta device, so the full model's weights are never allocated."""
    directory = Path(directory)
    for file in (WEIGHTS_FILE, DESCRIPTION_FILE):
        if not (directory / file).is_file():
            raise FileNotFoundError(f"{directory} holds no {file}: not a directory written by save_subnetwork")
    description = json.loads((directory / DESCRIPTION_FILE).read_text())
    with torch.device("meta"):
        model = build_model()
        for name, spec in description["dense_blocks"].items():
            spec = dict(spec, experts=tuple(spec["experts"]))
            _replace(model, name, DenseFFN(**spec))
    state = load_file(str(directory / WEIGHTS_FILE), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"saved weights do not fit the architecture: missing {missing}, unexpected {unexpected}")
    return model.eval()
