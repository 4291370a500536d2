"""Task routing on converted transformers models: which layers route by task, how task ids reach
them through the model's own ``forward`` and ``generate``, and task embeddings initialised from
the pretrained token router.

A task-routed :class:`~flexmoe.MoELayer` routes on a learned embedding of the task id instead of
on each token (Kudugunta et al., 2021): every token of a task goes to the same top-k experts, so
the layer folds into one dense FFN per task (:func:`flexmoe.integrations.export.export_task_model`).

    embeddings = initial_task_embeddings(model, batches, num_tasks=3)  # pretrained model, token routing
    to_flexmoe(model, granularity=["token", "task"], num_tasks=3)       # per MoE block
    set_task_embeddings(model, embeddings)                              # start close to the original
    with route_tasks(model, torch.tensor([0, 2])):                 # one task per batch row
        model.generate(input_ids, max_new_tokens=8)

transformers' code is not changed: :func:`route_tasks` registers forward pre-hooks on the task-routed
layers that pass ``task_ids`` to them and removes the hooks on exit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import nn

from flexmoe.config import MoEConfig
from flexmoe.layer import MoELayer
from flexmoe.routing.granularity import GRANULARITIES
from flexmoe.routing.scores import routing_scores

GranularityChoice = str | Sequence[str] | Callable[[int], str]
InitMethod = Literal["mean_scores", "mean_input"]
INIT_METHODS = ("mean_scores", "mean_input")


def layer_granularities(granularity: GranularityChoice, num_layers: int) -> list[str]:
    """The granularity of each of ``num_layers`` MoE blocks (in module order).

    granularity: one of ``"token"``, ``"sentence"``, ``"task"`` for every block, a sequence of one
    per block, or a callable ``index -> granularity`` (index: the block's position among the
    model's MoE blocks, 0 = the lowest), e.g. ``lambda i: "task" if i >= 2 else "token"``.
    """
    if isinstance(granularity, str):
        chosen = [granularity] * num_layers
    elif callable(granularity):
        chosen = [granularity(index) for index in range(num_layers)]
    elif isinstance(granularity, Sequence):
        chosen = list(granularity)
        if len(chosen) != num_layers:
            raise ValueError(
                f"granularity: a sequence needs one entry per MoE block ({num_layers}), got {len(chosen)}; "
                "or pass one string for all blocks, or a callable index -> granularity"
            )
    else:
        raise TypeError(f"granularity must be a str, a sequence of str or a callable, got {type(granularity).__name__}")
    bad = sorted({repr(g) for g in chosen if g not in GRANULARITIES})
    if bad:
        raise ValueError(f"granularity must be one of {GRANULARITIES} for every MoE block, got {', '.join(bad)}")
    return chosen


def task_embedding_state(config: MoEConfig, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """The initial ``task_embedding.weight`` [num_tasks, model_dim] of a converted task-routed
    layer (zeros: uniform scores until :func:`set_task_embeddings`), or {} for other layers.

    The pretrained router (weight [num_experts, model_dim]) is kept, so the embedding must have the
    model's width.
    """
    if config.granularity != "task":
        return {}
    if config.router_input_dim != config.model_dim:
        raise ValueError(
            f"task_embedding_dim must be the model's hidden size ({config.model_dim}) to reuse the pretrained "
            f"router, got {config.task_embedding_dim}; leave it unset"
        )
    zeros = torch.zeros(config.num_tasks, config.model_dim, dtype=like.dtype, device=like.device)
    return {"task_embedding.weight": zeros}


def task_routed_layers(model: nn.Module) -> list[MoELayer]:
    """The task-routed MoELayers of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, MoELayer) and m.config.granularity == "task"]


def _as_task_ids(task_ids: torch.Tensor | int | Sequence[int]) -> torch.Tensor:
    if isinstance(task_ids, bool):
        raise TypeError("task_ids must be an int, a sequence of ints or an integer tensor, got a bool")
    if isinstance(task_ids, int):
        return torch.tensor([task_ids])
    if not isinstance(task_ids, torch.Tensor):
        task_ids = torch.as_tensor(list(task_ids))
    if task_ids.is_floating_point() or task_ids.dtype == torch.bool or task_ids.dim() > 1:
        raise TypeError(
            "task_ids must be an int or one integer per batch row ([batch]), "
            f"got {task_ids.dtype} {tuple(task_ids.shape)}"
        )
    return task_ids.reshape(-1).long()


