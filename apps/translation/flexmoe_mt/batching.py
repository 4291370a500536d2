"""From corpus pairs to padded id tensors: task tables, encoding, temperature sampling, batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from flexmoe_mt.data.corpus import Pair
from flexmoe_mt.tokenizer import BOS_ID, PAD_ID, Tokenizer


@dataclass(frozen=True)
class TaskTable:
    """Names of the tasks: target languages (target routing) and directions (langpair routing)."""

    target_languages: tuple[str, ...]
    lang_pairs: tuple[tuple[str, str], ...]

    @classmethod
    def from_pairs(cls, pairs: Sequence[Pair]) -> TaskTable:
        return cls(
            tuple(sorted({p.target_lang for p in pairs})),
            tuple(sorted({(p.source_lang, p.target_lang) for p in pairs})),
        )

    def to_dict(self) -> dict[str, list]:
        """JSON-ready: ``{"target_languages": [...], "lang_pairs": [[src, tgt], ...]}``."""
        return {"target_languages": list(self.target_languages), "lang_pairs": [list(p) for p in self.lang_pairs]}

    @classmethod
    def from_dict(cls, state: dict) -> TaskTable:
        """The inverse of :meth:`to_dict` (extra keys in ``state`` are ignored)."""
        return cls(tuple(state["target_languages"]), tuple(tuple(p) for p in state["lang_pairs"]))

    def target_id(self, lang: str) -> int:
        if lang not in self.target_languages:
            known = ", ".join(self.target_languages)
            raise ValueError(f"target language {lang!r} is not one the model translates into: {known}")
        return self.target_languages.index(lang)

    def pair_id(self, source_lang: str, target_lang: str) -> int:
        # A direction unseen in training still decodes (its target routing is known); it
        # borrows the first pair's id only for langpair-routed layers, which cannot serve it.
        pair = (source_lang, target_lang)
        return self.lang_pairs.index(pair) if pair in self.lang_pairs else 0


@dataclass
class EncodedPairs:
    """Token ids of a list of pairs, with their task ids (parallel lists)."""

    pairs: list[Pair]
    sources: list[list[int]]
    targets: list[list[int]]
    target_lang: list[int]
    lang_pair: list[int]


def encode_pairs(pairs: Sequence[Pair], tokenizer: Tokenizer, tasks: TaskTable, max_len: int) -> EncodedPairs:
    """Encode with ``<2xx>`` tags; sequences are cut to ``max_len - 1`` ids (eos kept last)."""

    def cut(ids: list[int]) -> list[int]:
        return ids if len(ids) < max_len else [*ids[: max_len - 2], ids[-1]]

    return EncodedPairs(
        list(pairs),
        [cut(tokenizer.encode_source(p.source, p.target_lang)) for p in pairs],
        [cut(tokenizer.encode_target(p.target)) for p in pairs],
        [tasks.target_id(p.target_lang) for p in pairs],
        [tasks.pair_id(p.source_lang, p.target_lang) for p in pairs],
    )


def pad(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Ragged id lists -> [len(rows), longest] padded with ``PAD_ID``."""
    out = torch.full((len(rows), max(map(len, rows))), PAD_ID, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def collate(data: EncodedPairs, indices: Sequence[int]) -> dict[str, torch.Tensor]:
    """A batch: source [B, S], target_in [B, T] (bos + target[:-1]), target_out [B, T],
    target_lang [B], lang_pair [B]."""
    targets = [data.targets[i] for i in indices]
    return {
        "source": pad([data.sources[i] for i in indices]),
        "target_in": pad([[BOS_ID, *t[:-1]] for t in targets]),
        "target_out": pad(targets),
        "target_lang": torch.tensor([data.target_lang[i] for i in indices]),
        "lang_pair": torch.tensor([data.lang_pair[i] for i in indices]),
    }


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments of ``TranslationModel.forward`` in a batch."""
    return {key: batch[key] for key in ("source", "target_in", "target_lang", "lang_pair")}


def in_order_batches(data: EncodedPairs, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """:func:`collate`'d batches of ``batch_size`` consecutive examples, covering ``data`` in order."""
    for start in range(0, len(data.sources), batch_size):
        yield collate(data, range(start, min(start + batch_size, len(data.sources))))
