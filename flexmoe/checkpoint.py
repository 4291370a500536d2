"""Checkpoints of models with MoE layers, saved at one world size and loaded at any other.

A checkpoint directory holds one safetensors file per rank and one JSON description::

    checkpoint.json                      format, version, world size, every tensor's layout,
                                         optimizer param groups (by parameter name), ``extra``
    rank-00000-of-00004.safetensors      rank 0: its expert shards + every replicated tensor
    rank-00001-of-00004.safetensors      rank 1: its expert shards
    ...

Tensor names in the files: ``model/<state_dict key>`` and ``optim/<parameter name>/<state name>``.
An expert tensor (an MoE layer's expert parameter, and optimizer state of the parameter's shape,
e.g. Adam's ``exp_avg``) is stored as each rank's shard under :class:`ExpertLayout`; its entry
in ``tensors`` records ``num_experts`` and ``hidden_axis``, which is all that resharding needs:
``unshard`` the saved shards, then ``ExpertLayout(num_experts, new_world, rank).shard``. Every
other tensor (router, embeddings, Adam's scalar ``step``) is replicated and written by rank 0.
``checkpoint.json`` is written last (after a barrier under ``torch.distributed``), so its
presence marks a complete checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from flexmoe.files import read_json_document, write_atomically, write_text_atomically
from flexmoe.layer import MoELayer
from flexmoe.parallel.layout import HIDDEN_AXIS, ExpertLayout, unshard

FORMAT = "flexmoe-checkpoint"
VERSION = 1
METADATA_FILE = "checkpoint.json"
MODEL_PREFIX = "model/"
OPTIM_PREFIX = "optim/"


def rank_file_name(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


@dataclass(frozen=True)
class ExpertTensorSpec:
    """How an expert tensor ``[num_experts, ...]`` is cut: by expert, and along ``hidden_axis``
    (None: replicated on the shards of one expert) when experts are fewer than ranks."""

    num_experts: int
    hidden_axis: int | None

    def shard(self, full: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
        """The part of the global tensor that ``rank`` of ``world_size`` stores (own memory)."""
        return ExpertLayout(self.num_experts, world_size, rank).shard(full, self.hidden_axis).clone()

    def to_json(self) -> dict[str, Any]:
        return {"num_experts": self.num_experts, "hidden_axis": self.hidden_axis}


# --- which tensors are expert tensors --------------------------------------------------------------


def expert_tensor_specs(model: nn.Module, rank: int, world_size: int) -> dict[str, ExpertTensorSpec]:
    """state_dict key -> spec for every expert parameter of every :class:`MoELayer` in ``model``.

    Checks that each layer's ``layout`` is the layout of
    ``rank`` of ``world_size``. Custom expert modules name their parameters' hidden axes with a
    ``hidden_axis`` dict attribute (like :data:`HIDDEN_AXIS`); the built-in experts use HIDDEN_AXIS.
    """
    specs = {}
    for layer_name, layer in model.named_modules():
        if not isinstance(layer, MoELayer):
            continue
        num_experts = layer.config.num_experts
        layout = layer.layout
        if (layout.num_experts, layout.world_size, layout.rank) != (num_experts, world_size, rank):
            raise ValueError(
                f"MoE layer {layer_name or '<root>'} has the layout of rank {layout.rank} of world size "
                f"{layout.world_size} ({layout.num_experts} experts), but world_size={world_size}, rank={rank} "
                "were given: pass the rank and world size the model was built for"
            )
        axes = getattr(layer.experts, "hidden_axis", HIDDEN_AXIS)
        prefix = f"{layer_name}.experts." if layer_name else "experts."
        for param_name, _ in layer.experts.named_parameters():
            if param_name not in axes:
                raise ValueError(
                    f"expert parameter {prefix}{param_name} has no known layout: give the experts module a "
                    f"hidden_axis dict (parameter name -> hidden axis or None), known: {sorted(axes)}"
                )
            specs[prefix + param_name] = ExpertTensorSpec(num_experts, axes[param_name])
    return specs


def _moe_layers(model: nn.Module) -> list[MoELayer]:
    return [module for module in model.modules() if isinstance(module, MoELayer)]


def _rank_and_world(rank: int | None, world_size: int | None, model: nn.Module | None = None) -> tuple[int, int]:
    """Given values, else the model's MoE layers' layout (a layer on a sub-group, or a
    single-process layer under torch.distributed, knows its own), else torch.distributed's."""
    layouts = {(layer.layout.rank, layer.layout.world_size) for layer in _moe_layers(model)} if model else set()
    distributed = dist.is_available() and dist.is_initialized()
    if len(layouts) == 1:
        (layout_rank, layout_world), *_ = layouts
    else:  # no MoE layer, or layouts that disagree (expert_tensor_specs names the culprit)
        layout_rank, layout_world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if world_size is None:
        world_size = layout_world
    if rank is None:
        rank = layout_rank
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def _saving_group(model: nn.Module, world_size: int) -> Any:
    """The process group whose ranks write this checkpoint together (for the barriers): the MoE
    layers' group, else the world group when it has ``world_size`` ranks, else None (one
    process writes every rank file, as in tests and conversions)."""
    for layer in _moe_layers(model):
        if layer.groups is not None and layer.groups.world_size == world_size:
            return layer.groups.group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() == world_size > 1:
        return dist.group.WORLD
    return None


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """Optimizer state-dict index -> parameter name (the model's state_dict key)."""
    names = {id(param): name for name, param in model.named_parameters()}
    index_to_name = {}
    for saved_group, group in zip(optimizer.state_dict()["param_groups"], optimizer.param_groups):
        for index, param in zip(saved_group["params"], group["params"]):
            if id(param) not in names:
                raise ValueError(f"the optimizer holds a parameter of shape {tuple(param.shape)} that is not in model")
            index_to_name[index] = names[id(param)]
    return index_to_name


