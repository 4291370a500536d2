"""Collective agreement: the same settings on every rank, one capacity.

At construction one small all_reduce(MAX) carries each setting as ``(v, -v)`` (so the max and
the min come back together). Every forward checks its settings inside the count exchange it needs
anyway (:mod:`flexmoe.parallel.counts`), with :func:`check_settings_rows`. Settings that differ
raise the same ``ValueError`` on every rank instead of a hang in a mismatched collective.

A call whose arguments are invalid on some rank still meets its peers in that exchange, with the
``refused`` setting naming the invalid argument (1 + its index in :data:`CALL_ARGUMENTS`; 0 for a
valid call): every rank then raises :class:`CallRefused` naming the argument and the rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from flexmoe.parallel.config import A2A_ALGORITHMS

# The per-call arguments a rank can refuse, as the ``refused`` setting numbers them.
CALL_ARGUMENTS = ("x", "top_k", "capacity_factor", "padding_mask", "parallel choice", "routing inputs")
_SPELLED_OUT = {
    "parallel choice": "parallel choice (parallel_degree, overlap_degree, a2a_algorithm, exact)",
    "routing inputs": "routing inputs (task_ids, sentence_inputs, x's shape)",
}

_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)


def _describe(name: str, low: int, high: int) -> str:
    if name == "dtype":
        names = [str(d) for d in _DTYPES] + ["other"]
        return f"dtype differs ({names[low]} vs {names[high]})"
    if name == "layer":
        return (
            f"MoELayers called in a different order on different ranks (layer {low} vs {high} in construction "
            "order): every rank must call the group's layers in the same order"
        )
    if name == "a2a_algorithm":
        return f"a2a_algorithm differs ({A2A_ALGORITHMS[low]!r} vs {A2A_ALGORITHMS[high]!r})"
    return f"{name} differs ({low} vs {high})"


def agree_across_ranks(settings: dict[str, int], capacity: int, group: dist.ProcessGroup, device: torch.device) -> int:
    """Check ``settings`` (name -> int) are equal on every rank of ``group`` and return the
    largest ``capacity`` of any rank. Raises ValueError on every rank when a setting differs."""
    values = torch.tensor(list(settings.values()), dtype=torch.int64)
    packed = torch.cat([values, -values, torch.tensor([capacity])]).to(device)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    packed = packed.cpu()
    count = len(settings)
    highs, lows = packed[:count].tolist(), (-packed[count : 2 * count]).tolist()
    _raise_if_differing(list(settings), lows, highs)
    return int(packed[-1])


class CallRefused(ValueError):
    """A call's arguments were invalid on some rank of the group: raised on every rank."""


def refusal_code(argument: str) -> int:
    """The ``refused`` setting of a call whose ``argument`` (one of :data:`CALL_ARGUMENTS`) is invalid."""
    return 1 + CALL_ARGUMENTS.index(argument)


def check_settings_rows(names: list[str], rows: list[list[int]]) -> None:
    """rows: every rank's settings (``rows[i]``: rank i's values, named ``names``). Raises the
    same ValueError as :func:`agree_across_ranks` when a setting differs, and
    :class:`CallRefused` first when a rank refused the call; every rank sees all rows, so every
    rank raises."""
    if "refused" in names:
        column = names.index("refused")
        arguments = [CALL_ARGUMENTS[row[column] - 1] if row[column] else None for row in rows]
        refused = [f"{_SPELLED_OUT.get(a, a)} is invalid on rank {i}" for i, a in enumerate(arguments) if a]
        if refused:
            raise CallRefused(
                "MoELayer call refused on every rank of the group: "
                + ", ".join(refused)
                + " (that rank's error names the fix; every rank must pass valid arguments)"
            )
    columns = list(zip(*rows))
    _raise_if_differing(names, [min(c) for c in columns], [max(c) for c in columns])


def _raise_if_differing(names: list[str], lows: list[int], highs: list[int]) -> None:
    differing = [_describe(name, lo, hi) for name, lo, hi in zip(names, lows, highs) if lo != hi]
    if differing:
        raise ValueError(
            "MoELayer settings must be equal on every rank of the process group: "
            + "; ".join(differing)
            + " (values shown are the smallest and largest over the ranks)"
        )
