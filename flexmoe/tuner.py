"""Run-time tuner: pick the fastest equivalent way to run an MoE layer call, per workload.

A layer's executor offers candidates (:class:`Choice`, an alias of
:class:`flexmoe.parallel.ParallelChoice`: parallel degree ``r``, overlap degree ``d``,
all-to-all algorithm, exact counts or padded blocks) that it guarantees give the same result,
and a :class:`TuningKey` that describes the workload (world size, capacity bucket, shapes,
dtype, device). For each key the :class:`Tuner` hands out every candidate
``trials_per_candidate`` times in turn, collects the measured seconds, then fixes the
candidate with the smallest median time and keeps using it.
Decisions persist to a JSON cache so a rerun starts tuned.

Every rank must run the same candidate or the collectives inside the layer hang, so under
``torch.distributed`` the decision is taken from timings reduced with MAX across ranks (the
slowest rank sets the step time): one small all_reduce per key, at decision time only.

The tuner only ever sees keys, choices and seconds, never tensor values, so tuning cannot
change results. This module imports neither :mod:`flexmoe.layer` nor :mod:`flexmoe.executors` (they import it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from flexmoe.files import read_json_document, write_text_atomically
from flexmoe.parallel.config import ParallelChoice, check_int
from flexmoe.planner.pruning import candidates_to_measure, timings_record

CACHE_FORMAT = "flexmoe-tuner-cache"
# 2: keys gained shards_per_expert (layouts with different candidates no longer share a key).
# 3: choices gained exact (decisions taken among padded candidates only are tuned again).
CACHE_VERSION = 3


# One choice type for the layer and the tuner: the parallel package's (the lower layer).
Choice = ParallelChoice


def capacity_bucket(capacity: int) -> int:
    """The smallest power of two >= ``capacity`` (0 for 0): capacities 5..8 share bucket 8,
    9..16 bucket 16, so a slowly drifting capacity reuses one decision, and the workloads
    sharing a decision differ by less than a factor of two."""
    check_int("capacity", capacity, 0)
    return 0 if capacity == 0 else 1 << (capacity - 1).bit_length()


@dataclass(frozen=True)
class TuningKey:
    """The workload a decision applies to. Build it with :meth:`for_call` (which buckets the
    capacity); ``dtype`` is e.g. ``"float32"``, ``device_type`` e.g. ``"cuda"``.
    ``shards_per_expert``: S of the layout (experts split over ranks), which sets the candidates."""

    world_size: int
    capacity_bucket: int
    model_dim: int
    hidden_dim: int
    local_experts: int
    top_k: int
    dtype: str
    device_type: str
    shards_per_expert: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "model_dim", "hidden_dim", "local_experts", "top_k", "shards_per_expert"):
            check_int(name, getattr(self, name), 1)
        check_int("capacity_bucket", self.capacity_bucket, 0)
        if self.capacity_bucket != capacity_bucket(self.capacity_bucket):
            raise ValueError(f"capacity_bucket must be 0 or a power of two, got {self.capacity_bucket}")
        for name in ("dtype", "device_type"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, got {type(getattr(self, name)).__name__}")

    @classmethod
    def for_call(
        cls,
        *,
        world_size: int,
        capacity: int,
        model_dim: int,
        hidden_dim: int,
        local_experts: int,
        top_k: int,
        dtype: torch.dtype,
        device: torch.device | str,
        shards_per_expert: int = 1,
    ) -> TuningKey:
        """The key of one layer call; reads only shapes, dtype and device, never values."""
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
        return cls(
            world_size=world_size,
            capacity_bucket=capacity_bucket(capacity),
            model_dim=model_dim,
            hidden_dim=hidden_dim,
            local_experts=local_experts,
            top_k=top_k,
            dtype=str(dtype).removeprefix("torch."),
            device_type=torch.device(device).type,
            shards_per_expert=shards_per_expert,
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TuningKey:
        return cls(**data)


class Tuner:
    """Picks, per :class:`TuningKey`, the fastest of the candidates a layer offers.

    Protocol, on every rank in the same order::

        choice = tuner.choose(key, candidates)  # a candidate to try, or the decided one
        ...run the call with `choice`, measuring it (see measure_layer_call)...
        tuner.record(key, choice, seconds)      # ignored once the key is decided

    Candidates are handed out round-robin (in sorted order) until each has
    ``trials_per_candidate`` timings; the next ``record`` then decides: the smallest median,
    ties to the smallest :class:`Choice`. A single candidate is decided at once.

    cache_path: JSON file of decisions, loaded here and rewritten (atomically, by rank 0)
        after each decision. A file that is not a tuner cache (bad JSON, bad entries) raises
        ``ValueError`` naming it; one written by another cache version is ignored with a
        warning and replaced at the next decision.
    group: process group whose ranks must agree; default the world group when
        ``torch.distributed`` is initialised (checked at decision time), else single-process.
        With a cache, rank 0 reads it and broadcasts its decisions, so every rank starts identical.
    predictor: ``predictor(key, candidates) -> {candidate: predicted seconds}`` (e.g.
        :func:`flexmoe.planner.tuner_predictor`); from 64 ranks on only its 3 fastest candidates
        per key are measured. The cache keeps each key's predicted and measured seconds side by side.
    """

    def __init__(
        self,
        trials_per_candidate: int = 2,
        cache_path: str | Path | None = None,
        group: Any = None,
        predictor: Callable[[TuningKey, tuple[Choice, ...]], Mapping[Choice, float | None]] | None = None,
    ) -> None:
        check_int("trials_per_candidate", trials_per_candidate, 1)
        self.trials_per_candidate = trials_per_candidate
        self.cache_path = None if cache_path is None else Path(cache_path)
        self.group = group
        self.predictor = predictor
        self._decisions: dict[TuningKey, Choice] = {}
        self._candidates: dict[TuningKey, tuple[Choice, ...]] = {}
        self._timings: dict[TuningKey, dict[Choice, list[float]]] = {}
        self._predicted: dict[TuningKey, dict[Choice, float | None]] = {}
        # Per decided key: every candidate's predicted and measured seconds (cache "timings").
        self.timings_records: dict[TuningKey, list[dict[str, Any]]] = {}
        if self.cache_path is not None:
            self._decisions, self.timings_records = self._load_cache(self.cache_path)

    # --- public protocol ---------------------------------------------------------------------

    def choose(self, key: TuningKey, candidates: Sequence[Choice]) -> Choice:
        """The choice to run this call with. ``candidates``: equivalent choices (non-empty)."""
        _check_key(key)
        ordered = _canonical(candidates)
        decided = self._decisions.get(key)
        if decided is not None:
            if decided in ordered:
                return decided
            warnings.warn(f"tuned choice {decided} for {key} is not among the candidates; tuning again", stacklevel=2)
            del self._decisions[key]
        if key not in self._candidates:
            measured = self._to_measure(key, ordered)
            if len(measured) == 1:
                self._candidates[key] = ordered
                self._decide_as(key, measured[0])
                return measured[0]
            self._candidates[key] = ordered
            self._timings[key] = {choice: [] for choice in measured}
        elif self._candidates[key] != ordered:
            raise ValueError(f"candidates for {key} changed during tuning: {self._candidates[key]} -> {ordered}")
        timings = self._timings[key]
        return min(timings, key=lambda choice: len(timings[choice]))

    def record(self, key: TuningKey, choice: Choice, seconds: float) -> None:
        """Add one measured call (forward, plus backward when it ran) of ``choice``, in seconds."""
        _check_key(key)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"seconds must be a float (the tuner never sees tensors), got {type(seconds).__name__}")
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"seconds must be finite and >= 0, got {seconds}")
        if key in self._decisions:
            return
        if key not in self._timings:
            raise ValueError(f"record() before choose() for {key}")
        timings = self._timings[key]
        if choice not in timings:
            raise ValueError(f"choice must be one of the candidates {tuple(timings)}, got {choice!r}")
        timings[choice].append(float(seconds))
        if all(len(times) >= self.trials_per_candidate for times in timings.values()):
            self._decide(key)

    def is_tuning(self, key: TuningKey) -> bool:
        """True until ``key`` is decided: only then does a call need measuring."""
        return key not in self._decisions

    def decision(self, key: TuningKey) -> Choice | None:
        return self._decisions.get(key)

    @property
    def decisions(self) -> dict[TuningKey, Choice]:
        return dict(self._decisions)

    @property
    def pending(self) -> tuple[TuningKey, ...]:
        """Keys met (candidates handed out) but not decided yet."""
        return tuple(self._candidates)

    # --- deciding ----------------------------------------------------------------------------

    def _to_measure(self, key: TuningKey, ordered: tuple[Choice, ...]) -> list[Choice]:
        if self.predictor is None:
            return list(ordered)
        predicted = self.predictor(key, ordered)
        self._predicted[key] = {choice: predicted.get(choice) for choice in ordered}
        return candidates_to_measure(self._predicted[key], key.world_size)

    def _decide(self, key: TuningKey) -> None:
        timings = self._timings[key]
        ordered = tuple(timings)
        # [candidates, trials]: the step time of a trial is the slowest rank's time.
        step_times = torch.tensor(
            [timings[choice][: self.trials_per_candidate] for choice in ordered], dtype=torch.float64
        )
        group = self._group()
        if group is not None:
            step_times = _all_reduce_max(step_times, group)
        medians = [statistics.median(row) for row in step_times.tolist()]
        best = min(range(len(ordered)), key=lambda i: (medians[i], i))
        self._decide_as(key, ordered[best], dict(zip(ordered, medians)))

    def _decide_as(self, key: TuningKey, choice: Choice, measured: dict[Choice, float] | None = None) -> None:
        candidates = self._candidates.get(key, (choice,))
        self.timings_records[key] = timings_record(candidates, self._predicted.pop(key, None), measured or {})
        self._decisions[key] = choice
        self._candidates.pop(key, None)
        self._timings.pop(key, None)
        if self.cache_path is not None and self._is_writer():
            _write_cache(self.cache_path, self._decisions, self.timings_records)

    def _group(self) -> Any:
        if self.group is not None:
            return self.group
        if dist.is_available() and dist.is_initialized():
            return dist.group.WORLD
        return None

    def _is_writer(self) -> bool:
        group = self._group()
        return group is None or dist.get_rank(group) == 0

    def _load_cache(self, path: Path) -> tuple[dict[TuningKey, Choice], dict[TuningKey, list[dict[str, Any]]]]:
        group = self._group()
        if group is None or dist.get_world_size(group) == 1:
            return _read_cache(path)
        # Rank 0 reads and broadcasts (its decisions, or its error, so no rank is left waiting):
        # ranks that read different files would run different collectives and hang.
        payload: list[Any] = [None]
        if dist.get_rank(group) == 0:
            try:
                payload = [_read_cache(path)]
            except ValueError as error:
                payload = [error]
        dist.broadcast_object_list(payload, src=dist.get_global_rank(group, 0), group=group)
        if isinstance(payload[0], ValueError):
            raise payload[0]
        return payload[0]


def _check_key(key: Any) -> None:
    if not isinstance(key, TuningKey):
        raise TypeError(f"key must be a TuningKey, got {type(key).__name__}")


def _canonical(candidates: Sequence[Choice]) -> tuple[Choice, ...]:
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence):
        raise TypeError(f"candidates must be a sequence of Choice, got {type(candidates).__name__}")
    for choice in candidates:
        if not isinstance(choice, Choice):
            raise TypeError(f"candidates must hold Choice objects, got {type(choice).__name__}")
    if not candidates:
        raise ValueError("candidates must not be empty")
    return tuple(sorted(set(candidates)))


def _all_reduce_max(values: torch.Tensor, group: Any) -> torch.Tensor:
    # NCCL reduces CUDA tensors only; gloo (and others) take CPU tensors.
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    values = values.to(device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
    return values.cpu()


# --- the JSON cache ------------------------------------------------------------------------------


def _read_cache(path: Path) -> tuple[dict[TuningKey, Choice], dict[TuningKey, list[dict[str, Any]]]]:
    """The decisions, and the predicted and measured seconds kept beside them."""
    if not path.exists():
        return {}, {}
    data = read_json_document(path, CACHE_FORMAT, "flexmoe tuner cache")
    if data.get("version") != CACHE_VERSION:
        warnings.warn(
            f"tuner cache {path} has version {data.get('version')!r}, this flexmoe reads {CACHE_VERSION}: "
            "ignoring it (it is rewritten after the next decision)",
            stacklevel=4,
        )
        return {}, {}
    try:
        decisions = {TuningKey.from_json(entry["key"]): Choice.from_json(entry["choice"]) for entry in data["entries"]}
        timings = {TuningKey.from_json(e["key"]): e["timings"] for e in data["entries"] if "timings" in e}
        return decisions, timings
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"tuner cache {path} has a malformed entry ({error}); delete it to tune again") from None


def _write_cache(
    path: Path, decisions: dict[TuningKey, Choice], timings: dict[TuningKey, list[dict[str, Any]]]
) -> None:
    entries = [
        {"key": key.to_json(), "choice": choice.to_json(), **({"timings": timings[key]} if key in timings else {})}
        for key, choice in decisions.items()
    ]
    cache = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "entries": entries}
    write_text_atomically(path, json.dumps(cache, indent=1))


# --- measuring one layer call, forward and backward ------------------------------------------------


def _synchronize(device: torch.device) -> None:
    # CPU kernels are synchronous; CUDA kernels are queued, so wait for them before reading the clock.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _BackwardStart(torch.autograd.Function):
    """Identity on the layer output; its backward runs first in the layer's backward."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, mark: Callable[[], None]) -> torch.Tensor:
        ctx.mark = mark
        # A copy, not a view: callers may modify the output in place (autograd forbids that on
        # views made by a custom Function). Only while tuning, after the forward's clock reading.
        return out.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.mark()
        return grad, None


