"""Parallel-corpus records and the user's own TSV files.

A :class:`Pair` is one translation example; a :class:`Corpus` holds named splits of them.
The embedded CLDR/num2words corpus (``flexmoe_mt.data.cldr``) and a user's TSV files produce the
same types, so everything downstream (tokenizer, sampler, training) reads one interface.
Tasks are target languages: ``Pair.target_lang`` is the task a task-routed decoder routes on.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

TSV_COLUMNS = ("source_lang", "target_lang", "source", "target")
# The embedded corpus's splits; a TSV corpus has the first three.
SPLITS = ("train", "valid", "test", "test_compositional")


@dataclass(frozen=True)
class Pair:
    """One example. ``source`` carries no ``<2xx>`` tag: the tokenizer adds the target tag.

    kind: what generated it (``"cardinal"``, ``"date"``, ..., ``"user"`` for TSV input).
    item: id of the underlying item (the date, quantity or name) shared by every language's
    rendering of it; splits are made by item so no test item is seen in training.
    """

    source: str
    target: str
    source_lang: str
    target_lang: str
    kind: str = "user"
    item: str = ""


@dataclass
class Corpus:
    """Named splits (``"train"``, ``"valid"``, ``"test"``, optionally ``"test_compositional"``)."""

    splits: dict[str, list[Pair]] = field(default_factory=dict)

    def __getitem__(self, split: str) -> list[Pair]:
        if split not in self.splits:
            raise KeyError(f"no split {split!r}; splits are {sorted(self.splits)}")
        return self.splits[split]

    @property
    def target_languages(self) -> list[str]:
        """Every target language (task) in any split, sorted."""
        return sorted({p.target_lang for pairs in self.splits.values() for p in pairs})

    @property
    def languages(self) -> list[str]:
        """Every language on either side, sorted."""
        return sorted(
            {lang for pairs in self.splits.values() for p in pairs for lang in (p.source_lang, p.target_lang)}
        )

    def counts(self, split: str) -> Counter[tuple[str, str, str]]:
        """(source_lang, target_lang, kind) -> number of pairs in ``split``."""
        return Counter((p.source_lang, p.target_lang, p.kind) for p in self[split])


def read_tsv(path: str | Path, kind: str = "user") -> list[Pair]:
    """Read ``source_lang<TAB>target_lang<TAB>source<TAB>target`` lines (a header line with
    exactly those names is allowed). Raises ``ValueError`` naming the file and line on a bad row."""
    path = Path(path)
    pairs = []
    with path.open(encoding="utf-8", newline="") as handle:
        for line_number, row in enumerate(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if line_number == 1 and tuple(row) == TSV_COLUMNS:
                continue
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(TSV_COLUMNS) or not all(cell.strip() for cell in row):
                raise ValueError(
                    f"{path}:{line_number}: expected {len(TSV_COLUMNS)} non-empty tab-separated columns "
                    f"{TSV_COLUMNS}, got {len(row)}: {row!r}"
                )
            source_lang, target_lang, source, target = (cell.strip() for cell in row)
            pairs.append(Pair(source, target, source_lang, target_lang, kind, f"{path.name}:{line_number}"))
    return pairs


def load_tsv(splits: Mapping[str, str | Path]) -> Corpus:
    """A corpus from the user's TSV files, one per split: ``load_tsv({"train": "a.tsv", "test": "b.tsv"})``."""
    if "train" not in splits:
        raise ValueError(f"splits must include 'train', got {sorted(splits)}")
    return Corpus({name: read_tsv(path) for name, path in splits.items()})
