"""Task-grouped inference: mixed-task requests, each task run through its own sub-network.

With task routing (Kudugunta et al., 2021) a task's tokens always use the same experts, so a
server can hold, per task, the small dense sub-network :func:`flexmoe.extract_task` makes and
decode each task separately. :class:`TaskServer` groups a batch's requests by task, extracts
a task's sub-network on first use, keeps the most recently used ones within a
:class:`CacheBound` (count and/or parameter bytes, least recently used evicted first), and
returns the outputs in request order.

Model protocol: the server calls ``module(*inputs, task_ids=ids, **keyword_inputs)`` where
``module`` is the model or one of its sub-networks, every input tensor has the batch first,
``ids`` is an int64 ``[batch]`` tensor holding one task, and the call returns a tensor with
the batch first. Outputs equal the full model's on the same rows as long as a row's output
does not depend on the other rows of its batch: true for task- and token-routed layers without
a binding capacity (``capacity_factor=0``, the default), not under a capacity cut.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from flexmoe.layer import MoELayer
from flexmoe.task.extract import count_parameters, extract_task, reducible_layers
from flexmoe.task.single_process import check_single_process


def _check_optional_positive_int(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int or None, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


@dataclass(frozen=True)
class CacheBound:
    """How many extracted sub-networks a :class:`TaskServer` keeps loaded.

    max_subnetworks: at most this many resident sub-networks (None: no count bound).
    max_parameter_bytes: at most this many bytes of sub-network parameters resident
        (None: no byte bound). A sub-network larger than this on its own is an error.
    While a new sub-network is extracted, the old ones are still resident: the peak is one
    sub-network above the bound.
    """

    max_subnetworks: int | None = 4
    max_parameter_bytes: int | None = None

    def __post_init__(self) -> None:
        _check_optional_positive_int("max_subnetworks", self.max_subnetworks)
        _check_optional_positive_int("max_parameter_bytes", self.max_parameter_bytes)


@dataclass
class ServerStats:
    """What a :class:`TaskServer` did so far.

    hits / misses: task groups served from the cache / that needed an extraction.
    evictions: sub-networks dropped to respect the bound.
    invalidations: times the cache was emptied because the model's weights changed.
    resident_subnetworks, resident_parameters, resident_parameter_bytes: what is loaded now
        (sub-networks only; the full model the server extracts from is not counted).
    requests: rows of :meth:`TaskServer.__call__` plus requests of :meth:`TaskServer.serve`.
    groups, rows: model calls made (one per task, or per task and shape) and the rows they ran.
    """

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    invalidations: int = 0
    resident_subnetworks: int = 0
    resident_parameters: int = 0
    resident_parameter_bytes: int = 0
    requests: int = 0
    groups: int = 0
    rows: int = 0


@dataclass(frozen=True)
class Request:
    """One inference request: a task and the model inputs, batch first.

    inputs: the positional tensors of the model call, each ``[n, ...]`` with the same ``n``
        (a single tensor is one positional input).
    keyword_inputs: tensors passed by keyword (``padding_mask=...``), each ``[n, ...]``.
    Requests of one task whose tensors have the same shapes run as one batch.
    """

    task_id: int
    inputs: torch.Tensor | tuple[torch.Tensor, ...]
    keyword_inputs: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def positional(self) -> tuple[torch.Tensor, ...]:
        return (self.inputs,) if isinstance(self.inputs, torch.Tensor) else tuple(self.inputs)


def _parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _version(tensor: torch.Tensor) -> int:
    """The tensor's in-place version counter (-1 for inference tensors, which have none)."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


def _batch_size(request: Request, index: int) -> int:
    tensors = [*request.positional(), *request.keyword_inputs.values()]
    if not tensors or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in tensors):
        raise TypeError(f"requests[{index}]: inputs and keyword_inputs must be tensors of shape [n, ...]")
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) != 1:
        raise ValueError(f"requests[{index}]: all input tensors must share the batch size n, got sizes {sorted(sizes)}")
    return sizes.pop()