class _BackwardEnd(torch.autograd.Function):
    """Identity on the layer input; its backward runs last in the layer's backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mark: Callable[[], None]) -> torch.Tensor:
        ctx.mark = mark
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.mark()
        return grad, None


class _CallTimer:
    """Clock readings of one measured call; reports once, when the call is complete."""

    def __init__(self, device: torch.device, clock: Callable[[], float], on_measured: Callable[[float], None]):
        self.device, self.clock, self.on_measured = device, clock, on_measured
        self.forward_seconds = 0.0
        self.backward_started: float | None = None
        self.reported = False
        self.input_marked = False

    def now(self) -> float:
        _synchronize(self.device)
        return self.clock()

    def start_backward(self) -> None:
        self.backward_started = self.now()
        if not self.input_marked:
            # No input gradient to mark the end: nothing upstream gets a gradient through this
            # layer, so its backward ends with the backward pass (the engine runs this callback then).
            torch.autograd.Variable._execution_engine.queue_callback(self.end_backward)

    def end_backward(self) -> None:
        if self.backward_started is None or self.reported:
            return
        self.report(self.forward_seconds + self.now() - self.backward_started)

    def report(self, seconds: float) -> None:
        self.reported = True
        self.on_measured(seconds)


def measure_layer_call(
    run: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    on_measured: Callable[[float], None],
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> torch.Tensor:
    """``run(x)``, timed: returns its output and calls ``on_measured(seconds)`` once the call is over.

    x: the layer input ``[..., model_dim]``; run: the layer call with one fixed choice.
    When the output requires grad, the seconds are forward + this layer's backward: backward
    starts when the output's gradient arrives and ends when the input's gradient is computed
    (or, for an input that needs no gradient, when the backward pass ends), and
    ``on_measured`` is called from the backward pass; if no backward ever runs, nothing is
    reported (a tuner then hands out that candidate again). Otherwise (inference, ``no_grad``,
    frozen weights and input) it is the forward time, reported before returning.
    The device is synchronised around each reading (CUDA), so use this only while tuning.
    ``clock``: seconds as a float (injectable for tests).
    """
    timer = _CallTimer(x.device, clock, on_measured)
    if torch.is_grad_enabled() and x.requires_grad:
        x = _BackwardEnd.apply(x, timer.end_backward)
        timer.input_marked = True
    start = timer.now()
    out = run(x)
    timer.forward_seconds = timer.now() - start
    if not (torch.is_grad_enabled() and out.requires_grad):
        timer.report(timer.forward_seconds)
        return out
    return _BackwardStart.apply(out, timer.start_backward)
