"""Splits by underlying item: no test item is seen in training, in any kind or language.

Each item id hashes (with the seed) to a number in [0, 1) that picks its split, so an item's split
does not depend on which languages or kinds are built. Items with parts (a date's year and month,
a quantity's unit and number) whose *combination* hashes under ``compositional_fraction`` form
``test_compositional``: their combination never occurs in training, while each part does.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable

from flexmoe_mt.data.corpus import Pair
from flexmoe_mt.data.kinds import combination_of, parts_of


def unit_interval(seed: int, salt: str, key: str) -> float:
    """A deterministic uniform number in [0, 1) for ``key`` (independent of Python's hash seed)."""
    digest = hashlib.sha256(f"{seed}:{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(
    item_ids: Iterable[str], valid_fraction: float, test_fraction: float, compositional_fraction: float, seed: int
) -> dict[str, str]:
    """item id -> split name. Items of a held-out combination whose parts are not all seen in
    training go to ``"test"`` (still unseen items, just not a compositional test)."""
    split_of: dict[str, str] = {}
    candidates = []
    for item_id in item_ids:
        combination = combination_of(item_id)
        if combination and unit_interval(seed, "combination", combination) < compositional_fraction:
            candidates.append(item_id)
            continue
        u = unit_interval(seed, "item", item_id)
        split_of[item_id] = "valid" if u < valid_fraction else "test" if u < valid_fraction + test_fraction else "train"
    train_parts = {part for item_id, split in split_of.items() if split == "train" for part in parts_of(item_id)}
    for item_id in candidates:
        split_of[item_id] = "test_compositional" if set(parts_of(item_id)) <= train_parts else "test"
    return split_of


def demote_unseen_compositions(splits: dict[str, list[Pair]]) -> int:
    """Move compositional pairs to ``"test"`` when one of their parts never occurs in the training
    pairs of the same direction (a locale that cannot render some training items). Returns how many moved."""
    seen = defaultdict(set)
    for pair in splits["train"]:
        seen[pair.source_lang, pair.target_lang].update(parts_of(pair.item))
    kept, moved = [], []
    for pair in splits["test_compositional"]:
        fits = set(parts_of(pair.item)) <= seen[pair.source_lang, pair.target_lang]
        (kept if fits else moved).append(pair)
    splits["test_compositional"] = kept
    splits["test"].extend(moved)
    return len(moved)
