"""Which (parallel degree, overlap degree, all-to-all algorithm) choices a layer can run.

Every valid choice gives the same result (to float tolerance); they differ only in speed,
which is what a tuner measures. Validation is local and identical on every rank (every rank
passes the same arguments), so an invalid choice raises before any collective.
"""

from __future__ import annotations

from flexmoe.parallel.config import OVERLAP_CANDIDATES, ParallelChoice
from flexmoe.parallel.groups import ParallelGroups
from flexmoe.parallel.layout import ExpertLayout


def valid_degrees(layout: ExpertLayout, gatherable: bool) -> list[int]:
    """0 and the divisors of S for built-in experts; experts we cannot gather run at r = 1 only."""
    return layout.valid_degrees() if gatherable else [1]


def valid_choices(layout: ExpertLayout, groups: ParallelGroups | None, gatherable: bool) -> list[ParallelChoice]:
    """Every valid choice; single-process (groups None): only the default, ``ParallelChoice(1)``.

    Built-in experts (``gatherable``) run every choice on exact counts or padded blocks (2dh:
    padded only); custom experts run padded blocks at r = 1."""
    if groups is None:
        return [ParallelChoice(1)]
    exacts = (False, True) if gatherable else (False,)
    choices = []
    for degree in valid_degrees(layout, gatherable):
        if degree == 0:  # no token exchange: d and the algorithm play no part
            choices += [ParallelChoice(0, exact=exact) for exact in exacts]
            continue
        choices += [ParallelChoice(degree, d, "linear", exact) for d in OVERLAP_CANDIDATES for exact in exacts]
        if groups.supports_2dh(layout, degree):
            choices += [ParallelChoice(degree, d, "2dh") for d in OVERLAP_CANDIDATES]
    return choices


def check_choice(
    choice: ParallelChoice, layout: ExpertLayout | None, groups: ParallelGroups | None, gatherable: bool
) -> ParallelChoice:
    """Return ``choice`` or raise ValueError naming what is accepted for this layout and group
    (single process, ``groups`` None: the layout plays no part)."""
    if groups is None:
        if choice.parallel_degree > 1 or choice.a2a_algorithm != "linear":
            raise ValueError(f"a single-process layer runs parallel_degree 0 or 1 and 'linear', got {choice}")
        return choice
    if choice.exact and not gatherable:
        raise ValueError(f"custom experts run padded blocks only (exact=False), got {choice}")
    degrees = valid_degrees(layout, gatherable)
    if choice.parallel_degree not in degrees:
        raise ValueError(f"parallel_degree must be one of {degrees} for this layout ({layout}), got {choice}")
    degree = choice.parallel_degree
    if choice.a2a_algorithm == "2dh" and degree and not groups.supports_2dh(layout, degree):
        raise ValueError(
            "a2a_algorithm='2dh' needs the whole group in the all-to-all (parallel_degree = shards per "
            f"expert = {layout.shards_per_expert}) and 1 < local_world_size "
            f"({groups.local_world_size}) < world_size ({groups.world_size})"
        )
    return choice
