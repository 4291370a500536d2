"""Checkpoints of models with MoE layers through ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a DCP directory (``.metadata`` and one ``__<rank>_0.distcp`` file per writing
rank) holding ``{"model": ..., "optimizer": ...}`` as ``get_state_dict`` returns them, plus
``extra.json`` (what the caller passed as ``extra``) and ``flexmoe.json`` (the MoE layers'
options and the optimizer's class, checked on load: :mod:`flexmoe.checkpoint_description`). Expert
parameters of expert-parallel layers are stored as the global DTensors they are (plain local
shards, e.g. of custom experts, are viewed as such while saving and loading),
so a checkpoint loads at any world size, FSDP2 or not: DCP reads each rank's part of every
tensor, and of Adam's state. Saving is atomic: the ranks write into a staging directory beside
``directory`` that the first rank renames into place once every rank has written.

:func:`export_safetensors` turns a checkpoint's model into one safetensors file for deployment.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from flexmoe.checkpoint_description import (
    DESCRIPTION_FILE,
    OptionsMismatch,
    check_description,
    check_files,
    check_options_mismatch,
    describe,
    file_digests,
    read_description,
)
from flexmoe.distributed.experts import plain_shard_placements
from flexmoe.files import write_atomically, write_text_atomically

METADATA_FILE = ".metadata"  # written by DCP; its presence marks a checkpoint directory
EXTRA_FILE = "extra.json"
MODEL_KEY, OPTIMIZER_KEY = "model", "optimizer"


def _collective(model: nn.Module, no_dist: bool | None) -> bool:
    """Whether every rank of the process group takes part (see :func:`save_checkpoint`)."""
    if no_dist is not None:
        return not no_dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return any(isinstance(p, DTensor) for p in model.parameters()) or bool(plain_shard_placements(model))


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, Any], list[tuple]]:
    """``{"model": ..., "optimizer": ...}`` as ``get_state_dict`` gives them, with expert shards
    held as plain tensors viewed as the DTensors they are (see :func:`_as_dtensors`)."""
    options = StateDictOptions(strict=True)
    model_state, optimizer_state = get_state_dict(model, [] if optimizer is None else optimizer, options=options)
    state = {MODEL_KEY: model_state}
    if optimizer is not None:
        state[OPTIMIZER_KEY] = optimizer_state
    return state, _as_dtensors(model, state)


def _as_dtensors(model: nn.Module, state: dict[str, Any]) -> list[tuple[dict, str]]:
    """Replace, in ``state``, each expert shard that an expert-parallel layer holds as a plain
    tensor (and its optimizer state of the same shape, e.g. Adam's ``exp_avg``) by a DTensor
    view of it: DCP would otherwise take the ranks' different shards for copies of one tensor.
    Returns (dict, key) of every replaced entry, for :func:`_as_local`."""
    placements = plain_shard_placements(model.module if isinstance(model, DistributedDataParallel) else model)
    replaced = []
    local_shapes = {key: state[MODEL_KEY][key].shape for key in placements}
    entries = [(state[MODEL_KEY], key, key) for key in placements]
    optimizer_state = state.get(OPTIMIZER_KEY, {}).get("state", {})
    for key in placements.keys() & optimizer_state.keys():
        # A copy: get_state_dict may hand out the optimizer's own per-parameter dicts.
        values = optimizer_state[key] = dict(optimizer_state[key])
        entries += [(values, name, key) for name in values]
    for holder, name, key in entries:
        placement, shape = placements[key]
        value = holder[name]
        if isinstance(value, torch.Tensor) and value.shape == local_shapes[key]:
            holder[name] = placement.to_dtensor(value, shape)
            replaced.append((holder, name))
    return replaced


def _as_local(replaced: list[tuple[dict, str]]) -> None:
    for holder, name in replaced:
        holder[name] = holder[name].to_local()


def _check_arguments(model: object, optimizer: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra: dict[str, Any] | None = None,
    process_group: dist.ProcessGroup | None = None,
    no_dist: bool | None = None,
) -> Path:
    """Save ``model`` (and ``optimizer``, e.g. Adam's state) into ``directory`` (replaced if it
    holds a checkpoint). Returns the directory.

    Under ``torch.distributed`` every rank of ``process_group`` (None: the default group) calls
    it when the model holds DTensors or expert-parallel layers (FSDP2, a group); a model without
    them is this process's own and is written by this process alone. ``no_dist`` forces either
    (True: this process alone). ``extra``: JSON-serialisable data (step, epoch...) that
    :func:`load_checkpoint` returns. An interrupted save leaves the previous checkpoint.
    """
    _check_arguments(model, optimizer)
    try:
        extra_text = json.dumps(extra)
    except TypeError as error:
        raise TypeError(f"extra must be JSON-serialisable: {error}") from None
    directory = Path(directory)
    if directory.exists() and not (directory / METADATA_FILE).is_file():
        raise FileExistsError(f"{directory} exists and is not a checkpoint; save into a new directory")
    collective = _collective(model, no_dist)
    first = not collective or dist.get_rank(process_group) == 0
    staging = directory.with_name(f".{directory.name}.staging")
    if first and staging.exists():
        shutil.rmtree(staging)  # our own leftover from an interrupted save
    if collective:
        dist.barrier(process_group)
    state, _ = _state(model, optimizer)
    dcp.save(state, checkpoint_id=staging, process_group=process_group, no_dist=not collective)
    if first:
        write_text_atomically(staging / EXTRA_FILE, extra_text)
        # Every rank's file is complete once dcp.save returns on the first rank (it wrote .metadata last).
        description = {**describe(model, optimizer), "files": file_digests(staging)}
        write_text_atomically(staging / DESCRIPTION_FILE, json.dumps(description, indent=1))
        _replace(directory, staging)
    if collective:
        dist.barrier(process_group)  # no rank returns before the checkpoint is in place
    return directory


def _replace(directory: Path, staging: Path) -> None:
    """Rename ``staging`` to ``directory``; a previous checkpoint there is removed only once the
    new one is in place under its name."""
    previous = directory.with_name(f".{directory.name}.previous")
    if previous.exists():
        shutil.rmtree(previous)
    if directory.exists():
        os.replace(directory, previous)
    os.replace(staging, directory)
    if previous.exists():
        shutil.rmtree(previous)


def load_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    process_group: dist.ProcessGroup | None = None,
    no_dist: bool | None = None,
    options_mismatch: OptionsMismatch = "error",
) -> dict[str, Any] | None:
    """Load a checkpoint saved at any world size into ``model`` (and ``optimizer``), resharded to
    this rank's layout. Who calls it: as :func:`save_checkpoint`. Raises ``ValueError`` when the
    architecture does not match, and when an MoE layer's options that change its computation
    (top-k, activation, granularity, capacity factor...) or the optimizer's class differ from the
    saved ones; ``options_mismatch="warn"`` loads those anyway with a warning. Returns the
    ``extra`` given to :func:`save_checkpoint`.
    """
    _check_arguments(model, optimizer)
    check_options_mismatch(options_mismatch)
    directory = Path(directory)
    if not (directory / METADATA_FILE).is_file():
        raise FileNotFoundError(f"{directory} holds no checkpoint (no {METADATA_FILE})")
    saved = read_description(directory)
    if saved is not None:  # checkpoints saved without a description load unchecked
        check_files(directory, saved.get("files", {}))
    _check_keys(directory, model, optimizer)
    if saved is not None:
        check_description(directory, saved, describe(model, optimizer), options_mismatch)
    collective = _collective(model, no_dist)
    state, replaced = _state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=directory, process_group=process_group, no_dist=not collective)
    except CheckpointException as error:  # DCP's wrapper of every rank's failure (shape mismatches...)
        raise ValueError(f"checkpoint {directory} does not fit the model: {error}") from None
    _as_local(replaced)
    set_state_dict(
        model,
        [] if optimizer is None else optimizer,
        model_state_dict=state[MODEL_KEY],
        optim_state_dict=state.get(OPTIMIZER_KEY, {}),
        options=StateDictOptions(strict=True),
    )
    extra_path = directory / EXTRA_FILE
    return json.loads(extra_path.read_text()) if extra_path.is_file() else None


def _check_keys(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Missing or unexpected model keys, and a missing optimizer state, as a ValueError."""
    saved = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    prefix = MODEL_KEY + "."
    saved_model = {key.removeprefix(prefix) for key in saved if key.startswith(prefix)}
    wanted = set(model.state_dict())
    missing, unexpected = sorted(wanted - saved_model), sorted(saved_model - wanted)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing keys {missing}, unexpected keys {unexpected}")
    if optimizer is not None and not any(key.startswith(OPTIMIZER_KEY + ".") for key in saved):
        raise ValueError(f"checkpoint {directory} holds no optimizer state; pass optimizer=None")


def export_safetensors(directory: str | Path, file: str | Path) -> Path:
    """Write the model of the checkpoint in ``directory`` as one safetensors file of global
    tensors (state_dict keys), e.g. to load a single-process model for serving. No model needed;
    holds the model's tensors in memory once. Written atomically (an interrupted export leaves
    the previous file); a file inside the checkpoint is refused. Returns ``file``."""
    directory, file = Path(directory), Path(file)
    if not (directory / METADATA_FILE).is_file():
        raise FileNotFoundError(f"{directory} holds no checkpoint (no {METADATA_FILE})")
    if file.resolve().parent == directory.resolve():
        raise ValueError(f"file {file} is inside the checkpoint {directory}: writing it would damage it; name another")
    if file.is_dir():
        raise ValueError(
            f"file {file} is a directory; name the safetensors file to write, e.g. {file}/model.safetensors"
        )
    metadata = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    prefix = MODEL_KEY + "."
    tensors = {
        key: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in metadata.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }
    dcp.load(tensors, checkpoint_id=directory, no_dist=True)
    tensors = {key.removeprefix(prefix): tensor for key, tensor in tensors.items()}
    write_atomically(file, lambda temporary: save_file(tensors, str(temporary)))  # creates the parent
    return file
