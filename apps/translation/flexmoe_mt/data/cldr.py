"""The embedded multilingual corpus: English <-> many locales, rendered from CLDR (babel) and num2words.

``build_corpus(CorpusConfig.demo())`` renders every item of every kind in English and in each
target locale, pairs the renderings (en->xx and xx->en), splits them by item and caches the result
on disk, keyed by the config and the versions of babel and num2words. Nothing is downloaded: the
data ships inside those two packages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import babel
from babel import Locale, UnknownLocaleError
from tqdm import tqdm

from flexmoe_mt.data.corpus import SPLITS, Corpus, Pair
from flexmoe_mt.data.kinds import (
    DIGIT_KINDS,
    FALLBACK_KIND,
    FAMILIES,
    FAMILY_OF_KIND,
    KINDS,
    NAME_KINDS,
    Item,
    Unrenderable,
    render,
    reset_locale_data,
)
from flexmoe_mt.data.splits import assign_splits, demote_unseen_compositions

Direction = Literal["en->xx", "xx->en"]
DIRECTIONS: tuple[Direction, ...] = ("en->xx", "xx->en")

# Locales where both num2words and babel work (CLDR codes; see NUM2WORDS_LANGUAGE for the mapping).
# Not "am": num2words hangs on some Amharic numbers (an explicit "am" gets the CLDR kinds only).
DEFAULT_LANGUAGES: tuple[str, ...] = (
    "ar", "az", "be", "bn", "ca", "ce", "cs", "cy", "da", "de", "eo", "es", "fa", "fi", "fr",
    "he", "hu", "id", "is", "it", "ja", "kk", "kn", "ko", "lt", "lv", "nb", "nl", "pl", "pt", "ro",
    "ru", "sk", "sl", "sr_Latn", "sv", "te", "tg", "th", "tr", "uk", "vi",
)  # fmt: skip
# Typologically varied, seven scripts: Latin, Cyrillic, Arabic, Hebrew, Japanese, Hangul, Thai.
DEMO_LANGUAGES: tuple[str, ...] = ("de", "fr", "es", "fi", "tr", "pl", "ru", "ar", "he", "ja", "ko", "th")

# Bump when the rendering or the file layout changes: old cache entries are then never read.
CORPUS_FORMAT_VERSION = 1
SOURCE_LANGUAGE = "en"


@dataclass(frozen=True)
class CorpusConfig:
    """What to build. Sizes: at most ``items_per_kind`` items per family of kinds (names, months and
    days have fewer), each rendered in every language and direction that supports its kind.

    languages: target locales (CLDR codes such as ``"ru"``, ``"sr_Latn"``); English is always the other side.
    kinds: subset of :data:`flexmoe_mt.data.kinds.KINDS`.
    directions: ``"en->xx"`` (English source) and/or ``"xx->en"``.
    valid_fraction, test_fraction, compositional_fraction: shares of items (see :mod:`flexmoe_mt.data.splits`).
    """

    languages: tuple[str, ...] = DEFAULT_LANGUAGES
    kinds: tuple[str, ...] = KINDS
    items_per_kind: int = 1000
    directions: tuple[Direction, ...] = DIRECTIONS
    valid_fraction: float = 0.05
    test_fraction: float = 0.1
    compositional_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("languages", "kinds", "directions"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"{name} must be a sequence of strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
            if not value or len(set(value)) != len(value):
                raise ValueError(f"{name} must be non-empty and without repeats, got {value!r}")
        for code in self.languages:
            _check_locale(code)
        _check_subset("kinds", self.kinds, KINDS)
        _check_subset("directions", self.directions, DIRECTIONS)
        if not isinstance(self.items_per_kind, int) or isinstance(self.items_per_kind, bool) or self.items_per_kind < 1:
            raise ValueError(f"items_per_kind must be a positive int, got {self.items_per_kind!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        for name in ("valid_fraction", "test_fraction", "compositional_fraction"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        if self.valid_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"valid_fraction + test_fraction must be < 1 (training needs items), "
                f"got {self.valid_fraction} + {self.test_fraction}"
            )

    @classmethod
    def demo(cls, **overrides) -> CorpusConfig:
        """The ``make demo`` preset: 12 languages in 7 scripts, every kind, both directions."""
        return cls(**{"languages": DEMO_LANGUAGES, **overrides})

    def cache_key(self) -> str:
        """Hash of the config, the corpus format and the versions of the packages the text comes from."""
        payload = {
            "config": dataclasses.asdict(self),
            "format": CORPUS_FORMAT_VERSION,
            "babel": babel.__version__,
            "num2words": version("num2words"),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _check_locale(code: str) -> None:
    if code == SOURCE_LANGUAGE:
        raise ValueError("languages: 'en' is the source side of every pair; list target locales only")
    try:
        Locale.parse(code)
    except (UnknownLocaleError, ValueError) as error:
        raise ValueError(
            f"languages: unknown locale {code!r} (babel/CLDR has no such locale; e.g. {DEMO_LANGUAGES})"
        ) from error


def _check_subset(name: str, values: tuple[str, ...], accepted: tuple[str, ...]) -> None:
    unknown = [v for v in values if v not in accepted]
    if unknown:
        raise ValueError(f"{name}: unknown {unknown}; accepted values are {accepted}")


@dataclass(frozen=True)
class KindSupport:
    """How one kind fared in one locale: items rendered, items the locale could not render, and
    ``reason`` why the whole kind was left out (``""`` when it is in the corpus)."""

    rendered: int
    skipped: int
    reason: str = ""


@dataclass
class CorpusBuild:
    """A built corpus and, per target locale and kind, what was rendered or skipped and why."""

    corpus: Corpus
    support: dict[str, dict[str, KindSupport]] = field(default_factory=dict)
    demoted_compositional: int = 0

    def supported_kinds(self, locale: str) -> list[str]:
        return [kind for kind, s in self.support[locale].items() if not s.reason]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/flexmoe/corpus``, or ``~/.cache/flexmoe/corpus``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flexmoe" / "corpus"


def build_corpus(config: CorpusConfig, cache_dir: str | Path | None = None, progress: bool = True) -> Corpus:
    """The corpus ``config`` describes: loaded from the cache, or built (and cached) on first use.

    Splits ``"train"``, ``"valid"``, ``"test"`` and ``"test_compositional"``; every :class:`Pair`
    carries ``kind`` and ``item``. Same config and package versions -> byte-identical corpus.
    """
    return build_corpus_with_support(config, cache_dir, progress).corpus


def build_corpus_with_support(
    config: CorpusConfig, cache_dir: str | Path | None = None, progress: bool = True
) -> CorpusBuild:
    """As :func:`build_corpus`, with the per-locale support record (which kinds each locale has)."""
    if not isinstance(config, CorpusConfig):
        raise TypeError(f"config must be a CorpusConfig, got {type(config).__name__}")
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    pairs_path, meta_path = (directory / f"cldr-{config.cache_key()}{suffix}" for suffix in (".tsv", ".json"))
    if pairs_path.exists() and meta_path.exists():
        return _read_cache(pairs_path, meta_path)
    build = render_corpus(config, progress)
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(pairs_path, corpus_to_tsv(build.corpus))
    meta = {
        "config": dataclasses.asdict(config),
        "support": {loc: {k: dataclasses.asdict(s) for k, s in kinds.items()} for loc, kinds in build.support.items()},
        "demoted_compositional": build.demoted_compositional,
    }
    _write_atomic(meta_path, json.dumps(meta, indent=1, ensure_ascii=False))  # keeps the config order
    return build


def render_corpus(config: CorpusConfig, progress: bool = False) -> CorpusBuild:
    """Render, pair and split (no cache)."""
    # babel resolves CLDR aliases into its shared locale-data cache, so results can depend on which
    # locales were loaded earlier in the process; start every build from the same, empty state.
    reset_locale_data()
    families = [f for f in FAMILIES if any(kind in config.kinds for kind in f.kinds)]
    items = {f.name: f.make_items(random.Random(f"{config.seed}:{f.name}"), config.items_per_kind) for f in families}
    split_of = assign_splits(
        (item.id for family_items in items.values() for item in family_items),
        config.valid_fraction,
        config.test_fraction,
        config.compositional_fraction,
        config.seed,
    )
    # ordinal is judged against cardinal, so cardinal is rendered whenever ordinal is wanted.
    rendered_kinds = [k for k in KINDS if k in config.kinds or k in {FALLBACK_KIND.get(x) for x in config.kinds}]
    locales = (SOURCE_LANGUAGE, *config.languages)
    splits: dict[str, list[Pair]] = {name: [] for name in SPLITS}
    support: dict[str, dict[str, KindSupport]] = {}
    english: dict[str, dict[str, str]] = {}
    with tqdm(total=len(locales) * len(rendered_kinds), desc="corpus", unit="kind", disable=not progress) as bar:
        for locale in locales:
            texts = {}
            for kind in rendered_kinds:
                texts[kind] = _render_all(kind, items[FAMILY_OF_KIND[kind].name], locale)
                bar.update()
            if locale == SOURCE_LANGUAGE:
                english = texts
                continue
            support[locale] = {}
            for kind in config.kinds:
                family_items = items[FAMILY_OF_KIND[kind].name]
                reason = _fallback_reason(kind, texts, english)
                support[locale][kind] = KindSupport(len(texts[kind]), len(family_items) - len(texts[kind]), reason)
                if not reason:
                    _add_pairs(
                        splits, config.directions, kind, family_items, english[kind], texts[kind], locale, split_of
                    )
    demoted = demote_unseen_compositions(splits)
    return CorpusBuild(Corpus(splits), support, demoted)


def _render_all(kind: str, items: list[Item], locale: str) -> dict[str, str]:
    """item id -> text, for the items ``locale`` can render."""
    texts = {}
    for item in items:
        try:
            texts[item.id] = render(kind, item, locale)
        except Unrenderable:
            continue  # counted in KindSupport.skipped
    return texts


def _fallback_reason(kind: str, texts: dict[str, dict[str, str]], english: dict[str, dict[str, str]]) -> str:
    """Why a locale's renderings of ``kind`` are not a translation, or ``""``."""
    rendered = texts[kind]
    if not rendered:
        return "no item renders"
    limit = 0.9 if kind in NAME_KINDS else 0.5
    if kind not in DIGIT_KINDS and sum(
        text == english[kind].get(item_id) for item_id, text in rendered.items()
    ) > limit * len(rendered):
        return "falls back to English"
    other = FALLBACK_KIND.get(kind)
    if other and sum(text == texts[other].get(item_id) for item_id, text in rendered.items()) > 0.5 * len(rendered):
        return f"renders as {other}"
    return ""