# --- save -------------------------------------------------------------------------------------------


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write this rank's part of a checkpoint of ``model`` (and ``optimizer``) into ``directory``.

    Every rank of the MoE layers' group calls it; rank and world size default to the layers'
    ``layout`` (so a model on a sub-group, or a single-process model under torch.distributed,
    needs no arguments), else torch.distributed's (0 and 1 when not initialised). Each MoE
    layer's ``layout`` must be the one of this rank and world size.
    ``extra``: JSON-serialisable data returned by :func:`load_checkpoint` (step, epoch...).
    Returns the directory.
    """
    rank, world_size = _rank_and_world(rank, world_size, model)
    directory = Path(directory)
    specs = expert_tensor_specs(model, rank, world_size)
    model_state = model.state_dict()
    entries = []  # (file key, tensor, spec or None when replicated)
    for key, tensor in model_state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict entry {key} is a {type(tensor).__name__}, not a tensor: not supported")
        entries.append((MODEL_PREFIX + key, tensor, specs.get(key)))
    optimizer_description = None
    if optimizer is not None:
        optimizer_description, optimizer_entries = _describe_optimizer(model, optimizer, specs, model_state)
        entries += optimizer_entries
    layouts = {key: spec for key, _, spec in entries}
    # Expert tensors: every rank its shard; replicated tensors: rank 0 only.
    tensors = {key: tensor for key, tensor, spec in entries if spec is not None or rank == 0}
    description = {
        "format": FORMAT,
        "version": VERSION,
        "world_size": world_size,
        "tensors": {key: None if spec is None else spec.to_json() for key, spec in layouts.items()},
        "optimizer": optimizer_description,
        "extra": extra,
    }
    try:
        description_text = json.dumps(description, indent=1)
    except TypeError as error:
        raise TypeError(f"extra and optimizer hyperparameters must be JSON-serialisable: {error}") from None
    _write_tensors(directory / rank_file_name(rank, world_size), tensors, rank, world_size)
    group = _saving_group(model, world_size)
    if group is not None:
        dist.barrier(group)  # every shard is on disk before the description marks the checkpoint complete
    if rank == 0:
        write_text_atomically(directory / METADATA_FILE, description_text)
    if group is not None:
        dist.barrier(group)  # no rank returns (and, say, loads it back) before the checkpoint is complete
    return directory


def _describe_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, specs: dict[str, ExpertTensorSpec], model_state: dict
) -> tuple[dict[str, Any], list[tuple[str, torch.Tensor, ExpertTensorSpec | None]]]:
    """The optimizer's JSON description (param groups and non-tensor state, by parameter name)
    and its state tensors as (file key, tensor, spec or None when replicated)."""
    optimizer_state = optimizer.state_dict()
    names = _parameter_names(model, optimizer)
    description: dict[str, Any] = {"param_groups": [], "state": {}}
    for group in optimizer_state["param_groups"]:
        hyperparameters = {k: v for k, v in group.items() if k != "params"}
        description["param_groups"].append({**hyperparameters, "params": [names[i] for i in group["params"]]})
    entries = []
    for index, state in optimizer_state["state"].items():
        name = names[index]
        entry = description["state"][name] = {"tensors": [], "values": {}}
        for state_name, value in state.items():
            if not isinstance(value, torch.Tensor):
                entry["values"][state_name] = value
                continue
            entry["tensors"].append(state_name)
            # State shaped like its expert parameter (exp_avg...) is sharded like it; scalars are not.
            sharded = name in specs and value.shape == model_state[name].shape
            entries.append((f"{OPTIM_PREFIX}{name}/{state_name}", value, specs[name] if sharded else None))
    return description, entries


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], rank: int, world_size: int) -> None:
    owned, seen_storages = {}, set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        # safetensors refuses tensors that share memory (tied weights): those get a copy.
        owned[key] = tensor.clone() if storage in seen_storages and tensor.numel() else tensor
        seen_storages.add(storage)
    header = {"format": FORMAT, "rank": str(rank), "world_size": str(world_size)}
    write_atomically(path, lambda temporary: save_file(owned, str(temporary), metadata=header))


# --- read ---------------------------------------------------------------------------------------------


class CheckpointReader:
    """A checkpoint directory: its description, and any tensor resharded for any rank and world."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        metadata_path = self.directory / METADATA_FILE
        if not metadata_path.is_file():
            raise FileNotFoundError(f"{metadata_path} not found: not a (complete) flexmoe checkpoint")
        description = read_json_document(metadata_path, FORMAT, "flexmoe checkpoint description")
        if description.get("version") != VERSION:
            raise ValueError(f"{metadata_path} has format version {description.get('version')!r}; this reads {VERSION}")
        try:
            self.world_size = description["world_size"]
            ExpertLayout(1, self.world_size)  # a positive int
            self.layouts = {
                key: None if spec is None else ExpertTensorSpec(spec["num_experts"], spec["hidden_axis"])
                for key, spec in description["tensors"].items()
            }
            for spec in self.layouts.values():
                if spec is not None:
                    ExpertLayout(spec.num_experts, self.world_size)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"{metadata_path} is corrupted: {error!r}") from None
        self.optimizer: dict[str, Any] | None = description.get("optimizer")
        self.extra: dict[str, Any] | None = description.get("extra")
        missing = [
            name
            for r in range(self.world_size)
            if not (self.directory / (name := rank_file_name(r, self.world_size))).is_file()
        ]
        if missing:
            raise FileNotFoundError(f"checkpoint {self.directory} lacks the rank files {missing}")

    def model_keys(self) -> list[str]:
        return [key.removeprefix(MODEL_PREFIX) for key in self.layouts if key.startswith(MODEL_PREFIX)]

    def read(self, key: str, saved_rank: int) -> torch.Tensor:
        """The tensor ``key`` exactly as ``saved_rank`` wrote it."""
        path = self.directory / rank_file_name(saved_rank, self.world_size)
        with safe_open(str(path), framework="pt", device="cpu") as file:
            header = file.metadata() or {}
            if (header.get("rank"), header.get("world_size")) != (str(saved_rank), str(self.world_size)):
                raise ValueError(f"{path} was not written by rank {saved_rank} of {self.world_size}: header {header}")
            if key not in file.keys():
                raise ValueError(f"{path} lacks the tensor {key}: the checkpoint is incomplete or corrupted")
            return file.get_tensor(key)

    def global_tensor(self, key: str) -> torch.Tensor:
        """An expert tensor rebuilt from every saved rank's shard; a replicated tensor as is."""
        spec = self.layouts[key]
        if spec is None:
            return self.read(key, 0)
        shards = [self.read(key, saved_rank) for saved_rank in range(self.world_size)]
        return unshard(shards, spec.hidden_axis, spec.num_experts)

    def tensor_for(self, key: str, rank: int, world_size: int) -> torch.Tensor:
        """What ``rank`` of ``world_size`` stores of ``key``, reading only the saved ranks that
        hold its experts."""
        spec = self.layouts[key]
        if spec is None:
            return self.read(key, 0)
        if world_size == self.world_size:
            return self.read(key, rank)  # same layout: the rank's own shard
        target = ExpertLayout(spec.num_experts, world_size, rank)
        wanted = target.expert_slice
        # The saved ranks whose experts overlap the wanted ones: a run of whole groups of shards,
        # so they form a layout of their own and unshard to the global rows [first, first + count).
        saved = [ExpertLayout(spec.num_experts, self.world_size, r) for r in range(self.world_size)]
        covering = [s for s in saved if s.expert_slice.start < wanted.stop and wanted.start < s.expert_slice.stop]
        first = covering[0].first_expert
        count = covering[-1].expert_slice.stop - first
        rows = unshard([self.read(key, s.rank) for s in covering], spec.hidden_axis, count)
        local = rows.narrow(0, wanted.start - first, target.local_experts)
        if spec.hidden_axis is not None and target.shards_per_expert > 1:
            cut = target.hidden_slice(local.shape[spec.hidden_axis])
            local = local.narrow(spec.hidden_axis, cut.start, cut.stop - cut.start)
        return local.clone()