def _rows_task_ids(task_ids: torch.Tensor, layer: MoELayer, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook: ``task_ids`` [batch] for the layer's input [batch, seq, model_dim].

    One id serves every row; ``batch = n * len(task_ids)`` repeats each id n times in a row, as
    ``generate`` expands rows for beams or ``num_return_sequences``.
    """
    if kwargs.get("task_ids") is not None:  # an explicit argument wins
        return None
    x = args[0] if args else kwargs["x"]
    if x.dim() < 3:
        raise ValueError(
            f"route_tasks needs the layer input as [batch, seq, model_dim] to tell rows apart, got {tuple(x.shape)}; "
            "pass task_ids per token to the layer instead"
        )
    rows, ids = x.shape[0], task_ids
    if rows % len(ids):
        raise ValueError(
            f"route_tasks got {len(ids)} task ids for a batch of {rows} rows: pass one id per row, one id for all "
            "rows, or ids whose count divides the batch (generate's beams / num_return_sequences)"
        )
    ids = ids.repeat_interleave(rows // len(ids)).to(x.device)
    return args, {**kwargs, "task_ids": ids}


@contextmanager
def route_tasks(model: nn.Module, task_ids: torch.Tensor | int | Sequence[int]) -> Iterator[None]:
    """Inside the block, every task-routed MoELayer of ``model`` routes by ``task_ids``.

    task_ids: one int for every row, or ``[batch]`` (one task per batch row). Works through the
    model's ``forward`` and ``generate`` (every decoding step has the same rows; beams and
    ``num_return_sequences`` repeat each row's id). Not thread-safe: the hooks belong to the model.
    """
    layers = task_routed_layers(model)
    if not layers:
        raise ValueError(
            f"model {type(model).__name__} has no task-routed MoELayer: convert it with "
            "to_flexmoe(model, granularity='task', num_tasks=N)"
        )
    ids = _as_task_ids(task_ids)
    num_tasks = min(layer.config.num_tasks for layer in layers)
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= num_tasks:
        raise ValueError(f"task_ids must be in 0..num_tasks-1 = 0..{num_tasks - 1}, got {ids.tolist()}")
    hook = partial(_rows_task_ids, ids)
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's MoE blocks in module order: transformers' own, or converted ones."""
    from flexmoe.integrations.transformers import FlexMoEBlock, _find_blocks, _is_moe_block

    return [b for _, _, b in _find_blocks(model, lambda m: isinstance(m, FlexMoEBlock) or _is_moe_block(m))]


def _block_router(block: nn.Module) -> tuple[torch.Tensor, str]:
    """(router weight [num_experts, hidden], score function) of a transformers or converted MoE block."""
    from flexmoe.integrations.transformers import FlexMoEBlock, _describe

    if isinstance(block, FlexMoEBlock):
        return block.moe.router.weight.detach(), block.moe.config.score_function
    conversion = _describe(block)  # views of the block's tensors, no copy
    return conversion.state["router.weight"], conversion.config.score_function


@dataclass
class _TaskSums:
    """Per-task sums over tokens of one block's router input and router scores."""

    inputs: torch.Tensor  # [num_tasks, hidden]
    scores: torch.Tensor  # [num_tasks, num_experts]


def _embeddings(sums: _TaskSums, counts: torch.Tensor, weight: torch.Tensor, score_function: str, method: str):
    """[num_tasks, hidden] task embeddings of one block from its per-task sums."""
    if method == "mean_input":
        return sums.inputs / counts[:, None]
    mean_scores = (sums.scores / counts[:, None]).clamp(1e-12, 1 - 1e-12)
    # The router logits whose scores are the mean scores: log p (softmax: up to a constant, which
    # softmax ignores) or the inverse sigmoid; the embedding is the least-norm solution of
    # router(e) = logits, exact when num_experts <= hidden (the router's rows are independent).
    logits = mean_scores.log() if score_function == "softmax" else torch.logit(mean_scores)
    return logits @ torch.linalg.pinv(weight.to(torch.float64)).T


@torch.no_grad()
def initial_task_embeddings(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    num_tasks: int,
    method: InitMethod = "mean_scores",
) -> list[torch.Tensor]:
    """Task embeddings from the pretrained token router: one ``[num_tasks, hidden]`` tensor (float64)
    per MoE block, in module order (what :func:`set_task_embeddings` takes).

    Run it on the pretrained model (its token routing decides the hidden states) before
    ``to_flexmoe(..., granularity="task")``. method:
      * ``"mean_scores"``: the embedding whose router scores are the mean scores of the task's
        tokens, so the task starts on the experts its tokens use most, with gates in proportion
        (exact when ``num_experts <= hidden``, else the least-squares fit);
      * ``"mean_input"``: the mean router input of the task's tokens: the experts of the highest
        mean router logit.

    batches: dicts with ``input_ids`` [batch, seq], ``task_ids`` [batch] and optionally
    ``attention_mask`` [batch, seq] (0 = padding, left out of the means); other keys go to the model.
    """
    if method not in INIT_METHODS:
        raise ValueError(f"method must be one of {INIT_METHODS}, got {method!r}")
    blocks = _moe_blocks(model)
    if not blocks:
        raise ValueError(f"model {type(model).__name__} has no MoE block")
    routers = [_block_router(block) for block in blocks]
    sums: list[_TaskSums | None] = [None] * len(blocks)
    counts = torch.zeros(num_tasks, dtype=torch.float64)
    current: dict[str, torch.Tensor] = {}

    def record(index: int, module: nn.Module, args: tuple) -> None:
        hidden = args[0].detach()  # [batch, seq, hidden]
        weight, score_function = routers[index]
        scores = routing_scores(hidden @ weight.T.to(hidden.dtype), score_function).to(torch.float64)
        per_token = current["per_token"].to(hidden.device)  # [batch, seq, num_tasks], 0 at padding
        block_sums = _TaskSums(
            torch.einsum("bst,bsh->th", per_token, hidden.to(torch.float64)),
            torch.einsum("bst,bse->te", per_token, scores),
        )
        if sums[index] is not None:
            block_sums = _TaskSums(sums[index].inputs + block_sums.inputs, sums[index].scores + block_sums.scores)
        sums[index] = block_sums

    handles = [block.register_forward_pre_hook(partial(record, i)) for i, block in enumerate(blocks)]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = dict(batch)
            task_ids = _as_task_ids(batch.pop("task_ids"))
            input_ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            mask = torch.ones(input_ids.shape, dtype=torch.float64) if mask is None else mask.to(torch.float64).cpu()
            if task_ids.numel() != input_ids.shape[0] or int(task_ids.min()) < 0 or int(task_ids.max()) >= num_tasks:
                raise ValueError(
                    f"task_ids must give one task in 0..{num_tasks - 1} per row of input_ids "
                    f"({input_ids.shape[0]} rows), got {task_ids.tolist()}"
                )
            one_hot = torch.nn.functional.one_hot(task_ids, num_tasks).to(torch.float64)  # [batch, num_tasks]
            current["per_token"] = one_hot[:, None, :] * mask[:, :, None]
            counts += current["per_token"].sum((0, 1))
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    missing = [t for t in range(num_tasks) if counts[t] == 0]
    if missing:
        raise ValueError(f"batches hold no token of task(s) {missing}: give every task some tokens")
    return [
        _embeddings(block_sums, counts.to(block_sums.inputs.device), weight, score_function, method)
        for block_sums, (weight, score_function) in zip(sums, routers)
    ]


@torch.no_grad()
def set_task_embeddings(model: nn.Module, embeddings: Sequence[torch.Tensor]) -> None:
    """Copy ``embeddings`` (one ``[num_tasks, hidden]`` per MoE block, module order, as from
    :func:`initial_task_embeddings`) into the task embeddings of the task-routed blocks; entries of
    blocks routed otherwise are ignored."""
    from flexmoe.integrations.transformers import FlexMoEBlock

    blocks = _moe_blocks(model)
    if len(embeddings) != len(blocks):
        raise ValueError(f"embeddings: one per MoE block ({len(blocks)}) is needed, got {len(embeddings)}")
    for index, (block, embedding) in enumerate(zip(blocks, embeddings)):
        if not isinstance(block, FlexMoEBlock):
            raise ValueError(f"MoE block {index} ({type(block).__name__}) is not converted: call to_flexmoe first")
        table = block.moe.task_embedding
        if table is None:
            continue
        if tuple(embedding.shape) != tuple(table.weight.shape):
            raise ValueError(
                f"embeddings[{index}] must have shape [num_tasks, hidden] = {tuple(table.weight.shape)}, "
                f"got {tuple(embedding.shape)}"
            )
        table.weight.copy_(embedding)
