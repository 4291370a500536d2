"""Save and load an extracted sub-network with safetensors and a JSON description, without
ever materialising the full MoE model's weights.

Both files are written atomically (temporary file, then rename), the weights first; the
description, written last, records the weights file's size and SHA-256. A load checks both, so
a truncated or corrupted weights file, or one left by an interrupted overwrite beside the other
save's description, is refused with the file named, never loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flexmoe.files import read_json_document, sha256_of, write_atomically, write_text_atomically
from flexmoe.task.dense import DenseFFN

WEIGHTS_FILE = "model.safetensors"
DESCRIPTION_FILE = "flexmoe_subnetwork.json"
FORMAT = "flexmoe-subnetwork"
VERSION = 2


def save_subnetwork(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model.safetensors`` (all tensors) and ``flexmoe_subnetwork.json`` (which modules
    are :class:`DenseFFN` blocks, with their specs) into ``directory``; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    blocks = {name: m.spec() for name, m in model.named_modules() if isinstance(m, DenseFFN)}
    report = getattr(model, "extraction_report", None)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    weights = directory / WEIGHTS_FILE
    write_atomically(weights, lambda temporary: save_file(state, str(temporary)))
    description = {
        "format": FORMAT,
        "version": VERSION,
        "dense_blocks": blocks,
        "task_id": getattr(report, "task_id", None),
        "weights": {"file": WEIGHTS_FILE, "bytes": weights.stat().st_size, "sha256": sha256_of(weights)},
    }
    write_text_atomically(directory / DESCRIPTION_FILE, json.dumps(description, indent=2))
    return directory


def _read_description(directory: Path) -> dict:
    """The description, in the current layout; a save from before checksums (``"format": 1``)
    has no ``"weights"`` entry and loads unchecked."""
    path = directory / DESCRIPTION_FILE
    try:
        legacy = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"sub-network description {path} is corrupted (not valid JSON: {error})") from None
    if isinstance(legacy, dict) and legacy.get("format") == 1:
        return legacy
    description = read_json_document(path, FORMAT, "sub-network description")
    if description.get("version") != VERSION:
        raise ValueError(f"{path} has version {description.get('version')!r}; this flexmoe reads version {VERSION}")
    return description


def _check_weights(directory: Path, description: dict) -> None:
    expected = description.get("weights")
    if expected is None:
        return
    weights = directory / WEIGHTS_FILE
    size = weights.stat().st_size
    if size != expected["bytes"]:
        raise ValueError(
            f"{weights} has {size} bytes, its description says {expected['bytes']} (wrong size: truncated, or "
            "from another save); save the sub-network again"
        )
    if sha256_of(weights) != expected["sha256"]:
        raise ValueError(
            f"{weights} does not match the checksum in {DESCRIPTION_FILE} (corrupted, or from another save); "
            "save the sub-network again"
        )


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
    description = _read_description(directory)
    _check_weights(directory, description)
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