# --- load ---------------------------------------------------------------------------------------------


def load_checkpoint(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
) -> dict[str, Any] | None:
    """Load a checkpoint saved at any world size into this rank's ``model`` (and ``optimizer``).

    Expert tensors are resharded to this rank's layout (``layer.layout``, world 1 when absent);
    rank and world size default as in :func:`save_checkpoint`.
    Raises ``ValueError`` when the architecture does not match (missing or unexpected keys,
    shapes, expert counts). Returns the ``extra`` given to :func:`save_checkpoint`.
    """
    rank, world_size = _rank_and_world(rank, world_size, model)
    reader = CheckpointReader(directory)
    specs = expert_tensor_specs(model, rank, world_size)
    model_state = model.state_dict()
    saved_keys = set(reader.model_keys())
    missing, unexpected = sorted(set(model_state) - saved_keys), sorted(saved_keys - set(model_state))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing keys {missing}, unexpected keys {unexpected}")
    for key in model_state:
        saved_spec = reader.layouts[MODEL_PREFIX + key]
        if saved_spec != specs.get(key):
            raise ValueError(f"{key}: the checkpoint stores it as {saved_spec}, the model as {specs.get(key)}")
    state = {
        key: _fitting(key, reader.tensor_for(MODEL_PREFIX + key, rank, world_size), current)
        for key, current in model_state.items()
    }
    model.load_state_dict(state)
    if optimizer is not None:
        _load_optimizer(reader, model, optimizer, rank, world_size)
    return reader.extra