class TaskServer:
    """Serve mixed-task batches through per-task sub-networks, extracted lazily, LRU-cached.

    model: any ``nn.Module`` following the protocol in this module's docstring. It is put in
        eval mode and never changed otherwise. If it has no task-routed :class:`MoELayer` that
        :func:`extract_task` can fold, there is nothing to extract: the server runs the whole
        model for every task (``serves_whole_model`` is True, ``whole_model_reason`` says why)
        and the cache stays empty.
    bound: the :class:`CacheBound` on resident sub-networks.
    extract: how to build a task's sub-network (default :func:`extract_task`); e.g. a loader
        of sub-networks saved with :func:`flexmoe.save_subnetwork`.

    The sub-networks are copies: when the model's weights change (``load_state_dict``, an
    optimizer step, a parameter replaced), every cached one is dropped before the next request
    and re-extracted on demand. The check reads each parameter's and buffer's storage address
    and in-place version counter, so it catches every in-place update made through PyTorch;
    :meth:`clear` empties the cache explicitly (e.g. after writing to ``.data`` by hand, which
    PyTorch does not count).

    Every routing option of the layers is served as the full model routes it (score function,
    loss-free selection bias, group limit, route scale; shared experts, gated or not, are part
    of each sub-network). Raises ValueError for a model holding expert-parallel shards
    (``layer.layout.world_size > 1``): serve a single-process copy.
    """

    def __init__(
        self,
        model: nn.Module,
        bound: CacheBound | None = None,
        *,
        extract: Callable[[nn.Module, int], nn.Module] = extract_task,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        bound = CacheBound() if bound is None else bound
        if not isinstance(bound, CacheBound):
            raise TypeError(f"bound must be a CacheBound, got {type(bound).__name__}")
        check_single_process(model, "TaskServer")
        self.model = model.eval()
        self.bound = bound
        self.extract = extract
        self.stats = ServerStats()
        self._cache: OrderedDict[int, nn.Module] = OrderedDict()  # least recently used first
        self._weights_seen = self._weights_fingerprint()
        self.reducible_layers = reducible_layers(model)
        task_layers = [m for m in model.modules() if isinstance(m, MoELayer) and m.config.granularity == "task"]
        # Ids every task layer accepts; None: the model has no task layer to say (it checks itself).
        self.num_tasks: int | None = min((m.config.num_tasks for m in task_layers), default=None)
        self.whole_model_reason: str | None = None
        if not self.reducible_layers:
            self.whole_model_reason = (
                "no task-routed MoELayer that extract_task can fold: every task runs the whole model"
            )

    @property
    def serves_whole_model(self) -> bool:
        return self.whole_model_reason is not None

    @property
    def resident_tasks(self) -> list[int]:
        """Tasks whose sub-network is loaded, least recently used first."""
        return list(self._cache)

    def check_task_id(self, task_id: object, argument: str = "task_id") -> int:
        if isinstance(task_id, bool) or not isinstance(task_id, int):
            raise TypeError(f"{argument} must be an int, got {task_id!r}")
        if task_id < 0 or (self.num_tasks is not None and task_id >= self.num_tasks):
            accepted = "an int >= 0" if self.num_tasks is None else f"in 0..{self.num_tasks - 1}"
            raise ValueError(f"{argument} must be {accepted} (the model's task ids), got {task_id}")
        return task_id

    def clear(self) -> None:
        """Drop every cached sub-network (they are extracted again on demand)."""
        self._cache.clear()
        self._update_resident()
        self._weights_seen = self._weights_fingerprint()

    def _weights_fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        """(name, storage address, in-place version) of every parameter and buffer."""
        tensors = [*self.model.named_parameters(), *self.model.named_buffers()]
        return tuple((name, t.data_ptr(), _version(t)) for name, t in tensors)

    def _drop_stale(self) -> None:
        """Empty the cache if the model's weights changed since the sub-networks were extracted."""
        if self._weights_fingerprint() != self._weights_seen:
            if self._cache:
                self.stats.invalidations += 1
            self.clear()

    def subnetwork(self, task_id: int) -> nn.Module:
        """The module that serves ``task_id``: its cached sub-network (extracted now if absent,
        evicting the least recently used ones past the bound), or the whole model."""
        task_id = self.check_task_id(task_id)
        if self.serves_whole_model:
            return self.model
        self._drop_stale()
        if task_id in self._cache:
            self._cache.move_to_end(task_id)
            self.stats.hits += 1
            return self._cache[task_id]
        self.stats.misses += 1
        sub = self.extract(self.model, task_id).eval()
        size = _parameter_bytes(sub)
        limit = self.bound.max_parameter_bytes
        if limit is not None and size > limit:
            raise ValueError(
                f"the sub-network of task {task_id} holds {size:,} parameter bytes, more than "
                f"max_parameter_bytes={limit:,}: raise the bound"
            )
        self._evict_for(size)
        self._cache[task_id] = sub
        self._update_resident()
        return sub

    def _evict_for(self, incoming_bytes: int) -> None:
        max_count, max_bytes = self.bound.max_subnetworks, self.bound.max_parameter_bytes
        while self._cache and (
            (max_count is not None and len(self._cache) + 1 > max_count)
            or (max_bytes is not None and self.stats.resident_parameter_bytes + incoming_bytes > max_bytes)
        ):
            self._cache.popitem(last=False)
            self.stats.evictions += 1
            self._update_resident()

    def _update_resident(self) -> None:
        self.stats.resident_subnetworks = len(self._cache)
        self.stats.resident_parameters = sum(count_parameters(m) for m in self._cache.values())
        self.stats.resident_parameter_bytes = sum(_parameter_bytes(m) for m in self._cache.values())

    def _schedule(self, task_ids: Sequence[int]) -> list[int]:
        """Distinct tasks in the order to run them: resident ones first (served before a miss
        can evict them), then by first appearance."""
        distinct = list(dict.fromkeys(task_ids))
        return sorted(distinct, key=lambda task: task not in self._cache)

    def run_group(
        self, task_id: int, inputs: Sequence[torch.Tensor], keyword_inputs: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """One task's batch through its sub-network. inputs, keyword_inputs: tensors [n, ...]
        (at least one) -> the model output [n, ...]."""
        module = self.subnetwork(task_id)
        first = next(iter([*inputs, *keyword_inputs.values()]))
        n = first.shape[0]
        ids = torch.full((n,), task_id, dtype=torch.long, device=first.device)
        with torch.no_grad():
            out = module(*inputs, task_ids=ids, **keyword_inputs)
        if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != n:
            raise TypeError(f"the model must return a tensor [batch={n}, ...], got {getattr(out, 'shape', type(out))}")
        self.stats.groups += 1
        self.stats.rows += n
        return out

    def __call__(
        self, inputs: torch.Tensor, task_ids: torch.Tensor | Sequence[int], **keyword_inputs: torch.Tensor
    ) -> torch.Tensor:
        """A mixed batch. inputs: [batch, ...]; task_ids: [batch] ints, one task per row;
        keyword_inputs: further tensors [batch, ...]. Returns the model output [batch, ...],
        rows in input order."""
        if not isinstance(inputs, torch.Tensor) or inputs.dim() == 0:
            raise TypeError("inputs must be a tensor of shape [batch, ...]")
        if inputs.shape[0] == 0:
            raise ValueError("inputs must hold at least one row")
        task_ids = torch.as_tensor(task_ids)
        if task_ids.dim() != 1 or task_ids.shape[0] != inputs.shape[0] or task_ids.is_floating_point():
            raise ValueError(
                f"task_ids must be an integer tensor of shape [batch] = ({inputs.shape[0]},), one task per row; "
                f"got {task_ids.dtype} {tuple(task_ids.shape)}"
            )
        for name, tensor in keyword_inputs.items():
            if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0 or tensor.shape[0] != inputs.shape[0]:
                raise ValueError(f"{name} must be a tensor of shape [batch={inputs.shape[0]}, ...]")
        ids = task_ids.tolist()
        for task in dict.fromkeys(ids):
            self.check_task_id(task, "task_ids")
        self._drop_stale()  # before scheduling by residency
        output: torch.Tensor | None = None
        for task in self._schedule(ids):
            rows = torch.nonzero(task_ids == task).squeeze(1).to(inputs.device)
            kwargs = {name: t.index_select(0, rows.to(t.device)) for name, t in keyword_inputs.items()}
            out = self.run_group(task, [inputs.index_select(0, rows)], kwargs)
            if output is None:
                output = out.new_empty(inputs.shape[0], *out.shape[1:])
            output.index_copy_(0, rows.to(out.device), out)
        self.stats.requests += inputs.shape[0]
        return output

    def serve(self, requests: Sequence[Request]) -> list[torch.Tensor]:
        """Requests (any mix of tasks and shapes) -> one output ``[n, ...]`` per request, in
        request order. Requests of one task with the same input shapes are concatenated and
        run as one batch."""
        if isinstance(requests, Request) or not all(isinstance(r, Request) for r in requests):
            raise TypeError("requests must be a sequence of flexmoe.serving.Request")
        sizes = [_batch_size(r, i) for i, r in enumerate(requests)]
        for i, request in enumerate(requests):
            self.check_task_id(request.task_id, f"requests[{i}].task_id")
        self._drop_stale()  # before scheduling by residency
        outputs: list[torch.Tensor | None] = [None] * len(requests)
        for task in self._schedule([r.task_id for r in requests]):
            by_shape: dict[tuple, list[int]] = {}
            for i, request in enumerate(requests):
                if request.task_id == task:
                    shapes = tuple(t.shape[1:] for t in request.positional())
                    shapes += tuple((k, t.shape[1:]) for k, t in sorted(request.keyword_inputs.items()))
                    by_shape.setdefault(shapes, []).append(i)
            for members in by_shape.values():
                group = [requests[i] for i in members]
                inputs = [torch.cat(ts) for ts in zip(*(r.positional() for r in group))]
                kwargs = {k: torch.cat([r.keyword_inputs[k] for r in group]) for k in group[0].keyword_inputs}
                out = self.run_group(task, inputs, kwargs)
                for i, piece in zip(members, out.split([sizes[i] for i in members])):
                    outputs[i] = piece
        self.stats.requests += len(requests)
        return outputs