def _add_pairs(
    splits: dict[str, list[Pair]],
    directions: tuple[Direction, ...],
    kind: str,
    items: list[Item],
    english: dict[str, str],
    target: dict[str, str],
    locale: str,
    split_of: dict[str, str],
) -> None:
    for item in items:
        if item.id not in target or item.id not in english:
            continue
        split = splits[split_of[item.id]]
        if "en->xx" in directions:
            split.append(Pair(english[item.id], target[item.id], SOURCE_LANGUAGE, locale, kind, item.id))
        if "xx->en" in directions:
            split.append(Pair(target[item.id], english[item.id], locale, SOURCE_LANGUAGE, kind, item.id))


TSV_FIELDS = ("split", "source_lang", "target_lang", "kind", "item", "source", "target")


def corpus_to_tsv(corpus: Corpus) -> str:
    """The cache file's text: one line per pair, fields :data:`TSV_FIELDS` (texts hold no tabs)."""
    lines = ["\t".join(TSV_FIELDS)]
    for name, pairs in corpus.splits.items():
        lines.extend("\t".join((name, p.source_lang, p.target_lang, p.kind, p.item, p.source, p.target)) for p in pairs)
    return "\n".join(lines) + "\n"


def _read_cache(pairs_path: Path, meta_path: Path) -> CorpusBuild:
    splits: dict[str, list[Pair]] = {name: [] for name in SPLITS}
    with pairs_path.open(encoding="utf-8") as handle:
        next(handle)
        for line in handle:
            name, source_lang, target_lang, kind, item, source, target = line.rstrip("\n").split("\t")
            splits.setdefault(name, []).append(Pair(source, target, source_lang, target_lang, kind, item))
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    support = {loc: {k: KindSupport(**s) for k, s in kinds.items()} for loc, kinds in meta["support"].items()}
    return CorpusBuild(Corpus(splits), support, meta["demoted_compositional"])


def _write_atomic(path: Path, text: str) -> None:
    # A build interrupted mid-write must not leave a file the next run takes for a cache hit.
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