def _fitting(key: str, loaded: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    if loaded.shape != current.shape:
        raise ValueError(
            f"{key}: the checkpoint gives shape {tuple(loaded.shape)}, the model has {tuple(current.shape)}"
        )
    return loaded


def _load_optimizer(
    reader: CheckpointReader, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int, world_size: int
) -> None:
    saved = reader.optimizer
    if saved is None:
        raise ValueError(f"checkpoint {reader.directory} holds no optimizer state; pass optimizer=None")
    current = optimizer.state_dict()
    names = _parameter_names(model, optimizer)
    index_of = {name: index for index, name in names.items()}
    if len(saved["param_groups"]) != len(current["param_groups"]):
        raise ValueError(
            f"the checkpoint's optimizer has {len(saved['param_groups'])} param groups, this one "
            f"{len(current['param_groups'])}"
        )
    groups = []
    for number, (saved_group, group) in enumerate(zip(saved["param_groups"], current["param_groups"])):
        if sorted(saved_group["params"]) != sorted(names[i] for i in group["params"]):
            raise ValueError(f"optimizer param group {number} holds other parameters than in the checkpoint")
        # JSON turned tuples (betas) into lists: give hyperparameters back the current type.
        hyper = {k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in saved_group.items()}
        groups.append({**group, **hyper, "params": group["params"]})
    state = {}
    for name, entry in saved["state"].items():
        tensors = {
            state_name: reader.tensor_for(f"{OPTIM_PREFIX}{name}/{state_name}", rank, world_size)
            for state_name in entry["tensors"]
        }
        state[index_of[name]] = {**entry["values"], **tensors}
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --- convert ------------------------------------------------------------------------------------------


def convert_checkpoint(src: str | Path, dst: str | Path, to_world_size: int) -> Path:
    """Rewrite the checkpoint in ``src`` for ``to_world_size`` ranks into ``dst`` (new or empty).

    Needs no model: the description says how each tensor is cut. Holds one copy of the model's
    tensors in memory. Returns ``dst``.
    """
    _rank_and_world(0, to_world_size)
    reader = CheckpointReader(src)
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"dst {dst} is not empty; convert into a new directory")
    for key, spec in reader.layouts.items():
        if spec is not None:
            try:
                ExpertLayout(spec.num_experts, to_world_size)
            except ValueError as error:
                raise ValueError(f"cannot convert {key} to to_world_size={to_world_size}: {error}") from None
    per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(to_world_size)]
    for key, spec in reader.layouts.items():
        full = reader.global_tensor(key)
        if spec is None:
            per_rank[0][key] = full
            continue
        for rank in range(to_world_size):
            try:
                per_rank[rank][key] = spec.shard(full, to_world_size, rank)
            except ValueError as error:
                raise ValueError(f"cannot convert {key} to to_world_size={to_world_size}: {error}") from None
    for rank, tensors in enumerate(per_rank):
        _write_tensors(dst / rank_file_name(rank, to_world_size), tensors, rank, to_world_size)
    description = json.loads((reader.directory / METADATA_FILE).read_text())
    write_text_atomically(dst / METADATA_FILE, json.dumps({**description, "world_size": to_world_size}, indent=1))
    return dst
