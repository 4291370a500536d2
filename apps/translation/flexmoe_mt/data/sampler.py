"""Temperature sampling over tasks (target languages), as in multilingual NMT (T = 5).

Language ``l`` with ``n_l`` training pairs is drawn with probability ``n_l^(1/T) / sum_k n_k^(1/T)``,
then one of its pairs uniformly: T = 1 samples pairs uniformly, large T samples languages uniformly,
so small languages are seen more often than their share of the data.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence

import torch

from flexmoe_mt.data.corpus import Pair


class TemperatureSampler:
    """Seeded, deterministic sampler of indices into ``pairs``, grouped by ``Pair.target_lang``
    (or by ``groups``: one sortable label per pair, e.g. the direction's id).

    ``sample(count)`` -> index tensor ``[count]``; ``batches(batch_size)`` yields index lists
    forever; iterating yields pairs forever. ``state_dict()`` / ``load_state_dict()`` resume exactly.
    """

    def __init__(
        self, pairs: Sequence[Pair], temperature: float = 5.0, seed: int = 0, groups: Sequence[Hashable] | None = None
    ) -> None:
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if len(pairs) == 0:
            raise ValueError("pairs must be non-empty")
        self.pairs = pairs
        self.temperature = float(temperature)
        if groups is None:
            groups = [pair.target_lang for pair in pairs]
        elif len(groups) != len(pairs):
            raise ValueError(f"groups must hold one label per pair ({len(pairs)}), got {len(groups)}")
        self.languages: list = sorted(set(groups))  # the group labels (target languages by default)
        slot = {language: i for i, language in enumerate(self.languages)}
        owners = torch.tensor([slot[group] for group in groups])
        # Pair indices sorted by language: language i owns _order[_starts[i] : _starts[i] + _sizes[i]].
        self._order = torch.argsort(owners, stable=True)
        self._sizes = torch.bincount(owners, minlength=len(self.languages))
        self._starts = torch.cumsum(self._sizes, 0) - self._sizes
        weights = self._sizes.double() ** (1.0 / self.temperature)
        self.probabilities: torch.Tensor = weights / weights.sum()  # [languages], float64
        self.generator = torch.Generator().manual_seed(seed)

    def language_probabilities(self) -> dict[str, float]:
        """target language -> probability that a draw comes from it."""
        return dict(zip(self.languages, self.probabilities.tolist()))

    def sample(self, count: int) -> torch.Tensor:
        """``count`` indices into ``pairs``: ``[count]`` int64."""
        language = torch.multinomial(self.probabilities, count, replacement=True, generator=self.generator)
        position = torch.rand(count, generator=self.generator, dtype=torch.float64) * self._sizes[language]
        position = torch.minimum(position.long(), self._sizes[language] - 1)  # guard the float edge case
        return self._order[self._starts[language] + position]

    def batches(self, batch_size: int) -> Iterator[list[int]]:
        """Endless index batches of ``batch_size``."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        while True:
            yield self.sample(batch_size).tolist()

    def __iter__(self) -> Iterator[Pair]:
        while True:
            for index in self.sample(1024).tolist():
                yield self.pairs[index]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
